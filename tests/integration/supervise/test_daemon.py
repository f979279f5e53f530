"""``mpsd run`` end to end: ordered start, the fault signals, recovery, budgets, shutdown.

Each test starts the real daemon as a subprocess with the fake MPS control binary and fake
vLLM engines (real processes, real sockets) and reads what happened from the JSON logs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import REPO, Mpsd, http, wait_until


def running(m: Mpsd, gpus: int = 1, timeout: float = 30.0) -> None:
    for i in range(gpus):
        m.wait_state(f"gpu{i}", "running", timeout)


def log_index(m: Mpsd, event: str, **match: object) -> int:
    """Position of the first matching event in mpsd's log (the log has one writer)."""
    for i, e in enumerate(m.log()):
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {event} {match}")


def test_ordered_start_and_serving(mpsd: Mpsd) -> None:
    mpsd.start()
    running(mpsd)
    mps_started = log_index(mpsd, "mps_daemon_ready", gpu="gpu0")
    first_start = log_index(mpsd, "process_started", engine="gpu0/tiny-0")
    first_ready = log_index(mpsd, "engine_ready", engine="gpu0/tiny-0")
    second_start = log_index(mpsd, "process_started", engine="gpu0/tiny-1")
    assert mps_started < first_start < first_ready < second_start
    # both engines are MPS clients of the group's server
    servers = mpsd.mps_command("gpu0", "get_server_list").split()
    clients = {int(p) for p in mpsd.mps_command("gpu0", f"get_client_list {servers[0]}").split()}
    assert len(clients) == 2
    code, _, body = http("POST", f"{mpsd.url}/v1/completions",
                         {"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert code == 200, body
    assert mpsd.terminate() == 0


def test_kill9_of_one_engine_recovers_its_whole_group_only(mpsd: Mpsd) -> None:
    mpsd.gpus = 2
    mpsd.start()
    running(mpsd, gpus=2)
    before = mpsd.engine_pids("gpu0")
    other = mpsd.engine_pids("gpu1")
    os.kill(before["gpu0/tiny-0"], signal.SIGKILL)
    mpsd.wait_state("gpu0", "recovering")
    mpsd.wait_state("gpu0", "running", after=1)
    after = mpsd.engine_pids("gpu0")
    assert set(after.values()).isdisjoint(before.values())  # both engines were replaced
    assert mpsd.engine_pids("gpu1") == other
    assert [e["to"] for e in mpsd.events("group_state", gpu="gpu1")] == ["starting", "running"]
    assert len(mpsd.events("mps_daemon_ready", gpu="gpu0")) == 1  # the daemon was kept
    phases = {e["phase"] for e in mpsd.events("recovery_phase", gpu="gpu0")}
    assert phases == {"mps", "engine"}
    assert mpsd.terminate() == 0


def test_mps_off_restarts_only_the_dead_engine(mpsd: Mpsd) -> None:
    mpsd.mps = "off"
    mpsd.start()
    running(mpsd)
    before = mpsd.engine_pids()
    os.kill(before["gpu0/tiny-0"], signal.SIGKILL)
    mpsd.wait_log("engine_ready", engine="gpu0/tiny-0", count=2)
    after = mpsd.engine_pids()
    assert after["gpu0/tiny-1"] == before["gpu0/tiny-1"]
    assert after["gpu0/tiny-0"] != before["gpu0/tiny-0"]
    assert "recovering" not in [e["to"] for e in mpsd.events("group_state", gpu="gpu0")]
    assert not mpsd.events("mps_daemon_ready")
    assert mpsd.terminate() == 0


def test_hung_engine_fails_health_and_group_recovers(mpsd: Mpsd) -> None:
    mpsd.start()
    running(mpsd)
    port = mpsd.engine_ports()[1]
    mpsd.control(port, "hang")
    faults = mpsd.wait_log("fault_detected", gpu="gpu0")
    assert faults[0]["signal"] == "health"
    mpsd.wait_state("gpu0", "running", after=1)
    assert mpsd.terminate() == 0


def test_simulated_mps_fault_recovers_without_restarting_the_daemon(mpsd: Mpsd) -> None:
    mpsd.start()
    running(mpsd)
    mpsd.mps_command("gpu0", "fake_fault")
    faults = mpsd.wait_log("fault_detected", gpu="gpu0")
    assert faults[0]["signal"] in {"mps_log", "mps_status", "engine_exit"}
    mpsd.wait_state("gpu0", "running", after=1)
    assert len(mpsd.events("mps_daemon_ready", gpu="gpu0")) == 1
    assert not mpsd.events("mps_daemon_replace")
    assert mpsd.terminate() == 0


def test_mps_daemon_killed_is_replaced_before_engines_start(mpsd: Mpsd) -> None:
    mpsd.start()
    running(mpsd)
    daemon = mpsd.events("process_started", name="mps-control-gpu0")[0]["pid"]
    os.kill(daemon, signal.SIGKILL)
    mpsd.wait_state("gpu0", "running", after=1)
    readies = [i for i, e in enumerate(mpsd.log()) if e.get("event") == "mps_daemon_ready"]
    assert len(readies) == 2
    restarted = [i for i, e in enumerate(mpsd.log())
                 if e.get("event") == "process_started" and e.get("engine")]
    assert all(i > readies[1] for i in restarted[2:])
    assert mpsd.terminate() == 0


def test_crash_loop_fails_the_group_and_the_daemon_stays_up(mpsd: Mpsd) -> None:
    mpsd.gpus = 2
    base = mpsd.engine_port_base
    mpsd.engine_env = {f"FAKE_ENGINE_CRASH_AFTER_S_PORT_{base}": "1.0"}
    mpsd.start()
    mpsd.wait_state("gpu0", "failed", timeout=60)
    failed = mpsd.events("group_state", gpu="gpu0", to="failed")[0]
    assert "crash loop" in failed["reason"]
    assert len(mpsd.events("fault_detected", gpu="gpu0")) == 4  # max_restarts 3, then FAILED
    mpsd.wait_state("gpu1", "running")
    assert mpsd.proc is not None and mpsd.proc.poll() is None
    status = mpsd.status()
    gpu0 = next(g for g in status["groups"] if g["gpu"] == "gpu0")
    assert gpu0["state"] == "failed" and "crash loop" in gpu0["reason"]
    assert mpsd.terminate() == 0


def engine_of(m: Mpsd, gpu: str, key: str) -> dict[str, object]:
    group = next(g for g in m.status()["groups"] if g["gpu"] == gpu)
    engine: dict[str, object] = next(e for e in group["engines"] if e["key"] == key)
    return engine


def test_every_gpu_failed_leaves_the_daemon_up_alive_and_not_ready(mpsd: Mpsd) -> None:
    """A FAILED GPU, even the only one, is a state with its reason: mpsd stays up (liveness
    200, readiness 503) for the operator's ``mpsd restart``; its exit is for SIGTERM."""
    mpsd.engine_env = {"FAKE_ENGINE_FAIL_START": "1"}
    mpsd.start()
    mpsd.wait_state("gpu0", "failed")
    reason = mpsd.status()["groups"][0]["reason"]
    assert "every engine failed" in reason and "crash loop" in reason, reason
    assert http("GET", f"{mpsd.url}/health")[0] == 503
    assert http("GET", f"{mpsd.url}/livez")[0] == 200
    assert mpsd.proc is not None and mpsd.proc.poll() is None
    assert mpsd.terminate() == 0


def test_an_engine_failing_at_boot_fails_alone_and_its_gpu_is_degraded(mpsd: Mpsd) -> None:
    """Restart intensity per engine: the engine that cannot start is restarted
    ``max_restarts`` times, then FAILED alone; its sibling serves (DEGRADED), gpu1 runs."""
    mpsd.gpus = 2
    mpsd.engine_env = {f"FAKE_ENGINE_FAIL_START_PORT_{mpsd.engine_port_base}": "1"}
    mpsd.start()
    mpsd.wait_state("gpu0", "degraded")
    mpsd.wait_state("gpu1", "running")
    failed = engine_of(mpsd, "gpu0", "gpu0/tiny-0")
    assert failed["state"] == "failed" and "crash loop" in str(failed["reason"]), failed
    assert engine_of(mpsd, "gpu0", "gpu0/tiny-1")["state"] == "ready"
    starts = [e for e in mpsd.events("process_started") if e.get("engine") == "gpu0/tiny-0"]
    assert len(starts) == 4  # max_restarts 3: the first start and three restarts
    assert len(mpsd.events("group_state", gpu="gpu0", to="starting")) == 1  # never the group
    metrics = http("GET", f"{mpsd.url}/metrics")[2].decode()
    assert 'mpsd_engine_state{engine="gpu0/tiny-0",gpu="gpu0",state="failed"} 1.0' in metrics
    assert 'mpsd_group_state{gpu="gpu0",state="degraded"} 1.0' in metrics
    assert mpsd.terminate() == 0


def test_engine_ignoring_sigterm_is_killed_after_the_deadline(mpsd: Mpsd) -> None:
    mpsd.engine_env = {"FAKE_ENGINE_IGNORE_SIGTERM": "1"}
    mpsd.start()
    running(mpsd)
    started = time.monotonic()
    assert mpsd.terminate() == 0
    assert time.monotonic() - started < 20
    assert len(mpsd.events("stop_deadline_passed")) == 2
    # with MPS on, the safe stop asks the server to terminate the client before SIGKILL
    assert mpsd.events("mps_client_terminated")


def test_sigterm_during_slow_start_exits_promptly(mpsd: Mpsd) -> None:
    mpsd.engine_env = {"FAKE_ENGINE_START_DELAY_S": "60"}
    mpsd.start()
    mpsd.wait_log("process_started", engine="gpu0/tiny-0")
    started = time.monotonic()
    assert mpsd.terminate() == 0
    assert time.monotonic() - started < 15


def test_engine_environment_is_allow_listed(mpsd: Mpsd) -> None:
    os.environ["NOTIFY_SOCKET"] = "/nonexistent/notify"
    try:
        mpsd.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    running(mpsd)
    envs = wait_until(lambda: mpsd.engine_events_of("env"), what="engine env events")
    env = envs[0]["env"]
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(mpsd.workdir / "run" / "gpu0" / "pipe")
    assert env["CUDA_MPS_LOG_DIRECTORY"] == str(mpsd.workdir / "log" / "gpu0")
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert not env.get("NOTIFY_SOCKET")
    assert mpsd.terminate() == 0


@pytest.mark.parametrize(("section", "values", "key"), [
    ("engine", {"replicas": 0}, "replicas"),
    ("proxy", {"listen": "nowhere"}, "proxy.listen"),
    ("mps", {"enabled": "sometimes"}, "mps.enabled"),
    ("engine", {"gpu_memory_utilization": 0.9}, "gpu[0]"),
    ("daemon", {"colour": "blue"}, "daemon.colour"),
])
def test_bad_config_exits_78_with_file_key_and_fix(mpsd: Mpsd, section: str,
                                                   values: dict[str, object], key: str) -> None:
    mpsd.overrides = {section: values}
    path = mpsd.write_config()
    for command in ("check-config", "run"):
        out = subprocess.run([sys.executable, "-m", "mpsd", command, "-c", str(path)],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 78, out.stderr
        assert str(path) in out.stderr and key in out.stderr and "Fix:" in out.stderr


def test_check_config_prints_the_plan_of_the_shipped_example() -> None:
    out = subprocess.run([sys.executable, "-m", "mpsd", "check-config", "--file-only", "-c",
                          "etc/mpsd/mpsd.toml"], capture_output=True, text=True, timeout=30,
                         check=True, cwd=REPO)
    assert "gpu0/qwen2.5-0.5b-instruct-0" in out.stdout
    assert "--served-model-name Qwen/Qwen2.5-0.5B-Instruct" in out.stdout
    assert "port 18101" in out.stdout


def test_leftovers_of_a_killed_mpsd_are_reaped_at_the_next_start(mpsd: Mpsd) -> None:
    # engines that ignore SIGTERM survive the PR_SET_PDEATHSIG notice of a SIGKILLed mpsd
    mpsd.mps = "off"
    mpsd.engine_env = {"FAKE_ENGINE_IGNORE_SIGTERM": "1"}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    orphans = set(mpsd.engine_pids().values())
    assert mpsd.proc is not None
    os.kill(mpsd.proc.pid, signal.SIGKILL)
    mpsd.proc.wait(10)
    assert all(Path(f"/proc/{pid}").exists() for pid in orphans)
    mpsd.start()
    reaped = mpsd.wait_log("leftovers_reaped")[0]["pgids"]
    assert set(reaped) >= orphans
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in orphans), 10,
               "orphaned engines gone")
    mpsd.wait_state("gpu0", "running")
    assert mpsd.terminate() == 0


def test_explicit_cpu_affinity_is_applied_before_exec(mpsd: Mpsd) -> None:
    mpsd.overrides = {"engine": {"cpu_affinity": ["0", "1"]}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    pids = mpsd.engine_pids()
    for key, core in (("gpu0/tiny-0", "0"), ("gpu0/tiny-1", "1")):
        status = Path(f"/proc/{pids[key]}/status").read_text()
        assert f"Cpus_allowed_list:\t{core}\n" in status
    assert mpsd.terminate() == 0


@pytest.mark.parametrize("mps", ["off", "on"])
def test_a_port_taken_during_a_restart_backs_off_and_the_daemon_serves_on(
        mpsd: Mpsd, mps: str) -> None:
    """An engine is killed and another program binds its port before the restart: the spawn
    is a fault of that engine (backoff, its reason in status), never an exception that takes
    the group or the daemon down; MPS off, the sibling is never touched. Once the port is
    free the engine comes back."""
    mpsd.mps = mps
    mpsd.overrides = {"restart": {"backoff_initial_s": 1.0, "backoff_max_s": 2.0}}
    mpsd.start()
    running(mpsd)
    pids = mpsd.engine_pids()
    os.kill(pids["gpu0/tiny-0"], signal.SIGKILL)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = mpsd.engine_port_base

        def bound() -> bool:
            try:
                squatter.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

        wait_until(bound, 10, f"port {port} free after the kill")
        squatter.listen()
        wait_until(lambda: "already in use" in str(engine_of(mpsd, "gpu0", "gpu0/tiny-0")
                                                   .get("reason", "")), 20, "the spawn fault")
        assert engine_of(mpsd, "gpu0", "gpu0/tiny-0")["state"] in ("backoff", "stopped")
        if mps == "off":
            assert engine_of(mpsd, "gpu0", "gpu0/tiny-1")["pid"] == pids["gpu0/tiny-1"]
    wait_until(lambda: engine_of(mpsd, "gpu0", "gpu0/tiny-0")["state"] == "ready", 20,
               "gpu0/tiny-0 ready again")
    if mps == "off":
        assert engine_of(mpsd, "gpu0", "gpu0/tiny-1")["pid"] == pids["gpu0/tiny-1"]
    assert not mpsd.events("group_state", to="failed")
    assert mpsd.proc is not None and mpsd.proc.poll() is None
    assert mpsd.terminate() == 0


def test_shutdown_refuses_new_requests_with_503_while_in_flight_ones_finish(mpsd: Mpsd) -> None:
    mpsd.engine_env = {"FAKE_ENGINE_TOKEN_DELAY_S": "0.05"}
    mpsd.overrides = {"defaults": {"stop_timeout_s": 10}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(http(
        "POST", f"{mpsd.url}/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": 60}, timeout=30)[0]))
    slow.start()
    wait_until(lambda: mpsd.engine_events_of("request", max_tokens=60), 10, "slow request sent")
    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGTERM)
    mpsd.wait_log("signal_received")
    code, headers, body = http("POST", f"{mpsd.url}/v1/completions",
                               {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert code == 503, body
    assert "retry-after" in {k.lower() for k in headers}
    slow.join(30)
    assert results == [200]
    assert mpsd.proc.wait(30) == 0
