"""Telemetry: run events become TensorBoard scalars and Ray dashboard metrics (read back from the real exporters)."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
import ray

from agents.trajectory import ACTOR, REFLECTOR, Episode, Generation, Step, Trial
from cluster.pipeline import policy_lag
from cluster.run_dir import RunDir
from cluster.telemetry import Telemetry

ROLLOUT = {"event": "rollout", "phase": "explore-1", "episodes": 4, "env_steps": 30, "success_rate": 0.25,
           "tokens_per_s": 51.5, "env_steps_per_s": 2.0, "policy_lag": {"actor": 1, "reflector": 0}}
TRAIN = {"event": "train", "phase": "sft", "loss/actor": 0.5, "loss/reflector": 1.5, "time_s": 3.0, "steps": 7}
BROADCAST = {"event": "broadcast", "versions": {"actor": 2, "reflector": 1}, "bytes": 1000, "seconds": 0.2}


def _scalars(log_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_events_become_tensorboard_scalars(tmp_path):
    run = RunDir(tmp_path / "run")
    telemetry = Telemetry(run.path / "tensorboard", "run", ray_metrics=False)
    run.listeners.append(telemetry.record)
    run.log(**ROLLOUT)
    run.log(**{**ROLLOUT, "success_rate": 0.75})
    run.log(**TRAIN)
    run.log(**BROADCAST)
    run.log("eval", label="SFT", rows=[{"method": "SFT ReAct", "split": "seen", "IR": 0.5, "FR": 0.5, "AR": 0.5,
                                        "success": 0.5}])
    run.log("demos", tasks=3)  # no scalars for it, and no error
    telemetry.engines([{"queue_depth": 3, "tokens_per_busy_s": 40.0}])
    telemetry.close()
    scalars = _scalars(run.path / "tensorboard")
    assert scalars["rollout/success_rate"] == [0.25, 0.75]  # one point per rollout, in order
    assert scalars["rollout/tokens_per_s"] == [51.5, 51.5]
    assert scalars["policy/lag/actor"] == [1, 1] and scalars["policy/lag/reflector"] == [0, 0]
    assert scalars["train/loss/actor"] == [0.5] and scalars["train/loss/reflector"] == [1.5]
    assert scalars["policy/version/actor"] == [2] and scalars["broadcast/seconds"] == [pytest.approx(0.2)]
    assert scalars["eval/seen/SFT ReAct/FR"] == [0.5]
    assert scalars["engine0/queue_depth"] == [3]
    assert "train/steps" not in scalars
    assert len(run.metrics()) == 6  # metrics.jsonl still has every record


def _gen(role: str, version: int) -> Generation:
    return Generation(role=role, prompt_ids=[1], completion_ids=[2], logprobs=[-0.1], version=version, text="x")


def test_policy_lag_is_the_largest_gap_behind_the_served_version():
    steps = [Step(observation="o", action="a", thought="", reward=0.0, score=0.0, valid=True, format_ok=True,
                  generation=_gen(ACTOR, v)) for v in (3, 1, 2)]
    trial = Trial(index=0, memory=[], steps=steps, ret=0.0, success=False, format_errors=0,
                  reflection=_gen(REFLECTOR, 2))
    episode = Episode(episode_id="e", env="textworld", task_id="t", split="train", source="rollout", trials=[trial])
    assert policy_lag([episode], {"actor": 3, "reflector": 2}) == {"actor": 2, "reflector": 0}
    assert policy_lag([], {"actor": 3}) == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_dashboard_metrics_are_exported():
    port = _free_port()
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        telemetry = Telemetry(None, "my-run", ray_metrics=True)
        telemetry.record(ROLLOUT)
        telemetry.record(TRAIN)
        telemetry.record(BROADCAST)
        telemetry.engines([{"queue_depth": 5, "tokens_per_busy_s": 12.0}])
        wanted = ['ray_retrorl_tokens_per_s{', 'ray_retrorl_policy_version{', 'ray_retrorl_learner_loss{',
                  'ray_retrorl_engine_queue_depth{', 'ray_retrorl_episodes']
        text = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            if all(w in text for w in wanted):
                break
            time.sleep(1)
        lines = [line for line in text.splitlines() if line.startswith("ray_retrorl_")]
        assert all(w in text for w in wanted), "\n".join(lines)

        def value(name: str, *tags: str) -> float:
            line = next(x for x in lines if x.startswith(name + "{") and all(t in x for t in tags))
            return float(line.rsplit(" ", 1)[1])

        assert value("ray_retrorl_tokens_per_s", 'run="my-run"', 'phase="explore-1"') == 51.5
        assert value("ray_retrorl_policy_version", 'role="actor"') == 2
        assert value("ray_retrorl_learner_loss", 'series="reflector"') == 1.5
        assert value("ray_retrorl_engine_queue_depth", 'engine="0"') == 5
    finally:
        ray.shutdown()
