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
