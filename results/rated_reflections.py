"""What Retroformer's ratings are made of: every reflection of a run's phase rated R(k+1) - R(k) (up, down or
unchanged), per task kind, with how often the next trial was won, how often it repeated the previous trial's
actions exactly (the actor ignored the reflection), and the reflections' length in tokens.

usage: .venv/bin/python results/rated_reflections.py RUN_DIR [PHASE]   (PHASE: collect-1 by default)
"""

from __future__ import annotations

import sys
from collections import Counter

from cluster.run_dir import RunDir


def main(run: str, phase: str = "collect-1") -> None:
    counts: Counter = Counter()
    lengths = []
    for episode in RunDir(run).store.episodes(phase):
        kind = episode.tags.get("kind", "-")  # the game kind the runner tags (none in runs stored before it)
        for before, after in zip(episode.trials, episode.trials[1:]):
            if before.reflection is None:
                continue
            change = after.ret - before.ret
            rating = "up" if change > 0 else "down" if change < 0 else "unchanged"
            counts[rating] += 1
            counts[rating, kind] += 1
            counts[rating, "next won"] += after.success
            counts[rating, "same actions"] += [s.action for s in before.steps] == [s.action for s in after.steps]
            lengths.append(len(before.reflection.completion_ids))
    if not lengths:
        sys.exit(f"no reflections in phase {phase!r} of {run}")
    kinds = sorted({k[1] for k in counts if isinstance(k, tuple)} - {"next won", "same actions"})
    print(f"{len(lengths)} reflections, mean {sum(lengths) / len(lengths):.1f} tokens, longest {max(lengths)}")
    for rating in ("up", "down", "unchanged"):
        per_kind = ", ".join(f"{k} {counts[rating, k]}" for k in kinds if counts[rating, k])
        print(f"{rating}: {counts[rating]} (next trial won {counts[rating, 'next won']}, same actions as the trial "
              f"before {counts[rating, 'same actions']}; {per_kind})")


if __name__ == "__main__":
    main(*sys.argv[1:])
