"""The proxy's engine side: keep-alive HTTP/1.1 connections to the engines.

Why not aiohttp's ``ClientSession``: its per-request machinery (request and response objects,
payload stream reader, one task wake-up per body chunk) costs more CPU than the rest of a proxied
request together (docs/performance.md). These connections are plain asyncio protocols that hand
every read to the current :class:`~mpsd.proxy.relay.Exchange`.

Explicit limits and timeouts replace the ``ClientSession``'s: ``max_connections`` engine
connections in all, ``connect_timeout_s`` per connect, ``first_byte_timeout_s`` until the response
head (checked by :meth:`UpstreamPool.expire`), and idle connections are dropped after
:data:`IDLE_S`, well before uvicorn's 5 s keep-alive timeout closes them under a request (the
classic keep-alive race).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mpsd.proxy.relay import Exchange

IDLE_S = 2.0
# the kernel's receive buffer of an engine connection: what an engine's answer can pile up in
# mpsd's kernel while its client does not read (autotuning would let it grow to tcp_rmem's max)
RECV_BUFFER_BYTES = 256 * 1024

class UpstreamConnectError(Exception):
    """Connecting failed: the request was never sent, so another engine may take it.
    ``refused``: nothing listens there (the engine is gone), not merely slow to accept."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an engine; feeds the current :class:`Exchange`."""

    __slots__ = ("closed", "exchange", "idle_since", "origin", "pool", "transport", "uses")

    def __init__(self, pool: UpstreamPool, origin: str) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self.uses = 0  # requests sent on it (1: a fresh connection)

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

    loop: asyncio.AbstractEventLoop  # set by the owner once running (get_running_loop() is a
    # getpid() system call on Python 3.11: not something to do per request)

    def __init__(self, *, connect_timeout_s: float, max_connections: int) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_connections = max_connections
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._origins: dict[str, tuple[str, int, bytes]] = {}
        self._open = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self.awaiting: set[Exchange] = set()  # sent, no response head yet (first-byte clock)
        self.streams: set[Exchange] = set()  # SSE responses past their head (stall clock)

    def origin(self, base_url: str) -> tuple[str, int, bytes]:
        """``(host, port, Host header value)`` of an engine URL (cached)."""
        known = self._origins.get(base_url)
        if known is None:
            parts = urlsplit(base_url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            known = (host, port, (parts.netloc or f"{host}:{port}").encode())
            self._origins[base_url] = known
        return known

    def idle(self, base_url: str) -> UpstreamConnection | None:
        """A fresh idle connection to ``base_url``, if there is one (most recently used)."""
        idle = self._idle.get(base_url)
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < IDLE_S:
                    return conn
                if conn.transport is not None:
                    conn.transport.close()
        return None

    async def acquire(self, base_url: str) -> UpstreamConnection:
        """An idle connection to ``base_url``, or a new one (:class:`UpstreamConnectError`)."""
        conn = self.idle(base_url)
        if conn is not None:
            return conn
        while self._open >= self.max_connections:
            waiter: asyncio.Future[None] = self.loop.create_future()
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
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, base_url), host, port)
        except (OSError, TimeoutError) as exc:
            self._open -= 1
            self._wake_one()
            raise UpstreamConnectError(f"cannot connect to {base_url}: {exc}",
                                       refused=isinstance(exc, ConnectionRefusedError)) from exc
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:  # once per connection, before its first request
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER_BYTES)
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.exchange = None
        if reusable and not conn.closed and not self._closing and conn.transport is not None:
            conn.idle_since = self.loop.time()
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

    def expire(self, now: float) -> None:
        """Fail the exchanges whose first-byte deadline passed (504)."""
        for exchange in [e for e in self.awaiting if now >= e.deadline]:
            exchange.first_byte_timeout()

    def check_stalls(self, now: float, stall_s: float) -> None:
        """Judge every stream for a stall (see :meth:`Exchange.check_stall`)."""
        for exchange in list(self.streams):
            exchange.check_stall(now, stall_s)

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


