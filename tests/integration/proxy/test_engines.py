"""The proxy in front of real ``fake-vllm`` processes, driven by the official clients.

Engines start once per module (they take a few seconds); tests that kill an engine start their
own. Every process is killed at teardown and the work directory is checked for leftovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from mpsd.backend import Backend
from mpsd.pool import BackendPool
from mpsd.proxy.server import ProxyServer
from tests.harness import processes_mentioning, until
from tests.proxy_helpers import FakeEngines, make_pool, running_proxy, sse_events

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOKEN_DELAY = {"FAKE_ENGINE_TOKEN_DELAY_S": "0.002"}


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeEngines]:
    """Two engines serving ``tiny`` and one serving ``other``."""
    workdir = Path(tempfile.mkdtemp(prefix="mpsd-proxy-"))
    engines = FakeEngines(workdir)
    try:
        engines.start(["tiny", "tiny", "other"], TOKEN_DELAY)
        yield engines
    finally:
        engines.stop()
        leaked = list(processes_mentioning(str(workdir)))
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
        assert not leaked, f"processes outlived the tests: {leaked}"


def _pool(fakes: FakeEngines, seed: int = 0) -> BackendPool:
    """``tiny`` on two engines (gpu0, gpu1) and ``other`` on a third (gpu1)."""
    pool = make_pool({f"gpu{i}/{e.name}": e.url for i, e in enumerate(fakes.engines[:2])},
                     seed=seed)
    other = fakes.engines[2]
    pool.add(Backend(key=f"gpu1/{other.name}", gpu="gpu1", model="other", base_url=other.url))
    pool.set_routable(f"gpu1/{other.name}", True)
    return pool


@pytest.fixture
async def proxy(fakes: FakeEngines) -> AsyncIterator[ProxyServer]:
    async with running_proxy(_pool(fakes)) as server:
        yield server


def _client(proxy: ProxyServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="none",
                              max_retries=0, timeout=20)


class TestOpenAIClient:
    async def test_completions_chat_and_models(self, proxy: ProxyServer) -> None:
        client = _client(proxy)
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["other", "tiny"]
        done = await client.completions.create(model="tiny", prompt="Hello", max_tokens=5)
        assert done.model == "tiny" and done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 5
        chat = await client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert chat.model == "other" and chat.choices[0].message.role == "assistant"
        await client.close()

    async def test_an_unknown_path_or_method_gets_an_openai_shaped_error(
            self, proxy: ProxyServer) -> None:
        """vLLM's framework answers ``{"detail":"Not Found"}``; clients get OpenAI's shape."""
        base = f"http://127.0.0.1:{proxy.port}"
        async with aiohttp.ClientSession() as session:
            for method, path, status in (("POST", "/v1/foo", 404),
                                         ("GET", "/v1/completions", 405)):
                payload = {"model": "tiny"} if method == "POST" else None
                async with session.request(method, base + path, json=payload) as resp:
                    doc = json.loads(await resp.read())
                    assert resp.status == status, doc
                assert set(doc) == {"error"} and doc["error"]["code"] == status, doc
                assert path in doc["error"]["message"], doc

    async def test_streaming_chat(self, proxy: ProxyServer) -> None:
        client = _client(proxy)
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
            stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 5
        await client.close()

    async def test_sdk_errors(self, proxy: ProxyServer) -> None:
        client = _client(proxy)
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="nope", prompt="x", max_tokens=1)
        assert info.value.status_code == 404
        with pytest.raises(openai.BadRequestError):  # the engine's own 400 passes through
            await client.completions.create(model="tiny", prompt="x", max_tokens=100000)
        await client.close()


async def test_curl_streams_with_no_buffering(proxy: ProxyServer) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True})
    proc = await asyncio.create_subprocess_exec(
        curl, "-sN", "--max-time", "10", "-H", "Content-Type: application/json", "-d", body,
        f"http://127.0.0.1:{proxy.port}/v1/completions", stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    events = sse_events(out)
    assert len(events) == 4 and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


class _WatchedPool(BackendPool):
    """Records, at every pick, the chosen engine's in-flight and the least among its peers."""

    def __init__(self, seed: int) -> None:
        super().__init__(rng=random.Random(seed))
        self.picks: list[tuple[int, int]] = []

    def _take_now(self, model: str | None, exclude: Any) -> Backend | None:
        peers = [b.inflight for b in self.backends() if b.routable and b.model == model]
        backend = super()._take_now(model, exclude)
        if backend is not None:
            self.picks.append((backend.inflight - 1, min(peers)))
        return backend


async def test_balance_under_mixed_length_load(fakes: FakeEngines) -> None:
    """1. 24 clients send 300 requests of random length (1-24 tokens, a third streamed).
    2. Every pick goes to an engine with the fewest requests in flight at that moment, and the
       in-flight counts sampled all along are equal on average.
    3. The requests split evenly between the two engines."""
    pool = _WatchedPool(seed=7)
    for i, engine in enumerate(fakes.engines[:2]):
        pool.add(Backend(key=f"gpu{i}/{engine.name}", gpu=f"gpu{i}", model="tiny",
                         base_url=engine.url))
        pool.set_routable(f"gpu{i}/{engine.name}", True)
    tiny = pool.backends()
    rng = random.Random(3)
    plan = [(rng.randint(1, 24), rng.random() < 0.33) for _ in range(300)]
    samples: list[tuple[int, int]] = []
    async with running_proxy(pool) as proxy, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{proxy.port}/v1/completions"
        queue = list(plan)

        async def worker() -> None:
            while queue:
                tokens, stream = queue.pop()
                async with session.post(url, json={"model": "tiny", "prompt": "x",
                                                   "max_tokens": tokens,
                                                   "stream": stream}) as resp:
                    assert resp.status == 200
                    await resp.read()

        async def sampler() -> None:
            while True:
                samples.append((tiny[0].inflight, tiny[1].inflight))
                await asyncio.sleep(0.001)

        sampling = asyncio.ensure_future(sampler())
        await asyncio.gather(*(worker() for _ in range(24)))
        sampling.cancel()
    assert len(pool.picks) == 300
    assert all(chosen == least for chosen, least in pool.picks), "a pick was not least-loaded"
    counts = [b.requests for b in tiny]
    assert abs(counts[0] - counts[1]) <= 0.08 * 300, counts  # split within a few %
    busy = [s for s in samples if sum(s) >= 12]
    assert busy, "the load never got going"
    mean = [sum(s[i] for s in busy) / len(busy) for i in (0, 1)]
    assert abs(mean[0] - mean[1]) <= 0.1 * max(mean), mean
    assert [b.inflight for b in tiny] == [0, 0]


async def test_disconnect_mid_stream_aborts_on_the_engine(proxy: ProxyServer,
                                                          fakes: FakeEngines) -> None:
    before = len(fakes.events("abort"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    body = json.dumps({"model": "other", "prompt": "x", "max_tokens": 2000,
                       "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert (await reader.readuntil(b"data: ")).startswith(b"HTTP/1.1 200")
    writer.close()
    aborts = await until(lambda: fakes.events("abort")[before:], what="the engine's abort")
    assert aborts[0]["reason"] == "client_disconnect"
    await until(lambda: proxy._pool.inflight_total() == 0)


@pytest.fixture
def victim(fakes: FakeEngines) -> Iterator[FakeEngines]:
    """A fresh engine of its own (the test kills it)."""
    own = FakeEngines(fakes.workdir)
    own.start(["victim"], TOKEN_DELAY)
    yield own
    own.stop()


@pytest.mark.parametrize("how", ["engine_crash", "sigkill"])
async def test_engine_dying_mid_stream_ends_the_stream_with_an_error(
        victim: FakeEngines, how: str) -> None:
    """``engine_crash``: EngineCore dies, vLLM's API server writes the error event itself.
    ``sigkill``: the whole engine vanishes, the proxy writes the error event. Either way the
    client gets an error event and ``[DONE]`` — never a hang."""
    engine = victim.engines[0]
    pool = make_pool({"gpu0/victim": engine.url}, model="victim")
    async with running_proxy(pool) as proxy, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{proxy.port}/v1/completions"
        async with session.post(url, json={"model": "victim", "prompt": "x",
                                           "max_tokens": 100000 // 100, "stream": True},
                                timeout=aiohttp.ClientTimeout(total=15)) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            if how == "sigkill":
                engine.kill(signal.SIGKILL)
            else:
                victim.command(engine, "crash")
            events = sse_events(await resp.read())
        assert "error" in events[-2] and events[-1] == "[DONE]"
    assert pool.inflight_total() == 0
