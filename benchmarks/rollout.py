"""Rollout speed-up: the full concurrent rollout vs a naive loop (one env at a time, one generate call per step).

Both run the same tasks, model, sampling and max tokens through the same engine actor and episode code; the naive
loop has a single env slot, so episodes run one after another and every generate call is a batch of one.
Episodes are multi-trial by default (`--trials 2`: a failed first trial, a reflection, a second trial; the base
model rarely wins in 4 steps); `--trials 1` is plain ReAct. Sampling is the main job's (its actor and reflector
token caps) at T = 1, as in exploration. Every run starts with an empty prefix cache.
Runs are interleaved (full, naive, full, naive, ...) and the ratio is the median over pairs (BENCHMARKS.md).

  .venv/bin/python benchmarks/rollout.py [--pairs 3] [--episodes 16] [--trials 2] [--max-steps 4] [--model ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from agents.chat import ChatFormatter  # noqa: E402
from agents.model import load_tokenizer, resolve_model  # noqa: E402
from agents.trajectory import Episode  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.pipeline import rollout_settings  # noqa: E402
from rollout.engine import SamplingParams  # noqa: E402
from rollout.engine_pool import EnginePool  # noqa: E402
from rollout.hf_engine import HFEngine  # noqa: E402
from rollout.runner import EpisodeRunner  # noqa: E402
from rollout.workers import EnvWorker  # noqa: E402


# Engine counters shown per run (their change over the run): where the engine's time went.
ENGINE_KEYS = ("batches", "requests", "prompt_tokens", "prefilled_tokens", "prefill_positions", "decode_steps",
               "busy_s", "prefill_s", "decode_s")


def own_decode_steps(episode: Episode) -> int:
    """Decode steps the episode's generate calls take one after another: n tokens are a prefill and n - 1 steps."""
    gens = [step.generation for trial in episode.trials for step in trial.steps]
    gens += [trial.reflection for trial in episode.trials if trial.reflection is not None]
    return sum(len(g.completion_ids) - 1 for g in gens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="one cap for actor turns and reflections (default: the main job's, agent.actor / reflector)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--env-workers", type=int, default=2)
    args = ap.parse_args()

    model = str(resolve_model(args.model))
    formatter = ChatFormatter(load_tokenizer(model))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1")
    threads = os.cpu_count()
    engine = ray.remote(HFEngine).options(num_cpus=1).remote(model, dtype=args.dtype, threads=threads)
    env_kwargs = {"n_train": 0, "n_seen": args.episodes, "n_unseen": 0}
    per_worker = -(-args.episodes // args.env_workers)
    full_workers = [ray.remote(EnvWorker).options(num_cpus=0).remote("textworld", env_kwargs, per_worker)
                    for _ in range(args.env_workers)]
    naive_worker = ray.remote(EnvWorker).options(num_cpus=0).remote("textworld", env_kwargs, 1)
    tasks = [(t.task_id, "seen") for t in ray.get(naive_worker.tasks.remote("seen"))][: args.episodes]
    default = rollout_settings(load_config().agent, trials=args.trials, seed=0)  # the main job's agent
    # Sampled like RL exploration (T = 1), with the main job's token caps unless one is given; a step cap so the naive
    # loop finishes in minutes.
    def hot(role: SamplingParams) -> SamplingParams:
        return replace(role, temperature=1.0, max_new_tokens=args.max_new_tokens or role.max_new_tokens)

    settings = replace(default, max_steps=args.max_steps, actor=hot(default.actor), reflector=hot(default.reflector))
    full = EpisodeRunner(EnginePool([engine]), full_workers, per_worker, formatter, "textworld", settings)
    naive = EpisodeRunner(EnginePool([engine]), [naive_worker], 1, formatter, "textworld", settings)
    asyncio.run(full.run(tasks[:2]))  # warm-up: first-call costs off the clock

    rows = []
    for i in range(args.pairs):
        for name, runner in (("full", full), ("naive", naive)):
            ray.get(engine.release_memory.remote())  # every run starts cold: no prefix K/V from the one before
            before = ray.get(engine.stats.remote())
            episodes, stats = asyncio.run(runner.run(tasks))
            s = stats.as_dict()
            after = ray.get(engine.stats.remote())
            eng = {k: after[k] - before[k] for k in ENGINE_KEYS}
            # An episode's generate calls run one after another, so the full run can take no fewer decode steps than
            # its longest episode's own: how close decode_steps comes to it shows what batching left on the table.
            eng["longest_episode_steps"] = max(own_decode_steps(e) for e in episodes)
            rows.append({"pair": i, "mode": name, **{k: s[k] for k in
                         ("episodes", "env_steps", "tokens", "seconds", "tokens_per_s", "env_steps_per_s")},
                         "engine": eng})
            print(f"pair {i} {name:5s}  {s['tokens']:6d} tok  {s['env_steps']:4d} steps  {s['seconds']:7.1f}s  "
                  f"{s['tokens_per_s']:7.1f} tok/s  {s['env_steps_per_s']:6.2f} steps/s  engine: "
                  + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in eng.items()),
                  flush=True)
    ray.shutdown()

    def ratio(key: str) -> float:
        pairs = [(r, n) for r in rows if r["mode"] == "full" for n in rows if n["mode"] == "naive" and
                 n["pair"] == r["pair"]]
        return statistics.median(f[key] / n[key] for f, n in pairs)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode)

    print(f"\n{'':8s}{'tok/s':>10s}{'steps/s':>10s}")
    for mode in ("full", "naive"):
        print(f"{mode:8s}{median(mode, 'tokens_per_s'):10.1f}{median(mode, 'env_steps_per_s'):10.2f}")
    summary = {
        "benchmark": "rollout",
        "episodes": args.episodes,
        "concurrency": per_worker * args.env_workers,
        "model": args.model,
        "pairs": args.pairs,
        "trials": args.trials,
        "max_new_tokens": {"actor": settings.actor.max_new_tokens, "reflector": settings.reflector.max_new_tokens},
        "full_tokens_per_s": median("full", "tokens_per_s"),
        "naive_tokens_per_s": median("naive", "tokens_per_s"),
        "full_env_steps_per_s": median("full", "env_steps_per_s"),
        "naive_env_steps_per_s": median("naive", "env_steps_per_s"),
        "speedup_tokens_per_s": ratio("tokens_per_s"),
        "speedup_env_steps_per_s": ratio("env_steps_per_s"),
        "runs": rows,
    }
    print(f"speed-up (median of {args.pairs} pairs): tokens/s x{summary['speedup_tokens_per_s']:.2f}, "
          f"env steps/s x{summary['speedup_env_steps_per_s']:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
