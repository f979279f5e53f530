#!/usr/bin/env python3
"""Proxy overhead benchmark: client -> engine directly vs client -> proxy -> engines.

One command, one run, every arm side by side (results and method: docs/performance.md)::

    .venv/bin/python benchmarks/proxy.py            # 3 interleaved rounds, ~15 min on 2 cores
    .venv/bin/python benchmarks/proxy.py --quick    # 1 short round, ~2 min

Arms: ``direct`` (the load generator splits its connections over the two engines itself),
``nginx`` (least_conn, if ``nginx`` is on PATH), ``reference`` (a minimal aiohttp
least-in-flight proxy on uvloop, written below), ``reference-asyncio`` (the same on the plain
asyncio loop), ``aiohttp-floor`` (aiohttp's server answering from memory: the floor of any
aiohttp-served proxy), ``uvloop-pipe`` (a Python TCP byte pipe: the floor of moving bytes
through uvloop callbacks) and ``mpsd`` (mpsd's ``ProxyServer`` + ``BackendPool``).

Placement: the proxy under test is pinned to core 0; the two engines and the load generator share
core 1 (``--proxy-cpu`` / ``--load-cpu``). The engines are purpose-built here (``_engine``): raw
asyncio protocols on uvloop that cost a few microseconds per request and per SSE event, so that
they, not the proxy, are never the bottleneck (the project's fake vLLM is an aiohttp app and would
be). Streaming engines emit like vLLM: one event per running stream per decode step, each its own
write and HTTP chunk.

Phases (each after a warm-up; ``--phases`` picks some):
  rps      non-streaming, engine answers at once, closed loop at --concurrency: req/s, proxy CPU
  latency  non-streaming, engine takes --latency-ms, closed loop at --concurrency: p50/p99,
           added latency vs direct, proxy CPU per request below saturation
  mixed    non-streaming, each request takes 1-40 ms: the engines' request and in-flight split
  sse      streaming, --streams concurrent streams of --tokens events, decode step --step-ms:
           events/s relayed, proxy CPU per 1k events
  c1       non-streaming, ONE client sending back to back, engine answers at once: the tail
           (p50/p99/p99.9/max) at low load, where anything periodic on the proxy's event loop
           shows, and proxy CPU per request (issue 21)

The mpsd arm runs what ``mpsd run`` runs beside the proxy that can hold its loop: the metrics
poller, scraping both engines' ``/metrics`` (a vLLM-sized exposition) every --mpsd-poll-s
seconds (default 1; 0 = off), and the loop-lag sampler; the c1 table shows, per mpsd arm, the
loop lags over 2 ms and the garbage collector's pauses over 1 ms seen during its measurement.
While one arm is measured, every other proxy is stopped (SIGSTOP): an idle arm's timers and
poller would otherwise take the shared proxy CPU from the one measured.

CPU is utime+stime of the proxy process from /proc/PID/stat (clock ticks), read by the load
generator at the start and the end of the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------------------------
# The engine: a minimal OpenAI-ish HTTP/1.1 server (raw asyncio protocol)
# --------------------------------------------------------------------------------------------

_CL_RE = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_TOKENS_RE = re.compile(rb'"max_tokens":\s*(\d+)')
_DELAY_RE = re.compile(rb'"delay_ms":\s*(\d+)')
_EVENT = (b'data: {"id":"cmpl-7f3a9c1e2b4d","object":"text_completion","created":1795646797,'
          b'"model":"bench","choices":[{"index":0,"text":" token","logprobs":null,'
          b'"finish_reason":null,"stop_reason":null}]}\n\n')
_EVENT_CHUNK = b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)
_DONE_CHUNK = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")
_JSON_BODY = (b'{"id":"cmpl-84b3b3853060453c","object":"text_completion","created":1795646797,'
              b'"model":"bench","choices":[{"index":0,"text":"if isif isif isif is",'
              b'"logprobs":null,"finish_reason":"length","stop_reason":null}],'
              b'"usage":{"prompt_tokens":6,"total_tokens":22,"completion_tokens":16}}')
_JSON_RESP = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
              % (len(_JSON_BODY), _JSON_BODY))
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
             b"transfer-encoding: chunked\r\n\r\n")
_HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def _vllm_exposition() -> bytes:
    """A /metrics page the size and shape of a vLLM engine's (v0.10: ~40 families, its
    histograms' buckets, the HTTP instrumentator's per-handler histograms, process metrics)."""
    out: list[str] = []
    lab = 'engine="0",model_name="bench"'
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries", "engine_sleep_state"):
        out += [f"# HELP vllm:{name} x", f"# TYPE vllm:{name} gauge", f"vllm:{name}{{{lab}}} 1.0"]
    for name in ("prompt_tokens", "generation_tokens", "num_preemptions", "request_success"):
        out += [f"# HELP vllm:{name}_total x", f"# TYPE vllm:{name}_total counter",
                f"vllm:{name}_total{{{lab}}} 12345.0", f"vllm:{name}_created{{{lab}}} 1.7e9"]
    buckets = [0.001 * 2 ** (i / 2) for i in range(30)]
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_inference_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "iteration_tokens_total",
                 "request_max_num_generation_tokens",
                 "request_params_n", "request_params_max_tokens", "inter_token_latency_seconds"):
        out += [f"# HELP vllm:{name} x", f"# TYPE vllm:{name} histogram"]
        out += [f'vllm:{name}_bucket{{{lab},le="{b:.6g}"}} {i * 10}.0'
                for i, b in enumerate(buckets)]
        out += [f'vllm:{name}_bucket{{{lab},le="+Inf"}} 300.0', f"vllm:{name}_count{{{lab}}} 300.0",
                f"vllm:{name}_sum{{{lab}}} 42.0", f"vllm:{name}_created{{{lab}}} 1.7e9"]
    for name in ("http_request_duration_seconds", "http_request_duration_highr_seconds"):
        out += [f"# HELP {name} x", f"# TYPE {name} histogram"]
        for handler in ("/v1/completions", "/v1/chat/completions", "/health", "/metrics"):
            hl = f'handler="{handler}",method="POST"'
            out += [f'{name}_bucket{{{hl},le="{b:.6g}"}} {i}.0' for i, b in enumerate(buckets)]
            out += [f"{name}_count{{{hl}}} 30.0", f"{name}_sum{{{hl}}} 3.0"]
    out += ["# HELP process_cpu_seconds_total x", "# TYPE process_cpu_seconds_total counter",
            "process_cpu_seconds_total 123.0"]
    body = ("\n".join(out) + "\n").encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body), body)


_METRICS = _vllm_exposition()


class _EngineConn(asyncio.Protocol):
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.left = 0  # events still to send on the current stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.streams.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            m = _CL_RE.search(head)
            length = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self._respond(head, body)

    def _respond(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith(b"GET /health"):
            self.transport.write(_HEALTH)
            return
        if head.startswith(b"GET /metrics"):
            self.transport.write(_METRICS)
            return
        if head.startswith(b"GET /stats"):
            stats = json.dumps(self.engine.stats(asyncio.get_running_loop().time())).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(stats), stats))
            return
        self.engine.requests += 1
        if b'"stream":true' in body or b'"stream": true' in body:
            m = _TOKENS_RE.search(body)
            self.left = int(m.group(1)) if m else 16
            self.transport.write(_SSE_HEAD)
            self.engine.streams.add(self)
            self.engine.kick()
            return
        m = _DELAY_RE.search(body)
        if m and int(m.group(1)):
            loop = asyncio.get_running_loop()
            self.engine.busy(loop.time(), +1)
            loop.call_later(int(m.group(1)) / 1000, self._write, _JSON_RESP)
        else:
            self.transport.write(_JSON_RESP)

    def _write(self, data: bytes) -> None:
        self.engine.busy(asyncio.get_running_loop().time(), -1)
        if self.transport is not None:
            self.transport.write(data)

    def step(self) -> bool:
        """One decode step for this stream; False once it finished."""
        if self.transport is None:
            return False
        self.left -= 1
        if self.left > 0:
            self.transport.write(_EVENT_CHUNK)
            return True
        self.transport.write(_EVENT_CHUNK + _DONE_CHUNK)
        return False


class _Engine:
    """All streams advance together, one event each per decode step (like vLLM's batch)."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.streams: set[_EngineConn] = set()
        self.scheduled = False
        self.requests = 0
        self.inflight = 0
        self.inflight_integral = 0.0  # request-seconds of delayed (mixed-phase) requests
        self.changed_at = 0.0

    def busy(self, now: float, delta: int) -> None:
        self.inflight_integral += self.inflight * (now - self.changed_at)
        self.inflight += delta
        self.changed_at = now

    def stats(self, now: float) -> dict[str, float]:
        self.busy(now, 0)
        return {"requests": self.requests, "inflight_integral": self.inflight_integral}

    def kick(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_later(self.step_s, self.step)

    def step(self) -> None:
        self.scheduled = False
        for conn in list(self.streams):
            if not conn.step():
                self.streams.discard(conn)
        if self.streams:
            self.kick()


async def _serve_engine(port: int, step_s: float) -> None:
    engine = _Engine(step_s)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _EngineConn(engine), "127.0.0.1", port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------------------------
# The reference: a minimal aiohttp least-in-flight proxy (what "a plain aiohttp proxy" costs)
# --------------------------------------------------------------------------------------------

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


async def _serve_reference(port: int, upstreams: list[str]) -> None:
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web  # noqa: PLC0415 (only the process that serves)

    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # phase ends cut connections
    inflight = dict.fromkeys(upstreams, 0)
    session = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None),
                            auto_decompress=False)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        low = min(inflight.values())
        url = random.choice([u for u, n in inflight.items() if n == low])
        inflight[url] += 1
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
            async with session.request(request.method, url + request.path_qs, data=body,
                                       headers=headers) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in _HOP})
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        finally:
            inflight[url] -= 1

    server = web.Server(handle, handler_cancellation=True, access_log=None)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await _until_signalled()


async def _serve_floor(port: int) -> None:
    """aiohttp's own server answering from memory: the floor of any aiohttp-based proxy."""
    from aiohttp import web  # noqa: PLC0415 (only the process that serves)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        return web.Response(body=_JSON_BODY, content_type="application/json")

    runner = web.ServerRunner(web.Server(handle, handler_cancellation=True, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await _until_signalled()


class _Pipe(asyncio.Protocol):
    """One direction of a byte pipe: what it reads, the peer transport writes."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
        else:
            self.pending += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


async def _serve_pipe(port: int, upstreams: list[str]) -> None:
    """A TCP pipe (each client connection tied to one engine connection, round robin): the
    floor of moving bytes with uvloop and Python callbacks, with no HTTP at all."""
    loop = asyncio.get_running_loop()
    targets = [(u.rsplit(":", 1)[0].removeprefix("http://"), int(u.rsplit(":", 1)[1]))
               for u in upstreams]
    turn = 0
    connecting: set[asyncio.Task[None]] = set()

    def accept() -> _Pipe:
        nonlocal turn
        client = _Pipe()
        host, eport = targets[turn % len(targets)]
        turn += 1

        async def connect() -> None:
            transport, upstream = await loop.create_connection(_Pipe, host, eport)
            assert client.transport is not None
            upstream.peer = client.transport
            client.peer = transport
            if client.pending:
                transport.write(client.pending)

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(accept, "127.0.0.1", port, backlog=4096)
    async with server:
        await _until_signalled()


async def _serve_mpsd(port: int, upstreams: list[str], root: str, poll_s: float = 0.0,
                      diag: str = "") -> None:
    sys.path.insert(0, root or str(ROOT))
    import structlog  # noqa: PLC0415 (only the process that serves)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
                        cache_logger_on_first_use=True)
    from mpsd.config import ProxyConfig  # noqa: PLC0415 (only the process that serves)
    from mpsd.observe.metrics import Metrics  # noqa: PLC0415 (only the process that serves)
    from mpsd.pool import BackendPool  # noqa: PLC0415 (only the process that serves)
    from mpsd.proxy.server import ProxyServer  # noqa: PLC0415 (only the process that serves)

    # Backend moved from mpsd.pool to mpsd.backend; a --baseline tree may have either
    home = "mpsd.backend" if importlib.util.find_spec("mpsd.backend") else "mpsd.pool"
    backend = importlib.import_module(home).Backend
    pool = BackendPool()
    for i, url in enumerate(upstreams):
        pool.add(backend(key=f"gpu0/bench-{i}", gpu="gpu0", model="bench", base_url=url))
        pool.set_routable(f"gpu0/bench-{i}", True)
    metrics = Metrics(pool, sampler=lambda uuid: None)
    lags: list[float] = []
    observe = getattr(metrics, "loop_lag", None)
    if observe is not None:  # (a --baseline tree may have no lag sampler)

        def both(seconds: float) -> None:
            lags.append(seconds)
            observe(seconds)

        metrics.loop_lag = both  # type: ignore[method-assign]
    pauses = _gc_pauses()
    loop = asyncio.get_running_loop()
    if diag:  # the orchestrator marks each measured window: SIGUSR1 starts it, SIGUSR2 ends it

        def window_start() -> None:
            lags.clear()
            pauses.clear()

        def window_end() -> None:
            Path(diag).write_text(json.dumps(_diag(lags, pauses)))

        loop.add_signal_handler(signal.SIGUSR1, window_start)
        loop.add_signal_handler(signal.SIGUSR2, window_end)
    proxy = ProxyServer(ProxyConfig(listen=f"127.0.0.1:{port}"), pool, lambda: {}, metrics)
    await proxy.start()
    poller = None
    if poll_s:  # what mpsd run does beside the proxy: scrape and parse the engines' /metrics
        supervisor = type("NoGroups", (), {"groups": {}})()
        poller = asyncio.get_running_loop().create_task(metrics.poll(supervisor, poll_s))
    await _until_signalled()
    if poller is not None:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    await proxy.stop(1.0)
    print(f"mpsd arm, last window: {json.dumps(_diag(lags, pauses))}; poll rounds "
          f"{metrics.rounds}", file=sys.stderr)


def _diag(lags: list[float], pauses: list[float]) -> dict[str, float]:
    return {"lag_samples": len(lags), "lag_max_ms": 1000 * max(lags, default=0.0),
            **{f"lag_over_{ms}ms": sum(1 for x in lags if x > ms / 1000) for ms in (1, 2, 5)},
            "gc_collections": len(pauses), "gc_max_ms": 1000 * max(pauses, default=0.0),
            "gc_over_1ms": sum(1 for x in pauses if x > 0.001)}


def _gc_pauses() -> list[float]:
    """The garbage collector's pauses in this process, as they happen."""
    import gc  # noqa: PLC0415 (only the process that serves)
    pauses: list[float] = []
    started = [0.0]

    def timing(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(timing)
    return pauses


async def _until_signalled() -> None:
    """Return on SIGTERM/SIGINT, so that a profiler wrapping the process can write its output."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --------------------------------------------------------------------------------------------
# The load generator (raw asyncio protocol client, keep-alive connections, closed loop)
# --------------------------------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection; parses Content-Length, chunked or close-delimited bodies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[tuple[int, bytes]] | None = None
        self.first: float = 0.0
        self.on_data: Callable[[bytes], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.head_done = False
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.body = bytearray()
        self.first = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            if self.head_done and self.length is None and not self.chunked:
                self.done.set_result((self.status, bytes(self.body)))
            else:
                self.done.set_exception(ConnectionError("closed mid-response"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.done

    def data_received(self, data: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        if self.on_data is not None:
            self.on_data(data)
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            del self.buf[:end + 4]
            self.head_done = True
            self.status = int(head[9:12])
            m = _CL_RE.search(b"\r\n" + head.split(b"\r\n", 1)[1]) if b"\r\n" in head else None
            if m:
                self.length = int(m.group(1))
            self.chunked = b"transfer-encoding: chunked" in head
        self._parse_body()

    def _parse_body(self) -> None:
        if self.done is None or self.done.done():  # cancelled at the end of the run
            return
        if self.length is not None:
            if len(self.buf) >= self.length:
                self.done.set_result((self.status, bytes(self.buf[:self.length])))
            return
        if not self.chunked:
            self.body += self.buf
            self.buf.clear()
            return
        while True:
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                return
            size = int(self.buf[:nl].split(b";")[0], 16)
            if size == 0:
                if len(self.buf) >= nl + 4:
                    self.done.set_result((self.status, bytes(self.body)))
                return
            if len(self.buf) < nl + 2 + size + 2:
                return
            self.body += self.buf[nl + 2:nl + 2 + size]
            del self.buf[:nl + 2 + size + 2]


def _request_bytes(port: int, body: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (port, len(body), body))


class _Window:
    """What the load generator counts between t_measure and t_end (events by arrival)."""

    open = False
    events = 0


def _count_events(data: bytes) -> None:
    if _Window.open:
        _Window.events += data.count(b"data: ")


async def _load(ports: list[int], concurrency: int, duration: float, warmup: float,
                body: bytes, stream: bool, cpu_pid: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    conns: list[tuple[_Client, bytes]] = []
    for i in range(concurrency):
        port = ports[i % len(ports)]
        _, proto = await loop.create_connection(_Client, "127.0.0.1", port)
        if stream:
            proto.on_data = _count_events
        conns.append((proto, _request_bytes(port, body)))
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + duration
    lat: list[float] = []
    ttfb: list[float] = []
    errors = 0

    rng = random.Random(1)

    async def worker(proto: _Client, req: bytes, port: int) -> None:
        nonlocal errors
        mixed = b"MIXED" in req
        while True:
            t0 = time.perf_counter()
            if mixed:
                delay = b"%d" % rng.randint(1, 40)
                req_now = req.replace(b"MIXED", delay).replace(
                    b"Content-Length: %d" % (len(body)), b"Content-Length: %d" % (
                        len(body) - 5 + len(delay)))
            else:
                req_now = req
            try:
                status, _ = await proto.request(req_now)
            except ConnectionError:  # the server closed the connection: count, reconnect
                errors += 1
                _, proto = await loop.create_connection(_Client, "127.0.0.1", port)
                if stream:
                    proto.on_data = _count_events
                continue
            t1 = time.perf_counter()
            if status != 200:
                errors += 1
            if t0 >= t_measure and t1 <= t_end:
                lat.append(t1 - t0)
                ttfb.append(proto.first - t0)

    tasks = [asyncio.create_task(worker(p, r, ports[i % len(ports)]))
             for i, (p, r) in enumerate(conns)]
    await asyncio.sleep(t_measure - time.perf_counter())
    cpu0 = _cpu_ticks(cpu_pid) if cpu_pid else 0
    _Window.open = True
    t0 = time.perf_counter()
    await asyncio.sleep(t_end - time.perf_counter())
    _Window.open = False
    elapsed = time.perf_counter() - t0
    cpu_s = ((_cpu_ticks(cpu_pid) - cpu0) / CLK_TCK) if cpu_pid else 0.0
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for proto, _ in conns:
        if proto.transport is not None:
            proto.transport.close()
    lat.sort()
    return {
        "requests": len(lat), "errors": errors, "seconds": elapsed, "events": _Window.events,
        "cpu_s": cpu_s, "cpu_util": cpu_s / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else float("nan"),
        "p999_ms": 1000 * lat[int(len(lat) * 0.999)] if lat else float("nan"),
        "max_ms": 1000 * lat[-1] if lat else float("nan"),
        "ttfb_p50_ms": 1000 * statistics.median(ttfb) if ttfb else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


_RT: list[str] = []  # ["chrt", "-f", "10"] with --rt


@contextlib.contextmanager
def _spawn(argv: list[str], cpu: int, port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([*_RT, "taskset", "-c", str(cpu), *argv], stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_port(port, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _self(*args: str, loop: str = "uvloop") -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args, "--loop", loop]


_NGINX_CONF = """
daemon off; master_process off; worker_processes 1; pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 8192; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream engines {{ least_conn; {servers} keepalive 512; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://engines; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off; proxy_read_timeout 600s;
    }}
  }}
}}
"""


def _run_load(args: argparse.Namespace, ports: list[int], phase: str,
              pid: int | None) -> dict[str, Any]:
    cmd = _self("_load", "--ports", ",".join(map(str, ports)), "--phase", phase,
                "--concurrency", str(args.streams if phase == "sse" else args.concurrency),
                "--duration", str(args.duration), "--warmup", str(args.warmup),
                "--tokens", str(args.tokens), "--latency-ms", str(args.latency_ms),
                "--cpu-pid", str(pid or 0))
    out = subprocess.run([*_RT, "taskset", "-c", str(args.load_cpu), *cmd], check=True,
                         capture_output=True, text=True, timeout=args.duration * 4 + 60)
    return dict(json.loads(out.stdout))


PHASES = ("rps", "latency", "mixed", "sse", "c1")


def _engine_stats(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def _measure(args: argparse.Namespace, ports: list[int], pid: int | None,
             engine_ports: list[int], phases: tuple[str, ...] = PHASES,
             diag: Path | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in phases:
        before = [_engine_stats(p) for p in engine_ports]
        if diag is not None and pid:
            diag.unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR1)
        out[phase] = _run_load(args, ports, phase, pid)
        if diag is not None and pid:
            os.kill(pid, signal.SIGUSR2)
            for _ in range(100):
                if diag.exists() and diag.stat().st_size:
                    out[phase].update(json.loads(diag.read_text()))
                    break
                time.sleep(0.02)
        after = [_engine_stats(p) for p in engine_ports]
        for key in ("requests", "inflight_integral"):
            done = [a[key] - b[key] for a, b in zip(after, before, strict=True)]
            out[phase][f"share0_{key}"] = done[0] / sum(done) if sum(done) else float("nan")
    return out


def _arms(args: argparse.Namespace, engine_ports: list[int]) -> list[tuple[str, Any]]:
    urls = ",".join(f"http://127.0.0.1:{p}" for p in engine_ports)
    wanted = args.arms.split(",")
    arms: list[tuple[str, Any]] = [("direct", None)]
    if "nginx" in wanted and shutil.which("nginx"):
        arms.append(("nginx", "nginx"))
    elif "nginx" in wanted:
        print("nginx not found on PATH: skipping its arm", file=sys.stderr)
    for name, cmd, loop in (("reference", "_reference", "uvloop"),
                            ("reference-asyncio", "_reference", "asyncio"),
                            ("aiohttp-floor", "_floor", "uvloop"),
                            ("uvloop-pipe", "_pipe", "uvloop"),
                            ("mpsd", "_mpsd", "uvloop")):
        if name in wanted:
            extra = ["--mpsd-poll-s", str(args.mpsd_poll_s)] if cmd == "_mpsd" else []
            arms.append((name, _self(cmd, "--upstreams", urls, *extra, loop=loop)))
    if args.baseline:  # the same arm from another source tree, measured side by side
        arms.append(("mpsd-baseline", _self("_mpsd", "--upstreams", urls, "--root",
                                            str(Path(args.baseline).resolve()),
                                            "--mpsd-poll-s", str(args.mpsd_poll_s))))
    return arms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cmd", nargs="?", default="run")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ports", default="")
    parser.add_argument("--upstreams", default="")
    parser.add_argument("--phase", default="rps")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=4.0)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--arms", default="nginx,reference,reference-asyncio,aiohttp-floor,"
                        "uvloop-pipe,mpsd")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--rt", action="store_true",
                        help="run proxies, engines and load under SCHED_FIFO (root): on a "
                        "shared machine, keeps other tenants' processes out of the latencies")
    parser.add_argument("--cpu-pid", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--baseline", default="",
                        help="a source tree of mpsd (e.g. `git archive` of an earlier commit) "
                             "served as an extra arm, mpsd-baseline")
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--diag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mpsd-poll-s", type=float, default=1.0,
                        help="the mpsd arms scrape and parse the engines' /metrics this often, "
                             "as mpsd run does (0 = not at all)")
    args = parser.parse_args(argv)

    if args.loop == "uvloop" and args.cmd.startswith("_"):
        import uvloop  # noqa: PLC0415 (only the process that serves)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.cmd == "_engine":
        asyncio.run(_serve_engine(args.port, args.step_ms / 1000))
        return 0
    if args.cmd == "_reference":
        asyncio.run(_serve_reference(args.port, args.upstreams.split(",")))
        return 0
    if args.cmd == "_pipe":
        asyncio.run(_serve_pipe(args.port, args.upstreams.split(",")))
        return 0
    if args.cmd == "_floor":
        asyncio.run(_serve_floor(args.port))
        return 0
    if args.cmd == "_mpsd":
        asyncio.run(_serve_mpsd(args.port, args.upstreams.split(","), args.root,
                                args.mpsd_poll_s, args.diag))
        return 0
    if args.cmd == "_load":
        ports = [int(p) for p in args.ports.split(",")]
        stream = args.phase == "sse"
        if stream:
            body = b'{"model":"bench","prompt":"Hello","max_tokens":%d,"stream":true}' % args.tokens
        elif args.phase == "latency":
            body = b'{"model":"bench","prompt":"Hello","max_tokens":16,"delay_ms":%d}' % (
                args.latency_ms)
        elif args.phase == "c1":
            body = b'{"model":"bench","prompt":"Hello","max_tokens":16}'
            args.concurrency = 1
        elif args.phase == "mixed":  # lengths from 1 to 40 ms, drawn per request
            body = b'{"model":"bench","prompt":"Hello","max_tokens":16,"delay_ms":MIXED}'
        else:
            body = b'{"model":"bench","prompt":"Hello","max_tokens":16}'
        stats = asyncio.run(_load(ports, args.concurrency, args.duration, args.warmup, body,
                                  stream, args.cpu_pid))
        print(json.dumps(stats))
        return 0
    return _orchestrate(args)


def _orchestrate(args: argparse.Namespace) -> int:
    if args.quick:
        args.duration, args.warmup, args.repeat = 2.0, 0.5, 1
    if args.rt:  # SCHED_FIFO for everything measured: other tenants of a shared box wait
        _RT[:] = ["chrt", "-f", "10"]
    engine_ports = [_free_port(), _free_port()]
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        for port in engine_ports:
            stack.enter_context(_spawn(_self("_engine", "--port", str(port), "--step-ms",
                                             str(args.step_ms)), args.load_cpu, port))
        arms = _arms(args, engine_ports)
        targets: dict[str, tuple[list[int], int | None]] = {"direct": (engine_ports, None)}
        diags: dict[str, Path] = {}
        for name, spec in arms[1:]:  # every proxy starts once, pinned, idle until measured
            port = _free_port()
            if spec == "nginx":
                tmp = stack.enter_context(tempfile.TemporaryDirectory())
                servers = " ".join(f"server 127.0.0.1:{p};" for p in engine_ports)
                conf = Path(tmp) / "nginx.conf"
                conf.write_text(_NGINX_CONF.format(dir=tmp, servers=servers, port=port))
                argv = ["nginx", "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"]
            else:
                argv = [*spec, "--port", str(port)]
                if name.startswith("mpsd"):
                    diags[name] = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "d"
                    argv += ["--diag", str(diags[name])]
            proc = stack.enter_context(_spawn(argv, args.proxy_cpu, port))
            targets[name] = ([port], proc.pid)
        names = [name for name, _ in arms]
        for round_ in range(args.repeat):  # interleaved, so a noisy neighbour hits every arm
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                print(f"... round {round_ + 1}/{args.repeat}: {name}", file=sys.stderr,
                      flush=True)
                ports, pid = targets[name]
                phases = tuple(p for p in args.phases.split(",")
                               if name != "aiohttp-floor" or p in ("rps", "latency"))
                others = [p for n, (_, p) in targets.items() if n != name and p]
                for other in others:  # idle arms' timers must not take the measured one's CPU
                    os.killpg(other, signal.SIGSTOP)
                try:
                    runs.setdefault(name, []).append(_measure(args, ports, pid, engine_ports,
                                                              phases, diags.get(name)))
                finally:
                    for other in others:
                        os.killpg(other, signal.SIGCONT)
    results = {name: _median_run(runs[name]) for name in names}
    _print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return 0


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase and metric, the median over the rounds."""
    out: dict[str, Any] = {}
    for phase in runs[0]:
        keys = runs[0][phase].keys()
        out[phase] = {k: statistics.median(r[phase][k] for r in runs) for k in keys}
    return out


def _per_k(phase: dict[str, Any], key: str) -> str:
    """Proxy CPU milliseconds per 1,000 requests or events."""
    n = phase[key]
    return f"{1e6 * phase['cpu_s'] / n:.1f}" if n and phase["cpu_s"] else "-"


def _print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    print(f"\nproxy pinned to cpu {args.proxy_cpu}; engines + load generator on cpu "
          f"{args.load_cpu}; {os.cpu_count()} cpus; median of {args.repeat} interleaved "
          f"round(s) of {args.duration:g} s per phase; load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    measured = set(args.phases.split(","))
    if measured & {"rps", "latency"}:
        _print_requests(args, results)
    if "mixed" in measured:
        _print_balance(args, results)
    if "sse" in measured:
        _print_streams(args, results)
    if "c1" in measured:
        _print_c1(results)


def _print_c1(results: dict[str, dict[str, Any]]) -> None:
    print("\nOne client, non-streaming requests back to back, the engine answers at once "
          "(the tail at low load).\n")
    print("| arm | req/s | p50 ms | p99 ms | p99.9 ms | max ms | proxy CPU µs/req | "
          "loop lags > 2 ms (max ms) | GC pauses > 1 ms (max ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        c1 = r.get("c1")
        if c1 is not None:
            cpu = f"{1e6 * c1['cpu_s'] / c1['requests']:.0f}" if c1["cpu_s"] else "-"
            lag = (f"{c1['lag_over_2ms']:.0f} ({c1['lag_max_ms']:.1f})"
                   if c1.get("lag_samples") else "-")  # (no lag sampler in the tree: -)
            gc = f"{c1['gc_over_1ms']:.0f} ({c1['gc_max_ms']:.1f})" if "gc_over_1ms" in c1 else "-"
            print(f"| {name} | {c1['requests'] / c1['seconds']:.0f} | {c1['p50_ms']:.3f} | "
                  f"{c1['p99_ms']:.3f} | {c1['p999_ms']:.3f} | {c1['max_ms']:.2f} | {cpu} | "
                  f"{lag} | {gc} |")


def _print_requests(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    nan = {"requests": 0, "seconds": 1, "cpu_s": 0, "p50_ms": float("nan"),
           "p99_ms": float("nan")}
    base = results["direct"].get("latency", nan)
    print(f"Non-streaming, {args.concurrency} concurrent clients. rps: the engine answers at "
          f"once (proxy saturated); latency: the engine takes {args.latency_ms} ms.\n")
    print("| arm | req/s | proxy CPU ms/1k req (rps) | proxy CPU ms/1k req (latency) | "
          "p50 ms | p99 ms | added p50 ms | added p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rps, lat = r.get("rps", nan), r.get("latency", nan)
        print(f"| {name} | {rps['requests'] / rps['seconds']:.0f} | {_per_k(rps, 'requests')} | "
              f"{_per_k(lat, 'requests')} | {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | "
              f"{lat['p50_ms'] - base['p50_ms']:+.2f} | {lat['p99_ms'] - base['p99_ms']:+.2f} |")


def _print_balance(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    print(f"\nBalance, mixed lengths: {args.concurrency} clients, each request takes 1-40 ms "
          "(uniform, drawn per request); engine-side counts. An exact least-loaded split is "
          "50.0 % of the requests and of the in-flight time on each engine (direct: the "
          "client pins half its connections to each engine).\n")
    print("| arm | req/s | requests on engine 0 | in-flight time on engine 0 | p50 ms | "
          "proxy CPU ms/1k req |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        mixed = r.get("mixed")
        if mixed is not None:
            print(f"| {name} | {mixed['requests'] / mixed['seconds']:.0f} | "
                  f"{100 * mixed['share0_requests']:.1f} % | "
                  f"{100 * mixed['share0_inflight_integral']:.1f} % | "
                  f"{mixed['p50_ms']:.2f} | {_per_k(mixed, 'requests')} |")


def _print_streams(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    print(f"\nStreaming: {args.streams} concurrent SSE streams of {args.tokens} events, every "
          f"stream one event (one HTTP chunk, one write) per {args.step_ms:g} ms decode step.\n")
    print("| arm | SSE events/s relayed | proxy CPU ms/1k events | proxy CPU % | "
          "TTFB p50 ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        sse = r.get("sse")
        errors = sum(r[p]["errors"] for p in r)
        if sse is not None:
            print(f"| {name} | {sse['events'] / sse['seconds']:.0f} | {_per_k(sse, 'events')} | "
                  f"{100 * sse['cpu_util']:.0f} | {sse['ttfb_p50_ms']:.2f} | {errors:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
