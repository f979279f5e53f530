"""The proxy's client side: a lean HTTP/1.1 server protocol for the hot path.

aiohttp's web server costs ~100 µs of CPU per request on the project's 2-core test machine for a
hello-world handler alone (docs/performance.md), which is the whole budget of a proxied request.
This module parses requests with a few bytes operations and hands each complete request to
:class:`Handler`; responses are written straight to the transport. Anything the hot path does not
serve (mounted routes such as ``/metrics``) is handed, connection and all, to aiohttp's low-level
server, which then owns that connection (see :meth:`FrontConnection.handoff`).

Parsing is strict where laxness enables request smuggling towards the engines: bare CR/LF or NUL
in the head, obs-fold, both Content-Length and Transfer-Encoding, conflicting lengths, and
transfer codings other than ``chunked`` are refused.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from mpsd.proxy.errors import error_body, reason

MAX_HEAD_BYTES = 64 * 1024
MAX_PIPELINED_BYTES = 1024 * 1024

# Hop-by-hop request headers: never forwarded to an engine (RFC 9110 §7.6.1), plus the ones
# mpsd rewrites itself (host, content-length) and expect (answered here).
_HOP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"host", b"content-length", b"expect", b"proxy-authorization",
})


class HttpError(Exception):
    """A request that cannot be parsed: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One parsed request. ``forward`` holds the end-to-end header lines, verbatim."""

    __slots__ = ("authorization", "body", "chunked", "content_length", "expect_continue",
                 "forward", "http11", "keep_alive", "method", "path", "target")

    def __init__(self, method: bytes, target: bytes, http11: bool) -> None:
        self.method = method
        self.target = target
        self.path = target.partition(b"?")[0]
        self.http11 = http11
        self.keep_alive = http11
        self.forward: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.authorization = b""
        self.body = b""


def parse_head(head: bytes) -> Request:
    """Parse a request head (without the blank line); raise :class:`HttpError` if malformed."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf or b"\x00" in head:
        raise HttpError(400, "bare CR, LF or NUL in the request head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha():
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        request = Request(method, target, True)
    elif version == b"HTTP/1.0":
        request = Request(method, target, False)
    else:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not target.startswith(b"/") or b"/.." in request.path or b"\\" in request.path:
        raise HttpError(400, "the request target must be an absolute path without '..'")
    forward = request.forward
    connection = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1] in b" \t" or line[0] in b" \t":
            raise HttpError(400, "malformed header line")
        lname = name.lower()
        if lname not in _HOP_REQUEST:
            forward.append(line)
            if lname == b"authorization":
                request.authorization = value.strip(b" \t")
            continue
        value = value.strip(b" \t")
        if lname == b"content-length":
            if not value.isdigit() or (request.content_length is not None
                                       and request.content_length != int(value)):
                raise HttpError(400, "invalid Content-Length")
            request.content_length = int(value)
        elif lname == b"transfer-encoding":
            if value.lower() != b"chunked" or request.chunked:
                raise HttpError(501, "only Transfer-Encoding: chunked is supported")
            request.chunked = True
        elif lname == b"connection":
            connection += b"," + value.lower()
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise HttpError(417, "only Expect: 100-continue is supported")
            request.expect_continue = True
    if request.chunked and request.content_length is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if connection:
        tokens = {t.strip() for t in connection.split(b",") if t.strip()}
        if b"close" in tokens:
            request.keep_alive = False
        elif b"keep-alive" in tokens and not request.http11:
            request.keep_alive = True
        extra = tokens - {b"close", b"keep-alive"}
        if extra:  # headers the client marked hop-by-hop
            request.forward = [x for x in forward if x.partition(b":")[0].lower() not in extra]
    return request


class Handler(Protocol):
    """What a :class:`FrontConnection` asks of the server that owns it."""

    max_body_bytes: int

    def wants(self, request: Request) -> bool:
        """False: hand the connection to aiohttp before reading the body."""

    def handle(self, conn: FrontConnection, request: Request) -> None:
        """Serve a complete request; must end with ``conn.response_done(...)``."""

    def handoff_protocol(self) -> asyncio.Protocol:
        """A fresh aiohttp request handler that will own a connection from now on."""

    def track(self, conn: FrontConnection) -> None:
        """A client connected."""

    def request_finished(self, conn: FrontConnection) -> None:
        """A response ended and the connection is idle again (or closing)."""

    def forget(self, conn: FrontConnection) -> None:
        """The connection closed or was handed off."""


class FrontConnection(asyncio.Protocol):
    """One client connection: parse, dispatch one request at a time, keep-alive, pipelining."""

    __slots__ = ("_buf", "_chunk_left", "_handler", "_loop", "_paused_reading", "_request",
                 "busy", "closed", "exchange", "last_active", "task", "transport")

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        # the loop is passed in, not looked up: on Python 3.11 every get_running_loop() call
        # is a getpid() system call, and a request would make several
        self._handler = handler
        self._loop = loop
        self._buf = bytearray()
        self._request: Request | None = None
        self._chunk_left = -1
        self._paused_reading = False
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closed = False
        self.exchange: Relay | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_active = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.last_active = self._loop.time()
        self._handler.track(self)

    @property
    def reading(self) -> bool:
        """Part of a request has arrived (a stalled client is closed sooner than an idle one)."""
        return bool(self._buf) or self._request is not None

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
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self.busy:
            if len(self._buf) > MAX_PIPELINED_BYTES and self.transport is not None:
                self.transport.pause_reading()
                self._paused_reading = True
            return
        self._process()

    # -- request side ------------------------------------------------------------------------

    def _process(self) -> None:
        while not self.busy and not self.closed:
            request = self._request
            if request is None:
                if not self._buf:
                    return
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD_BYTES:
                        self.fail(431, "the request head is too large")
                    return
                if end > MAX_HEAD_BYTES:
                    self.fail(431, "the request head is too large")
                    return
                try:
                    request = parse_head(bytes(self._buf[:end]))
                except HttpError as exc:
                    self.fail(exc.status, exc.message)
                    return
                if not self._handler.wants(request):
                    self.handoff()
                    return
                del self._buf[:end + 4]
                limit = self._handler.max_body_bytes
                if request.content_length is not None and request.content_length > limit:
                    self.fail(413, f"the request body exceeds {limit} bytes")
                    return
                self._request = request
                self._chunk_left = -1
                if request.expect_continue and (request.chunked or request.content_length):
                    self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not self._read_body(request):
                return
            self._request = None
            self.busy = True
            self.last_active = self._loop.time()
            self._handler.handle(self, request)

    def _read_body(self, request: Request) -> bool:
        if request.content_length is not None:
            n = request.content_length
            if len(self._buf) < n:
                return False
            request.body = bytes(self._buf[:n])
            del self._buf[:n]
            return True
        if not request.chunked:
            return True
        return self._read_chunked(request)

    def _read_chunked(self, request: Request) -> bool:
        """Decode a chunked request body incrementally into ``request.body``."""
        buf = self._buf
        while True:
            if self._chunk_left < 0:  # at a size line
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > 1024:
                        self.fail(400, "malformed chunked body")
                    return False
                try:
                    size = int(bytes(buf[:nl]).split(b";")[0].strip(), 16)
                except ValueError:
                    self.fail(400, "malformed chunked body")
                    return False
                if size == 0:
                    trailer_end = buf.find(b"\r\n\r\n", nl)  # the empty line after trailers
                    if trailer_end < 0:
                        return False
                    del buf[:trailer_end + 4]
                    return True
                if len(request.body) + size > self._handler.max_body_bytes:
                    self.fail(413, f"the request body exceeds {self._handler.max_body_bytes} "
                              "bytes")
                    return False
                del buf[:nl + 2]
                self._chunk_left = size
            if len(buf) < self._chunk_left + 2:
                return False
            if buf[self._chunk_left:self._chunk_left + 2] != b"\r\n":
                self.fail(400, "malformed chunked body")
                return False
            request.body += bytes(buf[:self._chunk_left])
            del buf[:self._chunk_left + 2]
            self._chunk_left = -1

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
        close = not keep_alive
        head = b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s%s%s\r\n" % (
            status, reason(status), len(body),
            b"content-type: %s\r\n" % content_type if body else b"",
            extra, b"connection: close\r\n" if close else b"")
        self._write(head if head_only else head + body)
        if finish:
            self.response_done(not close)

    def fail(self, status: int, message: str) -> None:
        """A protocol-level error: answer it and close the connection."""
        self.busy = True
        self.respond(status, error_body(status, message), keep_alive=False)

    def response_done(self, keep_alive: bool) -> None:
        """The response is complete: close, or serve the next (pipelined) request."""
        self.busy = False
        self.exchange = None
        self.task = None
        if not keep_alive or self.closed:
            if self.transport is not None:
                self.transport.close()
            self.closed = True
            self._handler.request_finished(self)
            return
        self._handler.request_finished(self)
        if self.closed:  # the server is draining
            return
        self.last_active = self._loop.time()
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
        if self._buf:
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
        """Give this connection, and what it sent so far, to an aiohttp request handler."""
        transport = self.transport
        if transport is None:
            return
        self.closed = True
        self._handler.forget(self)
        data = bytes(self._buf)
        self._buf.clear()
        protocol = self._handler.handoff_protocol()
        if self._paused_reading:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
        self.transport = None


class Relay(Protocol):
    """The response being relayed to a :class:`FrontConnection` (see ``proxy_upstream``)."""

    def client_lost(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...
