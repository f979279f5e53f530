"""deploy/kubernetes/prometheus-operator: the PodMonitor (or ServiceMonitor) scrapes both of
mpsd's endpoints on the port the DaemonSet and the Service really have, the PrometheusRule is
deploy/prometheus' rules as generated, and the kustomization renders.

The Kubernetes schema check of the base (kubernetes-validate) cannot know the operator's CRDs;
these checks are what can be said of them without a cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.harness import REPO

BASE = REPO / "deploy" / "kubernetes"
OVERLAY = BASE / "prometheus-operator"
PATHS = ["/metrics", "/metrics/engines"]
KUBECTL = shutil.which("kubectl")


def load(path: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((BASE / path).read_text())
    return doc


def test_the_pod_monitor_scrapes_both_endpoints_of_every_mpsd_pod() -> None:
    monitor, pods = load("prometheus-operator/podmonitor.yaml"), load("daemonset.yaml")
    template = pods["spec"]["template"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= template["metadata"]["labels"].items()
    ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["path"] for e in endpoints] == PATHS
    assert {e["port"] for e in endpoints} <= ports
    assert monitor["metadata"]["namespace"] == pods["metadata"]["namespace"]


def test_the_service_monitor_alternative_scrapes_the_same() -> None:
    monitor, service = load("prometheus-operator/servicemonitor.yaml"), load("service.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items())
    endpoints = monitor["spec"]["endpoints"]
    assert [e["path"] for e in endpoints] == PATHS
    assert {e["port"] for e in endpoints} <= {p["name"] for p in service["spec"]["ports"]}
    pod = load("prometheus-operator/podmonitor.yaml")["spec"]["podMetricsEndpoints"]
    assert endpoints == pod  # the same scrape, through the Service's endpoints


def test_the_prometheus_rule_is_the_rule_files_as_generated() -> None:
    printed = subprocess.run([sys.executable, str(REPO / "deploy" / "prometheus" /
                                                  "prometheusrule.py")],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert (OVERLAY / "prometheusrule.yaml").read_text() == printed, (
        "regenerate: python deploy/prometheus/prometheusrule.py > "
        "deploy/kubernetes/prometheus-operator/prometheusrule.yaml")
    groups = [g for name in ("mpsd-rules.yaml", "mpsd-alerts.yaml")
              for g in yaml.safe_load((REPO / "deploy" / "prometheus" / name).read_text())[
                  "groups"]]
    assert load("prometheus-operator/prometheusrule.yaml")["spec"]["groups"] == groups


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl (scripts/test installs "
                    "kubernetes-client with MPSD_SYSTEM_CHECKS=1)")
def test_the_kustomization_renders_one_monitor_and_the_rules() -> None:
    out = subprocess.run([str(KUBECTL), "kustomize", str(OVERLAY)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["PodMonitor", "PrometheusRule"]
    assert {d["metadata"]["namespace"] for d in docs} == {load("daemonset.yaml")["metadata"][
        "namespace"]}
