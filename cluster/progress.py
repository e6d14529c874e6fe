"""Live progress on the terminal: one rewritten line on a TTY, a line per ~10% otherwise (logs, CI, the run's
transcript RUN/logs/driver.log, which gets the per-10% lines in both cases)."""

from __future__ import annotations

import time
from typing import Any

from cluster.console import terminal, to_transcript

_STEPS = 10  # lines a phase writes to a file: one per tenth of the way


class _LiveLine:
    """One phase's line: rewritten in place on a TTY, else printed at each tenth (and at the end)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.stream = terminal()  # a TTY's rewritten line bypasses the transcript
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._width = 0  # of the line on screen, to blank what a shorter line leaves
        self.restart()

    def restart(self) -> None:
        """Count tenths from zero again: a new series of counts on the same line."""
        self._last_logged = -1
        self._ended = False

    def show(self, text: str, done: int, total: int) -> bool:
        """Show `[phase] text`; True when this is a logged line (a new tenth, or the end)."""
        if self._ended:  # a last poll after the line already reached its end
            return False
        self._ended = done >= total
        line = f"[{self.phase}] {text}"
        tenth = _STEPS * done // max(total, 1)
        logged = tenth != self._last_logged or done >= total
        if logged:
            self._last_logged = tenth
        if not self.tty:
            if logged:
                say(line)  # through the transcript's tee, when there is one
            return logged
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
        if logged:
            to_transcript(line)
        return logged

    def elapsed(self) -> str:
        return duration(time.perf_counter() - self.start)


class Progress(_LiveLine):
    """Episodes of a rollout phase: `[explore-1] 25/50 episodes  success 3/25  ETA 3m10s  3m05s`.

    `concurrency` episodes are played at once, so the first ones finish together near the end of the first wave
    and a rate measured before that overstates the time left (12 episodes on 16 slots: "ETA 36m" one and a half
    minutes before the end). The ETA (time so far per finished episode, times those left) is shown once a whole
    wave has finished, never for a phase that fits in one wave."""

    def __init__(self, phase: str, total: int, concurrency: int = 1) -> None:
        super().__init__(phase)
        self.total, self.done, self.wins = total, 0, 0
        self.concurrency = concurrency

    def update(self, success: bool) -> None:
        self.done += 1
        self.wins += int(success)
        spent = time.perf_counter() - self.start
        parts = [f"{self.done}/{self.total} episodes", f"success {self.wins}/{self.done}"]
        if self.concurrency <= self.done < self.total:
            parts.append(f"ETA {duration(spent / self.done * (self.total - self.done))}")
        parts.append(duration(spent))
        self.show("  ".join(parts), self.done, self.total)


class TrainingProgress(_LiveLine):
    """A learner call, from the learner's `progress()` snapshots (learners/progress.py):
    `[sft] 12/84 steps  epoch 1/3  loss 2.314  412 tok/s  ETA 9m12s  1m44s`; before the steps of a call that scores
    a reference first (DPO: 312 samples took 12 minutes on 2 cores),
    `[dpo-1] reference 96/312 samples  ETA 8m12s  3m30s`."""

    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self._series = ""  # "reference" or "steps": each counts its own tenths

    def _switch(self, series: str) -> None:
        if series != self._series:
            self._series = series
            self.restart()

    def update(self, snap: dict[str, Any]) -> bool:
        """Show a snapshot; True when the line was logged (a new tenth of the scoring or of the steps, or its end)."""
        total, step = snap["total"], snap["step"]
        if not total and snap.get("to_score"):  # scoring a reference before the first step
            self._switch("reference")
            scored, to_score = snap["scored"], snap["to_score"]
            parts = [f"reference {scored}/{to_score} samples"]
            if scored < to_score and snap.get("score_eta_s") is not None:
                parts.append(f"ETA {duration(snap['score_eta_s'])}")
            parts.append(self.elapsed())
            return self.show("  ".join(parts), scored, to_score)
        if not total:  # planning before the first step: only a terminal shows it
            if self.tty and snap["running"]:
                line = f"[{self.phase}] preparing  {self.elapsed()}"
                self.stream.write("\r" + line.ljust(self._width))
                self._width = len(line)
            elif self.tty and self._width:  # the call ended without a step: end the line it showed
                self.stream.write("\n")
                self._width = 0
            self.stream.flush()
            return False
        self._switch("steps")
        parts = [f"{step}/{total} steps", f"epoch {snap['epoch']}/{snap['epochs']}"]
        if snap["loss"] is not None:
            parts.append(f"loss {snap['loss']:.4g}")
        if snap["tokens_per_s"] is not None:
            parts.append(f"{snap['tokens_per_s']:.0f} tok/s")
        if step < total and snap["eta_s"] is not None:
            parts.append(f"ETA {duration(snap['eta_s'])}")
        parts.append(self.elapsed())
        return self.show("  ".join(parts), step, total)


def duration(seconds: float) -> str:
    """`42s`, `9m12s`, `1h05m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def say(message: str) -> None:
    print(message, flush=True)
