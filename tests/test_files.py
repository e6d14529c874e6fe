"""File helpers every layer shares: one resolver of the retrorl cache folder (envs/cache.py) and one way to write
a file or folder atomically (envs/atomic.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from agents.model import TINY_MODEL, resolve_model
from envs import TextWorldEnv
from envs.atomic import publish_dir, staged_dir, write_json_atomic
from envs.cache import resolve_cache_dir


def test_one_cache_resolver_expands_home_for_models_and_envs(tmp_path, monkeypatch):
    """RETRORL_CACHE=~/... names the same folder for the model cache and the env families' caches (the envs'
    resolver used to keep a literal `~` folder under the working directory)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RETRORL_CACHE", "~/retrorl-cache")
    monkeypatch.chdir(tmp_path)
    expected = tmp_path / "home" / "retrorl-cache"
    assert resolve_cache_dir() == expected
    assert TextWorldEnv().cache_dir == expected
    assert TextWorldEnv(cache_dir="~/other").cache_dir == tmp_path / "home" / "other"
    assert resolve_model(TINY_MODEL).parent.parent == expected  # <cache>/models/tiny-llama
    assert not (tmp_path / "~").exists()


SOURCES = [p for pkg in ("agents", "envs", "rollout", "learners", "cluster") for p in Path(pkg).rglob("*.py")]


def test_one_helper_renames_into_place():
    """Temp file, fsync, rename lives in envs/atomic.py only (it was written out six times, once without the
    fsync): no other module renames into place or fsyncs a temp file itself."""
    offenders = [f"{p}:{n}" for p in SOURCES if p != Path("envs/atomic.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"os\.replace\(|os\.rename\(|\.rename\(|mkstemp\(", line)]
    assert not offenders, offenders


def test_json_writes_are_fsynced_and_a_crash_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "entry.json"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    write_json_atomic(path, {"b": 1, "a": [2]})
    assert json.loads(path.read_text()) == {"a": [2], "b": 1} and synced  # on disk before it is named

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json_atomic(path, {"new": True})
    assert json.loads(path.read_text()) == {"a": [2], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["entry.json"]  # no temp file left


def test_staged_and_published_folders_appear_whole(tmp_path):
    final = tmp_path / "adapter"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash mid-write")
    assert not any(tmp_path.iterdir())  # neither the folder nor its temp
    with staged_dir(final) as tmp:
        (tmp / "a").write_text("v1")
    with staged_dir(final) as tmp:  # a new version swaps the old one out
        (tmp / "a").write_text("v2")
    assert (final / "a").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    # Two builders of one cache entry: the first publishes, the second finds it there and keeps its temp folder.
    for text in ("first", "second"):
        tmp = tmp_path / f".tmp-{text}"
        tmp.mkdir()
        (tmp / "meta.json").write_text(text)
        assert publish_dir(tmp, tmp_path / "entry") == (text == "first")
    assert (tmp_path / "entry" / "meta.json").read_text() == "first"
