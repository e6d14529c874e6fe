"""Atomic writes: a file or a folder appears whole at its path, or not at all.

Every write goes to a temp file (or folder) beside the target, is fsynced, and is renamed into place: a reader (an
engine hot-loading an adapter, a --resume reading a checkpoint, another env worker reading a cache entry) or a
crash, power cut included, never sees a part. The one place in retrorl that renames into place; it lives in envs,
the bottom layer, because env caches, models, adapters and run folders all write this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so that `path` holds either its old content or all of `data`, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as JSON (sorted keys, so a rewrite of the same data is the same file), atomically."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `final` to write a folder's files into. On a clean exit each file in it is fsynced and
    the folder is renamed into place, an existing `final` swapped out (`replace_dir`); on an error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        fsync_files(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, final: Path) -> bool:
    """Move the finished folder `tmp` to `final` unless another process published `final` first (builders of the
    same cache entry race; either copy is whole). Returns whether this one was published; `tmp` is then gone."""
    fsync_files(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # rename(2) refuses to replace a non-empty folder: the other builder won
        if not final.is_dir():
            raise
        return False
    _fsync_dir(final.parent)
    return True


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing dst is swapped out first (rename is atomic, rmtree isn't)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_files(folder: Path) -> None:
    """Flush what is directly in `folder` to disk (before its rename: a power cut cannot publish empty files)."""
    for f in folder.iterdir():
        _fsync(f)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems refuse directory fsync; the rename is still atomic
        pass
