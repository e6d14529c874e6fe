"""What a run directory already holds, so `retrorl train --resume RUN_DIR` continues a run without losing written
trajectories or repeating finished rounds.

A pipeline re-runs its script from the top; every step asks this record first:
- a rollout (demos, exploration, evaluation) reuses the episodes stored for its phase and plays only the missing
  tasks (an episode is stored whole or not at all, so a phase cut by a crash resumes where it stopped);
- a training round whose checkpoint is complete is not trained again: the session loads that checkpoint (adapters,
  optimizer, step, RNG) before the next step that needs the learner or the engines;
- a record already logged (a round's, an evaluation's) is not logged twice.
A new run gets an empty record, and every answer is "not done".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agents.trajectory import Episode
from cluster.run_dir import RunDir


@dataclass
class Resume:
    episodes: dict[str, list[Episode]] = field(default_factory=dict)  # phase -> stored episodes, in store order
    checkpoints: set[str] = field(default_factory=set)  # names under RUN/checkpoints/ with a complete checkpoint
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl as written before the restart

    @classmethod
    def of(cls, run: RunDir) -> "Resume":
        episodes: dict[str, list[Episode]] = defaultdict(list)
        for phase, episode in run.store.phased_episodes():
            episodes[phase].append(episode)
        checkpoints = {p.name for p in (run.path / "checkpoints").iterdir() if (p / "learner.json").is_file()}
        return cls(dict(episodes), checkpoints, run.metrics())

    def split(self, phase: str, tasks: list[tuple[str, str]]) -> tuple[dict[int, Episode], list[int]]:
        """Which of `tasks` (task_id, split) already have a stored episode of `phase` (index -> episode), and the
        indices still to play."""
        return match_stored(self.episodes.get(phase, []), tasks)

    def logged(self, event: str, **match: Any) -> dict[str, Any] | None:
        """The last record of `event` whose fields equal `match`, if one was written before the restart."""
        for record in reversed(self.records):
            if record.get("event") == event and all(record.get(k) == v for k, v in match.items()):
                return record
        return None


def match_stored(episodes: Iterable[Episode], tasks: list[tuple[str, str]]) -> tuple[dict[int, Episode], list[int]]:
    """Stored episodes matched to `tasks` (task_id, split) in order: index -> episode, and the indices left without
    one. A task listed n times takes n of its episodes, in store order; none is handed out twice."""
    pool: dict[tuple[str, str], list[Episode]] = defaultdict(list)
    for e in episodes:
        pool[(e.task_id, e.split)].append(e)
    done: dict[int, Episode] = {}
    todo: list[int] = []
    for i, key in enumerate(tasks):
        if pool.get(key):
            done[i] = pool[key].pop(0)
        else:
            todo.append(i)
    return done, todo
