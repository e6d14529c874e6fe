"""Append-only trajectory store: one Parquet part per append, written atomically.

Each part is written with envs.atomic.write_atomic, so a reader (or a crash) sees a part whole
or not at all; a crash costs at most the episodes of the append in flight. Rows are episodes: flat summary
columns for pandas / pyarrow queries plus the full record as JSON (`record`) that `Episode.from_dict` restores.
  pandas.read_parquet("RUN/trajectories")  or  pyarrow.dataset.dataset("RUN/trajectories")
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from agents.trajectory import Episode
from envs.atomic import write_atomic

SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("env", pa.string()),
        ("task_id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("phase", pa.string()),
        ("num_trials", pa.int32()),
        ("first_return", pa.float64()),
        ("final_return", pa.float64()),
        ("success", pa.bool_()),
        ("record", pa.string()),
    ]
)


class StoreError(ValueError):
    """A part under trajectories/ cannot be read as this store's episodes; the message names the file and the fix."""


class TrajectoryStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._ids: set[str] = set()
        self._next_part = 0
        for part in self._parts():
            with self._reading(part):
                if not pq.read_schema(part).equals(SCHEMA):
                    raise ValueError("not a retrorl trajectory part: its columns differ from rollout.store.SCHEMA")
                self._ids.update(pq.read_table(part, columns=["episode_id"]).column(0).to_pylist())
                self._next_part = max(self._next_part, int(part.stem.split("-")[1]) + 1)

    @contextlib.contextmanager
    def _reading(self, part: Path) -> Iterator[None]:
        """Any failure to read `part` (corrupt, truncated, foreign, an old record layout) as one StoreError."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow's and the record's errors vary; all mean "unreadable"
            raise StoreError(f"{part} cannot be read ({type(exc).__name__}: {exc}); move it out of {self.root} "
                             "(its episodes are then played again) or restore it from a copy") from exc

    def _parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self._ids

    def append(self, episodes: Iterable[Episode], phase: str) -> Path | None:
        """Write `episodes` as one new part. Duplicate episode ids are refused before anything is written."""
        episodes = list(episodes)
        if not episodes:
            return None
        ids = [e.episode_id for e in episodes]
        dup = set(ids) & self._ids or {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"episode ids already stored: {sorted(dup)[:3]}")
        rows = [
            {
                "episode_id": e.episode_id,
                "env": e.env,
                "task_id": e.task_id,
                "split": e.split,
                "source": e.source,
                "phase": phase,
                "num_trials": len(e.trials),
                "first_return": e.returns[0] if e.trials else 0.0,
                "final_return": e.returns[-1] if e.trials else 0.0,
                "success": e.success,
                "record": json.dumps(e.to_dict(), separators=(",", ":")),
            }
            for e in episodes
        ]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink, compression="zstd")
        path = self.root / f"part-{self._next_part:06d}.parquet"
        write_atomic(path, sink.getvalue().to_pybytes())
        self._next_part += 1
        self._ids.update(ids)
        return path

    def episodes(self, phase: str | None = None) -> Iterator[Episode]:
        for row_phase, episode in self.phased_episodes():
            if phase is None or row_phase == phase:
                yield episode

    def phased_episodes(self) -> Iterator[tuple[str, Episode]]:
        """(phase, episode) for every stored episode, in the order they were appended."""
        for part in self._parts():
            with self._reading(part):  # a part is decoded whole before any of its episodes is handed out
                table = pq.read_table(part, columns=["phase", "record"])
                rows = [(row_phase, Episode.from_dict(json.loads(record)))
                        for row_phase, record in zip(table.column(0).to_pylist(), table.column(1).to_pylist())]
            yield from rows
