"""The trajectory records every stage shares: episode -> trials -> steps, each model call a `Generation`.

A trial's actor token sequence grows only by appending ids, so step k's `prompt_ids` is a prefix of step k+1's and
the whole trial is `steps[-1].generation.prompt_ids + steps[-1].generation.completion_ids`. The learner trains on
exactly these ids with the behaviour log-probs the engine returned; generated text is never re-tokenised.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

ACTOR = "actor"
REFLECTOR = "reflector"
ROLES = (ACTOR, REFLECTOR)
EXPERT_VERSION = -1  # `Generation.version` of tokens written by a template, not sampled from a policy


def new_episode_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Generation:
    """One model call: the context fed in, the tokens that came out, and who produced them."""

    role: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each completion token (0.0 for expert tokens)
    version: int  # adapter version that sampled it; EXPERT_VERSION for demonstrations
    text: str
    finish_reason: str = "stop"  # stop | length | expert

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError("one behaviour log-prob per completion token is required")


@dataclass
class Step:
    observation: str  # what the env returned after this step's action
    action: str
    thought: str
    reward: float
    score: float
    valid: bool  # the env understood the action
    format_ok: bool  # the completion parsed as Thought/Action
    generation: Generation


@dataclass
class Trial:
    index: int  # 0-based trial number within the episode
    memory: list[str]  # reflections placed in this trial's prompt
    steps: list[Step] = field(default_factory=list)
    ret: float = 0.0  # normalised return R_k in [0, 1]
    success: bool = False
    format_errors: int = 0
    reflection: Generation | None = None  # written after this trial when it failed and trials remain


@dataclass
class Episode:
    episode_id: str
    env: str
    task_id: str
    split: str
    source: str  # rollout | expert
    trials: list[Trial] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)  # method, round, ... free-form labels

    @property
    def returns(self) -> list[float]:
        return [t.ret for t in self.trials]

    @property
    def success(self) -> bool:
        return any(t.success for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Episode":
        trials = []
        for t in d["trials"]:
            steps = [Step(**{**s, "generation": Generation(**s["generation"])}) for s in t["steps"]]
            refl = Generation(**t["reflection"]) if t.get("reflection") else None
            trials.append(Trial(**{**t, "steps": steps, "reflection": refl}))
        return cls(**{**d, "trials": trials, "tags": dict(d.get("tags") or {})})
