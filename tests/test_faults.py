"""Faults injected on purpose into real processes: the learner actor killed mid-update, and the driver killed
mid-run then continued with `retrorl train --resume` (or `retrorl eval --resume`)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from agents.adapters import read_folder
from cluster.config import load_config
from cluster.pipeline import Session, preflight
from cluster.run_dir import RunDir
from learners.batching import il_samples

TINY = [
    "model.path=tiny-llama",
    "env.kwargs={n_train: 2, n_seen: 1, n_unseen: 1}",
    "agent.actor.max_new_tokens=32",  # the longest expert turn fits (preflight checks it)
    "agent.reflector.max_new_tokens=12",
    "rollout.env_workers=1",
    "rollout.envs_per_worker=2",
    "ray.num_cpus=2",
]


def _kill_when_busy(pid: int, cpu_s: float) -> threading.Thread:
    """SIGKILL `pid` once it has used `cpu_s` more CPU seconds, i.e. while it is inside the call just made."""
    proc = psutil.Process(pid)
    start = sum(proc.cpu_times()[:2])

    def watch() -> None:
        while sum(proc.cpu_times()[:2]) - start < cpu_s:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_a_killed_learner_is_restored_from_its_checkpoint(tmp_path):
    """Kill the learner inside an IL update: Ray restarts it, the session loads the last checkpoint, replays what
    came after it and makes the call again. The result is bit-identical to the same call from the same checkpoint
    without a kill: adapters, optimizer, step and RNG were all restored."""
    cfg = load_config(None, TINY + [f"run_root={tmp_path}", "method=sft"])
    session = Session(cfg, RunDir.create(cfg), preflight(cfg))
    try:
        samples = il_samples(session.demos(session.tasks("train", None)))
        session.call("train_il", samples, epochs=1, lr=0.01, max_tokens_per_batch=4096)
        checkpoint = session.checkpoint("before")
        session.call("set_reference", ["reflector"])  # state changed after the checkpoint: must be replayed
        first_pid = session.call("pid")
        killer = _kill_when_busy(first_pid, cpu_s=1.0)
        killed = session.call("train_il", samples, epochs=8, lr=0.01, max_tokens_per_batch=4096)
        killer.join(timeout=1)
        assert not killer.is_alive()
        assert session.learner_restarts == 1 and session.call("pid") != first_pid
        after_kill = {r: session.call("adapter_tensors", r) for r in ("actor", "reflector")}

        session.call("load_checkpoint_files", read_folder(checkpoint))
        session.call("set_reference", ["reflector"])
        clean = session.call("train_il", samples, epochs=8, lr=0.01, max_tokens_per_batch=4096)
        same = [k for k in clean if "loss" in k or k in ("steps", "tokens")]
        assert same and {k: killed[k] for k in same} == {k: clean[k] for k in same}
        for role, tensors in after_kill.items():
            again = session.call("adapter_tensors", role)
            assert all(torch.equal(tensors[k], again[k]) for k in again)
        restarts = [e for e in session.run.metrics() if e["event"] == "learner_restart"]
        assert [e["replayed"] for e in restarts] == [["load_checkpoint_files", "set_reference"]]
    finally:
        session.close()
        ray.shutdown()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (its local Ray: GCS, raylet, actors), like a crashed machine."""
    proc = psutil.Process(pid)
    for p in proc.children(recursive=True) + [proc]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _phases(run_path) -> dict[str, list]:
    from rollout.store import TrajectoryStore

    out: dict[str, list] = {}
    for phase, episode in TrajectoryStore(run_path / "trajectories").phased_episodes():
        out.setdefault(phase, []).append(episode)
    return out


def _run_until(tmp_path: Path, args: list[str], ready, command: str = "train") -> Path:
    """`retrorl <command>` with `args` in a subprocess, SIGKILLed with its local Ray (`_kill_tree`) as soon as
    `ready(run_dir)` holds; returns the run directory."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cluster.cli", command]
    first = subprocess.Popen(cmd + [a for kv in args for a in ("--set", kv)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            assert first.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            runs = list(tmp_path.iterdir())
            if runs and ready(runs[0]):
                break
            time.sleep(0.05)
        _kill_tree(first.pid)
    finally:
        first.kill()
        first.wait()
    (run,) = runs
    return run


@pytest.mark.slow
def test_a_killed_driver_resumes_without_losing_or_repeating(tmp_path):
    """ETO with two iterations; the driver (and its local Ray) is SIGKILLed right after the first episode of the
    second exploration is stored. `retrorl train --resume RUN_DIR` keeps every stored episode, plays only the
    missing one, does not redo iteration 1 (its checkpoint is loaded instead), and finishes the run."""
    import subprocess
    import sys

    from cluster.run_dir import read_metrics

    args = TINY + [f"run_root={tmp_path}", "method=eto", "rollout.envs_per_worker=1", "eval.trials=2",
                   "eto.iterations=2", "eto.lr=[0.01]", "eto.epochs=1", "learner.epochs=1", "learner.lr=0.01",
                   "learner.role_epochs={}"]
    cmd = [sys.executable, "-m", "cluster.cli", "train"]
    run = _run_until(tmp_path, args, lambda run: (run / "checkpoints" / "eto-1" / "learner.json").is_file()
                     and len(_phases(run).get("explore-2", [])) >= 1)
    before = _phases(run)
    assert len(before["explore-1"]) == 2 and len(before["explore-2"]) == 1 and "eval-eto" not in before
    records = read_metrics(run / "metrics.jsonl")
    assert [r["round"] for r in records if r["event"] == "round"] == [1]

    resumed = subprocess.run(cmd + ["--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "explore-2] resumed: 1 of 2 episodes already stored" in resumed.stdout + resumed.stderr

    after = _phases(run)
    for phase, episodes in before.items():  # nothing lost: every episode stored before the kill is still there
        assert {e.episode_id for e in episodes} <= {e.episode_id for e in after[phase]}
    assert {p: len(v) for p, v in after.items() if p != "demos"} == {"explore-1": 2, "explore-2": 2, "eval-eto": 2}
    assert len(after["demos"]) == len(before["demos"])  # demos were complete: none played again
    keys = [(p, e.task_id, e.split) for p, v in after.items() if p != "demos" for e in v]
    assert len(keys) == len(set(keys))  # no duplicate episode in the store
    records = read_metrics(run / "metrics.jsonl")
    events = [r["event"] for r in records]
    assert [r["round"] for r in records if r["event"] == "round"] == [1, 2]  # iteration 1 not repeated
    assert [r["phase"] for r in records if r["event"] == "train"] == ["sft", "dpo-1", "dpo-2"]
    assert [r["checkpoint"].rsplit("/", 1)[-1] for r in records if r["event"] == "resume"] == ["eto-1"]
    assert events.count("done") == 1 and (run / "eval" / "results.json").is_file()

    again = subprocess.run(cmd + ["--resume", str(run)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "this run finished" in again.stderr


@pytest.mark.slow
def test_a_killed_evaluation_continues_with_eval_resume(tmp_path):
    """`retrorl eval` of the base model, SIGKILLed with its Ray once its first episode is stored (one env slot:
    the second task has not finished). `retrorl eval --resume RUN_DIR` keeps that episode, plays only the other
    task and writes the table; `train --resume` names the command that continues it; a finished one is refused."""
    import subprocess
    import sys

    from cluster.run_dir import read_metrics

    args = TINY + [f"run_root={tmp_path}", "rollout.envs_per_worker=1", "eval.trials=2"]
    run = _run_until(tmp_path, args, lambda run: len(_phases(run).get("eval-base", [])) >= 1, command="eval")
    (before,) = _phases(run)["eval-base"]
    cmd = [sys.executable, "-m", "cluster.cli"]
    wrong = subprocess.run(cmd + ["train", "--resume", str(run)], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert f"started by `retrorl eval`; continue it with: retrorl eval --resume {run}" in wrong.stderr

    resumed = subprocess.run(cmd + ["eval", "--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[eval-base] resumed: 1 of 2 episodes already stored" in resumed.stdout + resumed.stderr
    after = _phases(run)["eval-base"]
    assert len(after) == 2 and before.episode_id in {e.episode_id for e in after}
    assert len({(e.task_id, e.split) for e in after}) == 2  # the stored task was not played again
    rows = json.loads((run / "eval" / "results.json").read_text())
    assert sum(r["episodes"] for r in rows if r["method"] == "base ReAct") == 2  # the table counts both
    events = [r["event"] for r in read_metrics(run / "metrics.jsonl")]
    assert events.count("command") == 1 and events.count("done") == 1

    again = subprocess.run(cmd + ["eval", "--resume", str(run)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "this run finished" in again.stderr


@pytest.mark.slow
def test_a_driver_killed_inside_il_resumes_the_phase_at_its_last_checkpoint(tmp_path):
    """SFT with a checkpoint after every IL step (learner.checkpoint_minutes=0); the driver and its Ray are
    SIGKILLed once RUN/checkpoints/sft.partial holds step 2 or later. `--resume` loads that checkpoint and trains
    only the steps after it: the phase's record counts each planned step once, and sft.partial is replaced by sft."""
    import subprocess
    import sys

    from cluster.run_dir import read_metrics

    args = TINY + [f"run_root={tmp_path}", "method=sft", "rollout.envs_per_worker=1", "eval.trials=1",
                   "learner.epochs=3", "learner.lr=0.01", "learner.max_tokens_per_batch=512",
                   "learner.checkpoint_minutes=0"]
    def saved_step_2(run) -> bool:
        meta = run / "checkpoints" / "sft.partial" / "learner.json"
        return meta.is_file() and json.loads(meta.read_text())["il"]["step"] >= 2

    cmd = [sys.executable, "-m", "cluster.cli", "train"]
    run = _run_until(tmp_path, args, saved_step_2)
    saved = json.loads((run / "checkpoints" / "sft.partial" / "learner.json").read_text())["il"]
    assert not (run / "checkpoints" / "sft").exists()

    resumed = subprocess.run(cmd + ["--resume", str(run)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = read_metrics(run / "metrics.jsonl")
    after = records[[r["event"] for r in records].index("resume"):]
    assert after[0]["checkpoint"].endswith("sft.partial")
    steps = [r["step"] for r in after if r["event"] == "checkpoint"]
    total = sum(saved["plan"][0])
    assert steps == list(range(saved["step"] + 1, total))  # each step after the checkpoint once, none before it
    (train,) = [r for r in records if r["event"] == "train"]
    assert train["phase"] == "sft" and train["steps"] == total  # the running sums came through the restart
    assert (run / "checkpoints" / "sft" / "learner.json").is_file()
    assert not (run / "checkpoints" / "sft.partial").exists()
    assert json.loads((run / "checkpoints" / "sft" / "learner.json").read_text())["il"] is None


@pytest.mark.slow
def test_sigterm_ends_a_run_like_ctrl_c_and_says_how_to_resume_it(tmp_path):
    """`kill` (SIGTERM) sent to a training driver inside IL: it exits 130 with one line naming the run directory
    and the --resume command (without the CLI's handler it died of SIGABRT, exit -6, after a C++ stack dump),
    marks the run interrupted in metrics.jsonl, leaves none of its local Ray's processes behind, and the run can be
    resumed."""
    import argparse
    import subprocess
    import sys

    from cluster.cli import resumable
    from cluster.run_dir import read_metrics

    args = TINY + [f"run_root={tmp_path}", "method=sft", "rollout.envs_per_worker=1", "learner.epochs=50",
                   "learner.lr=0.01", "learner.max_tokens_per_batch=512"]
    err = tmp_path.parent / f"{tmp_path.name}.stderr"
    with open(err, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train"]
                                  + [a for kv in args for a in ("--set", kv)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 600
        while not any(r["event"] == "train_progress" and r["step"] >= 1
                      for run in tmp_path.iterdir() for r in read_metrics(run / "metrics.jsonl")):
            assert driver.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
            time.sleep(0.1)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 130
        _, alive = psutil.wait_procs(ray_processes, timeout=60)
        assert not alive, [p.name() for p in alive]
    finally:
        if driver.poll() is None:
            _kill_tree(driver.pid)
    (run,) = tmp_path.iterdir()
    lines = err.read_text().splitlines()
    assert f"retrorl: interrupted; the run directory {run} keeps what was done; continue it with: " \
           f"retrorl train --resume {run}" in lines
    assert "Traceback" not in err.read_text() and "SIGTERM received" not in err.read_text()
    assert read_metrics(run / "metrics.jsonl")[-1]["event"] == "interrupted"
    cfg, untrained_reflector, reflector_checkpoint = resumable(
        str(run), argparse.Namespace(command="train", config=None, overrides=[], method=None))
    assert cfg.method == "sft" and not untrained_reflector and reflector_checkpoint is None


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from cluster.cli import main

    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--set", "eval.trials=1"]) == 2
    assert "drop --config, --set and --method" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_resume_takes_the_command_and_flags_the_run_was_started_with(tmp_path, capsys):
    """A run's `command` record says which command continues it and with which flags (the config does not hold
    --untrained-reflector); runs written before the record existed are train runs."""
    import argparse

    from cluster.cli import main, resumable

    cfg = load_config(None, TINY + [f"run_root={tmp_path}"])
    evaluation, demos, old = RunDir.create(cfg), RunDir.create(cfg), RunDir.create(cfg)
    evaluation.log("command", command="eval", untrained_reflector=True)
    demos.log("command", command="demos", untrained_reflector=False)
    plain = argparse.Namespace(config=None, overrides=[], untrained_reflector=False)
    assert resumable(str(evaluation.path), argparse.Namespace(command="eval", **vars(plain)))[1] is True
    assert resumable(str(old.path), argparse.Namespace(command="train", method=None, **vars(plain)))[1] is False
    swapped = RunDir.create(cfg)  # --reflector-checkpoint travels in the same record
    swapped.log("command", command="eval", untrained_reflector=False, reflector_checkpoint="a/checkpoints/retroact-1")
    assert resumable(str(swapped.path), argparse.Namespace(command="eval", **vars(plain)))[1:] == (
        False, "a/checkpoints/retroact-1")
    assert main(["eval", "--resume", str(evaluation.path), "--untrained-reflector"]) == 2
    assert "drop --config, --set, --untrained-reflector and --reflector-checkpoint" in capsys.readouterr().err
    assert main(["eval", "--resume", str(old.path)]) == 2
    assert f"continue it with: retrorl train --resume {old.path}" in capsys.readouterr().err
    assert main(["train", "--resume", str(demos.path)]) == 2
    assert "`retrorl demos` has no --resume: run it again" in capsys.readouterr().err
