"""mpsd's Prometheus metrics (docs/architecture.md §7): one registry fed three ways, served by the
proxy.

* **Events** — the supervisor's :class:`~mpsd.supervise.group.GroupObserver` calls (state
  changes, faults, recovery phases) and the proxy's ``RequestObserver`` calls (one per request,
  one per queue wait). These run on the request path or inside the group's state machine, so
  each is a dict lookup of a cached labelled child plus one ``inc``/``observe``.
* **Scrape-time reads** — in-flight counts, readiness and queue depth are read from the
  :class:`~mpsd.pool.BackendPool` when Prometheus scrapes; nothing is updated per request.
* **Polling** — MPS status, NVML and each engine's own ``vllm:*`` metrics, read by
  :meth:`Metrics.poll` on an interval (see :mod:`mpsd.observe.poll`).

The registry is private (not prometheus_client's global one) so that tests and several
``Metrics`` objects never see each other's series, and nothing a library registers globally
leaks into mpsd's ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import anyio
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mpsd import __version__, logs
from mpsd.host import nvml
from mpsd.host.nvml import GpuSample
from mpsd.observe.diagnosis import Diagnosis
from mpsd.observe.poll import Poller, Snapshot
from mpsd.pool import BackendPool
from mpsd.proxy.errors import rejection_reason
from mpsd.supervise.faults import Fault
from mpsd.supervise.group import GpuGroup
from mpsd.supervise.states import EngineState, GroupState
from mpsd.supervise.supervisor import Supervisor

_log = logs.get("mpsd.metrics")

# The classic text format: what every Prometheus version parses (prometheus_client's own
# CONTENT_TYPE_LATEST moved to "version=1.0.0" in 0.22+, which older servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# LLM requests run from milliseconds (errors, tiny completions) to many minutes (long streams).
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1800.0)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# MPS recovers in ~0.6 s (measured); engine restarts take as long as model loading (minutes).
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

NO_ENGINE = "none"  # engine label of a request no engine was picked for (404, 503, 401…)
UNKNOWN_MODEL = "unknown"  # model label of a model no backend serves: keeps cardinality bounded
OPERATOR = "operator"  # group_restarts_total reason of a restart out of FAILED

_RequestChildren = tuple[Counter, Histogram, Histogram]


class Metrics:
    """The registry plus everything that feeds it.

    Wire it as a supervisor observer (``Supervisor(..., observers=[metrics])``), as the proxy's
    request observer, serve :func:`metrics_handler` on ``GET /metrics``, and run
    :meth:`poll` in the daemon's task group.
    """

    def __init__(self, pool: BackendPool, *, version: str = __version__,
                 sampler: Callable[[str], GpuSample | None] = nvml.sample,
                 scrape_timeout_s: float = 2.0) -> None:
        # the registry's series, declared in one place (hence longer than ~60 lines)
        self.pool = pool
        self.registry = CollectorRegistry()
        r = self.registry
        build = Gauge("mpsd_build_info", "mpsd version (the value is always 1).", ["version"],
                      registry=r)
        build.labels(version).set(1)
        self._requests = Counter("mpsd_requests", "Requests the proxy answered.",
                                 ["model", "engine", "code"], registry=r)
        self._duration = Histogram(
            "mpsd_request_duration_seconds", "Request time through the proxy, to the last byte.",
            ["model"], buckets=REQUEST_BUCKETS, registry=r)
        self._ttfb = Histogram(
            "mpsd_time_to_first_byte_seconds",
            "Time until the first byte of the engine's response reached the proxy.",
            ["model"], buckets=TTFB_BUCKETS, registry=r)
        self._ready = Gauge("mpsd_ready", "1 while /health (readiness) answers 200: an engine "
                            "is routable and the node is not leaving a balancer's rotation.",
                            registry=r)
        self._queue_wait = Histogram(
            "mpsd_queue_wait_seconds",
            "Time requests waited in the admission queue for a free engine slot.",
            buckets=QUEUE_BUCKETS, registry=r)
        self._rejected = Counter(
            "mpsd_proxy_rejected_requests",
            "Requests the proxy's front door refused itself, by reason (malformed, "
            "head_too_large, body_too_large, unauthorized, timeout, ...).", ["reason"], registry=r)
        self._client_connections = Gauge("mpsd_proxy_client_connections",
                                         "Client connections open to the proxy.", registry=r)
        self._refused_connections = Counter(
            "mpsd_proxy_refused_connections",
            "Client connections refused at once: over max_client_connections.", registry=r)
        self._retries = Counter(
            "mpsd_proxy_retries",
            "Requests sent to another engine after theirs failed before the client saw a byte, "
            "by reason (connect, reset, engine_dead, 502, 503).", ["reason"], registry=r)
        # the proxy's flow control and its event loop's health (issue 21)
        self._send_timeouts = Counter(
            "mpsd_proxy_send_timeouts",
            "Client connections cut because the client took nothing of its response for "
            "send_timeout_s (the request aborted at the engine, its slot freed).", registry=r)
        self._loop_lag = Histogram(
            "mpsd_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 20 ms: anything holding the loop "
            "(a slow callback, a thread holding the GIL, a garbage collection) shows here and "
            "in every request's latency. Below ~1 ms: the loop's timer resolution.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r)
        self._held_now = Gauge(
            "mpsd_requests_held", "Requests held now for a model whose engines are all on "
            "their way back (starting, recovering, backing off), up to recovery_hold_s.",
            registry=r)
        self._hold = Histogram(
            "mpsd_hold_seconds", "How long held requests waited, by how the hold ended "
            "(served: an engine came back; refused: 503 at the deadline or nothing coming).",
            ["outcome"], buckets=RECOVERY_BUCKETS, registry=r)
        self._group_state = Gauge("mpsd_group_state",
                                  "1 for the group's current state, 0 for the others.",
                                  ["gpu", "state"], registry=r)
        self._engine_state = Gauge(
            "mpsd_engine_state", "1 for the engine's current state (stopped, starting, ready, "
            "backoff, failed, stopping), 0 for the others.", ["gpu", "engine", "state"],
            registry=r)
        self._restarts = Counter(
            "mpsd_group_restarts", "Group restarts (reason: the fault signal, or 'operator').",
            ["gpu", "reason"], registry=r)
        self._engine_restarts = Counter(
            "mpsd_engine_restarts", "Engine restarts after a fault: the engine's alone (MPS off) "
            "or its whole group's (reason: the fault signal).", ["gpu", "engine", "reason"],
            registry=r)
        self._faults = Counter("mpsd_fault_detected", "Faults detected, by signal.",
                               ["gpu", "signal"], registry=r)
        self._recovery = Histogram(
            "mpsd_recovery_seconds",
            "Recovery time by phase: mps = kill engines until the server is ACTIVE again or "
            "replaced; engine = start until every engine is ready.",
            ["gpu", "phase"], buckets=RECOVERY_BUCKETS, registry=r)
        # where each engine's last start went (issue 20): set from its output at each poll
        self._start_phases = Gauge(
            "mpsd_engine_start_seconds",
            "Seconds each phase of the engine's last start took: process, engine_core, weights, "
            "compile, kv_cache, cuda_graphs, api_server as the engine reported them, then ready "
            "(mpsd's own checks).", ["gpu", "engine", "phase"], registry=r)
        self._poller = Poller(pool, sampler, scrape_timeout_s)
        r.register(_PoolCollector(pool))
        r.register(_ModelReadiness(pool))
        self.diagnosis = Diagnosis()
        r.register(self.diagnosis)
        ProcessCollector(registry=r)  # process_*: mpsd's own CPU (the proxy's), memory, fds
        r.register(_LogWriteErrors())
        r.register(self._poller)
        self._request_children: dict[tuple[str | None, str | None, int | str],
                                     _RequestChildren] = {}
        self._state_children: dict[str, dict[GroupState, Gauge]] = {}
        self._last_signal: dict[str, str] = {}
        self.last_recovery: dict[str, dict[str, float]] = {}

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        """Read ``mpsd_ready`` from ``ready`` (the proxy's readiness) at every scrape."""
        self._ready.set_function(lambda: float(ready()))

    # -- RequestObserver (the proxy; per request, so O(1) and allocation-light) --------------

    def request_done(self, model: str | None, engine: str | None, code: int | str,
                     duration_s: float, ttfb_s: float | None) -> None:
        """One finished request; ``ttfb_s`` is None when no byte came from an engine."""
        children = self._request_children.get((model, engine, code))
        if children is None:
            children = self._request_labels(model, engine, code)
        requests, duration, ttfb = children
        requests.inc()
        duration.observe(duration_s)
        if ttfb_s is not None:
            ttfb.observe(ttfb_s)

    def queue_wait(self, seconds: float) -> None:
        """A request left the admission queue (with an engine or not) after ``seconds``."""
        self._queue_wait.observe(seconds)

    def request_rejected(self, status: int) -> None:
        """The front door refused a request (label: :func:`rejection_reason`)."""
        self._rejected.labels(rejection_reason(status)).inc()

    def connections_changed(self, opened: int) -> None:
        self._client_connections.inc(opened)

    def connection_refused(self) -> None:
        self._refused_connections.inc()

    def request_retried(self, reason: str) -> None:
        self._retries.labels(reason).inc()

    def holding(self, delta: int) -> None:
        self._held_now.inc(delta)

    def held(self, seconds: float, served: bool) -> None:
        self._hold.labels("served" if served else "refused").observe(seconds)

    def send_timed_out(self) -> None:
        self._send_timeouts.inc()

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def _request_labels(self, model: str | None, engine: str | None,
                        code: int | str) -> _RequestChildren:
        """Slow path, once per label combination. A model name comes from the client's body,
        so one no backend serves is counted as ``unknown`` (and not cached) rather than
        growing the series and the cache without bound."""
        known = model is not None and model in self.pool.models()
        label = model if known and model is not None else UNKNOWN_MODEL
        children = (self._requests.labels(label, engine or NO_ENGINE, str(code)),
                    self._duration.labels(label), self._ttfb.labels(label))
        if known:
            self._request_children[(model, engine, code)] = children
        return children

    # -- GroupObserver (state machine events; rare, but keep them cheap) ---------------

    def state_changed(self, group: GpuGroup, old: GroupState, new: GroupState) -> None:
        """Move the one-hot ``group_state``; a start out of BACKOFF or FAILED is a restart."""
        states = self._states(group.key, new)
        states[old].set(0)
        states[new].set(1)
        for plan in group.plan.engines:  # an engine's state changes the group's reason
            current = group.engine_state(plan)[0]
            for state in EngineState:
                self._engine_state.labels(group.key, plan.key, str(state)).set(
                    float(state is current))
        if new is GroupState.STARTING:
            if old is GroupState.BACKOFF:
                reason = self._last_signal.get(group.key, "unknown")
                self._restarts.labels(group.key, reason).inc()
                for engine in group.plan.engines:
                    self._engine_restarts.labels(group.key, engine.key, reason).inc()
            elif old is GroupState.FAILED:
                self._restarts.labels(group.key, OPERATOR).inc()

    def fault(self, group: GpuGroup, fault: Fault) -> None:
        """Count the fault by signal (never by reason: free text would explode the series).

        A fault of one engine that restarts alone (MPS off) is also a restart of its group
        (the group stays RUNNING, so ``state_changed`` never sees it)."""
        self._faults.labels(group.key, fault.signal).inc()
        self._last_signal[group.key] = fault.signal
        if fault.engine and not fault.fatal:
            self._restarts.labels(group.key, fault.signal).inc()
            self._engine_restarts.labels(group.key, fault.engine, fault.signal).inc()

    def recovered(self, group: GpuGroup, phase: str, seconds: float) -> None:
        self._recovery.labels(group.key, phase).observe(seconds)
        self.last_recovery.setdefault(group.key, {})[phase] = seconds

    def track(self, groups: list[GpuGroup]) -> None:
        """Show ``group_state`` for groups that have not changed state yet (all STOPPED), and
        the phases of every engine's last start."""
        for group in groups:
            self._states(group.key, group.state)
            for engine in group.engines.values():
                for phase, seconds in engine.phases.seconds.items():
                    self._start_phases.labels(group.key, engine.key, phase).set(seconds)

    def _states(self, gpu: str, current: GroupState) -> dict[GroupState, Gauge]:
        states = self._state_children.get(gpu)
        if states is None:
            states = {s: self._group_state.labels(gpu, str(s)) for s in GroupState}
            for state, child in states.items():
                child.set(1 if state is current else 0)
            self._state_children[gpu] = states
        return states

    # -- polling and rendering ---------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """What the last poll round saw (MPS, NVML, engine metrics)."""
        return self._poller.snapshot

    @property
    def rounds(self) -> int:
        """Poll rounds completed so far."""
        return self._poller.rounds

    async def poll(self, supervisor: Supervisor, interval_s: float = 10.0) -> None:
        """Run forever (cancel to stop): one poll round every ``interval_s``.

        Owns a small ``ClientSession`` of its own so that engine scrapes never compete with
        proxied requests for the proxy's connection pool. A failing round is logged and the
        loop goes on: a metrics bug must not cancel the daemon's task group.
        """
        connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=max(30.0, 3 * interval_s))
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                started = anyio.current_time()
                groups = list(supervisor.groups.values())
                try:
                    await self.collect_once(groups, session)
                except Exception:
                    _log.exception("metrics_poll_failed")
                elapsed = anyio.current_time() - started
                await anyio.sleep(max(interval_s - elapsed, 0.05))

    async def collect_once(self, groups: list[GpuGroup],
                           session: aiohttp.ClientSession) -> Snapshot:
        """One poll round over ``groups`` and the pool's ready engines (tests call it directly)."""
        self.track(groups)
        snapshot = await self._poller.collect_once(groups, session)
        await self.diagnosis.observe(groups, snapshot.gpus,
                                     {b.key for b in self.pool.backends() if b.routable})
        return snapshot

    def render(self) -> tuple[bytes, str]:
        """``/metrics``: the exposition body and its content type; call it on the event loop.

        mpsd's own families are rendered now (a few hundred samples; the pool is read on the
        loop that owns it, so no lock is needed); the node-level ``vllm:*`` aggregates are
        appended as the text the last poll round rendered on a worker thread.
        """
        return generate_latest(self.registry) + self._poller.snapshot.node_text, CONTENT_TYPE

    def render_engines(self) -> tuple[bytes, str]:
        """``/metrics/engines``: every engine's own ``vllm:*`` series with ``gpu``/``engine``
        labels, as the last poll round rendered them (kept off ``/metrics`` so that a sum
        over ``/metrics`` never counts a request twice)."""
        return self._poller.snapshot.engine_text, CONTENT_TYPE


class _PoolCollector:
    """Readiness, in-flight and queue depth read from the pool at scrape time.

    The pool already counts in-flight requests for routing; reading them here means the request
    path pays nothing for these metrics.
    """

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("mpsd_engine_ready", "1 while the engine is routable.",
                                  labels=["gpu", "engine"])
        inflight = GaugeMetricFamily("mpsd_engine_inflight",
                                     "Requests in flight to the engine through mpsd.",
                                     labels=["gpu", "engine"])
        failures = CounterMetricFamily(
            "mpsd_engine_connect_failures",
            "Connections to the engine that failed before the request was sent.",
            labels=["gpu", "engine"])
        ejected = GaugeMetricFamily(
            "mpsd_engine_ejected", "1 while the proxy keeps the engine out of routing "
            "(a dead engine's answer, refused or reset, a stall, 5xx in a row).",
            labels=["gpu", "engine"])
        ejections = CounterMetricFamily(
            "mpsd_engine_ejections", "Times the proxy took the engine out of routing.",
            labels=["gpu", "engine"])
        for backend in self._pool.backends():
            labels = [backend.gpu, backend.key]
            ready.add_metric(labels, float(backend.routable))
            inflight.add_metric(labels, float(backend.inflight))
            failures.add_metric(labels, float(backend.connect_failures))
            ejected.add_metric(labels, float(backend.ejected_until > 0))
            ejections.add_metric(labels, float(backend.ejections))
        queue = GaugeMetricFamily("mpsd_proxy_queue_depth",
                                  "Requests waiting in the admission queue for a free engine.")
        queue.add_metric([], float(self._pool.queued()))
        cap = GaugeMetricFamily("mpsd_engine_inflight_cap",
                                "Per-engine in-flight cap (0 = none).")
        cap.add_metric([], float(self._pool.cap))
        yield from (ready, inflight, failures, ejected, ejections, queue, cap)


class _LogWriteErrors:
    """``mpsd_log_write_errors_total``: log lines dropped because stderr, the journal or a log
    file refused them (a reader gone, a full disk), read from :mod:`mpsd.logs` at scrape time:
    the one place such a loss can still be seen."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "mpsd_log_write_errors", "Log lines dropped because their stream refused the write "
            "(stderr's reader gone, a full disk under a redirected log).")
        family.add_metric([], float(logs.write_errors()))
        yield family


class _ModelReadiness:
    """Routable engines per model, 0 included, for every model the pool knows.

    "No engine of this model is ready" is the alert an operator wants most, and the per-engine
    series carry no model label; a FAILED GPU keeps its engines in the pool (unroutable), so
    its models stay here with 0 rather than vanishing from the scrape.
    """

    def __init__(self, pool: BackendPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("mpsd_model_ready_engines",
                                   "Engines of the model that are routable now.",
                                   labels=["model"])
        ready = dict.fromkeys(self._pool.models(), 0)
        for backend in self._pool.backends():
            ready[backend.model] = ready.get(backend.model, 0) + int(backend.routable)
        for model, count in ready.items():
            family.add_metric([model], float(count))
        yield family


def metrics_handler(render: Callable[[], tuple[bytes, str]],
                    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """``GET /metrics`` (``render=metrics.render``) or ``/metrics/engines``
    (``metrics.render_engines``) for the proxy's aiohttp app (cheap: see :meth:`Metrics.render`)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body, content_type = render()
        response = web.Response(body=body, headers={"Content-Type": content_type,
                                                    "Cache-Control": "no-store"})
        response.enable_compression()
        return response

    return handle
