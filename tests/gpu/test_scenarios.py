"""mpsd on a real GPU: real MPS, real vLLM engines, real faults (issue #6).

One ``mpsd run`` carries the scenarios in this order, because every vLLM start costs about a
minute of GPU time: (1) two qwen2.5-0.5b engines and a co-tenant start under one MPS server and
serve through the proxy; (2) ``kill -9`` of one engine under load recovers the whole group;
(4) a reload to one replica stops an engine on purpose under load, and the other engine answers
every request; (3) the co-tenant writes to an illegal address and poisons the shared context,
the group recovers and the MPS daemon is kept; (5) SIGTERM of mpsd under load leaves nothing
behind. Each scenario records its numbers in ``scenarios.json`` (``MPSD_GPU_OUT``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpsd.supervise.tree import group_pids
from tests.gpu.gpu_env import (
    FAKE,
    SERVED,
    GpuMpsd,
    Load,
    Record,
    Results,
    alive,
    compute_apps,
    deadline_left,
    epoch,
    gpu_memory_used_mib,
    proc_comm,
    proc_environ,
    smi,
    summarize,
    trigger_fault,
    vllm_shim,
)
from tests.harness import processes_mentioning, wait_until

pytestmark = pytest.mark.timeout(480)
VLLM_ENGINES = (f"gpu0/{SERVED}-0", f"gpu0/{SERVED}-1")
COTENANT = "gpu0/cotenant-0"


@pytest.fixture(scope="module")
def results() -> Results:
    out = Path(os.environ.get("MPSD_GPU_OUT") or tempfile.mkdtemp(prefix="mpsd-gpu-out-"))
    res = Results(out)
    res.put("host", {
        "gpu": smi("name,driver_version,memory.total,compute_mode,uuid"),
        "memory_used_mib_before": gpu_memory_used_mib(),
    })
    return res


@pytest.fixture(scope="module")
def daemon(results: Results) -> Iterator[GpuMpsd]:
    """The one ``mpsd run`` of this module; killed at the end whatever happened."""
    workdir = Path(tempfile.mkdtemp(prefix="mg-"))  # short: MPS pipe sockets live below it
    m = GpuMpsd(workdir, replicas=2)
    if not FAKE:
        m.executable = str(vllm_shim(workdir))
    try:
        yield m
    finally:
        m.kill()
        with contextlib.suppress(OSError):
            m.archive(results.folder / "gpu-logs.tgz")
        leftovers = list(processes_mentioning(str(workdir)))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)


def current_pids(m: GpuMpsd) -> dict[str, int]:
    """PIDs of the engines the daemon has now (a removed engine's last PID is not one)."""
    return {str(e["key"]): int(e["pid"]) for g in m.status()["groups"] for e in g["engines"]
            if e.get("pid")}


def require_time(seconds: float) -> None:
    left = deadline_left()
    if left < seconds:
        pytest.skip(f"only {left:.0f}s left before MPSD_GPU_DEADLINE, this needs ~{seconds:.0f}s")


def require_running(m: GpuMpsd) -> None:
    assert m.proc is not None and m.proc.poll() is None, f"mpsd is not running\n{m.tail()}"
    assert m.group_state("gpu0") == "running", f"gpu0 is {m.group_state('gpu0')}\n{m.tail()}"


def recovery_numbers(m: GpuMpsd, t_cause: float, records: list[Record]) -> dict[str, Any]:
    """Detection → unroutable → MPS phase → engine phase → running, and who failed when."""
    fault = m.events_after(t_cause - 1.0, "fault_detected", gpu="gpu0")[0]
    t_fault = epoch(fault)
    running = m.wait_running_again(t_fault, timeout=1)
    t_running = epoch(running)
    phases = {e["phase"]: e["seconds"] for e in m.events_after(t_fault, "recovery_phase")}
    readies = [e for e in m.events_after(t_fault, "engine_ready") if epoch(e) <= t_running + 0.5]
    restart_s = sum(float(e["seconds"]) for e in readies)
    backoff = m.events_after(t_fault, "group_state", gpu="gpu0", to="backoff")
    fatal_lines = [{"t": round(epoch(e) - t_cause, 3), "line": e.get("line")}
                   for e in m.events_after(t_cause - 1.0, "mps_log")
                   if e.get("kind") == "fatal" and epoch(e) <= t_running]
    cuda_errors = [{"t": round(epoch(e) - t_cause, 3), "engine": e.get("engine"),
                    "line": str(e.get("line"))[:200]}
                   for e in m.events_after(t_cause - 1.0, "output")
                   if epoch(e) <= t_running and any(
                       s in str(e.get("line")) for s in ("illegal memory access", "CUDA error",
                                                         "cudaError", "Xid"))]
    first_reject = next((r.t1 for r in sorted(records, key=lambda r: r.t1)
                         if r.t0 >= t_cause and not r.ok and r.status == 503), None)
    first_ok_after = next((r.t1 for r in sorted(records, key=lambda r: r.t1)
                           if r.t0 >= t_running and r.ok), None)
    inflight_failed = [r for r in records if not r.ok and r.t0 < t_fault and r.t1 >= t_cause - 0.5]
    rejected_down = [r for r in records if not r.ok and t_fault <= r.t0 < t_running]
    other_failed = [r for r in records if not r.ok and r not in inflight_failed
                    and r not in rejected_down]
    total = t_running - t_fault
    return {
        "fault_signal": fault.get("signal"),
        "fault_reason": fault.get("reason"),
        "detect_s": round(t_fault - t_cause, 3),
        "mps_phase_s": phases.get("mps"),
        "engine_phase_s": phases.get("engine"),
        "backoff": [e.get("reason") for e in backoff],
        "fault_to_running_s": round(total, 3),
        "engines_restart_s": round(restart_s, 3),
        "engine_ready_s": {str(e.get("engine")): e.get("seconds") for e in readies},
        "overhead_s": round(total - restart_s, 3),
        "first_503_after_cause_s": (None if first_reject is None
                                    else round(first_reject - t_cause, 3)),
        "first_ok_after_running_s": (None if first_ok_after is None
                                     else round(first_ok_after - t_running, 3)),
        "mps_fatal_lines": fatal_lines[:20],
        "engine_cuda_errors": cuda_errors[:20],
        "requests": summarize(records),
        "failed_inflight_at_fault": len(inflight_failed),
        "rejected_while_unroutable": len(rejected_down),
        "failed_other": len(other_failed),
        "failed_other_samples": [r.error[:160] for r in other_failed[:5]],
    }


# -- 1 ---------------------------------------------------------------------------------------


def test_s1_two_engines_under_mps_serve_through_the_proxy(daemon: GpuMpsd, results: Results
                                                          ) -> None:
    m = daemon
    t0 = time.time()
    m.start()
    m.wait_running(timeout=420)
    started = {e["engine"]: e for e in m.events("process_started") if "engine" in e}
    ready = {e["engine"]: e for e in m.events("engine_ready")}
    mps_ready = m.events("mps_daemon_ready", gpu="gpu0")
    assert len(mps_ready) == 1
    # sequential start: each engine is spawned only after the previous one is ready
    members = (*VLLM_ENGINES, COTENANT) if m.cotenant else VLLM_ENGINES
    order = [(epoch(started[k]), epoch(ready[k])) for k in members]
    for (_, prev_ready), (next_start, _) in itertools.pairwise(order):
        assert next_start >= prev_ready
    # settings applied and read back, and the server's own log line
    applied = m.status()["groups"][0]["mps"]["applied"]
    assert float(applied["default_active_thread_percentage"]) == 100
    readback = m.mps_ctl("get_default_active_thread_percentage")
    server_log = m.workdir / "log" / "gpu0" / "server.log"
    server_lines = [ln for ln in server_log.read_text(errors="replace").splitlines()
                    if "Active Threads Percentage" in ln] if server_log.exists() else []
    # both vLLM engines are MPS clients (their EngineCore children), and so is the co-tenant
    clients = m.mps_clients()
    all_clients = {c for cs in clients.values() for c in cs}
    engine_clients: dict[str, list[dict[str, Any]]] = {}
    for key in members:
        pid = int(started[key]["pid"])
        mine = sorted(group_pids(pid) & all_clients)
        engine_clients[key] = [{"pid": c, "comm": proc_comm(c)} for c in mine]
        assert mine, f"{key} (pid {pid}) has no MPS client among {sorted(all_clients)}"
    env0 = proc_environ(int(started[VLLM_ENGINES[0]]["pid"]))
    assert env0.get("CUDA_MPS_PIPE_DIRECTORY") == str(m.workdir / "run" / "gpu0" / "pipe")
    # chat and completions through the proxy with the official SDK, streaming and not
    import openai  # noqa: PLC0415

    client = openai.OpenAI(base_url=f"{m.url}/v1", api_key="unused", max_retries=0)
    models = [x.id for x in client.models.list().data]
    chat = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8)
    assert chat.choices[0].message.role == "assistant"
    stream_chunks = list(client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "Count to 5"}], max_tokens=8,
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in stream_chunks if c.choices)
    comp = client.completions.create(model=SERVED, prompt="Hello, my name is", max_tokens=8)
    assert comp.choices[0].text is not None
    comp_stream = list(client.completions.create(model=SERVED, prompt="Once upon a time",
                                                 max_tokens=8, stream=True))
    assert len(chat.choices) == 1 and stream_chunks and comp_stream
    status = m.status()
    results.put("s1", {
        "ok": True,
        "start_to_running_s": round(epoch(m.events("group_state", to="running")[0]) - t0, 3),
        "engine_ready_s": {k: v.get("seconds") for k, v in ready.items()},
        "argv": started[VLLM_ENGINES[0]].get("argv"),
        "mps_applied": applied, "mps_readback": readback, "server_log_settings": server_lines,
        "mps_clients": {str(k): v for k, v in clients.items()},
        "engine_clients": engine_clients,
        "engine_env": {k: env0.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_PIPE_DIRECTORY",
                                                 "CUDA_MPS_LOG_DIRECTORY")},
        "models": models,
        "chat": chat.choices[0].message.content, "chat_stream_chunks": len(stream_chunks),
        "chat_stream_text": text, "completion": comp.choices[0].text,
        "completion_stream_chunks": len(comp_stream),
        "compute_apps": compute_apps(),
        "memory_used_mib": gpu_memory_used_mib(),
        "status_line": status.get("status"),
    })


# -- 2 ---------------------------------------------------------------------------------------


def test_s2_kill9_of_one_engine_under_load_recovers_the_group(daemon: GpuMpsd,
                                                              results: Results) -> None:
    m = daemon
    require_running(m)
    require_time(160)
    before = current_pids(m)
    mps_pid = m.events("mps_daemon_ready", gpu="gpu0")[-1]["pid"]
    load = Load(m.url, concurrency=32, max_tokens=64).start()
    time.sleep(5)
    t_kill = time.time()
    os.kill(before[VLLM_ENGINES[1]], signal.SIGKILL)
    m.wait_running_again(t_kill, timeout=360)
    time.sleep(4)
    records = load.stop()
    numbers = recovery_numbers(m, t_kill, records)
    after = current_pids(m)
    numbers.update({
        "killed": VLLM_ENGINES[1], "killed_pid": before[VLLM_ENGINES[1]],
        "all_replaced": set(after.values()).isdisjoint(before.values()),
        "mps_daemon_kept": m.events("mps_daemon_ready", gpu="gpu0")[-1]["pid"] == mps_pid,
        "bar_overhead_le_2s": numbers["overhead_s"] <= 2.0,
    })
    results.put("s2", numbers)
    assert numbers["all_replaced"], (before, after)
    assert numbers["failed_other"] == 0, numbers["failed_other_samples"]
    assert numbers["failed_inflight_at_fault"] <= 32
    assert numbers["requests"]["ok"] > 0


# -- 4 ---------------------------------------------------------------------------------------


def test_s4_stopping_one_engine_under_load_costs_no_request(daemon: GpuMpsd,
                                                            results: Results) -> None:
    m = daemon
    require_running(m)
    require_time(90)
    before = current_pids(m)
    load = Load(m.url, concurrency=32, max_tokens=64).start()
    time.sleep(5)
    t_reload = time.time()
    m.reload(replicas=1)
    m.wait_log("reload_done", timeout=120)
    time.sleep(5)
    records = load.stop()
    removed = VLLM_ENGINES[1]
    evs = {name: m.events_after(t_reload, name) for name in (
        "reload_plan", "engine_rolled_out", "engine_stopped", "stop_deadline_passed",
        "mps_client_terminated", "terminate_client_failed", "fault_detected", "reload_done")}
    stopped = [e for e in evs["engine_stopped"] if e.get("engine") == removed]
    t_done = epoch(evs["reload_done"][0])
    fatal = [e.get("line") for e in m.events_after(t_reload, "mps_log") if e.get("kind") == "fatal"]
    numbers: dict[str, Any] = {
        "reload_plan": {k: evs["reload_plan"][0].get(k) for k in ("unchanged", "changed")}
        if evs["reload_plan"] else None,
        "rolled_out": [e.get("engine") for e in evs["engine_rolled_out"]],
        "stopped": [{k: e.get(k) for k in ("engine", "code")} for e in stopped],
        "reload_to_stopped_s": round(epoch(stopped[0]) - t_reload, 3) if stopped else None,
        "reload_s": round(t_done - t_reload, 3),
        "sigkill_deadline_passed": len(evs["stop_deadline_passed"]),
        "terminate_client_used": len(evs["mps_client_terminated"]),
        "faults": [e.get("reason") for e in evs["fault_detected"]],
        "mps_fatal_lines": fatal,
        "requests": summarize(records),
        "requests_after_reload": summarize([r for r in records if r.t0 >= t_reload]),
        "kept_engine_same_pid": current_pids(m)[VLLM_ENGINES[0]] == before[VLLM_ENGINES[0]],
    }
    results.put("s4", numbers)
    assert stopped, f"{removed} was not stopped\n{m.tail()}"
    assert not evs["fault_detected"], numbers["faults"]
    assert numbers["requests"]["failed"] == 0, numbers["requests"]
    assert numbers["kept_engine_same_pid"]


# -- 3 ---------------------------------------------------------------------------------------


def test_s3_cotenant_fault_poisons_the_context_and_the_group_recovers(daemon: GpuMpsd,
                                                                      results: Results) -> None:
    m = daemon
    if not m.cotenant:
        pytest.skip("no co-tenant (MPSD_GPU_COTENANT=0)")
    require_running(m)
    require_time(100)
    before = current_pids(m)
    mps_pid = m.events("mps_daemon_ready", gpu="gpu0")[-1]["pid"]
    servers_before = sorted(m.mps_clients())
    cotenant_port = next(e["port"] for e in m.status()["groups"][0]["engines"]
                         if e["key"] == COTENANT)
    load = Load(m.url, concurrency=32, max_tokens=64).start()
    time.sleep(4)
    t_fault = time.time()
    reply = trigger_fault(int(cotenant_port))
    m.wait_running_again(t_fault, timeout=360)
    time.sleep(4)
    records = load.stop()
    numbers = recovery_numbers(m, t_fault, records)
    status_after = {str(s): m.mps_ctl(f"get_server_status {s}") for s in m.mps_clients()}
    after = current_pids(m)
    numbers.update({
        "cotenant_reply": reply,
        "servers_before": servers_before, "server_status_after": status_after,
        "mps_daemon_kept": (len(m.events("mps_daemon_ready", gpu="gpu0")) == 1
                            and m.events("mps_daemon_ready", gpu="gpu0")[-1]["pid"] == mps_pid),
        "mps_daemon_replaced": len(m.events_after(t_fault, "mps_daemon_replace")),
        "all_replaced": set(after.values()).isdisjoint(before.values()),
    })
    results.put("s3", numbers)
    assert numbers["mps_daemon_kept"] and not numbers["mps_daemon_replaced"]
    assert numbers["all_replaced"], (before, after)
    assert numbers["failed_other"] == 0, numbers["failed_other_samples"]
    assert all(v in ("ACTIVE", "") for v in status_after.values()), status_after


# -- 5 ---------------------------------------------------------------------------------------


def test_s5_sigterm_under_load_leaves_nothing_behind(daemon: GpuMpsd, results: Results) -> None:
    m = daemon
    assert m.proc is not None and m.proc.poll() is None, f"mpsd is not running\n{m.tail()}"
    pids = set(current_pids(m).values())
    mps_pid = m.events("mps_daemon_ready", gpu="gpu0")[-1]["pid"]
    servers = set(m.mps_clients())
    clients = {c for cs in m.mps_clients().values() for c in cs}
    load = Load(m.url, concurrency=32, max_tokens=64).start()
    time.sleep(4)
    t_term = time.time()
    code = m.terminate(timeout=120)
    exit_s = time.time() - t_term
    records = load.stop()
    baseline = results.data.get("host", {}).get("memory_used_mib_before")

    def released() -> bool:
        used = gpu_memory_used_mib()
        return used is None or baseline is None or used <= baseline + 512

    with contextlib.suppress(AssertionError):
        wait_until(released, timeout=20, what="GPU memory released")
    leftovers = sorted(pid for pid in (*pids, mps_pid, *servers, *clients) if alive(pid))
    marked = list(processes_mentioning(str(m.workdir)))
    apps = compute_apps()
    numbers = {
        "exit_code": code, "sigterm_to_exit_s": round(exit_s, 3),
        "stopped": [e.get("engine") for e in m.events_after(t_term, "engine_stopped")],
        "sigkill_deadline_passed": len(m.events_after(t_term, "stop_deadline_passed")),
        "mps_daemon_stopped": bool(m.events_after(t_term, "mps_daemon_stopped")),
        "leftover_pids": leftovers, "processes_mentioning_workdir": marked,
        "compute_apps_after": apps,
        "memory_used_mib_before_start": baseline, "memory_used_mib_after": gpu_memory_used_mib(),
        "pipe_dir_removed": not (m.workdir / "run" / "gpu0" / "pipe").exists(),
        "requests": summarize(records),
        "latency_ok_p50_s": round(statistics.median([r.t1 - r.t0 for r in records if r.ok]), 3)
        if any(r.ok for r in records) else None,
    }
    results.put("s5", numbers)
    assert code == 0, m.tail()
    assert not leftovers and not marked, (leftovers, marked)
    assert not apps, apps
    assert released(), numbers
    assert numbers["pipe_dir_removed"]

