"""On-disk cache helpers shared by the env families: where the cache lives, atomic writes, an inter-process lock.

Many env workers on one node may build or read the same cache at once, so every write is a temp file (or temp
folder) moved into place with `os.replace`, and builders serialise on a lock file: a crash never leaves a half-built
entry that a later reader would use.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

try:  # POSIX only; on other systems concurrent builders just race (writes stay atomic)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def default_cache_dir() -> Path:
    """$RETRORL_CACHE, else ~/.cache/retrorl."""
    return Path(os.environ.get("RETRORL_CACHE") or Path.home() / ".cache" / "retrorl")


def atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
