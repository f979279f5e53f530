"""A :class:`~mpsd.proxy.front.FrontConnection` driven without sockets or a loop, for the corpus
and the h11 oracle: a fake transport that records what the connection writes and whether it
reads, and a handler that refuses what the test says and answers everything else at once.

:func:`feed` plays the kernel and the event loop: it hands the connection the client's bytes a
read at a time, and only while the connection reads (a paused transport gets nothing more), so
that the bytes a connection *reads after its answer* can be counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mpsd.proxy.framing import Request
from mpsd.proxy.front import FrontConnection
from mpsd.proxy.http_rules import Limits

READ_BYTES = 256 * 1024  # what one read from a socket hands a protocol (uvloop's buffer)


class FakeLoop:
    """The one thing a FrontConnection asks of its loop: the time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.paused = False
        self.eof = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.out += data

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class FakeHandler:
    """Admits everything (or ``refuse``), decides nothing before ``100 Continue`` (or
    ``decision``), answers every complete request with 200 and keeps the connection."""

    def __init__(self, limits: Limits, *, refuse: tuple[int, str, bytes] | None = None,
                 decision: tuple[int, str, bytes] | None = None) -> None:
        self.limits = limits
        self.refuse = refuse
        self.decision = decision
        self.handled: list[Request] = []
        self.rejections: list[int] = []

    def wants(self, request: Request) -> bool:
        return True

    def admit(self, request: Request) -> tuple[int, str, bytes] | None:
        return self.refuse

    def decide(self, request: Request) -> tuple[int, str, bytes] | None:
        return self.decision

    def handle(self, conn: FrontConnection, request: Request) -> None:
        self.handled.append(request)
        conn.respond(200, b"{}", keep_alive=request.keep_alive)

    def handoff_protocol(self) -> asyncio.Protocol:
        raise AssertionError("no handoff here")

    def track(self, conn: FrontConnection) -> bool:
        return True

    def rejected(self, status: int) -> None:
        self.rejections.append(status)

    def send_timed_out(self) -> None:
        pass

    def request_finished(self, conn: FrontConnection) -> None:
        pass

    def forget(self, conn: FrontConnection) -> None:
        pass


def connect(handler: FakeHandler) -> tuple[FrontConnection, FakeTransport, FakeLoop]:
    loop = FakeLoop()
    conn = FrontConnection(handler, loop)  # type: ignore[arg-type]
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, loop


def feed(conn: FrontConnection, transport: FakeTransport, data: bytes,
         read_bytes: int = READ_BYTES) -> int:
    """Hand ``data`` to the connection a read at a time while it reads; return how many bytes
    it was handed after its first final (non-100) answer had been written."""
    after = 0
    for i in range(0, len(data), read_bytes):
        if transport.paused or transport.aborted or transport.closed:
            break
        answered = final_answer_written(transport.out)
        piece = data[i:i + read_bytes]
        if answered:
            after += len(piece)
        conn.data_received(piece)
    return after


def final_answer_written(out: bytes | bytearray) -> bool:
    """A response other than ``100 Continue`` is in ``out``."""
    rest = bytes(out)
    while rest.startswith(b"HTTP/1.1 100 "):
        rest = rest.partition(b"\r\n\r\n")[2]
    return rest.startswith(b"HTTP/1.")
