"""Autoscaling: ray_cluster.yaml's worker types hold what a job asks for, and a job submitted to a cluster with no
workers makes Ray's autoscaler launch one, place the engines and learner on it, and finish.

The slow test uses Ray's fake multi-node provider (`provider: type: fake_multinode`, head started with
RAY_FAKE_CLUSTER=1): the autoscaler on the head launches worker node types as extra Ray nodes on this machine, all on
127.0.0.1. Its node types are ray_cluster.yaml's (same names), but CPU-only: in fake_multinode a GPU is only a
resource, and nothing here can run CUDA, so the job asks for CPUs (HF engine, DeepSpeed on CPU). The head is
started with --num-cpus=0, so the engine and learner bundles can only be placed on an autoscaled worker. Everything
started here is stopped by its process group (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from cluster.runtime import bundles
from raysim import SimCluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
OBJECT_STORE = 200 * 1024 * 1024  # bytes per node: the job moves only small objects


def _worker_types(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}


def _documented_gpu_overrides(text: str) -> list[str]:
    """The `--set` overrides of the `retrorl train` command in a README code block or the yaml's header comment."""
    text = re.sub(r"^#\s?", "", text, flags=re.M)  # the yaml's copy is commented out
    joined = re.sub(r"\\\n", " ", text)
    (line,) = [ln for ln in joined.splitlines() if "ray job submit" in ln and "retrorl train" in ln]
    words = shlex.split(line.split("retrorl train", 1)[1], comments=True)
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def _readme_gpu_overrides() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    return _documented_gpu_overrides("\n".join(section.split("```")[1::2]))  # its code blocks, not the prose


def test_documented_gpu_job_fits_the_cluster_yaml_node_types():
    overrides = _readme_gpu_overrides()
    header = (ROOT / "ray_cluster.yaml").read_text().split("cluster_name:", 1)[0]
    assert _documented_gpu_overrides(header) == overrides, "the yaml's header and the README document one command"
    cfg = load_config(None, overrides)
    assert cfg.rollout.engine_gpus > 0 and cfg.learner.gpus > 0, overrides
    wanted = bundles(cfg, with_learner=True)
    workers = _worker_types(CLUSTER)
    # Declared resources: the autoscaler plans a scale-up from zero with them, before any such node exists.
    assert all(t.get("resources") for t in workers.values()), "worker types declare their CPUs and GPUs"

    def fits(bundle: dict, have: dict) -> bool:
        return all(have.get(k, 0) >= v for k, v in bundle.items())

    for b in wanted:
        assert any(fits(b, t["resources"]) for t in workers.values()), f"no worker type holds the bundle {b}"
    # and the autoscaler may add enough of them for the whole placement group
    for key in ("GPU", "CPU"):
        need = sum(b.get(key, 0) for b in wanted)
        room = sum(t["resources"].get(key, 0) * t["max_workers"] for t in workers.values())
        assert need <= room, f"{need} {key} asked, at most {room} in {CLUSTER['max_workers']} workers"
    assert sum(1 for b in wanted if b.get("GPU")) <= CLUSTER["max_workers"]


def _fake_cluster_config(gcs_port: int) -> dict:
    """ray_cluster.yaml's node types for Ray's fake_multinode provider. The monitor reads this file as is (it does not
    fill in defaults: autoscaler.py:1071-1103), so it starts from Ray's own complete skeleton (monitor.py:108-134)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
    from ray.autoscaler._private.monitor import BASE_READONLY_CONFIG

    config = json.loads(json.dumps(BASE_READONLY_CONFIG))
    config.update(
        cluster_name="retrorl-fake",
        max_workers=CLUSTER["max_workers"],
        upscaling_speed=CLUSTER["upscaling_speed"],
        idle_timeout_minutes=CLUSTER["idle_timeout_minutes"],
        provider={
            "type": "fake_multinode",
            # without it the fake nodes dial port 6379 (fake_multi_node/node_provider.py:365-374)
            "gcs_address": f"127.0.0.1:{gcs_port}",
            "use_node_id_as_ip": True,  # every node is 127.0.0.1 (monitor.py:311-325)
            "disable_launch_config_check": True,
            "disable_node_updaters": True,  # no SSH, no setup commands: the provider starts Ray nodes in-process
        },
        # The fake provider tags the head it did not launch with this type (node_provider.py:38, :276-283): the yaml's
        # head type under that name. --num-cpus=0 gives it no CPU, as the fake config says.
        head_node_type=FAKE_HEAD_NODE_TYPE,
    )
    types = {FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in _worker_types(CLUSTER).items():
        # CPU-only here (the GPU count is dropped: a fake GPU could not run CUDA); the yaml's CPU count stays. A small
        # object store, as the head's: the provider passes it to the node it starts (node_provider.py:360-363).
        types[name] = {"resources": {"CPU": t["resources"]["CPU"], "object_store_memory": OBJECT_STORE},
                       "node_config": {},
                       "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
    config["available_node_types"] = types
    return config


def _alive_nodes(sim: SimCluster) -> list[dict]:
    out = sim.ray("list", "nodes", f"--address={sim.url}", "--format=json", "--detail")
    assert out.returncode == 0, out.stdout + out.stderr
    return [n for n in json.loads(out.stdout) if n["state"] == "ALIVE"]


def _wait(what: str, check, timeout: float, head: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while True:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode} while waiting for {what}")
        try:
            result = check()
        except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(0.5)


@pytest.mark.slow
def test_a_job_scales_a_worker_type_up_from_zero(tmp_path, tiny_model_path):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    (worker_type,) = _worker_types(CLUSTER)  # the yaml has one worker type: the GPU workers
    # RAY_FAKE_CLUSTER=1: required by the fake provider (node_provider.py:256-260) and gives the head the id it
    # tags (scripts.py:983-987); the autoscaler updates every second instead of 5 (autoscaler constants.py:64).
    sim = SimCluster(tmp_path, head_cpus=0, head_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config_path = Path(sim.temp_dir) / "autoscaling.json"
    config_path.write_text(json.dumps(_fake_cluster_config(sim.gcs)))
    sim.head_args = [f"--object-store-memory={OBJECT_STORE}", f"--autoscaling-config={config_path}"]
    started = time.monotonic()
    runs = tmp_path / "runs"
    try:
        sim.start_head()
        before = _wait("the head in the node list", lambda: _alive_nodes(sim), 120, sim.head)
        # zero workers: only the head, with no CPU for the engines and the learner
        assert [n["node_id"] for n in before] == [FAKE_HEAD_NODE_ID]
        assert before[0]["resources_total"].get("CPU", 0) == 0
        sim.run_tiny_sft(runs)
        # The autoscaler launched a node of the yaml's worker type (it is still up: idle_timeout_minutes).
        after = _alive_nodes(sim)
        workers = [n for n in after if n["node_id"] != FAKE_HEAD_NODE_ID]
        assert len(workers) == 1, after
        assert workers[0]["resources_total"]["CPU"] == CLUSTER["available_node_types"][worker_type]["resources"]["CPU"]
        status = sim.ray("status", f"--address={sim.gcs_address}")
        assert status.returncode == 0, status.stdout + status.stderr
        active = status.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        assert re.search(rf"^\s*1 {re.escape(worker_type)}\s*$", active, re.M), status.stdout
        # The engine and the learner ran there (the head has no CPU for them).
        out = sim.ray("list", "actors", f"--address={sim.url}", "--format=json", "--detail", "--limit=1000")
        assert out.returncode == 0, out.stdout + out.stderr
        placed = {a["class_name"]: a["node_id"] for a in json.loads(out.stdout)
                  if a["class_name"] in ("HFEngine", "MethodLearner")}
        assert placed == {"HFEngine": workers[0]["node_id"], "MethodLearner": workers[0]["node_id"]}, placed
    finally:
        leftovers = sim.leftovers
        sim.stop()
        print(f"fake autoscaling cluster: {time.monotonic() - started:.1f}s from `ray start` to stopped")
    assert sim.head.poll() is not None
    assert not leftovers(), "a process of this test's cluster outlived it"
    (run,) = runs.iterdir()
    rows = json.loads((run / "eval" / "results.json").read_text())
    assert {(r["method"], r["split"]) for r in rows} >= {("SFT ReAct", "seen"), ("SFT ReAct", "unseen")}
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1] == "done" and "train" in events
