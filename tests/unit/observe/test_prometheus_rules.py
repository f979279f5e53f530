"""deploy/prometheus: the rules load, every alert is tested by ``promtool test rules``, carries
what an on-call person needs, and names only series mpsd exports.

promtool is Debian's ``prometheus`` package (scripts/test installs it under
MPSD_SYSTEM_CHECKS=1); without it the promtool checks skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mpsd.backend import Backend
from mpsd.observe.metrics import Metrics
from mpsd.pool import BackendPool
from tests.harness import REPO

RULES_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = [RULES_DIR / "mpsd-rules.yaml", RULES_DIR / "mpsd-alerts.yaml"]
TEST_FILES = sorted((RULES_DIR / "tests").glob("*.test.yaml"))
OPERATIONS = REPO / "docs" / "operations.md"
SEVERITIES = {"critical", "warning", "info"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package `prometheus`; scripts/test installs it "
           "with MPSD_SYSTEM_CHECKS=1)")


def rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules(RULES_DIR / "mpsd-alerts.yaml") if "alert" in r]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO)


@needs_promtool
def test_rule_files_pass_promtool_check() -> None:
    out = promtool("check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_the_example_prometheus_config_loads_the_rules() -> None:
    out = promtool("check", "config", str(RULES_DIR / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rule files found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert TEST_FILES
    out = promtool("test", "rules", *map(str, TEST_FILES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_expected_to_fire_in_a_promtool_test() -> None:
    fired = {case["alertname"] for path in TEST_FILES
             for test in yaml.safe_load(path.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert {a["alert"] for a in alerts()} <= fired


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives headings: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section_that_exists() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Mpsd[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        doc, _, anchor = notes["runbook_url"].partition("#")
        assert doc == "docs/operations.md" and anchor in anchors, (name, notes["runbook_url"])


def exported_series() -> set[str]:
    """Every sample name mpsd's /metrics can carry, from its registry's declared families."""
    names = set()
    for family in Metrics(BackendPool(), sampler=lambda uuid: None).registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "info": ["_info"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_rules_name_only_series_mpsd_exports() -> None:
    exported = exported_series()
    recorded = {r["record"] for path in RULE_FILES for r in rules(path) if "record" in r}
    for rule in rules(RULE_FILES[0]) + rules(RULE_FILES[1]):
        for name in re.findall(r"\b(mpsd_[a-z_]+|[a-z_]+:mpsd_[a-z_]+:[a-z0-9_]+)", rule["expr"]):
            # the group state `degraded` is a label value, not a series: nothing to check
            assert name in exported or name in recorded, (rule.get("alert", rule.get("record")),
                                                          name)


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for rule in [r for path in RULE_FILES for r in rules(path) if "record" in r]:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_ready_engines_per_model_count_zero_for_a_model_with_none() -> None:
    pool = BackendPool()
    for key, gpu, model in [("gpu0/a-0", "gpu0", "a"), ("gpu0/a-1", "gpu0", "a"),
                            ("gpu1/b-0", "gpu1", "b")]:
        pool.add(Backend(key, gpu, model, "http://127.0.0.1:1"))
    pool.set_routable("gpu0/a-1", True)
    body, _ = Metrics(pool, sampler=lambda uuid: None).render()
    ready = {s.labels["model"]: s.value for f in text_string_to_metric_families(body.decode())
             for s in f.samples if s.name == "mpsd_model_ready_engines"}
    assert ready == {"a": 1.0, "b": 0.0}
