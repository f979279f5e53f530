"""The OpenAI-compatible front door: every ``/v1/*`` request to the least-loaded engine.

Shape of the hot path (docs/architecture.md §2; docs/performance.md says why it is not aiohttp
end to end):

* :mod:`mpsd.proxy.front` parses the request in the client connection's protocol callback, and
  :meth:`ProxyServer.handle` reads the model from the JSON body;
* ``pool.try_lease(model)`` — a :class:`~mpsd.pool.Lease`, the only thing that changes in-flight
  counts — and an idle engine connection are taken synchronously; when either is missing, one
  task (:meth:`ProxyServer._serve`) waits in the FIFO admission queue and/or connects, and a
  failed *connect* (the request never left) moves on to another engine, each once — as does a
  request whose engine failed before the client saw a byte (reset, 502/503, a dead engine's
  500), within the retry budget;
* an :class:`~mpsd.proxy.relay.Exchange` then owns the lease: it sends the request and relays
  the response from the engine connection's callback straight into the client transport, chunk
  by chunk, unbuffered; however it ends (complete, engine failure, first-byte timeout, client
  gone — which aborts the engine connection, so vLLM aborts the request) it releases the lease
  once and calls :meth:`ProxyServer._ended`, the one place a request is recorded and finished.

``/health`` (readiness: 200 while the node wants new requests), ``/livez`` (liveness: 200
while the daemon's own tasks are alive), ``/ping``, ``/v1/models`` and ``/mpsd/status`` are
answered here. Everything else
(``/metrics``, ``/mpsd/…`` pages another module mounts with :meth:`ProxyServer.add_route`) goes
to aiohttp's low-level server (``handler_cancellation=True``, no access log), which takes the
connection over for that request and closes it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from mpsd.config import ProxyConfig
from mpsd.errors import ConfigError
from mpsd.pool import Backend, BackendPool, Lease, NoCapacity, UnknownModel
from mpsd.proxy.errors import error_body
from mpsd.proxy.framing import Limits, Request
from mpsd.proxy.front import FrontConnection
from mpsd.proxy.relay import Exchange
from mpsd.proxy.request import (
    SMALL_BODY,
    ModelScan,
    authorized,
    load_api_keys,
    model_of,
    model_scan,
    run_scan,
    upstream_request,
)
from mpsd.proxy.upstream import UpstreamConnectError, UpstreamConnection, UpstreamPool
from mpsd.status import DaemonStatus, ProxyStatus

log = structlog.get_logger("mpsd.proxy")

RouteHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

_FORWARDED = frozenset({b"/tokenize", b"/detokenize", b"/pooling", b"/classify", b"/score",
                        b"/rerank", b"/invocations"})
_LOCAL = frozenset({b"/health", b"/livez", b"/ping", b"/mpsd/status"})
_HOUSEKEEPING_S = 1.0
_SCAN_SLICES = 8  # model-scan slices done at once (~0.4 ms); the rest yields between slices


class RequestObserver(Protocol):
    """Per-request hooks (``metrics.py`` implements them); called on the event loop.

    ``request_done`` once per request that reached the proxying stage: ``model`` is the model it
    went to (``None`` if it named none and none was chosen), ``engine`` the backend key (``None``
    if no engine was picked: 404, 503), ``code`` the status the client got — 499 when the client
    went away first, 502 when the engine broke after the head went out.
    """

    def request_done(self, model: str | None, engine: str | None, code: int, duration_s: float,
                     ttfb_s: float | None) -> None: ...

    def queue_wait(self, seconds: float) -> None: ...

    def request_rejected(self, status: int) -> None:
        """The front door refused a request itself (framing, limits, keys, timeouts)."""

    def connections_changed(self, opened: int) -> None:
        """Client connections opened (+1) or closed (-1)."""

    def connection_refused(self) -> None:
        """A client connection over ``max_client_connections`` was refused."""

    def request_retried(self, reason: str) -> None:
        """A request went to another engine (``connect``, ``reset``, ``engine_dead``, ``5xx``)."""


class _Route:
    __slots__ = ("auth", "handler", "method", "path", "prefix")

    def __init__(self, method: str, path: str, handler: RouteHandler, prefix: bool,
                 auth: bool) -> None:
        self.method, self.path, self.handler = method.upper(), path, handler
        self.prefix, self.auth = prefix, auth


class ProxyServer:
    """Listens on ``config.listen`` and proxies to the engines of ``pool``."""

    _loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(self, config: ProxyConfig, pool: BackendPool,
                 status: Callable[[], DaemonStatus],
                 observer: RequestObserver, *,
                 alive: Callable[[], bool] = lambda: True) -> None:
        self._config = config
        self._alive = alive
        self._pool = pool
        self._status = status
        self._observer = observer
        self._keys = load_api_keys(config.api_keys_file)
        self._routes: list[_Route] = []
        self._conns: set[FrontConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._aio: web.Server | None = None
        self._upstreams = UpstreamPool(connect_timeout_s=config.connect_timeout_s,
                                       max_connections=config.max_connections)
        self._housekeeping: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._draining = False
        self._refusing = False
        self._ready = True
        self._last_sweep = 0.0
        self._stopping: asyncio.Future[None] | None = None
        self._port = config.port
        self._debug = _debug_enabled()
        self._created = int(time.time())
        self.limits = _limits(config)
        self._max_clients = _client_cap(config)
        self._retrying = 0  # requests in flight that are retries (the budget's numerator)
        _configure_pool(pool, config)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``config.host:config.port`` (``OSError`` if taken); return once listening."""
        # kept, not looked up per request: on Python 3.11 get_running_loop() is a getpid()
        loop = self._loop = self._upstreams.loop = asyncio.get_running_loop()
        self._aio = web.Server(self._aio_handle, handler_cancellation=True, access_log=None)
        self._server = await loop.create_server(
            lambda: FrontConnection(self, loop), self._config.host, self._config.port,
            backlog=4096, reuse_address=True)
        self._housekeeping = loop.create_task(self._sweep(), name="proxy-housekeeping")
        self._debug = _debug_enabled()
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
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        self._upstreams.close()
        log.info("proxy_stopped")

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
        self.limits = _limits(config)
        for conn in self._conns:
            conn.use_limits(self.limits)
        self._max_clients = _client_cap(config)
        self._upstreams.connect_timeout_s = config.connect_timeout_s
        self._upstreams.max_connections = config.max_connections
        _configure_pool(self._pool, config)
        self._debug = _debug_enabled()

    def add_route(self, method: str, path: str, handler: RouteHandler, *,
                  prefix: bool = False, auth: bool = False) -> None:
        """Mount an aiohttp handler, e.g. ``add_route("GET", "/metrics", metrics)``.

        ``prefix=True`` matches every path under ``path`` (``"/mpsd/"``); ``method="*"`` any
        method. Routes are open unless ``auth=True`` (then the API key is required). Paths under
        ``/v1/`` and the local ones (``/health``, ``/mpsd/status``) are served before routes.
        """
        self._routes.append(_Route(method, path, handler, prefix, auth))

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
            self._pool.check_stalls(now, self._config.stall_timeout_s)
            config = self._config
            for conn in list(self._conns):
                conn.expire(now, config.head_timeout_s, config.body_timeout_s,
                            config.keepalive_timeout_s)

    # -- FrontConnection callbacks (proxy_http.Handler) ---------------------------------------

    def wants(self, request: Request) -> bool:
        path = request.path
        return path.startswith((b"/v1/", b"/v2/")) or path in _FORWARDED or path in _LOCAL

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

    def admit(self, request: Request) -> tuple[int, str, bytes] | None:
        """Keys are checked on the head: a keyless client never gets its body read."""
        if (self._keys is not None and request.path not in _LOCAL
                and not self._authorized(request.authorization)):
            return 401, "Incorrect API key provided.", b'www-authenticate: Bearer realm="mpsd"\r\n'
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
        if path in _LOCAL:
            self._local(conn, request)
            return
        if path.startswith(b"/v1/models") and request.method in (b"GET", b"HEAD"):
            self._models(conn, request)
            return
        if self._refusing:
            self._reply(conn, request, 503, "mpsd is shutting down; retry on another host.",
                        extra=b"retry-after: 5\r\n")
            self._observer.request_done(None, None, 503, 0.0, None)
            return
        if not request.body:
            self._route(conn, request, None)
            return
        if len(request.body) <= SMALL_BODY:
            self._route(conn, request, model_of(request.body))
            return
        scan = model_scan(request.body)
        done, model = run_scan(scan, _SCAN_SLICES)
        if done:
            self._route(conn, request, model)
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
        self._route(conn, request, model)

    def _route(self, conn: FrontConnection, request: Request, model: str | None) -> None:
        """Lease an engine for ``model`` and send, or answer why not."""
        if model is None and request.body and self._pool.model_count() > 1:
            self._reply(conn, request, 400, "The request names no model, and mpsd serves "
                        f"several: {', '.join(self._pool.models())}.", param="model")
            return
        loop = self._loop
        try:
            lease = self._pool.try_lease(model)
        except UnknownModel as exc:
            lease = None
            if self._pool.model_count():
                self._reply(conn, request, 404, str(exc), param="model")
                self._observer.request_done(model, None, 404, 0.0, None)
                return
        if lease is None and not self._pool.model_count():  # (asked only when no lease)
            # no engine registered at all (starting, every GPU stopped or drained): the node
            # is unavailable, not the model unknown; a balancer retries a 503 elsewhere
            self._reply(conn, request, 503, "No engine is ready on this node; retry on another "
                        "host.", extra=b"retry-after: 5\r\n")
            self._observer.request_done(model, None, 503, 0.0, None)
            return
        if lease is not None:  # the hot path: a free engine and a warm connection, no task
            assert lease.backend is not None
            upstream = self._upstreams.idle(lease.backend.base_url)
            if upstream is not None:
                self._observer.queue_wait(0.0)
                self._send(conn, request, model, lease, upstream, loop.time())
                return
        conn.task = loop.create_task(self._serve(conn, request, model, lease))

    # -- local endpoints ---------------------------------------------------------------------

    def _local(self, conn: FrontConnection, request: Request) -> None:
        allowed = (b"GET", b"HEAD", b"POST") if request.path == b"/ping" else (b"GET", b"HEAD")
        if request.method not in allowed:
            self._reply(conn, request, 405, "Method Not Allowed", extra=b"allow: GET, HEAD\r\n")
            return
        if request.path == b"/mpsd/status":
            body = json.dumps(self.status(), default=str).encode()
            conn.respond(200, body, keep_alive=request.keep_alive,
                         head_only=request.method == b"HEAD")
            return
        ok = self._alive() if request.path == b"/livez" else self.ready()
        conn.respond(200 if ok else 503, b"", keep_alive=request.keep_alive)

    def status(self) -> ProxyStatus:
        """What ``GET /mpsd/status`` answers: the daemon's status plus engines and in-flight."""
        return {**self._status(), "engines": self._pool.snapshot(),
                "inflight": self._pool.inflight_total(), "queued": self._pool.queued(),
                "routable": self._pool.routable_count()}

    def _models(self, conn: FrontConnection, request: Request) -> None:
        cards = [{"id": m, "object": "model", "created": self._created, "owned_by": "mpsd",
                  "root": m, "parent": None} for m in self._pool.models()]
        wanted = request.path[len(b"/v1/models"):]
        if wanted in (b"", b"/"):
            doc: dict[str, Any] = {"object": "list", "data": cards}
        else:
            name = wanted[1:].decode("utf-8", "replace")
            found = [c for c in cards if c["id"] == name]
            if not found:
                self._reply(conn, request, 404, f"The model `{name}` does not exist.",
                            param="model")
                return
            doc = found[0]
        conn.respond(200, json.dumps(doc).encode(), keep_alive=request.keep_alive,
                     head_only=request.method == b"HEAD")

    def _authorized(self, header: bytes) -> bool:
        return authorized(self._keys or (), header)

    def _reply(self, conn: FrontConnection, request: Request, status: int, message: str, *,
               param: str | None = None, extra: bytes = b"", finish: bool = True) -> None:
        conn.respond(status, error_body(status, message, param), keep_alive=request.keep_alive,
                     extra=extra, head_only=request.method == b"HEAD", finish=finish)

    # -- proxying ------------------------------------------------------------------------------

    def _send(self, conn: FrontConnection, request: Request, model: str | None, lease: Lease,
              upstream: UpstreamConnection, started: float,
              tried: list[Backend] | None = None) -> None:
        """Hand the request and its lease to an Exchange; ``_ended`` hears how it went."""
        assert lease.backend is not None
        host = self._upstreams.origin(lease.backend.base_url)[2]
        exchange = Exchange(conn, upstream, lease, request, model, started, self._ended)
        exchange.tried = tried
        now = self._loop.time()
        data, rest = upstream_request(request, host)
        exchange.start(data, now, self._config.first_byte_timeout_s, rest)

    async def _serve(self, conn: FrontConnection, request: Request, model: str | None,
                     lease: Lease | None, tried: list[Backend] | None = None,
                     started: float | None = None) -> None:
        """The slow path: wait in the admission queue and/or connect, then ``_send``.

        A failed connect means the request was never sent, so it goes to another engine (each
        engine once); so does a request coming back from :meth:`_retry` with the engines it
        ``tried``. Either is a retry, counted in ``_retrying`` until the request ends.
        """
        loop = self._loop
        started = loop.time() if started is None else started
        retrying = tried is not None
        tried = tried if tried is not None else []
        code = 0
        try:
            while True:
                if lease is None:
                    wait_s = 0.0 if tried else self._config.admission_wait_s
                    lease = self._pool.lease(model, wait_s=wait_s, exclude=tried)
                    await lease.acquire()
                    if not tried:
                        self._observer.queue_wait(loop.time() - started)
                else:
                    self._observer.queue_wait(0.0)
                backend = lease.backend
                assert backend is not None
                try:
                    upstream = await self._upstreams.acquire(backend.base_url)
                except UpstreamConnectError as exc:
                    self._pool.connect_failed(backend)
                    if exc.refused:
                        self._pool.eject(backend, loop.time(), "refused",
                                         f"{backend.key} refused a connection", dead=True)
                    log.warning("engine_connect_failed", engine=backend.key, error=str(exc))
                    tried.append(backend)
                    lease.release()
                    lease = None
                    if not retrying and not self._may_retry():
                        raise NoCapacity(model, ready=False, waited_s=0.0) from None
                    retrying = retrying or self._begin_retry()
                    self._observer.request_retried("connect")
                    continue
                conn.task = None
                self._send(conn, request, model, lease, upstream, started,
                           tried if retrying else None)
                lease = None  # the exchange owns it now, and the retry count
                retrying = False
                return
        except UnknownModel as exc:
            code = 404
            self._reply(conn, request, 404, str(exc), param="model", finish=False)
        except NoCapacity as exc:
            code = 503
            # the engines' addresses and errno stay in the log (engine_connect_failed)
            message = "no engine reachable; retry later" if tried else str(exc)
            self._reply(conn, request, 503, message, finish=False,
                        extra=b"retry-after: %d\r\n" % exc.retry_after_s)
        except asyncio.CancelledError:
            code = 499  # the client went away while queued or connecting
            raise
        except Exception:
            log.exception("proxy_request_failed", path=request.path.decode("utf-8", "replace"))
            code = 500
            self._reply(conn, request, 500, "mpsd failed to proxy the request", finish=False)
        finally:
            if lease is not None:
                lease.release()
            if retrying:
                self._retrying -= 1
            if code:
                self._observer.request_done(model, None, code, loop.time() - started, None)
                if not conn.closed:
                    conn.response_done(request.keep_alive and code not in (499, 500))

    def _may_retry(self) -> bool:
        """The retry budget (Envoy's): retries in flight stay under ``retry_budget`` of all
        requests in flight, or ``retry_min_concurrency``, so an outage cannot double the load."""
        config = self._config
        budget = max(config.retry_min_concurrency,
                     config.retry_budget * self._pool.inflight_total())
        return self._retrying < budget

    def _begin_retry(self) -> bool:
        self._retrying += 1
        return True

    def _retry(self, exchange: Exchange) -> bool:
        """Send a request whose engine failed before the client saw a byte to another engine
        of its model that it has not tried yet; False when there is none or no budget."""
        conn = exchange.client
        tried = [*(exchange.tried or ()), exchange.backend]
        if conn.closed or not self._pool.routable_besides(exchange.model, tried):
            return False
        if exchange.tried is None:
            if not self._may_retry():
                return False
            self._begin_retry()
        reason = "reset" if exchange.status == 0 else (
            "engine_dead" if exchange.backend.ejected_until else str(exchange.status))
        self._observer.request_retried(reason)
        log.info("request_retried", engine=exchange.engine, reason=reason)
        conn.task = self._loop.create_task(self._serve(
            conn, exchange.request, exchange.model, None, tried, exchange.started))
        return True

    def _ended(self, exchange: Exchange) -> None:
        """Every proxied request ends here, once: record it and finish the client response
        (or hand it to another engine, when its engine failed before the client saw a byte)."""
        if exchange.retryable and self._retry(exchange):
            return
        if exchange.tried is not None:
            self._retrying -= 1
        conn, request = exchange.client, exchange.request
        keep_alive = exchange.keep_alive
        if exchange.held and not conn.closed:
            exchange.flush_held()
        if exchange.error is not None:
            code, message = exchange.error
            keep_alive = request.keep_alive
            if not conn.closed:
                self._reply(conn, request, code, message, finish=False)
        elif exchange.client_gone:
            code, keep_alive = 499, False  # nginx's code for "client closed the request"
        else:
            code = 502 if exchange.broken else exchange.status
        now = self._loop.time()
        ttfb = exchange.head_at - exchange.started if exchange.head_at else None
        engine = exchange.engine
        model = exchange.model or exchange.backend_model
        self._observer.request_done(model, engine, code, now - exchange.started, ttfb)
        if self._debug:  # one line per request, only when asked for: never on the hot path
            log.debug("request_proxied", model=model, engine=engine, status=code,
                      duration_s=round(now - exchange.started, 6), ttfb_s=ttfb)
        if not conn.closed:
            conn.response_done(keep_alive)

    # -- aiohttp (mounted routes) --------------------------------------------------------------

    async def _aio_handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Mounted routes; the connection closes after the response (see the module doc)."""
        request.protocol.close()
        route = next((r for r in self._routes if (r.method in ("*", request.method)) and (
            request.path.startswith(r.path) if r.prefix else request.path == r.path)), None)
        if route is None:
            resp: web.StreamResponse = _aio_error(404, f"no route for {request.path}")
        elif route.auth and self._keys is not None and not self._authorized(
                request.headers.get("Authorization", "").encode()):
            resp = _aio_error(401, "Incorrect API key provided.")
        else:
            resp = await route.handler(request)
        if not resp.prepared:
            resp.force_close()
        return resp


def _debug_enabled() -> bool:
    is_enabled_for = getattr(log.bind(), "is_enabled_for", None)
    return bool(is_enabled_for(logging.DEBUG)) if is_enabled_for is not None else True


def _configure_pool(pool: BackendPool, config: ProxyConfig) -> None:
    """The proxy is the one writer of the pool's settings (at start and on reload)."""
    pool.configure(max_inflight_per_engine=config.max_inflight_per_engine,
                   eject_after_errors=config.eject_after_errors, eject_base_s=config.eject_base_s,
                   eject_max_s=config.eject_max_s)


def _aio_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(status, message),
                        content_type="application/json")


def _limits(config: ProxyConfig) -> Limits:
    return Limits(max_request_line_bytes=config.max_request_line_bytes,
                  max_header_line_bytes=config.max_header_line_bytes,
                  max_head_bytes=config.max_head_bytes, max_headers=config.max_headers,
                  max_body_bytes=config.max_body_bytes,
                  max_trailer_bytes=config.max_trailer_bytes, max_trailers=config.max_trailers)


def _client_cap(config: ProxyConfig) -> int:
    """``max_client_connections``, or (0) what the file-descriptor limit leaves: half of what
    remains after ``reserved_fds`` (engines, control socket, logs, metrics), since every busy
    client connection may hold one engine connection too."""
    if config.max_client_connections:
        return config.max_client_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max((soft - config.reserved_fds) // 2, 16)
