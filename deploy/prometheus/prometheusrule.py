"""mpsd-rules.yaml and mpsd-alerts.yaml as one PrometheusRule for the Prometheus Operator.

    python deploy/prometheus/prometheusrule.py \
        > deploy/kubernetes/prometheus-operator/prometheusrule.yaml

The rule files stay the source (promtool tests them); a test fails when the committed
PrometheusRule differs from what this prints.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCES = ("mpsd-rules.yaml", "mpsd-alerts.yaml")
HEADER = """\
# Generated from deploy/prometheus/mpsd-rules.yaml and mpsd-alerts.yaml: do not edit; change
# those, then run: python deploy/prometheus/prometheusrule.py > this file. A Prometheus that
# selects rules by label (kube-prometheus-stack: `release: <its name>`) needs that label added.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as literal blocks, as in the rule files."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                   style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def render() -> str:
    groups = [group for name in SOURCES
              for group in yaml.safe_load((HERE / name).read_text())["groups"]]
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "mpsd", "namespace": "mpsd",
                        "labels": {"app.kubernetes.io/name": "mpsd"}},
           "spec": {"groups": groups}}
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100,
                              allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
