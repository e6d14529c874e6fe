"""Env workers: a Ray actor holding several envs of one family, stepped by the episode runner."""

from __future__ import annotations

import random
from typing import Any

from envs import make_env
from envs.demos import Replay, Transition, expert_replay, failed_replay, to_transition


class EnvWorker:
    """`n_envs` independent env slots; every call names its slot, so many episodes share one worker."""

    def __init__(self, env_name: str, env_kwargs: dict[str, Any], n_envs: int) -> None:
        self.envs = [make_env(env_name, **env_kwargs) for _ in range(n_envs)]
        self.steps = 0

    def num_envs(self) -> int:
        return len(self.envs)

    def reset(self, slot: int, task_id: str, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        return self.envs[slot].reset(seed=seed, options={"task": task_id})

    def step(self, slot: int, action: str) -> Transition:
        self.steps += 1
        return to_transition(action, self.envs[slot].step(action))

    def tasks(self, split: str) -> list:
        return self.envs[0].tasks(split)

    def expert(self, slot: int, task_id: str) -> Replay:
        return expert_replay(self.envs[slot], task_id)

    def failed(self, slot: int, task_id: str, seed: int, wrong_steps: int) -> Replay | None:
        return failed_replay(self.envs[slot], task_id, random.Random(seed), wrong_steps)

    def close(self) -> None:
        for env in self.envs:
            env.close()
