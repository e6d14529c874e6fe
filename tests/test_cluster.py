"""The cluster path: ray_cluster.yaml is a config `ray up` accepts, and `ray job submit --working-dir . -- retrorl
train ...` runs a job on a running Ray head. The head here is a real one the test starts on 127.0.0.1 and stops
itself (terminating its own `ray start --block`; never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agents.model import hardware, resolve_dtype
from raysim import SimCluster

ROOT = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_is_a_valid_ray_up_config():
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(w["max_workers"] > w["min_workers"] for w in workers), "an autoscaling worker type"
    assert "GPU" not in head["resources"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "[vllm" in setup  # the project with the GPU extra
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # the dashboard stays on the head's loopback


@pytest.mark.slow
def test_ray_job_submit_runs_retrorl_train_on_a_loopback_head(tmp_path, tiny_model_path):
    sim = SimCluster(tmp_path, head_cpus=2)
    runs = tmp_path / "runs"
    try:
        sim.start_head()
        sim.run_tiny_sft(runs)
    finally:
        sim.stop()
    assert sim.head.poll() is not None
    # The job ran the real pipeline on that cluster and wrote its run directory where it was told to.
    (run,) = runs.iterdir()
    rows = json.loads((run / "eval" / "results.json").read_text())
    assert {(r["method"], r["split"]) for r in rows} >= {("SFT ReAct", "seen"), ("SFT ReAct", "unseen")}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events[-1] == "done" and "train" in events
    # and it recorded what `model.dtype: auto` resolved to in the learner, and on which CPU (same machine here)
    (learner,) = [r for r in records if r["event"] == "learner"]
    here = hardware()
    assert learner["dtype"] == str(resolve_dtype("auto")).removeprefix("torch.")
    assert (learner["cpu"], learner["cpu_capability"]) == (here["cpu"], here["cpu_capability"])
