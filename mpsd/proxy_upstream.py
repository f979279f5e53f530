"""The proxy's engine side: keep-alive HTTP/1.1 connections and the response relay.

Why not aiohttp's ``ClientSession``: its per-request machinery (request and response objects,
payload stream reader, one task wake-up per body chunk) costs more CPU than the rest of a proxied
request together (docs/performance.md). Here the response head is parsed once and then every
body read from the engine is written to the client's transport **from the protocol callback**:
no task wake-up, no copy, no parsing of SSE events. Chunked bodies are passed through verbatim;
only the chunk-size lines are looked at, to find the end of the response.

Explicit limits and timeouts replace the ``ClientSession``'s: ``max_connections`` upstream
connections in all, ``connect_timeout_s`` per connect, ``first_byte_timeout_s`` until the response
head (:class:`Exchange`), and idle connections are dropped after :data:`IDLE_S`, well before
uvicorn's 5 s keep-alive timeout closes them under a request (the classic keep-alive race).
"""

from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import urlsplit

from mpsd.openai_errors import sse_error_event
from mpsd.proxy_http import FrontConnection

IDLE_S = 2.0
MAX_HEAD_BYTES = 64 * 1024

_NONE, _LENGTH, _CHUNKED, _DECHUNK, _EOF = range(5)
_HOP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"content-length", b"proxy-authenticate",
})


class UpstreamError(Exception):
    """The engine failed before the response head: nothing was sent to the client yet."""

    status = 502


class UpstreamConnectError(UpstreamError):
    """Connecting failed: the request was never sent, so another engine may take it."""


class FirstByteTimeout(UpstreamError):
    """No response head within ``first_byte_timeout_s``."""

    status = 504


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an engine; feeds the current :class:`Exchange`."""

    __slots__ = ("closed", "exchange", "idle_since", "origin", "pool", "transport")

    def __init__(self, pool: UpstreamPool, origin: str) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.feed(data)
        elif self.transport is not None:  # bytes while idle: the framing is lost
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._lost(self)
        if self.exchange is not None:
            self.exchange.upstream_lost()


class UpstreamPool:
    """Keep-alive connections to every engine, at most ``max_connections`` open at once."""

    def __init__(self, *, connect_timeout_s: float, max_connections: int) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._origins: dict[str, tuple[str, int, bytes]] = {}
        self._open = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False

    def origin(self, base_url: str) -> tuple[str, int, bytes]:
        """``(host, port, Host header value)`` of an engine URL (cached)."""
        known = self._origins.get(base_url)
        if known is None:
            parts = urlsplit(base_url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            known = (host, port, (parts.netloc or f"{host}:{port}").encode())
            self._origins[base_url] = known
        return known

    async def acquire(self, base_url: str) -> UpstreamConnection:
        """An idle connection to ``base_url``, or a new one (:class:`UpstreamConnectError`)."""
        idle = self._idle.get(base_url)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < IDLE_S:
                    return conn
                if conn.transport is not None:
                    conn.transport.close()
        while self._open >= self.max_connections:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
        host, port, _ = self.origin(base_url)
        self._open += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: UpstreamConnection(self, base_url), host, port)
        except (OSError, TimeoutError) as exc:
            self._open -= 1
            self._wake_one()
            raise UpstreamConnectError(f"cannot connect to {base_url}: {exc}") from exc
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.exchange = None
        if reusable and not conn.closed and not self._closing and conn.transport is not None:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(conn.origin, []).append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def _lost(self, conn: UpstreamConnection) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def sweep(self, now: float) -> None:
        """Close idle connections the engines may be about to close themselves."""
        for idle in self._idle.values():
            stale = [c for c in idle if c.closed or now - c.idle_since >= IDLE_S]
            for conn in stale:
                idle.remove(conn)
                if conn.transport is not None:
                    conn.transport.close()

    def close(self) -> None:
        self._closing = True
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return self._open


class Exchange:
    """One request sent to an engine and its response relayed to the client.

    ``done`` resolves with whether the client connection stays open once the response is
    complete, or fails with :class:`UpstreamError` if the engine failed before the response head
    (then nothing was written to the client and the caller answers 502/504 itself). A failure after
    the head is handled here: an SSE stream gets an error event and a clean end, anything else
    has its client connection closed, and ``broken`` is set.
    """

    __slots__ = ("_buf", "_framing", "_in_trailer", "_left", "_paused", "_timer", "broken",
                 "client", "done", "head_at", "head_only", "http11", "keep_alive", "pool",
                 "reusable", "sse", "status", "upstream")

    def __init__(self, client: FrontConnection, upstream: UpstreamConnection, *,
                 keep_alive: bool, http11: bool, head_only: bool) -> None:
        self.client = client
        self.upstream = upstream
        self.pool = upstream.pool
        self.keep_alive = keep_alive
        self.http11 = http11
        self.head_only = head_only
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.head_at = 0.0
        self.broken = False
        self.sse = False
        self.reusable = True
        self._buf = b""
        self._framing = -1
        self._left = 0
        self._in_trailer = False
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self, request: bytes, first_byte_timeout_s: float) -> None:
        upstream = self.upstream
        assert upstream.transport is not None
        upstream.exchange = self
        self.client.exchange = self
        self._timer = asyncio.get_running_loop().call_later(first_byte_timeout_s,
                                                            self._first_byte_timeout)
        upstream.transport.write(request)

    # -- engine → client -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        framing = self._framing
        if framing == _CHUNKED:  # the hot path: an SSE event or a slice of a chunked body
            end = self._scan(data)
            if end < 0:
                self.client.write(data)
                return
            self.client.write(data if end == len(data) else data[:end])
            self._finish(end == len(data))
            return
        if framing < 0:
            self._feed_head(data)
            return
        self._relay(data)

    def _feed_head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                if len(buf) > MAX_HEAD_BYTES:
                    self._fail_before_head("the engine sent an oversized response head")
                return
            status = _status_of(buf)
            if 100 <= status < 200 and status != 101:  # interim response: wait for the real one
                buf = buf[end + 4:]
                continue
            break
        self._buf = b""
        try:
            head = self._client_head(buf[:end], status)
        except ValueError:
            self._fail_before_head("the engine sent a malformed response head")
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.status = status
        self.head_at = asyncio.get_running_loop().time()
        rest = buf[end + 4:]
        if self._framing == _NONE:
            self.client.write(head)
            self._finish(not rest)
            return
        self.client.write(head)
        if rest:
            self.feed(rest)

    def _client_head(self, head: bytes, status: int) -> bytes:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise ValueError(status_line)
        upstream_close = not status_line.startswith(b"HTTP/1.1")
        out = [b"HTTP/1.1" + status_line[8:]]
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lname = name.lower()
            if lname in _HOP_RESPONSE:
                if lname == b"content-length":
                    length = int(value)
                elif lname == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif lname == b"connection":
                    upstream_close = upstream_close or b"close" in value.lower()
                continue
            if lname == b"content-type" and b"text/event-stream" in value:
                self.sse = True
                out.append(b"x-accel-buffering: no")
            out.append(line)
        self.reusable = not upstream_close
        if self.head_only or status in (204, 304) or 100 <= status < 200:
            self._framing = _NONE
            if length is not None and self.head_only:
                out.append(b"content-length: %d" % length)
        elif chunked:
            self._framing = _CHUNKED if self.http11 else _DECHUNK
            if self.http11:
                out.append(b"transfer-encoding: chunked")
            else:
                self.keep_alive = False
        elif length is not None:
            self._framing = _LENGTH
            self._left = length
            out.append(b"content-length: %d" % length)
            if length == 0:
                self._framing = _NONE
        else:
            self._framing = _EOF
            self.reusable = False
            self.keep_alive = False
        if not self.keep_alive:
            out.append(b"connection: close")
        out.append(b"\r\n")
        return b"\r\n".join(out)

    def _relay(self, data: bytes) -> None:
        framing = self._framing
        if framing == _LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                self.client.write(data)
                return
            self.client.write(data if len(data) == left else data[:left])
            self._finish(len(data) == left)
        elif framing == _EOF:
            self.client.write(data)
        elif framing == _DECHUNK:
            payload, end = self._dechunk(data)
            if payload:
                self.client.write(payload)
            if end >= 0:
                self._finish(end == len(data))
        else:  # _NONE: bytes after a body-less response
            self.reusable = False

    def _scan(self, data: bytes) -> int:
        """Advance over chunk framing; return the index just past the last chunk, else -1."""
        buf = data
        offset = 0
        if self._buf:  # a chunk-size line split across reads (rare)
            buf = self._buf + data
            offset = len(self._buf)
            self._buf = b""
        pos = 0
        n = len(buf)
        left = self._left
        while True:
            if left:
                if n - pos <= left:
                    self._left = left - (n - pos)
                    return -1
                pos += left
                left = 0
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                self._left = 0
                self._buf = buf[pos:]
                if len(self._buf) > 1024:
                    self._break("the engine sent malformed chunked framing")
                return -1
            if self._in_trailer:
                if nl == pos:
                    self._left = 0
                    return nl + 2 - offset
                pos = nl + 2
                continue
            try:
                size = int(buf[pos:nl].split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                self._break("the engine sent malformed chunked framing")
                return -1
            pos = nl + 2
            if size == 0:
                self._in_trailer = True
            else:
                left = size + 2

    def _dechunk(self, data: bytes) -> tuple[bytes, int]:
        """Like :meth:`_scan` but return the chunk payloads (for HTTP/1.0 clients)."""
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        offset = len(self._buf)
        self._buf = b""
        pos, n = 0, len(buf)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                payload_left = max(self._left - 2, 0)
                out.append(buf[pos:pos + min(take, payload_left)])
                self._left -= take
                pos += take
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                self._buf = buf[pos:]
                break
            if self._in_trailer:
                if nl == pos:
                    return b"".join(out), nl + 2 - offset
                pos = nl + 2
                continue
            try:
                size = int(buf[pos:nl].split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                self._break("the engine sent malformed chunked framing")
                return b"".join(out), -1
            pos = nl + 2
            if size == 0:
                self._in_trailer = True
            else:
                self._left = size + 2
        return b"".join(out), -1

    # -- endings ------------------------------------------------------------------------------

    def _finish(self, clean: bool) -> None:
        """The response is complete; ``clean``: nothing followed it on the engine connection."""
        if self.done.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        upstream = self.upstream
        if self._paused and upstream.transport is not None:
            upstream.transport.resume_reading()
            self._paused = False
        self.pool.release(upstream, self.reusable and clean and not self.broken)
        self.client.exchange = None
        self.done.set_result(self.keep_alive)

    def _fail_before_head(self, message: str, error: type[UpstreamError] = UpstreamError) -> None:
        if self.done.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.upstream.exchange = None
        if self.upstream.transport is not None:
            self.upstream.transport.abort()
        self.client.exchange = None
        self.done.set_exception(error(message))

    def _break(self, message: str) -> None:
        """The engine failed after the head went out: end the client's response as well as we
        can — an SSE stream at a chunk boundary gets an error event and a proper end."""
        if self.done.done():
            return
        self.broken = True
        self.reusable = False
        at_boundary = self._left == 0 and not self._buf and not self._in_trailer
        if self.sse and self._framing == _CHUNKED and at_boundary:
            event = sse_error_event(502, f"the engine failed mid-stream: {message}")
            self.client.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            self._finish(False)  # the client's response ended cleanly: keep-alive stays
            return
        if self.sse and self._framing in (_DECHUNK, _EOF):
            self.client.write(sse_error_event(502, f"the engine failed mid-stream: {message}"))
        self.keep_alive = False
        self.client.close()
        self._finish(False)

    def upstream_lost(self) -> None:
        if self.done.done():
            return
        if self._framing < 0:
            self._fail_before_head("the engine closed the connection before answering")
        elif self._framing == _EOF:
            self._finish(False)
        else:
            self._break("the engine closed the connection")

    def _first_byte_timeout(self) -> None:
        self._timer = None
        if self._framing < 0:
            self._fail_before_head("no response from the engine within first_byte_timeout_s",
                                   FirstByteTimeout)

    # -- client → engine signals (FrontConnection calls these) ---------------------------------

    def client_lost(self) -> None:
        """The client went away: drop the engine connection so the engine aborts the request."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.upstream.exchange = None
        if self.upstream.transport is not None:
            self.upstream.transport.abort()
        if not self.done.done():
            self.done.cancel()

    def pause(self) -> None:
        if not self._paused and self.upstream.transport is not None:
            self._paused = True
            self.upstream.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.upstream.transport is not None:
            self._paused = False
            self.upstream.transport.resume_reading()


def _status_of(buf: bytes) -> int:
    try:
        return int(buf[9:12])
    except ValueError:
        return 0
