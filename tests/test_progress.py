"""The driver's live lines and its transcript: what a terminal, a log file and RUN/logs/driver.log each get."""

from __future__ import annotations

import io
import sys
import types

import pytest

from cluster.console import TRANSCRIPT, closing_lines, transcript
from cluster.progress import Progress, TrainingProgress, duration
from learners.progress import TrainProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _snapshots(total: int, epochs: int = 2) -> list[dict]:
    """What the learner's `progress()` returns along a call (learners/progress.py), step by step."""
    return [{"method": "il", "running": step < total, "step": step, "total": total,
             "epoch": max(1, -(-step * epochs // total)), "epochs": epochs, "loss": None if step == 0 else 3.0 / step,
             "tokens_per_s": 400.0 if step else None, "eta_s": None if step == 0 else 2.0 * (total - step),
             "elapsed_s": float(step)} for step in range(total + 1)]


def test_training_lines_in_a_log_file_are_whole_and_about_one_per_tenth(monkeypatch):
    out = io.StringIO()  # not a TTY: output redirected to a file, or CI
    monkeypatch.setattr(sys, "stdout", out)
    line = TrainingProgress("sft")
    logged = [line.update(s) for s in _snapshots(84)]
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert len(lines) == sum(logged) == 11  # the plan as soon as it is known, then each tenth, then the end
    assert lines[0] == "[sft] 0/84 steps  epoch 1/2  0s"
    assert lines[1] == "[sft] 9/84 steps  epoch 1/2  loss 0.3333  400 tok/s  ETA 2m30s  0s"
    assert lines[-1].startswith("[sft] 84/84 steps  epoch 2/2  loss 0.03571  400 tok/s  ") and "ETA" not in lines[-1]
    assert not line.update(_snapshots(84)[-1])  # a last poll after the end adds nothing


def test_training_line_on_a_terminal_rewrites_itself_and_the_transcript_gets_whole_lines(monkeypatch, tmp_path):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    with transcript(tmp_path):
        line = TrainingProgress("dpo-1")
        line.update({**_snapshots(20)[0], "total": 0})  # scoring the reference: no plan yet
        for snap in _snapshots(20):
            line.update(snap)
        print("[dpo-1] done")
    shown = screen.getvalue()
    assert shown.startswith("\r[dpo-1] preparing") and shown.count("\r") == 22 and shown.endswith("\n[dpo-1] done\n")
    log = (tmp_path / TRANSCRIPT).read_text()
    assert "\r" not in log and "preparing" not in log
    assert log.splitlines()[1].startswith("[dpo-1] 2/20 steps  epoch 1/2  loss 1.5") and len(log.splitlines()) == 12


def test_a_call_that_takes_no_step_ends_its_terminal_line(monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    line = TrainingProgress("reflector-pg-1")
    idle = {**_snapshots(1)[0], "total": 0}
    line.update(idle)
    line.update({**idle, "running": False})
    assert screen.getvalue().endswith("\n")


def test_a_continued_il_call_shows_no_speed_before_its_first_step(monkeypatch):
    """An IL phase cut by checkpoints continues in a new call past step 0: until that call has done a step it has
    no speed or ETA to show (it showed "0 tok/s"), then both come from its own steps."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    progress = TrainProgress()
    progress.begin("il")
    progress.plan([3, 3], start=2)
    progress.begin_step()
    waiting = progress.snapshot()
    assert (waiting["step"], waiting["tokens_per_s"], waiting["eta_s"]) == (2, None, None)
    progress.end_step([(2.0, 10)], seq_tokens=100)
    stepped = progress.snapshot()
    assert stepped["step"] == 3 and stepped["tokens_per_s"] > 0 and stepped["eta_s"] >= 0
    line = TrainingProgress("sft")
    line.update(waiting)
    line.update(stepped)
    first, second = out.getvalue().splitlines()
    assert first.startswith("[sft] 2/6 steps  epoch 1/2  ") and "tok/s" not in first and "ETA" not in first
    assert second.startswith("[sft] 3/6 steps  epoch 1/2  loss 2  ") and " tok/s  ETA " in second


def test_rollout_lines_estimate_the_time_left_from_the_episodes_done(monkeypatch):
    import cluster.progress

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    clock = iter([100.0, 130.0, 190.0, 280.0, 281.0])  # the start, then one reading per update
    monkeypatch.setattr(cluster.progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    progress = Progress("explore-1", 4, concurrency=2)
    for won in (True, False, False, True):
        progress.update(won)
    # Two at a time: no estimate before a whole wave (two episodes) is done; 90 s for two: 1m30s to go; 180 s for
    # three: 1m00s; none after the last.
    assert out.getvalue().splitlines() == ["[explore-1] 1/4 episodes  success 1/1  30s",
                                           "[explore-1] 2/4 episodes  success 1/2  ETA 1m30s  1m30s",
                                           "[explore-1] 3/4 episodes  success 1/3  ETA 1m00s  3m00s",
                                           "[explore-1] 4/4 episodes  success 2/4  3m01s"]


def test_transcript_copies_stdout_and_stderr_without_colours(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with transcript(tmp_path) as path:
        print("\x1b[36m(HFEngine pid=1)\x1b[0m a warning from an actor", file=sys.stderr)
        progress = Progress("demos", 2)
        progress.update(True)
        progress.update(False)
    assert sys.stderr.getvalue().startswith("\x1b[36m")  # the terminal keeps what it was sent
    assert path.read_text().splitlines() == ["(HFEngine pid=1) a warning from an actor",
                                             "[demos] 1/2 episodes  success 1/1  ETA 0s  0s",
                                             "[demos] 2/2 episodes  success 1/2  0s"]


def test_closing_lines_name_the_run_and_the_report_command(tmp_path):
    run = tmp_path / "my runs" / "textworld-sft-1"
    lines = closing_lines(run)
    assert lines[0] == f"run directory: {run}"
    assert str(run / TRANSCRIPT) in lines[1]
    assert lines[2] == f"report: retrorl report '{run}'"  # quoted: the path has a space


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59.6, "1m00s"), (552, "9m12s"), (3900, "1h05m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_a_reference_pass_before_the_steps_gets_lines_of_its_own(monkeypatch):
    """DPO scores its pairs under the reference before its first step (12 minutes for 312 samples on 2 cores, with no
    line in the log before this): the log shows that scoring per tenth, then the steps per tenth, from their start."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    progress = TrainProgress()
    progress.begin("dpo")
    progress.plan_scoring(30)
    line = TrainingProgress("dpo-1")
    for _ in range(10):  # batches of 3 samples
        progress.scored_batch(3)
        line.update(progress.snapshot())
    progress.plan([4])
    for _ in range(4):
        progress.begin_step()
        progress.end_step([(0.69, 10)], seq_tokens=100)
        line.update(progress.snapshot())
    lines = out.getvalue().splitlines()
    assert [x.split("  ")[0] for x in lines] == [f"[dpo-1] reference {n}/30 samples" for n in range(3, 31, 3)] + [
        f"[dpo-1] {n}/4 steps" for n in range(1, 5)]
    assert " ETA " in lines[0] and "ETA" not in lines[9]  # the scoring's time left, none once it is done
    end = progress.snapshot()
    assert (end["scored"], end["to_score"], end["score_eta_s"], end["step"]) == (30, 30, 0.0, 4)
