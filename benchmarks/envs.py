"""Env families: expert demos' win rate per split and env speed, with each family's default kwargs.

For every family that can be built here (`retrorl envs` says why one cannot), every task of every split: replay
`expert_actions` and count wins; then time env steps alone (expert actions and one invalid action per expert step,
resets excluded) and resets alone. A family without demos (webshop) or without data here (hotpotqa) is listed
with the reason. First use builds the games (ALFWorld's offline games take minutes).

  .venv/bin/python benchmarks/envs.py [--family alfworld ...] [--set family.key=value ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs import SPLITS, EnvError, families, make_env  # noqa: E402

INVALID = "xyzzy the teapot"  # no family has such a command


def measure(name: str, kwargs: dict) -> dict:
    try:
        env = make_env(name, **kwargs)
        env.prepare()
        tasks = {split: env.tasks(split) for split in SPLITS}
    except EnvError as exc:
        return {"family": name, "problem": str(exc)}
    out: dict = {"family": name, "kwargs": kwargs, "splits": {}}
    step_s = reset_s = 0.0
    steps = resets = 0
    try:
        for split, split_tasks in tasks.items():
            wins = 0
            for task in split_tasks:
                if not env.has_demos:
                    break
                actions = env.expert_actions(task.task_id)
                t0 = time.perf_counter()
                env.reset(options={"task": task.task_id})
                reset_s += time.perf_counter() - t0
                resets += 1
                won = False
                for action in actions:
                    t0 = time.perf_counter()
                    _, _, over, truncated, info = env.step(action)
                    step_s += time.perf_counter() - t0
                    steps += 1
                    won = bool(info["won"])
                    if over or truncated:
                        break
                wins += won
            out["splits"][split] = {"tasks": len(split_tasks), "expert_wins": wins if env.has_demos else None}
        # invalid actions, timed separately: a family may answer them without its engine
        if env.has_demos and tasks["train"]:
            env.reset(options={"task": tasks["train"][0].task_id})
            t0 = time.perf_counter()
            for _ in range(200):
                env.step(INVALID)
            out["invalid_steps_per_s"] = 200 / (time.perf_counter() - t0)
    finally:
        env.close()
    out["expert_steps"] = steps
    out["expert_steps_per_s"] = steps / step_s if step_s else None
    out["reset_s"] = reset_s / resets if resets else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", help="only these families (default: all)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="FAMILY.KEY=VALUE",
                    help="a family's kwarg, e.g. --set hotpotqa.data_file=/data/hotpot_dev_distractor_v1.json")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    kwargs: dict[str, dict] = {}
    for item in args.sets:
        key, _, value = item.partition("=")
        family, _, option = key.partition(".")
        kwargs.setdefault(family, {})[option] = yaml.safe_load(value)
    results = []
    for name in args.family or families():
        t0 = time.perf_counter()
        result = measure(name, kwargs.get(name, {}))
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        if "problem" in result:
            print(f"{name}: not measured: {result['problem']}", flush=True)
            continue
        wins = ", ".join(f"{s} {v['expert_wins']}/{v['tasks']}" for s, v in result["splits"].items())
        speed = result["expert_steps_per_s"]
        print(f"{name}: expert wins {wins}; {result['expert_steps']} expert steps at "
              f"{speed:.0f}/s" if speed else f"{name}: {wins}; no expert steps", end="", flush=True)
        if result.get("reset_s") is not None:
            print(f", reset {1000 * result['reset_s']:.1f} ms, invalid {result['invalid_steps_per_s']:.0f}/s", end="")
        print(f" ({result['seconds']:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
