"""The test doubles themselves: fake ``nvidia-cuda-mps-control`` and fake ``vllm serve``.

mpsd's integration tests trust these fakes to behave like the real tools (mps.md sections 1-2,
vllm.md sections 1-5, 10, 11), so the behaviours mpsd depends on are pinned here: MPS command
output, lazy server start, fault fan-out and recovery with the same server PID, terminate_client,
quit; the engine's readiness, exit code 0 on EngineCore death, SSE framing, error shapes and
signal handling. Real processes, real sockets; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import free_ports, wait_until

FAKES = Path(__file__).resolve().parents[1] / "fakes"
MPS = FAKES / "nvidia-cuda-mps-control"
VLLM = FAKES / "fake-vllm"
Event = dict[str, Any]


def free_port() -> int:
    return free_ports(1)[0]


def request(port: int, method: str, path: str, body: Any = None,
            timeout: float = 5.0) -> tuple[int, bytes] | None:
    """One HTTP exchange; ``None`` when the connection is refused."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def _gone(pid: int) -> Callable[[], bool]:
    return lambda: not alive(pid)


class Rig:
    """Processes started by one test, their shared events file and MPS directories."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.events_path = workdir / "events.jsonl"
        self.pipe = workdir / "pipe"
        self.logs = workdir / "log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, mps: bool = True, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["FAKE_MPS_EVENTS"] = env["FAKE_ENGINE_EVENTS"] = str(self.events_path)
        env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
        if mps:
            env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe)
            env["CUDA_MPS_LOG_DIRECTORY"] = str(self.logs)
        env.update(extra or {})
        return env

    def spawn(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        with (self.dir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def daemon(self, **extra: str) -> subprocess.Popen[bytes]:
        proc = self.spawn([str(MPS), "-f"], self.env(extra=extra), "mps-daemon")
        wait_until(lambda: self.event("daemon_start"), what="MPS daemon start")
        return proc

    def engine(self, port: int, *flags: str, mps: bool = True,
               **extra: str) -> subprocess.Popen[bytes]:
        argv = [str(VLLM), "serve", str(self.dir / "model"), "--host", "127.0.0.1", "--port",
                str(port), "--served-model-name", "tiny", "--max-model-len", "2048",
                "--enforce-eager", "--load-format", "dummy", *flags]
        return self.spawn(argv, self.env(mps, extra), f"engine-{port}")

    def ready(self, port: int, proc: subprocess.Popen[bytes]) -> int:
        """Wait for readiness; return the EngineCore PID."""
        wait_until(lambda: self.event("ready", who=f"engine:{port}") or proc.poll() is not None,
                 15, f"engine {port} ready")
        assert proc.poll() is None, (self.dir / f"engine-{port}.log").read_text()
        core: int = self.first("engine_core_start", who=f"engine:{port}")["core_pid"]
        return core

    def mps(self, *lines: str) -> str:
        out = subprocess.run([str(MPS)], input="".join(f"{x}\n" for x in lines), env=self.env(),
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout

    def events(self, event: str | None = None, **match: Any) -> list[Event]:
        if not self.events_path.exists():
            return []
        found = []
        for line in self.events_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if (event is None or item.get("event") == event) and all(
                        item.get(k) == v for k, v in match.items()):
                    found.append(item)
        return found

    def event(self, event: str, **match: Any) -> Event | None:
        found = self.events(event, **match)
        return found[0] if found else None

    def first(self, event: str, **match: Any) -> Event:
        found = self.event(event, **match)
        assert found is not None, f"no {event} {match} in {self.events()}"
        return found

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        pids = {int(e["pid"]) for e in self.events()} | {
            int(e[k]) for e in self.events() for k in ("core_pid", "server_pid") if k in e}
        for pid in pids:  # orphaned EngineCores and MPS servers are in the killed groups too
            wait_until(_gone(pid), 5, f"pid {pid} gone")




def server_of(rig: Rig) -> str:
    return rig.mps("get_server_list").strip()


# -- fake nvidia-cuda-mps-control --------------------------------------------------------------


def test_client_mode_without_daemon_fails_like_the_real_tool(rig: Rig) -> None:
    out = subprocess.run([str(MPS)], input="get_server_list\n", env=rig.env(),
                         capture_output=True, text=True, timeout=10, check=False)
    assert out.returncode == 1
    assert "Cannot find MPS control daemon process" in out.stderr


def test_commands_defaults_logs_and_sigterm(rig: Rig) -> None:
    daemon = rig.daemon()
    assert (rig.pipe / "nvidia-cuda-mps-control.pid").read_text().strip().isdigit()
    out = rig.mps("get_server_list", "set_default_active_thread_percentage 50",
                  "get_default_active_thread_percentage",
                  "set_default_device_pinned_mem_limit 0 10G",
                  "get_default_device_pinned_mem_limit 0", "help")
    assert out.splitlines() == ["50.0", "50.0", "10G", 'Unknown command "help"']
    control = (rig.dir / "mps-daemon.log").read_text()
    assert "] User did not send valid credentials" in control
    assert "Control " in control and "] Cmd:get_server_list" in control
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert not (rig.pipe / "control").exists()


def test_fault_reaches_every_client_and_server_recovers_with_same_pid(rig: Rig) -> None:
    """1. two engines attach (their EngineCore PIDs are the clients), defaults applied lazily
    2. fake_fault: both EngineCores exit, both API servers exit with code 0
    3. the server goes FAULT -> ACTIVE with the same PID, and its log lines tell the story."""
    rig.daemon()
    rig.mps("set_default_active_thread_percentage 50", "set_default_device_pinned_mem_limit 0 10G")
    ports = [free_port(), free_port()]
    engines = [rig.engine(p) for p in ports]
    cores = {rig.ready(p, e) for p, e in zip(ports, engines, strict=True)}
    server = server_of(rig)
    assert server.isdigit() and int(server) not in cores
    assert set(map(int, rig.mps(f"get_client_list {server}").split())) == cores
    assert rig.mps(f"get_server_status {server}").strip() == "ACTIVE"
    ps = rig.mps("ps").splitlines()
    assert ps[0].split() == ["PID", "ID", "SERVER", "DEVICE", "NAMESPACE", "COMMAND"]
    assert {int(row.split()[0]) for row in ps[1:]} == cores
    rig.mps("fake_fault")
    assert [e.wait(10) for e in engines] == [0, 0]
    wait_until(lambda: rig.event("status", status="ACTIVE"), what="ACTIVE again")
    statuses = [e["status"] for e in rig.events("status", server_pid=int(server))]
    assert statuses == ["FAULT", "ACTIVE"]
    assert server_of(rig) == server
    log = (rig.dir / "mps-daemon.log").read_text()
    for needle in ("Active Threads Percentage set to 50.0",
                   "Device pinned memory limit for device 0 set to 0x280000000 bytes",
                   "Server is handling a fatal GPU error.", "sticky error set",
                   "Number of active client contexts is 0."):
        assert needle in log


def test_stuck_client_keeps_fault_and_new_clients_are_refused(rig: Rig) -> None:
    rig.daemon()
    port = free_port()
    stuck = rig.engine(port, FAKE_ENGINE_IGNORE_MPS_FAULT="1")
    rig.ready(port, stuck)
    server = server_of(rig)
    rig.mps("fake_fault")
    wait_until(lambda: rig.mps(f"get_server_status {server}").strip() == "FAULT", what="FAULT")
    late_port = free_port()
    late = rig.engine(late_port)
    assert late.wait(15) == 1  # CUDA_ERROR_MPS_SERVER_NOT_READY during start-up
    assert rig.first("mps_refused", who=f"engine-core:{late_port}")["error"] == 807
    assert rig.mps(f"get_server_status {server}").strip() == "FAULT"
    os.killpg(stuck.pid, signal.SIGKILL)
    wait_until(lambda: rig.mps(f"get_server_status {server}").strip() == "ACTIVE", what="ACTIVE")
    assert server_of(rig) == server


def test_terminate_client_stops_only_that_client(rig: Rig) -> None:
    rig.daemon()
    ports = [free_port(), free_port()]
    engines = [rig.engine(p) for p in ports]
    cores = [rig.ready(p, e) for p, e in zip(ports, engines, strict=True)]
    server = server_of(rig)
    assert rig.mps(f"terminate_client {server} {cores[0]}").strip() == "0"
    assert engines[0].wait(10) == 0
    assert request(ports[1], "GET", "/health") == (200, b"")
    assert rig.mps(f"get_client_list {server}").split() == [str(cores[1])]
    assert rig.mps(f"get_server_status {server}").strip() == "ACTIVE"
    assert not rig.events("fault")


def test_sigkill_of_a_busy_client_faults_its_sibling(rig: Rig) -> None:
    rig.daemon()
    ports = [free_port(), free_port()]
    engines = [rig.engine(p, FAKE_ENGINE_TOKEN_DELAY_S="0.05") for p in ports]
    cores = [rig.ready(p, e) for p, e in zip(ports, engines, strict=True)]
    conn = http.client.HTTPConnection("127.0.0.1", ports[0], timeout=10)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 500, "stream": True}),
        {"Content-Type": "application/json"})
    wait_until(lambda: rig.event("client_state", client_pid=cores[0], state="busy"), what="busy")
    os.kill(cores[0], signal.SIGKILL)
    assert engines[1].wait(10) == 0  # the idle sibling got the fault and its engine died
    fault = rig.event("fault")
    assert fault is not None and fault["faulter"] == cores[0]
    conn.close()


def test_quit_with_timeout_stops_server_and_daemon(rig: Rig) -> None:
    daemon = rig.daemon()
    port = free_port()
    engine = rig.engine(port)
    rig.ready(port, engine)
    started = time.monotonic()
    rig.mps("quit -t 1")
    assert daemon.wait(10) == 0
    assert time.monotonic() - started < 5
    assert engine.wait(10) == 0  # its EngineCore lost the server
    assert not (rig.pipe / "control").exists()
    assert "quit command issued with timeout of 1" in (rig.dir / "mps-daemon.log").read_text()


def test_killed_daemon_takes_its_server_along(rig: Rig) -> None:
    """A SIGKILLed daemon leaves a stale socket; its server exits; CUDA then runs without MPS."""
    daemon = rig.daemon()
    rig.mps("start_server -uid 0")
    server = int(server_of(rig))
    daemon.kill()
    daemon.wait(5)
    wait_until(_gone(server), 5, "server exit")
    assert (rig.pipe / "control").exists()
    port = free_port()
    rig.ready(port, rig.engine(port))
    assert rig.first("ready", who=f"engine:{port}")["mps"] is False
    assert rig.event("mps_unavailable", who=f"engine-core:{port}")


# -- fake vllm serve ---------------------------------------------------------------------------


def sse_events(body: bytes) -> list[str]:
    text = body.decode()
    assert text.endswith("\n\n")
    frames = text[:-2].split("\n\n")
    assert all(f.startswith("data: ") for f in frames)
    return [f[len("data: "):] for f in frames]


def test_engine_api_shapes_and_sse_framing(rig: Rig) -> None:
    port = free_port()
    rig.ready(port, rig.engine(port, mps=False))
    chat = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    frames = sse_events(resp.read())
    conn.close()
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:5]] == [None] * 3 + ["length"]
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 4
    status, body = request(port, "POST", "/v1/completions",
                           {"model": "nope", "prompt": "hi"}) or (0, b"")
    assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
    status, body = request(port, "POST", "/v1/chat/completions", {"max_tokens": 2}) or (0, b"")
    assert status == 400 and json.loads(body)["error"]["type"] == "Bad Request"
    assert request(port, "GET", "/v1/nothing") == (404, b'{"detail":"Not Found"}')
    status, body = request(port, "POST", "/v1/completions",
                           {"prompt": "Hello", "max_tokens": 3}) or (0, b"")
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
    metrics = (request(port, "GET", "/metrics") or (0, b""))[1].decode()
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0' in metrics
    assert 'vllm:generation_tokens_total{engine="0",model_name="tiny"} 7.0' in metrics


def test_health_is_refused_until_ready(rig: Rig) -> None:
    port = free_port()
    engine = rig.engine(port, mps=False, FAKE_ENGINE_START_DELAY_S="1.5")
    wait_until(lambda: rig.event("engine_core_start"), what="EngineCore spawned")
    assert request(port, "GET", "/health") is None
    assert engine.poll() is None
    wait_until(lambda: request(port, "GET", "/health") == (200, b""), 15, "health 200")


def test_sigterm_during_slow_start_is_prompt(rig: Rig) -> None:
    port = free_port()
    engine = rig.engine(port, mps=False, FAKE_ENGINE_START_DELAY_S="60")
    wait_until(lambda: rig.event("engine_core_start"), what="EngineCore spawned")
    started = time.monotonic()
    engine.send_signal(signal.SIGTERM)
    assert engine.wait(10) == 0
    assert time.monotonic() - started < 5
    assert rig.first("engine_core_exit")["code"] == 0


def test_engine_core_crash_makes_the_api_server_exit_0(rig: Rig) -> None:
    port, other = free_port(), free_port()
    env = {f"FAKE_ENGINE_CRASH_AFTER_S_PORT_{port}": "0.2"}
    crashing = rig.engine(port, mps=False, **env)
    steady = rig.engine(other, mps=False, **env)
    rig.ready(port, crashing)
    rig.ready(other, steady)
    assert crashing.wait(10) == 0
    assert rig.first("engine_core_exit", who=f"engine:{port}")["code"] == 1
    assert request(other, "GET", "/health") == (200, b"")


def test_ignored_sigterm_needs_sigkill(rig: Rig) -> None:
    port = free_port()
    engine = rig.engine(port, mps=False, FAKE_ENGINE_IGNORE_SIGTERM="1")
    rig.ready(port, engine)
    os.killpg(engine.pid, signal.SIGTERM)
    wait_until(lambda: rig.event("sigterm", ignored=True), what="ignored SIGTERM")
    assert request(port, "GET", "/health") == (200, b"")
    assert engine.poll() is None
    os.killpg(engine.pid, signal.SIGKILL)
    assert engine.wait(5) == -signal.SIGKILL


def test_sigterm_drain_timeout_ends_streams_with_error_event(rig: Rig) -> None:
    port = free_port()
    engine = rig.engine(port, "--shutdown-timeout", "0.5", mps=False,
                        FAKE_ENGINE_TOKEN_DELAY_S="0.05")
    rig.ready(port, engine)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 1000, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    engine.send_signal(signal.SIGTERM)
    frames = sse_events(resp.read())
    conn.close()
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["error"]["code"] == 500
    assert engine.wait(10) == 0


def test_sigterm_abort_mode_and_client_disconnect(rig: Rig) -> None:
    port = free_port()
    engine = rig.engine(port, mps=False, FAKE_ENGINE_TOKEN_DELAY_S="0.05")
    rig.ready(port, engine)
    gone = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    gone.request("POST", "/v1/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 1000, "stream": True}),
        {"Content-Type": "application/json"})
    assert gone.getresponse().status == 200
    gone.close()
    wait_until(lambda: rig.event("abort", reason="client_disconnect"), what="abort event")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read1()  # the role chunk
    engine.send_signal(signal.SIGTERM)
    frames = sse_events(resp.read())
    conn.close()
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "abort"
    assert engine.wait(10) == 0


def test_control_file_and_orphaned_engine_core(rig: Rig) -> None:
    control = rig.dir / "ctl"
    control.mkdir()
    port, other = free_port(), free_port()
    engine = rig.engine(port, mps=False, FAKE_ENGINE_CONTROL_DIR=str(control))
    survivor = rig.engine(other, mps=False, FAKE_ENGINE_CONTROL_DIR=str(control))
    rig.ready(port, engine)
    core = rig.ready(other, survivor)
    (control / ".tmp").write_text("unhealthy\n")
    (control / ".tmp").rename(control / f"{port}.cmd")
    wait_until(lambda: request(port, "GET", "/health") == (503, b""), what="503")
    assert not (control / f"{port}.cmd").exists()
    survivor.kill()  # SIGKILL of the API server alone orphans EngineCore, like vLLM
    survivor.wait(5)
    wait_until(lambda: rig.event("engine_core_orphaned", who=f"engine-core:{other}"),
             what="orphan noticed")
    assert alive(core)
