"""A real fatal fault under MPS, through mpsd, without vLLM: two torch co-tenants.

The cheapest proof of the fault domain on real hardware (a minute of GPU time): mpsd owns the
MPS daemon and runs two replicas of :mod:`tests.gpu.cotenant`; replica 0 stores to an illegal
address; replica 1 (a bystander that did nothing wrong) gets the same sticky error; mpsd sees
the fault, kills both, waits for the server to be ``ACTIVE`` again, keeps the daemon and
restarts both. Also shows that a CUDA client accepts ``CUDA_VISIBLE_DEVICES=<uuid>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpsd.supervise.tree import group_pids
from tests.gpu.gpu_env import GpuMpsd, Results, epoch, proc_environ, smi, trigger_fault
from tests.harness import http, wait_until

NEEDS_VLLM = False
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cotenants() -> Iterator[GpuMpsd]:
    workdir = Path(tempfile.mkdtemp(prefix="mf-"))
    m = GpuMpsd(workdir, vllm=False, cotenant_replicas=2)
    try:
        yield m
    finally:
        m.kill()
        out = os.environ.get("MPSD_GPU_OUT")
        if out:
            with contextlib.suppress(OSError):
                m.archive(Path(out) / "mps-fault-logs.tgz")
        shutil.rmtree(workdir, ignore_errors=True)


def test_fault_of_one_client_poisons_its_sibling_and_the_group_recovers(cotenants: GpuMpsd
                                                                        ) -> None:
    m = cotenants
    out = Path(os.environ.get("MPSD_GPU_OUT") or m.workdir)
    results = Results(out / "mps-fault") if out == m.workdir else Results(out)
    results.path = results.folder / "mps-fault.json"
    m.start()
    m.wait_running(timeout=180)
    engines = {e["key"]: e for e in m.status()["groups"][0]["engines"]}
    faulter, bystander = engines["gpu0/cotenant-0"], engines["gpu0/cotenant-1"]
    clients = m.mps_clients()
    all_clients = {c for cs in clients.values() for c in cs}
    assert group_pids(int(faulter["pid"])) & all_clients
    assert group_pids(int(bystander["pid"])) & all_clients
    env = proc_environ(int(faulter["pid"]))
    mps_pid = m.events("mps_daemon_ready", gpu="gpu0")[0]["pid"]

    t_fault = time.time()
    reply = trigger_fault(int(faulter["port"]))

    def bystander_health() -> tuple[int, str] | None:
        status, _, text = http("GET", f"http://127.0.0.1:{bystander['port']}/health", timeout=5)
        return (status, text.decode(errors="replace")) if status != 200 else None

    poisoned: tuple[int, str] | None = None
    with contextlib.suppress(AssertionError, OSError):
        poisoned = wait_until(bystander_health, timeout=5, what="bystander sees the fault")
    running = m.wait_running_again(t_fault, timeout=180)
    fault = m.events_after(t_fault - 1, "fault_detected", gpu="gpu0")[0]
    phases = {e["phase"]: e["seconds"] for e in m.events_after(t_fault, "recovery_phase")}
    fatal = [{"t": round(epoch(e) - t_fault, 3), "line": e.get("line")}
             for e in m.events_after(t_fault - 1, "mps_log") if e.get("kind") == "fatal"]
    cuda_lines = [{"t": round(epoch(e) - t_fault, 3), "engine": e.get("engine"),
                   "line": str(e.get("line"))[:300]}
                  for e in m.events_after(t_fault - 1, "output")
                  if "cotenant_" in str(e.get("line")) and epoch(e) <= epoch(running)]
    readies = [e["pid"] for e in m.events("mps_daemon_ready", gpu="gpu0")]
    servers = {str(s): m.mps_ctl(f"get_server_status {s}") for s in m.mps_clients()}
    results.put("mps_fault", {
        "gpu": smi("name,driver_version,memory.total,compute_mode,uuid"),
        "client_env": {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY")},
        "mps_clients_before": {str(k): v for k, v in clients.items()},
        "faulter_reply": reply,
        "bystander_health_after_fault": poisoned,
        "cotenant_output": cuda_lines[:10],
        "fault_signal": fault.get("signal"), "fault_reason": fault.get("reason"),
        "detect_s": round(epoch(fault) - t_fault, 3),
        "mps_phase_s": phases.get("mps"), "engine_phase_s": phases.get("engine"),
        "fault_to_running_s": round(epoch(running) - epoch(fault), 3),
        "mps_fatal_lines": fatal[:20],
        "server_status_after": servers,
        "mps_daemon_kept": readies == [mps_pid],
    })
    evidence = json.dumps([reply, cuda_lines, fatal]).lower()
    assert "illegal" in evidence or "fatal" in evidence, evidence
    assert [e["pid"] for e in m.events("mps_daemon_ready", gpu="gpu0")] == [mps_pid]
    assert not m.events_after(t_fault, "mps_daemon_replace")
    assert m.terminate(timeout=60) == 0
