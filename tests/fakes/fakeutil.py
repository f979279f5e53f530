"""Helpers shared by the fake MPS control binary and the fake vLLM engine.

Why one module: both fakes append to JSON-lines events files that tests read back to assert
ordering, both read knobs from the environment, and the fake engine's EngineCore speaks the fake
MPS client protocol. Keeping those three things here means the protocol and the event format are
defined once. Standard library only, so the MPS fake runs under any ``python3``.

The MPS wire protocol is private to the fakes (mpsd must only use the binary's stdin/stdout
interface). It is JSON lines over UNIX stream sockets:

* ``<pipe>/control`` (the daemon): the first line is ``{"hello": "ui"}`` (the client-mode tool,
  then one command line per request, one ``{"out": str}`` line per reply) or
  ``{"hello": "client", "pid": N, "comm": str}`` (a CUDA client, answered with
  ``{"ok": true, "server_pid": N, "socket": path}`` or ``{"ok": false, "error": 807, ...}``).
* ``socket`` from that answer (the server): the client sends ``{"op": "hello", "pid": N, ...}``,
  then ``{"op": "busy"}`` / ``{"op": "idle"}`` / ``{"op": "bye"}``; the server pushes notices
  ``{"notice": "fault" | "terminate" | "shutdown", "error": code}``. A connection that ends
  without ``bye`` while the client last said ``busy`` is a SIGKILL of a busy client.

The server side lives in fake_mps_server.py, the CUDA-client side in fake_engine_core.py
(``mps_attach``). The daemon talks to its server over the server's stdin/stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # asyncio is not imported at run time: the client tool must start fast
    import asyncio

JsonObj = dict[str, Any]

CONTROL_SOCKET = "control"
PID_FILE = "nvidia-cuda-mps-control.pid"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"

# CUDA driver error codes the fakes use (runtime enum values, mps.md section 2.4).
CUDA_ERROR_ILLEGAL_ADDRESS = 700
CUDA_ERROR_MPS_CONNECTION_FAILED = 805
CUDA_ERROR_MPS_RPC_FAILURE = 806
CUDA_ERROR_MPS_SERVER_NOT_READY = 807
CUDA_ERROR_MPS_MAX_CLIENTS_REACHED = 808
CUDA_ERROR_MPS_CLIENT_TERMINATED = 810


class EventLog:
    """Appends one JSON object per line to the file named by an environment variable.

    Each line is written with a single ``os.write`` on an ``O_APPEND`` descriptor, so several
    processes (daemon, server, engines) can share one file without interleaving. ``t`` is wall
    time and ``mono`` is ``CLOCK_MONOTONIC``, which is system-wide on Linux and therefore
    comparable between processes.
    """

    def __init__(self, env_var: str, who: str) -> None:
        path = os.environ.get(env_var)
        self.who = who
        self._fd = -1
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @property
    def enabled(self) -> bool:
        """Whether an events file was configured (lets hot paths skip building fields)."""
        return self._fd >= 0

    def emit(self, event: str, **fields: object) -> None:
        """Append ``{"t", "mono", "who", "pid", "event", **fields}``; never raises."""
        if self._fd < 0:
            return
        record: JsonObj = {
            "t": time.time(),
            "mono": time.monotonic(),
            "who": self.who,
            "pid": os.getpid(),
            "event": event,
        }
        record.update(fields)
        with contextlib.suppress(OSError):
            os.write(self._fd, (json.dumps(record, default=str) + "\n").encode())


def knob(name: str, port: int | None = None) -> str | None:
    """Read an environment knob; ``<name>_PORT_<port>`` overrides ``<name>`` for one port.

    The per-port form lets one test environment drive a pair of engines differently (crash one,
    keep the other).
    """
    if port is not None:
        value = os.environ.get(f"{name}_PORT_{port}")
        if value is not None and value != "":
            return value
    value = os.environ.get(name)
    return value if value else None


def knob_float(name: str, default: float | None, port: int | None = None) -> float | None:
    """A float knob (``None`` default means "off"); unparsable values fall back to default."""
    raw = knob(name, port)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        return default


def knob_bool(name: str, port: int | None = None) -> bool:
    """A boolean knob: ``1``, ``true``, ``yes`` and ``on`` mean true."""
    raw = knob(name, port)
    return raw is not None and raw.strip().lower() in {"1", "true", "yes", "on"}


def set_process_name(name: str) -> None:
    """Set ``/proc/self/comm`` (15 bytes max) so ``ps``/``top`` show e.g. ``VLLM::EngineCor``.

    vLLM does this with setproctitle; argv[0] tricks would break venv detection of the
    interpreter, so only the kernel's comm is changed.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def encode(obj: JsonObj) -> bytes:
    """One compact JSON line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def read_obj(reader: asyncio.StreamReader) -> JsonObj | None:
    """Read one JSON line; ``None`` on EOF, reset or garbage (all mean "peer is gone")."""
    try:
        line = await reader.readline()
    except (OSError, ValueError):
        return None
    if not line:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def mps_log_line(role: str, pid: int, message: str) -> str:
    """Format a line like driver 580's logs: ``[2026-11-25 10:00:00.123 Control  1234] msg``."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    millis = int((now % 1) * 1000)
    return f"[{stamp}.{millis:03d} {role:<7} {pid:>5}] {message}\n"


def mps_log(path: str, text: str) -> None:
    """One MPS log line where driver 580 puts it: ``-f`` prints both logs on the daemon's
    output (measured on an H200: no control.log/server.log is written); ``-d`` writes files."""
    if os.environ.get("FAKE_MPS_LOG_FILES") == "1":
        append_text(path, text)
        return
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def append_text(path: str, text: str) -> None:
    """Append to a log file in one write; logging must never crash a fake."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
