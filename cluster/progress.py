"""Live progress on the terminal: one rewritten line on a TTY, a line per ~10% otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, phase: str, total: int, stream=None) -> None:
        self.phase, self.total, self.done, self.wins = phase, total, 0, 0
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_logged = -1

    def update(self, success: bool) -> None:
        self.done += 1
        self.wins += int(success)
        decile = 10 * self.done // max(self.total, 1)
        if self.tty or decile != self._last_logged or self.done == self.total:
            self._last_logged = decile
            line = (f"[{self.phase}] {self.done}/{self.total} episodes  success {self.wins}/{self.done}  "
                    f"{time.perf_counter() - self.start:.0f}s")
            self.stream.write(("\r" + line) if self.tty else line + "\n")
            if self.tty and self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def say(message: str) -> None:
    print(message, flush=True)
