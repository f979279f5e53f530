"""Turn the MPS control daemon's log lines (control and server) into typed events.

The lines are matched loosely (mps.md §2.6): the doc's examples are not what driver 580
prints, and the next driver may change them again. A fatal-fault line is one of the group's
fault signals; the connection noise lines go to debug.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from mpsd import logs

_log = logs.get("mpsd.mps_log")


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
    (MpsLogKind.NOISE, re.compile(r"did not send valid credentials", re.IGNORECASE)),
    (MpsLogKind.CLIENT_TERMINATED, re.compile(r"requesting client .* to exit|"
                                              r"Client termination succeeded", re.IGNORECASE)),
    (MpsLogKind.SERVER_STARTED, re.compile(r"Server has started|NEW SERVER \d+: Ready|"
                                           r"Starting new server", re.IGNORECASE)),
    (MpsLogKind.SERVER_EXITED, re.compile(r"Server \d+ exited with status", re.IGNORECASE)),
    (MpsLogKind.CLIENT_ACTIVE, re.compile(r"Status of client .* is ACTIVE|NEW CLIENT",
                                          re.IGNORECASE)),
    # driver 580 prints the first two when a client goes; the H200 run with vLLM 0.26 showed
    # "Client process <pid> disconnected" 2 ms after a kill -9 of EngineCore (issue #10)
    (MpsLogKind.CLIENT_EXITED, re.compile(r"Client .* exiting|assuming client .* exit|"
                                          r"Client process \d+ disconnected", re.IGNORECASE)),
    (MpsLogKind.SETTING, re.compile(r"Active Threads Percentage set to|"
                                    r"pinned memory limit .* set to", re.IGNORECASE)),
    (MpsLogKind.COMMAND, re.compile(r"\bCmd:", re.IGNORECASE)),
)
_SOURCE = re.compile(r"^\[[^\]]*?\b(Control|Server)\b")
_PREFIX = re.compile(r"^\[[^\]]*\]\s*")
_PID = re.compile(r"PID:\s*(\d+)|(?:CLIENT|[Ss]erver|[Cc]lient process)\s+(\d+)")


@dataclass(frozen=True)
class MpsLogEvent:
    """One parsed log line: its kind, the PID it names (if any), the line itself."""

    group: str
    source: str
    kind: MpsLogKind
    pid: int | None
    line: str


def parse_line(group: str, source: str, line: str) -> MpsLogEvent:
    """Classify one line; the first matching pattern wins (fatal before everything).

    The PID is the one the message names, never the logger's own from the bracketed prefix
    (``[... Server   1246] Client {PID: 1209, ...} exiting`` names client 1209).
    """
    kind = next((k for k, pattern in _PATTERNS if pattern.search(line)), MpsLogKind.OTHER)
    prefix = _PREFIX.match(line)
    match = _PID.search(line, prefix.end() if prefix else 0)
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


class MpsOutput:
    """Turns the control daemon's output lines into events and log lines.

    Under ``-f`` (how mpsd runs it) driver 580 writes no ``control.log``/``server.log``: both
    logs go to the daemon's stdout, which mpsd reads through a pipe (measured on an H200).
    """

    def __init__(self, group: str, deliver: Callable[[MpsLogEvent], None]) -> None:
        self._group = group
        self._deliver = deliver

    def __call__(self, line: str) -> None:
        source = _SOURCE.search(line)
        event = parse_line(self._group, source.group(1).lower() if source else "control", line)
        _log.log(logs.level_number(_level(event)), "mps_log", gpu=self._group,
                 source=event.source, kind=str(event.kind), pid=event.pid, line=line)
        self._deliver(event)
