"""The preflight: ``check-config``, ``mpsd run`` and ``mpsd reload`` give one verdict on a
config that cannot start here, before anything starts, and say what only start-up can tell."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mpsd import state_lock
from tests.harness import Mpsd


def mpsd_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpsd", *args], capture_output=True,
                          text=True, timeout=60, check=False, cwd=cwd)


@pytest.mark.parametrize(("engine", "said"), [
    ({"model": "./no-such-model"}, "model '{workdir}/no-such-model' does not exist"),
    ({"executable": "no-such-vllm"}, "executable 'no-such-vllm' not found or not executable"),
    ({"executable": "./bin/vllm"}, "executable '{workdir}/bin/vllm' not found"),
])
def test_check_config_and_run_refuse_alike(mpsd: Mpsd, engine: dict[str, str], said: str) -> None:
    """1. check-config exits 78 naming both replicas and the cause, a relative path resolved
    from the config's directory. 2. ``mpsd run`` exits 78 with the same lines at once, having
    started nothing."""
    mpsd.overrides = {"engine": engine}
    path = mpsd.write_config()
    expected = said.format(workdir=mpsd.workdir)
    check = mpsd_cli("check-config", "-c", str(path), cwd=Path("/"))
    assert check.returncode == 78, check.stderr
    verdict = [line for line in check.stderr.splitlines() if line.startswith("  - ")]
    assert verdict == [f"  - gpu0/tiny-0, gpu0/tiny-1: {expected}"] or (
        len(verdict) == 1 and expected in verdict[0]), check.stderr
    assert "only start-up can tell:" in check.stdout
    run = mpsd_cli("run", "-c", str(path))
    assert run.returncode == 78, run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("  - ")] == verdict
    assert not mpsd.engine_events.exists() and not mpsd.mps_events.exists()


def test_check_config_json_and_file_only(mpsd: Mpsd) -> None:
    mpsd.overrides = {"engine": {"model": "./no-such-model"}}
    path = mpsd.write_config()
    out = mpsd_cli("check-config", "--json", "-c", str(path))
    assert out.returncode == 78
    report = json.loads(out.stdout)
    assert report["checked"] == "host" and len(report["problems"]) == 1
    assert report["start_up_only"]
    loose = mpsd_cli("check-config", "--file-only", "-c", str(path))
    assert loose.returncode == 0, loose.stderr
    assert "checked: the file and its plan" in loose.stdout


def test_check_config_next_to_the_running_daemon_counts_its_ports_as_its_own(
        mpsd: Mpsd) -> None:
    """The daemon's engines and proxy hold their ports: check-config on the same file (what an
    operator runs before ``mpsd reload``) passes; the reload refuses what check-config refuses."""
    mpsd.replicas = 1
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    ok = mpsd_cli("check-config", "-c", str(mpsd.config_file))
    assert ok.returncode == 0, ok.stderr
    mpsd.overrides = {"engine": {"model": "./gone"}}
    mpsd.write_config()
    check = mpsd_cli("check-config", "-c", str(mpsd.config_file))
    reload = mpsd_cli("reload", "-c", str(mpsd.config_file))
    assert check.returncode == 78 and reload.returncode == 1
    assert f"model '{mpsd.workdir}/gone' does not exist" in check.stderr
    assert f"model '{mpsd.workdir}/gone' does not exist" in reload.stderr
    assert mpsd.terminate() == 0


def test_check_config_next_to_a_daemon_it_cannot_ask_leaves_the_ports_unchecked(
        mpsd: Mpsd) -> None:
    """Someone holds the state directory (a daemon whose control socket this user may not
    open; here, this test) and an engine's port is taken: check-config does not call the
    port another program's, and says that it did not check ports."""
    path = mpsd.write_config()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", mpsd.engine_port_base))
        taken.listen()
        owner = state_lock.acquire(mpsd.workdir / "run")
        try:
            out = mpsd_cli("check-config", "-c", str(path))
        finally:
            owner.release()
        alone = mpsd_cli("check-config", "-c", str(path))  # nobody owns it: the port counts
    assert out.returncode == 0, out.stderr
    assert "not the ports: the mpsd that owns daemon.state_dir did not answer" in out.stdout
    assert alone.returncode == 78
    assert f"port {mpsd.engine_port_base} on 127.0.0.1 is in use" in alone.stderr
