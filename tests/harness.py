"""Drive ``mpsd run`` as a real subprocess against the fake MPS binary and fake engines.

Tests read what happened from three JSON-lines sources: mpsd's own log (``log_format =
"json"``), the fake engines' event file and the fake MPS daemon's event file. Waiting is always
polling a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from mpsd.bench import toml_writer

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests" / "fakes"
FAKE_MPS = FAKES / "nvidia-cuda-mps-control"
FAKE_VLLM = FAKES / "fake-vllm"
Event = dict[str, Any]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (the kernel picked them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_jsonl(path: Path) -> list[Event]:
    if not path.exists():
        return []
    out: list[Event] = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0,
               what: str | Callable[[], str] = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout
    (a callable is asked then, so that it can show what happened while waiting)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {said or predicate}")
        time.sleep(0.02)


async def until(predicate: Callable[[], Any], within_s: float = 5.0, what: str = "",
                interval_s: float = 0.005) -> Any:
    """:func:`wait_until` for code on an event loop: yields between polls instead of blocking."""
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or predicate}")
        await anyio.sleep(interval_s)


def http(method: str, url: str, body: Any = None, timeout: float = 10.0,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def render_toml(doc: dict[str, Any]) -> str:
    """A config as mpsd's own TOML writer (the one bench and tune use) writes it."""
    return toml_writer.dumps(doc)


@dataclass
class Mpsd:
    """One ``mpsd run`` under test, in its own work directory."""

    workdir: Path
    gpus: int = 1
    replicas: int = 2
    mps: str = "on"
    engine_env: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    notify_socket: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port, base = free_ports(2)
        self.engine_port_base = 20000 + (base % 10000)  # below the ephemeral range
        self.config_file = self.workdir / "mpsd.toml"
        self.log_file = self.workdir / "mpsd.log"
        self.engine_events = self.workdir / "engines.jsonl"
        self.mps_events = self.workdir / "mps.jsonl"
        self.control_dir = self.workdir / "ctl"
        self.control_dir.mkdir(exist_ok=True)
        (self.workdir / "model").mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        env = {"FAKE_ENGINE_EVENTS": str(self.engine_events),
               "FAKE_ENGINE_CONTROL_DIR": str(self.control_dir), **self.engine_env}
        doc: dict[str, Any] = {
            "daemon": {"state_dir": str(self.workdir / "run"), "log_dir": str(self.workdir / "log"),
                       "log_format": "json", "log_level": "debug",
                       "engine_port_base": self.engine_port_base, "metrics_interval_s": 1.0},
            # no balancer in front: stop without the grace that lets one notice (multinode/)
            "proxy": {"listen": f"127.0.0.1:{self.port}", "drain_timeout_s": 2.0,
                      "unready_grace_s": 0.0},
            "mps": {"enabled": self.mps, "control_binary": str(FAKE_MPS),
                    "recover_timeout_s": 3.0, "status_interval_s": 0.5,
                    "env": {"FAKE_MPS_EVENTS": str(self.mps_events)}},
            "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 3,
                        "window_s": 60, "stable_after_s": 60},
            "defaults": {"executable": str(FAKE_VLLM), "startup_timeout_s": 15,
                         "stop_timeout_s": 2, "health_interval_s": 0.2, "health_failures": 2,
                         "cpu_affinity": "off", "env": env},
            "gpu": [{"device": str(i), "engine": [{"model": str(self.workdir / "model"),
                                                  "served_model_name": "tiny",
                                                  "replicas": self.replicas}]}
                    for i in range(self.gpus)],
        }
        for section, values in self.overrides.items():
            if section == "engine":
                for gpu in doc["gpu"]:
                    gpu["engine"][0].update(values)
            else:
                doc.setdefault(section, {}).update(values)
        return doc

    def write_config(self) -> Path:
        self.config_file.write_text(render_toml(self.config()))
        return self.config_file

    def run_env(self) -> dict[str, str]:
        """The environment ``mpsd run`` gets: this interpreter's bin first on PATH, the test's
        notify socket only, and the work directory as a marker the leftover check finds."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.pop("NOTIFY_SOCKET", None)
        if self.notify_socket:
            env["NOTIFY_SOCKET"] = self.notify_socket
        env["MPSD_TEST_MARKER"] = str(self.workdir)
        return env

    def run_argv(self) -> list[str]:
        return [sys.executable, "-m", "mpsd", "run", "-c", str(self.config_file)]

    def start(self) -> Mpsd:
        self.write_config()
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(self.run_argv(), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.run_env(), start_new_session=True)
        return self

    # -- reading -------------------------------------------------------------------------

    def log(self) -> list[Event]:
        return read_jsonl(self.log_file)

    def events(self, event: str, **match: Any) -> list[Event]:
        return [e for e in self.log() if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def engine_events_of(self, event: str, **match: Any) -> list[Event]:
        return [e for e in read_jsonl(self.engine_events) if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def wait_log(self, event: str, timeout: float = 45.0, count: int = 1,
                 **match: Any) -> list[Event]:
        self._check_alive_or(event)
        found: list[Event] = wait_until(
            lambda: len(self.events(event, **match)) >= count and self.events(event, **match),
            timeout, lambda: f"{count}x log event {event} {match}\n{self.tail()}")
        return found

    def _check_alive_or(self, what: str) -> None:
        if self.proc is not None and self.proc.poll() is not None and not self.events(what):
            raise AssertionError(f"mpsd exited {self.proc.returncode}\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def status(self) -> dict[str, Any]:
        code, _, body = http("GET", f"{self.url}/mpsd/status")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def group_state(self, gpu: str) -> str | None:
        states = [e["to"] for e in self.events("group_state", gpu=gpu)]
        return states[-1] if states else None

    def wait_state(self, gpu: str, state: str, timeout: float = 45.0, after: int = 0) -> None:
        """Until ``gpu`` entered ``state`` at least ``after + 1`` times in total."""
        wait_until(lambda: len(self.events("group_state", gpu=gpu, to=state)) > after,
                   timeout, lambda: f"{gpu} -> {state} (#{after + 1})\n{self.tail()}")

    def engine_pids(self, gpu: str = "gpu0") -> dict[str, int]:
        """Current engine PIDs from the last ``process_started`` event of each engine."""
        pids: dict[str, int] = {}
        for e in self.events("process_started", gpu=gpu):
            if "engine" in e:
                pids[e["engine"]] = e["pid"]
        return pids

    def control(self, port: int, command: str) -> None:
        """Tell a running fake engine to change behaviour (crash, hang, unhealthy, ...)."""
        tmp = self.control_dir / f".{port}.tmp"
        tmp.write_text(command)
        tmp.rename(self.control_dir / f"{port}.cmd")

    def mps_command(self, gpu: str, line: str) -> str:
        """Send one command to a group's (fake) MPS daemon, as an operator would."""
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(self.workdir / "run" / gpu / "pipe"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        out = subprocess.run([str(FAKE_MPS)], input=line + "\n", capture_output=True, text=True,
                             env=env, timeout=10, check=True)
        return out.stdout

    def engine_ports(self) -> list[int]:
        return [int(e["port"]) for g in self.status()["groups"] for e in g["engines"]]

    # -- stopping ------------------------------------------------------------------------

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Teardown of a test that did not stop mpsd itself: SIGTERM, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def processes_mentioning(marker: str) -> Iterator[int]:
    """PIDs whose command line or environment contains ``marker`` (a test's work dir)."""
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
                continue
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in blob:
            yield int(entry.name)
