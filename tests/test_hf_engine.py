"""HFEngine on the tiny random Llama: batching, log-probs, stops, per-role adapters, hot updates, Ray."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from agents.model import load_model
from agents.adapters import AdapterUpdate
from rollout.engine import GenerateResult, SamplingParams
from rollout.hf_engine import _STEP, HFEngine, _chunks, _sdpa_gqa, _Step

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
# Different lengths, so batches need left padding; the tiny model tends to repeat the last token under greedy.
PROMPTS = [[1, 520, 3311, 88], [1, 9, 27, 640, 12, 5000, 333, 42, 8, 16, 77], [1, 4242], [1, 700, 701, 702, 703, 704]]


@pytest.fixture(scope="module")
def model_path(tiny_model_path: str) -> str:  # tiny_model_path: tests/conftest.py
    return tiny_model_path


@pytest.fixture(scope="module")
def engine(model_path: str) -> HFEngine:
    return HFEngine(model_path, dtype="float32", threads=1)


def run(coro):
    return asyncio.run(coro)


async def one_by_one(engine: HFEngine, jobs: list[tuple[list[int], str, SamplingParams]]) -> list[GenerateResult]:
    return [await engine.generate(p, role, s) for p, role, s in jobs]


async def together(engine: HFEngine, jobs: list[tuple[list[int], str, SamplingParams]]) -> list[GenerateResult]:
    return list(await asyncio.gather(*(engine.generate(p, role, s) for p, role, s in jobs)))


def random_lora(engine: HFEngine, role: str, seed: int, scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(engine.model, adapter_name=role)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in state.items()}


def reference_peft(model_path: str, tensors: dict[str, torch.Tensor] | None):
    """A plain single-adapter PEFT model (or the bare model) to check the engine against."""
    model = load_model(model_path, torch.float32)
    if tensors is not None:
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, cfg, adapter_name="ref")
        set_peft_model_state_dict(model, tensors, adapter_name="ref")
    return model.eval()


def teacher_forced(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_and_seeded_batched_match_single(engine: HFEngine) -> None:
    jobs = [(p, "actor", GREEDY) for p in PROMPTS]
    jobs += [(p, "actor", SamplingParams(temperature=1.0, max_new_tokens=8, seed=i)) for i, p in enumerate(PROMPTS)]
    single, batched = run(one_by_one(engine, jobs)), run(together(engine, jobs))
    assert batched[0].stats["batch_size"] == len(jobs)
    for s, b in zip(single, batched):
        assert s.completion_ids == b.completion_ids
        assert s.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert s.version == b.version == 0


def test_logprobs_match_teacher_forced_forward(engine: HFEngine, model_path: str) -> None:
    reference = reference_peft(model_path, None)
    samplings = [
        SamplingParams(temperature=1.0, max_new_tokens=10, seed=1),
        SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=10, seed=2),  # log-probs stay the raw model's
        SamplingParams(temperature=0.0, max_new_tokens=10),
        SamplingParams(temperature=1.3, max_new_tokens=10, seed=3),
    ]
    results = run(together(engine, [(p, "reflector", s) for p, s in zip(PROMPTS, samplings)]))
    for prompt, res in zip(PROMPTS, results):
        assert len(res.logprobs) == len(res.completion_ids) == 10
        expected = teacher_forced(reference, prompt, res.completion_ids)
        assert torch.tensor(res.logprobs) == pytest.approx(expected, abs=1e-4)


def test_stop_tokens_and_length(engine: HFEngine) -> None:
    sampled = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    (full,) = run(one_by_one(engine, [(PROMPTS[1], "actor", sampled)]))
    assert full.finish_reason == "length" and len(full.completion_ids) == 12
    cut = next(i for i in range(1, 12) if full.completion_ids[i] not in full.completion_ids[:i])
    stop = full.completion_ids[cut]
    stopped_params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7, stop_token_ids=(stop, 99999))
    short = SamplingParams(temperature=1.0, max_new_tokens=3, seed=7)
    stopped, shortened = run(together(engine, [(PROMPTS[1], "actor", stopped_params), (PROMPTS[1], "actor", short)]))
    assert stopped.completion_ids == full.completion_ids[: cut + 1] and stopped.finish_reason == "stop"
    assert stopped.logprobs == pytest.approx(full.logprobs[: cut + 1], abs=1e-5)
    assert shortened.completion_ids == full.completion_ids[:3] and shortened.finish_reason == "length"


def test_eos_from_generation_config_stops(engine: HFEngine, model_path: str, tmp_path: Path) -> None:
    # The random model never picks the real eos, so declare the token it does pick an eos (a list, as some models do).
    first = run(one_by_one(engine, [(PROMPTS[2], "actor", GREEDY)]))[0].completion_ids[0]
    shutil.copytree(model_path, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], first]
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(config))
    res = run(one_by_one(HFEngine(str(tmp_path / "model"), dtype="float32"), [(PROMPTS[2], "actor", GREEDY)]))[0]
    assert res.completion_ids == [first] and res.finish_reason == "stop"


def test_roles_with_different_adapters_share_a_batch(model_path: str) -> None:
    engine = HFEngine(model_path, dtype="float32", threads=1)
    lora = {role: random_lora(engine, role, seed) for role, seed in (("actor", 1), ("reflector", 2))}
    for role in lora:
        engine.update_adapter(AdapterUpdate(role, 1, lora[role]))
    sampled = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    jobs = [(p, role, s) for p in PROMPTS[:3] for role in ("actor", "reflector") for s in (GREEDY, sampled)]
    alone, mixed = run(one_by_one(engine, jobs)), run(together(engine, jobs))
    assert mixed[0].stats["batch_size"] == len(jobs)
    for a, m in zip(alone, mixed):
        assert a.completion_ids == m.completion_ids and a.version == m.version == 1
        assert a.logprobs == pytest.approx(m.logprobs, abs=1e-5)
    assert mixed[0].completion_ids != mixed[2].completion_ids  # actor vs reflector greedy on the same prompt
    references = {role: reference_peft(model_path, t) for role, t in lora.items()}
    for (prompt, role, _), res in zip(jobs, mixed):  # each row's log-probs are its own adapter's
        expected = teacher_forced(references[role], prompt, res.completion_ids)
        assert torch.tensor(res.logprobs) == pytest.approx(expected, abs=1e-4)


def test_update_adapter_changes_only_its_role(model_path: str, tmp_path: Path) -> None:
    engine = HFEngine(model_path, dtype="float32", threads=1)
    jobs = [(PROMPTS[1], "actor", GREEDY), (PROMPTS[1], "reflector", GREEDY)]
    before = run(together(engine, jobs))
    tensors = random_lora(engine, "actor", seed=3)
    assert engine.update_adapter(AdapterUpdate("actor", 1, tensors)) == 1
    assert engine.versions() == {"actor": 1, "reflector": 0}
    after = run(together(engine, jobs))
    assert after[0].completion_ids != before[0].completion_ids and after[0].version == 1
    assert after[1].completion_ids == before[1].completion_ids and after[1].version == 0
    assert after[1].logprobs == pytest.approx(before[1].logprobs, abs=1e-6)
    # One role per batch (PEFT's active adapter, switched between batches) gives what the mixed batch gave.
    alone = run(one_by_one(engine, jobs + jobs))
    for a, m in zip(alone, after + after):
        assert a.completion_ids == m.completion_ids and a.logprobs == pytest.approx(m.logprobs, abs=1e-5)

    with pytest.raises(ValueError, match="stale"):
        engine.update_adapter(AdapterUpdate("actor", 0, tensors))
    with pytest.raises(ValueError, match="does not fit"):
        engine.update_adapter(AdapterUpdate("reflector", 1, {"nope.lora_A.weight": torch.zeros(1)}))

    # A PEFT adapter folder on disk (save_pretrained) loads the same tensors into the reflector.
    reference_peft(model_path, tensors).save_pretrained(tmp_path, selected_adapters=["ref"])
    folder = next(p.parent for p in tmp_path.rglob("adapter_model.safetensors"))
    assert engine.load_adapter_dir("reflector", 4, str(folder)) == 4
    actor, reflector = run(together(engine, jobs))
    assert reflector.version == 4 and reflector.completion_ids == actor.completion_ids
    assert reflector.logprobs == pytest.approx(actor.logprobs, abs=1e-5)


def test_update_waits_for_the_running_batch(model_path: str) -> None:
    engine = HFEngine(model_path, dtype="float32", threads=1)
    long = SamplingParams(temperature=0.0, max_new_tokens=150)

    async def scenario() -> tuple[list[GenerateResult], list[GenerateResult], dict]:
        first = asyncio.gather(*(engine.generate(p, "actor", long) for p in PROMPTS))
        while not engine._weights_lock.locked():
            await asyncio.sleep(0.001)  # until the batch is running
        engine.update_adapter(AdapterUpdate("actor", 1, random_lora(engine, "actor", seed=9)))
        staged = engine.stats()
        in_flight = await first
        return in_flight, await together(engine, [(p, "actor", long) for p in PROMPTS]), staged

    reference = run(one_by_one(HFEngine(model_path, dtype="float32", threads=1), [(p, "actor", long) for p in PROMPTS]))
    in_flight, later, staged = run(scenario())
    assert staged["pending_updates"] == 1  # staged, not loaded mid-batch
    assert [r.version for r in in_flight] == [0] * 4 and [r.version for r in later] == [1] * 4
    assert [r.completion_ids for r in in_flight] == [r.completion_ids for r in reference]
    assert [r.completion_ids for r in later] != [r.completion_ids for r in reference]


def test_sixteen_concurrent_callers_are_batched(model_path: str) -> None:
    engine = HFEngine(model_path, dtype="float32", threads=1, max_batch_size=8)
    jobs = [
        (PROMPTS[i % 4] + [100 + i], ("actor", "reflector")[i % 2], SamplingParams(temperature=1.0, max_new_tokens=4 + i % 5, seed=i))
        for i in range(16)
    ]
    singles = run(one_by_one(engine, jobs))
    start = engine.stats()
    results = run(together(engine, jobs))
    stats = engine.stats()
    assert stats["batches"] - start["batches"] == 2  # 16 callers, max_batch_size 8
    assert max(r.stats["batch_size"] for r in results) == 8 and stats["mean_batch_size"] > 1
    assert stats["tokens_generated"] == 2 * sum(len(r.completion_ids) for r in results)
    for (_, _, sampling), single, res in zip(jobs, singles, results):
        assert res.completion_ids == single.completion_ids and len(res.completion_ids) == sampling.max_new_tokens
        assert res.stats["queue_wait_s"] >= 0


def test_through_a_ray_actor(model_path: str, engine: HFEngine) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)  # workers get the driver's sys.path, so rollout/ imports
    try:
        actor = ray.remote(HFEngine).remote(model_path, dtype="float32", threads=1)
        jobs = [(p, "actor", SamplingParams(temperature=1.0, max_new_tokens=6, seed=i)) for i, p in enumerate(PROMPTS * 2)]
        results = ray.get([actor.generate.remote(p, role, s) for p, role, s in jobs])
        expected = run(one_by_one(engine, jobs))
        assert [r.completion_ids for r in results] == [e.completion_ids for e in expected]
        assert ray.get(actor.stats.remote())["mean_batch_size"] > 1
        tensors = random_lora(engine, "reflector", seed=4)
        assert ray.get(actor.update_adapter.remote(AdapterUpdate("reflector", 2, tensors))) == 2
        assert ray.get(actor.versions.remote()) == {"actor": 0, "reflector": 2}
        assert ray.get(actor.generate.remote(PROMPTS[0], "reflector", GREEDY)).version == 2
    finally:
        ray.shutdown()


def test_sampler_follows_temperature_and_top_p() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(len(logits))]
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.6)):
        params = [SamplingParams(temperature=temperature, max_new_tokens=1, top_p=top_p)] * len(logits)
        tokens, logprobs = HFEngine._sample(logits, params, gens)
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_p < 1:  # keep the smallest top set reaching top_p: here tokens 0 and 1 (0.56 + 0.21)
            probs = torch.where(torch.arange(5) < 2, probs, 0.0)
            probs /= probs.sum()
        freq = torch.bincount(tokens, minlength=5) / len(tokens)
        assert freq == pytest.approx(probs, abs=0.03)
        assert logprobs == pytest.approx(torch.log_softmax(logits[0], -1)[tokens], abs=1e-6)  # always the raw model's


# ---- prefix K/V reuse --------------------------------------------------------------------------------------------


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 30000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def conversations(engine: HFEngine, starts: list[list[int]], role: str = "actor", steps: int = 3):
    """Multi-turn episodes as the runner plays them: each step's prompt = last prompt + completion + new ids. Every
    step is batched with unrelated one-off requests of other lengths. Returns the (prompt, result) of each episode."""
    prompts, history = list(starts), [[] for _ in starts]
    hot = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=i) for i in range(len(starts))]
    sampling = [GREEDY if i % 2 else s for i, s in enumerate(hot)]
    for step in range(steps):
        others = [(rand_ids(5 + 17 * k, 100 * step + k), "reflector", GREEDY) for k in range(2)]
        jobs = [(p, role, s) for p, s in zip(prompts, sampling)] + others
        results = await together(engine, jobs)
        for i, (p, res) in enumerate(zip(prompts, results)):
            history[i].append((p, res))
            prompts[i] = p + res.completion_ids + rand_ids(7 + 5 * i + step, 10 * step + i)
    return history


def test_prefix_reuse_matches_full_prefill(model_path: str) -> None:
    reuse = HFEngine(model_path, dtype="float32", threads=1)
    plain = HFEngine(model_path, dtype="float32", threads=1, prefix_cache_tokens=0)
    starts = [rand_ids(n, n) for n in (40, 23, 61)]
    got, want = run(conversations(reuse, starts)), run(conversations(plain, starts))
    reference = reference_peft(model_path, None)
    for episode, expected in zip(got, want):
        for step, ((prompt, res), (_, exp)) in enumerate(zip(episode, expected)):
            assert res.completion_ids == exp.completion_ids
            assert res.logprobs == pytest.approx(exp.logprobs, abs=1e-4)
            expected_lps = teacher_forced(reference, prompt, res.completion_ids)
            assert torch.tensor(res.logprobs) == pytest.approx(expected_lps, abs=1e-4)
            if step:  # everything but the newly appended ids (and the last sampled token) came from the cache
                before, last = episode[step - 1]
                assert res.stats["prefix_hit_tokens"] == len(before) + len(last.completion_ids) - 1
    stats = reuse.stats()
    assert stats["prefix_hit_tokens"] > stats["prefilled_tokens"] / 2
    assert stats["prefix_hit_tokens"] + stats["prefilled_tokens"] == stats["prompt_tokens"]
    assert stats["prompt_tokens"] == plain.stats()["prompt_tokens"]
    assert plain.stats()["prefix_hit_tokens"] == 0 and plain.stats()["prefix_cache_entries"] == 0
    # An entry is replaced by the one extending it: one per conversation (+ the one-off requests still cached).
    assert stats["prefix_cache_entries"] == 3 + 2 * 3

    # A branch off a cached conversation reuses the shared part only: the longest common prefix.
    branch = got[2][1][0][:50] + rand_ids(20, 7)
    (a,), (b,) = (run(one_by_one(e, [(branch, "actor", GREEDY)])) for e in (reuse, plain))
    assert a.stats["prefix_hit_tokens"] == 50 and a.completion_ids == b.completion_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_adapter_update_invalidates_prefix_cache(model_path: str) -> None:
    engine = HFEngine(model_path, dtype="float32", threads=1)
    prompt = rand_ids(40, 1)
    jobs = [(prompt, "actor", GREEDY), (prompt, "reflector", GREEDY)]
    first = run(together(engine, jobs))
    tensors = random_lora(engine, "actor", seed=3)
    engine.update_adapter(AdapterUpdate("actor", 1, tensors))
    assert engine.stats()["prefix_cache_entries"] == 1  # the actor's entry is stale; the reflector's stays
    longer = [(p + r.completion_ids + rand_ids(9, 2), role, GREEDY) for (p, role, _), r in zip(jobs, first)]
    actor, reflector = run(together(engine, longer))
    assert actor.stats["prefix_hit_tokens"] == 0 and actor.version == 1
    assert reflector.stats["prefix_hit_tokens"] == len(prompt) + len(first[1].completion_ids) - 1
    expected = teacher_forced(reference_peft(model_path, tensors), longer[0][0], actor.completion_ids)
    assert torch.tensor(actor.logprobs) == pytest.approx(expected, abs=1e-4)


def test_prefix_cache_evicts_least_recently_used(model_path: str) -> None:
    engine = HFEngine(model_path, dtype="float32", threads=1, prefix_cache_tokens=100)
    a, b, c = (rand_ids(40, s) for s in (1, 2, 3))  # each entry: 40 + 8 - 1 = 47 tokens
    run(one_by_one(engine, [(a, "actor", GREEDY), (b, "actor", GREEDY)]))
    (hit,) = run(one_by_one(engine, [(a[:30] + rand_ids(5, 4), "actor", GREEDY)]))  # a branch: touches a's entry
    assert hit.stats["prefix_hit_tokens"] == 30
    assert engine.stats()["prefix_cache_tokens"] <= 100  # the branch's entry (34) evicted b, the least recent
    run(one_by_one(engine, [(c, "actor", GREEDY)]))  # evicts a: left are the branch and c
    got = run(together(engine, [(p + rand_ids(3, 5), "actor", GREEDY) for p in (a, b, c)]))  # lookups before stores
    assert [r.stats["prefix_hit_tokens"] for r in got] == [30, 0, 40]  # a's prefix survives in the branch's entry
    assert engine.stats()["prefix_cache_tokens"] <= 100
    run(one_by_one(engine, [(rand_ids(120, 6), "actor", GREEDY)]))  # over the budget: not stored
    assert engine.stats()["prefix_cache_tokens"] <= 100


def test_a_packed_prefill_computes_no_padding_and_matches_rows_served_alone(model_path: str) -> None:
    """Rows of very different lengths, two of them continuing cached conversations, under two adapters: the prefill
    is one packed pass per adapter over exactly the uncached tokens (no padding), then the batch decodes as one;
    each row gets the tokens and log-probs it gets alone, and its adapter's teacher-forced log-probs."""
    engine = HFEngine(model_path, dtype="float32", threads=1)
    engine.update_adapter(AdapterUpdate("reflector", 1, random_lora(engine, "reflector", 3)))
    history = [rand_ids(60, 7), rand_ids(45, 8)]
    first = run(together(engine, [(h, "actor", GREEDY) for h in history]))  # cached: prompt + completion - 1
    prompts = [h + f.completion_ids + rand_ids(9, 20 + k) for k, (h, f) in enumerate(zip(history, first))]
    prompts += [rand_ids(3, 1), rand_ids(90, 3), rand_ids(5, 2)]
    roles = ["actor", "reflector", "actor", "reflector", "reflector"]
    jobs = [(p, role, SamplingParams(temperature=1.0, max_new_tokens=8, seed=k) if k % 2 else GREEDY)
            for k, (p, role) in enumerate(zip(prompts, roles))]
    before = engine.stats()
    forwards: list[int] = []
    hook = engine.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        batched = run(together(engine, jobs))
    finally:
        hook.remove()
    stats = engine.stats()
    assert batched[0].stats["batch_size"] == len(jobs)
    hits = [b.stats["prefix_hit_tokens"] for b in batched]
    assert hits[0] == 60 + len(first[0].completion_ids) - 1 and hits[2:] == [0, 0, 0]
    assert hits[1] == 0  # the reflector has other weights: the actor's K/V is no use to it
    computed = stats["prefill_positions"] - before["prefill_positions"]
    assert computed == sum(len(p) for p in prompts) - sum(hits)  # no padding
    longest = max(len(b.completion_ids) for b in batched)
    assert len(forwards) == 2 + longest - 1  # a pass per adapter, then one shared decode loop
    assert stats["decode_steps"] - before["decode_steps"] == longest - 1

    alone = HFEngine(model_path, dtype="float32", threads=1)
    alone.update_adapter(AdapterUpdate("reflector", 1, random_lora(alone, "reflector", 3)))
    run(together(alone, [(h, "actor", GREEDY) for h in history]))
    single = run(one_by_one(alone, jobs))
    references = {"actor": reference_peft(model_path, None),
                  "reflector": reference_peft(model_path, random_lora(engine, "reflector", 3))}
    for (prompt, role, _), s, b in zip(jobs, single, batched):
        assert s.completion_ids == b.completion_ids
        assert s.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        expected = teacher_forced(references[role], prompt, b.completion_ids)
        assert torch.tensor(b.logprobs) == pytest.approx(expected, abs=1e-4)


def test_a_prompt_cached_but_its_last_token_prefills_one_token_over_its_cache(model_path: str) -> None:
    """The same prompt again (a retry, another reflection candidate): all but its last token come from the prefix
    cache, so the packed pass is a single token, which must still attend over the reused K/V. In bf16, where a
    one-token query takes the decode step's attention path otherwise."""
    engine = HFEngine(model_path, dtype="bfloat16", threads=1)
    plain = HFEngine(model_path, dtype="bfloat16", threads=1, prefix_cache_tokens=0)
    prompt = rand_ids(50, 11)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6, seed=4)
    run(one_by_one(engine, [(prompt, "actor", GREEDY)]))
    (again,), (want,) = (run(one_by_one(e, [(prompt, "actor", sampled)])) for e in (engine, plain))
    assert again.stats["prefix_hit_tokens"] == len(prompt) - 1
    assert again.completion_ids == want.completion_ids
    assert again.logprobs == pytest.approx(want.logprobs, abs=2e-2)  # bf16: the two passes round differently


def test_the_padded_prefill_for_other_attention_matches_the_packed_one(model_path: str) -> None:
    """A model whose attention the packed pass cannot use (not SDPA; sliding-window layers) prefills padded through
    transformers' own cache and masks: same tokens and log-probs, more positions computed."""
    packed = HFEngine(model_path, dtype="float32", threads=1)
    padded = HFEngine(model_path, dtype="float32", threads=1)
    padded._packed = False  # what the engine picks for such a model (tested here on the tiny Llama)
    starts = [rand_ids(n, n) for n in (40, 23, 61)]
    got, want = run(conversations(padded, starts)), run(conversations(packed, starts))
    for episode, expected in zip(got, want):
        for (_, res), (_, exp) in zip(episode, expected):
            assert res.completion_ids == exp.completion_ids
            assert res.logprobs == pytest.approx(exp.logprobs, abs=1e-4)
    assert packed.stats()["prefill_positions"] == packed.stats()["prefilled_tokens"]
    assert padded.stats()["prefill_positions"] > padded.stats()["prefilled_tokens"]


def test_a_prefix_shared_within_a_batch_is_computed_once(model_path: str) -> None:
    """Episodes' first steps share a system prompt, and n reflections share a whole prompt: the batch computes
    each shared part once and the rows reuse it, with the tokens and log-probs of a plain prefill."""
    engine = HFEngine(model_path, dtype="float32", threads=1)
    plain = HFEngine(model_path, dtype="float32", threads=1, prefix_cache_tokens=0)
    engine.forward_overhead = 10.0
    system, same = rand_ids(40, 1), rand_ids(30, 2)
    prompts = [system + rand_ids(5 + k, 10 + k) for k in range(4)] + [same, same, same]
    jobs = [(p, "actor", SamplingParams(temperature=1.0, max_new_tokens=6, seed=k)) for k, p in enumerate(prompts)]
    got, want = run(together(engine, jobs)), run(together(plain, jobs))
    for g, w in zip(got, want):
        assert g.completion_ids == w.completion_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert [g.stats["prefix_hit_tokens"] for g in got] == [40] * 4 + [29] * 3  # a row always feeds its last token
    stats = engine.stats()
    assert stats["shared_prefix_tokens"] == 40 + 30
    assert stats["prefilled_tokens"] == stats["prompt_tokens"] - stats["prefix_hit_tokens"] + 70
    assert stats["prefilled_tokens"] == 70 + sum(5 + k for k in range(4)) + 3 < plain.stats()["prefilled_tokens"]


def test_bf16_decode_attention_matches_fp32_attention_with_padding_and_gqa() -> None:
    """A bf16 decode step folds each K/V head's query heads into query rows (torch's enable_gqa path is ~7x slower
    there): every query head must still read its own K/V head, padded slots must not count, and the error must be
    bf16's, no more than torch's enable_gqa call makes against the same fp32 reference."""
    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, length, dim = 3, 6, 2, 40, 16
    q, k, v = (torch.randn(b, h, n, dim, generator=g) for h, n in ((heads, 1), (kv_heads, length), (kv_heads, length)))
    k[:, 1] *= 3  # K/V heads that differ in scale: a query head reading the wrong one is far off
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :25] = False  # left padding, as the engine's batches have
    mask[2, ..., :7] = False
    k.masked_fill_(~mask[:, :, 0, :, None], 1e3)  # garbage in padded slots: attending to them would dominate
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    lo = [t.to(torch.bfloat16) for t in (q, k, v)]
    torch_bf16 = F.scaled_dot_product_attention(*lo, attn_mask=mask, enable_gqa=True).transpose(1, 2).float()
    module = torch.nn.Module()
    ours = _sdpa_gqa(module, *lo, attention_mask=mask)[0]
    assert ours.dtype == torch.bfloat16 and ours.shape == (b, 1, heads, dim)
    ours_err = float((ours.float() - reference).abs().max())
    torch_err = float((torch_bf16 - reference).abs().max())
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf")).to(torch.bfloat16)
    assert torch.equal(_sdpa_gqa(module, *lo, attention_mask=additive)[0], ours)  # the other mask form: same result


@pytest.mark.parametrize("chunk_cost", [None, 0], ids=["one-chunk", "chunk-per-row"])
def test_rows_that_finish_at_different_steps_match_rows_served_alone(model_path: str, chunk_cost, monkeypatch) -> None:
    """Rows of one batch end at every step from 1 to 9 (their token caps), so a row leaves the cache at every step
    while the others go on: every row's tokens, log-probs and the K/V it leaves in the prefix cache must be what it
    gets alone. Decode steps read the batch's slots in one call, and (chunk_cost 0) row by row from each row's
    prompt on."""
    if chunk_cost is not None:
        monkeypatch.setattr("rollout.hf_engine._CHUNK_COST", chunk_cost)
    batched = HFEngine(model_path, dtype="float32", threads=1)
    alone = HFEngine(model_path, dtype="float32", threads=1)
    jobs = [(rand_ids(20 + 7 * k, 50 + k), "actor",
             SamplingParams(temperature=1.0 if k % 2 else 0.0, max_new_tokens=1 + k, seed=k)) for k in range(9)]
    got, want = run(together(batched, jobs)), run(one_by_one(alone, jobs))
    assert got[0].stats["batch_size"] == len(jobs)
    reference = reference_peft(model_path, None)
    for g, w, (prompt, _, s) in zip(got, want, jobs):
        assert g.completion_ids == w.completion_ids and len(g.completion_ids) == s.max_new_tokens
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert torch.tensor(g.logprobs) == pytest.approx(teacher_forced(reference, prompt, g.completion_ids), abs=1e-4)
    # The next turn of each row reuses the K/V its batch left in the prefix cache: same continuation as alone.
    follow = [(p + g.completion_ids + rand_ids(6, 90 + k), "actor", GREEDY) for k, ((p, _, _), g) in
              enumerate(zip(jobs, got))]
    got2, want2 = run(together(batched, follow)), run(one_by_one(alone, follow))
    for (p, _, _), g, w in zip(follow, got2, want2):
        assert g.stats["prefix_hit_tokens"] == len(p) - 6 - 1  # all but the new ids and the last sampled token
        assert g.completion_ids == w.completion_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert torch.tensor(g.logprobs) == pytest.approx(teacher_forced(reference, p, g.completion_ids), abs=1e-4)


def test_a_decode_step_reads_each_chunk_of_rows_from_its_first_used_slot_to_the_written_length(monkeypatch) -> None:
    """Rows of a decode step are cut into runs of consecutive rows, each read from the first slot its rows use to
    the slots written so far (neither the pads left of shorter prompts nor the unwritten tail): the same result as
    one masked call over the written slots, in fp32 and bf16, whatever the unwritten slots hold."""
    g = torch.Generator().manual_seed(1)
    b, heads, kv_heads, size, dim, length = 5, 6, 2, 60, 16, 47
    starts = [0, 3, 20, 24, 31]  # sorted longest prompt first, as the engine orders a batch
    q = torch.randn(b, heads, 1, dim, generator=g)
    k, v = (torch.randn(b, kv_heads, size, dim, generator=g) for _ in range(2))
    mask = torch.ones(b, 1, 1, size, dtype=torch.bool)
    for i, s0 in enumerate(starts):
        mask[i, ..., :s0] = False
        k[i, :, :s0] = 1e3  # finite garbage in the pads (a chunk may read them, masked)
    mask[..., length:] = False
    k[:, :, length:] = float("nan")  # never written: a read would make the output NaN
    v[:, :, length:] = float("nan")
    engine_mask = mask.clone()
    engine_mask[..., length:] = True  # the engine's mask leaves the tail to causality, which a decode step lacks
    reference = F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], attn_mask=mask[..., :length],
                                               enable_gqa=True).transpose(1, 2)
    assert _chunks(starts) == [(0, b, 0)]  # a few slots of padding cost less than another call
    monkeypatch.setattr("rollout.hf_engine._CHUNK_COST", 12)
    chunks = _chunks(starts)
    assert chunks == [(0, 2, 0), (2, 5, 20)]  # the two long rows apart from the three short ones
    module = torch.nn.Module()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        for step in (_Step(chunks, length), _Step([(0, b, 0)], length),
                     _Step([(i, i + 1, s0) for i, s0 in enumerate(starts)], length)):
            out = _sdpa_gqa(module, *(t.to(dtype) for t in (q, k, v)), attention_mask=engine_mask, **{_STEP: step})[0]
            assert out.shape == (b, 1, heads, dim) and not out.isnan().any()
            assert out.float() == pytest.approx(reference, abs=tol)


def test_a_sliding_window_model_decodes_through_transformers_own_cache(model_path: str, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A model with sliding-window layers (a tiny Qwen2, window 12, the real tokenizer): its cache layers keep a
    rolling window, not one slot per position, so the engine neither packs its prefill nor reuses K/V nor cuts a
    decode step's reads by slot (chunk per row here, which would cut the windows). Prompts longer than the window,
    batched: tokens and log-probs as the model's own forward gives them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    monkeypatch.setattr("rollout.hf_engine._CHUNK_COST", 0)
    for f in Path(model_path).iterdir():  # the tokenizer's files
        if f.name not in ("config.json", "generation_config.json") and not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    llama = json.loads((Path(model_path) / "config.json").read_text())
    config = Qwen2Config(vocab_size=llama["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=12, max_window_layers=0,
                         bos_token_id=llama.get("bos_token_id"), eos_token_id=llama.get("eos_token_id"))
    assert config.layer_types == ["sliding_attention"] * 2
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    engine = HFEngine(str(tmp_path), dtype="float32", threads=1)
    assert not engine._packed and engine.stats()["prefix_cache_tokens"] == 0
    prompts = [rand_ids(n, n) for n in (30, 17, 41)]
    got = run(together(engine, [(p, "actor", GREEDY) for p in prompts]))
    assert got[0].stats["batch_size"] == 3
    for prompt, g in zip(prompts, got):
        assert torch.tensor(g.logprobs) == pytest.approx(teacher_forced(model, prompt, g.completion_ids), abs=1e-4)


def test_next_turns_join_a_running_batch_only_within_its_longest_rows_steps(model_path: str) -> None:
    """A long reflection (40 tokens, its own adapter) decodes while short actor turns finish: each short turn is
    answered at once, and its caller's next turn (prompt + completion + new ids, longer than any prompt the batch
    started with) joins the running batch, its cached part from the prefix cache, instead of waiting for the
    reflection. A next turn whose cap would run past the reflection's last step waits for the next batch. Every
    row's tokens and log-probs are what it gets alone and under teacher forcing."""
    def make() -> HFEngine:
        e = HFEngine(model_path, dtype="float32", threads=1)
        e.update_adapter(AdapterUpdate("reflector", 1, random_lora(e, "reflector", 3)))
        return e

    engine, alone = make(), make()
    long_job = (rand_ids(30, 5), "reflector", SamplingParams(temperature=1.0, max_new_tokens=40, seed=1))
    shorts = [(rand_ids(50 + 10 * k, 10 + k), "actor",
               SamplingParams(temperature=1.0 if k % 2 else 0.0, max_new_tokens=4, seed=k)) for k in range(3)]
    next_caps = [4, 4, 60]  # the third would outlast the reflection
    finished: list[str] = []

    async def episode(k: int, job: tuple[list[int], str, SamplingParams]):
        first = await engine.generate(*job)
        follow = (job[0] + first.completion_ids + rand_ids(5, 40 + k), "actor",
                  SamplingParams(temperature=1.0, max_new_tokens=next_caps[k], seed=20 + k))
        second = await engine.generate(*follow)
        finished.append(f"short {k}")
        return first, follow, second

    async def main():
        long_task = asyncio.ensure_future(engine.generate(*long_job))
        long_task.add_done_callback(lambda _: finished.append("long"))
        episodes = await asyncio.gather(*(episode(k, j) for k, j in enumerate(shorts)))
        return await long_task, episodes

    before = engine.stats()
    long_res, episodes = run(main())
    stats = engine.stats()
    assert len(long_res.completion_ids) == 40
    assert finished.index("short 0") < finished.index("long") and finished.index("short 1") < finished.index("long")
    assert finished[-1] == "short 2"  # its own batch, after the reflection's
    assert stats["batches"] - before["batches"] == 2 and stats["requests"] - before["requests"] == 7
    last = episodes[2][2]
    # The reflection's steps, then the long next turn's alone: the two short next turns took no step of their own.
    assert stats["decode_steps"] - before["decode_steps"] == 39 + len(last.completion_ids) - 1
    jobs = [long_job]
    got = [long_res]
    for job, (first, follow, second) in zip(shorts, episodes):
        assert second.stats["prefix_hit_tokens"] == len(follow[0]) - 5 - 1  # the first turn's K/V, bar its last token
        jobs += [job, follow]
        got += [first, second]
    references = {"actor": reference_peft(model_path, None),
                  "reflector": reference_peft(model_path, random_lora(engine, "reflector", 3))}
    for (prompt, role, _), g, w in zip(jobs, got, run(one_by_one(alone, jobs))):
        assert g.completion_ids == w.completion_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert torch.tensor(g.logprobs) == pytest.approx(teacher_forced(references[role], prompt, g.completion_ids),
                                                         abs=1e-4)
