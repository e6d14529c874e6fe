"""The episode runner against real Ray actors (HF engine with the tiny model, TextWorld env worker): best-of-n
reflections keep the candidate the rank function picks, and refuse to run without one."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil

import pytest
import ray
import torch

from agents.chat import ChatFormatter
from agents.model import TINY_MODEL, load_tokenizer, resolve_model
from agents.trajectory import REFLECTOR
from envs import make_env
from rollout.engine import SamplingParams
from rollout.engine_pool import ACTOR_DIED, EnginePool
from rollout.hf_engine import HFEngine
from rollout.runner import EpisodeRunner, RolloutSettings
from rollout.workers import EnvWorker, EpisodeLost

ENV_KWARGS = {"n_train": 2, "n_seen": 1, "n_unseen": 1}


@pytest.fixture(scope="module")
def actors():
    path = str(resolve_model(TINY_MODEL))
    make_env("textworld", **ENV_KWARGS).prepare()  # games built once, outside the actors
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        engine = ray.remote(HFEngine).options(num_cpus=0).remote(path, dtype="float32", threads=2, seed=0)
        worker = ray.remote(EnvWorker).options(num_cpus=0).remote("textworld", ENV_KWARGS, 2)
        yield engine, worker, ChatFormatter(load_tokenizer(path))
    finally:
        ray.shutdown()


# The runner's agent inputs in these tests (a run's come from its config's `agent` section).
AGENT = {"memory_size": 3, "max_context_tokens": 4096, "show_actions": True}


def _random_lora(model_path: str, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA adapter (q/v, r=8) for the tiny model, keyed as PEFT's state dict names them."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from agents.model import load_model

    peft = get_peft_model(load_model(model_path, "float32"), LoraConfig(r=8, lora_alpha=16,
                                                                        target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in get_peft_model_state_dict(peft).items()}


def _settings(candidates: int, temperature: float) -> RolloutSettings:
    return RolloutSettings(trials=2, **AGENT, actor=SamplingParams(0.0, max_new_tokens=8),
                           reflector=SamplingParams(temperature, max_new_tokens=8), max_steps=2,
                           reflection_candidates=candidates, seed=3)


def test_best_of_n_keeps_the_ranked_candidate(actors):
    engine, worker, formatter = actors
    offered: list[list] = []

    async def longest_text(candidates):  # any deterministic choice; here the longest decoded reflection
        offered.append(candidates)
        return max(range(len(candidates)), key=lambda i: (len(candidates[i].text), -i))

    runner = EpisodeRunner(EnginePool([engine]), [worker], 2, formatter, "textworld", _settings(3, 1.0), rank=longest_text)
    tasks = [(t.task_id, "train") for t in make_env("textworld", **ENV_KWARGS).tasks("train")]
    episodes, stats = asyncio.run(runner.run(tasks))
    reflections = [t.reflection for e in episodes for t in e.trials if t.reflection is not None]
    assert reflections and len(offered) == len(reflections)  # the tiny model never wins: one per episode
    for chosen in reflections:
        (candidates,) = [c for c in offered if any(g is chosen for g in c)]
        assert len(candidates) == 3 and all(c.role == REFLECTOR for c in candidates)
        assert len({tuple(c.prompt_ids) for c in candidates}) == 1  # all answer the same reflection prompt
        assert len(chosen.text) == max(len(c.text) for c in candidates)
    # Sampled at T = 1 with distinct seeds: the candidates differ, so the choice is a real choice.
    assert any(len({tuple(c.completion_ids) for c in cands}) > 1 for cands in offered)


def test_best_of_n_needs_a_ranker_and_sampling(actors):
    engine, worker, formatter = actors
    with pytest.raises(ValueError, match="rank function"):
        EpisodeRunner(EnginePool([engine]), [worker], 2, formatter, "textworld", _settings(3, 1.0))
    with pytest.raises(ValueError, match="temperature"):
        EpisodeRunner(EnginePool([engine]), [worker], 2, formatter, "textworld", _settings(3, 0.0), rank=lambda c: 0)


def test_a_killed_env_worker_is_restarted_and_its_episodes_replayed(actors):
    """SIGKILL the env worker's process while both of its slots are mid-episode: Ray restarts it, the runner replays
    the interrupted episodes from trial 1, and every task comes back exactly once, whole."""
    import os
    import signal


    engine, _, formatter = actors
    worker = ray.remote(EnvWorker).options(num_cpus=0, max_restarts=1).remote("textworld", ENV_KWARGS, 2)
    first_pid = ray.get(worker.pid.remote())
    task0 = make_env("textworld", **ENV_KWARGS).tasks("train")[0].task_id
    _, info = ray.get(worker.reset.remote(0, task0))
    settings = RolloutSettings(trials=2, **AGENT, actor=SamplingParams(0.0, max_new_tokens=4),
                               reflector=SamplingParams(0.0, max_new_tokens=4), max_steps=4, seed=1)
    runner = EpisodeRunner(EnginePool([engine]), [worker], 2, formatter, "textworld", settings, retry_on=ACTOR_DIED)
    tasks = [(t.task_id, "train") for t in make_env("textworld", **ENV_KWARGS).tasks("train")] * 2
    delivered = []

    async def rollout_and_kill():
        served = ray.get(engine.stats.remote())["requests"]
        job = asyncio.ensure_future(runner.run(tasks, on_episode=delivered.append))
        # An episode here is 2 trials x 4 steps + a reflection (the tiny model never wins): once 3 more requests
        # are served, both slots are inside their first episodes.
        while (await engine.stats.remote())["requests"] < served + 3:
            await asyncio.sleep(0.01)
        os.kill(first_pid, signal.SIGKILL)
        return await job

    episodes, stats = asyncio.run(rollout_and_kill())
    assert stats.episode_retries >= 1
    assert ray.get(worker.pid.remote()) != first_pid  # restarted in a new process
    with pytest.raises(EpisodeLost):  # a step of an episode begun before the restart is refused
        ray.get(worker.step.remote(0, "look", info["worker"]))
    assert [(e.task_id, e.split) for e in episodes] == tasks  # one per task, in order
    assert sorted(e.episode_id for e in delivered) == sorted(e.episode_id for e in episodes)  # each delivered once
    assert len({e.episode_id for e in episodes}) == len(tasks)
    assert all(len(e.trials) == 2 and all(len(t.steps) == 4 for t in e.trials) for e in episodes)  # whole


def test_an_unreachable_env_worker_is_waited_for_not_retried_at_once(actors):
    """A worker whose node was lost refuses calls until Ray places it again, which takes seconds: the runner waits
    for it to answer before replaying, so the outage costs one retry, not the whole retry budget (CI stop 26 lost
    a run this way: three immediate replays all refused)."""
    # Defined here, not at module level: Ray ships a local class to its workers by value.
    class _UnreachableWorker(EnvWorker):
        """Injected fault: for its first `outage_s` seconds every call fails the way a call to an actor on a lost node
        does before Ray has placed it again (ActorUnavailableError); afterwards it is an ordinary env worker."""

        def __init__(self, *args, outage_s: float) -> None:
            import time

            super().__init__(*args)
            self.until = time.monotonic() + outage_s
            self.refused = 0

        def _unreachable(self) -> None:
            import time

            if time.monotonic() < self.until:
                self.refused += 1
                raise ray.exceptions.ActorUnavailableError("injected: connection refused", None)

        def reset(self, *args, **kwargs):
            self._unreachable()
            return super().reset(*args, **kwargs)

        def pid(self) -> int:
            self._unreachable()
            return super().pid()

        def refusals(self) -> int:
            return self.refused

    engine, _, formatter = actors
    worker = ray.remote(_UnreachableWorker).options(num_cpus=0).remote("textworld", ENV_KWARGS, 1, outage_s=3.0)
    settings = RolloutSettings(trials=1, **AGENT, actor=SamplingParams(0.0, max_new_tokens=4),
                               reflector=SamplingParams(0.0, max_new_tokens=4), max_steps=2, seed=1)
    runner = EpisodeRunner(EnginePool([engine]), [worker], 1, formatter, "textworld", settings, retry_on=ACTOR_DIED,
                           max_episode_retries=1)
    tasks = [(t.task_id, "train") for t in make_env("textworld", **ENV_KWARGS).tasks("train")]
    episodes, stats = asyncio.run(runner.run(tasks))
    assert stats.episode_retries == 1  # one replay, after the outage
    assert ray.get(worker.refusals.remote()) > 2  # it was polled through the outage, not given up on
    assert [(e.task_id, e.split) for e in episodes] == tasks and all(len(e.trials[0].steps) == 2 for e in episodes)


def test_a_killed_engine_is_restarted_on_the_latest_adapter(actors, tiny_model_path):
    """SIGKILL the engine mid-rollout: Ray restarts it, the pool loads the adapter it last broadcast into the new
    process and resends the requests that died, and every episode finishes, each generation on version 1."""
    import os
    import signal

    from agents.adapters import AdapterUpdate

    _, worker, formatter = actors
    engine = ray.remote(HFEngine).options(num_cpus=0, max_restarts=1).remote(tiny_model_path, dtype="float32",
                                                                             threads=2, seed=0)
    first_pid = ray.get(engine.pid.remote())
    tensors = _random_lora(tiny_model_path, seed=0)
    pool = EnginePool([engine])
    pool.broadcast([AdapterUpdate("actor", 1, tensors)])
    settings = RolloutSettings(trials=2, **AGENT, actor=SamplingParams(0.0, max_new_tokens=4),
                               reflector=SamplingParams(0.0, max_new_tokens=4), max_steps=4, seed=1)
    runner = EpisodeRunner(pool, [worker], 2, formatter, "textworld", settings, retry_on=ACTOR_DIED)
    tasks = [(t.task_id, "train") for t in make_env("textworld", **ENV_KWARGS).tasks("train")] * 2

    async def rollout_and_kill():
        job = asyncio.ensure_future(runner.run(tasks))
        while sum(pool.stats.per_engine) < 3:  # both slots are inside their first episodes
            await asyncio.sleep(0.01)
        os.kill(first_pid, signal.SIGKILL)
        return await job

    episodes, stats = asyncio.run(rollout_and_kill())
    assert ray.get(engine.pid.remote()) != first_pid  # restarted in a new process
    assert pool.stats.resent >= 1 and pool.stats.restarts_seen == 1
    assert ray.get(engine.versions.remote()) == {"actor": 1, "reflector": 0}
    assert stats.episode_retries == 0  # env state survived: only the dead requests were sent again
    assert [(e.task_id, e.split) for e in episodes] == tasks
    assert all(len(e.trials) == 2 and all(len(t.steps) == 4 for t in e.trials) for e in episodes)
    assert {s.generation.version for e in episodes for t in e.trials for s in t.steps} == {1}


@pytest.mark.sciworld
@pytest.mark.skipif(shutil.which("java") is None or importlib.util.find_spec("scienceworld") is None,
                    reason="needs the scienceworld package and Java 17")
def test_a_killed_jvm_is_restarted_and_its_episode_replayed(actors, tmp_path):
    """SIGKILL the ScienceWorld JVM under an env worker mid-episode: the worker stays up, the episode is replayed
    from trial 1 on a new JVM, and every task comes back exactly once, whole."""
    import os
    import signal

    import psutil

    engine, _, formatter = actors
    kwargs = {"task_names": ["find-animal"], "per_task": {"train": 2}}
    worker = ray.remote(EnvWorker).options(num_cpus=0).remote("sciworld", kwargs, 1)
    worker_pid = ray.get(worker.pid.remote())
    tasks = [(t.task_id, "train") for t in make_env("sciworld", **kwargs).tasks("train")]
    settings = RolloutSettings(trials=2, **AGENT, actor=SamplingParams(0.0, max_new_tokens=4),
                               reflector=SamplingParams(0.0, max_new_tokens=4), max_steps=4, seed=1)
    runner = EpisodeRunner(EnginePool([engine]), [worker], 1, formatter, "sciworld", settings, retry_on=ACTOR_DIED)

    def jvms() -> list[int]:
        return [p.pid for p in psutil.Process(worker_pid).children(recursive=True) if "java" in p.name()]

    async def rollout_and_kill():
        served = ray.get(engine.stats.remote())["requests"]
        job = asyncio.ensure_future(runner.run(tasks))
        while (await engine.stats.remote())["requests"] < served + 3 or not jvms():  # inside the first episode
            await asyncio.sleep(0.01)
        (jvm,) = jvms()
        os.kill(jvm, signal.SIGKILL)
        episodes, stats = await job
        return jvm, episodes, stats

    killed, episodes, stats = asyncio.run(rollout_and_kill())
    assert stats.episode_retries == 1
    assert ray.get(worker.pid.remote()) == worker_pid and jvms() and killed not in jvms()  # same worker, new JVM
    assert [(e.task_id, e.split) for e in episodes] == tasks
    assert all(len(e.trials) == 2 and all(len(t.steps) == 4 for t in e.trials) for e in episodes)
    ray.kill(worker)


def test_requests_spread_over_engine_replicas(actors, tiny_model_path):
    """Concurrent requests go to the least-loaded replica: with two replicas both serve, and a broadcast reaches
    both."""
    from agents.adapters import AdapterUpdate

    first, _, _ = actors
    second = ray.remote(HFEngine).options(num_cpus=0).remote(tiny_model_path, dtype="float32", threads=1, seed=0)
    pool = EnginePool([first, second])
    greedy = SamplingParams(0.0, max_new_tokens=3)

    async def burst():
        return await asyncio.gather(*(pool.generate([1, 50 + i, 60], "reflector", greedy) for i in range(8)))

    results = asyncio.run(burst())
    assert len(results) == 8 and min(pool.stats.per_engine) >= 3  # 8 concurrent calls, split 4 / 4
    version = ray.get(first.versions.remote())["reflector"] + 1
    pool.broadcast([AdapterUpdate("reflector", version, _random_lora(tiny_model_path, seed=1))])
    assert [ray.get(e.versions.remote())["reflector"] for e in (first, second)] == [version, version]
    ray.kill(second)
