"""Monitoring: a real Prometheus (Debian's `prometheus` binary, started by cluster/monitoring.py on 127.0.0.1) scrapes
a loopback Ray head through Ray's service-discovery file while a real `retrorl train` job runs there, and answers
PromQL queries for the job's ray_retrorl_* series; the retrorl Grafana dashboard's queries run against it too.
The head is this test's own (tests/raysim.py: own ports, /tmp temp dir, own auth token) and is stopped by its process
group, never `ray stop`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import monitoring
from cluster.telemetry import _RAY_METRICS
from raysim import SimCluster, free_ports



def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_retrorl_dashboard_charts_every_telemetry_series(tmp_path):
    dashboard = monitoring.retrorl_dashboard()
    text = " ".join(_exprs(dashboard))
    for name, kind, _, _ in _RAY_METRICS:  # counters are exported with a _total suffix
        assert re.search(rf"\bray_retrorl_{name}{'_total' if kind == 'counter' else ''}\b", text), name
    assert "ray_vllm_num_requests_running" in text and "ray_vllm_generation_tokens_total" in text
    assert dashboard["uid"] == "retrorl" and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])

    session = tmp_path / "session_x"
    ini = monitoring.write_grafana(session, prometheus_url="http://127.0.0.1:9999", grafana_port=3999)
    home = session / "metrics" / "retrorl" / "grafana"
    assert ini == home / "grafana.ini"
    settings = ini.read_text()
    assert "http_addr = 127.0.0.1" in settings and "http_port = 3999" in settings
    assert "allow_embedding = true" in settings and f"provisioning = {home / 'provisioning'}" in settings
    source = json.loads((home / "provisioning" / "datasources" / "retrorl.yml").read_text())["datasources"][0]
    assert (source["name"], source["url"], source["type"]) == ("Prometheus", "http://127.0.0.1:9999", "prometheus")
    providers = json.loads((home / "provisioning" / "dashboards" / "retrorl.yml").read_text())["providers"]
    paths = {p["name"]: p["options"]["path"] for p in providers}
    assert paths == {"Ray": str(session / "metrics" / "grafana" / "dashboards"), "retrorl": str(home / "dashboards")}
    assert json.loads((home / "dashboards" / "retrorl_grafana_dashboard.json").read_text()) == dashboard
    config = monitoring.prometheus_config(session)
    assert str(session / "prom_metrics_service_discovery.json") in config and "job_name: ray" in config


def _wait(what: str, check, timeout: float, head=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head is not None and head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode}")
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"no {what} after {timeout}s")


@pytest.mark.slow
def test_prometheus_scrapes_a_running_jobs_retrorl_series(tmp_path):
    assert shutil.which("prometheus"), "Debian's prometheus package is needed (apt-get install prometheus)"
    (prom_port,) = free_ports(1)
    # Ray's token auth as on the cluster, with this test's own token: the dashboard API wants it, while the
    # nodes' metrics exporters (what Prometheus scrapes) take none.
    sim = SimCluster(
        tmp_path, head_cpus=2,
        # the dashboard's Metrics view asks this Prometheus (ray/dashboard/modules/metrics/metrics_head.py:99-102)
        env={"RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{prom_port}", "RAY_GRAFANA_HOST": "DISABLED"},
        # nodes push recorded metrics to their exporter every second instead of every 10
        head_args=["--system-config", json.dumps({"metrics_report_interval_ms": 1000})])
    temp_dir, metrics, dashboard = sim.temp_dir, sim.metrics_port, sim.dashboard
    prom = None
    runs = tmp_path / "runs"
    try:
        sim.start_head()
        head = sim.head
        # The head's dashboard writes the discovery file once it is up (reporter_head.py:1231,
        # every 5 s, metrics_agent.py:795, :828-839)
        discovery = Path(temp_dir) / "session_latest" / monitoring.DISCOVERY_FILE
        exporter = f"127.0.0.1:{metrics}"  # the head node's metrics agent, listed once the node has registered
        _wait("head exporter in the discovery file",
              lambda: discovery.exists() and exporter in json.loads(discovery.read_text())[0]["targets"], 120, head)
        session = monitoring.session_dir(temp_dir)
        prom = monitoring.start_prometheus(session, prom_port, scrape_interval="1s")
        assert prom.url == f"http://127.0.0.1:{prom_port}"

        sim.run_tiny_sft(runs, "--set", "name=watched", "--set", "telemetry.tensorboard=false")
        (run,) = runs.iterdir()
        # The Ray dashboard sees it (its Metrics view stops asking to set up Prometheus).
        health = urllib.request.Request(f"http://127.0.0.1:{dashboard}/api/prometheus_health",
                                        headers={"Authorization": f"Bearer {sim.token}"})
        with urllib.request.urlopen(health, timeout=10) as response:
            assert json.loads(response.read())["result"] is True
        # Prometheus found the head's exporter through Ray's discovery file and scrapes it.
        up = prom.query(f'up{{job="ray", instance="{exporter}"}}')
        assert [r["value"][1] for r in up] == ["1"], up
        tag = f'run="{run.name}"'
        # Everything the job's driver recorded, over the job's time (the driver's series may go stale after it ends).
        wanted = {"ray_retrorl_episodes_total", "ray_retrorl_env_steps_total", "ray_retrorl_success_rate",
                  "ray_retrorl_tokens_per_s", "ray_retrorl_learner_loss", "ray_retrorl_policy_version"}

        def scraped():
            found = prom.query(f'{{__name__=~"ray_retrorl_.+", {tag}}}[15m]')
            return found if wanted <= {r["metric"]["__name__"] for r in found} else None

        found = _wait("ray_retrorl_* series of the run", scraped, 30)
        assert all(r["metric"]["run"] == run.name and r["metric"]["job"] == "ray" for r in found)
        assert {r["metric"]["SessionName"] for r in found} == {session.name}
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        episodes = sum(r["episodes"] for r in records if r["event"] == "rollout")
        totals = prom.query(f"sum(max_over_time(ray_retrorl_episodes_total{{{tag}}}[15m]))")
        assert float(totals[0]["value"][1]) == episodes  # the counter reached the run's episode count
        served = prom.query(f'max_over_time(ray_retrorl_policy_version{{{tag}, role="actor"}}[15m])')
        last = [r["versions"]["actor"] for r in records if r["event"] == "broadcast"][-1]
        assert float(served[0]["value"][1]) == last

        # Every retrorl dashboard query is valid PromQL for this Prometheus, and its retrorl panels have data.
        for expr in _exprs(monitoring.retrorl_dashboard()):
            result = prom.query(expr.replace('"$run"', f'"{run.name}"').replace("$__rate_interval", "15m")
                                if "rate(" in expr else f"max_over_time(({expr.replace('$run', run.name)})[15m:1s])")
            if "ray_retrorl_" in expr and any(n in expr for n in ("episodes", "success_rate", "tokens_per_s")):
                assert result, expr
        # Ray's generated Grafana dashboards, which the retrorl Grafana files provision beside the retrorl one
        assert (session / "metrics" / "grafana" / "dashboards" / "default_grafana_dashboard.json").is_file()
    finally:
        if prom is not None:
            prom.stop()
        sim.stop()
    assert sim.head.poll() is not None and prom.process.poll() is not None
