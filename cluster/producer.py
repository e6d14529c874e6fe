"""Async mode: rollout rounds played by a background thread while the driver trains on the rounds already played.

The producer plays its rounds in order, each with `Session.rollout` (stored episode by episode, reused on
--resume), and starts round j only once the learner has finished round j - 1 - max_policy_lag: rollouts run at
most that many rounds ahead of the learner. Adapter broadcasts land while a round plays, so one round mixes
versions; every generation records its own, and `learners.batching.bound_policy_lag` bounds the lag at update
time. Only the driver thread talks to the learner.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from agents.trajectory import Episode


@dataclass
class Round:
    phase: str
    trials: int
    settings: Any  # RolloutSettings


class RolloutProducer:
    def __init__(self, session: Any, tasks: list[tuple[str, str]], rounds: list[Round], max_policy_lag: int) -> None:
        self.session, self.tasks, self.rounds, self.ahead = session, tasks, rounds, max_policy_lag
        self._cond = threading.Condition()
        self._played: dict[int, list[Episode]] = {}
        self._trained = 0  # rounds the learner has finished
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def __enter__(self) -> "RolloutProducer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()  # a round in flight finishes (its episodes are stored); no new one starts

    def take(self, i: int) -> list[Episode]:
        """Round i's episodes, once played (re-raises the producer's error)."""
        with self._cond:
            self._cond.wait_for(lambda: i in self._played or self._error is not None)
            if self._error is not None:
                raise self._error
            return self._played.pop(i)

    def trained(self, i: int) -> None:
        """The learner finished round i (updated or skipped it): later rounds may start."""
        with self._cond:
            self._trained = max(self._trained, i + 1)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            for j, r in enumerate(self.rounds):
                with self._cond:
                    self._cond.wait_for(lambda j=j: self._stop or self._trained >= j - self.ahead)
                    if self._stop:
                        return
                episodes = self.session.rollout(self.tasks, r.phase, r.trials, r.settings, restore=False)
                with self._cond:
                    self._played[j] = episodes
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread by `take`
            with self._cond:
                self._error = e
                self._cond.notify_all()
