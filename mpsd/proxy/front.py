"""The proxy's client side: a lean HTTP/1.1 server protocol for the hot path.

aiohttp's web server costs ~100 µs of CPU per request on the project's 2-core test machine for a
hello-world handler alone (docs/performance.md), which is the whole budget of a proxied request.
This module reads requests with :class:`~mpsd.proxy.framing.RequestParser` (strict, bounded, no
I/O) and hands each complete one to :class:`Handler`; responses are written straight to the
transport. Anything the hot path does not serve (mounted routes such as ``/metrics``) is handed,
connection and all, to aiohttp's low-level server, which then owns that connection (see
:meth:`FrontConnection.handoff`).

What a client can hold per connection is bounded: a request head (``max_head_bytes``), one body
(``max_body_bytes``), :data:`MAX_PIPELINED_BYTES` of requests sent ahead while one is being
answered (then reading pauses), and the transport's write buffer (while it is over its high-water
mark, :data:`WRITE_HIGH_WATER`, no further pipelined request is started and a relayed response
stops reading from its engine). A client that takes nothing of its response for
``send_timeout_s`` (nginx's ``send_timeout``) has its request aborted at the engine and its
connection closed (:meth:`FrontConnection.expire`). A request is checked after its head
(:meth:`Handler.admit`: keys, limits) before its body is read, and a client that asked for
``100 Continue`` gets the final status instead when the head already decides it
(:meth:`Handler.decide`: RFC 9110 §10.1.1). A refused request is answered at once, with a FIN,
and the connection is cut :data:`LINGER_S` later (time for the client to read the answer: a
reset right away can destroy it on its way). Past a framing limit or broken framing (head,
header line, chunk line, trailers, body: 400, 413, 431, ...) nothing more is read in that time,
since such a client may send for ever; a well-framed request refused for other reasons (a key,
shutting down) has what its client still sends read and dropped, so that a client that sends
its whole body before reading gets the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from typing import Protocol

from mpsd.proxy.errors import error_body, reason
from mpsd.proxy.framing import Phase, Request, RequestParser
from mpsd.proxy.http_rules import HttpError, Limits

MAX_PIPELINED_BYTES = 1024 * 1024
WRITE_HIGH_WATER = 64 * 1024  # a client's write buffer over this pauses its engine's reads
_HEAD, _BODY = Phase  # module-level names: an enum member looked up on its class costs ~65 ns
LINGER_S = 2.0  # after a refusal, how long the connection is kept before it is cut
_DROP, _UNREAD = 1, 2  # a refused connection's linger: what it still reads


class Handler(Protocol):
    """What a :class:`FrontConnection` asks of the server that owns it."""

    limits: Limits

    def wants(self, request: Request) -> bool:
        """False: hand the connection to aiohttp before reading the body."""

    def admit(self, request: Request) -> tuple[int, str, bytes] | None:
        """After the head: ``(status, message, extra header lines)`` to refuse it unread."""

    def decide(self, request: Request) -> tuple[int, str, bytes] | None:
        """Before ``100 Continue``: a final answer the head already decides (shutting down, no
        engine, a method a local path does not allow), or None to let the body come."""

    def handle(self, conn: FrontConnection, request: Request) -> None:
        """Serve a complete request; must end with ``conn.response_done(...)``."""

    def handoff_protocol(self) -> asyncio.Protocol:
        """A fresh aiohttp request handler that will own a connection from now on."""

    def track(self, conn: FrontConnection) -> bool:
        """A client connected; False: over the connection cap, refuse it."""

    def rejected(self, status: int) -> None:
        """A request was refused by the front door itself (framing, limits, keys, timeouts)."""

    def send_timed_out(self) -> None:
        """A client took nothing of its response for ``send_timeout_s``: it was cut."""

    def request_finished(self, conn: FrontConnection) -> None:
        """A response ended and the connection is idle again (or closing)."""

    def forget(self, conn: FrontConnection) -> None:
        """The connection closed or was handed off."""


class FrontConnection(asyncio.Protocol):
    """One client connection: parse, dispatch one request at a time, keep-alive, pipelining."""

    __slots__ = ("_backlog", "_buf", "_handler", "_http11", "_linger", "_loop", "_parser",
                 "_paused_reading", "_processing", "_stuck_since", "_write_paused", "busy",
                 "closed", "exchange", "head_started", "last_active", "lingering_since", "task",
                 "transport")

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        # the loop is passed in, not looked up: on Python 3.11 every get_running_loop() call
        # is a getpid() system call, and a request would make several
        self._handler = handler
        self._loop = loop
        self._buf = bytearray()
        self._parser = RequestParser(handler.limits)
        self._paused_reading = False
        self._write_paused = False
        self._stuck_since = 0.0  # write paused since, and no write progress since
        self._backlog = 0  # the write buffer's size when it last went down
        self._processing = False
        self._http11 = True
        self._linger = 0  # after a refusal: _DROP (read and drop) or _UNREAD (read nothing)
        self.lingering_since = 0.0
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.exchange: Relay | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_active = 0.0
        self.head_started = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # the kernel's send buffer is capped on the listening socket (inherited: no call here)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.last_active = self._loop.time()
        if not self._handler.track(self):  # over the cap: answer at once, read nothing
            self.busy = True
            self.respond(503, error_body(503, "mpsd has too many client connections; retry "
                                              "later."),
                         keep_alive=False, extra=b"retry-after: 1\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._handler.forget(self)
        if self.exchange is not None:
            self.exchange.client_lost()
        if self.task is not None:
            self.task.cancel()

    def eof_received(self) -> bool:
        # A FIN from the client is a disconnect (as in aiohttp and uvicorn): the transport
        # closes, connection_lost cancels the request and the engine aborts it. Half-closing
        # clients that still wait for an answer are not supported; vanished ones are common.
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        self._stuck_since = self._loop.time()
        self._backlog = self.unsent()
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.exchange is not None:
            self.exchange.resume()
        elif not self.busy and self._buf:
            self._process()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._buf += data
        self.last_active = now = self._loop.time()
        if not self.busy and not self._parser.started:
            self.head_started = now
        if self.busy or self._write_paused:
            if len(self._buf) > MAX_PIPELINED_BYTES:
                self._pause_reading()
            return
        self._process()

    def use_limits(self, limits: Limits) -> None:
        """A reloaded config: the next request is read under ``limits``."""
        self._parser.limits = limits

    def attach(self, exchange: Relay) -> None:
        """``exchange`` relays the current response; it starts paused if the client is."""
        self.exchange = exchange
        if self._write_paused:
            exchange.pause()

    # -- request side ------------------------------------------------------------------------

    def _process(self) -> None:
        """Serve what the buffer holds, one request at a time, iteratively: a response
        finished synchronously (``/health``) comes back here through :meth:`response_done`,
        which then only lets this loop go on (500 pipelined requests are 500 iterations, not
        500 nested calls)."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self.busy and not self.closed and not self._write_paused:
                if not self._buf and self._parser.phase == _HEAD:
                    break
                request = self._next_request()
                if request is None:
                    break
                self.busy = True
                self._http11 = request.http11
                self._handler.handle(self, request)
        finally:
            self._processing = False
        if (self._paused_reading and not self.busy and not self.closed
                and len(self._buf) <= MAX_PIPELINED_BYTES):
            self._paused_reading = False
            if self.transport is not None:
                self.transport.resume_reading()

    def _next_request(self) -> Request | None:
        """A complete request out of the buffer, once its head was admitted; else None."""
        parser = self._parser
        try:
            if parser.phase == _HEAD:
                if not self._buf:
                    return None
                request = parser.head(self._buf)
                if request is None:
                    return None
                if not self._admitted(request):
                    return None
            request = parser.request
            assert request is not None
            if parser.body(self._buf):
                return request
        except HttpError as exc:
            self.fail(exc.status, exc.message, read_more=False)
        return None

    def _admitted(self, request: Request) -> bool:
        """Hand-off, refusal or ``100 Continue``: decided before any of the body is read."""
        handler = self._handler
        if not handler.wants(request):
            self.handoff()
            return False
        refusal = handler.admit(request)
        if refusal is None and (request.content_length or 0) > self._parser.limits.max_body_bytes:
            self.fail(413, f"the request body exceeds {self._parser.limits.max_body_bytes} "
                           "bytes", http11=request.http11, read_more=False)
            return False
        # (an HTTP/1.0 client's expectation is ignored: RFC 9110 §10.1.1)
        if refusal is None and request.expect_continue and request.has_body and request.http11:
            refusal = handler.decide(request)
            if refusal is None:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if refusal is not None:
            status, message, extra = refusal
            self.fail(status, message, extra=extra, http11=request.http11)
            return False
        return True

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def expire(self, now: float, head_s: float, body_s: float, idle_s: float,
               send_s: float = 0.0) -> None:
        """The housekeeping sweep's timeouts: a head must arrive within ``head_s``, a body may
        not stall for ``body_s``, an idle keep-alive connection lasts ``idle_s`` (408 for the
        first two, where a response can still be sent), and a client must take some of what
        is written to it within ``send_s`` (else its request is aborted and it is cut)."""
        if self.lingering_since and now - self.lingering_since > LINGER_S:
            if self.transport is not None:
                self.transport.abort()  # (close() would wait for a client that never reads)
            return
        if self._write_paused and send_s and self.transport is not None:
            backlog = self.unsent()
            if backlog < self._backlog:  # the client took some: progress
                self._backlog = backlog
                self._stuck_since = now
            elif now - self._stuck_since > send_s:
                self._handler.send_timed_out()
                self.abort()
                return
        if self.busy or self.closed:
            return
        if self._parser.phase == _BODY:
            if now - self.last_active > body_s:
                self.fail(408, f"the request body stalled for more than {body_s:g} s")
        elif self._parser.started:
            if now - self.head_started > head_s:
                self.fail(408, f"the request head took more than {head_s:g} s")
        elif now - self.last_active > idle_s:
            self.close()

    def unsent(self) -> int:
        """Bytes written to this client that it has not taken yet: the transport's buffer and
        the kernel's send queue (a slow reader's progress shows in the second long before the
        first goes down)."""
        transport = self.transport
        if transport is None:
            return 0
        size = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                       b"\0\0\0\0"))[0]
        return size

    # -- response side -----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write(self, data: bytes) -> None:
        self._write(data)

    def respond(self, status: int, body: bytes, *, keep_alive: bool,
                content_type: bytes = b"application/json", extra: bytes = b"",
                head_only: bool = False, finish: bool = True) -> None:
        """A complete response in one write; ``extra`` holds whole header lines.

        ``finish=False``: the caller calls :meth:`response_done` itself (a request task does,
        once, in its ``finally``).
        """
        connection = (b"connection: close\r\n" if not keep_alive
                      else b"" if self._http11 else b"connection: keep-alive\r\n")
        head = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s%s%s\r\n" % (
            status, reason(status), len(body),
            b"content-type: %s\r\n" % content_type if body else b"",
            extra, connection)
        self._write(head if head_only else head + body)
        if finish:
            self.response_done(keep_alive)

    def fail(self, status: int, message: str, *, extra: bytes = b"",
             http11: bool = True, read_more: bool = True) -> None:
        """Refuse a request before its body was read (or when its framing broke): answer, count
        it, and close the connection, since what follows on it cannot be framed. ``read_more``
        False (past a limit, broken framing): nothing more is read from it."""
        self.busy = True
        self._http11 = http11
        self._linger = _DROP if read_more else _UNREAD
        self._handler.rejected(status)
        self.respond(status, error_body(status, message), keep_alive=False, extra=extra)

    def response_done(self, keep_alive: bool) -> None:
        """The response is complete: close, or serve the next (pipelined) request."""
        self.busy = False
        self.exchange = None
        self.task = None
        if not keep_alive or self.closed:
            if self.transport is not None:
                if self._linger and not self.closed and self.transport.can_write_eof():
                    # refused: the answer and a FIN go out now; closing at once would reset a
                    # client still sending, and a reset can destroy the answer on its way, so
                    # the connection is cut LINGER_S later (expire). Past a limit nothing more
                    # is read meanwhile; else what comes is read and dropped (see module doc).
                    self.transport.write_eof()
                    self.lingering_since = self._loop.time()
                    if self._linger == _UNREAD:
                        self._pause_reading()
                    elif self._paused_reading:
                        self._paused_reading = False
                        self.transport.resume_reading()
                else:
                    self.transport.close()
            self.closed = True
            self._handler.request_finished(self)
            return
        self._handler.request_finished(self)
        if self.closed:  # the server is draining
            return
        self.last_active = self._loop.time()
        if self._buf or self._paused_reading:
            self.head_started = self.last_active
            self._process()

    def close(self) -> None:
        """Close after what was written; an exchange still relaying ends first."""
        if self.exchange is not None:
            self.exchange.client_lost()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.exchange is not None:
            self.exchange.client_lost()
        if self.transport is not None:
            self.transport.abort()

    # -- handoff -------------------------------------------------------------------------------

    def handoff(self) -> None:
        """Give this connection to an aiohttp request handler, replaying the request's head
        as it came and the bytes that followed it."""
        transport = self.transport
        if transport is None:
            return
        self.closed = True
        self._handler.forget(self)
        data = self._parser.head_bytes + b"\r\n\r\n" + bytes(self._buf)
        self._buf.clear()
        protocol = self._handler.handoff_protocol()
        if self._paused_reading:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)
        self.transport = None


class Relay(Protocol):
    """The response being relayed to a :class:`FrontConnection` (see ``proxy_upstream``)."""

    def client_lost(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...
