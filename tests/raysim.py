"""A Ray cluster simulated on this machine for tests: a head started with `ray start --head` on 127.0.0.1 and worker
nodes that join it through Ray's Node API (as `ray.cluster_utils.Cluster` does; `ray start --address` refuses a
loopback head in Ray 2.60, DESIGN.md "Simulating a cluster here"). A worker node may run in its own mount namespace
with empty tmpfs folders over chosen paths, so it does not see the head's files there, as on a real cluster.

Everything started here is stopped by its process group; never `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's ray and retrorl


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 30) -> None:
    """Stop a process we started in its own session, then everything left in its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


# A worker node: joins the head's GCS as Ray's own test cluster does (ray/cluster_utils.py:264-278), then waits to
# be stopped. SIGTERM shuts its raylet and the processes it started down (Node(shutdown_at_exit=True)).
# Its runtime-env folder is its own (argv[4]), as on a machine of its own: every node shares the head's session dir
# here, and a node's agent setting a working_dir up deletes the unpacked package first
# (ray/_private/runtime_env/working_dir.py:260-266 passes overwrite=True; packaging.py:931-936 rmtree), which took
# the working directory from under another node's running actors (their imports failed on os.getcwd).
_NODE = textwrap.dedent("""
    import signal, sys, time
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=int(sys.argv[2]),
                       num_gpus=0, min_worker_port=0, max_worker_port=0, node_manager_port=0,
                       include_log_monitor=False, temp_dir=sys.argv[3], runtime_env_dir_name=sys.argv[4],
                       object_store_memory=200 * 1024 * 1024)
    params.dashboard_agent_listen_port = None
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print("NODE-UP", node.node_id, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)
""")


# What a process of this test session may carry that a cluster's processes must not inherit: the rendezvous an
# in-process Learner set up (its MASTER_PORT is bound by this process) and a Ray address or token of the caller's.
_NOT_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS", "RAY_AUTH_TOKEN")


@dataclass
class SimCluster:
    """A loopback head (with the dashboard and its job API) plus worker nodes; `stop()` ends all of them.

    `head_args` / `head_env` go to `ray start --head` only (e.g. an autoscaling config); `env` to every process."""

    work: Path  # the test's folder (logs)
    head_cpus: int = 0
    env: dict[str, str] = field(default_factory=dict)
    head_args: list[str] = field(default_factory=list)
    head_env: dict[str, str] = field(default_factory=dict)
    head: subprocess.Popen | None = None
    nodes: list[subprocess.Popen] = field(default_factory=list)
    node_ids: dict[int, str] = field(default_factory=dict)  # worker node process pid -> Ray node id

    def __post_init__(self) -> None:
        # Unix socket paths must stay short: a /tmp folder, not pytest's deep tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="rrsim-", dir="/tmp")
        self.token = uuid.uuid4().hex  # this cluster's own token, not the user's ~/.ray/auth_token
        token = Path(self.temp_dir) / "auth_token"  # beside Ray's files, which every node sees
        token.write_text(self.token)
        self.env = {**{k: v for k, v in os.environ.items() if k not in _NOT_INHERITED},
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), **self.env}
        (self.gcs, self.dashboard, self._client, self._agent_grpc, self._agent_http, self._runtime_env,
         self.metrics_port) = free_ports(7)
        self.url = f"http://127.0.0.1:{self.dashboard}"
        self.gcs_address = f"127.0.0.1:{self.gcs}"

    def start_head(self, timeout: float = 120) -> None:
        """`ray start --head` on this cluster's ports; returns once its dashboard answers."""
        args = [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={self._client}", f"--dashboard-agent-grpc-port={self._agent_grpc}",
            f"--dashboard-agent-listen-port={self._agent_http}", f"--runtime-env-agent-port={self._runtime_env}",
            f"--metrics-export-port={self.metrics_port}", f"--num-cpus={self.head_cpus}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *self.head_args]
        self.head = subprocess.Popen(args, env={**self.env, **self.head_env}, cwd=self.work,
                                     stdout=self._log("head"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise AssertionError(f"ray start exited with {self.head.returncode}: {self.log_tail('head')}")
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2).close()
                return
            except urllib.error.HTTPError:  # it answered: token auth refuses a bare request
                return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"no dashboard at {self.url} after {timeout}s")

    def add_node(self, cpus: int, hide: list[Path] = (), keep: dict[Path, Path] | None = None,
                 cores: str | None = None, timeout: float = 120) -> subprocess.Popen:
        """A worker node with `cpus` CPUs. `hide`: paths it sees as empty tmpfs folders (its own mount namespace).
        `keep`: {real path: alias} bind-mounted before hiding, so it can still reach those at the alias.
        `cores`: run it on these cores only (taskset list, e.g. "0"), as on a smaller machine."""
        name = f"node{len(self.nodes)}"
        python = [sys.executable, "-c", _NODE, self.gcs_address, str(cpus), self.temp_dir, f"runtime_resources_{name}"]
        if cores is not None:
            python = ["taskset", "-c", cores, *python]
        if hide:
            steps = []
            for real, alias in (keep or {}).items():
                Path(alias).mkdir(parents=True, exist_ok=True)
                Path(real).mkdir(parents=True, exist_ok=True)
                steps.append(f"mount --bind '{real}' '{alias}'")
            steps += [f"mkdir -p '{p}' && mount -t tmpfs retrorl-node '{p}'" for p in hide]
            script = " && ".join(steps + ['exec "$@"'])
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, name, *python]
        else:
            cmd = python
        proc = subprocess.Popen(cmd, env=self.env, cwd="/", stdout=self._log(name), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.nodes.append(proc)
        deadline = time.monotonic() + timeout
        while "NODE-UP" not in self.log_tail(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker node {name} did not start: {self.log_tail(name)}")
            time.sleep(0.5)
        self.node_ids[proc.pid] = self.log_tail(name).split("NODE-UP", 1)[1].split()[0]
        return proc

    def kill_node(self, proc: subprocess.Popen) -> None:
        """The node is gone at once (its raylet and workers SIGKILLed), as when a machine is terminated."""
        stop_group(proc, signal.SIGKILL, wait_s=10)

    def stop(self) -> None:
        """Every node, then the head (`ray start --block` stops what it launched on SIGTERM), then any process
        still naming this cluster's temp dir (an autoscaler's nodes are started outside the head's group)."""
        for proc in self.nodes:
            stop_group(proc)
        if self.head is not None:
            stop_group(self.head)
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Processes other than this one whose command line names this cluster's temp dir."""
        mine, found = os.getpid(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == mine:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline:
                found.append(int(entry.name))
        return found

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster's environment (token included)."""
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, args: list[str], runtime_env_json: str | None = None, timeout: float = 900,
               wait: bool = True, submission_id: str | None = None
               ) -> subprocess.CompletedProcess | subprocess.Popen:
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={self.url}", "--working-dir=."]
        if submission_id:
            cmd += [f"--submission-id={submission_id}"]
        if runtime_env_json:
            cmd += ["--runtime-env-json", runtime_env_json]
        cmd += ["--", *args]
        root = Path(__file__).resolve().parents[1]
        if wait:
            return subprocess.run(cmd, cwd=root, env=self.env, capture_output=True, text=True, timeout=timeout)
        return subprocess.Popen(cmd, cwd=root, env=self.env, stdout=self._log("job"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def run_tiny_sft(self, runs: Path, *extra: str) -> str:
        """`ray job submit` a short real SFT job (tiny model, 2 training games) writing under `runs`, with the test
        session's cache; asserts it succeeded and returns its log."""
        from envs.cache import resolve_cache_dir

        job = self.submit(
            ["retrorl", "train", "--method", "sft", "--set", "model.path=tiny-llama",
             "--set", "env.kwargs={n_train: 2, n_seen: 1, n_unseen: 1}", "--set", "eval.trials=1",
             "--set", "agent.actor.max_new_tokens=32", "--set", "agent.max_steps=2", "--set", "rollout.env_workers=1",
             "--set", "rollout.envs_per_worker=2", "--set", f"run_root={runs}", *extra],
            runtime_env_json=json.dumps({"env_vars": {"RETRORL_CACHE": str(resolve_cache_dir())}}))
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        return log

    def stop_job(self, submission_id: str) -> None:
        subprocess.run([str(BIN / "ray"), "job", "stop", f"--address={self.url}", submission_id], env=self.env,
                       capture_output=True, timeout=120)

    def actors(self, class_name: str) -> list[dict]:
        """Ray's state records of the live cluster's actors of one class (node_id, pid, num_restarts, ...)."""
        out = self.ray("list", "actors", f"--address={self.url}", "--format=json", "--detail", "--limit=1000",
                       f"--filter=class_name={class_name}")
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)

    def _log(self, name: str):
        return open(self.work / f"{name}.log", "ab")

    def log_tail(self, name: str, n: int = 4000) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""
