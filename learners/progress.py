"""Where a training call stands, recorded by the learner after each optimizer step and read by whoever watches it.

The learner trains in one thread; a caller polls `snapshot()` from another (the driver asks the learner actor through
a second concurrency group while the training call runs), so reads and writes go under a lock. Nothing here knows
Ray: a snapshot is a plain dict.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def tracked(method: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a learner's training method: its calls are `method` in `progress()`, running until they return."""
    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(self: Any, *args: Any, **kwargs: Any) -> T:
            self._progress.begin(method)
            try:
                return fn(self, *args, **kwargs)
            finally:
                self._progress.finish()
        return call
    return wrap


class TrainProgress:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset("")

    def _reset(self, method: str) -> None:
        self.method = method
        self.bounds: list[int] = []  # the last step of each epoch, once planned
        self.step = 0
        self.start = 0  # the step this call began at (a continued IL phase starts past 0)
        self.seq_tokens = 0  # non-pad tokens through forward + backward, as in the final `tokens_per_s`
        self.epoch_loss = [0.0, 0]  # token-weighted loss sum and tokens of the current epoch so far
        self.started = time.perf_counter()
        self.first_step: float | None = None  # when the first step began (scoring before it is not training speed)
        # Samples scored before the first step (a reference's log-probs: DPO, the KL penalty), which can take minutes.
        self.to_score = 0
        self.scored = 0
        self.score_started: float | None = None
        self.running = bool(method)

    def begin(self, method: str) -> None:
        """A call of `method` starts: nothing planned yet (it may score a reference first)."""
        with self._lock:
            self._reset(method)

    def plan(self, steps_per_epoch: list[int], start: int = 0) -> None:
        """The call will take these optimizer steps per epoch, beginning after step `start` (a continued phase)."""
        with self._lock:
            self.bounds = list(itertools.accumulate(steps_per_epoch))
            self.step = self.start = start

    def plan_scoring(self, samples: int) -> None:
        """`samples` more will be scored (forward only) before the call's steps."""
        with self._lock:
            self.to_score += samples
            if self.score_started is None:
                self.score_started = time.perf_counter()

    def scored_batch(self, samples: int) -> None:
        with self._lock:
            self.scored += samples

    def begin_step(self) -> None:
        with self._lock:
            if self.first_step is None:
                self.first_step = time.perf_counter()

    def end_step(self, losses: list[tuple[float, int]], seq_tokens: int) -> None:
        """One optimizer step done: its parts' (loss, scored tokens) and the step's non-pad tokens."""
        with self._lock:
            if self.step in self.bounds:  # the previous step closed an epoch: this one starts the next
                self.epoch_loss = [0.0, 0]
            self.step += 1
            self.seq_tokens += seq_tokens
            for loss, n in losses:
                self.epoch_loss[0] += loss * n
                self.epoch_loss[1] += n

    def finish(self) -> None:
        with self._lock:
            self.running = False

    def snapshot(self) -> dict[str, Any]:
        """step / total, epoch / epochs, the current epoch's mean loss so far, tokens/s since the first step, and the
        ETA at that pace (both None until this call has done a step: a continued IL phase starts past step 0); before
        the steps, samples scored / to score and the ETA of that."""
        with self._lock:
            now = time.perf_counter()
            total = self.bounds[-1] if self.bounds else 0
            epoch = next((i + 1 for i, b in enumerate(self.bounds) if self.step <= b), len(self.bounds))
            training = now - self.first_step if self.first_step is not None else 0.0
            stepped = self.step > self.start and training > 0
            loss_sum, tokens = self.epoch_loss
            scoring = now - self.score_started if self.score_started is not None else 0.0
            return {
                "method": self.method, "running": self.running,
                "step": self.step, "total": total, "epoch": max(epoch, 1 if total else 0), "epochs": len(self.bounds),
                "loss": loss_sum / tokens if tokens else None,
                "tokens_per_s": self.seq_tokens / training if stepped else None,
                "eta_s": training / (self.step - self.start) * (total - self.step) if stepped else None,
                "elapsed_s": now - self.started,
                "scored": self.scored, "to_score": self.to_score,
                "score_eta_s": scoring / self.scored * (self.to_score - self.scored) if self.scored else None,
            }
