"""On-disk cache helpers shared by the env families: where the cache lives, reading entries, an inter-process lock.

Many env workers on one node may build or read the same cache at once, so every write is atomic (envs/atomic.py)
and builders serialise on a lock file: a crash never leaves a half-built entry that a later reader would use.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

try:  # POSIX only; on other systems concurrent builders just race (writes stay atomic)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def resolve_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The retrorl cache (models, env games, lists) as an absolute path: `override`, else $RETRORL_CACHE, else
    ~/.cache/retrorl; `~` is expanded in each, so RETRORL_CACHE=~/big-disk means the same folder to every reader."""
    root = override or os.environ.get("RETRORL_CACHE") or Path.home() / ".cache" / "retrorl"
    return Path(root).expanduser().resolve()


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is absent or unreadable (treated as a cache miss)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock held while building cache entries (blocks other processes building the same ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_in_subprocesses(module: str, specs: list[dict[str, Any]], workers: int, what: str) -> None:
    """Hand `specs` round-robin to up to `workers` subprocesses running `<module>.worker_main` (which reads the
    JSON list of its specs from stdin); raise with their output's tail if any fails. Plain subprocesses, not
    multiprocessing: spawn would re-import the caller's `__main__`, and fork is unsafe in threaded hosts."""
    workers = max(1, min(workers, len(specs)))
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    procs = []
    for i in range(workers):
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from {module} import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        procs.append((proc, json.dumps(specs[i::workers])))
    errors = []
    for proc, payload in procs:
        out, _ = proc.communicate(payload)
        if proc.returncode != 0:
            errors.append(out[-2000:])
    if errors:
        raise RuntimeError(f"{what} generation failed:\n" + "\n".join(errors))
