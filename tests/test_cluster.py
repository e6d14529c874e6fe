"""The cluster path: ray_cluster.yaml is a config `ray up` accepts, and `ray job submit --working-dir . -- retrorl
train ...` runs a job on a running Ray head. The head here is a real one the test starts on 127.0.0.1 and stops
itself (terminating its own `ray start --block`; never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from agents.model import cache_dir, hardware, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray and retrorl


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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:  # it answered: Ray's token auth (on by default) refuses a bare request
            return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"no dashboard at {url} after {timeout}s")


def _stop(head: subprocess.Popen) -> None:
    """Stop the head this test started: SIGTERM to `ray start --block` (it stops the processes it launched),
    then the whole process group it leads, in case one lingers."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_ray_job_submit_runs_retrorl_train_on_a_loopback_head(tmp_path, tiny_model_path):
    gcs, dashboard, client, agent_grpc, agent_http, runtime_env, metrics = _free_ports(7)
    # Unix socket paths must stay short: a /tmp folder, not pytest's deep tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rrray-", dir="/tmp")
    # Ray's token auth, with this test's own token (not the user's ~/.ray/auth_token): the head and the CLI share it.
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    runs = tmp_path / "runs"
    try:
        _wait_for_dashboard(url, head)
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={url}", "--working-dir=.",
             "--runtime-env-json", json.dumps({"env_vars": {"RETRORL_CACHE": str(cache_dir())}}),
             "--", "retrorl", "train", "--method", "sft", "--set", "model.path=tiny-llama",
             "--set", "env.kwargs={n_train: 2, n_seen: 1, n_unseen: 1}", "--set", "eval.trials=1",
             "--set", "agent.actor.max_new_tokens=8", "--set", "agent.max_steps=2", "--set", "rollout.env_workers=1",
             "--set", "rollout.envs_per_worker=2", "--set", f"run_root={runs}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert head.poll() is not None
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
