"""deploy/grafana/mpsd.json is what mpsd_dashboard.py builds, and every query in it names only
series mpsd exports or deploy/prometheus records (the end-to-end test runs them all against a
real Prometheus: tests/integration/observe/test_prometheus_e2e.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.harness import REPO
from tests.unit.observe.test_prometheus_rules import RULE_FILES, exported_series, rules

GRAFANA = REPO / "deploy" / "grafana"


def generated() -> str:
    """What ``python deploy/grafana/mpsd_dashboard.py`` prints (the documented command)."""
    pytest.importorskip("grafanalib", reason="grafanalib not installed (pip install -e '.[test]')")
    return subprocess.run([sys.executable, str(GRAFANA / "mpsd_dashboard.py")],
                          capture_output=True, text=True, timeout=60, check=True).stdout


def committed() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GRAFANA / "mpsd.json").read_text())
    return doc


def test_the_committed_json_is_what_the_generator_builds() -> None:
    assert (GRAFANA / "mpsd.json").read_text() == generated(), (
        "regenerate: python deploy/grafana/mpsd_dashboard.py > deploy/grafana/mpsd.json")


def test_every_panel_uses_the_prometheus_datasource_variable() -> None:
    doc = committed()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "gpu", "model"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def test_every_query_names_only_exported_or_recorded_series() -> None:
    known = exported_series() | {r["record"] for path in RULE_FILES for r in rules(path)
                                 if "record" in r}
    exprs = [t["expr"] for p in committed()["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in committed()["templating"]["list"] if v["type"] == "query"]
    for expr in exprs:
        for name in re.findall(r"\b([a-z_]+:[a-z_]+:[a-z0-9_]+|mpsd_[a-z_]+|process_[a-z_]+)",
                               expr):
            assert name in known, (name, expr)


def test_rows_cover_the_node_each_gpu_and_each_model() -> None:
    titles = [p["title"] for p in committed()["panels"] if p["type"] == "row"]
    assert titles == ["Node", "Per GPU", "Per model"]
