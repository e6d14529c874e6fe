"""End to end: the main job through real Ray actors (env workers, HF engine, DeepSpeed learner) on a few games."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import ray

from cluster.config import load_config
from cluster.pipeline import preflight, run_il
from cluster.run_dir import RunDir


@pytest.mark.slow
def test_main_job_with_tiny_model(tmp_path):
    cfg = load_config(None, [
        f"run_root={tmp_path}",
        "model.path=tiny-llama",
        "env.kwargs={n_train: 2, n_seen: 2, n_unseen: 2}",
        "eval.trials=2",
        "agent.actor.max_new_tokens=12",
        "agent.reflector.max_new_tokens=12",
        "learner.epochs=3",
        "learner.lr=0.01",  # a tiny random model needs a big step for its greedy output to move
        "rollout.env_workers=1",
        "rollout.envs_per_worker=3",
        "ray.num_cpus=2",
    ])
    prepared = preflight(cfg)
    run = RunDir.create(cfg)
    try:
        rows = run_il(cfg, run, prepared)
    finally:
        ray.shutdown()

    # The run directory holds what it should.
    path = run.path
    assert (path / "config.yaml").is_file()
    for role in ("actor", "reflector"):
        assert (path / "adapters" / role / "v1" / "adapter_model.safetensors").is_file()
    assert (path / "checkpoints" / "il" / "adapters.safetensors").is_file()
    results = json.loads((path / "eval" / "results.json").read_text())
    assert results == rows and (path / "eval" / "table.md").read_text().startswith("| method")
    methods = {(r["method"], r["split"]) for r in rows}
    for label in ("zero-shot ReAct", "zero-shot + reflection", "IL ReAct", "IL + reflection"):
        assert {(label, "seen"), (label, "unseen")} <= methods
    events = [m["event"] for m in run.metrics()]
    assert events.count("rollout") == 2 and "train" in events and "broadcast" in events and events[-1] == "done"

    # Trajectories: demos plus one episode per eval task and phase, all ids unique, readable with pandas.
    frame = pd.read_parquet(path / "trajectories")
    assert frame["episode_id"].is_unique
    assert set(frame["phase"]) == {"demos", "eval-zero-shot", "eval-il"}
    assert (frame["phase"] == "eval-zero-shot").sum() == (frame["phase"] == "eval-il").sum() == 4
    assert frame[frame["phase"] == "demos"]["success"].any()

    # The learner's update reached the engine: steps after IL record version 1 and greedy output changed.
    episodes = {e.episode_id: e for e in run.store.episodes()}
    by_phase = {p: [episodes[i] for i in frame[frame["phase"] == p]["episode_id"]]
                for p in ("eval-zero-shot", "eval-il")}
    versions = {p: {s.generation.version for e in eps for t in e.trials for s in t.steps}
                for p, eps in by_phase.items()}
    assert versions == {"eval-zero-shot": {0}, "eval-il": {1}}
    before = {e.task_id: e.trials[0].steps[0].generation for e in by_phase["eval-zero-shot"]}
    after = {e.task_id: e.trials[0].steps[0].generation for e in by_phase["eval-il"]}
    assert all(before[t].prompt_ids == after[t].prompt_ids for t in before)  # same first prompt, greedy
    assert any(before[t].completion_ids != after[t].completion_ids for t in before)
