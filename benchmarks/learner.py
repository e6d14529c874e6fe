"""Learner speed-up and efficiency: our Learner (SFT, DPO) vs TRL's SFTTrainer and DPOTrainer on the same data.

Data: the default TextWorld setup's expert demos, built exactly as the SFT pipeline's `Session.demos` does (expert
replay + one failed attempt per training task, `demo_episodes`), without Ray. SFT trains on `il_samples` of the
actor role (one adapter, so the comparison is one LoRA against one LoRA). DPO trains on ETO's `dpo_pairs` with each
task's failed demo attempt as the explored trajectory: chosen = the expert's trial, rejected = the failed attempt
(same reset, shared prefix). Both sides get the same token ids and loss masks (1 on agent tokens only), the same
model, LoRA config, dtype, lr, grad clip and rows per batch (TRL's batch size = our average rows per batch).

TRL is driven on pre-tokenised data: SFTTrainer gets `input_ids` + `assistant_masks` (TRL folds them into `labels`),
with its default right padding and, as a second variant, `padding_free=True` (its fastest documented option; SDPA
gets a block-diagonal mask from the position ids). TRL 1.16's DPOTrainer has no pre-tokenised input for masks that
interleave agent and observation tokens, so its dataset preparation is skipped and a collator hands it our ids and
`completion_mask`; its own `compute_loss` (policy forward + per-step reference forward with the adapter disabled,
fused LM head, sigmoid loss) does the rest. Gradient checkpointing is off on both sides (TRL's default is on; ours
off), dropout is LoRA's 0.05 on both (DPOConfig.disable_dropout=False).

Timed: our `train_il` / `train_dpo` call vs `trainer.train()`, one epoch each, after one warm-up step each (model
load and trainer construction off the clock). Runs are interleaved (ours, trl..., ours, trl...) and each ratio is the
median over pairs (BENCHMARKS.md). A bf16 (or fp32) 2048x2048 matmul, timed at the start of every pair, gives the
peak the learner's achieved FLOP/s is divided by ("learner efficiency").

  .venv/bin/python benchmarks/learner.py [--pairs 3] [--model smollm2-135m] [--dtype auto]
      [--max-tokens-per-batch 2048] [--limit N] [--steps N] [--which sft,dpo] [--trl-sft padding,padding_free]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import datasets
import torch
import transformers
from transformers.trainer_callback import PrinterCallback

from agents.actor import ActorPrompt
from agents.chat import ChatFormatter
from agents.expert import demo_episodes
from agents.model import load_model, load_tokenizer, resolve_dtype, resolve_model
from agents.reflector import ReflectorPrompt
from agents.trajectory import ACTOR, Episode
from cluster.config import load_config
from cluster.pipeline import derive_seed, train_tasks
from envs import make_env
from envs.demos import expert_replay, failed_replay
from learners.batching import (
    TokenSample,
    dpo_pairs,
    il_samples,
    make_batches,
    make_pair_batches,
)
from learners.methods import MethodLearner

FLOPS_FORMULA = (
    "train = 4*N_body*S + 4*N_head*K + 6*N_lora*S + 6*L*d_attn*sum(len^2); "
    "DPO adds the reference forward 2*N_body*S + 2*N_head*K + 2*L*d_attn*sum(len^2). "
    "S = non-pad tokens, K = trained (loss-mask) tokens, N_body = non-embedding params, N_head = LM head params "
    "(only trained positions go through it), N_lora = LoRA params; frozen weights cost forward (2N) + activation "
    "grads (2N), LoRA weights forward + activation grads + weight grads (6N); causal attention 2*L*d*len^2 forward"
)


# ---------------------------------------------------------------------------------------------------------- data
def build_demos(formatter: ChatFormatter, cfg) -> tuple[list[Episode], list[Episode]]:
    """`Session.demos` without Ray: (expert episodes, failed-attempt episodes) of every training task with demos."""
    env = make_env(cfg.env.name, **cfg.env.kwargs)
    env.prepare()
    prompt = ActorPrompt(formatter, show_actions=cfg.agent.show_actions)
    reflector = ReflectorPrompt(formatter)
    experts: list[Episode] = []
    failed: list[Episode] = []
    for task_id, _ in train_tasks(cfg, env)[0]:  # the tasks with demos, as Session.demos gets them
        expert = expert_replay(env, task_id)
        batch = demo_episodes(prompt, reflector, cfg.env.name, "train", expert, None, cfg.agent.memory_size)
        experts += batch
        for j in range(cfg.demos.failed_per_task):
            seed = derive_seed(cfg.seed, "failed-demo", task_id, j)
            attempt = failed_replay(env, task_id, random.Random(seed), cfg.demos.wrong_steps)
            if attempt is not None:
                failed += demo_episodes(prompt, reflector, cfg.env.name, "train", expert, attempt,
                                        cfg.agent.memory_size)[1:]
    env.close()
    return experts, failed


def even_pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def sft_subset(samples: list[TokenSample], steps: int, max_tokens: int, pad_id: int) -> list[TokenSample]:
    """The samples of `steps` of our batches spread over the length range: re-batched, they form the same batches."""
    groups = make_batches(samples, max_tokens, pad_id)[ACTOR]
    keep = sorted(i for g in even_pick(len(groups), steps) for i in groups[g].index)
    return [samples[i] for i in keep]


def dpo_subset(pairs: list[tuple[TokenSample, TokenSample]], steps: int, max_tokens: int, pad_id: int):
    groups = make_pair_batches(pairs, max_tokens, pad_id)
    keep = sorted({i for g in even_pick(len(groups), steps) for i in groups[g].index})
    return [pairs[i] for i in keep]


# ---------------------------------------------------------------------------------------------------------- flops
def model_shape(peft_model) -> dict[str, int]:
    base = peft_model.get_base_model()
    conf = base.config.get_text_config()
    head = base.get_output_embeddings().weight.numel()
    embed = base.get_input_embeddings().weight.numel()
    lora = body = 0
    for name, p in base.named_parameters():
        if "lora_" in name:
            lora += p.numel()
        elif p.data_ptr() not in (base.get_input_embeddings().weight.data_ptr(),
                                  base.get_output_embeddings().weight.data_ptr()):
            body += p.numel()
    lora //= max(len(peft_model.peft_config), 1)  # one adapter is active per forward
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    return {"n_body": body, "n_head": head, "n_embed": embed, "n_lora": lora,
            "layers": conf.num_hidden_layers, "d_attn": conf.num_attention_heads * head_dim}


def work_flops(shape: dict[str, int], seqs: list[TokenSample], reference: bool) -> float:
    s = sum(len(x) for x in seqs)
    k = sum(x.n_trained for x in seqs)
    sq = sum(len(x) ** 2 for x in seqs)
    attn = shape["layers"] * shape["d_attn"] * sq
    flops = 4 * shape["n_body"] * s + 4 * shape["n_head"] * k + 6 * shape["n_lora"] * s + 6 * attn
    if reference:
        flops += 2 * shape["n_body"] * s + 2 * shape["n_head"] * k + 2 * attn
    return float(flops)


def matmul_flops(dtype: torch.dtype, n: int = 2048, min_s: float = 0.5) -> float:
    """Achieved FLOP/s of an n x n x n torch.matmul in `dtype` (the peak the learner is compared with)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and reps >= 3:
            return 2.0 * n**3 * reps / elapsed


# ---------------------------------------------------------------------------------------------------------- TRL
class _CountingCollator:
    """Wraps a collator to count the padded [rows x width] elements TRL actually runs through the model."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.padded = 0

    def __call__(self, examples):
        out = self.inner(examples)
        self.padded += out["input_ids"].numel()
        return out


def _common_args(dtype: torch.dtype, out: str, batch: int, lr: float, grad_clip: float) -> dict[str, Any]:
    return {"output_dir": out, "report_to": "none", "use_cpu": True, "bf16": dtype == torch.bfloat16, "fp16": False,
            "per_device_train_batch_size": batch, "num_train_epochs": 1, "learning_rate": lr,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": grad_clip,
            "gradient_checkpointing": False, "save_strategy": "no", "eval_strategy": "no",
            "logging_strategy": "no", "disable_tqdm": True, "seed": 0, "max_length": None}


def trl_sft(model_path: str, dtype, tokenizer, samples: list[TokenSample], lora, batch: int, lr: float,
            grad_clip: float, mode: str, out: str):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    extra = {"padding": {}, "padding_free": {"padding_free": True},
             "group_by_length": {"train_sampling_strategy": "group_by_length"}}[mode]
    data = Dataset.from_dict({"input_ids": [s.ids for s in samples], "assistant_masks": [s.mask for s in samples]})
    args = SFTConfig(**_common_args(dtype, out, batch, lr, grad_clip), **extra)
    trainer = SFTTrainer(model=load_model(model_path, dtype), args=args, train_dataset=data,
                         processing_class=tokenizer, peft_config=lora)
    trainer.data_collator = _CountingCollator(trainer.data_collator)
    return trainer


def trl_dpo(model_path: str, dtype, tokenizer, pairs, lora, batch: int, lr: float, grad_clip: float, beta: float,
            pad_id: int, out: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import pad

    class PreTokenisedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # ids and masks are final already
            return dataset

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        masks = [e["chosen_mask"] for e in examples] + [e["rejected_mask"] for e in examples]
        return {
            "input_ids": pad([torch.tensor(r) for r in rows], padding_value=pad_id, padding_side="right"),
            "attention_mask": pad([torch.ones(len(r), dtype=torch.long) for r in rows], padding_value=0,
                                  padding_side="right"),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0,
                                   padding_side="right"),
        }

    data = Dataset.from_dict({
        "chosen_ids": [c.ids for c, _ in pairs], "chosen_mask": [c.mask for c, _ in pairs],
        "rejected_ids": [r.ids for _, r in pairs], "rejected_mask": [r.mask for _, r in pairs],
    })
    args = DPOConfig(**_common_args(dtype, out, batch, lr, grad_clip), beta=beta, loss_type=["sigmoid"],
                     disable_dropout=False, remove_unused_columns=False)
    return PreTokenisedDPOTrainer(model=load_model(model_path, dtype), args=args, train_dataset=data,
                                  processing_class=tokenizer, peft_config=lora,
                                  data_collator=_CountingCollator(collate))


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """Hide the RANK/LOCAL_RANK/WORLD_SIZE our learner's DeepSpeed set up in this process: with LOCAL_RANK set,
    Accelerate takes a CPU process for a MULTI_CPU rank and TRL's model gets a DDP wrapper (an extra autograd
    traversal and a gloo all-reduce per step) that a plain single-process TRL run does not have."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_trl(trainer, max_steps: int = -1) -> float:
    """One `trainer.train()` (a fresh optimizer each call, like a fresh run); returns its wall time."""
    trainer.args.max_steps = max_steps
    trainer.optimizer, trainer.lr_scheduler = None, None
    with single_process_env():
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens-per-batch", type=int, default=None,
                    help="our token budget per batch (default: learner.max_tokens_per_batch of configs/default.yaml)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N SFT samples and N DPO pairs")
    ap.add_argument("--steps", type=int, default=None,
                    help="smoke tests: keep only the samples of N of our batches (spread over lengths)")
    ap.add_argument("--which", default="sft,dpo", help="comma list of sft, dpo")
    ap.add_argument("--trl-sft", default="padding,padding_free",
                    help="TRL SFT variants: comma list of padding, padding_free, group_by_length")
    ap.add_argument("--matmul-size", type=int, default=2048)
    args = ap.parse_args()
    which = [w for w in args.which.split(",") if w]
    sft_modes = [m for m in args.trl_sft.split(",") if m]

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config()
    max_tokens = args.max_tokens_per_batch or cfg.learner.max_tokens_per_batch
    model_path = str(resolve_model(args.model))
    dtype = resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(model_path)
    formatter = ChatFormatter(tokenizer)

    t0 = time.perf_counter()
    experts, failed = build_demos(formatter, cfg)
    samples = [s for s in il_samples(experts + failed) if s.role == ACTOR]
    pairs, pair_counts = dpo_pairs(failed, {e.task_id: e for e in experts}, cfg.eto.extra_turns)
    print(f"demos: {len(experts)} expert + {len(failed)} failed-attempt episodes -> {len(samples)} actor SFT "
          f"samples, {len(pairs)} DPO pairs ({time.perf_counter() - t0:.1f}s)", flush=True)

    lc = cfg.learner
    tmp = tempfile.TemporaryDirectory(prefix="bench-learner-")
    learner = MethodLearner(model_path, args.dtype, lora_r=lc.lora.r, lora_alpha=lc.lora.alpha,
                            lora_dropout=lc.lora.dropout, lora_target_modules=lc.lora.target_modules,
                            roles=(ACTOR,), zero_stage=lc.zero_stage, gradient_clipping=lc.grad_clip, lr=lc.lr,
                            seed=cfg.seed, output_dir=f"{tmp.name}/ours", max_len=lc.max_sample_tokens,
                            kl_coef=cfg.retroformer.kl_coef, target_kl=cfg.retroformer.target_kl,
                            kl_horizon=cfg.retroformer.kl_horizon)
    samples, _ = learner.prepare(samples)
    keep = {id(s) for s in learner.prepare([s for p in pairs for s in p])[0]}
    pairs = [p for p in pairs if id(p[0]) in keep and id(p[1]) in keep]
    if args.limit is not None:
        samples, pairs = samples[: args.limit], pairs[: args.limit]
    if args.steps is not None:
        samples = sft_subset(samples, args.steps, max_tokens, learner.pad_id)
        pairs = dpo_subset(pairs, args.steps, max_tokens, learner.pad_id)
    shape = model_shape(learner.peft)
    lora = learner.lora_config

    # TRL's batch size = our average rows (SFT) / pairs (DPO) per batch under the token budget.
    sft_batches = make_batches(samples, max_tokens, learner.pad_id)[ACTOR] if samples else []
    dpo_batches = make_pair_batches(pairs, max_tokens, learner.pad_id) if pairs else []
    sft_bs = max(1, round(len(samples) / max(len(sft_batches), 1)))
    dpo_bs = max(1, round(len(pairs) / max(len(dpo_batches), 1)))
    beta, dpo_lr = cfg.eto.beta[0], cfg.eto.lr[0]

    def build_trainers() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if "sft" in which:
            out["sft"] = {f"trl_{mode}": trl_sft(model_path, dtype, tokenizer, samples, lora, sft_bs, lc.lr,
                                                  lc.grad_clip, mode, f"{tmp.name}/sft_{mode}") for mode in sft_modes}
        if "dpo" in which:
            out["dpo"] = {"trl": trl_dpo(model_path, dtype, tokenizer, pairs, lora, dpo_bs, dpo_lr, lc.grad_clip,
                                         beta, learner.pad_id, f"{tmp.name}/dpo")}
        return out

    with single_process_env():
        trainers = build_trainers()
    for trainer in (t for by_mode in trainers.values() for t in by_mode.values()):
        if trainer.accelerator.distributed_type.value != "NO":
            raise RuntimeError(f"TRL runs as {trainer.accelerator.distributed_type}, not a single process")
        trainer.remove_callback(PrinterCallback)  # no metrics dict printed after every run

    # What each timed run trains on (identical ids and masks on both sides).
    sft_seqs, dpo_seqs = samples, [s for p in pairs for s in p]
    work = {"sft": (sft_seqs, work_flops(shape, sft_seqs, False)), "dpo": (dpo_seqs, work_flops(shape, dpo_seqs, True))}
    print(f"model {args.model} ({dtype}), body {shape['n_body'] / 1e6:.1f}M + head {shape['n_head'] / 1e6:.1f}M "
          f"params, LoRA {shape['n_lora'] / 1e3:.0f}K; budget {max_tokens} tok/batch; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    for task in which:
        seqs = work[task][0]
        rows = f"{sft_bs} rows" if task == "sft" else f"{dpo_bs} pairs"
        print(f"{task}: {len(seqs)} sequences, {sum(len(s) for s in seqs)} tokens, "
              f"{sum(s.n_trained for s in seqs)} trained; TRL batch {rows}", flush=True)

    def ours(task: str, warmup: bool = False) -> tuple[float, dict[str, Any]]:
        if task == "sft":
            data = [samples[i] for i in sft_batches[0].index] if warmup else samples
            t = time.perf_counter()
            m = learner.train_il(data, epochs=1, lr=lc.lr, max_tokens_per_batch=max_tokens)
        else:
            data = [pairs[i] for i in dpo_batches[0].index[: len(dpo_batches[0].index) // 2]] if warmup else pairs
            t = time.perf_counter()
            m = learner.train_dpo(data, beta=beta, epochs=1, lr=dpo_lr, max_tokens_per_batch=max_tokens)
        return time.perf_counter() - t, m

    # Warm-up: one step each, off the clock.
    for task in which:
        ours(task, warmup=True)
    for by_mode in trainers.values():
        for trainer in by_mode.values():
            run_trl(trainer, max_steps=1)

    runs: list[dict[str, Any]] = []
    matmul: list[float] = []
    for i in range(args.pairs):
        matmul.append(matmul_flops(dtype, args.matmul_size))
        for task in which:
            for mode in ["ours", *trainers[task]]:
                extra: dict[str, Any] = {}
                if mode == "ours":
                    seconds, m = ours(task)
                    extra["padding_frac"] = m.get("padding_frac")
                    extra["steps"] = m.get("steps")
                else:
                    trainer = trainers[task][mode]
                    trainer.data_collator.padded = 0
                    seconds = run_trl(trainer)
                    extra["steps"] = trainer.state.global_step
                    n_tok = sum(len(s) for s in work[task][0])
                    padded = trainer.data_collator.padded
                    extra["padding_frac"] = 1.0 - n_tok / padded if padded else None
                seqs, flops = work[task]
                row = {"pair": i, "task": task, "mode": mode, "seconds": seconds,
                       "trained_tokens_per_s": sum(s.n_trained for s in seqs) / seconds,
                       "tokens_per_s": sum(len(s) for s in seqs) / seconds,
                       "flops_per_s": flops / seconds, **extra}
                runs.append(row)
                pad = "" if row["padding_frac"] is None else f"  pad {row['padding_frac']:5.1%}"
                print(f"pair {i} {task} {mode:16s} {seconds:7.2f}s  {row['trained_tokens_per_s']:8.1f} trained tok/s  "
                      f"{row['tokens_per_s']:8.1f} tok/s  {row['flops_per_s'] / 1e9:7.2f} GFLOP/s{pad}", flush=True)
    tmp.cleanup()

    peak = statistics.median(matmul)

    def median(task: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["task"] == task and r["mode"] == mode)

    def ratio(task: str, mode: str, key: str = "trained_tokens_per_s") -> float:
        by = {(r["pair"], r["mode"]): r[key] for r in runs if r["task"] == task}
        return statistics.median(by[(p, "ours")] / by[(p, mode)] for p in range(args.pairs))

    print(f"\nmatmul {args.matmul_size}^3 {str(dtype).replace('torch.', '')}: {peak / 1e9:.1f} GFLOP/s (median of "
          f"{len(matmul)})")
    print(f"{'':8s}{'mode':18s}{'trained tok/s':>14s}{'tok/s':>10s}{'GFLOP/s':>10s}{'efficiency':>11s}"
          f"{'speed-up':>10s}")
    summary: dict[str, Any] = {
        "benchmark": "learner", "model": args.model, "dtype": str(dtype).replace("torch.", ""), "pairs": args.pairs,
        "max_tokens_per_batch": max_tokens, "sft_samples": len(samples), "dpo_pairs": len(pairs),
        "sft_trl_batch_size": sft_bs, "dpo_trl_batch_size": dpo_bs, "threads": torch.get_num_threads(),
        "matmul_flops_per_s": peak, "model_shape": shape, "flops_formula": FLOPS_FORMULA,
        "dpo_pair_counts": pair_counts,
    }
    for task in which:
        trl_modes = list(trainers[task])
        for mode in ["ours"] + trl_modes:
            tps, fps = median(task, mode, "trained_tokens_per_s"), median(task, mode, "flops_per_s")
            sp = ratio(task, mode) if mode != "ours" else None
            print(f"{task:8s}{mode:18s}{tps:14.1f}{median(task, mode, 'tokens_per_s'):10.1f}{fps / 1e9:10.2f}"
                  f"{fps / peak:11.3f}{'' if sp is None else f'{sp:9.2f}x':>10s}")
            key = f"{task}_{mode}"
            summary[f"{key}_trained_tokens_per_s"] = tps
            summary[f"{key}_tokens_per_s"] = median(task, mode, "tokens_per_s")
            summary[f"{key}_flops_per_s"] = fps
            summary[f"{key}_efficiency"] = fps / peak
            if sp is not None:
                summary[f"{task}_speedup_vs_{mode}"] = sp
        # The headline: against the fastest TRL variant measured (the smallest of our ratios).
        summary[f"{task}_speedup"] = min(ratio(task, m) for m in trl_modes)
        summary[f"{task}_efficiency"] = median(task, "ours", "flops_per_s") / peak
    print("speed-up (median of {} pairs, trained tokens/s vs the fastest TRL variant): {}".format(
        args.pairs, ", ".join(f"{t} x{summary[f'{t}_speedup']:.2f}" for t in which)))
    summary["runs"] = runs
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
