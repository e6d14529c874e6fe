"""Trajectory store: atomic parts, unique ids, pandas/pyarrow readable, crash leaves written episodes whole."""

from __future__ import annotations

import os

import pandas as pd
import pyarrow.dataset as ds
import pytest

from agents.trajectory import Episode, Generation, Step, Trial, new_episode_id
from rollout.store import TrajectoryStore


def _episode(task="t-1", ret=0.5) -> Episode:
    gen = Generation("actor", [1, 2, 3], [4, 5], [-0.5, -0.25], 2, "Thought: a\nAction: b")
    trial = Trial(0, [], [Step("obs", "b", "a", 0.0, ret, True, True, gen)], ret=ret, success=ret == 1.0)
    return Episode(new_episode_id(), "textworld", task, "seen", "rollout", [trial], {"phase": "x"})


def test_roundtrip_and_readers(tmp_path):
    store = TrajectoryStore(tmp_path)
    eps = [_episode("a", 1.0), _episode("b", 0.25)]
    store.append(eps[:1], phase="demos")
    store.append(eps[1:], phase="eval")
    assert list(store.episodes()) == eps
    assert [e.task_id for e in store.episodes(phase="eval")] == ["b"]
    frame = pd.read_parquet(tmp_path)
    assert sorted(frame["task_id"]) == ["a", "b"] and frame["success"].sum() == 1
    assert ds.dataset(tmp_path).count_rows() == 2
    # A reopened store knows what is there and continues numbering.
    again = TrajectoryStore(tmp_path)
    assert len(again) == 2 and eps[0].episode_id in again
    assert again.append([_episode("c")], phase="eval").name == "part-000002.parquet"


def test_duplicate_ids_are_refused_before_writing(tmp_path):
    store = TrajectoryStore(tmp_path)
    ep = _episode()
    store.append([ep], phase="x")
    with pytest.raises(ValueError):
        store.append([_episode(), ep], phase="x")
    twin = _episode()
    with pytest.raises(ValueError):
        store.append([twin, twin], phase="x")
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1 and len(list(store.episodes())) == 1


def test_crash_mid_write_leaves_no_partial_part(tmp_path, monkeypatch):
    store = TrajectoryStore(tmp_path)
    store.append([_episode()], phase="x")

    def crash(*args, **kwargs):  # injected fault: the process dies between writing and renaming
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.append([_episode()], phase="x")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.parquet"]  # no temp file left behind
    assert len(list(TrajectoryStore(tmp_path).episodes())) == 1
