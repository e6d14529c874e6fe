"""Where a 2-trial evaluation departs from a baseline on the same tasks (e.g. a `--reflector-checkpoint` role swap
against the checkpoint it swaps into): how many reflections have the baseline's text, how many trials repeat the
baseline's actions, and the mean returns x100 of both runs split by whether trial 1's actions are the baseline's.

usage: .venv/bin/python results/role_swap.py BASELINE_RUN RUN   (each run's evaluation phase, eval-*)
"""

from __future__ import annotations

import sys

from agents.trajectory import Episode
from cluster.evaluation import eval_phase
from cluster.run_dir import RunDir


def evaluation(run: str) -> dict[str, Episode]:
    run_dir = RunDir(run)
    phases = [eval_phase(r["label"]) for r in run_dir.metrics() if r.get("event") == "eval"]
    if len(phases) != 1:
        raise SystemExit(f"{run}: expected one evaluation, found {phases}")
    return {e.task_id: e for e in run_dir.store.episodes(phases[0])}


def actions(episode: Episode, trial: int) -> list[str]:
    return [s.action for s in episode.trials[trial].steps]


def main(baseline: str, run: str) -> None:
    base, other = evaluation(baseline), evaluation(run)
    tasks = sorted(base.keys() & other.keys())
    same_text = sum(base[t].trials[0].reflection.text == other[t].trials[0].reflection.text for t in tasks)
    same = [t for t in tasks if actions(base[t], 0) == actions(other[t], 0)]
    print(f"{len(tasks)} tasks: same reflection text {same_text}, same trial-2 actions "
          f"{sum(actions(base[t], 1) == actions(other[t], 1) for t in tasks)}, same trial-2 return "
          f"{sum(base[t].trials[1].ret == other[t].trials[1].ret for t in tasks)}, same trial-1 actions {len(same)}")
    for label, subset in (("same trial 1", same), ("different trial 1", [t for t in tasks if t not in same])):
        cells = []
        for name, episodes in (("baseline", base), ("run", other)):
            r1 = [episodes[t].trials[0].ret for t in subset]
            r2 = [episodes[t].trials[1].ret for t in subset]
            up, down = sum(b > a for a, b in zip(r1, r2)), sum(b < a for a, b in zip(r1, r2))
            m1, m2 = (100 * sum(r) / max(len(r), 1) for r in (r1, r2))
            cells.append(f"{name} trial 1 {m1:.1f} -> trial 2 {m2:.1f} ({up} up, {down} down)")
        print(f"{label} ({len(subset)}): " + "; ".join(cells))


if __name__ == "__main__":
    main(*sys.argv[1:])
