"""Helpers for the proxy tests: a scripted in-process engine, fake-vllm processes, a proxy.

``ScriptedEngine`` is a raw asyncio HTTP/1.1 server whose every response is chosen by the request
body's ``"mode"`` (or the engine's ``override``) — so one test can make an engine answer,
stream, hang, close before answering, answer like a dead vLLM or die mid-stream, precisely and
without timing games. ``FakeEngines`` runs the project's ``fake-vllm`` executable (real
processes, vLLM's API shapes, its events file) for the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpsd.backend import Backend
from mpsd.config import ProxyConfig
from mpsd.pool import BackendPool
from mpsd.proxy.server import ProxyServer
from tests.harness import FAKE_VLLM, free_ports, read_jsonl

_CL = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_MODE = re.compile(rb'"mode"\s*:\s*"([^"]*)"')


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_event(i: int) -> bytes:
    return b'data: {"choices":[{"index":0,"text":"t%d"}]}\n\n' % i


class _ScriptedConn(asyncio.Protocol):
    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine
        self.buf = bytearray()  # not bytes: += on a 30 MiB upload would be quadratic
        self.transport: asyncio.Transport | None = None
        self.responding = False
        self.timers: list[asyncio.TimerHandle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.engine.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.responding:
            self.engine.events.append("abort")
        for timer in self.timers:
            timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = _CL.search(self.buf[:end])
        length = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + length:
            return
        with memoryview(self.buf) as view:
            head, body = bytes(view[:end]), bytes(view[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        self.engine.requests.append((head, body))
        mode_match = _MODE.search(body, 0, 65536)  # tests put it first; huge bodies have none
        mode = mode_match.group(1).decode() if mode_match else "ok"
        self.respond(self.engine.override or mode)

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _later(self, delay: float, fn: Any, *args: Any) -> None:
        self.timers.append(asyncio.get_running_loop().call_later(delay, fn, *args))

    def respond(self, mode: str) -> None:
        assert self.transport is not None
        kind, _, arg = mode.partition(":")
        name = self.engine.name.encode()
        if kind == "ok":
            body = b'{"engine":"%s","ok":true}' % name
            self._send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-engine: %s\r\n"
                       b"content-length: %d\r\n\r\n%s" % (name, len(body), body))
        elif kind == "status":
            body = (b'{"error":{"message":"engine says no","type":"BadRequestError",'
                    b'"param":null,"code":%s}}' % arg.encode())
            self._send(b"HTTP/1.1 %s Engine Error\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (arg.encode(), len(body), body))
        elif kind == "dead":  # vLLM's answer while its EngineCore is dead (vllm.md §10)
            body = (b'{"error":{"message":"EngineCore encountered an issue. See stack trace '
                    b'(above) for the root cause.","type":"InternalServerError","param":null,'
                    b'"code":500}}')
            self._send(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json"
                       b"\r\nx-engine: %s\r\ncontent-length: %d\r\n\r\n%s"
                       % (name, len(body), body))
        elif kind in ("stream", "cut"):
            self.responding = True
            self._send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                       b"x-engine: %s\r\ntransfer-encoding: chunked\r\n\r\n" % name)
            n = int(arg or 3)
            for i in range(n):
                self._later(0.002 * (i + 1), self._send, _chunk(sse_event(i)))
            if kind == "stream":
                self._later(0.002 * (n + 1), self._finish_stream)
            else:
                self._later(0.002 * (n + 1), self._cut)
        elif kind == "big":  # a JSON body of ``arg`` bytes, written at once
            body = b'{"pad":"%s"}' % (b"x" * (int(arg) - 10))
            self._send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        elif kind == "flood":  # ``arg`` SSE events, written at once
            self._send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                       b"transfer-encoding: chunked\r\n\r\n"
                       + b"".join(_chunk(sse_event(i)) for i in range(int(arg))))
            self._finish_stream()
        elif kind == "cutjson":  # promises 100 bytes, sends 10, dies
            self._send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                       b"content-length: 100\r\n\r\n" + b'{"partial"')
            self._later(0.002, self._cut)
        elif kind == "hang":
            self.responding = True
        elif kind == "close":
            self.transport.close()
        elif kind == "slow":
            self.responding = True
            self._later(float(arg), self.respond, "ok")
        elif kind == "hold":  # head + one event now, the rest when the test says so
            self.responding = True
            self._send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                       b"transfer-encoding: chunked\r\n\r\n" + _chunk(sse_event(0)))
            self.engine.held.append(self)

    def _finish_stream(self) -> None:
        self.responding = False
        self._send(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def _cut(self) -> None:
        self.responding = False
        if self.transport is not None:
            self.transport.abort()


@dataclass
class ScriptedEngine:
    """An in-process engine driven by the request body's ``"mode"`` (see the module doc)."""

    name: str
    port: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    connections: int = 0
    server: asyncio.AbstractServer | None = None
    held: list[_ScriptedConn] = field(default_factory=list)
    override: str | None = None  # answer every request in this mode, whatever it asks for

    def release(self) -> None:
        """Finish every ``hold`` stream."""
        for conn in self.held:
            conn._send(_chunk(sse_event(1)))
            conn._finish_stream()
        self.held.clear()

    async def start(self) -> ScriptedEngine:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ScriptedConn(self), "127.0.0.1",
                                               self.port)
        sockets = getattr(self.server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def make_pool(urls: dict[str, str], model: str = "tiny", routable: bool = True,
              seed: int = 0, cap: int = 0) -> BackendPool:
    """A pool with one backend per ``key -> url`` (key ``gpuN/name``), all routable."""
    pool = BackendPool(rng=random.Random(seed))
    pool.configure(max_inflight_per_engine=cap)
    for key, url in urls.items():
        pool.add(Backend(key=key, gpu=key.partition("/")[0], model=model, base_url=url))
        if routable:
            pool.set_routable(key, True)
    return pool


class Recorder:
    """The proxy's request observer for tests: remembers every finished request and wait."""

    def __init__(self) -> None:
        self.done: list[tuple[str | None, str | None, int]] = []
        self.waits: list[float] = []
        self.rejected: list[int] = []
        self.connections = 0
        self.refused = 0
        self.retries: list[str] = []
        self.send_timeouts = 0
        self.holds = 0
        self.held_for: list[tuple[float, bool]] = []
        self.lags: list[float] = []

    def request_done(self, model: str | None, engine: str | None, code: int, duration_s: float,
                     ttfb_s: float | None) -> None:
        self.done.append((model, engine, code))

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def request_rejected(self, status: int) -> None:
        self.rejected.append(status)

    def connections_changed(self, opened: int) -> None:
        self.connections += opened

    def connection_refused(self) -> None:
        self.refused += 1

    def request_retried(self, reason: str) -> None:
        self.retries.append(reason)

    def send_timed_out(self) -> None:
        self.send_timeouts += 1

    def holding(self, delta: int) -> None:
        self.holds += delta

    def held(self, seconds: float, served: bool) -> None:
        self.held_for.append((seconds, served))

    def loop_lag(self, seconds: float) -> None:
        self.lags.append(seconds)


@contextlib.asynccontextmanager
async def running_proxy(pool: BackendPool, observer: Recorder | None = None,
                        **overrides: Any) -> AsyncIterator[ProxyServer]:
    """An in-process ProxyServer on a free port (observed by ``observer``, a fresh
    :class:`Recorder` by default); stopped (1 s grace) on exit."""
    port = free_ports(1)[0]
    config = ProxyConfig(listen=f"127.0.0.1:{port}", **overrides)
    server = ProxyServer(config, pool, lambda: {"groups": [{"gpu": "gpu0", "state": "RUNNING"}]},
                         observer or Recorder())
    await server.start()
    try:
        yield server
    finally:
        await server.stop(1.0)


# -- fake-vllm processes --------------------------------------------------------------------


@dataclass
class FakeEngine:
    port: int
    name: str
    model: str
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


@dataclass
class FakeEngines:
    """``fake-vllm`` processes sharing one events file and control directory."""

    workdir: Path
    engines: list[FakeEngine] = field(default_factory=list)

    @property
    def events_file(self) -> Path:
        return self.workdir / "engines.jsonl"

    @property
    def control_dir(self) -> Path:
        return self.workdir / "ctl"

    def start(self, models: list[str], env: dict[str, str] | None = None) -> list[FakeEngine]:
        self.control_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(len(models))
        base = {**os.environ, "FAKE_ENGINE_EVENTS": str(self.events_file),
                "FAKE_ENGINE_CONTROL_DIR": str(self.control_dir),
                "FAKE_VLLM_PYTHON": sys.executable, **(env or {})}
        started = []
        for i, (port, model) in enumerate(zip(ports, models, strict=True)):
            name = f"e{len(self.engines) + i}"
            proc = subprocess.Popen(
                [str(FAKE_VLLM), "serve", str(self.workdir / model), "--host", "127.0.0.1",
                 "--port", str(port), "--served-model-name", model],
                env={**base, f"FAKE_ENGINE_NAME_PORT_{port}": name},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
            started.append(FakeEngine(port, name, model, proc))
        self.engines.extend(started)
        for engine in started:
            _wait_healthy(engine)
        return started

    def command(self, engine: FakeEngine, text: str) -> None:
        path = self.control_dir / f"{engine.port}.cmd"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(path)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_jsonl(self.events_file) if kind is None or e["event"] == kind]

    def stop(self) -> None:
        """SIGKILL every engine's process group (EngineCore included) and reap."""
        for engine in self.engines:
            engine.kill(signal.SIGKILL)
        deadline = time.monotonic() + 5
        for engine in self.engines:
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.proc.wait(5)
            while _group_alive(engine.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)  # EngineCore is not our child: poll until its group is gone


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_healthy(engine: FakeEngine, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if engine.proc.poll() is not None:
            raise RuntimeError(f"fake engine on {engine.port} exited {engine.proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{engine.url}/health",
                                                                  timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"fake engine on {engine.port} never became healthy")


@contextlib.contextmanager
def fake_engines(workdir: Path, models: list[str],
                 env: dict[str, str] | None = None) -> Iterator[FakeEngines]:
    engines = FakeEngines(workdir)
    try:
        engines.start(models, env)
        yield engines
    finally:
        engines.stop()


def sse_events(body: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body (JSON decoded, ``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out
