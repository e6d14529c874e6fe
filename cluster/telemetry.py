"""Where a run's numbers go besides metrics.jsonl: TensorBoard scalars in RUN/tensorboard/ and Ray dashboard metrics.

One feed: every record `RunDir.log` writes is passed to `Telemetry.record` (the run's listener), plus the live engine
stats `Session` polls while a rollout runs. Ray metrics (ray.util.metrics) are exported by each node's metrics agent
with a `ray_` prefix (e.g. `ray_retrorl_tokens_per_s`) and show in the dashboard's Metrics view; every series carries
the run's name as the `run` tag. TensorBoard: `tensorboard --logdir RUN/tensorboard`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

# (name, kind, description, tag keys besides "run")
_RAY_METRICS = (
    ("episodes", "counter", "episodes finished", ("phase",)),
    ("env_steps", "counter", "environment steps taken", ("phase",)),
    ("success_rate", "gauge", "success rate of the last rollout", ("phase",)),
    ("tokens_per_s", "gauge", "generated tokens per second of the last rollout", ("phase",)),
    ("env_steps_per_s", "gauge", "environment steps per second of the last rollout", ("phase",)),
    ("policy_version", "gauge", "adapter version the engines serve", ("role",)),
    ("policy_lag", "gauge", "largest lag (versions) of a generation in the last rollout behind the served version",
     ("role",)),
    ("learner_loss", "gauge", "learner loss of the last update", ("phase", "series")),
    ("broadcast_latency_s", "gauge", "seconds from publishing adapters to every engine serving them", ()),
    ("engine_queue_depth", "gauge", "requests waiting in an engine's queue", ("engine",)),
    ("engine_tokens_per_busy_s", "gauge", "an engine's generated tokens per busy second", ("engine",)),
)


def _is_number(value: Any) -> bool:
    """A metric value: int or float, not a bool (a record's flags are not series)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _RayMetrics:
    def __init__(self, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.run = run
        self.metrics = {
            name: (Counter if kind == "counter" else Gauge)(f"retrorl_{name}", description, tag_keys=("run", *tags))
            for name, kind, description, tags in _RAY_METRICS
        }

    def set(self, name: str, value: float, **tags: str) -> None:
        metric = self.metrics[name]
        tags = {"run": self.run, **tags}
        if hasattr(metric, "inc"):
            if value > 0:
                metric.inc(value, tags=tags)
        else:
            metric.set(value, tags=tags)


class Telemetry:
    """Mirrors run events to TensorBoard and (inside a Ray driver) to ray.util.metrics; see the module docstring."""

    def __init__(self, log_dir: str | Path | None, run: str, ray_metrics: bool) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=10)
        self.ray = _RayMetrics(run) if ray_metrics else None
        self._steps: dict[str, int] = defaultdict(int)  # per TensorBoard tag: how many points so far

    # -- sinks ----------------------------------------------------------------------------------------------
    def _scalar(self, tag: str, value: Any) -> None:
        if self.writer is not None and _is_number(value):
            self.writer.add_scalar(tag, value, self._steps[tag])
            self._steps[tag] += 1

    def _ray(self, name: str, value: Any, **tags: str) -> None:
        if self.ray is not None and _is_number(value):
            self.ray.set(name, float(value), **tags)

    # -- feeds ----------------------------------------------------------------------------------------------
    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (RunDir listener)."""
        handler = getattr(self, f"_on_{record.get('event')}", None)
        if handler is not None:
            handler(record)

    def engines(self, stats: list[dict[str, Any]]) -> None:
        """Live engine stats (HFEngine.stats()), polled during rollouts."""
        for i, s in enumerate(stats):
            self._scalar(f"engine{i}/queue_depth", s.get("queue_depth"))
            self._scalar(f"engine{i}/tokens_per_busy_s", s.get("tokens_per_busy_s"))
            self._ray("engine_queue_depth", s.get("queue_depth"), engine=str(i))
            self._ray("engine_tokens_per_busy_s", s.get("tokens_per_busy_s"), engine=str(i))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # -- per event ------------------------------------------------------------------------------------------
    def _on_rollout(self, r: dict[str, Any]) -> None:
        phase = str(r.get("phase"))
        for key in ("episodes", "env_steps", "success_rate", "tokens_per_s", "env_steps_per_s"):
            self._scalar(f"rollout/{key}", r.get(key))
            self._ray(key, r.get(key), phase=phase)
        for role, lag in (r.get("policy_lag") or {}).items():
            self._scalar(f"policy/lag/{role}", lag)
            self._ray("policy_lag", lag, role=role)

    def _on_train(self, r: dict[str, Any]) -> None:
        phase = str(r.get("phase"))
        for key, value in r.items():
            if key.startswith("loss") or key in ("time_s", "tokens_per_s", "grad_norm"):
                self._scalar(f"train/{key}", value)
            if key.startswith("loss/"):
                self._ray("learner_loss", value, phase=phase, series=key[len("loss/"):])

    def _on_broadcast(self, r: dict[str, Any]) -> None:
        self._scalar("broadcast/seconds", r.get("seconds"))
        self._scalar("broadcast/bytes", r.get("bytes"))
        self._ray("broadcast_latency_s", r.get("seconds"))
        for role, version in (r.get("versions") or {}).items():
            self._scalar(f"policy/version/{role}", version)
            self._ray("policy_version", version, role=role)

    def _on_round(self, r: dict[str, Any]) -> None:
        for key in ("train_return", "first_return", "final_return", "success"):
            self._scalar(f"round/{r.get('method')}/{key}", r.get(key))

    def _on_eval(self, r: dict[str, Any]) -> None:
        for row in r.get("rows") or []:
            for key in ("IR", "FR", "AR", "success"):
                self._scalar(f"eval/{row.get('split')}/{row.get('method')}/{key}", row.get(key))
