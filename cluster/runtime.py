"""Starting Ray and placing the actors: env workers, engine replicas and the learner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray

from agents.model import cache_dir
from cluster.config import Config


def init_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address or RAY_ADDRESS (set by `ray job submit`), else start a local Ray
    bound to 127.0.0.1 only."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        include_dashboard=cfg.ray.dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )


def actor_env(cfg: Config) -> dict[str, Any]:
    """Environment every retrorl actor gets, so caches resolve to the same folders on every node."""
    cache = str(cache_dir(cfg.model.cache_dir))
    return {"env_vars": {
        "RETRORL_CACHE": cache,
        "TORCH_EXTENSIONS_DIR": os.path.join(cache, "torch_extensions"),
        # glibc keeps freed buffers per arena; few arenas keep the engine's churn of K/V buffers from piling up.
        "MALLOC_ARENA_MAX": "2",
    }}


@dataclass
class Actors:
    workers: list[Any]
    engines: list[Any]
    learner: Any | None

    def shutdown(self) -> None:
        for handle in self.workers + self.engines + ([self.learner] if self.learner else []):
            ray.kill(handle)


def start_actors(cfg: Config, model_path: str, run_path: str, with_learner: bool) -> Actors:
    from learners.methods import MethodLearner
    from rollout.hf_engine import HFEngine
    from rollout.workers import EnvWorker

    runtime_env = actor_env(cfg)
    lora = cfg.learner.lora.model_dump()
    workers = [
        ray.remote(EnvWorker)
        .options(num_cpus=0, runtime_env=runtime_env)
        .remote(cfg.env.name, cfg.env.kwargs, cfg.rollout.envs_per_worker)
        for _ in range(cfg.rollout.env_workers)
    ]
    engines = [
        ray.remote(HFEngine)
        .options(num_cpus=cfg.rollout.engine_cpus, runtime_env=runtime_env)
        .remote(
            model_path,
            dtype=cfg.rollout.dtype or cfg.model.dtype,
            lora=lora,
            threads=cfg.rollout.threads or os.cpu_count(),
            max_batch_size=cfg.rollout.max_batch_size,
            seed=cfg.seed,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        for _ in range(cfg.rollout.engines)
    ]
    learner = None
    if with_learner:
        learner = (
            ray.remote(MethodLearner)
            .options(num_cpus=cfg.learner.cpus, runtime_env=runtime_env)
            .remote(
                model_path,
                dtype=cfg.model.dtype,
                lora_r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora["dropout"],
                lora_target_modules=lora["target_modules"],
                shared_adapter=cfg.learner.shared_adapter,
                zero_stage=cfg.learner.zero_stage,
                gradient_clipping=cfg.learner.grad_clip,
                lr=cfg.learner.lr,
                seed=cfg.seed,
                threads=cfg.learner.threads or os.cpu_count(),
                output_dir=run_path,
                max_len=cfg.learner.max_sample_tokens,
                kl_coef=cfg.retroformer.kl_coef,
                target_kl=cfg.retroformer.target_kl,
                kl_horizon=cfg.retroformer.kl_horizon,
            )
        )
    # Fail here, with the actor's own error, if an env or a model cannot be built.
    ray.get([w.num_envs.remote() for w in workers] + [e.versions.remote() for e in engines])
    return Actors(workers, engines, learner)
