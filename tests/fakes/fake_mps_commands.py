"""Command lines of the fake ``nvidia-cuda-mps-control`` client mode, and the server handle.

Why separate: the parser is the part mpsd is most sensitive to (output text and formats of
mps.md section 2.2), so it is kept apart from the daemon's socket and process plumbing.

Output choices where the real tool's text is not documented (mpsd should not depend on them):
``set_default_active_thread_percentage``/``set_active_thread_percentage`` print the new value
(``50.0``); ``set_*pinned_mem_limit`` print nothing; ``get_*pinned_mem_limit`` print ``30G`` /
``512M`` style values, or nothing when no limit is set; an unknown server or client PID prints
``Server <pid> not found`` / ``Client <pid> not found``; bad arguments print
``Invalid arguments for command "<cmd>"``; unknown commands print ``Unknown command "<word>"``
(measured text). ``fake_fault [<client PID>]`` is test-only and prints nothing on success.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tests.fakes import fakeutil
from tests.fakes.fakeutil import JsonObj

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DEFAULT_NS = 4026531836


class ServerHandle:
    """The daemon's view of one server process: PID, socket, readiness, request channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.socket = ""
        self.shutting_down = False
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._lock = asyncio.Lock()

    async def wait_ready(self) -> bool:
        """Read the server's first stdout line (``{"ready": true, "socket": ...}``)."""
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        ok = False
        if line:
            info = json.loads(line)
            self.socket = str(info.get("socket", ""))
            ok = bool(info.get("ready"))
        if not self.ready.done():
            self.ready.set_result(ok)
        return await self.ready

    async def call(self, request: JsonObj) -> JsonObj | None:
        """One request/reply over the server's stdin/stdout; ``None`` if it is gone."""
        if not self.ready.done() or not self.ready.result():
            return None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        async with self._lock:
            try:
                self.proc.stdin.write(fakeutil.encode(request))
                await self.proc.stdin.drain()
                line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
            except (OSError, TimeoutError, RuntimeError):
                return None
        if not line:
            return None
        reply = json.loads(line)
        return reply if isinstance(reply, dict) else None


class DaemonLike(Protocol):
    """What the commands need from the daemon (avoids an import cycle)."""

    server: ServerHandle | None
    quitting: bool
    ev: fakeutil.EventLog

    def log(self, message: str) -> None: ...
    async def ensure_server(self, uid: int = 0) -> tuple[ServerHandle, bool]: ...
    async def stop_server(self, grace_s: float | None) -> None: ...


@dataclass
class Defaults:
    """Settings for the *next* server; lost on quit, like the real ones."""

    atp: float = 100.0
    pinned: dict[str, int] = field(default_factory=dict)
    priority: int = 0

    def pinned_json(self) -> str:
        """The pinned limits as the server's command-line argument."""
        return json.dumps(self.pinned)


def parse_size(text: str) -> int | None:
    """``30G``/``512M``/``1.5G``/``512MB`` to bytes; None if malformed or zero."""
    match = _SIZE.match(text.strip())
    if not match:
        return None
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    return value or None


def format_size(value: int | None) -> str:
    """Bytes back to the ``NNG``/``NNM`` style the tool accepts; empty when unset."""
    if value is None:
        return ""
    for unit in ("T", "G", "M", "K"):
        if value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]}{unit}"
    return str(value)


def _percentage(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value <= 100 else None


def _pid_namespace(pid: int) -> int:
    try:
        return Path(f"/proc/{pid}/ns/pid").stat().st_ino
    except OSError:
        return _DEFAULT_NS


def _device_column() -> str:
    """``GPU-94607643-4d46-1a45``-style truncated UUID, as in the measured ``ps`` output."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    uuid = visible if visible.startswith("GPU-") else "GPU-00000000-0000-0000-0000-000000000000"
    return uuid[:22]


class Commands:
    """Parses and runs one command line; returns the text the tool prints."""

    def __init__(self, daemon: DaemonLike) -> None:
        self.daemon = daemon
        self.defaults = Defaults()
        env_atp = _percentage(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "") or "x")
        if env_atp is not None:
            self.defaults.atp = env_atp
        self._table: dict[str, Callable[[list[str]], Awaitable[str | None]]] = {
            "get_server_list": self._server_list,
            "get_server_status": self._server_status,
            "start_server": self._start_server,
            "get_client_list": self._client_list,
            "ps": self._ps,
            "set_default_active_thread_percentage": self._set_default_atp,
            "get_default_active_thread_percentage": self._get_default_atp,
            "set_active_thread_percentage": self._set_atp,
            "get_active_thread_percentage": self._get_atp,
            "set_default_device_pinned_mem_limit": self._set_default_pinned,
            "get_default_device_pinned_mem_limit": self._get_default_pinned,
            "set_device_pinned_mem_limit": self._set_pinned,
            "get_device_pinned_mem_limit": self._get_pinned,
            "set_default_client_priority": self._set_priority,
            "get_default_client_priority": self._get_priority,
            "terminate_client": self._terminate,
            "shutdown_server": self._shutdown_server,
            "quit": self._quit,
            "fake_fault": self._fake_fault,
        }

    async def run(self, line: str) -> str:
        """Run one command line."""
        words = line.split()
        if not words:
            return ""
        handler = self._table.get(words[0])
        if handler is None:
            return f'Unknown command "{words[0]}"'
        try:
            out = await handler(words[1:])
        except (ValueError, IndexError):
            out = None
        return f'Invalid arguments for command "{words[0]}"' if out is None else out

    def _server(self, pid_text: str) -> ServerHandle | None:
        server = self.daemon.server
        return server if server is not None and str(server.pid) == pid_text else None

    async def _ask(self, pid_text: str, request: JsonObj) -> JsonObj | str:
        """Send a request to the server named by PID, or the 'not found' text."""
        server = self._server(pid_text)
        reply = None if server is None else await server.call(request)
        return f"Server {pid_text} not found" if reply is None else reply

    async def _server_list(self, args: list[str]) -> str:
        server = self.daemon.server
        return "" if server is None else str(server.pid)

    async def _server_status(self, args: list[str]) -> str:
        server = self._server(args[0])
        if server is not None and not server.ready.done():
            return "INITIALIZING"
        reply = await self._ask(args[0], {"op": "status"})
        return reply if isinstance(reply, str) else str(reply["status"])

    async def _start_server(self, args: list[str]) -> str:
        uid = int(args[args.index("-uid") + 1]) if "-uid" in args else os.getuid()
        server, _ = await self.daemon.ensure_server(uid)
        await server.ready
        return ""

    async def _clients(self, pid_text: str) -> list[JsonObj] | str:
        reply = await self._ask(pid_text, {"op": "clients"})
        return reply if isinstance(reply, str) else list(reply["clients"])

    async def _client_list(self, args: list[str]) -> str:
        clients = await self._clients(args[0])
        if isinstance(clients, str):
            return clients
        return "\n".join(str(c["pid"]) for c in clients)

    async def _ps(self, args: list[str]) -> str:
        rows = ["PID\tID\tSERVER\tDEVICE\tNAMESPACE\tCOMMAND"]
        server = self.daemon.server
        clients = [] if server is None else await self._clients(str(server.pid))
        only = args[args.index("-p") + 1] if "-p" in args else None
        if server is not None and isinstance(clients, list):
            for c in clients:
                if only is None or str(c["pid"]) == only:
                    rows.append(f"{c['pid']}\t{c['id']}\t{server.pid}\t{_device_column()}\t"
                                f"{_pid_namespace(int(c['pid']))}\t{c['comm']}")
        return "\n".join(rows)

    async def _set_default_atp(self, args: list[str]) -> str | None:
        value = _percentage(args[0])
        if value is None:
            return None
        self.defaults.atp = value
        return f"{value:.1f}"

    async def _get_default_atp(self, args: list[str]) -> str:
        return f"{self.defaults.atp:.1f}"

    async def _set_atp(self, args: list[str]) -> str | None:
        value = _percentage(args[1])
        if value is None:
            return None
        reply = await self._ask(args[0], {"op": "set_atp", "value": value})
        return reply if isinstance(reply, str) else f"{float(reply['value']):.1f}"

    async def _get_atp(self, args: list[str]) -> str:
        reply = await self._ask(args[0], {"op": "get_atp"})
        return reply if isinstance(reply, str) else f"{float(reply['value']):.1f}"

    async def _set_default_pinned(self, args: list[str]) -> str | None:
        value = parse_size(args[1])
        if value is None:
            return None
        self.defaults.pinned[args[0]] = value
        return ""

    async def _get_default_pinned(self, args: list[str]) -> str:
        return format_size(self.defaults.pinned.get(args[0]))

    async def _set_pinned(self, args: list[str]) -> str | None:
        value = parse_size(args[2])
        if value is None:
            return None
        reply = await self._ask(args[0], {"op": "set_pinned", "dev": args[1], "value": value})
        return reply if isinstance(reply, str) else ""

    async def _get_pinned(self, args: list[str]) -> str:
        reply = await self._ask(args[0], {"op": "get_pinned", "dev": args[1]})
        return reply if isinstance(reply, str) else format_size(reply.get("value"))

    async def _set_priority(self, args: list[str]) -> str | None:
        if args[0] not in ("0", "1"):
            return None
        self.defaults.priority = int(args[0])
        return ""

    async def _get_priority(self, args: list[str]) -> str:
        return str(self.defaults.priority)

    async def _terminate(self, args: list[str]) -> str:
        reply = await self._ask(args[0], {"op": "terminate", "pid": int(args[1])})
        if isinstance(reply, str):
            return reply
        return str(reply["error"]) if "error" in reply else str(reply["rc"])

    async def _shutdown_server(self, args: list[str]) -> str:
        server = self._server(args[0])
        if server is None:
            return f"Server {args[0]} not found"
        server.shutting_down = True
        self.daemon.ev.emit("shutdown_server", server_pid=server.pid, force="-f" in args[1:])
        await server.call({"op": "shutdown", "force": "-f" in args[1:]})
        return ""

    async def _quit(self, args: list[str]) -> str | None:
        timeout: float | None = None
        if args:
            if args[0] != "-t" or len(args) != 2:
                return None
            timeout = float(args[1])
            self.daemon.log(f"quit command issued with timeout of {args[1]}")
        self.daemon.ev.emit("quit", timeout=timeout)
        if fakeutil.knob_bool("FAKE_MPS_IGNORE_QUIT") or self.daemon.quitting:
            return ""
        self.daemon.quitting = True
        server = self.daemon.server
        if server is not None and timeout is not None:
            self.daemon.log(f"Try shutting down server {server.pid}, backoff is disabled")
        asyncio.get_running_loop().create_task(self.daemon.stop_server(timeout))
        return ""

    async def _fake_fault(self, args: list[str]) -> str:
        server = self.daemon.server
        if server is None:
            return "No MPS server running"
        pid = int(args[0]) if args else None
        reply = await server.call({"op": "fault", "pid": pid})
        if reply is None:
            return f"Server {server.pid} not found"
        return str(reply.get("error", ""))
