"""The driver's terminal and its transcript in the run directory.

While a run is open, everything the driver's terminal shows (retrorl's lines, the actors' output that Ray forwards,
warnings and tracebacks) is also appended to RUN/logs/driver.log, without colour codes. A live line that rewrites
itself on a terminal (`\\r`) writes to the terminal alone (`terminal()`) and puts its milestones in the transcript
(`to_transcript`), so the file holds whole lines only.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # Ray colours its actor prefixes (ray/_private/worker.py:2387-2392)
TRANSCRIPT = "logs/driver.log"  # relative to the run directory


class _Tee:
    """A text stream that writes to the terminal's stream and, uncoloured, to the transcript."""

    def __init__(self, terminal: IO[str], log: IO[str], lock: threading.Lock) -> None:
        self.terminal, self.log, self._lock = terminal, log, lock

    def write(self, text: str) -> int:
        with self._lock:  # Ray prints forwarded actor lines from its own thread
            self.terminal.write(text)
            self.log.write(_ANSI.sub("", text))
        return len(text)

    def log_line(self, line: str) -> None:
        with self._lock:
            self.log.write(line + "\n")

    def flush(self) -> None:
        with self._lock:
            self.terminal.flush()
            self.log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... are the terminal's
        return getattr(self.terminal, name)


def terminal() -> IO[str]:
    """The stream the terminal shows, past the transcript's tee (for lines rewritten in place)."""
    out = sys.stdout
    return out.terminal if isinstance(out, _Tee) else out


def to_transcript(line: str) -> None:
    """A line for the transcript only (a live line's milestone; the terminal shows the line itself)."""
    out = sys.stdout
    if isinstance(out, _Tee):
        out.log_line(line)


@contextlib.contextmanager
def transcript(run_path: Path) -> Iterator[Path]:
    """Copy the driver's stdout and stderr to RUN/logs/driver.log (appended: a --resume continues it)."""
    path = run_path / TRANSCRIPT
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    lock = threading.Lock()
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        sys.stdout, sys.stderr = _Tee(out, log, lock), _Tee(err, log, lock)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = out, err


def closing_lines(run_path: Path) -> list[str]:
    """What a finished command prints last: where the run is, its transcript, and the command that renders its
    report (RUN/eval/report.md and report.png)."""
    return [f"run directory: {run_path}",
            f"log: {run_path / TRANSCRIPT} (this output; metrics.jsonl has every number)",
            f"report: retrorl report {shlex.quote(str(run_path))}"]
