"""The learner: one frozen base model, one PEFT LoRA adapter per role, a DeepSpeed engine driving the updates.

One optimizer step may train several roles, a role in several parts (RetroAct's RL + IL batch): each part's forward
runs with its role's adapter active and is backpropagated at once (gradients accumulate; only one part's graph is
alive at a time, and a gradient-checkpointing recompute runs under the right adapter), then one `engine.step`.
The gradients equal those of the parts' losses summed under one backward. Two details make this correct:
- PEFT's `set_adapter` turns `requires_grad` off for inactive adapters; autograd then drops their gradients at
  backward time (and ZeRO's grad hooks skip them), so every adapter parameter is switched back on after a switch.
- An adapter whose role has no batch in a step must not move: DeepSpeed hands the optimizer zero gradients for
  it, and Adam with zero gradients still moves weights (momentum, weight decay). The optimizer has one param
  group per adapter and skips inactive groups entirely (weights, moments and step count stay untouched).

Accelerator-agnostic: the device and the collective backend come from `deepspeed.get_accelerator()`, so the same
code runs on CPU (gloo) and GPUs (nccl).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.adapters import LORA, AdapterUpdate
from agents.model import (hardware, load_model, node_threads, resolve_dtype, resolve_model, trim_heap,
                          weights_fingerprint)
from agents.trajectory import ROLES
from envs.atomic import staged_dir
from envs.cache import resolve_cache_dir
from learners.adapters import adapter_parameters, save_adapter
from learners.batching import Batch, TokenSample, cap_length, make_batches
from learners.losses import il_loss, token_logprobs
from learners.progress import TrainProgress, tracked

SHARED_ADAPTER = "shared"
REFERENCE_PREFIX = "reference:"  # key prefix of reference-policy tensors in a checkpoint's adapters.safetensors
# What `save_checkpoint` writes; a folder missing one is not a checkpoint `load_checkpoint` can read.
CHECKPOINT_FILES = ("learner.json", "adapters.safetensors", "optimizer.pt", "rng.pt")
# Architectures whose logits are exactly lm_head(final hidden state); for them only scored positions go through
# the LM head (a third of SmolLM2's FLOPs, and the [N, vocab] buffer shrinks to agent tokens only).
_PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}

# (batch, logprobs [B, T-1]) -> (loss, token count) or (loss, token count, {stat: float})
Objective = Callable[[Batch, torch.Tensor], tuple]


class _RoleAdamW(torch.optim.AdamW):
    """AdamW that skips param groups flagged inactive, so an adapter not trained this step stays bit-identical."""

    def step(self, closure=None):  # type: ignore[override]
        groups = self.param_groups
        self.param_groups = [g for g in groups if g.get("active", True)]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


class _Scorer(nn.Module):
    """The module DeepSpeed wraps: ids in, per-token log-probs of the scored positions out."""

    def __init__(self, peft_model: nn.Module, slice_head: bool) -> None:
        super().__init__()
        self.peft = peft_model
        self.slice_head = slice_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
        """[B, T-1] log pi(ids[:, t+1] | ids[:, :t+1]) where score_mask[:, t+1] == 1, else 0."""
        labels, sel = input_ids[:, 1:], score_mask[:, 1:].bool()
        attn = None if bool(attention_mask.all()) else attention_mask  # no padding: the fast causal SDPA path
        if self.slice_head:
            base = self.peft.get_base_model()
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attn, use_cache=False).last_hidden_state
            logits = base.get_output_embeddings()(hidden[:, :-1][sel])
        else:
            logits = self.peft(input_ids=input_ids, attention_mask=attn, use_cache=False).logits[:, :-1][sel]
        lp = token_logprobs(logits, labels[sel])
        return torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_ninja() -> None:
    """Put this Python environment's own `ninja` (a DeepSpeed dependency) first on PATH, where torch's JIT looks.
    Ninja versions hash build commands differently, so a system ninja (first on PATH in a process started without
    the venv's bin/) and the venv's one would each rebuild the op the other built, ~1 min each time."""
    bindir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bindir, "ninja")):
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")


# What init_distributed fills in when a launcher has not (MASTER_PORT: a free port, found then).
SINGLE_PROCESS_RENDEZVOUS = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def init_distributed(cache: str | os.PathLike | None = None) -> float:
    """Join (or create) the torch.distributed group DeepSpeed needs; returns seconds spent.

    Single process by default: RANK/WORLD_SIZE/... are filled in only when unset (a multi-GPU launcher sets
    them), which also stops DeepSpeed from probing for mpi4py. DeepSpeed's CPU shm comm op is compiled on first
    use (~40-70 s) into TORCH_EXTENSIONS_DIR, defaulted to <retrorl cache>/torch_extensions, with one ninja
    (`pin_ninja`) so it is built once.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    t0 = time.perf_counter()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(resolve_cache_dir(cache) / "torch_extensions"))
    pin_ninja()
    if not deepspeed.comm.is_initialized():
        for key, value in SINGLE_PROCESS_RENDEZVOUS.items():
            os.environ.setdefault(key, value)
        if os.environ["WORLD_SIZE"] == "1":
            # A one-process group needs a port nobody holds. An inherited MASTER_PORT may be held: a driver whose
            # own learner set it passes it to every Ray worker it starts (they inherit the raylet's environment),
            # and the learner actor's rendezvous then fails with EADDRINUSE.
            os.environ["MASTER_PORT"] = str(_free_port())
        else:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        with _printed_to_log():
            deepspeed.init_distributed(
                dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False
            )
        atexit.register(_destroy_distributed)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _printed_to_log() -> Iterator[None]:
    """What DeepSpeed prints while it starts goes to its logger at INFO: it prints `DeepSpeed ... built
    successfully` at every start, built or loaded from the cache (deepspeed/comm/torch.py:52), and in a Ray actor
    every print reaches the driver's terminal. If the start fails, the printed text goes to stderr with the error."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
    for line in buffer.getvalue().splitlines():
        logging.getLogger("DeepSpeed").info(line)


def _destroy_distributed() -> None:
    """Tear the group down while the interpreter is still whole. Left to finalization, gloo's worker threads can
    release tensors after the GIL is gone: a segfault at exit after a clean run (seen once at the end of CI)."""
    import deepspeed

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


class Learner:
    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        *,
        lora_r: int = LORA.r,
        lora_alpha: int = LORA.alpha,
        lora_dropout: float = LORA.dropout,
        lora_target_modules: Sequence[str] = LORA.target_modules,
        roles: Sequence[str] = ROLES,
        shared_adapter: bool = False,
        zero_stage: int = 0,
        gradient_clipping: float,
        lr: float,
        weight_decay: float = 0.0,
        seed: int = 0,
        threads: int | None = None,
        output_dir: str | os.PathLike | None = None,
        max_len: int | None,
        gradient_checkpointing: bool = False,
        deepspeed_config: dict[str, Any] | None = None,
        cache: str | os.PathLike | None = None,
        log_level: int = logging.WARNING,
        slice_head: bool | None = None,
    ) -> None:
        import deepspeed
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        t0 = time.perf_counter()
        logging.getLogger("DeepSpeed").setLevel(log_level)
        torch.set_num_threads(node_threads(threads))  # Ray sets OMP_NUM_THREADS=<num_cpus> (1 by default) in actors
        self.roles = tuple(roles)
        self.adapter_of = {r: (SHARED_ADAPTER if shared_adapter else r) for r in self.roles}
        self.adapter_names = list(dict.fromkeys(self.adapter_of.values()))
        # Where published adapters are written on this node (default: a temp folder removed at exit). A run's
        # own copies are written by the driver (learners.methods.MethodLearner.publish_files).
        if output_dir is None:
            output_dir = tempfile.mkdtemp(prefix="retrorl-learner-")
            atexit.register(shutil.rmtree, output_dir, True)
        self.output_dir = Path(output_dir)
        self.adapter_root = self.output_dir / "adapters"
        self.model_path = str(resolve_model(model_path, cache))
        self.model_fingerprint = weights_fingerprint(self.model_path)  # written in every checkpoint's learner.json
        self.dtype = resolve_dtype(dtype)
        self.zero_stage = zero_stage
        self.lr = lr
        self.max_len = max_len
        self.gradient_checkpointing = gradient_checkpointing
        self.seed = seed
        self.step = 0  # optimizer steps taken
        self._versions = {r: 0 for r in self.roles}  # 0 = untrained (adapter B = 0, i.e. the base model)
        self._dirty: set[str] = set()  # roles trained since their last publish
        self._rng = random.Random(seed)  # batch order; checkpointed
        self._il: dict[str, Any] | None = None  # an IL phase stopped by its time budget (see train_il); checkpointed
        self._reference: dict[str, dict[str, torch.Tensor]] = {}  # role -> frozen LoRA tensors; checkpointed
        self._plain_grad_norm: float | None = None
        self._progress = TrainProgress()  # read by `progress()` while a training call runs
        self.init_distributed_s = init_distributed(cache)

        torch.manual_seed(seed)  # LoRA A init
        base = load_model(self.model_path, self.dtype)
        base.config.use_cache = False
        self.pad_id = int(base.config.pad_token_id if base.config.pad_token_id is not None else 0)
        if gradient_checkpointing:
            # Non-reentrant: the recompute runs from saved-tensor hooks, so the LoRA params inside each layer get
            # gradients whether or not the layer's input requires grad (reentrant checkpointing would need it).
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.peft = get_peft_model(base, copy.deepcopy(self.lora_config), adapter_name=self.adapter_names[0])
        for name in self.adapter_names[1:]:
            self.peft.add_adapter(name, copy.deepcopy(self.lora_config))
        if gradient_checkpointing:
            # transformers' gradient_checkpointing_enable and PEFT both hook the input embeddings to make their output
            # require grad (for reentrant checkpointing); non-reentrant does not need it, and it costs a backward
            # through the first layer's frozen weights to a gradient nobody reads.
            base.disable_input_require_grads()
        self._params = {a: adapter_parameters(self.peft, a) for a in self.adapter_names}
        for a, params in self._params.items():
            if set(params) != set(get_peft_model_state_dict(self.peft, adapter_name=a)):
                raise RuntimeError(f"adapter {a}: parameter names do not match PEFT's state-dict keys")
            for p in params.values():
                p.requires_grad_(True)  # every adapter trainable before ZeRO registers its grad hooks
        self.peft.set_adapter(self.adapter_names[0])
        self._active = self.adapter_names[0]
        self._all_params_trainable()

        optimizer = _RoleAdamW(
            [{"params": list(self._params[a].values()), "adapter": a, "active": True} for a in self.adapter_names],
            lr=lr,
            weight_decay=weight_decay,
        )
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # batches are sized by tokens here; DS only needs a consistent triple
            "gradient_accumulation_steps": 1,
            "gradient_clipping": gradient_clipping,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,  # _RoleAdamW is a torch AdamW subclass
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.ds_config = _deep_update(config, deepspeed_config or {})
        model_type = getattr(base.config, "model_type", "")
        if slice_head is None:  # LM head on agent tokens only, where logits are plain lm_head(hidden)
            slice_head = model_type in _PLAIN_HEAD_MODELS
        scorer = _Scorer(self.peft, slice_head=slice_head)
        t1 = time.perf_counter()
        self.engine, _, _, _ = deepspeed.initialize(model=scorer, optimizer=optimizer, config=self.ds_config)
        self.deepspeed_initialize_s = time.perf_counter() - t1
        self._opt = optimizer  # the inner torch optimizer (DeepSpeed wraps it; its groups are shared)
        self.device = self.engine.device
        self.init_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ adapters
    def _all_params_trainable(self) -> None:
        for params in self._params.values():
            for p in params.values():
                p.requires_grad_(True)

    def _activate(self, adapter: str) -> None:
        if adapter != self._active:
            self.peft.set_adapter(adapter)
            self._active = adapter
            self._all_params_trainable()  # undo PEFT freezing the other adapters (see module doc)

    def _gathered(self, params: Sequence[nn.Parameter], modify: bool = False):
        if self.zero_stage == 3:  # ZeRO-3 keeps only a partition in each param; gather the full tensors
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None)
        return contextlib.nullcontext()

    def adapter_tensors(self, adapter: str) -> dict[str, torch.Tensor]:
        """CPU fp32 copies of an adapter's LoRA tensors: exactly the weights the learner's forward uses."""
        params = self._params[adapter]
        with self._gathered(list(params.values())):
            return {k: p.detach().to("cpu", torch.float32).clone() for k, p in params.items()}

    def _set_adapter_tensors(self, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        params = self._params[adapter]
        if set(tensors) != set(params):
            raise ValueError(f"adapter {adapter}: tensor names differ from the model's LoRA parameters")
        with self._gathered(list(params.values()), modify=True), torch.no_grad():
            for k, p in params.items():
                p.data.copy_(tensors[k].to(p.device, p.dtype))

    def _load_adapter(self, adapter: str, saved: dict[str, torch.Tensor]) -> None:
        """Set `adapter` from a checkpoint's adapters.safetensors (keys `<adapter>/<PEFT name>`)."""
        prefix = f"{adapter}/"
        self._set_adapter_tensors(adapter, {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})

    def set_reference(self, roles: Sequence[str] | None = None) -> None:
        """Freeze the current adapter of each role as its reference policy (KL penalties, DPO): a copy of the
        LoRA tensors only, swapped in to score (`token_logprobs(..., reference=True)`)."""
        for role in roles or self.roles:
            self._reference[role] = self.adapter_tensors(self.adapter_of[role])

    @contextlib.contextmanager
    def _as_reference(self, role: str) -> Iterator[None]:
        if role not in self._reference:
            raise ValueError(f"no reference policy for role {role!r}; call set_reference first")
        adapter = self.adapter_of[role]
        current = self.adapter_tensors(adapter)
        self._set_adapter_tensors(adapter, self._reference[role])
        try:
            yield
        finally:
            self._set_adapter_tensors(adapter, current)

    def versions(self) -> dict[str, int]:
        return dict(self._versions)

    def describe(self) -> dict[str, Any]:
        """The dtype it trains in (what `dtype: auto` resolved to) and the machine it runs on, for the run's record."""
        return {"dtype": str(self.dtype).removeprefix("torch."), "zero_stage": self.zero_stage, **hardware()}

    def progress(self) -> dict[str, Any]:
        """Where the training call in flight (or the last one) stands: steps, epoch, loss, tokens/s, ETA. A caller
        reads it from another thread while the call runs (the learner actor serves it in its own concurrency group)."""
        return self._progress.snapshot()

    def pid(self) -> int:
        """The learner's process id (operators and fault-injection tests kill it by pid)."""
        return os.getpid()

    def publish(self, roles: Sequence[str] | None = None, force: bool = False) -> list[AdapterUpdate]:
        """Bump the version of each role trained since its last publish, write `<output>/adapters/<role>/v<N>/`
        atomically and return the tensors (CPU fp32, PEFT keys without the adapter name) for the engines.

        `force` also sends the roles not trained since: one already published goes out again under its own
        version (a restored checkpoint's weights are that version, so a restart is not counted as a policy
        update: async mode measures staleness in versions); one never published gets its first."""
        updates: list[AdapterUpdate] = []
        cache: dict[str, dict[str, torch.Tensor]] = {}
        for role in roles or self.roles:
            clean = role not in self._dirty
            if not force and clean:
                continue
            adapter = self.adapter_of[role]
            if adapter not in cache:
                cache[adapter] = self.adapter_tensors(adapter)
            tensors = cache[adapter]
            version = self._versions[role] if clean and self._versions[role] > 0 else self._versions[role] + 1
            save_adapter(self.adapter_root, role, version, tensors, self.lora_config, self.model_path)
            self._versions[role] = version
            self._dirty.discard(role)
            updates.append(AdapterUpdate(role=role, version=version, tensors=tensors))
        return updates

    # ------------------------------------------------------------------ training
    def _check_roles(self, samples: Sequence[TokenSample]) -> None:
        unknown = {s.role for s in samples} - set(self.roles)
        if unknown:
            raise ValueError(f"samples for roles {sorted(unknown)} but this learner has adapters for {self.roles}")

    def _steps(self, batches: dict[str, list[Batch]]) -> Iterator[dict[str, Batch]]:
        """Pair the i-th batch of every role into one optimizer step (with gradient checkpointing too: each part is
        backpropagated, so recomputed, while its own adapter is active)."""
        n = max((len(v) for v in batches.values()), default=0)
        for i in range(n):
            yield {r: bs[i] for r, bs in batches.items() if i < len(bs)}

    def set_lr(self, lr: float | None = None) -> None:
        """The learning rate of the next steps; None: the one the learner was built with."""
        lr = self.lr if lr is None else lr
        for group in self._opt.param_groups:  # DeepSpeed's wrappers share these dicts with the inner optimizer
            group["lr"] = lr

    def optimizer_step(self, parts: Sequence[tuple[Batch, Objective]]) -> list[tuple[float, int, dict[str, float]]]:
        """One update over (batch, objective) parts of any roles: per part, a forward with the batch's role adapter
        and its backward right away (the gradients accumulate: those of the summed losses, with one part's graph
        alive at a time), then one step. A role may appear in several parts (RetroAct's RL + IL batch).

        `objective(batch, logprobs)` gets logprobs [B, T-1] aligned with batch.input_ids[:, 1:] and returns
        (loss, token count) or (loss, token count, {stat: float}). Returns (loss value, tokens, stats) per part.
        """
        if not parts:
            raise ValueError("optimizer_step needs at least one batch")
        adapters = {self.adapter_of[b.role] for b, _ in parts}
        for group in self._opt.param_groups:
            group["active"] = group["adapter"] in adapters
        self.engine.train()
        # Several backwards, one step: DeepSpeed's documented gradient-accumulation override
        # (deepspeed/runtime/engine.py:3467 set_gradient_accumulation_boundary; engine.step applies the update only
        # where is_gradient_accumulation_boundary(), engine.py:3611, which returns the override, engine.py:3465).
        # Off the boundary, ZeRO 0/1 skip the gradient all-reduce (engine.py:3089) and accumulate locally; ZeRO-2
        # reduces each backward and sums the partitions (zero/stage_1_and_2.py:1045). The last part's backward is
        # the boundary; engine.step then clears the accumulators.
        # ZeRO-3 copies a param's first gradient of a step into its grad partition and adds the later ones
        # (zero/stage3.py:2024, micro_step_id: 0 after each step, +1 at each forward after a backward,
        # stage3.py:2394), and never clears that buffer: a role whose first part is not the step's first backward
        # would add to the gradient of its last trained step. Clearing it also keeps an untrained role's stale
        # gradient out of the clipping norm.
        flat = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
        if flat is not None:
            flat.zero_()
        managed = self.engine.managed_gradient_accumulation()
        out: list[tuple[float, int, dict[str, float]]] = []
        last = len(parts) - 1
        for i, (batch, objective) in enumerate(parts):
            self._activate(self.adapter_of[batch.role])
            b = batch.to(self.device)
            logprobs = self.engine(b.input_ids, b.attention_mask, b.loss_mask)
            loss, n, *extra = objective(b, logprobs)
            out.append((float(loss.detach()), n, extra[0] if extra else {}))
            if managed:
                self.engine.set_gradient_accumulation_boundary(i == last)
            self.engine.backward(loss)
            del logprobs, loss, b
        if self.engine.optimizer is self._opt:  # no DeepSpeed wrapper: grads are in p.grad, DS reports no norm
            self._plain_grad_norm = _grad_norm(self._opt)
        self.engine.step()
        self.step += 1
        self._dirty |= {r for r in self.roles if self.adapter_of[r] in adapters}
        return out

    def fit(
        self,
        steps: Iterable[Sequence[tuple[Batch, Objective]]],
        tag: Callable[[Batch, Objective], str] | None = None,
        totals: "FitTotals | None" = None,
        deadline: float | None = None,
    ) -> dict[str, float]:
        """Run optimizer steps and aggregate: token-weighted loss and stats per tag (default: the batch role),
        step and token counts, throughput (all non-pad tokens through forward + backward per second).

        `totals`: add to these running sums (an epoch continued across calls); `deadline` (time.monotonic()):
        stop after the first step that ends past it (`totals.steps` says how many ran)."""
        tag = tag or (lambda b, _: b.role)
        totals = totals if totals is not None else FitTotals()
        t0 = time.perf_counter()
        try:
            for parts in steps:
                self._progress.begin_step()
                done = self.optimizer_step(parts)
                self._progress.end_step([(loss, n) for loss, n, _ in done], sum(b.n_tokens for b, _ in parts))
                totals.add([(tag(b, o), b) for b, o in parts], done)
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            totals.time_s += time.perf_counter() - t0
        metrics = totals.metrics()
        norm = self.grad_norm() if totals.steps else None
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        trim_heap()  # the engines serve next on this machine: give the activations back
        return metrics

    def fit_epochs(
        self,
        epochs: Sequence[Sequence[Sequence[tuple[Batch, Objective]]]],
        tag: Callable[[Batch, Objective], str] | None = None,
    ) -> list[dict[str, float]]:
        """`fit` each epoch's steps, planned in full first so `progress()` knows the total; one metrics dict per
        epoch. Planning ahead draws batches from `self._rng` in the same order as planning each epoch in turn."""
        self._progress.plan([len(e) for e in epochs])
        return [self.fit(e, tag) for e in epochs]

    def prepare(self, samples: Sequence[TokenSample]) -> tuple[list[TokenSample], dict[str, int]]:
        """Samples a step can train on: known roles, under the length cap, with at least one trained token."""
        self._check_roles(samples)
        kept, dropped_long = cap_length(samples, self.max_len)
        nonempty = [s for s in kept if s.n_trained > 0]
        return nonempty, {"dropped_long": dropped_long, "dropped_empty": len(kept) - len(nonempty),
                          "samples": len(nonempty)}

    @tracked("il")
    def train_il(
        self,
        samples: Sequence[TokenSample],
        *,
        epochs: int,
        lr: float | None = None,
        max_tokens_per_batch: int,
        max_batch_size: int | None = None,
        role_epochs: dict[str, int] | None = None,
        budget_s: float | None = None,
    ) -> dict[str, float]:
        """IL/SFT (mean NLL over agent tokens) on samples of any roles; each step trains every role with a batch.
        `role_epochs` gives a role its own number of epochs (e.g. more for the reflector's few samples); the
        other roles get `epochs`.

        `budget_s`: return after the first step that ends this many seconds after the call began, with
        {"finished": False, "step": k, "total": n}; the position and the running sums are learner state, saved by
        `save_checkpoint`, and the next call with the same samples and settings continues there (a long IL phase
        checkpointed as it goes). A continued phase plans its batches again from the RNG state its first call
        began with, so it runs the same steps, and its result equals one uninterrupted call's.

        Returns loss per role (`loss/<role>`: the role's last epoch, `loss_first/<role>`: its first, token-weighted),
        tokens trained, tokens/s (all non-pad tokens through forward+backward), steps and drop counts.
        """
        deadline = None if budget_s is None else time.monotonic() + budget_s
        kept, counts = self.prepare(samples)
        self.set_lr(lr)
        objective: Objective = lambda b, lp: il_loss(lp, b.loss_mask[:, 1:])  # noqa: E731
        per_role = {s.role: (role_epochs or {}).get(s.role, epochs) for s in kept}
        if self._il is None:  # a new phase plans from the learner's RNG, as every update does
            self._il = {"rng": _jsonable(self._rng.getstate()), "step": 0, "epochs": []}
            rng = self._rng
        else:  # a continued one plans again from the state its first call began with: the same batches
            rng = random.Random()
            rng.setstate(_rng_state(self._il["rng"]))
        plan = []
        for epoch in range(max(per_role.values(), default=epochs)):
            current = [s for s in kept if per_role[s.role] > epoch]
            batches = make_batches(current, max_tokens_per_batch, self.pad_id, rng, max_batch_size)
            plan.append([[(b, objective) for b in step.values()] for step in self._steps(batches)])
        sizes = [len(e) for e in plan]
        fingerprint = [sizes, sum(len(s) for s in kept)]
        if self._il.setdefault("plan", fingerprint) != fingerprint:
            raise ValueError(f"this learner holds an unfinished IL phase of {self._il['plan'][0]} steps per epoch; "
                             f"continue it with the same samples and settings, or load another checkpoint")
        start = self._il["step"]
        self._progress.plan(sizes, start=start)
        per_epoch = []
        for e, epoch_steps in enumerate(plan):
            first = sum(sizes[:e])  # steps before this epoch; the loop stops at the first unfinished one
            if e == len(self._il["epochs"]):
                self._il["epochs"].append(FitTotals().to_dict())
            totals = FitTotals.from_dict(self._il["epochs"][e])
            todo = epoch_steps[self._il["step"] - first:]
            if not todo:  # finished before this call
                per_epoch.append(totals.metrics())
                continue
            if self._il["step"] > start and deadline is not None and time.monotonic() >= deadline:
                break  # out of time at an epoch's end
            per_epoch.append(self.fit(todo, totals=totals, deadline=deadline))
            self._il["step"] = first + totals.steps
            self._il["epochs"][e] = totals.to_dict()
            if totals.steps < len(epoch_steps):
                break
        if self._il["step"] < sum(sizes):
            return {"finished": False, "step": self._il["step"], "total": sum(sizes)}
        self._il = None
        return {**merge_epochs(per_epoch), **counts}

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last step, before clipping."""
        if self.engine.optimizer is self._opt:
            return self._plain_grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def token_logprobs(
        self,
        samples: Sequence[TokenSample],
        max_tokens_per_batch: int = 8192,
        base: bool = False,
        reference: bool = False,
    ) -> list[torch.Tensor]:
        """Per sample, a CPU fp32 tensor aligned with `sample.ids` (like `sample.logprobs`): log pi(ids[t] | ids[:t])
        under the sample's role adapter (eval mode, no dropout) where mask[t] == 1, else 0. `base=True` scores
        with all adapters disabled (the untrained policy); `reference=True` with the role's `set_reference` copy."""
        self._check_roles(samples)
        self._progress.plan_scoring(len(samples))
        out: list[torch.Tensor | None] = [None] * len(samples)
        was_training = self.engine.training
        self.engine.eval()
        try:
            for role, batches in make_batches(samples, max_tokens_per_batch, self.pad_id).items():
                self._activate(self.adapter_of[role])
                if base:
                    ctx = self.peft.disable_adapter()
                elif reference:
                    ctx = self._as_reference(role)
                else:
                    ctx = contextlib.nullcontext()
                with ctx:
                    for batch in batches:
                        b = batch.to(self.device)
                        lp = self.engine(b.input_ids, b.attention_mask, b.loss_mask).float().cpu()
                        for row, i in enumerate(batch.index):
                            n = len(samples[i])
                            out[i] = torch.cat([torch.zeros(1), lp[row, : n - 1]])
                        self._progress.scored_batch(len(batch.index))
        finally:
            self.engine.train(was_training)
        return [t if t is not None else torch.zeros(len(s)) for t, s in zip(out, samples)]

    def with_logprobs(self, samples: Sequence[TokenSample], field: str = "ref_logprobs", **kw: Any
                      ) -> list[TokenSample]:
        """Copies of the samples with `field` filled by `token_logprobs(samples, **kw)` (e.g. the reference's)."""
        scored = self.token_logprobs(samples, **kw)
        return [dataclasses.replace(s, **{field: t.tolist()}) for s, t in zip(samples, scored)]

    def sequence_logprobs(self, samples: Sequence[TokenSample], base: bool = False, **kw: Any) -> list[float]:
        """Sum of agent-token log-probs per sample (DPO's log pi(trajectory))."""
        return [float(t.sum()) for t in self.token_logprobs(samples, base=base, **kw)]

    # ------------------------------------------------------------------ checkpoints
    def _master_tensors(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer updates: fp32 master copies (or the params themselves in plain fp32)."""
        flat = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 keeps them aside
        if flat:
            return list(flat)
        return [p for g in self._opt.param_groups for p in g["params"]]

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Adapters (safetensors), optimizer masters + Adam state and RNG (torch.save, weights_only-loadable),
        step/versions (json), written to a temp folder and renamed into place."""
        from safetensors.torch import save_file

        final = Path(path)
        with staged_dir(final) as tmp:
            tensors = {f"{a}/{k}": v for a in self.adapter_names for k, v in self.adapter_tensors(a).items()}
            tensors.update({f"{REFERENCE_PREFIX}{r}/{k}": v
                            for r, ref in self._reference.items() for k, v in ref.items()})
            save_file(tensors, str(tmp / "adapters.safetensors"))
            masters = self._master_tensors()
            torch.save(
                {
                    "masters": [m.detach().to("cpu", torch.float32).clone() for m in masters],
                    "state": [{k: _cpu(v) for k, v in self._opt.state.get(m, {}).items()} for m in masters],
                    "groups": [
                        {k: v for k, v in g.items() if k not in ("params", "active")} for g in self._opt.param_groups
                    ],
                },
                tmp / "optimizer.pt",
            )
            torch.save(self._rng_state(), tmp / "rng.pt")
            meta = {
                "step": self.step,
                "versions": self._versions,
                "dirty": sorted(self._dirty),
                "py_rng": _jsonable(self._rng.getstate()),
                "adapters": self.adapter_names,
                "roles": list(self.roles),
                "zero_stage": self.zero_stage,
                "dtype": str(self.dtype),
                "model_path": self.model_path,
                "model_fingerprint": self.model_fingerprint,
                "lora": {k: _jsonable(v) for k, v in self.lora_config.to_dict().items()},
                "extra": self._extra_state(),
                "il": self._il,
            }
            (tmp / "learner.json").write_text(json.dumps(meta, indent=1))
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore adapters, optimizer state, step, versions and RNG written by `save_checkpoint`.

        The optimizer layout must match (same roles, LoRA shapes, ZeRO stage, dtype and world size)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "learner.json").read_text())
        if meta["adapters"] != self.adapter_names:
            raise ValueError(f"checkpoint adapters {meta['adapters']} != this learner's {self.adapter_names}")
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        masters = self._master_tensors()
        saved = opt["masters"]
        if [tuple(m.shape) for m in masters] != [tuple(s.shape) for s in saved]:
            raise ValueError(
                f"optimizer layout in {path} differs from this learner's (ZeRO stage {meta['zero_stage']} vs "
                f"{self.zero_stage}, dtype {meta['dtype']} vs {self.dtype}); restore with the same settings"
            )
        tensors = load_file(str(path / "adapters.safetensors"))
        with torch.no_grad():
            for m, s, state in zip(masters, saved, opt["state"]):
                m.copy_(s.to(m.device, m.dtype))
                # Adam moments follow their param's device; the 'step' counter stays where torch keeps it (CPU).
                self._opt.state[m] = {
                    k: (v.to(m.device) if torch.is_tensor(v) and k != "step" else v) for k, v in state.items()
                }
                if not state:
                    self._opt.state.pop(m, None)
        for group, hp in zip(self._opt.param_groups, opt["groups"]):
            group.update(hp)
        for a in self.adapter_names:  # low-precision params = the saved values (bf16(master) as after a step)
            self._load_adapter(a, tensors)
        self._reference = {}
        for key, value in tensors.items():
            if key.startswith(REFERENCE_PREFIX):
                role, name = key[len(REFERENCE_PREFIX):].split("/", 1)
                self._reference.setdefault(role, {})[name] = value
        self._set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        self.step = int(meta["step"])
        self._versions = {r: int(meta["versions"].get(r, 0)) for r in self.roles}
        self._dirty = set(meta["dirty"]) & set(self.roles)
        self._rng.setstate(_rng_state(meta["py_rng"]))
        self._load_extra_state(meta.get("extra", {}))
        self._il = meta.get("il")

    def reseed(self) -> None:
        """Batch order and dropout from this learner's own seed again, after another run's checkpoint became the
        starting policy (init.checkpoint restores that run's RNG with its adapters): runs from one start at
        several seeds then differ in their training, not only in their rollouts. A --resume keeps the RNG."""
        self._rng = random.Random(self.seed)
        torch.manual_seed(self.seed)  # every device's generator

    def _extra_state(self) -> dict[str, Any]:
        """JSON state of a subclass (e.g. a KL controller), saved in the checkpoint."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _rng_state(self) -> dict[str, Any]:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if acc.device_name() != "cpu":
            state["accelerator"] = acc.get_rng_state()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        from deepspeed.accelerator import get_accelerator

        torch.set_rng_state(state["torch"])
        acc = get_accelerator()
        if "accelerator" in state and acc.device_name() != "cpu":
            acc.set_rng_state(state["accelerator"])


class FitTotals:
    """`fit`'s running sums: kept across calls (an IL epoch continued after a checkpoint) and JSON in a checkpoint.
    `loss` and `stats` map a tag to [sum, count] (loss: token-weighted)."""

    def __init__(self, steps: int = 0, tokens: int = 0, seq_tokens: int = 0, padded: int = 0, time_s: float = 0.0,
                 loss: dict[str, list[float]] | None = None, stats: dict[str, list[float]] | None = None) -> None:
        self.steps, self.tokens, self.seq_tokens, self.padded, self.time_s = steps, tokens, seq_tokens, padded, time_s
        self.loss = loss or {}
        self.stats = stats or {}

    def add(self, tagged: Sequence[tuple[str, Batch]], done: Sequence[tuple[float, int, dict[str, float]]]) -> None:
        """One optimizer step: each part's (tag, batch) and its (loss, scored tokens, stats)."""
        for (key, batch), (loss, n, extra) in zip(tagged, done):
            acc = self.loss.setdefault(key, [0.0, 0])
            acc[0] += loss * n
            acc[1] += n
            for name, value in extra.items():
                st = self.stats.setdefault(f"{name}/{key}", [0.0, 0])
                st[0] += value
                st[1] += 1
            self.tokens += batch.n_trained
            self.seq_tokens += batch.n_tokens
            self.padded += batch.n_padded
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        t = self.time_s
        out: dict[str, float] = {
            "steps": self.steps,
            "tokens": self.tokens,
            "seq_tokens": self.seq_tokens,
            "tokens_per_s": self.seq_tokens / t if t > 0 else 0.0,
            "trained_tokens_per_s": self.tokens / t if t > 0 else 0.0,
            "padding_frac": 1.0 - self.seq_tokens / self.padded if self.padded else 0.0,
            "time_s": t,
        }
        out.update({f"loss/{k}": s / max(n, 1) for k, (s, n) in self.loss.items()})
        out.update({k: s / max(n, 1) for k, (s, n) in self.stats.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitTotals":
        return cls(**d)


def merge_epochs(per_epoch: list[dict[str, float]]) -> dict[str, float]:
    """Counts and time summed over epochs, rates over the total, losses of the last epoch that has them
    (`loss_first/...`: the first epoch's, to show the descent)."""
    if not per_epoch:
        return {"steps": 0, "tokens": 0, "time_s": 0.0}
    out: dict[str, float] = {}
    for m in per_epoch:  # each key from the last epoch that has it (a role may train for fewer epochs)
        out.update(m)
    for key in ("steps", "tokens", "seq_tokens", "time_s"):
        out[key] = sum(m.get(key, 0) for m in per_epoch)
    t = out["time_s"]
    out["tokens_per_s"] = out["seq_tokens"] / t if t > 0 else 0.0
    out["trained_tokens_per_s"] = out["tokens"] / t if t > 0 else 0.0
    for m in reversed(per_epoch):  # each role's first epoch
        out.update({f"loss_first/{k[5:]}": v for k, v in m.items() if k.startswith("loss/")})
    return out


def _rng_state(saved: list) -> tuple:
    """A `random.Random` state from its JSON form (`_jsonable(rng.getstate())`: lists where it had tuples)."""
    v, state, gauss = saved
    return v, tuple(state), gauss


def _cpu(v: Any) -> Any:
    return v.detach().cpu().clone() if torch.is_tensor(v) else v


def _grad_norm(opt: torch.optim.Optimizer) -> float:
    grads = [p.grad for g in opt.param_groups if g["active"] for p in g["params"] if p.grad is not None]
    norms = [x.detach().float().norm() for x in grads]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, tuple, list)):
        return [_jsonable(x) for x in (sorted(v) if isinstance(v, set) else v)]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
