"""What RetroAct's actor loss reinforces: the trials of a run's exploration rounds with a positive return, split
into won trials and trials with only a partial score, with their steps, invalid actions (the env did not
understand them), generated tokens (the loss averages over tokens), how many followed a reflection (a trial after
the first) and how many loop (one action is half their steps or more); and what `retroact.actor_steps=new_valid`
would train of them: the steps whose action the env understood and the trial had not taken before, their tokens,
and the trials left with none (dropped).

usage: .venv/bin/python results/rewarded_trials.py RUN_DIR [PHASE]   (PHASE: explore-1 by default)
"""

from __future__ import annotations

import sys
from collections import Counter

from cluster.run_dir import RunDir
from learners.batching import new_valid_steps


def main(run: str, phase: str = "explore-1") -> None:
    counts: Counter = Counter()
    for episode in RunDir(run).store.episodes(phase):
        for trial in episode.trials:
            if trial.ret <= 0:
                continue
            kind = "won" if trial.success else "partial"
            counts[kind, "trials"] += 1
            counts[kind, "return"] += trial.ret
            counts[kind, "reflected"] += trial.index > 0
            actions = Counter(step.action for step in trial.steps)
            counts[kind, "looping"] += bool(actions) and 2 * max(actions.values()) >= len(trial.steps)
            trained = new_valid_steps(trial)
            counts[kind, "no_new_valid"] += not any(trained)
            for step, new_valid in zip(trial.steps, trained):
                counts[kind, "steps"] += 1
                counts[kind, "invalid"] += not step.valid
                counts[kind, "tokens"] += len(step.generation.completion_ids)
                counts[kind, "new_valid"] += new_valid
                counts[kind, "new_valid_tokens"] += new_valid * len(step.generation.completion_ids)
    for kind in ("won", "partial"):
        n = counts[kind, "steps"]
        print(f"{phase} {kind}: {counts[kind, 'trials']} trials, mean return "
              f"{counts[kind, 'return'] / max(counts[kind, 'trials'], 1):.2f}, {n} steps, "
              f"{counts[kind, 'invalid']} invalid ({100 * counts[kind, 'invalid'] / max(n, 1):.0f}%), "
              f"{counts[kind, 'tokens']} tokens, {counts[kind, 'reflected']} after a reflection, "
              f"{counts[kind, 'looping']} looping; new_valid: {counts[kind, 'new_valid']} steps, "
              f"{counts[kind, 'new_valid_tokens']} tokens, {counts[kind, 'no_new_valid']} trials with none")


if __name__ == "__main__":
    main(*sys.argv[1:])
