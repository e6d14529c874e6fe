"""The engine contract: token ids in; completion ids, per-token log-probs and the adapter version used out.

Every engine (HF transformers now, vLLM later) serves two LoRA roles on one base model. Version 0 of a role is
the bare base model; the learner publishes version N+1 as a dict of LoRA tensors and the engine swaps it in
between batches, without a restart and without touching the other role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from agents.adapters import AdapterUpdate  # noqa: F401 - part of the engine contract


@dataclass(frozen=True)
class SamplingParams:
    # No defaults for the policy's choices: a run's come from agent.actor / agent.reflector (cluster/config.py).
    temperature: float  # 0 means greedy
    max_new_tokens: int
    top_p: float = 1.0  # 1: no nucleus cut (the config's default is this one)
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (the eos is always a stop)
    seed: int | None = None


@dataclass
class GenerateResult:
    completion_ids: list[int]
    # log pi(token | context) under the serving policy at temperature 1, i.e. the model's own distribution;
    # this is what off-policy importance weights compare against.
    logprobs: list[float]
    version: int
    finish_reason: str  # "stop" (a stop token was emitted, and is included) or "length"
    stats: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """HFEngine (rollout/hf_engine.py) and VLLMEngine (rollout/vllm_engine.py), each run as a Ray actor; through
    Ray a method is called the same way whether the engine implements it sync or async."""

    async def generate(self, prompt_ids: list[int], role: str, sampling: SamplingParams) -> GenerateResult: ...

    def update_adapter(self, update: AdapterUpdate) -> int: ...

    def versions(self) -> dict[str, int]: ...


def check_request(roles: Sequence[str], prompt_ids: list[int], role: str, sampling: SamplingParams) -> None:
    """The checks every engine makes before it queues a request; each error names what is wrong."""
    if role not in roles:
        raise ValueError(f"unknown role {role!r}; this engine serves {tuple(roles)}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    if sampling.max_new_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise ValueError(f"bad sampling params {sampling}")
