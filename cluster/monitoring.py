"""Monitoring on the head: Prometheus scraping Ray's metrics, and Grafana files for Ray's dashboards plus retrorl's.

Ray's dashboard draws no time-series chart by itself: its Metrics view embeds Grafana, which reads a Prometheus that
scrapes every node's metrics agent. Ray only writes the configuration for them; this module runs the Prometheus and
writes a Grafana setup that adds a retrorl dashboard (the `ray_retrorl_*` series of cluster/telemetry.py and vLLM's
engine stats) beside Ray's own.

    python -m cluster.monitoring start [--temp-dir /tmp/ray] [--port 9090] [--grafana-port 3000]
    python -m cluster.monitoring stop  [--temp-dir /tmp/ray]

`start` (after `ray start --head`) writes RAY_SESSION/metrics/retrorl/{prometheus.yml, grafana/}, starts the
`prometheus` binary (Debian package `prometheus`) on 127.0.0.1:PORT in the background, waits until it answers a
query and prints how to start Grafana. The Ray dashboard process reads RAY_PROMETHEUS_HOST / RAY_GRAFANA_HOST /
RAY_GRAFANA_IFRAME_HOST from its own environment at start, so they go on the `ray start --head` line (`env_lines`).

Ray facts this relies on (ray 2.60, paths under site-packages/ray/):
- The head's dashboard (ReporterHead) writes SESSION_DIR/prom_metrics_service_discovery.json every 5 s: a
  Prometheus file_sd list of every live node's metrics-export address plus the dashboard's and autoscaler's
  (dashboard/modules/reporter/reporter_head.py:157-159, started at :1231-1232; _private/metrics_agent.py:808-826
  content, :884-888 the path, :828-839 atomic replace, 5-second period at :795; the file name is
  _private/ray_constants.py:325). It also links TEMP_DIR/prom_metrics_service_discovery.json to it
  (metrics_agent.py:840-882).
- Ray's own prometheus.yml for the session is SESSION_DIR/metrics/prometheus/prometheus.yml, one `ray` job with that
  file_sd file (dashboard/modules/metrics/metrics_head.py:430-457, template templates.py:49-63); this module writes
  the same job with a shorter scrape interval. `ray metrics launch-prometheus` downloads a Prometheus release and
  runs it on Ray's packaged config for /tmp/ray only (install_and_start_prometheus.py:73-99, dashboard/consts.py:91-97),
  so it cannot work offline or with another --temp-dir; the Debian binary replaces it.
- Ray's Grafana files: SESSION_DIR/metrics/grafana/{grafana.ini, provisioning/dashboards/default.yml,
  provisioning/datasources/default.yml, dashboards/*.json}, written once when the dashboard starts (the folder is
  removed and rewritten: metrics_head.py:240-428, root :103 and :119-126; RAY_METRICS_OUTPUT_ROOT moves the root,
  :113-118). Its grafana.ini allows embedding and anonymous viewers (templates.py:3-14); its datasource is named
  RAY_PROMETHEUS_NAME, default "Prometheus" (metrics_head.py:43-44, :128-130), at RAY_PROMETHEUS_HOST (:291-293).
- The dashboard process reads RAY_GRAFANA_HOST (default http://localhost:3000) and RAY_PROMETHEUS_HOST (default
  http://localhost:9090) from its environment (metrics_head.py:39-40, :57-58, :99-102) to health-check them
  (:139-238); the browser's iframe loads RAY_GRAFANA_IFRAME_HOST, default RAY_GRAFANA_HOST (:63, :152-154, :177).
- Metric names: ray.util.metrics series are exported with the `ray_` prefix (namespace="ray",
  dashboard/modules/reporter/reporter_agent.py:530-535); vLLM's Ray stat logger exports `vllm:x` as `vllm_x`
  (vllm/v1/metrics/ray_wrappers.py:69-80), so `ray_vllm_x` (as Ray's own LLM dashboard queries them,
  dashboard/modules/metrics/dashboards/serve_llm_dashboard_panels.py:252, :295, :362). Counters carry a `_total`
  suffix (ray_retrorl_episodes_total: measured, tests/test_monitoring.py). The nodes' metrics exporters take no
  auth token under RAY_AUTH_MODE=token (measured); the dashboard's HTTP API does.
- retrorl's vLLM engine runs with disable_log_stats=True (rollout/vllm_engine.py), so the ray_vllm_* panels stay
  empty unless the engine logs stats through vLLM's RayPrometheusStatLogger; the engines' queue depth and tokens
  per busy second reach the dashboard as ray_retrorl_engine_* either way (Telemetry.engines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # ray/_private/ray_constants.py:325
PROMETHEUS_NAME = "Prometheus"  # Ray's datasource name, RAY_PROMETHEUS_NAME's default (metrics_head.py:43)
DASHBOARD_UID = "retrorl"
DEFAULT_PORT = 9090  # Ray's default RAY_PROMETHEUS_HOST port (metrics_head.py:39)
DEFAULT_GRAFANA_PORT = 3000  # Ray's default RAY_GRAFANA_HOST port (metrics_head.py:57)


# ---- where things are ----------------------------------------------------------------------------------------------

def session_dir(temp_dir: str | Path = "/tmp/ray") -> Path:
    """The head's current session folder: TEMP_DIR/session_latest resolved (Ray's SESSION_LATEST link)."""
    latest = Path(temp_dir) / "session_latest"
    if not latest.exists():
        raise FileNotFoundError(f"no Ray session under {temp_dir} (start the head first: ray start --head)")
    return latest.resolve()


def output_dir(session: str | Path) -> Path:
    """Where this module writes: SESSION/metrics/retrorl, beside Ray's metrics/prometheus and metrics/grafana
    (metrics_head.py:103); Ray rewrites only metrics/grafana at dashboard start (metrics_head.py:245-247)."""
    return Path(session) / "metrics" / "retrorl"


# ---- Prometheus ----------------------------------------------------------------------------------------------------

def prometheus_config(session: str | Path, scrape_interval: str = "5s") -> str:
    """prometheus.yml: Ray's `ray` scrape job (templates.py:49-63) on this session's discovery file."""
    discovery = Path(session) / DISCOVERY_FILE  # metrics_agent.py:884-888; metrics_head.py:449-451 does the same
    return (
        "# Written by retrorl (cluster/monitoring.py): Ray's scrape job, on this session's discovery file.\n"
        "global:\n"
        f"  scrape_interval: {scrape_interval}\n"
        f"  evaluation_interval: {scrape_interval}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        "    file_sd_configs:\n"
        f"      - files: [{json.dumps(str(discovery))}]\n"
        "        refresh_interval: 5s\n"
    )


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or next(
        (p for p in ("/usr/bin/prometheus", "/usr/local/bin/prometheus") if os.access(p, os.X_OK)), None)
    if found is None:
        raise FileNotFoundError("no `prometheus` binary: install Debian's package "
                                "(apt-get install --no-install-recommends prometheus)")
    return found


@dataclass
class Prometheus:
    """A Prometheus this module started (its own process group)."""

    process: subprocess.Popen
    url: str
    config: Path
    log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        return query(self.url, promql)

    def stop(self, timeout: float = 15) -> None:
        _stop_group(self.process.pid, timeout, self.process)


def start_prometheus(session: str | Path, port: int = DEFAULT_PORT, *, out: str | Path | None = None,
                     scrape_interval: str = "5s", binary: str | None = None, ready_s: float = 60) -> Prometheus:
    """Write OUT/prometheus.yml for this Ray session and start Prometheus on 127.0.0.1:PORT, data in OUT/data.

    Returns once it answers a query. Stop it with `.stop()` (or `stop_prometheus`; `ray metrics
    shutdown-prometheus` also works on port 9090: it posts /-/quit to localhost:9090, scripts/scripts.py:2908-2914,
    which --web.enable-lifecycle allows, as Ray's own launcher passes it, install_and_start_prometheus.py:87-92).
    """
    out = Path(out) if out is not None else output_dir(session)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "prometheus.yml"
    config.write_text(prometheus_config(session, scrape_interval))
    log = out / "prometheus.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            [binary or prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={out / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=out)
    (out / "prometheus.pid").write_text(str(process.pid))
    handle = Prometheus(process, url, config, log)
    deadline = time.monotonic() + ready_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}: {_tail(log)}")
        try:
            query(url, "vector(1)")  # Ray's own liveness probe (metrics_head.py:51)
            return handle
        except OSError:
            if time.monotonic() > deadline:
                handle.stop()
                raise RuntimeError(f"prometheus did not answer on {url} within {ready_s}s: {_tail(log)}")
            time.sleep(0.3)


def stop_prometheus(session: str | Path, out: str | Path | None = None) -> bool:
    """Stop the Prometheus `start_prometheus` started for this session (its pid file); False if none runs."""
    pid_file = (Path(out) if out is not None else output_dir(session)) / "prometheus.pid"
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"prometheus" not in cmdline:  # the pid was reused by something else
        return False
    _stop_group(pid)
    pid_file.unlink(missing_ok=True)
    return True


def query(url: str, promql: str, timeout: float = 5) -> list[dict[str, Any]]:
    """An instant PromQL query over Prometheus' HTTP API: the result vector."""
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}",
                                timeout=timeout) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed: {body}")
    return body["data"]["result"]


def _stop_group(pid: int, timeout: float = 15, process: subprocess.Popen | None = None) -> None:
    """SIGTERM to the process group PID leads (Prometheus exits in well under a second), SIGKILL after TIMEOUT."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:  # our child: reap it (a zombie still counts as a group member)
            if process.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process is not None:
        process.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- Grafana -------------------------------------------------------------------------------------------------------

def _panel(title: str, exprs: list[tuple[str, str]], unit: str = "short", description: str = "") -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
                     "legendFormat": legend, "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(exprs)],
    }


def _counter(name: str) -> str:
    """ray.util.metrics Counter `retrorl_x` is exported as `ray_retrorl_x_total` (OpenTelemetry counters)."""
    return f"ray_retrorl_{name}_total"


def retrorl_dashboard() -> dict[str, Any]:
    """The retrorl Grafana dashboard: every ray_retrorl_* series of cluster/telemetry.py by run, plus vLLM's engine
    stats as Ray exports them (`ray_vllm_*`, present when an engine logs stats through vLLM's Ray stat logger)."""
    run = 'run=~"$run"'
    ttft = "sum by (le) (rate(ray_vllm_time_to_first_token_seconds_bucket[$__rate_interval]))"
    rows: list[tuple[str, list[dict[str, Any]]]] = [
        ("Rollouts", [
            _panel("Episodes / s", [(f"sum by (run, phase) (rate({_counter('episodes')}{{{run}}}[$__rate_interval]))",
                                     "{{run}} {{phase}}")], "short", "episodes finished per second"),
            _panel("Env steps / s (rate of the counter)",
                   [(f"sum by (run, phase) (rate({_counter('env_steps')}{{{run}}}[$__rate_interval]))",
                     "{{run}} {{phase}}")]),
            _panel("Success rate of the last rollout", [(f"ray_retrorl_success_rate{{{run}}}", "{{run}} {{phase}}")],
                   "percentunit"),
            _panel("Generated tokens / s of the last rollout",
                   [(f"ray_retrorl_tokens_per_s{{{run}}}", "{{run}} {{phase}}")]),
            _panel("Env steps / s of the last rollout",
                   [(f"ray_retrorl_env_steps_per_s{{{run}}}", "{{run}} {{phase}}")]),
        ]),
        ("Policy and learner", [
            _panel("Policy version served", [(f"ray_retrorl_policy_version{{{run}}}", "{{run}} {{role}}")]),
            _panel("Policy lag (versions)", [(f"ray_retrorl_policy_lag{{{run}}}", "{{run}} {{role}}")]),
            _panel("Learner loss", [(f"ray_retrorl_learner_loss{{{run}}}", "{{run}} {{phase}} {{series}}")]),
            _panel("Adapter broadcast latency", [(f"ray_retrorl_broadcast_latency_s{{{run}}}", "{{run}}")], "s"),
        ]),
        ("Engines (retrorl's poll)", [
            _panel("Engine queue depth", [(f"ray_retrorl_engine_queue_depth{{{run}}}", "{{run}} engine {{engine}}")]),
            _panel("Engine tokens / busy s",
                   [(f"ray_retrorl_engine_tokens_per_busy_s{{{run}}}", "{{run}} engine {{engine}}")]),
        ]),
        ("vLLM engine stats (ray_vllm_*)", [
            _panel("vLLM requests running / waiting", [("sum by (instance) (ray_vllm_num_requests_running)",
                                                        "running {{instance}}"),
                                                       ("sum by (instance) (ray_vllm_num_requests_waiting)",
                                                        "waiting {{instance}}")]),
            _panel("vLLM KV cache usage", [("max by (instance) (ray_vllm_kv_cache_usage_perc)", "{{instance}}")],
                   "percentunit"),
            _panel("vLLM tokens / s", [("sum(rate(ray_vllm_generation_tokens_total[$__rate_interval]))", "generated"),
                                       ("sum(rate(ray_vllm_prompt_tokens_total[$__rate_interval]))", "prompt")]),
            _panel("vLLM time to first token (p50 / p95)", [
                (f"histogram_quantile({q}, {ttft})", f"p{round(q * 100)}") for q in (0.5, 0.95)], "s"),
        ]),
    ]
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for title, row in rows:
        panels.append({"type": "row", "title": title, "collapsed": False, "id": next_id, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row):
            panel["id"] = next_id
            panel["gridPos"] = {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)}
            panels.append(panel)
            next_id += 1
        y += 8 * ((len(row) + 2) // 3)
    templating = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 2, "current": {},
         "options": [], "refresh": 1},
        {"name": "run", "label": "run", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "definition": "label_values(run)",
         "query": {"query": 'label_values({__name__=~"ray_retrorl_.+"}, run)', "refId": "runs"},
         "includeAll": True, "multi": True, "allValue": ".+", "refresh": 2, "sort": 2,
         "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []},
    ]
    return {
        "uid": DASHBOARD_UID,
        "title": "retrorl",
        "tags": ["retrorl", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": templating},
        "annotations": {"list": []},
        "panels": panels,
    }


def write_grafana(session: str | Path, out: str | Path | None = None, *, prometheus_url: str,
                  grafana_port: int = DEFAULT_GRAFANA_PORT) -> Path:
    """Write a Grafana home OUT/grafana: grafana.ini (Ray's settings, templates.py:3-14, plus 127.0.0.1:PORT and a
    data folder), a datasource named like Ray's at PROMETHEUS_URL, and two dashboard providers: Ray's generated
    dashboards (SESSION/metrics/grafana/dashboards, metrics_head.py:123-126, so the dashboard's embedded panels
    resolve by the uids Ray reports) and the retrorl dashboard. Returns grafana.ini's path; start Grafana with
    `grafana-server --config OUT/grafana/grafana.ini --homepath <Grafana's share folder> web`."""
    root = (Path(out) if out is not None else output_dir(session)) / "grafana"
    provisioning = root / "provisioning"
    dashboards = root / "dashboards"
    for folder in (provisioning / "datasources", provisioning / "dashboards", dashboards, root / "data"):
        folder.mkdir(parents=True, exist_ok=True)
    ray_dashboards = Path(os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR",  # metrics_head.py:64, :123-126
                                         Path(session) / "metrics" / "grafana" / "dashboards"))
    ini = root / "grafana.ini"
    ini.write_text(
        "# Written by retrorl (cluster/monitoring.py); Ray's settings (ray/dashboard/modules/metrics/templates.py)\n"
        "[server]\n"
        "http_addr = 127.0.0.1\n"
        f"http_port = {grafana_port}\n"
        "[security]\n"
        "allow_embedding = true\n"
        "[auth.anonymous]\n"
        "enabled = true\n"
        "org_name = Main Org.\n"
        "org_role = Viewer\n"
        "[analytics]\n"
        "reporting_enabled = false\n"
        "check_for_updates = false\n"
        "check_for_plugin_updates = false\n"
        "[paths]\n"
        f"provisioning = {provisioning}\n"
        f"data = {root / 'data'}\n"
        f"logs = {root / 'data' / 'log'}\n"
    )
    (provisioning / "datasources" / "retrorl.yml").write_text(json.dumps({
        "apiVersion": 1,
        "datasources": [{"name": os.environ.get("RAY_PROMETHEUS_NAME", PROMETHEUS_NAME), "type": "prometheus",
                         "url": prometheus_url, "access": "proxy", "isDefault": True}],
    }, indent=2) + "\n")  # JSON is YAML
    (provisioning / "dashboards" / "retrorl.yml").write_text(json.dumps({
        "apiVersion": 1,
        "providers": [
            {"name": "Ray", "folder": "Ray", "type": "file", "options": {"path": str(ray_dashboards)}},
            {"name": "retrorl", "folder": "retrorl", "type": "file", "options": {"path": str(dashboards)}},
        ],
    }, indent=2) + "\n")
    (dashboards / "retrorl_grafana_dashboard.json").write_text(json.dumps(retrorl_dashboard(), indent=1) + "\n")
    return ini


def env_lines(port: int = DEFAULT_PORT, grafana_port: int = DEFAULT_GRAFANA_PORT,
              iframe_host: str | None = None) -> dict[str, str]:
    """The variables for the `ray start --head` line (the dashboard reads them at start, metrics_head.py:99-102,
    :152-154). RAY_GRAFANA_IFRAME_HOST is the Grafana address as the *browser* reaches it (a forwarded port)."""
    env = {"RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{port}", "RAY_GRAFANA_HOST": f"http://127.0.0.1:{grafana_port}"}
    if iframe_host:
        env["RAY_GRAFANA_IFRAME_HOST"] = iframe_host
    return env


# ---- command line --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.monitoring",
                                     description="Prometheus (and Grafana files) for a Ray head's metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("start", "write the configs and start Prometheus on 127.0.0.1 in the background"),
                            ("stop", "stop the Prometheus `start` started for this session"),
                            ("config", "only write prometheus.yml and the Grafana files")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--temp-dir", default="/tmp/ray", help="the head's Ray --temp-dir (default /tmp/ray)")
        p.add_argument("--session-dir", help="a Ray session folder (default: TEMP_DIR/session_latest)")
        p.add_argument("--out", help="output folder (default: SESSION/metrics/retrorl)")
        if name != "stop":
            p.add_argument("--port", type=int, default=DEFAULT_PORT, help="Prometheus port on 127.0.0.1")
            p.add_argument("--grafana-port", type=int, default=DEFAULT_GRAFANA_PORT, help="Grafana port on 127.0.0.1")
            p.add_argument("--scrape-interval", default="5s")
        if name == "start":
            p.add_argument("--foreground", action="store_true", help="stay until Ctrl-C, then stop Prometheus")
    args = parser.parse_args(argv)
    try:
        session = Path(args.session_dir) if args.session_dir else session_dir(args.temp_dir)
    except FileNotFoundError as exc:
        if args.command == "stop":  # nothing was started (e.g. before a node's first `ray start`)
            print(exc)
            return 0
        raise SystemExit(str(exc)) from None
    out = Path(args.out) if args.out else output_dir(session)
    if args.command == "stop":
        print("stopped" if stop_prometheus(session, out) else "no Prometheus of ours runs for this session")
        return 0
    url = f"http://127.0.0.1:{args.port}"
    ini = write_grafana(session, out, prometheus_url=url, grafana_port=args.grafana_port)
    if args.command == "config":
        (out / "prometheus.yml").write_text(prometheus_config(session, args.scrape_interval))
        print(f"wrote {out / 'prometheus.yml'} and {ini}")
        return 0
    stop_prometheus(session, out)  # a second `start` replaces the first
    prom = start_prometheus(session, args.port, out=out, scrape_interval=args.scrape_interval)
    print(f"Prometheus {url} (pid {prom.process.pid}, config {prom.config}, log {prom.log})")
    print(f"Grafana: grafana-server --config {ini} --homepath <Grafana's share folder, e.g. /usr/share/grafana> web")
    print("The Ray dashboard embeds them when its head was started with " +
          " ".join(f"{k}={v}" for k, v in env_lines(args.port, args.grafana_port).items()) + " ray start --head ...")
    if args.foreground:
        try:
            prom.process.wait()
        except KeyboardInterrupt:
            prom.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
