"""deploy/kubernetes/ checked without a cluster: schemas, and agreement with mpsd itself.

What can be checked here: the ConfigMap's mpsd.toml loads with mpsd's own loader; probes,
preStop and ports name mpsd's real endpoints and commands; the grace periods add up (the pod's
termination grace outlasts the drain, the drain's readiness grace outlasts the probe, and the
same for systemd's TimeoutStopSec with the default config); every manifest passes the Kubernetes
OpenAPI schema (kubernetes-validate, strict) and the kustomization renders (kubectl kustomize).
``kubectl apply --dry-run=client`` needs an API server even so (it asks for the API's resource
list), so it runs only where ``kubectl cluster-info`` answers.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpsd.cli import _parser
from mpsd.config import Config, load_config, parse_config
from tests.harness import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
VALIDATE = REPO / ".venv-cluster" / "bin" / "kubernetes-validate"
KUBECTL = shutil.which("kubectl")
#: What mpsd needs after SIGTERM once ``mpsd drain --all`` has stopped every GPU: the proxy's
#: drain of connections still open (at most drain_timeout_s), and a margin for process exits.
MARGIN_S = 15.0


def daemonset() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    return doc


def container() -> dict[str, Any]:
    (only,) = daemonset()["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = only
    return c


def config() -> Config:
    return load_config(DEPLOY / "mpsd.toml")


def stop_budget(c: Config) -> float:
    """Leaving the rotation, draining and stopping every GPU (in parallel), then the proxy."""
    stop_timeout = max(e.stop_timeout_s for g in c.gpu for e in g.engine)
    return (c.proxy.unready_grace_s + c.proxy.drain_timeout_s + stop_timeout
            + c.mps.command_timeout_s + c.proxy.drain_timeout_s)


def test_the_configmap_config_loads_and_listens_where_the_pod_says() -> None:
    c = config()
    (port,) = container()["ports"]
    assert c.proxy.host == "0.0.0.0" and c.proxy.port == port["containerPort"]
    volumes = {v["name"]: v for v in daemonset()["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    assert str(c.daemon.state_dir) in mounts and "hostPath" in volumes[mounts[
        str(c.daemon.state_dir)]]  # the MPS pipe directories live on the host
    assert "/etc/mpsd" in mounts and volumes[mounts["/etc/mpsd"]]["configMap"]["name"] == (
        "mpsd-config")


def test_probes_and_prestop_use_mpsd_endpoints_and_commands() -> None:
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    prestop = c["lifecycle"]["preStop"]["exec"]["command"]
    args = _parser().parse_args(prestop[1:])
    assert (prestop[0], args.command, args.all, args.config) == (
        "mpsd", "drain", True, "/etc/mpsd/mpsd.toml")
    assert _parser().parse_args(c["command"][1:]).command == "run"
    annotations = daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == c["ports"][0]["containerPort"]
    spec = daemonset()["spec"]["template"]["spec"]
    assert spec["hostIPC"] is True
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env[
        "NVIDIA_DRIVER_CAPABILITIES"]


def test_the_pod_runs_without_root_and_its_namespace_says_what_it_needs() -> None:
    """hostIPC and hostPath need Pod Security "privileged" on the namespace; everything else is
    as tight as "restricted" asks: non-root, no capabilities, no privilege escalation, the
    runtime's seccomp profile, a read-only root filesystem. Only the init container that hands
    the hostPath directories to the mpsd user runs as root, with CAP_CHOWN alone."""
    spec = daemonset()["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    own = container()["securityContext"]
    assert own["allowPrivilegeEscalation"] is False and own["readOnlyRootFilesystem"] is True
    assert own["capabilities"] == {"drop": ["ALL"]}
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert init["command"][:2] == ["chown", f"{pod['runAsUser']}:{pod['runAsGroup']}"]
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert set(init["command"][2:]) == host_paths
    namespace = yaml.safe_load((DEPLOY / "namespace.yaml").read_text())
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_scraped_in_one_place_and_probed_with_patience() -> None:
    service = yaml.safe_load((DEPLOY / "service.yaml").read_text())
    assert not any(k.startswith("prometheus.io/")
                   for k in service["metadata"].get("annotations", {}))
    c = container()
    assert c["readinessProbe"]["failureThreshold"] >= 2
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert "initialDelaySeconds" not in c["livenessProbe"]  # the startup probe gates it
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HOME"] in mounts and "/tmp" in mounts  # caches survive; the root stays read-only


def test_grace_periods_add_up() -> None:
    c = config()
    readiness = container()["readinessProbe"]
    noticed_within = readiness["periodSeconds"] * readiness["failureThreshold"]
    assert c.proxy.unready_grace_s > noticed_within
    grace = daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= stop_budget(c) + MARGIN_S


def test_systemd_stop_timeout_covers_the_default_stop() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((REPO / "systemd" / "mpsd.service").read_text())
    timeout = float(unit["Service"]["TimeoutStopSec"])
    defaults = parse_config({"gpu": [{"device": "0", "engine": [{"model": "m"}]}]})
    assert timeout >= stop_budget(defaults) + MARGIN_S


@pytest.mark.skipif(not VALIDATE.exists(), reason="no kubernetes-validate: scripts/test installs "
                    "it into .venv-cluster")
def test_manifests_pass_the_kubernetes_schema() -> None:
    result = subprocess.run([str(VALIDATE), "--strict", *map(str, MANIFESTS)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(MANIFESTS)


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl")
def test_the_kustomization_renders_with_the_config_as_a_configmap(tmp_path: Path) -> None:
    out = subprocess.run([str(KUBECTL), "kustomize", str(DEPLOY)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "RuntimeClass", "Service"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    volume = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == cm["metadata"]["name"]  # the generated name
    assert cm["data"]["mpsd.toml"] == (DEPLOY / "mpsd.toml").read_text()
    if VALIDATE.exists():
        rendered = tmp_path / "rendered.yaml"
        rendered.write_text(out)
        check = subprocess.run([str(VALIDATE), "--strict", str(rendered)], capture_output=True,
                               text=True, timeout=120, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def _cluster_reachable() -> bool:
    if KUBECTL is None:
        return False
    probe = subprocess.run([KUBECTL, "cluster-info", "--request-timeout=5s"],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _cluster_reachable(), reason="kubectl apply --dry-run=client needs an "
                    "API server (for the list of resource types); none is reachable here")
def test_kubectl_apply_dry_run() -> None:
    subprocess.run([str(KUBECTL), "apply", "--dry-run=client", "-k", str(DEPLOY)],
                   check=True, timeout=120)
