"""`retrorl` command line: train, eval, demos, report, envs."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from cluster.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrorl", description="Train LLM agents from environment feedback.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set eval.trials=5 (repeatable)")

    train = sub.add_parser("train", help="train with a method (demos, SFT or a checkpoint, the method, eval, table)")
    common(train)
    train.add_argument("--method", choices=["sft", "eto", "retroformer", "retroact"],
                       help="training method (default: the config's `method`, retroact by default)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a stopped run in RUN_DIR with its own config: stored episodes are reused and "
                            "finished rounds are not run again")
    evaluate = sub.add_parser("eval", help="evaluate the base model (zero-shot ReAct and Reflexion), or the learner "
                                           "checkpoint in init.checkpoint (e.g. a trained run's checkpoints/eto-1)")
    common(evaluate)
    reflector = evaluate.add_mutually_exclusive_group()
    reflector.add_argument("--untrained-reflector", action="store_true",
                           help="serve only the checkpoint's actor; the reflector is the base model (the Reflexion "
                                "baseline: the same actor with an untrained reflector)")
    reflector.add_argument("--reflector-checkpoint", metavar="CHECKPOINT",
                           help="serve the checkpoint's actor with the reflector of another learner checkpoint "
                                "(RUN/checkpoints/NAME): which role's update moved a method's score")
    evaluate.add_argument("--resume", metavar="RUN_DIR",
                          help="continue a stopped evaluation in RUN_DIR with its own config: stored episodes are "
                               "reused, only the missing tasks are played")
    demos = sub.add_parser("demos", help="export expert trajectories of the training tasks to a run directory")
    common(demos)
    report = sub.add_parser("report", help="comparison table across run directories and a plot (report.md, report.png)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories with eval/results.json")
    report.add_argument("--out", help="output folder (default: RUN_DIR/eval for one run, ./report for several)")
    envs = sub.add_parser("envs", help="list the env families: split sizes, what each needs, where its tasks come "
                                        "from (the configured family with the config's env.kwargs)")
    common(envs)
    return parser


def _list_envs(args: argparse.Namespace) -> int:
    """Print the family table; the config's own family is described with its env.kwargs."""
    from envs import families
    from envs.listing import describe, markdown

    cfg = load_config(args.config, args.overrides)
    rows = [describe(name, **(cfg.env.kwargs if name == cfg.env.name else {})) for name in families()]
    print(markdown(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":  # reads run files only: no config, preflight, model or Ray
        from cluster.report import main as report_main

        return report_main(args.runs, args.out)
    if args.command == "envs":
        try:
            return _list_envs(args)
        except ConfigError as exc:
            print(f"retrorl: error: {exc}", file=sys.stderr)
            return 2
    # Errors the user can fix are one line naming the fix, and a non-zero exit; anything else is a bug.
    from agents.model import ModelError
    from envs.core import EnvError
    from rollout.store import StoreError

    run = None
    # Ray's start makes SIGTERM an interrupt like Ctrl-C (cluster/runtime.py); the caller's handler comes back after.
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        from cluster.console import TRANSCRIPT, transcript
        from cluster.methods import run_method
        from cluster.pipeline import Session, preflight
        from cluster.run_dir import RunDir

        resume = getattr(args, "resume", None)
        untrained_reflector = getattr(args, "untrained_reflector", False)
        reflector_checkpoint = getattr(args, "reflector_checkpoint", None)
        if resume:
            cfg, untrained_reflector, reflector_checkpoint = resumable(resume, args)
        else:
            overrides = args.overrides + ([f"method={args.method}"] if getattr(args, "method", None) else [])
            cfg = load_config(args.config, overrides)
            if args.command != "train" and cfg.name is None:  # runs named for what they did: textworld-eval-<stamp>
                cfg = cfg.model_copy(update={"name": f"{cfg.env.name}-{args.command}"})
        if untrained_reflector and cfg.init.checkpoint is None:
            raise ConfigError("--untrained-reflector evaluates a checkpoint's actor: add --set "
                              "init.checkpoint=RUN/checkpoints/NAME (without one, both roles are the base model)")
        if reflector_checkpoint is not None and cfg.init.checkpoint is None:
            raise ConfigError("--reflector-checkpoint pairs a checkpoint's actor with another's reflector: add --set "
                              "init.checkpoint=RUN/checkpoints/NAME for the actor")
        # `eval` of a checkpoint needs the learner: it loads the checkpoint and publishes its adapters to the engines.
        with_learner = args.command == "train" or (args.command == "eval" and cfg.init.checkpoint is not None)
        resumed = RunDir(resume) if resume else None
        prepared = preflight(cfg, with_learner=with_learner, needs_demos=args.command != "eval", run=resumed,
                             reflector_checkpoint=reflector_checkpoint)
        if resumed is None:
            run = RunDir.create(cfg)
            # What the config does not hold, for --resume: which command made the run, with which flags.
            run.log("command", command=args.command, untrained_reflector=untrained_reflector,
                    reflector_checkpoint=reflector_checkpoint)
            if args.command == "eval" and cfg.init.checkpoint is not None:
                run.record_policy(cfg.init.checkpoint)
        else:
            run = resumed
        if args.command == "train":
            run_method(cfg, run, prepared)
        elif args.command == "eval":
            with transcript(run.path):
                _evaluate(cfg, run, prepared, with_learner, untrained_reflector, reflector_checkpoint)
        elif args.command == "demos":
            with transcript(run.path):
                session = Session(cfg, run, prepared, with_learner=False)
                try:
                    episodes = session.demos(session.il_tasks())
                finally:
                    session.close()
                print(f"{len(episodes)} expert episodes in {run.path / 'trajectories'}")
                print(f"log: {run.path / TRANSCRIPT}")
    except (ConfigError, ModelError, EnvError, StoreError) as exc:
        where = ""
        if run is not None:  # found only once the run was under way: its folder says so (metrics.jsonl)
            run.log("failed", error=str(exc))
            where = f" (run directory {run.path}, marked failed in its metrics.jsonl)"
        print(f"retrorl: error: {exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM once Ray is up
        if run is None:
            print("\nretrorl: interrupted before the run directory was made", file=sys.stderr)
        else:  # everything stored so far was written atomically: a resumed run keeps it
            run.log("interrupted")
            again = ""
            if args.command in ("train", "eval"):
                again = f"; continue it with: retrorl {args.command} --resume {shlex.quote(str(run.path))}"
            print(f"\nretrorl: interrupted; the run directory {run.path} keeps what was done{again}",
                  file=sys.stderr)
        return 130
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # a caller in the same process (tests) may start its own
            ray.shutdown()
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
    return 0


def _evaluate(cfg, run, prepared, with_learner: bool, untrained_reflector: bool,
              reflector_checkpoint: str | None) -> None:
    """`retrorl eval`: the protocol for the base model or init.checkpoint (its reflector untrained, or another
    checkpoint's), its table, and the closing lines."""
    from agents.trajectory import ACTOR
    from cluster.console import closing_lines
    from cluster.evaluation import markdown_table
    from cluster.pipeline import Session

    session = Session(cfg, run, prepared, with_learner=with_learner)
    try:
        label = "base"
        if cfg.init.checkpoint is not None:
            label = Path(cfg.init.checkpoint).name  # sft, eto-1, retroact-2, ...
            if untrained_reflector:
                session.start_policy([], roles=[ACTOR])
                label = f"Reflexion ({label} actor)"
            elif reflector_checkpoint is not None:
                session.start_policy([], reflector_from=reflector_checkpoint)
                label = f"{label} actor with {Path(reflector_checkpoint).name} reflector"
            else:
                session.start_policy([])
        rows = session.evaluate(label)
    finally:
        session.close()
    run.write_json("eval/results.json", rows)
    print(run.write_text("eval/table.md", markdown_table(rows)).read_text())
    run.log("done", command="eval")
    for line in closing_lines(run.path):
        print(line)


def resumable(path: str, args: argparse.Namespace):
    """The config of the stopped run in `path`, whether it evaluates with an untrained reflector and the reflector
    checkpoint it evaluates with; a run that cannot be continued by `args.command` is a ConfigError."""
    from cluster.run_dir import made_by, read_metrics

    flags = (getattr(args, "method", None), getattr(args, "untrained_reflector", False),
             getattr(args, "reflector_checkpoint", None))
    if args.config or args.overrides or any(flags):
        flags = "--set and --method" if args.command == "train" else "--set, --untrained-reflector and " \
            "--reflector-checkpoint"
        raise ConfigError("--resume continues a run with the config it was started with (RUN_DIR/config.yaml): "
                          f"drop --config, {flags}")
    folder = Path(path)
    if not (folder / "config.yaml").is_file() or not (folder / "trajectories").is_dir():
        raise ConfigError(f"--resume {path}: not a run directory (no config.yaml / trajectories/); give the folder "
                          f"`retrorl {args.command}` printed as its run directory")
    records = read_metrics(folder / "metrics.jsonl")
    if any(r.get("event") == "done" for r in records):
        raise ConfigError(f"--resume {path}: this run finished (its results are in {folder / 'eval'}); nothing "
                          "to continue")
    started = made_by(records)
    if started["command"] != args.command:
        other = f"retrorl {started['command']}"
        how = (f"continue it with: {other} --resume {shlex.quote(path)}" if started["command"] in ("train", "eval")
               else f"`{other}` has no --resume: run it again")
        raise ConfigError(f"--resume {path}: this run was started by `{other}`; {how}")
    return (load_config(folder / "config.yaml"), bool(started.get("untrained_reflector", False)),
            started.get("reflector_checkpoint"))


if __name__ == "__main__":
    sys.exit(main())
