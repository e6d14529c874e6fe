"""`retrorl` command line: train, eval, demos."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrorl", description="Train LLM agents from environment feedback.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set eval.trials=5 (repeatable)")

    common(sub.add_parser("train", help="run the main job: demos, zero-shot eval, IL, eval, table"))
    common(sub.add_parser("eval", help="evaluate the base model (zero-shot ReAct and Reflexion)"))
    demos = sub.add_parser("demos", help="export expert trajectories of the training tasks to a run directory")
    common(demos)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Errors the user can fix are one line naming the fix, and a non-zero exit; anything else is a bug.
    from agents.model import ModelError
    from envs.core import EnvError

    try:
        cfg = load_config(args.config, args.overrides)
        from cluster.pipeline import Session, preflight, run_il
        from cluster.run_dir import RunDir

        prepared = preflight(cfg)
        run = RunDir.create(cfg)
        if args.command == "train":
            run_il(cfg, run, prepared)
        elif args.command == "eval":
            from cluster.evaluation import evaluate, markdown_table

            session = Session(cfg, run, prepared, with_learner=False)
            try:
                episodes = session.rollout(session.eval_tasks(), "eval", cfg.eval.trials)
            finally:
                session.close()
            rows = evaluate(episodes, "base", cfg.eval.trials)
            run.write_json("eval/results.json", rows)
            print(run.write_text("eval/table.md", markdown_table(rows)).read_text())
        elif args.command == "demos":
            session = Session(cfg, run, prepared, with_learner=False)
            try:
                episodes = session.demos(session.tasks("train", cfg.env.train_tasks))
            finally:
                session.close()
            print(f"{len(episodes)} expert episodes in {run.path / 'trajectories'}")
    except (ConfigError, ModelError, EnvError) as exc:
        print(f"retrorl: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
