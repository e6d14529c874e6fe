"""RetroAct's and Retroformer's updates, the reward model and best-of-n through the whole pipeline, on a task the
tiny model can win: HotpotQA questions of one identical text whose answers are "yes" or "no" (no supporting
facts, so the expert plays the one step `finish[answer]`). IL cannot tell the questions apart, so it learns
a coin: sampled at temperature 1, some trials win and some lose, a fail followed by a win rates its reflection +1,
and every filter has something to pass.

The model is the tests' tiny Llama with two changes that let a trained adapter win at all (tiny-llama as built
cannot): the final norm scaled 30x, since with hidden size 64 and initializer range 0.02 no hidden state gives any
token a logit more than ~1.3 above the others (|logit| <= |E_t| * |norm(h)| ~ 0.16 * 8), so no completion is ever
likely; and a random embedding row for eos: it is the pad token, whose row HF initialises to zero
(transformers/modeling_utils.py:2327-2328 zeroes an embedding's `padding_idx` row at init), and with
tied embeddings a zero row pins eos's logit at 0, so a turn never ends once the other logits grow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from agents.model import TINY_MODEL, resolve_model
from cluster.config import load_config
from cluster.methods import run_method
from cluster.pipeline import preflight
from cluster.run_dir import RunDir

QUESTION = "Heads or tails: is the coin's answer yes or no?"


def _coin_questions(path: Path) -> Path:
    path.write_text(json.dumps([
        {"_id": f"coin{i:02d}", "question": QUESTION, "answer": "yes" if i % 2 else "no", "type": "comparison",
         "level": "easy", "supporting_facts": [], "context": [["Coin", ["The coin is fair."]]]}
        for i in range(10)]))
    return path


@pytest.fixture(scope="module")
def coin(tmp_path_factory) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("coin")
    src = resolve_model(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
        eos = model.model.embed_tokens.weight[tokenizer.eos_token_id]
        assert not eos.any()  # the zero row described above
        eos.copy_(torch.randn(eos.shape, generator=torch.Generator().manual_seed(0)) * model.config.initializer_range)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = _coin_questions(root / "coin.json")
    yield [
        f"model.path={root / 'model'}", "env.name=hotpotqa",
        f"env.kwargs={{data_file: {data}, n_train: 6, n_seen: 2, n_unseen: 2, n_valid: 0}}",
        "agent.actor.max_new_tokens=24", "agent.reflector.max_new_tokens=8", "agent.max_steps=1",
        "rollout.env_workers=1", "rollout.envs_per_worker=1", "ray.num_cpus=2", "eval.trials=2",
        "eval.splits=[seen]",
        # ~100 steps of IL on six identical prompts: the completion is learnt but for its coin (loss 33 -> 0.06)
        "learner.epochs=100", "learner.lr=0.05", "learner.role_epochs={}",
        # The coin task above is learnt in fp32; `auto` is bf16 on AVX512-BF16 / AMX CPUs, where three of these
        # tests failed (no rated reflection improved, an RL loss missing): pinned so they run alike on every CPU.
        "model.dtype=float32",
    ]
    ray.shutdown()  # the runs of this module share one local Ray (the first run starts it)


def _run(overrides: list[str]) -> RunDir:
    cfg = load_config(None, overrides)
    run = RunDir.create(cfg)
    run_method(cfg, run, preflight(cfg))
    return run


def _adapters(run: RunDir, checkpoint: str) -> dict[str, dict[str, torch.Tensor]]:
    flat = load_file(run.path / "checkpoints" / checkpoint / "adapters.safetensors")
    roles: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        role, _, name = key.partition("/")
        roles.setdefault(role, {})[name] = tensor
    return roles


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _logprob(model_path: str, adapter: Path, ids: list[int], start: int) -> float:
    """Sum of log pi(ids[t]) for t >= start under the base model with a published PEFT adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), adapter)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(lp[start - 1:].sum())


@pytest.fixture(scope="module")
def retroact_run(coin, tmp_path_factory) -> RunDir:
    return _run(coin + ["method=retroact", f"run_root={tmp_path_factory.mktemp('retroact')}", "retroact.rounds=1",
                        "retroact.trials=3", "retroact.lr=0.01", "retroact.epochs=2"])


@pytest.mark.slow
def test_retroact_update_trains_both_roles_toward_their_rewards(retroact_run, coin):
    run = retroact_run
    events = run.metrics()
    (round_,) = [e for e in events if e["event"] == "round"]
    assert 0 < round_["success"] < 1 and round_["rl_samples"] > 0  # wins and losses: the filters kept some
    (update,) = [e for e in events if e["event"] == "train" and e["phase"] == "retroact-1"]
    assert update["steps"] == 2 and {"loss/rl/actor", "loss/rl/reflector", "loss/il/actor"} <= update.keys()
    _assert_live_progress(events, "retroact-1", steps=2)

    episodes = [e for e in run.store.episodes() if e.source == "rollout"]
    explored = [e for e in episodes if e.split == "train"]
    wins = [t for e in explored for t in e.trials if t.success]
    rated = [t for e in explored for i, t in enumerate(e.trials[:-1]) if t.reflection and e.trials[i + 1].success]
    assert wins and rated  # actor samples with R = 1, reflections with R_{k+1} - R_k = 1
    # Both roles had RL samples: both adapters moved from the starting policy, and were published.
    start, after = _adapters(run, "sft"), _adapters(run, "retroact-1")
    assert not _same(start["actor"], after["actor"]) and not _same(start["reflector"], after["reflector"])
    broadcasts = [e["versions"] for e in events if e["event"] == "broadcast"]
    assert broadcasts[-1] == {"actor": 2, "reflector": 1}  # the reflector had no IL data: v0 (base) explored

    # The rewarded samples became likelier: each winning trial's completion under the actor before (v1) and after
    # (v2) the update, scored offline with PEFT on the ids the engine sampled.
    model_path = coin[0].split("=", 1)[1]
    adapters = run.path / "adapters" / "actor"
    for trial in wins:
        gen = trial.steps[0].generation
        ids, start_at = gen.prompt_ids + gen.completion_ids, len(gen.prompt_ids)
        assert _logprob(model_path, adapters / "v2", ids, start_at) > _logprob(model_path, adapters / "v1", ids,
                                                                                 start_at)


@pytest.mark.slow
def test_retroformer_trains_the_reflector_only_and_ranks_best_of_n(retroact_run, coin, tmp_path):
    """From the RetroAct run's IL checkpoint; the actor samples at temperature 1 so first trials sometimes fail
    and later ones win: reflections are rated +1 and 0, the reflector's policy gradient and the reward model train,
    and best-of-n ranks with it. The frozen actor's adapter stays bit-identical. (Which way the reflector moves is
    test_methods.py's test_reflector_pg_follows_ratings_with_kl_and_checkpoints_it: here the rated reflections
    share their text, the coin being independent of them, so their advantages cancel.)"""
    run = _run(coin + ["method=retroformer", f"run_root={tmp_path}", "agent.actor.temperature=1.0",
                       f"init.checkpoint={retroact_run.path / 'checkpoints' / 'sft'}", "retroformer.rounds=1",
                       "retroformer.trials=3", "retroformer.lr=0.01", "retroformer.reward_model=true",
                       "retroformer.best_of_n=2"])
    events = run.metrics()
    (round_,) = [e for e in events if e["event"] == "round"]
    assert round_["improved"] > 0 and round_["reflections"] > round_["improved"]  # ratings of +1 and of 0
    phases = [e["phase"] for e in events if e["event"] == "train"]
    assert phases == ["reflector-pg-1", "reward-model-1"]
    (pg,) = [e for e in events if e["event"] == "train" and e["phase"] == "reflector-pg-1"]
    _assert_live_progress(events, "reflector-pg-1", steps=pg["steps"])
    (reward_model,) = [e for e in events if e["event"] == "train" and e["phase"] == "reward-model-1"]
    assert reward_model["trained"] == 1
    start, after = _adapters(retroact_run, "sft"), _adapters(run, "retroformer-1")
    assert _same(start["actor"], after["actor"]) and not _same(start["reflector"], after["reflector"])
    # The checkpoint's adapters were served as v1 for the collection; the reflector's update as v2 for the eval.
    collected = [e for e in run.store.episodes() if e.split == "train" and e.source == "rollout"]
    assert {s.generation.version for e in collected for t in e.trials for s in t.steps} == {1}
    assert [e["versions"] for e in events if e["event"] == "broadcast"][-1] == {"reflector": 2}  # actor not resent
    rows = json.loads((run.path / "eval" / "results.json").read_text())
    assert {r["method"] for r in rows} >= {"Retroformer + reflection", "Retroformer best-of-2 + reflection"}


def _assert_live_progress(events: list[dict], phase: str, steps: int) -> None:
    """The update showed its live line: the driver recorded its progress up to the last step (`_wait` in
    cluster/pipeline.py writes these records beside the lines it prints)."""
    seen = [e for e in events if e["event"] == "train_progress" and e["phase"] == phase]
    assert seen and seen[-1]["step"] == seen[-1]["total"] == steps


class _Crash(Exception):
    """Injected: the driver dies right after storing an episode."""


@pytest.mark.slow
@pytest.mark.parametrize("method,stage,update,extra", [
    ("retroformer", "collect", "reflector-pg", ["agent.actor.temperature=1.0", "retroformer.lr=0.01"]),
    ("retroact", "explore", "retroact", ["retroact.lr=0.01"]),
    ("retroact", "explore", "retroact", ["retroact.lr=0.01", "rollout.mode=async"]),
], ids=["retroformer", "retroact", "retroact-async"])
def test_an_interrupted_run_resumes_without_losing_or_repeating(retroact_run, coin, tmp_path, monkeypatch,
                                                                method, stage, update, extra):
    """Two rounds from the RetroAct run's IL checkpoint; the driver dies right after the second round's first
    episode is stored. `retrorl train --resume` keeps every stored episode, plays only the missing ones, loads
    round 1's checkpoint instead of training it again, trains round 2 and finishes."""
    from cluster.cli import main
    from rollout.store import TrajectoryStore

    append = TrajectoryStore.append

    def crash_after_first_of_round_2(self, episodes, phase):
        written = append(self, episodes, phase=phase)
        if phase == f"{stage}-2":
            raise _Crash(phase)
        return written

    overrides = coin + [f"method={method}", f"run_root={tmp_path}", f"{method}.rounds=2", f"{method}.trials=3",
                        f"init.checkpoint={retroact_run.path / 'checkpoints' / 'sft'}", *extra]
    monkeypatch.setattr(TrajectoryStore, "append", crash_after_first_of_round_2)
    with pytest.raises(_Crash):
        _run(overrides)
    monkeypatch.setattr(TrajectoryStore, "append", append)
    (folder,) = tmp_path.iterdir()
    before = {(p, e.episode_id) for p, e in RunDir(folder).store.phased_episodes()}
    assert sum(p == f"{stage}-2" for p, _ in before) == 1 and f"{update}-1" in {
        e.get("phase") for e in RunDir(folder).metrics() if e["event"] == "train"}

    assert main(["train", "--resume", str(folder)]) == 0
    run = RunDir(folder)
    after = [(p, e) for p, e in run.store.phased_episodes()]
    assert before <= {(p, e.episode_id) for p, e in after}  # nothing stored before the crash is lost
    per_phase = {}
    for p, e in after:
        per_phase.setdefault(p, []).append(e.task_id)
    assert all(len(ids) == len(set(ids)) for ids in per_phase.values())  # no task played twice in a phase
    assert len(per_phase[f"{stage}-1"]) == len(per_phase[f"{stage}-2"]) == 6  # n_train
    events = run.metrics()
    trained = [e["phase"] for e in events if e["event"] == "train"]
    assert trained.count(f"{update}-1") == 1 and trained.count(f"{update}-2") == 1  # round 1 not trained again
    assert [e["checkpoint"].rsplit("/", 1)[-1] for e in events if e["event"] == "resume"] == [f"{method}-1"]
    assert [e["event"] for e in events].count("done") == 1
