"""What Retroformer's ratings are made of: every reflection of a run's phase rated R(k+1) - R(k) (up, down or
unchanged), per task kind, with how often the next trial was won, how often it repeated the previous trial's
actions exactly (the actor ignored the reflection), how often it recalls the task's expert answer (names every
action of the run's expert demo of that task that the failed trial lacked: possible only on tasks the reflector
imitated), and the reflections' length in tokens.

usage: .venv/bin/python results/rated_reflections.py RUN_DIR [PHASE]   (PHASE: collect-1 by default)
"""

from __future__ import annotations

import sys
from collections import Counter

from agents.trajectory import Trial
from cluster.run_dir import RunDir
from learners.batching import expert_wins
from reflection_use import reflected_trials


def recalls(reflection: str, failed: Trial, expert: list[str]) -> bool:
    """The reflection names every action of the expert's play that the failed trial did not take."""
    taken = {s.action for s in failed.steps}
    missing = [a for a in expert if a not in taken]
    return bool(missing) and all(a.lower() in reflection.lower() for a in missing)


def main(run: str, phase: str = "collect-1") -> None:
    store = RunDir(run).store
    experts = {task: [s.action for s in e.trials[0].steps] for task, e in expert_wins(store.episodes("demos")).items()}
    counts: Counter = Counter()
    lengths = []
    for episode in store.episodes(phase):
        kind = episode.tags.get("kind", "-")  # the game kind the runner tags (none in runs stored before it)
        for before, after in reflected_trials(episode):
            change = after.ret - before.ret
            rating = "up" if change > 0 else "down" if change < 0 else "unchanged"
            counts[rating] += 1
            counts[rating, kind] += 1
            counts[rating, "next won"] += after.success
            counts[rating, "same actions"] += [s.action for s in before.steps] == [s.action for s in after.steps]
            recalled = recalls(before.reflection.text, before, experts.get(episode.task_id, []))
            counts[rating, "recalls"] += recalled
            counts[rating, "recalls, next won"] += recalled and after.success
            lengths.append(len(before.reflection.completion_ids))
    if not lengths:
        sys.exit(f"no reflections in phase {phase!r} of {run}")
    kinds = sorted({k[1] for k in counts if isinstance(k, tuple)}
                   - {"next won", "same actions", "recalls", "recalls, next won"})
    print(f"{len(lengths)} reflections, mean {sum(lengths) / len(lengths):.1f} tokens, longest {max(lengths)}")
    for rating in ("up", "down", "unchanged"):
        per_kind = ", ".join(f"{k} {counts[rating, k]}" for k in kinds if counts[rating, k])
        print(f"{rating}: {counts[rating]} (next trial won {counts[rating, 'next won']}, same actions as the trial "
              f"before {counts[rating, 'same actions']}, recalls the expert's answer {counts[rating, 'recalls']} "
              f"(then won {counts[rating, 'recalls, next won']}); {per_kind})")


if __name__ == "__main__":
    main(*sys.argv[1:])
