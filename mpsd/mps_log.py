"""Tail the MPS ``control.log``/``server.log`` and turn their lines into typed events.

The lines are matched loosely (mps.md §2.6): the doc's examples are not what driver 580
prints, and the next driver may change them again. A fatal-fault line is one of the group's
fault signals; the connection noise lines go to debug.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from mpsd import logs

_log = logs.get("mpsd.mps_log")
_POLL_S = 0.1


class MpsLogKind(enum.StrEnum):
    FATAL = "fatal"
    SERVER_STARTED = "server_started"
    SERVER_EXITED = "server_exited"
    CLIENT_ACTIVE = "client_active"
    CLIENT_EXITED = "client_exited"
    CLIENT_TERMINATED = "client_terminated"
    SETTING = "setting"
    COMMAND = "command"
    NOISE = "noise"
    OTHER = "other"


_PATTERNS: tuple[tuple[MpsLogKind, re.Pattern[str]], ...] = (
    (MpsLogKind.FATAL, re.compile(
        r"fatal GPU error|sticky error|to be torn down|devices will be reset|"
        r"fatal exception", re.IGNORECASE)),
    (MpsLogKind.NOISE, re.compile(
        r"did not send valid credentials|failed to rece?i?v?e command with status 806",
        re.IGNORECASE)),
    (MpsLogKind.CLIENT_TERMINATED, re.compile(r"requesting client .* to exit|"
                                              r"Client termination succeeded", re.IGNORECASE)),
    (MpsLogKind.SERVER_STARTED, re.compile(r"Server has started|NEW SERVER \d+: Ready|"
                                           r"Starting new server", re.IGNORECASE)),
    (MpsLogKind.SERVER_EXITED, re.compile(r"Server \d+ exited with status", re.IGNORECASE)),
    (MpsLogKind.CLIENT_ACTIVE, re.compile(r"Status of client .* is ACTIVE|NEW CLIENT",
                                          re.IGNORECASE)),
    (MpsLogKind.CLIENT_EXITED, re.compile(r"Client .* exiting", re.IGNORECASE)),
    (MpsLogKind.SETTING, re.compile(r"Active Threads Percentage set to|"
                                    r"pinned memory limit .* set to", re.IGNORECASE)),
    (MpsLogKind.COMMAND, re.compile(r"\bCmd:", re.IGNORECASE)),
)
_PID = re.compile(r"PID:\s*(\d+)|(?:CLIENT|[Ss]erver)\s+(\d+)")


@dataclass(frozen=True)
class MpsLogEvent:
    """One parsed log line: its kind, the PID it names (if any), the line itself."""

    group: str
    source: str
    kind: MpsLogKind
    pid: int | None
    line: str


def parse_line(group: str, source: str, line: str) -> MpsLogEvent:
    """Classify one line; the first matching pattern wins (fatal before everything)."""
    kind = next((k for k, pattern in _PATTERNS if pattern.search(line)), MpsLogKind.OTHER)
    match = _PID.search(line)
    pid = int(match.group(1) or match.group(2)) if match else None
    return MpsLogEvent(group, source, kind, pid, line)


def _level(event: MpsLogEvent) -> str:
    """Faults are errors; connection chatter, commands and their echoed results are debug."""
    if event.kind is MpsLogKind.FATAL:
        return "error"
    if event.kind in (MpsLogKind.NOISE, MpsLogKind.COMMAND):
        return "debug"
    if event.kind is MpsLogKind.OTHER and event.source == "control":
        return "debug"
    return "info"


class LogTailer:
    """Follows one log file by polling its size (cheap; no inotify dependency)."""

    def __init__(self, path: Path, deliver: Callable[[MpsLogEvent], None], *, group: str) -> None:
        self.path = path
        self._deliver = deliver
        self._group = group
        self._offset = 0
        self._partial = b""
        self._task: asyncio.Task[None] | None = None

    def skip_existing(self) -> None:
        """Start at the current end: lines of a previous daemon are not news."""
        try:
            self._offset = self.path.stat().st_size
        except FileNotFoundError:
            self._offset = 0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self.poll()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poll(self) -> None:
        """Read what was appended since the last call and deliver each complete line."""
        try:
            with self.path.open("rb") as handle:
                size = handle.seek(0, 2)
                if size < self._offset:  # truncated or replaced: start over
                    self._offset, self._partial = 0, b""
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        source = self.path.stem
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            event = parse_line(self._group, source, line)
            level = _level(event)
            _log.log(logs.level_number(level), "mps_log", gpu=self._group, source=source,
                     kind=str(event.kind), pid=event.pid, line=line)
            self._deliver(event)

    async def _follow(self) -> None:
        while True:
            self.poll()
            await anyio.sleep(_POLL_S)
