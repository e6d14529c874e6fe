"""What an exploration round adds over its starting policy's greedy play: the training tasks it won, split into
those the start already wins greedily and the new ones (the only trajectories the actor's reward can teach it
something it does not already do), by task kind.

usage: .venv/bin/python results/new_wins.py RUN_DIR GREEDY_RESULTS [PHASE]
  RUN_DIR         a run with a stored exploration (PHASE, explore-1 by default)
  GREEDY_RESULTS  eval/results.json of the same start evaluated greedily on the training tasks, e.g.
                  results/twxs-eto-train/twxs-sft-train-20261205-081303/eval/results.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from cluster.run_dir import RunDir


def main(run: str, greedy_results: str, phase: str = "explore-1") -> None:
    rows = json.loads(Path(greedy_results).read_text())
    first = next(r for r in rows if r["trials"] == 1 and r["split"] == "train")  # the ReAct row: trial 1
    greedy = {o["task"]: o["success"] for o in first["outcomes"]}
    kind = {o["task"]: o["kind"] for o in first["outcomes"]}
    explored = {e.task_id: e for e in RunDir(run).store.episodes(phase)}
    missing = sorted(set(explored) - set(greedy))
    if missing:
        sys.exit(f"{len(missing)} explored tasks have no greedy outcome in {greedy_results}, e.g. {missing[0]}")
    first_won = {t for t, e in explored.items() if e.trials[0].success}
    won = {t for t, e in explored.items() if any(trial.success for trial in e.trials)}
    new = sorted(t for t in won if not greedy[t])
    print(f"{phase}: {len(explored)} tasks; greedy start won {sum(greedy[t] for t in explored)}")
    print(f"won at trial 1: {len(first_won)} ({len([t for t in first_won if not greedy[t]])} the greedy start "
          f"fails); at any trial: {len(won)}, of which new: {len(new)} {dict(Counter(kind[t] for t in new))}")
    print(f"greedy wins never won here: {len([t for t in explored if greedy[t] and t not in won])}")


if __name__ == "__main__":
    main(*sys.argv[1:])
