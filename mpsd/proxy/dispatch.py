"""Where a request goes once its head (and body) are in: lease an engine, send, retry, finish.

The hot path: ``pool.try_lease(model)`` — a :class:`~mpsd.pool.Lease`, the only thing that
changes in-flight counts — and an idle engine connection are taken synchronously; when either is
missing, one task (:meth:`Dispatcher._serve`) waits in the FIFO admission queue and/or connects,
and a failed *connect* (the request never left) moves on to another engine, each once — as does a
request whose engine failed before the client saw a byte (reset, 502/503, a dead engine's 500),
within the retry budget. An :class:`~mpsd.proxy.relay.Exchange` then owns the lease and relays the
response; however it ends it calls :meth:`Dispatcher._ended`, the one place a request is recorded
and finished.
"""

from __future__ import annotations

import asyncio
import math

import structlog

from mpsd.backend import Backend, NoCapacity, UnknownModel
from mpsd.config import ProxyConfig
from mpsd.pool import BackendPool, Lease
from mpsd.proxy.errors import reply
from mpsd.proxy.framing import Request
from mpsd.proxy.front import FrontConnection
from mpsd.proxy.observer import RequestObserver
from mpsd.proxy.relay import Exchange
from mpsd.proxy.request import upstream_request
from mpsd.proxy.retry import RetryBudget
from mpsd.proxy.upstream import UpstreamConnectError, UpstreamConnection, UpstreamPool

log = structlog.get_logger("mpsd.proxy")


class Dispatcher:
    """Sends requests to engines for the :class:`~mpsd.proxy.server.ProxyServer`."""

    loop: asyncio.AbstractEventLoop  # set by the server's start()

    def __init__(self, config: ProxyConfig, pool: BackendPool, upstreams: UpstreamPool,
                 observer: RequestObserver) -> None:
        self.config = config
        self.retries = RetryBudget(config)
        self.debug = False
        self._pool = pool
        self._upstreams = upstreams
        self._observer = observer

    def route(self, conn: FrontConnection, request: Request, model: str | None) -> None:
        """Lease an engine for ``model`` and send, or answer why not."""
        if model is None and request.body and self._pool.model_count() > 1:
            reply(conn, request, 400, "The request names no model, and mpsd serves "
                  f"several: {', '.join(self._pool.models())}.", param="model")
            return
        loop = self.loop
        try:
            lease = self._pool.try_lease(model)
        except UnknownModel as exc:
            lease = None
            if self._pool.model_count():
                reply(conn, request, 404, str(exc), param="model")
                self._observer.request_done(model, None, 404, 0.0, None)
                return
        if lease is None and not self._pool.model_count():  # (asked only when no lease)
            # no engine registered at all (starting, every GPU stopped or drained): the node
            # is unavailable, not the model unknown; a balancer retries a 503 elsewhere
            reply(conn, request, 503, "No engine is ready on this node; retry on another "
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

    def _send(self, conn: FrontConnection, request: Request, model: str | None, lease: Lease,
              upstream: UpstreamConnection, started: float,
              tried: list[Backend] | None = None) -> None:
        """Hand the request and its lease to an Exchange; ``_ended`` hears how it went."""
        assert lease.backend is not None
        host = self._upstreams.origin(lease.backend.base_url)[2]
        exchange = Exchange(conn, upstream, lease, request, model, started, self._ended)
        exchange.tried = tried
        now = self.loop.time()
        data, rest = upstream_request(request, host)
        exchange.start(data, now, self.config.first_byte_timeout_s, rest)

    async def _serve(self, conn: FrontConnection, request: Request, model: str | None,
                     lease: Lease | None, tried: list[Backend] | None = None,
                     started: float | None = None) -> None:
        """The slow path: wait in the admission queue and/or connect, then ``_send``.

        A failed connect means the request was never sent, so it goes to another engine (each
        engine once); so does a request coming back from :meth:`_retry` with the engines it
        ``tried``. Either is a retry, counted in the retry budget until the request ends.
        """
        loop = self.loop
        started = loop.time() if started is None else started
        retrying = tried is not None
        tried = tried if tried is not None else []
        code = 0
        try:
            while True:
                if lease is None:
                    lease = await self._lease(model, tried, started)
                else:
                    self._observer.queue_wait(0.0)
                backend = lease.backend
                assert backend is not None
                try:
                    upstream = await self._upstreams.acquire(backend.base_url)
                except UpstreamConnectError as exc:
                    self._connect_failed(backend, exc)
                    tried.append(backend)
                    lease.release()
                    lease = None
                    retrying = self._count_retry(retrying, model)
                    continue
                if backend.ejected_until == math.inf or self._pool.get(backend.key) is not backend:
                    # condemned or removed while connecting: never sent, so another engine
                    self._upstreams.release(upstream, True)
                    tried.append(backend)
                    lease.release()
                    lease = None
                    retrying = self._count_retry(retrying, model)
                    continue
                conn.task = None
                self._send(conn, request, model, lease, upstream, started,
                           tried if retrying else None)
                lease = None  # the exchange owns it now, and the retry count
                retrying = False
                return
        except UnknownModel as exc:
            code = 404
            reply(conn, request, 404, str(exc), param="model", finish=False)
        except NoCapacity as exc:
            code = 503
            # the engines' addresses and errno stay in the log (engine_connect_failed)
            message = "no engine reachable; retry later" if tried else str(exc)
            reply(conn, request, 503, message, finish=False,
                  extra=b"retry-after: %d\r\n" % exc.retry_after_s)
        except asyncio.CancelledError:
            code = 499  # the client went away while queued or connecting
            raise
        except Exception:
            log.exception("proxy_request_failed", path=request.path.decode("utf-8", "replace"))
            code = 500
            reply(conn, request, 500, "mpsd failed to proxy the request", finish=False)
        finally:
            if lease is not None:
                lease.release()
            if retrying:
                self.retries.end()
            if code:
                self._observer.request_done(model, None, code, loop.time() - started, None)
                if not conn.closed:
                    conn.response_done(request.keep_alive and code not in (499, 500))

    async def _lease(self, model: str | None, tried: list[Backend], started: float) -> Lease:
        """A lease from the admission queue; a retry (``tried``) does not wait in it."""
        wait_s = self._wait_s(model, retry=bool(tried))
        held = wait_s > self.config.admission_wait_s  # for engines on their way back
        # a retry held through a recovery may go to a restarted engine it tried before: a new
        # process, which has not seen the request
        lease = self._pool.lease(model, wait_s=wait_s, exclude=() if held else tried)
        if held:
            self._observer.holding(1)
        try:
            await lease.acquire()
        except BaseException:
            lease.release()
            raise
        finally:
            if held:
                self._observer.holding(-1)
                self._observer.held(self.loop.time() - started, lease.backend is not None)
        if not tried:
            self._observer.queue_wait(self.loop.time() - started)
        return lease

    def _wait_s(self, model: str | None, *, retry: bool) -> float:
        """How long a request may wait for an engine: ``recovery_hold_s`` while the model's
        engines are all on their way back (a recovery, a restart), so that a fault costs
        latency rather than errors — within a bound; else ``admission_wait_s`` for a free slot
        (a retry does not wait for one)."""
        config = self.config
        if (config.recovery_hold_s > config.admission_wait_s and self._pool.coming(model)
                and self._pool.queued() < config.recovery_hold_max):
            return config.recovery_hold_s
        return 0.0 if retry else config.admission_wait_s

    def _connect_failed(self, backend: Backend, exc: UpstreamConnectError) -> None:
        """The request never left: count it, and eject an engine that refused outright."""
        self._pool.connect_failed(backend)
        if exc.refused:
            self._pool.eject(backend, self.loop.time(), "refused",
                             f"{backend.key} refused a connection", dead=True)
        log.warning("engine_connect_failed", engine=backend.key, error=str(exc))

    def _count_retry(self, retrying: bool, model: str | None) -> bool:
        """Count this request as a retry in the budget (once); NoCapacity when it is spent."""
        if not retrying:
            if not self.retries.admits(self._pool.inflight_total()):
                raise NoCapacity(model, ready=False, waited_s=0.0)
            self.retries.begin()
        self._observer.request_retried("connect")
        return True

    def _retry(self, exchange: Exchange) -> bool:
        """Send a request whose engine failed before the client saw a byte to another engine
        of its model that it has not tried yet; False when there is none or no budget."""
        conn = exchange.client
        tried = [*(exchange.tried or ()), exchange.backend]
        if conn.closed or not self._pool.routable_besides(exchange.model, tried):
            return False
        if exchange.tried is None:
            if not self.retries.admits(self._pool.inflight_total()):
                return False
            self.retries.begin()
        reason = "reset" if exchange.status == 0 else (
            "engine_dead" if exchange.backend.ejected_until else str(exchange.status))
        self._observer.request_retried(reason)
        log.info("request_retried", engine=exchange.engine, reason=reason)
        conn.task = self.loop.create_task(self._serve(
            conn, exchange.request, exchange.model, None, tried, exchange.started))
        return True

    def _ended(self, exchange: Exchange) -> None:
        """Every proxied request ends here, once: record it and finish the client response
        (or hand it to another engine, when its engine failed before the client saw a byte)."""
        if exchange.retryable and self._retry(exchange):
            return
        if exchange.tried is not None:
            self.retries.end()
        conn, request = exchange.client, exchange.request
        keep_alive = exchange.keep_alive
        if exchange.held and not conn.closed:
            exchange.flush_held()
        if exchange.error is not None:
            code, message = exchange.error
            keep_alive = request.keep_alive
            if not conn.closed:
                reply(conn, request, code, message, finish=False)
        elif exchange.client_gone:
            code, keep_alive = 499, False  # nginx's code for "client closed the request"
        else:
            code = 502 if exchange.broken else exchange.status
        now = self.loop.time()
        ttfb = exchange.head_at - exchange.started if exchange.head_at else None
        engine = exchange.engine
        model = exchange.model or exchange.backend_model
        self._observer.request_done(model, engine, code, now - exchange.started, ttfb)
        if self.debug:  # one line per request, only when asked for: never on the hot path
            log.debug("request_proxied", model=model, engine=engine, status=code,
                      duration_s=round(now - exchange.started, 6), ttfb_s=ttfb)
        if not conn.closed:
            conn.response_done(keep_alive)
