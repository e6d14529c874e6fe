"""Decode-step probe: how one forward of a decode step costs with the batch size, on this CPU.

The rollout's speed-up over a naive loop is bounded by how much cheaper a row of a batched decode step is than a
step of one row (prefill barely batches; README, "Where the time goes"). This times exactly that, with the HF
engine's attention (`rollout.hf_engine`'s GQA SDPA) and a static cache already holding `--context` positions per
row, for each dtype and batch size; medians over `--steps`.

  .venv/bin/python benchmarks/decode_step.py [--model smollm2-135m] [--dtypes float32,bfloat16] [--batch 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import StaticCache  # noqa: E402

from agents.model import load_model, resolve_model  # noqa: E402
from rollout import hf_engine  # noqa: E402


def step_ms(model: torch.nn.Module, batch: int, context: int, steps: int) -> float:
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    mask = torch.ones((batch, context + steps + 1), dtype=torch.long)
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                    logits_to_keep=torch.tensor([context - 1]))
        pos = torch.full((batch, 1), context)
        times = []
        for _ in range(steps):
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
            times.append(time.perf_counter() - start)
            pos = pos + 1
    return statistics.median(times[2:]) * 1e3  # the first steps warm up kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--context", type=int, default=800, help="cached positions per row (a second trial's prompt)")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model(args.model)
    rows = []
    for dtype in args.dtypes.split(","):
        model = load_model(path, getattr(torch, dtype)).eval()
        model.set_attn_implementation(hf_engine._ATTN)
        for batch in (int(b) for b in args.batch.split(",")):
            ms = step_ms(model, batch, args.context, args.steps)
            rows.append({"dtype": dtype, "batch": batch, "step_ms": round(ms, 1), "ms_per_row": round(ms / batch, 1)})
            print(f"{dtype:9s} batch {batch:3d}  step {ms:7.1f} ms  per row {ms / batch:6.1f} ms", flush=True)
    print(json.dumps({"benchmark": "decode_step", "model": args.model, "context": args.context,
                      "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
