"""deploy/prometheus with the real servers: Debian's ``prometheus`` and
``prometheus-alertmanager`` started here on loopback (1 s scrape and evaluation), scraping an
``mpsd run`` on the fakes through the shipped example configuration and rules.

An engine crashed into a crash loop makes MpsdGpuFailed fire in Prometheus and reach
Alertmanager; ``mpsd restart`` resolves it in both. Every rule evaluates without error, every
recording rule and every dashboard query answers, and ``promtool check metrics`` finds nothing
to say about mpsd's live ``/metrics``. scripts/test installs the packages with
MPSD_SYSTEM_CHECKS=1; without them the test skips and says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import REPO, Mpsd, free_ports, http, wait_until

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    None in (PROMETHEUS, ALERTMANAGER, PROMTOOL),
    reason="Prometheus, Alertmanager or promtool not installed (Debian packages `prometheus` "
           "and `prometheus-alertmanager`; scripts/test installs them with MPSD_SYSTEM_CHECKS=1)")

DEPLOY = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "mpsd.json"
VLLM_COLON = re.compile(r"vllm:\w+ metric names should not contain ':'")


@dataclass
class Server:
    """One server process of the test, its log kept for a failure's message."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        code, _, body = http("GET", f"{self.url}{path}{query}")
        assert code == 200, (path, code, body[:500])
        return json.loads(body)


def start(argv: list[str], url: str, ready_path: str, log: Path) -> Server:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, url, log)

    def ready() -> bool:
        assert proc.poll() is None, f"{argv[0]} exited {proc.returncode}\n{server.tail()}"
        try:
            return http("GET", f"{url}{ready_path}", timeout=2)[0] == 200
        except OSError:
            return False

    wait_until(ready, 30, lambda: f"{argv[0]} ready\n{server.tail()}")
    return server


@pytest.fixture
def servers(mpsd: Mpsd) -> Iterator[tuple[Server, Server]]:
    """Alertmanager, then Prometheus with the shipped example config pointed at ``mpsd``."""
    assert PROMETHEUS and ALERTMANAGER
    work = mpsd.workdir
    prom_port, am_port = free_ports(2)
    (work / "am.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "log", "group_wait": "1s", "group_interval": "1s",
                  "repeat_interval": "1h"},
        "receivers": [{"name": "log"}]}))
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / name) for name in config["rule_files"]]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{am_port}"]}]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{mpsd.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    started: list[Server] = []
    try:
        started.append(start(
            [ALERTMANAGER, f"--config.file={work / 'am.yml'}", f"--storage.path={work / 'am'}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            f"http://127.0.0.1:{am_port}", "/-/ready", work / "alertmanager.log"))
        started.append(start(
            [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--rules.alert.resend-delay=1s"],
            f"http://127.0.0.1:{prom_port}", "/-/ready", work / "prometheus.log"))
        yield started[0], started[1]
    finally:
        for server in reversed(started):
            server.proc.terminate()
            try:
                server.proc.wait(20)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def firing(prometheus: Server, name: str) -> list[dict[str, Any]]:
    alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


def in_alertmanager(alertmanager: Server, name: str) -> list[dict[str, Any]]:
    alerts = alertmanager.get("/api/v2/alerts", active="true", silenced="false")
    return [a for a in alerts if a["labels"]["alertname"] == name
            and a["status"]["state"] == "active"]


def crash_into_a_loop(mpsd: Mpsd, gpu: str) -> None:
    """Crash the GPU's engine each time it is ready again, until the GPU is FAILED."""
    crashed: set[int] = set()

    def step() -> bool:
        group = next(g for g in mpsd.status()["groups"] if g["gpu"] == gpu)
        if group["state"] == "failed":
            return True
        engine = group["engines"][0]
        if engine["ready"] and engine["pid"] not in crashed:
            crashed.add(engine["pid"])
            mpsd.control(engine["port"], "crash")
        return False

    wait_until(step, 60, lambda: f"{gpu} failed after crashes\n{mpsd.tail()}")


def dashboard_queries() -> tuple[list[str], list[tuple[str, str]]]:
    """Every panel query of the Grafana dashboard, its variables set to match every series,
    and every variable's ``label_values(selector, label)`` (a Grafana function) as its parts."""
    doc = json.loads(DASHBOARD.read_text())
    values = {"instance": ".+", "gpu": ".+", "model": ".+", "__rate_interval": "1m"}
    panels = [re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)),
                     target["expr"])
              for panel in doc["panels"] for target in panel.get("targets", [])]
    variables = [re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"])
                 for v in doc["templating"]["list"] if v["type"] == "query"]
    assert all(variables)
    return panels, [(m.group(1).replace("$instance", ".+"), m.group(2))
                    for m in variables if m is not None]


def test_a_crash_loop_fires_in_prometheus_reaches_alertmanager_and_resolves(
        mpsd: Mpsd, servers: tuple[Server, Server]) -> None:
    alertmanager, prometheus = servers
    mpsd.gpus, mpsd.replicas, mpsd.mps = 2, 1, "off"
    mpsd.overrides = {"restart": {"max_restarts": 1}}  # the second crash in a row: FAILED
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    mpsd.wait_state("gpu1", "running")
    wait_until(lambda: {t["health"] for t in
                        prometheus.get("/api/v1/targets")["data"]["activeTargets"]} == {"up"},
               30, lambda: f"both targets up\n{prometheus.tail()}")
    for _ in range(3):
        assert http("POST", f"{mpsd.url}/v1/completions",
                    {"model": "tiny", "prompt": "hi", "max_tokens": 4})[0] == 200

    crash_into_a_loop(mpsd, "gpu0")
    fired = wait_until(lambda: firing(prometheus, "MpsdGpuFailed"), 30,
                       lambda: f"MpsdGpuFailed firing\n{prometheus.tail()}")
    assert [a["labels"]["gpu"] for a in fired] == ["gpu0"]
    assert fired[0]["labels"]["severity"] == "critical"
    assert "mpsd restart gpu0" in fired[0]["annotations"]["description"]
    received = wait_until(lambda: in_alertmanager(alertmanager, "MpsdGpuFailed"), 30,
                          lambda: f"MpsdGpuFailed in Alertmanager\n{alertmanager.tail()}")
    assert received[0]["labels"]["gpu"] == "gpu0"

    out = subprocess.run([sys.executable, "-m", "mpsd", "restart", "gpu0", "-c",
                          str(mpsd.config_file)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: mpsd.status()["groups"][0]["state"] == "running", 30,
               lambda: f"gpu0 running again\n{mpsd.tail()}")
    wait_until(lambda: not firing(prometheus, "MpsdGpuFailed"), 30,
               lambda: f"MpsdGpuFailed resolved in Prometheus\n{prometheus.tail()}")
    wait_until(lambda: not in_alertmanager(alertmanager, "MpsdGpuFailed"), 30,
               lambda: f"MpsdGpuFailed resolved in Alertmanager\n{alertmanager.tail()}")

    # every rule evaluated without error against the real series
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for path in ("mpsd-rules.yaml", "mpsd-alerts.yaml")
                             for g in yaml.safe_load((DEPLOY / path).read_text())["groups"])
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # every recording rule and every dashboard query answers
    recorded = [r["name"] for r in rules if r["type"] == "recording"]
    panels, variables = dashboard_queries()
    for query in recorded + panels:
        assert prometheus.get("/api/v1/query", query=query)["status"] == "success", query
    for selector, label in variables:  # each dashboard variable finds its values
        found = prometheus.get("/api/v1/query", query=selector)["data"]["result"]
        assert found and all(label in series["metric"] for series in found), selector
    series = prometheus.get("/api/v1/query", query="instance_model_code:mpsd_requests:rate1m")
    assert series["data"]["result"], "a recording rule over mpsd's own series has data"

    # promtool's lint: nothing about mpsd's own series; vLLM's names are kept as vLLM has them
    # (schedulers read them so), colon included, which is all it may say about those
    for path in ("/metrics", "/metrics/engines"):
        _, _, body = http("GET", f"{mpsd.url}{path}")
        check = subprocess.run([str(PROMTOOL), "check", "metrics"], input=body,
                               capture_output=True, timeout=60, check=False, text=False)
        said = (check.stdout + check.stderr).decode().splitlines()
        assert check.returncode in (0, 3), said  # 3: lint problems, listed
        assert [line for line in said if not VLLM_COLON.fullmatch(line)] == [], (path, said)
    assert mpsd.terminate() == 0
