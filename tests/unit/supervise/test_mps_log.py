"""MPS log lines as driver 580 (and the H200 run of issue #10) print them, turned into events."""

from __future__ import annotations

import pytest

from mpsd.supervise.mps_log import MpsLogKind, parse_line

PREFIX = "[2026-11-25 10:00:00.123 Server   1246] "


@pytest.mark.parametrize(("message", "kind", "pid"), [
    ("Client process 1209 disconnected", MpsLogKind.CLIENT_EXITED, 1209),
    ("Client {PID: 1209, Context ID: 1} exiting. Number of active client contexts is 0.",
     MpsLogKind.CLIENT_EXITED, 1209),
    ("Server failed to recevie command with status 806, assuming client "
     "{PID: 1209, Context ID: 1} exit", MpsLogKind.CLIENT_EXITED, 1209),
    ("Status of client {PID: 1209, Context ID: 1} is ACTIVE", MpsLogKind.CLIENT_ACTIVE, 1209),
    ("Client {PID: 1209, Context: 1} encountered a fatal GPU error.", MpsLogKind.FATAL, 1209),
    ("Server 877 exited with status 0", MpsLogKind.SERVER_EXITED, 877),
    ("Server has started", MpsLogKind.SERVER_STARTED, None),
])
def test_the_pid_is_the_one_the_message_names_never_the_loggers(
        message: str, kind: MpsLogKind, pid: int | None) -> None:
    event = parse_line("gpu0", "server", PREFIX + message)
    assert (event.kind, event.pid) == (kind, pid)


def test_connection_chatter_is_noise() -> None:
    event = parse_line("gpu0", "control", "[2026-11-25 10:00:00.123 Control   498] User did "
                       "not send valid credentials")
    assert event.kind is MpsLogKind.NOISE
