"""The OpenAI-compatible front door: every ``/v1/*`` request to the least-loaded engine.

The server owns the listening socket, the client connections (their cap, timeouts and drain) and
the pieces a request passes through (docs/architecture.md §2; docs/performance.md says why the
hot path is not aiohttp):

* :mod:`mpsd.proxy.front` parses the request in the client connection's protocol callback;
  :meth:`ProxyServer.handle` answers local paths (:mod:`mpsd.proxy.local`) or finds the body's
  top-level ``model`` (large bodies in slices that yield to the loop);
* :mod:`mpsd.proxy.dispatch` leases an engine, sends, retries within the budget and records
  how each request ended;
* everything else (``/metrics``, ``/mpsd/…`` pages mounted with :meth:`ProxyServer.add_route`)
  goes to aiohttp's low-level server (:mod:`mpsd.proxy.mounted`), which takes the connection
  over for that request and closes it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import structlog
from aiohttp import web

from mpsd.backend import Backend
from mpsd.config import ProxyConfig
from mpsd.errors import ConfigError
from mpsd.pool import BackendPool
from mpsd.proxy.dispatch import Dispatcher
from mpsd.proxy.errors import reply
from mpsd.proxy.framing import Request
from mpsd.proxy.front import FrontConnection
from mpsd.proxy.lag import LoopLag
from mpsd.proxy.local import PATHS as LOCAL_PATHS
from mpsd.proxy.local import LocalEndpoints, method_allowed
from mpsd.proxy.mounted import MountedRoutes, RouteHandler
from mpsd.proxy.observer import RequestObserver
from mpsd.proxy.relay import Exchange
from mpsd.proxy.request import (
    SMALL_BODY,
    ModelScan,
    authorized,
    load_api_keys,
    model_of,
    model_scan,
    run_scan,
)
from mpsd.proxy.settings import client_cap, configure_pool, limits
from mpsd.proxy.upstream import UpstreamPool
from mpsd.status import DaemonStatus, ProxyStatus

log = structlog.get_logger("mpsd.proxy")

_FORWARDED = frozenset({b"/tokenize", b"/detokenize", b"/pooling", b"/classify", b"/score",
                        b"/rerank", b"/invocations"})
_HOUSEKEEPING_S = 1.0
_SCAN_SLICES = 8  # model-scan slices done at once (~0.4 ms); the rest yields between slices


class ProxyServer:
    """Listens on ``config.listen`` and proxies to the engines of ``pool``."""

    _loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(self, config: ProxyConfig, pool: BackendPool,
                 status: Callable[[], DaemonStatus],
                 observer: RequestObserver, *,
                 alive: Callable[[], bool] = lambda: True) -> None:
        self._config = config
        self._pool = pool
        self._observer = observer
        self._keys = load_api_keys(config.api_keys_file)
        self._mounted = MountedRoutes(self._authorized)
        self._local = LocalEndpoints(pool, status, self.ready, alive)
        self._conns: set[FrontConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._aio: web.Server | None = None
        self._upstreams = UpstreamPool(connect_timeout_s=config.connect_timeout_s,
                                       max_connections=config.max_connections)
        self._housekeeping: asyncio.Task[None] | None = None
        self._lag: LoopLag | None = None
        self._idle = asyncio.Event()
        self._draining = False
        self._refusing = False
        self._ready = True
        self._last_sweep = 0.0
        self._stopping: asyncio.Future[None] | None = None
        self._port = config.port
        self.limits = limits(config)
        self._max_clients = client_cap(config)
        self._dispatch = Dispatcher(config, pool, self._upstreams, observer)
        self._dispatch.debug = _debug_enabled()
        configure_pool(pool, config)
        pool.on_backend_gone = self._backend_gone

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``config.host:config.port`` (``OSError`` if taken); return once listening."""
        # kept, not looked up per request: on Python 3.11 get_running_loop() is a getpid()
        loop = self._loop = self._upstreams.loop = self._dispatch.loop = asyncio.get_running_loop()
        self._aio = web.Server(self._mounted.handle, handler_cancellation=True, access_log=None)
        self._server = await loop.create_server(
            lambda: FrontConnection(self, loop), self._config.host, self._config.port,
            backlog=4096, reuse_address=True)
        self._cap_send_buffers()
        self._housekeeping = loop.create_task(self._sweep(), name="proxy-housekeeping")
        self._lag = LoopLag(loop, self._observer.loop_lag)
        self._lag.start()
        self._dispatch.debug = _debug_enabled()
        sockets = getattr(self._server, "sockets", None)
        if sockets:
            self._port = int(sockets[0].getsockname()[1])
        log.info("proxy_listening", listen=self._config.listen,
                 auth="on" if self._keys is not None else "off")

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight responses finish for ``grace`` s, then cut the rest.

        Idempotent: a second call waits for the first one's drain.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        self._draining = True
        if self._server is not None:
            self._server.close()
        busy = [c for c in self._conns if c.busy]
        for conn in list(self._conns):
            if not conn.busy:
                conn.close()
        if busy:
            log.info("proxy_draining", in_flight=len(busy), grace_s=grace)
            self._idle.clear()
            if any(c.busy for c in self._conns):
                try:
                    async with asyncio.timeout(grace):
                        await self._idle.wait()
                except TimeoutError:
                    left = [c for c in self._conns if c.busy]
                    log.warning("proxy_drain_timeout", cut=len(left))
        tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._aio is not None:
            await self._aio.shutdown(max(grace, 0.1))
        if self._lag is not None:
            self._lag.stop()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        self._upstreams.close()
        log.info("proxy_stopped")

    def _cap_send_buffers(self) -> None:
        """``client_send_buffer_bytes`` on the listening sockets: accepted connections inherit
        it, so a client that does not read pins that much of the kernel, not tcp_wmem's max."""
        size = self._config.client_send_buffer_bytes
        for sock in getattr(self._server, "sockets", None) or ():
            if size:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def refuse_new(self) -> None:
        """Shutdown began: new ``/v1`` requests get 503 + Retry-After (not the 404 an emptied
        pool would give), requests in flight go on while the engines drain."""
        self._refusing = True

    def ready(self) -> bool:
        """Readiness, what ``/health`` answers: an engine is routable and the node is not
        leaving the rotation."""
        return self._ready and not self._refusing and self._pool.routable_count() > 0

    def set_ready(self, ready: bool) -> None:
        """Readiness for a load balancer: ``False`` turns ``/health`` 503 while every request
        is still served (SIGTERM and ``mpsd drain --all`` leave the rotation this way first,
        so that the balancer's checks notice before anything is refused)."""
        self._ready = ready

    def apply(self, config: ProxyConfig) -> None:
        """Live reload: timeouts, body limit, keys, cap, connection limit (not ``listen``)."""
        if config.listen != self._config.listen:
            log.warning("proxy_listen_unchanged", running=self._config.listen,
                        wanted=config.listen, fix="restart mpsd to listen elsewhere")
        try:
            self._keys = load_api_keys(config.api_keys_file)
        except ConfigError as exc:
            log.error("proxy_api_keys_kept", error=str(exc))
        self._config = config.model_copy(update={"listen": self._config.listen})
        self.limits = limits(config)
        for conn in self._conns:
            conn.use_limits(self.limits)
        self._max_clients = client_cap(config)
        self._dispatch.config = self._config
        self._dispatch.retries.configure(config)
        self._upstreams.connect_timeout_s = config.connect_timeout_s
        self._upstreams.max_connections = config.max_connections
        configure_pool(self._pool, config)
        self._dispatch.debug = _debug_enabled()
        self._cap_send_buffers()

    def add_route(self, method: str, path: str, handler: RouteHandler, *,
                  prefix: bool = False, auth: bool = False) -> None:
        """Mount an aiohttp handler, e.g. ``add_route("GET", "/metrics", metrics)``.

        ``prefix=True`` matches every path under ``path`` (``"/mpsd/"``); ``method="*"`` any
        method. Routes are open unless ``auth=True`` (then the API key is required). Paths under
        ``/v1/`` and the local ones (``/health``, ``/mpsd/status``) are served before routes.
        """
        self._mounted.add(method, path, handler, prefix=prefix, auth=auth)

    @property
    def port(self) -> int:
        """The port listened on."""
        return self._port

    async def _sweep(self) -> None:
        """Close idle and stalled client connections and stale engine connections."""
        loop = asyncio.get_running_loop()
        while True:
            # the first-byte deadline is checked here rather than with a timer per request
            # (call_later + cancel costs ~4 µs a request): precision is a tenth of the timeout
            await asyncio.sleep(min(_HOUSEKEEPING_S, self._config.first_byte_timeout_s / 10))
            now = loop.time()
            self._upstreams.expire(now)
            if now - self._last_sweep < _HOUSEKEEPING_S:
                continue
            self._last_sweep = now
            self._upstreams.sweep(now)
            self._pool.readmit(now)
            self._upstreams.check_stalls(now, self._config.stall_timeout_s)
            config = self._config
            for conn in list(self._conns):
                conn.expire(now, config.head_timeout_s, config.body_timeout_s,
                            config.keepalive_timeout_s, config.send_timeout_s)

    def _backend_gone(self, backend: Backend) -> None:
        """The pool condemned or removed ``backend``: its exchanges end, in the next tick (the
        exchange that condemned it may be the one running now)."""
        if self._server is not None:
            self._loop.call_soon(self._end_exchanges, backend)

    def _end_exchanges(self, backend: Backend) -> None:
        for conn in list(self._conns):
            exchange = conn.exchange
            if isinstance(exchange, Exchange) and exchange.backend is backend:
                exchange.engine_gone()

    # -- FrontConnection callbacks (proxy_http.Handler) ---------------------------------------

    def wants(self, request: Request) -> bool:
        path = request.path
        return path.startswith((b"/v1/", b"/v2/")) or path in _FORWARDED or path in LOCAL_PATHS

    def forget(self, conn: FrontConnection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self._observer.connections_changed(-1)
        if conn.busy:
            self._maybe_idle()

    def track(self, conn: FrontConnection) -> bool:
        if len(self._conns) >= self._max_clients:
            self._observer.connection_refused()
            return False
        self._conns.add(conn)
        self._observer.connections_changed(1)
        return True

    def rejected(self, status: int) -> None:
        self._observer.request_rejected(status)

    def send_timed_out(self) -> None:
        self._observer.send_timed_out()

    def admit(self, request: Request) -> tuple[int, str, bytes] | None:
        """Keys are checked on the head: a keyless client never gets its body read."""
        if (self._keys is not None and request.path not in LOCAL_PATHS
                and not self._authorized(request.authorization)):
            return 401, "Incorrect API key provided.", b'www-authenticate: Bearer realm="mpsd"\r\n'
        return None

    def decide(self, request: Request) -> tuple[int, str, bytes] | None:
        """What the head already decides, for a client waiting for ``100 Continue``: a local
        path's method, a node shutting down or without any engine. (The model is in the body:
        the head cannot tell an unknown one.)"""
        path = request.path
        if path in LOCAL_PATHS:
            return None if method_allowed(request) else (405, "Method Not Allowed",
                                                         b"allow: GET, HEAD\r\n")
        if path.startswith(b"/v1/models") and request.method in (b"GET", b"HEAD"):
            return None
        if self._refusing:
            return 503, "mpsd is shutting down; retry on another host.", b"retry-after: 5\r\n"
        if not self._pool.model_count():
            return (503, "No engine is ready on this node; retry on another host.",
                    b"retry-after: 5\r\n")
        return None

    def request_finished(self, conn: FrontConnection) -> None:
        if self._draining:
            conn.close()  # no keep-alive while stopping
            conn.closed = True
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not any(c.busy for c in self._conns):
            self._idle.set()

    def handoff_protocol(self) -> asyncio.Protocol:
        assert self._aio is not None
        return self._aio()

    def handle(self, conn: FrontConnection, request: Request) -> None:
        path = request.path
        if path in LOCAL_PATHS:
            self._local.answer(conn, request)
            return
        if path.startswith(b"/v1/models") and request.method in (b"GET", b"HEAD"):
            self._local.models(conn, request)
            return
        if self._refusing:
            reply(conn, request, 503, "mpsd is shutting down; retry on another host.",
                  extra=b"retry-after: 5\r\n")
            self._observer.request_done(None, None, 503, 0.0, None)
            return
        if not request.body:
            self._dispatch.route(conn, request, None)
            return
        if len(request.body) <= SMALL_BODY:
            self._dispatch.route(conn, request, model_of(request.body))
            return
        scan = model_scan(request.body)
        done, model = run_scan(scan, _SCAN_SLICES)
        if done:
            self._dispatch.route(conn, request, model)
        else:  # a large body: scan the rest in slices, other connections served in between
            conn.task = self._loop.create_task(self._scan_then_route(conn, request, scan))

    async def _scan_then_route(self, conn: FrontConnection, request: Request,
                               scan: ModelScan) -> None:
        while True:
            await asyncio.sleep(0)
            done, model = run_scan(scan, 1)
            if done:
                break
        conn.task = None
        self._dispatch.route(conn, request, model)

    def status(self) -> ProxyStatus:
        """What ``GET /mpsd/status`` answers (see :mod:`mpsd.proxy.local`)."""
        return self._local.status()

    def _authorized(self, header: bytes) -> bool:
        return authorized(self._keys or (), header)

def _debug_enabled() -> bool:
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return bool(is_enabled_for(logging.DEBUG)) if is_enabled_for is not None else True





