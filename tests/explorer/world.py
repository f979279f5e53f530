"""The world a schedule runs in: one ``mpsd run`` on the fakes, its client load, its processes.

Two GPUs, each serving its own model name (``m-gpu0``, ``m-gpu1``), so that every request of the
load says which GPU it needed and "no request to an unaffected GPU failed" can be checked. mpsd's
stdout is a pipe that a thread copies to ``mpsd.log``: the closed-stdout fault closes that pipe's
reader, as a dead journald or a vanished terminal would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpsd.plan.build import PORTS_PER_GPU
from tests.harness import (
    FAKES,
    Mpsd,
    http,
    processes_mentioning,
    render_toml,
    wait_until,
)
from tests.load import MixedLoad

TOKEN_DELAY_S = 0.01  # a request of the load takes ~0.3 s: streams flow while faults land
STARTUP_TIMEOUT_S = 8.0  # a fake starts in ~1 s; a loaded 2-core box must not make it a fault
STALL_TIMEOUT_S = 2.0
STUCK_TOKENS = 60000  # ~12 MB of SSE: more than the kernel's 4 MB send buffer and asyncio's
UUIDS = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000"]
STOP_BOUND_S = 30.0  # SIGTERM to exit: drain 2 s + stop 2 s per engine + MPS quit, with room


def model_of(gpu: int) -> str:
    return f"m-gpu{gpu}"


@dataclass
class Proc:
    """One process of the world as /proc shows it."""

    pid: int
    ppid: int
    cmdline: str

    @property
    def role(self) -> str:
        c = self.cmdline
        if "fake_engine_core.py" in c:
            return "engine-core"
        if "fake-vllm" in c:
            return "engine"
        if "fake_mps_server.py" in c:
            return "mps-server"
        if "nvidia-cuda-mps-control" in c:
            return "mps-daemon" if " -f" in c or " -d" in c else "mps-tool"
        if " mpsd run" in c:
            return "mpsd"
        if " mpsd " in c:
            return "mpsd-cli"
        return "other"


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        if stat[0] == "Z":
            return None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return None
    return Proc(pid, int(stat[1]), cmdline)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int | None) -> bool:
    return pid is not None and read_proc(pid) is not None


@dataclass
class World:
    """One ``mpsd run`` under test plus the load, the nemesis' helpers and what happened."""

    workdir: Path
    mps: str = "on"
    gpus: int = 2
    replicas: int = 2
    clients_per_gpu: int = 2
    m: Mpsd = field(init=False)
    doc: dict[str, Any] = field(init=False)
    # per GPU, its load runs: a pause ends one, a resume starts the next
    loads: dict[int, list[MixedLoad]] = field(default_factory=dict)
    # per GPU, the intervals [start, end] during which a step meant to disturb it
    disturbed: dict[int, list[list[float]]] = field(default_factory=dict)
    drained: set[int] = field(default_factory=set)
    hardware_failed: set[int] = field(default_factory=set)  # a hardware Xid: needs an operator
    stopping_at: float | None = None  # when SIGTERM was sent
    helpers: set[int] = field(default_factory=set)  # our own CLI processes and second runs
    _pump: threading.Thread | None = None
    _close_stdout: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.m = Mpsd(self.workdir, gpus=self.gpus, replicas=self.replicas, mps=self.mps)
        self.m.engine_port_base = self._free_port_base()
        self.doc = self._config()
        self.disturbed = {g: [] for g in range(self.gpus)}
        self.nvml_state = self.workdir / "nvml.json"
        self._xids: list[dict[str, object]] = []
        self._write_nvml()

    def _write_nvml(self) -> None:
        """The fake NVML's state (tests/fakes/nvml): two GPUs and the Xids sent so far."""
        gpus = [{"uuid": u, "name": "NVIDIA H200", "memory_total": 150_000_000_000,
                 "memory_used": 1_000_000_000, "util": 10, "cpus": [0, 1]}
                for u in UUIDS[:self.gpus]]
        tmp = self.nvml_state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mode": "ok", "gpus": gpus, "events": self._xids}))
        tmp.replace(self.nvml_state)

    def xid(self, gpu: int, code: int) -> None:
        """NVML reports Xid ``code`` on ``gpu``."""
        self._xids.append({"uuid": UUIDS[gpu], "xid": code})
        self._write_nvml()

    def env(self) -> dict[str, str]:
        """``mpsd run``'s environment with the fake NVML first on its import path."""
        env = self.m.run_env()
        env["PYTHONPATH"] = f"{FAKES / 'nvml'}:{env.get('PYTHONPATH', '')}"
        env["FAKE_NVML_STATE"] = str(self.nvml_state)
        return env

    # -- config --------------------------------------------------------------------------

    def _free_port_base(self) -> int:
        """An engine port base whose ports (each GPU's block, with room for a reload's
        surge) are all free now: other mpsd runs on the box must not make a start fail."""
        rng = random.Random()
        for _ in range(50):
            base = rng.randrange(20000, 30000 - PORTS_PER_GPU * self.gpus)
            ports = [base + PORTS_PER_GPU * g + r for g in range(self.gpus)
                     for r in range(self.replicas + 2)]
            if all(_port_free(port) for port in ports):
                return base
        raise AssertionError("no free block of engine ports in 20000-30000")

    def _config(self) -> dict[str, Any]:
        doc = self.m.config()
        doc["proxy"].update({"stall_timeout_s": STALL_TIMEOUT_S})
        doc["restart"].update({"max_restarts": 6, "window_s": 30, "stable_after_s": 30})
        doc["defaults"].update({"startup_timeout_s": STARTUP_TIMEOUT_S, "health_interval_s": 1.0,
                                "health_failures": 3})
        doc["defaults"]["env"]["FAKE_ENGINE_TOKEN_DELAY_S"] = str(TOKEN_DELAY_S)
        # room for a stream longer than every socket buffer between engine and client
        doc["defaults"]["args"] = ["--max-model-len", str(STUCK_TOKENS + 100)]
        for i, gpu in enumerate(doc["gpu"]):
            gpu["engine"][0]["served_model_name"] = model_of(i)
            gpu["engine"][0]["name"] = model_of(i)
        return doc

    def write(self, doc: dict[str, Any]) -> None:
        tmp = self.m.config_file.with_suffix(".tmp")
        tmp.write_text(render_toml(doc))
        tmp.rename(self.m.config_file)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start ``mpsd run`` with its stdout on a pipe that a thread copies to the log."""
        self.write(self.doc)
        proc = subprocess.Popen(self.m.run_argv(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self.env(),
                                start_new_session=True)
        self.m.proc = proc
        assert proc.stdout is not None
        fd = os.dup(proc.stdout.fileno())
        proc.stdout.close()
        self._pump = threading.Thread(target=self._copy_log, args=(fd,), daemon=True)
        self._pump.start()

    def _copy_log(self, fd: int) -> None:
        """Copy mpsd's output to the log until EOF, or until told to close the pipe: then the
        read end closes here, in the one thread that reads it."""
        with self.m.log_file.open("ab") as log:
            try:
                while not self._close_stdout.is_set():
                    if not select.select([fd], [], [], 0.1)[0]:
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    log.write(chunk)
                    log.flush()
            finally:
                os.close(fd)

    def close_stdout(self) -> None:
        """The reader of mpsd's stdout goes away: its next writes get EPIPE/SIGPIPE."""
        self._close_stdout.set()
        if self._pump is not None:
            self._pump.join(5)

    def start_load(self) -> None:
        for g in range(self.gpus):
            self.resume_load(g)

    def resume_load(self, gpu: int) -> None:
        load = MixedLoad(self.m.url, self.clients_per_gpu, model_of(gpu)).__enter__()
        self.loads.setdefault(gpu, []).append(load)

    def pause_load(self, gpu: int) -> None:
        """The GPU's clients finish what they sent and send nothing more (an idle engine is
        what the stall detector misjudged)."""
        for load in self.loads.get(gpu, []):
            load.__exit__(None, None, None)

    def stop_load(self) -> None:
        for gpu in self.loads:
            self.pause_load(gpu)

    def control(self, ports: list[int], command: str) -> None:
        """Tell fake engines to change behaviour and wait (up to 5 s) until each has read it;
        a command no engine read (it died meanwhile) is taken back, not left for the next."""
        for port in ports:
            self.m.control(port, command)
        files = [self.m.control_dir / f"{port}.cmd" for port in ports]
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(f.exists() for f in files), 5)
        for f in files:
            f.unlink(missing_ok=True)

    def sigterm(self) -> None:
        assert self.m.proc is not None
        self.stopping_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.m.proc.send_signal(signal.SIGTERM)

    def teardown(self) -> None:
        """Whatever happened: load stopped, mpsd and every process of the work dir gone."""
        self.stop_load()
        self.m.kill()
        for pid in self.helpers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            subprocess.run(["chattr", "-R", "-i", str(self.workdir)], capture_output=True,
                           check=False, timeout=10)
        if self._pump is not None:
            self._pump.join(5)

    # -- reading -------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """``/mpsd/status``, or None when mpsd does not answer it."""
        try:
            code, _, body = http("GET", f"{self.m.url}/mpsd/status", timeout=3)
        except OSError:
            return None
        if code != 200:
            return None
        doc: dict[str, Any] = json.loads(body)
        return doc

    def health(self) -> int | None:
        try:
            return http("GET", f"{self.m.url}/health", timeout=3)[0]
        except OSError:
            return None

    def engines(self, gpu: int) -> list[dict[str, Any]]:
        st = self.status() or {"groups": []}
        return next((g["engines"] for g in st["groups"] if g["gpu"] == f"gpu{gpu}"), [])

    def backend(self, key: str) -> str:
        """How the proxy sees an engine (routable, ejected): for reports."""
        st = self.status() or {}
        b = next((b for b in st.get("engines", []) if b.get("key") == key), None)
        return "absent" if b is None else (f"routable={b.get('routable')} "
                                           f"ejected={b.get('ejected')}")

    def engine(self, gpu: int, index: int) -> dict[str, Any] | None:
        engines = self.engines(gpu)
        return engines[index % len(engines)] if engines else None

    def processes(self) -> list[Proc]:
        """Every live process of this world except the explorer itself."""
        found = (read_proc(pid) for pid in processes_mentioning(str(self.workdir)))
        return [p for p in found if p is not None]

    def is_ours(self, proc: Proc, procs: dict[int, Proc]) -> bool:
        """Whether ``proc`` descends from the mpsd under test or from one of our helpers."""
        roots = {self.m.proc.pid} if self.m.proc else set()
        roots |= self.helpers
        seen = 0
        pid: int | None = proc.pid
        while pid is not None and seen < 64:
            if pid in roots:
                return True
            parent = procs.get(pid) or read_proc(pid)
            pid = parent.ppid if parent is not None and parent.ppid > 1 else None
            seen += 1
        return False

    # -- disturbance bookkeeping ---------------------------------------------------------

    def disturb(self, gpus: set[int], at: float | None = None) -> None:
        now = time.time() if at is None else at
        for g in gpus:
            spans = self.disturbed[g]
            if not spans or spans[-1][1] != math.inf:
                spans.append([now, math.inf])

    def calm(self, gpu: int) -> None:
        spans = self.disturbed[gpu]
        if spans and spans[-1][1] == math.inf:
            spans[-1][1] = time.time()

    def was_disturbed(self, gpu: int, t0: float, t1: float) -> bool:
        # a request ends a moment after its engine's death is seen: a second of slack
        return any(a - 1.0 <= t1 and t0 <= b + 1.0 for a, b in self.disturbed[gpu])

    # -- commands ------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``mpsd <args> -c <config>`` as an operator runs it; a hang is an exit code 124."""
        proc = subprocess.Popen([sys.executable, "-m", "mpsd", *args, "-c",
                                 str(self.m.config_file)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.helpers.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            code = 124
        self.helpers.discard(proc.pid)
        return subprocess.CompletedProcess(proc.args, code, out, err)

    def second_run(self) -> subprocess.Popen[bytes]:
        """Another ``mpsd run`` with the same config (quickstart twice, ``sudo mpsd run``)."""
        log = (self.workdir / "second.log").open("ab")
        proc = subprocess.Popen(self.m.run_argv(), stdout=log, stderr=subprocess.STDOUT,
                                env=self.env(), start_new_session=True)
        log.close()
        self.helpers.add(proc.pid)
        return proc

    def arm_start_fault(self, port: int, fault: str) -> None:
        """The next engine(s) started on ``port`` get ``fault`` (see fake_vllm.py)."""
        tmp = self.m.control_dir / f".{port}.start.tmp"
        tmp.write_text(fault)
        tmp.rename(self.m.control_dir / f"{port}.start")

    def disarm_start_faults(self) -> None:
        for path in self.m.control_dir.glob("*.start"):
            path.unlink(missing_ok=True)
