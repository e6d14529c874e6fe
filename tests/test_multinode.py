"""The GPU-cluster route on a simulated multi-node cluster: a loopback head that offers no CPUs (so the engine and
the learner must run on worker nodes) and worker nodes that do not see the head's cache or run root (each has its
own empty tmpfs there), as on a real cluster where the head's disk is not the workers'.

A real `retrorl train` job is submitted with `ray job submit`; every artefact must end up in the run directory on the
head, and the run must be resumable from there after the worker nodes are gone."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from envs.cache import resolve_cache_dir
from raysim import SimCluster

JOB = ["retrorl", "train", "--method", "eto", "--set", "model.path=tiny-llama",
       "--set", "env.kwargs={n_train: 2, n_seen: 2, n_unseen: 1}", "--set", "eval.trials=2",
       "--set", "agent.max_steps=2", "--set", "rollout.env_workers=1", "--set", "rollout.envs_per_worker=2",
       "--set", "learner.epochs=1", "--set", "learner.role_epochs={}", "--set", "eto.iterations=2",
       "--set", "eto.epochs=1"]  # two ETO rounds and full-length generations: seconds of work after SFT


def _wait_for(folder: Path, pattern: str, job, sim: SimCluster, timeout: float = 600) -> Path:
    """The first file under `folder` matching `pattern`; fails with the job's log if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if job.poll() is not None:
            raise AssertionError(f"the job ended before {pattern} appeared:\n{sim.log_tail('job')}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {folder} after {timeout}s:\n{sim.log_tail('job')}")


def _driver(runs: Path, job, timeout: float = 300):
    """The job's driver process on the head (`retrorl train ... run_root=<runs>`), once it runs."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if f"run_root={runs}" in cmdline and any(part.endswith("retrorl") for part in cmdline):
                return proc
        time.sleep(0.2)
    raise AssertionError("the job's driver process did not start")


@pytest.mark.slow
def test_a_job_on_worker_nodes_with_their_own_disks_lands_on_the_head_and_resumes_there(tmp_path, tiny_model_path):
    import subprocess
    import sys

    runs = tmp_path / "runs"
    cache = resolve_cache_dir()
    # DeepSpeed's compiled comm op is a build cache, not something the driver hands over: the nodes share the
    # head's copy (at another path) so the test does not compile it again for a minute.
    extensions = Path(tempfile.mkdtemp(prefix="rrext-", dir="/tmp"))
    sim = SimCluster(tmp_path, head_cpus=0, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    job_id = f"retrorl-{uuid.uuid4().hex[:8]}"
    try:
        sim.start_head()
        for _ in range(2):  # 1 CPU each: the engine and the learner land on different nodes
            sim.add_node(cpus=1, hide=[cache, tmp_path], keep={cache / "torch_extensions": extensions}, cores="0")
        job = sim.submit([*JOB, "--set", f"run_root={runs}"], wait=False, submission_id=job_id)
        driver = _driver(runs, job)
        # Once SFT's checkpoint is on the head, the driver is held and the worker nodes go away (an autoscaler
        # terminating them, a spot loss); then the job dies too. Everything written so far must be on the head.
        checkpoint = _wait_for(runs, "*/checkpoints/sft/learner.json", job, sim)
        driver.suspend()
        for node in sim.nodes:
            sim.kill_node(node)
        driver.kill()
        sim.stop_job(job_id)
    finally:
        sim.stop()
    log = sim.log_tail("job")
    run = checkpoint.parents[2]
    assert (run / "config.yaml").is_file() and (run / "versions.json").is_file(), log
    assert any((run / "trajectories").glob("*.parquet")), log
    for role in ("actor", "reflector"):  # the SFT adapters the learner published, written on the head
        assert (run / "adapters" / role / "v1" / "adapter_model.safetensors").is_file(), log
        assert json.loads((run / "adapters" / role / "v1" / "adapter_config.json").read_text())["r"] == 8
    assert {p.name for p in (run / "checkpoints" / "sft").iterdir()} >= {
        "adapters.safetensors", "optimizer.pt", "rng.pt", "learner.json"}, log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "done" not in {r["event"] for r in records}, "the job finished before its nodes were killed"
    (learner,) = [r for r in records if r["event"] == "learner"]
    # Threads come from the learner's own node (one core there), not from the head's core count.
    assert learner["torch_threads"] == 1

    # --resume from the head, the worker nodes gone: a local Ray on this machine finishes the run from the
    # head's copy of the SFT checkpoint.
    env = {k: v for k, v in sim.env.items()
           if k not in ("RAY_ADDRESS", "TORCH_EXTENSIONS_DIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    resumed = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--resume", str(run)],
                             cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                             timeout=900)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "[resume] sft: done before the restart" in out, out[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "done"
    assert [r.get("phase") for r in records if r["event"] == "train"].count("sft") == 1  # not trained again
    assert all((run / "checkpoints" / name / "learner.json").is_file() for name in ("eto-1", "eto-2"))
    versions = sorted(p.name for p in (run / "adapters" / "actor").iterdir())
    assert len(versions) >= 3 and all((run / "adapters" / "actor" / v / "adapter_config.json").is_file()
                                      for v in versions)  # SFT's, the republished SFT, the ETO rounds'
    rows = json.loads((run / "eval" / "results.json").read_text())
    assert {r["split"] for r in rows} == {"seen", "unseen"}
    episodes = pd.read_parquet(run / "trajectories")
    assert not episodes["episode_id"].duplicated().any()
    assert (episodes["phase"] == "demos").sum() == 2 * 2  # demos stored once: expert + failed attempt per game


TRAIN_GAMES = 6


@pytest.mark.slow
def test_a_worker_node_lost_mid_run_loses_and_repeats_no_episode(tmp_path, tiny_model_path):
    """The node under the engine replica dies mid-run (its raylet and workers SIGKILLed): Ray places the replica's
    bundle on a spare node and restarts it there, the episodes it was serving are replayed, and the run finishes
    with each task's episode stored exactly once per phase."""
    runs = tmp_path / "runs"
    extensions = Path(tempfile.mkdtemp(prefix="rrext-", dir="/tmp"))
    sim = SimCluster(tmp_path, head_cpus=0, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    cache = resolve_cache_dir()
    try:
        sim.start_head()
        for _ in range(3):  # the engine, the learner and a spare
            sim.add_node(cpus=1, hide=[cache, tmp_path], keep={cache / "torch_extensions": extensions})
        # Six training games played one at a time, up to six steps each: the first round's exploration takes
        # seconds, and the node goes once its first episode is stored (demos take one part per game before it).
        job = sim.submit([*JOB, "--set", f"run_root={runs}", "--set", "agent.max_steps=6",
                          "--set", f"env.kwargs={{n_train: {TRAIN_GAMES}, n_seen: 2, n_unseen: 1}}",
                          "--set", "rollout.envs_per_worker=1"], wait=False)
        _wait_for(runs, f"*/trajectories/part-{TRAIN_GAMES:06d}.parquet", job, sim)
        (engine,) = sim.actors("HFEngine")
        (lost,) = [p for p in sim.nodes if sim.node_ids[p.pid] == engine["node_id"]]
        sim.kill_node(lost)
        job.wait(timeout=600)
        assert job.returncode == 0 and "succeeded" in sim.log_tail("job"), sim.log_tail("job")
        (after,) = sim.actors("HFEngine")
    finally:
        sim.stop()
    assert after["node_id"] != engine["node_id"] and after["num_restarts"] >= 1
    (run,) = runs.iterdir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "done"
    episodes = pd.read_parquet(run / "trajectories")
    assert not episodes["episode_id"].duplicated().any()
    per_task = episodes.groupby(["phase", "task_id"]).size()
    assert per_task["explore-1"].tolist() == [1] * TRAIN_GAMES and per_task["explore-2"].tolist() == [1] * TRAIN_GAMES
    assert per_task["eval-eto"].tolist() == [1] * 3  # n_seen 2 + n_unseen 1
