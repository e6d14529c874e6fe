"""Env workers: a Ray actor holding several envs of one family, stepped by the episode runner."""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

from envs import EnvLost, make_env
from envs.demos import Replay, Transition, expert_replay, failed_replay, to_transition


class EpisodeLost(RuntimeError):
    """The env state an episode was played on is gone: the worker was restarted by Ray since the episode's reset,
    or the env's own process (ScienceWorld's JVM) died. The runner replays the episode from trial 1."""


class EnvWorker:
    """`n_envs` independent env slots; every call names its slot, so many episodes share one worker.

    Each life of the worker has its own `incarnation` id, returned by `reset` in info["worker"]; a `step` that
    passes an older one raises EpisodeLost, so an episode never continues on an env it did not reset."""

    def __init__(self, env_name: str, env_kwargs: dict[str, Any], n_envs: int) -> None:
        self.envs = [make_env(env_name, **env_kwargs) for _ in range(n_envs)]
        self.steps = 0
        self.incarnation = uuid.uuid4().hex

    def num_envs(self) -> int:
        return len(self.envs)

    def pid(self) -> int:
        """The worker's process id (operators and fault-injection tests kill it by pid)."""
        return os.getpid()

    def reset(self, slot: int, task_id: str, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        try:
            obs, info = self.envs[slot].reset(seed=seed, options={"task": task_id})
        except EnvLost as e:
            raise EpisodeLost(f"slot {slot}: {e}") from e
        return obs, {**info, "worker": self.incarnation}

    def step(self, slot: int, action: str, incarnation: str | None = None) -> Transition:
        if incarnation is not None and incarnation != self.incarnation:
            raise EpisodeLost(f"env worker restarted since slot {slot} was reset; replay the episode")
        self.steps += 1
        try:
            return to_transition(action, self.envs[slot].step(action))
        except EnvLost as e:
            raise EpisodeLost(f"slot {slot}: {e}") from e

    def tasks(self, split: str) -> list:
        return self.envs[0].tasks(split)

    def expert(self, slot: int, task_id: str) -> Replay:
        return expert_replay(self.envs[slot], task_id)

    def failed(self, slot: int, task_id: str, seed: int, wrong_steps: int) -> Replay | None:
        return failed_replay(self.envs[slot], task_id, random.Random(seed), wrong_steps)

    def close(self) -> None:
        for env in self.envs:
            env.close()
