"""HF transformers engine: one base model, one LoRA adapter per role, batched KV-cache decoding.

Concurrent `generate` calls are queued and served in batches by a single background task; the compute runs in a
worker thread so the event loop keeps accepting requests (and, inside a Ray async actor, keeps answering calls).
Each batch prefills its prompts packed (each adapter's rows' uncached tokens end to end in one sequence, so no
padding is computed; the attention runs row by row) and then decodes all rows in one loop over a preallocated KV
cache, so rows can use different roles (PEFT mixed-adapter batches), temperatures, top_p, seeds and lengths, and
leave the batch as soon as they finish; each is answered then, and its caller's next request can join the running
batch if it ends within the batch's longest row's steps (see _join). Adapter updates are staged and swapped in
between batches, never during one.

Prefix reuse: a finished row's K/V (prompt + completion, bar the last sampled token, whose K/V was never computed)
goes into an LRU keyed by role and adapter version. A later request of that role sharing a prefix with an entry
(a multi-turn prompt that appends to an earlier prompt + completion, or a common system prompt) prefills only the
rest; a prefix several rows of one batch share is computed once first. Matching is purely on ids, so callers change
nothing; an adapter update drops its role's entries.

Wrap it as `ray.remote(HFEngine)`; pass `threads` there, since Ray sets OMP_NUM_THREADS=1 in actors.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.masking_utils import sdpa_mask

from agents.adapters import AdapterUpdate, read_adapter_dir
from agents.model import load_model, resolve_dtype, trim_heap
from rollout.engine import EngineShell, GenerateResult, SamplingParams, check_request

_BASE = "__base__"  # PEFT's adapter name for "no adapter" in mixed batches; a role still at zero-LoRA uses it
_ATTN = "retrorl_sdpa_gqa"
_MIN_HIT = 16  # shorter shared prefixes (a bos, a chat header) save less than the K/V copies cost
_REDUCED = (torch.bfloat16, torch.float16)


def _sdpa_gqa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA with native GQA. transformers' "sdpa" copies K/V once per query head whenever a mask is passed (always,
    with padding or a static cache); on CPU those copies cost more than the attention itself."""
    pack = kwargs.get(_PACK)
    if pack is not None:  # whatever its length: a one-token pack still attends over its rows' reused K/V
        return pack.attend(module.layer_idx, query, key, value, scaling), None
    step = kwargs.get(_STEP)
    if step is not None:  # a decode step: each chunk of rows reads only the slots its rows use
        out = query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))
        for r0, r1, s0 in step.chunks:
            mask = attention_mask
            if mask is not None:
                mask = (mask[r0:r1] if mask.shape[0] > 1 else mask)[..., s0 : step.length]
            out[r0:r1] = _attention(query[r0:r1], key[r0:r1, :, s0 : step.length],
                                    value[r0:r1, :, s0 : step.length], mask, dropout, scaling, causal=False)
        return out, None
    causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    return _attention(query, key, value, attention_mask, dropout, scaling, causal), None


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dropout: float,
    scaling: float | None, causal: bool,
) -> torch.Tensor:
    """SDPA over [b, heads, q_len, dim] queries and [b, kv_heads, kv_len, dim] K/V; returns [b, q_len, heads, dim]."""
    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len == 1 and kv_heads != heads and query.dtype in _REDUCED and query.device.type == "cpu":
        # A decode step in bf16/fp16 on CPU (measured there only): a K/V head's query heads become that head's
        # query rows, so SDPA runs without enable_gqa: the same kernel and arithmetic, but its enable_gqa path is
        # slow for reduced types on CPU.
        # On a 2-core AVX512-BF16 EPYC (torch 2.13), bf16, one layer call: 16 rows x 1240 positions 10.1 ms against
        # 1.5 ms this way, one row 0.69 vs 0.13 ms; that alone made bf16 decode slower than fp32 there. fp32 keeps
        # enable_gqa (1.70 vs 1.76 ms, one row 0.09 vs 0.12 ms), and so does prefill, where folding gave no
        # consistent gain (bf16, 700 positions: 9.1 vs 9.4 ms; 8 rows x 130 new positions: 17.0 vs 15.6 ms).
        out = F.scaled_dot_product_attention(
            query.reshape(b, kv_heads, heads // kv_heads, dim), key, value, attn_mask=mask, dropout_p=dropout,
            scale=scaling,
        )
        return out.reshape(b, 1, heads, dim)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=kv_heads != heads,
    )
    return out.transpose(1, 2).contiguous()


_PACK = "retrorl_pack"  # keyword the engine passes through the model call to _sdpa_gqa


@dataclass
class _Pack:
    """A packed prefill: some of a batch's rows (one adapter's), their uncached tokens laid end to end as one
    sequence, so the pass computes no padding. The model gets `_PACK=pack` as a keyword argument, which transformers
    hands to the attention function (modeling_llama.py:399 and :265, 5.19), and with no cache of its own: `cache`
    holds [pad | reused | new | tail] per row, every prompt ending at slot `end`, with the reused K/V already in
    place; each layer's attention writes the rows' new K/V after it and attends each row over its own slots."""

    cache: StaticCache
    end: int
    rows: list[tuple[int, int, int, int]]  # (batch row, offset in the packed sequence, reused tokens, new tokens)
    batch: int  # rows in the cache (all packs' rows)
    _masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        _, heads, total, dim = query.shape
        layer = self.cache.layers[layer_idx]
        if not layer.is_initialized:  # nothing reused, first pack: now the K/V shape is known
            self.cache.early_initialization(self.batch, key.shape[1], dim, key.dtype, key.device)
        gqa = key.shape[1] != heads
        out = query.new_empty((1, total, heads, dim))
        for row, offset, reused, new in self.rows:
            start, mid = self.end - reused - new, self.end - new
            layer.keys[row, :, mid : self.end] = key[0, :, offset : offset + new]
            layer.values[row, :, mid : self.end] = value[0, :, offset : offset + new]
            q = query[:, :, offset : offset + new]
            k, v = layer.keys[row : row + 1, :, start : self.end], layer.values[row : row + 1, :, start : self.end]
            if reused:  # new token j sees the reused K/V and new tokens 0..j
                if (reused, new) not in self._masks:
                    self._masks[reused, new] = torch.ones(new, reused + new, dtype=torch.bool).tril(reused)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._masks[reused, new], scale=scaling,
                                                   enable_gqa=gqa)
            else:  # plain causal: the kernel skips the blocks above the diagonal
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
            out[0, offset : offset + new] = o[0].transpose(0, 1)
        return out


_GROWTH = 2  # a joinable batch's cache has this many times its longest token cap free before its longest prompt
_STEP = "retrorl_step"  # keyword the engine passes through a decode step's model call to _sdpa_gqa
_CHUNK_COST = 384  # an extra attention call's cost in row-slots read (see _chunks)


@dataclass
class _Step:
    """A decode step's K/V reads. Its attention cost on CPU is mostly reading K/V, and one batched call reads every
    row's slots from the first slot any row uses (past the pads left of shorter prompts) to the end of the cache
    (the unwritten tail). So the rows, consecutive in `chunks` (first row, end row, first slot any of them uses),
    each read their chunk's slots up to `length`, the slots written so far."""

    chunks: list[tuple[int, int, int]]
    length: int


def _chunks(starts: Sequence[int]) -> list[tuple[int, int, int]]:
    """Cut rows (their first used slots, `starts`) into runs of consecutive rows that minimise the slots read plus
    _CHUNK_COST per run. The calls' fixed cost, ~31 us, is about 370 row-slots' reads (16 rows x 827 slots: 1.1 ms,
    bf16, SmolLM2-135M's 3 K/V heads, 2-core EPYC). Rows sorted by length leave little padding within a run."""
    n = len(starts)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows [0, j), less the slots from `start` on all rows read
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        lo = starts[j - 1]
        for i in range(j - 1, -1, -1):
            lo = min(lo, starts[i])
            cost = best[i] + _CHUNK_COST - (j - i) * lo  # rows i..j-1 read from lo on
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j:
        out.append((cut[j], j, min(starts[cut[j] : j])))
        j = cut[j]
    return out[::-1]


# transformers' documented extension point for attention functions; it takes the same masks as "sdpa".
AttentionInterface.register(_ATTN, _sdpa_gqa)
AttentionMaskInterface.register(_ATTN, sdpa_mask)


# The cache helpers below write a StaticCache's layers directly (transformers 5.19, cache_utils.py StaticLayer: `keys`
# / `values` [batch, kv_heads, max_cache_len, head_dim] allocated by lazy_initialization, :429-465; update() writes
# new K/V from `cumulative_length` on and advances it, :486-493, and get_seq_length returns it, :509). The engine
# tests compare the results with plain prefills and rows served alone, so a change there fails them.


def _fill_cache(cache: StaticCache, past: Sequence[torch.Tensor | None], where: Sequence[slice], length: int) -> None:
    """A new cache with past[i] ([layers, 2, kv_heads, c_i, dim], or None) in row i's slots `where[i]`; the next
    update() writes from `length` on. One copy per row; update() would need the batch's K/V built first."""
    first = next(p for p in past if p is not None)
    _, _, heads, _, dim = first.shape
    cache.early_initialization(len(past), heads, dim, first.dtype, first.device)
    _put_rows(cache, [(i, p, at) for i, (p, at) in enumerate(zip(past, where)) if p is not None])
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def _put_rows(cache: StaticCache, rows: Sequence[tuple[int, torch.Tensor, slice]]) -> None:
    """Write each (row, past, slots): past's K/V ([layers, 2, kv_heads, len(slots), dim]) into that row's slots."""
    for n, layer in enumerate(cache.layers):
        for i, p, at in rows:
            layer.keys[i, :, at] = p[n, 0]
            layer.values[i, :, at] = p[n, 1]


def _grown(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A [rows, ...] copy of t ([b, ...], b < rows) whose extra rows are zeros."""
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _gather_row(cache: StaticCache, row: int, slots: torch.Tensor) -> torch.Tensor:
    """Row `row`'s K/V at `slots`, as a prefix-cache entry holds it: [layers, 2, kv_heads, len(slots), dim]."""
    k = cache.layers[0].keys
    out = torch.empty((len(cache.layers), 2, k.shape[1], len(slots), k.shape[3]), dtype=k.dtype, device=k.device)
    for n, layer in enumerate(cache.layers):
        torch.index_select(layer.keys[row], 1, slots, out=out[n, 0])
        torch.index_select(layer.values[row], 1, slots, out=out[n, 1])
    return out


def _drop_rows(cache: StaticCache, keep: list[int]) -> list[int]:
    """Narrow every layer to the rows `keep` (batch positions, ascending). Each freed position below len(keep) takes
    a kept row from above it, then the layers become views of their first len(keep) rows: one row's K/V copied per
    row that leaves. reorder_cache would copy every kept row each time (a 16-row batch's rows leave at up to 16
    different steps). Returns the old position of the row now at each position."""
    live, kept = len(keep), set(keep)
    holes = [j for j in range(live) if j not in kept]
    movers = [j for j in keep if j >= live]
    order = list(range(live))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    for layer in cache.layers:
        for hole, mover in zip(holes, movers):
            layer.keys[hole] = layer.keys[mover]
            layer.values[hole] = layer.values[mover]
        layer.keys, layer.values = layer.keys[:live], layer.values[:live]
    return order


@dataclass
class _Entry:
    key: tuple[str, int]  # (role, adapter version) the K/V was computed with
    ids: torch.Tensor  # [L] token ids whose K/V this holds
    kv: torch.Tensor  # [layers, 2 (K, V), kv_heads, L, head_dim]: post-RoPE, as the cache holds them; no padding


class _PrefixCache:
    """An LRU of finished sequences' K/V, bounded by a total token budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.tokens = 0
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._ids = itertools.count()

    def lookup(self, key: tuple[str, int], prompt: torch.Tensor) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with `prompt` (at most len - 1 tokens: the last one must be fed to
        get the first completion logits) and that length; (None, 0) below _MIN_HIT."""
        best, best_n, best_k = None, 0, -1
        for k, e in self.entries.items():  # a few dozen entries: a linear scan of vectorised compares is cheap
            m = min(len(e.ids), len(prompt) - 1)
            if e.key != key or m <= best_n:
                continue
            diff = (e.ids[:m] != prompt[:m]).nonzero()
            n = int(diff[0]) if len(diff) else m
            if n > best_n:
                best, best_n, best_k = e, n, k
        if best is None or best_n < _MIN_HIT:
            return None, 0
        self.entries.move_to_end(best_k)
        return best, best_n

    def put(self, entry: _Entry) -> None:
        n = len(entry.ids)
        if n > self.budget:
            return
        for k, e in list(self.entries.items()):  # entries this one extends are redundant: it serves their hits too
            if e.key == entry.key and len(e.ids) <= n and torch.equal(e.ids, entry.ids[: len(e.ids)]):
                self._remove(k)
        self.entries[next(self._ids)] = entry
        self.tokens += n
        while self.tokens > self.budget:
            self._remove(next(iter(self.entries)))

    def clear(self) -> int:
        """Drop every entry; returns the tokens freed."""
        freed, self.tokens = self.tokens, 0
        self.entries.clear()
        return freed

    def drop_role(self, role: str) -> None:
        for k in [k for k, e in self.entries.items() if e.key[0] == role]:
            self._remove(k)

    def _remove(self, k: int) -> None:
        self.tokens -= len(self.entries.pop(k).ids)


@dataclass
class _Request:
    prompt_ids: list[int]
    role: str
    sampling: SamplingParams
    future: asyncio.Future | None
    seed: int
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Row:
    """A request in a decode loop: what it reads and what it has produced."""

    req: _Request
    name: str  # PEFT adapter name: the role's, or _BASE while the role's adapter is all-zero
    key: tuple[str, int]  # (role, adapter version): its prefix-cache key
    past: torch.Tensor | None  # reused K/V of its prompt's first tokens
    batch_size: int  # rows in the batch when it entered
    limit: int = 0  # token cap (set by _start, as are stops, gen and entered)
    stops: frozenset[int] | set[int] = frozenset()
    gen: torch.Generator | None = None
    entered: float = 0.0
    slots: torch.Tensor | None = None  # its prompt's slots in the cache
    at: int = 0  # the slot of its first generated token
    ids: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    reason: str = "length"
    kv: torch.Tensor | None = None  # with keep_kv: prompt + ids[:-1], for the prefix cache

    @property
    def reused(self) -> int:
        """Prompt tokens whose K/V comes from the prefix cache."""
        return 0 if self.past is None else self.past.shape[3]


def _waiting(r: _Request) -> bool:
    return r.future is not None and not r.future.done()


def _resolve(future: asyncio.Future | None, result: GenerateResult) -> None:
    if future is not None and not future.done():  # a caller that gave up
        future.set_result(result)


async def _drain(queue: asyncio.Queue) -> list[_Request]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


class HFEngine(EngineShell):
    """Serves `roles` (LoRA adapters on one base model) to many concurrent callers; see the module docstring."""

    def __init__(self, model_path: str, *, batch_wait_s: float = 0.03, prefix_cache_tokens: int = 65536,
                 **options: Any) -> None:
        """`options`: EngineShell's. `prefix_cache_tokens`: budget of the prefix K/V cache (0 disables it); it
        holds layers * 2 * kv_heads * head_dim values per token in the model dtype (23 KB in bf16 for
        SmolLM2-135M)."""
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        super().__init__(model_path, **options)
        torch.set_num_threads(self.threads)
        self.batch_wait_s = batch_wait_s
        self.dtype = resolve_dtype(self.requested_dtype)
        opts = self.lora
        config = LoraConfig(
            r=opts["r"],
            lora_alpha=opts["alpha"],
            lora_dropout=opts["dropout"],
            target_modules=list(opts["target_modules"]),
            task_type="CAUSAL_LM",
        )
        base = load_model(self.model_path, self.dtype, trust_remote_code=self.trust_remote_code)
        if base.config._attn_implementation == "sdpa":
            base.set_attn_implementation(_ATTN)
        # autocast_adapter_dtype=False keeps LoRA weights in the base dtype (PEFT would upcast bf16 ones to fp32).
        self.model = get_peft_model(base, config, adapter_name=self.roles[0], autocast_adapter_dtype=False)
        for role in self.roles[1:]:
            self.model.add_adapter(role, config)  # default init: lora_B = 0, so each role starts as the base model
        self.model.eval()
        self.config = base.config
        self._expected = {  # what an update must contain, per role: key -> shape
            role: {k: v.shape for k, v in get_peft_model_state_dict(self.model, adapter_name=role).items()}
            for role in self.roles
        }
        eos = base.generation_config.eos_token_id
        eos = self.config.eos_token_id if eos is None else eos
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = self.config.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 1 << 30))

        self._rng = random.Random(self.seed)  # draws per-request seeds for requests that bring none
        self._applied = {r: 0 for r in self.roles}  # what the weights hold now
        self._is_base = {r: True for r in self.roles}  # adapter still all-zero: skip its LoRA matmuls
        self._pending: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self._pending_lock = threading.Lock()
        self._weights_lock = threading.Lock()  # held by a running batch; updates never land mid-batch
        # One long-lived compute thread: a fresh pool thread per batch gets its own malloc arena, and freed K/V
        # buffers then stay in those arenas (seen as GBs of RSS growth).
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._n = {
            "requests": 0, "batches": 0, "tokens": 0, "prompt_tokens": 0, "hit_tokens": 0, "prefilled": 0,
            "shared": 0,
        }
        self._prefix = _PrefixCache(prefix_cache_tokens)
        self._held: list[_Request] = []  # taken from the queue, did not fit the running batch: the next one's first
        # Reuse and the packed prefill write K/V into full-length static layers by slot; a sliding-window layer keeps
        # other slots, so such models get neither. The packed prefill also needs this module's attention function.
        static = all(type(layer) is StaticLayer for layer in StaticCache(config=self.config, max_cache_len=2).layers)
        self._packed = static and self.config._attn_implementation == _ATTN
        if not static:
            self._prefix.budget = 0
        self._busy_s = 0.0
        self._phase_s = {"prefill": 0.0, "decode": 0.0}  # forward-pass seconds within busy_s
        self._prefill_positions = 0  # positions prefill passes computed, padding included
        self._decode_steps = 0  # decode forward passes (each a step of every live row)
        self.forward_overhead = 0.0  # measured below, once the warm-up has paid the first-call costs
        with torch.inference_mode():  # warm-up: the first StaticCache use imports torch._dynamo (seconds)
            warm = _Request([self.pad_id], self.roles[0], SamplingParams(0.0, max_new_tokens=1), None, 0)
            self._decode([_Row(warm, _BASE, (self.roles[0], 0), None, 1)], keep_kv=False)
            self.forward_overhead = self._measure_forward_overhead()
        self._phase_s = dict.fromkeys(self._phase_s, 0.0)  # the warm-up's and the probe's passes are not served work
        self._prefill_positions = 0
        self._decode_steps = 0

    def _measure_forward_overhead(self, n: int = 64) -> float:
        """A forward pass's fixed cost in prompt positions: about 35 on a CPU without AMX, 150 with it (the matmuls
        are 4x faster, the per-layer Python and small ops are not). Sharing a prefix in a batch must save more."""
        def seconds(length: int) -> float:
            req = _Request([self.pad_id] * length, self.roles[0], SamplingParams(0.0, 1), None, 0)
            start = time.perf_counter()
            self._prefill([_Row(req, _BASE, (self.roles[0], 0), None, 1)], tail=0)
            return time.perf_counter() - start

        one = min(seconds(1) for _ in range(2))
        many = min(seconds(n) for _ in range(2))
        return one / max((many - one) / (n - 1), 1e-9)

    # ---- public API ------------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], role: str, sampling: SamplingParams) -> GenerateResult:
        check_request(self.roles, prompt_ids, role, sampling)
        if len(prompt_ids) >= self.max_positions:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the model's {self.max_positions} positions")
        self._ensure_server()
        assert self._queue is not None and self._loop is not None
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        req = _Request(list(map(int, prompt_ids)), role, sampling, self._loop.create_future(), seed)
        self._queue.put_nowait(req)
        return await req.future

    def update_adapter(self, update: AdapterUpdate) -> int:
        """Stage `update` for its role; it is loaded now if no batch is running, else right before the next batch."""
        tensors = self._checked(update)
        with self._pending_lock:
            self._check_version(update)
            self._pending[update.role] = (update.version, tensors)
            self._version[update.role] = update.version
        if self._weights_lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._weights_lock.release()
        return update.version

    def check_adapter(self, update: AdapterUpdate) -> None:
        """Raise ValueError if `update` (e.g. the learner's untrained adapter, at start) could not be served."""
        self._checked(update)

    def load_adapter_dir(self, role: str, version: int, path: str) -> int:
        """Load a PEFT adapter folder (adapter_model.safetensors, as `save_pretrained` writes) as `role`@`version`."""
        return self.update_adapter(AdapterUpdate(role=role, version=version, tensors=read_adapter_dir(path)))

    def release_memory(self) -> int:
        """Drop the prefix cache (e.g. while the learner trains on the same machine); returns the tokens freed."""
        with self._weights_lock:
            freed = self._prefix.clear()
            trim_heap()
        return freed

    def shutdown(self) -> None:
        self._compute.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, float]:
        n = self._n
        return {
            "requests": n["requests"],
            "batches": n["batches"],
            "tokens_generated": n["tokens"],
            "prompt_tokens": n["prompt_tokens"],
            "mean_batch_size": n["requests"] / n["batches"] if n["batches"] else 0.0,  # joined rows included
            "queue_depth": self._queue.qsize() if self._queue is not None else 0,
            "busy_s": self._busy_s,
            "tokens_per_busy_s": n["tokens"] / self._busy_s if self._busy_s else 0.0,
            "pending_updates": len(self._pending),
            "prefix_hit_tokens": n["hit_tokens"],  # prompt tokens whose K/V came from the prefix cache
            "prefilled_tokens": n["prefilled"],  # prompt tokens computed: prompt_tokens - hits + shared_prefix_tokens
            "shared_prefix_tokens": n["shared"],  # computed once for several rows of a batch, then hits for each
            "prefix_cache_tokens": self._prefix.tokens,
            "prefix_cache_entries": len(self._prefix.entries),
            "prefill_s": self._phase_s["prefill"],  # prompt forward passes
            "decode_s": self._phase_s["decode"],  # one-token forward passes (the rest of busy_s: sampling, copies)
            "prefill_positions": self._prefill_positions,  # prefilled_tokens plus the padding the passes computed
            "decode_steps": self._decode_steps,  # decode passes; tokens_generated - requests of them were rows' steps
        }

    # ---- batching ----------------------------------------------------------------------------------------------

    def _ensure_server(self) -> None:
        loop = asyncio.get_running_loop()
        # A new loop (a second asyncio.run in tests) needs its own queue and task; an old queue is bound to its loop.
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._serve())

    async def _serve(self) -> None:
        assert self._queue is not None and self._loop is not None
        queue, loop = self._queue, self._loop
        while True:
            # Requests the last batch took but could not fit come first.
            batch, self._held = self._held[: self.max_batch_size], self._held[self.max_batch_size :]
            batch = batch or [await queue.get()]
            # Collect until no request has arrived for batch_wait_s (capped at 10x that): a burst of calls (Ray
            # delivers them a few ms apart) shares one batch, and so do the callers the previous batch just
            # answered, who come back after one env step. Without the second part concurrent episodes split into
            # two half-size groups that alternate, halving throughput. Polling, since wait_for(queue.get()) can drop
            # an item on Python 3.11.
            start = time.perf_counter()
            deadline = start + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    deadline = min(time.perf_counter() + self.batch_wait_s, start + 10 * self.batch_wait_s)
                elif time.perf_counter() < deadline:
                    await asyncio.sleep(0.001)
                else:
                    break
            batch = [r for r in batch if _waiting(r)]  # callers that gave up
            if not batch:
                continue
            taken = list(batch)  # the batch's requests and those that join it while it runs

            def answer(r: _Request, result: GenerateResult) -> None:  # from the compute thread, as rows finish
                loop.call_soon_threadsafe(_resolve, r.future, result)

            def take() -> list[_Request]:  # from the compute thread, between decode steps
                if queue.empty():  # a deque's len(): safe to read from another thread
                    return []
                got = asyncio.run_coroutine_threadsafe(_drain(queue), loop).result()
                taken.extend(got)
                return got

            try:
                await loop.run_in_executor(self._compute, self._run_batch, batch, answer, take)
            except Exception as exc:  # noqa: BLE001 - the callers get it; the server keeps serving
                held = set(map(id, self._held))
                for r in taken:
                    if id(r) not in held and _waiting(r):
                        r.future.set_exception(exc)

    def _run_batch(self, batch: list[_Request], answer: Callable[[_Request, GenerateResult], None],
                   take: Callable[[], list[_Request]] | None = None) -> None:
        """Serve `batch`, answering each row as it finishes; requests from `take` join the batch while it decodes."""
        with self._weights_lock:
            start = time.perf_counter()
            self._apply_pending()
            versions = dict(self._applied)
            keep_kv = self._prefix.budget > 0
            batch = sorted(batch, key=lambda r: -len(r.prompt_ids))  # longest first: see _Step

            def name(r: _Request) -> str:  # PEFT's adapter for the row
                return _BASE if self._is_base[r.role] else r.role

            def row(r: _Request, size: int) -> _Row:
                key = (r.role, versions[r.role])
                return _Row(r, name(r), key, self._lookup(key, r.prompt_ids, keep_kv), size)

            def join(fits: Callable[[_Request], bool]) -> list[_Row]:  # the rows that fit; the others wait
                assert take is not None
                held, self._held, rows = self._held, [], []
                for r in held + take():
                    if not _waiting(r):  # a caller that gave up
                        continue
                    if fits(r):
                        rows.append(row(r, 0))
                    else:
                        self._held.append(r)
                return rows

            last: list[tuple[_Request, GenerateResult]] = []

            def done(ended: list[_Row], more: bool) -> None:
                for r in ended:
                    if r.kv is not None:  # ids minus the last sampled token: its K/V was never computed
                        self._prefix.put(_Entry(r.key, torch.tensor(r.req.prompt_ids + r.ids[:-1]), r.kv))
                    hit = r.reused
                    n = self._n
                    n["requests"] += 1
                    n["tokens"] += len(r.ids)
                    n["prompt_tokens"] += len(r.req.prompt_ids)
                    n["hit_tokens"] += hit
                    n["prefilled"] += len(r.req.prompt_ids) - hit
                    result = GenerateResult(
                        completion_ids=r.ids, logprobs=r.lps, version=r.key[1], finish_reason=r.reason,
                        stats={"batch_size": r.batch_size, "queue_wait_s": r.entered - r.req.enqueued,
                               "batch_s": time.perf_counter() - r.entered, "prefix_hit_tokens": hit},
                    )
                    # Answered now while other rows go on; the batch's last ones once it is over, so a caller
                    # holding every answer knows the batch ended (an adapter update then lands at once).
                    if more:
                        answer(r.req, result)
                    else:
                        last.append((r.req, result))

            with torch.inference_mode():
                shared = 0
                if keep_kv:
                    shared = self._share_prefixes(batch, [name(r) for r in batch],
                                                  [(r.role, versions[r.role]) for r in batch])
                rows = [row(r, len(batch)) for r in batch]
                self._decode(rows, keep_kv, done, join if take is not None else None)
            self._n["prefilled"] += shared
            self._n["shared"] += shared
            self._n["batches"] += 1
            self._busy_s += time.perf_counter() - start
        for req, result in last:
            answer(req, result)
        trim_heap()

    def _lookup(self, key: tuple[str, int], prompt_ids: list[int], enabled: bool) -> torch.Tensor | None:
        entry, hit = self._prefix.lookup(key, torch.tensor(prompt_ids)) if enabled else (None, 0)
        return None if entry is None else entry.kv[:, :, :, :hit]

    def _share_prefixes(self, batch: list[_Request], names: list[str], keys: list[tuple[str, int]]) -> int:
        """Rows of one batch that share a prompt prefix nobody has cached yet (the episodes' common system prompt on
        their first step; n reflections of one prompt) would each compute it. Compute each such prefix once, as a
        row of its own, into the prefix cache, so the rows' lookups then hit it: worth it when the positions saved,
        (rows - 1) x uncached length, exceed a forward pass's fixed cost. Returns the tokens computed."""
        order = sorted(range(len(batch)), key=lambda i: (keys[i], batch[i].prompt_ids))
        candidates: set[tuple[tuple[str, int], tuple[int, ...]]] = set()
        for a, b in zip(order, order[1:]):  # sorted, so every maximal shared prefix is one of neighbours
            pa, pb = batch[a].prompt_ids, batch[b].prompt_ids
            n = min(len(pa), len(pb))
            same = next((k for k in range(n) if pa[k] != pb[k]), n)
            if keys[a] == keys[b] and same >= _MIN_HIT:
                candidates.add((keys[a], tuple(pa[:same])))
        computed = 0
        while candidates:  # shortest prefixes first, so a longer one then reuses the shorter one's entry
            jobs = [kp for kp in candidates
                    if not any(q[0] == kp[0] and len(q[1]) < len(kp[1]) and kp[1][: len(q[1])] == q[1]
                               for q in candidates)]
            candidates -= set(jobs)
            worth = []  # (key, prefix ids, adapter name of its rows)
            for key, ids in jobs:
                rows = [i for i, r in enumerate(batch) if keys[i] == key and tuple(r.prompt_ids[: len(ids)]) == ids]
                cached = self._prefix.lookup(key, torch.tensor(ids + (0,)))[1]  # + 1 id: lookup leaves the last out
                if (len(rows) - 1) * (len(ids) - cached) > self.forward_overhead:
                    worth.append((key, list(ids), names[rows[0]]))
            if worth:
                computed += self._prefill_into_cache(worth)
        return computed

    def _prefill_into_cache(self, prefixes: list[tuple[tuple[str, int], list[int], str]]) -> int:
        """Compute the K/V of each (key, ids, adapter name) into the prefix cache; returns the tokens computed."""
        rows = [_Row(_Request(ids, key[0], SamplingParams(0.0, 1), None, 0), name, key, self._lookup(key, ids, True), 0)
                for key, ids, name in prefixes]
        self._decode(rows, keep_kv=True)
        for r in rows:  # kv: the prefix's own (the new token's is not kept)
            self._prefix.put(_Entry(r.key, torch.tensor(r.req.prompt_ids), r.kv))
        return sum(len(r.req.prompt_ids) - r.reused for r in rows)

    # ---- decoding ----------------------------------------------------------------------------------------------

    def _prefill(self, rows: list[_Row], tail: int, slack: int = 0) -> tuple[torch.Tensor, StaticCache, torch.Tensor]:
        """Run `rows`' prompts through the model into a new cache with `tail` free slots after them and `slack` more
        before the longest prompt (for longer prompts joining later), setting each row's `slots` (its prompt's slots
        in the cache). Returns the last position's logits [n, V], the cache and its
        attention mask [n, width + tail]. Packed: one pass per adapter over the rows' uncached tokens end to end (see
        _Pack), no padding computed; the cache holds each row's prompt right-aligned: [pad | prompt_i | tail]."""
        if not self._packed:
            return self._prefill_padded(rows, tail)
        cached = [r.reused for r in rows]
        lens = [len(r.req.prompt_ids) for r in rows]
        end = max(lens) + slack
        cache = StaticCache(config=self.config, max_cache_len=end + tail)
        if any(c for c in cached):  # reused K/V right before each row's new tokens
            _fill_cache(cache, [r.past for r in rows], [slice(end - n, end - n + c) for n, c in zip(lens, cached)],
                        end)
        logits = self._pack_pass(cache, end, list(enumerate(rows)), len(rows))
        for layer in cache.layers:
            layer.cumulative_length.fill_(end)  # decode steps write from `end` on (as _fill_cache sets it)
        mask = torch.ones((len(rows), end + tail), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lens)):
            mask[i, : end - n] = 0
            r.slots = torch.arange(end - n, end)
        return logits, cache, mask

    def _pack_pass(self, cache: StaticCache, end: int, rows: list[tuple[int, _Row]], batch: int) -> torch.Tensor:
        """Prefill `rows` (cache row, row), whose prompts end at slot `end` and whose reused K/V is in place: one
        packed pass per adapter (PEFT picks adapters per batch row). Returns the rows' last-position logits [n, V]."""
        logits: torch.Tensor | None = None
        start = time.perf_counter()
        for name in dict.fromkeys(r.name for _, r in rows):
            packed, ids, positions, last, picked = [], [], [], [], []
            for k, (at, r) in enumerate(rows):
                if r.name == name:
                    c, n = r.reused, len(r.req.prompt_ids)
                    packed.append((at, len(ids), c, n - c))
                    ids += r.req.prompt_ids[c:]
                    positions += range(c, n)  # each row's own positions (RoPE)
                    last.append(len(ids) - 1)
                    picked.append(k)
            out = self.model(
                input_ids=torch.tensor([ids]),
                # All ones: transformers then builds no mask (masking_utils.py:273); None would make it look for
                # packed sequences in position_ids (:854-862). _Pack.attend masks each row itself.
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                position_ids=torch.tensor([positions]),
                use_cache=False,
                # An index tensor (not an int) hands lm_head a contiguous [1, n, H]: torch's linear on a strided
                # slice is ~250x slower in bf16 (it expands the weight per row).
                logits_to_keep=torch.tensor(last),
                adapter_names=[name],
                **{_PACK: _Pack(cache, end, packed, batch)},
            ).logits[0]
            if logits is None:
                logits = out.new_empty((len(rows), out.shape[-1]))
            logits[picked] = out
            self._prefill_positions += len(ids)
        self._phase_s["prefill"] += time.perf_counter() - start
        assert logits is not None
        return logits

    def _prefill_padded(self, rows: list[_Row], tail: int) -> tuple[torch.Tensor, StaticCache, torch.Tensor]:
        """_prefill for a model whose attention or cache the packed pass cannot use (an attention implementation
        other than SDPA, sliding-window layers): one left-padded pass through transformers' own cache and masks."""
        cached = [r.reused for r in rows]
        new = [len(r.req.prompt_ids) - c for r, c in zip(rows, cached)]
        C, N = max(cached), max(new)
        # Each row's slots: [pad | cached_i | pad | new_i | tail]. Cached and new segments are each left-padded, so
        # all rows' next tokens land in the same column; the pads in between are masked out.
        ids = torch.full((len(rows), N), self.pad_id, dtype=torch.long)
        for i, (r, c) in enumerate(zip(rows, cached)):
            ids[i, N - new[i] :] = torch.tensor(r.req.prompt_ids[c:])
        # The mask covers the whole cache up front: pads are 0, every later slot 1 (causality hides unwritten ones).
        mask = torch.ones((len(rows), C + N + tail), dtype=torch.long)
        for i, (c, n) in enumerate(zip(cached, new)):
            mask[i, : C - c] = 0
            mask[i, C : C + N - n] = 0
        # Real tokens continue their row's own positions (RoPE), whatever the padding.
        positions = torch.tensor(cached)[:, None] + (mask[:, C : C + N].cumsum(-1) - 1).clamp(min=0)
        # A preallocated cache: DynamicCache's per-step torch.cat of every layer's K/V cost more than the matmuls.
        cache = StaticCache(config=self.config, max_cache_len=mask.shape[1])
        if C:  # the reused K/V fills slots [0, C); the prefill below then writes from C on
            _fill_cache(cache, [r.past for r in rows], [slice(C - c, C) for c in cached], C)
        start = time.perf_counter()
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor([N - 1]),  # see _pack_pass
            adapter_names=[r.name for r in rows],
        ).logits[:, -1]
        self._phase_s["prefill"] += time.perf_counter() - start
        self._prefill_positions += len(rows) * N
        for r, c, n in zip(rows, cached, new):
            r.slots = torch.cat([torch.arange(C - c, C), torch.arange(C + N - n, C + N)])
        return logits, cache, mask

    def _decode(self, rows: list[_Row], keep_kv: bool, done: Callable[[list[_Row], bool], None] | None = None,
                join: Callable[[Callable[[_Request], bool]], list[_Row]] | None = None) -> None:
        """Generate for `rows`, filling in each row's ids, log-probs, finish reason and, if keep_kv, its K/V for the
        prefix cache; done(rows, more) after each step with the rows that finished and whether others go on.
        Between decode steps, rows from join(fits) enter the running batch (see _join): a batch's short turns then
        need not wait for its long ones (32-token actor turns beside a 96-token reflection), since their callers,
        answered at once, come back into the same batch. A joining row's prompt ends at the current write slot, so
        it needs that many slots to its left: the cache has _GROWTH times the batch's longest cap free before its
        longest prompt (later turns of its callers are longer)."""
        join = join if self._packed else None  # the padded layout has no room for late rows
        for r in rows:
            self._start(r)
        room = max(r.limit for r in rows)
        logits, cache, mask = self._prefill(rows, tail=room, slack=room * _GROWTH if join else 0)
        width = mask.shape[1] - room
        for r in rows:
            r.at = width
        bases = [(layer.keys, layer.values) for layer in cache.layers]  # full-size: joining rows reuse freed ones
        step = _Step([], width)
        live = rows  # the row at each cache position
        keep, ended = self._advance(live, logits, 0, cache, keep_kv)
        while True:
            if len(keep) < len(live):  # finished rows leave the batch: less compute for the rest
                idx = torch.tensor(_drop_rows(cache, keep)) if keep else torch.tensor([], dtype=torch.long)
                mask, live = mask[idx], [live[j] for j in idx.tolist()]
            # An update waits for the batch: no joins then.
            if join is not None and live and not self._pending:
                added, logits = self._join(join, live, cache, bases, step.length)
                if added:
                    first = len(live)
                    extra = torch.zeros((len(added), mask.shape[1]), dtype=mask.dtype)
                    for k, r in enumerate(added):
                        extra[k, int(r.slots[0]) :] = 1
                    mask, live = torch.cat([mask, extra]), live + added
                    kept, late = self._advance(added, logits, first, cache, keep_kv)
                    ended += late
                    if len(kept) < len(added):
                        idx = torch.tensor(_drop_rows(cache, list(range(first)) + [first + j for j in kept]))
                        mask, live = mask[idx], [live[j] for j in idx.tolist()]
            if done is not None:
                done(ended, bool(live))
            if not live:
                break
            step.chunks = _chunks([int(r.slots[0]) for r in live])
            step.length += 1  # this step's token: written at slot length - 1, read with the rest
            start = time.perf_counter()
            logits = self.model(
                input_ids=torch.tensor([[r.ids[-1]] for r in live]),
                attention_mask=mask,
                position_ids=torch.tensor([[len(r.req.prompt_ids) + len(r.ids) - 1] for r in live]),
                past_key_values=cache,
                use_cache=True,
                adapter_names=[r.name for r in live],
                # Slots are cache positions only in full-length static layers (a sliding-window layer's are not),
                # the layers the packed prefill also needs.
                **({_STEP: step} if self._packed else {}),
            ).logits[:, -1]
            self._phase_s["decode"] += time.perf_counter() - start
            self._decode_steps += 1
            keep, ended = self._advance(live, logits, 0, cache, keep_kv)

    def _limit(self, req: _Request) -> int:
        return min(req.sampling.max_new_tokens, self.max_positions - len(req.prompt_ids))

    def _start(self, r: _Row) -> None:
        r.limit = self._limit(r.req)
        r.stops = self.eos_ids | set(r.req.sampling.stop_token_ids)
        r.gen = torch.Generator().manual_seed(r.req.seed)
        r.entered = time.perf_counter()

    def _advance(self, rows: list[_Row], logits: torch.Tensor, first: int, cache: StaticCache, keep_kv: bool
                 ) -> tuple[list[int], list[_Row]]:
        """Sample each row's next token (rows at cache positions first, first + 1, ...); finish the rows that stop or
        reach their cap (their K/V gathered first, while they are in the cache). Returns the positions that go on
        and the rows that finished."""
        tokens, lps = self._sample(logits.float(), [r.req.sampling for r in rows], [r.gen for r in rows])
        keep: list[int] = []
        ended: list[_Row] = []
        for j, (r, tok, lp) in enumerate(zip(rows, tokens.tolist(), lps.tolist())):
            r.ids.append(tok)
            r.lps.append(lp)
            if tok in r.stops:
                r.reason = "stop"
            elif len(r.ids) < r.limit:
                keep.append(first + j)
                continue
            if keep_kv:  # its slots hold prompt + all but the last token
                r.kv = _gather_row(cache, first + j, torch.cat([r.slots, torch.arange(r.at, r.at + len(r.ids) - 1)]))
            ended.append(r)
        return keep, ended

    def _join(self, join: Callable[[Callable[[_Request], bool]], list[_Row]], live: list[_Row], cache: StaticCache,
              bases: list[tuple[torch.Tensor, torch.Tensor]], at: int) -> tuple[list[_Row], torch.Tensor | None]:
        """Prefill the rows join(fits) gives into the running batch at cache positions len(live), ...: each
        prompt ends at slot `at` (the next write slot), and its steps end before the longest live row's would. So
        a row joins only to fill steps the batch takes anyway: a turn that ends early (a stop token) never makes
        its batch longer, and the batch's rows, whose callers come back from their env steps together, stay one
        round (a CPU decode step costs about as much for a few rows as for many). Others, and rows over
        max_batch_size, wait for the next batch. Returns the joined rows and their last-position logits."""
        horizon = max(r.limit - len(r.ids) for r in live)  # steps the longest live row may still take
        free = self.max_batch_size - len(live)

        def fits(req: _Request) -> bool:
            nonlocal free
            if free and len(req.prompt_ids) <= at and self._limit(req) - 1 <= horizon:
                free -= 1
                return True
            return False

        added = join(fits)
        if not added:
            return [], None
        for k, r in enumerate(added):
            self._start(r)
            r.batch_size, r.at = len(live) + k + 1, at
            r.slots = torch.arange(at - len(r.req.prompt_ids), at)
        first = len(live)
        for n, layer in enumerate(cache.layers):  # room for the new rows: freed rows of the batch, else grow
            k, v = bases[n]
            if k.shape[0] < first + len(added):
                k, v = _grown(layer.keys, first + len(added)), _grown(layer.values, first + len(added))
                bases[n] = (k, v)
            layer.keys, layer.values = k[: first + len(added)], v[: first + len(added)]
        reused = [(first + k, r) for k, r in enumerate(added) if r.past is not None]
        if reused:
            _put_rows(cache, [(at_, r.past, slice(int(r.slots[0]), int(r.slots[0]) + r.reused))
                              for at_, r in reused])
        logits = self._pack_pass(cache, at, [(first + k, r) for k, r in enumerate(added)], first + len(added))
        return added, logits

    @staticmethod
    def _sample(
        logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (fp32 logits [n, V]) and its log-prob under the raw (temperature 1) distribution."""
        lse = torch.logsumexp(logits, dim=-1)  # log-probs only at the picked tokens: a full log_softmax is a pass more
        tokens = logits.argmax(dim=-1)
        hot = [j for j, p in enumerate(params) if p.temperature > 0]
        if hot:
            temps = torch.tensor([params[j].temperature for j in hot]).unsqueeze(1)
            probs = torch.softmax(logits[hot] / temps, dim=-1)
            top_p = [params[j].top_p for j in hot]
            if min(top_p) < 1:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # drop tokens once the mass before them already reaches top_p (the top token always stays)
                limit = torch.tensor([p if p < 1 else float("inf") for p in top_p]).unsqueeze(1)
                drop = (sorted_p.cumsum(-1) - sorted_p) >= limit
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
            # Inverse-CDF draw, one uniform per row from that request's own generator (so a row's draws don't
            # depend on its batch mates); torch.multinomial would draw a full vocab of exponentials per row.
            cdf = probs.double().cumsum(-1)  # fp64: an fp32 running sum drifts by about one token's probability
            u = torch.cat([torch.rand(1, generator=gens[j], dtype=torch.float64) for j in hot])
            picked = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
            tokens[hot] = picked.clamp_(max=cdf.shape[1] - 1)
        return tokens, logits.gather(-1, tokens[:, None])[:, 0] - lse

    # ---- adapters ----------------------------------------------------------------------------------------------

    def _checked(self, update: AdapterUpdate) -> dict[str, torch.Tensor]:
        self._check_role(update)
        expected = self._expected[update.role]
        got = update.tensors
        missing, extra = expected.keys() - got.keys(), got.keys() - expected.keys()
        bad = [k for k in expected.keys() & got.keys() if tuple(got[k].shape) != tuple(expected[k])]
        if missing or extra or bad:
            raise ValueError(
                f"adapter update for {update.role!r} does not fit this engine's LoRA config: "
                f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}, wrong shape {sorted(bad)[:3]} "
                "(keys must be as peft.get_peft_model_state_dict(model, adapter_name=role) returns them)"
            )
        return {k: t.detach().to("cpu") for k, t in got.items()}

    def _apply_pending(self) -> None:
        """Load staged updates into the weights; the caller holds _weights_lock."""
        from peft import set_peft_model_state_dict

        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for role, (version, tensors) in pending.items():
            with torch.no_grad():
                result = set_peft_model_state_dict(self.model, tensors, adapter_name=role)
            if result.unexpected_keys:
                raise RuntimeError(f"PEFT rejected keys for {role!r}: {result.unexpected_keys[:3]}")
            self._applied[role] = version
            self._prefix.drop_role(role)  # K/V computed under the old weights is stale
            self._is_base[role] = not any(t.any() for k, t in tensors.items() if "lora_B" in k)
