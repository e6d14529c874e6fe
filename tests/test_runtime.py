"""Actor placement facts that hold on any node: an actor that reserved no GPU sees none."""

from __future__ import annotations

import os

import ray

from cluster.config import load_config
from cluster.runtime import actor_env


@ray.remote
def _visible() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_actors_without_a_gpu_reservation_see_no_gpu():
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a worker that holds zero GPUs, so on a GPU node a CPU learner
    or an env worker would see (and use) GPU 0. The runtime env of such an actor hides them; one that reserved a
    GPU gets the id Ray assigned. The GPU here is only a Ray resource: nothing runs on it."""
    cfg = load_config(None, [])
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        plain = ray.get(_visible.options(num_gpus=0).remote())
        hidden = ray.get(_visible.options(num_gpus=0, runtime_env=actor_env(cfg, 0)).remote())
        assigned = ray.get(_visible.options(num_gpus=1, runtime_env=actor_env(cfg, 1)).remote())
    finally:
        ray.shutdown()
    assert plain == os.environ.get("CUDA_VISIBLE_DEVICES")  # what Ray does by itself: nothing
    assert hidden == "" and assigned == "0"


def test_an_engine_that_cannot_serve_the_learners_adapters_fails_at_start(monkeypatch, tiny_model_path):
    """check_servable has every engine load the learner's untrained adapters: an engine built for other LoRA
    targets is a ConfigError naming learner.lora.target_modules, before anything trains."""
    import pytest

    from cluster.config import ConfigError
    from cluster.runtime import Actors, check_servable, learner_kwargs
    from learners.methods import MethodLearner
    from rollout.hf_engine import HFEngine

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # an in-process learner's
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(None, ["model.path=tiny-llama", "learner.lora.target_modules=[q_proj, v_proj]"])
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        learner = ray.remote(MethodLearner).options(num_cpus=0).remote(**learner_kwargs(cfg))
        engines = [ray.remote(HFEngine).options(num_cpus=0).remote(tiny_model_path, lora={**lora, "r": 8, "alpha": 16})
                   for lora in ({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj"]})]
        check_servable(cfg, Actors([], engines[:1], learner))  # the same targets: served
        with pytest.raises(ConfigError, match=r"learner.lora.target_modules=\['q_proj', 'v_proj'\]"):
            check_servable(cfg, Actors([], engines, learner))
    finally:
        ray.shutdown()


def test_actors_start_without_loading_bars_or_deepspeed_notices(tiny_model_path):
    """What a CPU actor printed at start and Ray forwarded to the driver's terminal: transformers' "Loading weights"
    bar, DeepSpeed's "Setting accelerator to CPU" warning and its "... built successfully". In the actors'
    runtime env (and with the learner's own start) none of them is printed; errors still would be."""
    import subprocess
    import sys
    from pathlib import Path

    start = ("from agents.model import load_model, resolve_dtype; from learners.learner import init_distributed; "
             f"load_model({tiny_model_path!r}, resolve_dtype('float32')); init_distributed()")

    # The bare start must not inherit the knobs under test from this process's environment.
    inherited = {k: v for k, v in os.environ.items()
                 if k not in {"HF_HUB_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR", "VLLM_LOGGING_LEVEL"}}

    def printed(env: dict[str, str]) -> str:
        done = subprocess.run([sys.executable, "-c", start], env={**inherited, **env}, capture_output=True,
                              text=True, cwd=Path(__file__).parents[1], timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    bare = printed({"CUDA_VISIBLE_DEVICES": ""})
    assert "Loading weights" in bare and "Setting accelerator to CPU" in bare  # what the knobs are for
    quiet = printed(actor_env(load_config(None, []), 0)["env_vars"])
    for noise in ("Loading weights", "Setting accelerator to CPU", "built successfully"):
        assert noise not in quiet


def test_ray_drops_only_its_auth_is_on_notice():
    """Ray warns at every local start that token auth is on by default: retrorl drops that notice, not the
    warning that auth is off."""
    import logging

    from ray._private.authentication import authentication_token_setup as auth

    from cluster.runtime import _quiet_ray_driver

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    auth.logger.addHandler(handler)
    try:
        _quiet_ray_driver()
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(handler)
    assert len(seen) == 1 and seen[0].startswith("Token authentication is disabled")
