"""Does the actor act on its reflections? For every reflection written in a run's phases (e.g. eval-sft, collect-1),
compare the trial before it and the trial after it with the plan the reflection names ("... follow this plan: a, b,
c."): the next trial moved toward the plan when it follows the plan for more leading actions than the trial before.

usage: .venv/bin/python results/reflection_use.py RUN_DIR PHASE_PREFIX...   (e.g. eval collect)
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator

from agents.trajectory import Episode, Trial
from cluster.run_dir import RunDir

PLAN = "follow this plan:"


def plan_of(reflection: str) -> list[str] | None:
    if PLAN not in reflection:
        return None
    return [a.strip() for a in reflection.split(PLAN, 1)[1].split(".")[0].split(",") if a.strip()]


def leading_match(actions: list[str], plan: list[str]) -> int:
    n = 0
    for a, b in zip(actions, plan):
        if a != b:
            break
        n += 1
    return n


def reflected_trials(episode: Episode) -> Iterator[tuple[Trial, Trial]]:
    """(the trial a reflection was written after, the trial that followed it), for each reflection."""
    for before, after in zip(episode.trials, episode.trials[1:]):
        if before.reflection is not None:
            yield before, after


def reflection_use(run: RunDir, prefix: str) -> Counter:
    counts: Counter = Counter()
    for phase, episode in run.store.phased_episodes():
        if not phase.startswith(prefix):
            continue
        for before, after in reflected_trials(episode):
            counts["reflections"] += 1
            old, new = [s.action for s in before.steps], [s.action for s in after.steps]
            counts["next trial changed"] += old != new
            counts["next trial improved"] += after.ret > before.ret
            plan = plan_of(before.reflection.text)
            if plan is None:
                continue
            counts["with a plan"] += 1
            gained = leading_match(new, plan) - leading_match(old, plan)
            counts["moved toward the plan"] += gained > 0
            counts["moved away from it"] += gained < 0
    return counts


if __name__ == "__main__":
    run = RunDir(sys.argv[1])
    for prefix in sys.argv[2:]:
        print(prefix, dict(reflection_use(run, prefix)))
