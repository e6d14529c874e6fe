"""The engine contract: token ids in; completion ids, per-token log-probs and the adapter version used out.

Every engine (HFEngine in rollout/hf_engine.py, VLLMEngine in rollout/vllm_engine.py, each run as a Ray actor)
serves LoRA roles on one base model. Version 0 of a role is the bare base model; the learner publishes version N+1
as a dict of LoRA tensors and the engine swaps it in between batches, without a restart and without touching the
other role. `EngineShell` is what both engines share around their own generate / update_adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from agents.adapters import LORA, AdapterUpdate
from agents.model import node_threads, resolve_model
from agents.trajectory import ROLES

# Requests one engine step serves together (the HF engine's gathered batch, vLLM's max_num_seqs). The engines'
# default and rollout.max_batch_size's (cluster/config.py reads it here, as learner.lora reads agents.adapters.LORA).
MAX_BATCH_SIZE = 32


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


class EngineShell:
    """The constructor options, per-role versions, checks and small calls both engines share. Each engine adds
    `generate(prompt_ids, role, sampling) -> GenerateResult`, `update_adapter(update) -> version`,
    `check_adapter(update)`, `load_adapter_dir(role, version, path)` and `stats()`; through Ray they are called
    the same way whether an engine implements them sync or async."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        lora: dict[str, Any] | None = None,
        roles: Sequence[str] = ROLES,
        threads: int | None = None,
        max_batch_size: int = MAX_BATCH_SIZE,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        """`lora`: learner.lora's settings (agents.adapters.LORA's where absent); `threads`: compute threads on
        this node (None: every core this actor may use; Ray sets OMP_NUM_THREADS to its reserved CPUs, often 1)."""
        self.roles = tuple(roles)
        if not self.roles:
            raise ValueError("at least one role is needed")
        self.model_path = str(resolve_model(model_path))  # on this node: its own cache (the driver's may be elsewhere)
        self.requested_dtype = dtype
        self.lora = LORA.merged(lora)
        self.threads = node_threads(threads)
        self.max_batch_size = max_batch_size
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self._version = {r: 0 for r in self.roles}  # latest accepted per role: what requests from now on get

    def pid(self) -> int:
        """The engine actor's process id (operators and fault-injection tests kill it by pid)."""
        return os.getpid()

    def versions(self) -> dict[str, int]:
        """Latest accepted version per role: every request queued from now on is served with it."""
        return dict(self._version)

    def shutdown(self) -> None:
        """Free what outlives the actor's process (cluster.runtime.Actors.shutdown calls it before ray.kill)."""

    def _check_role(self, update: AdapterUpdate) -> None:
        if update.role not in self._version:
            raise ValueError(f"unknown role {update.role!r}; this engine serves {self.roles}")

    def _check_version(self, update: AdapterUpdate) -> None:
        """An update for a role this engine serves, not older than the version it already has."""
        self._check_role(update)
        if update.version < self._version[update.role]:
            raise ValueError(
                f"stale update for {update.role!r}: version {update.version} < {self._version[update.role]}"
            )


def check_request(roles: Sequence[str], prompt_ids: list[int], role: str, sampling: SamplingParams) -> None:
    """The checks every engine makes before it queues a request; each error names what is wrong."""
    if role not in roles:
        raise ValueError(f"unknown role {role!r}; this engine serves {tuple(roles)}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    if sampling.max_new_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise ValueError(f"bad sampling params {sampling}")
