"""Stall detection per exchange (issue 19 item 6), against scripted engines.

A stall is judged per exchange, never per engine: a *stream* whose client reads and that sends
nothing for ``stall_timeout_s`` condemns its engine; a long non-streaming request (vLLM sends
its answer only at the end) and a stream paused because its client stopped reading are not
stalls. A condemned or removed engine's exchanges end at once and give back their leases, the
paused ones included (they would never notice that their engine is gone).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mpsd.backend import Backend
from mpsd.pool import BackendPool
from tests.harness import until
from tests.proxy_helpers import ScriptedEngine, make_pool, running_proxy, sse_events

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def body(mode: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hi", "mode": mode, **extra}


def raw_post(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data))


def told_to(pool: BackendPool) -> list[tuple[str, str]]:
    told: list[tuple[str, str]] = []
    pool.on_engine_fault = lambda backend, signal, reason: told.append((backend.key, signal))
    return told


def backend(pool: BackendPool, key: str) -> Backend:
    found = pool.get(key)
    assert found is not None
    return found


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


async def non_reader(port: int, payload: dict[str, Any]) -> socket.socket:
    """A client that sends one request and never reads (a small receive buffer, so that the
    proxy's writes back up at once)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    sock.send(raw_post(payload))
    return sock


async def test_a_stream_that_stops_while_its_client_reads_condemns_its_engine(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """1. engine a sends a stream's head and one event, then nothing (hung)
    2. the client keeps reading: after ``stall_timeout_s`` the engine is condemned (its group
       hears ``stall`` once) and the client's stream ends with an error event and [DONE]"""
    pool = make_pool({"gpu0/a": engines[0].url})
    told = told_to(pool)
    async with running_proxy(pool, stall_timeout_s=0.5) as proxy:
        async with session.post(f"http://127.0.0.1:{proxy.port}/v1/completions",
                                json=body("hold", stream=True)) as resp:
            raw = await resp.read()
        assert resp.status == 200
        events = sse_events(raw)
        assert events[-1] == "[DONE]" and "sent nothing" in events[-2]["error"]["message"]
        assert told == [("gpu0/a", "stall")]
        assert not backend(pool, "gpu0/a").routable and pool.inflight_total() == 0
    engines[0].release()


async def test_a_long_non_streaming_answer_is_not_a_stall(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """vLLM sends a non-streaming answer only at its end: 2 s of silence before the head,
    four times ``stall_timeout_s``, is a long request on a healthy engine."""
    pool = make_pool({"gpu0/a": engines[0].url})
    told = told_to(pool)
    async with running_proxy(pool, stall_timeout_s=0.5) as proxy:
        resp = await session.post(f"http://127.0.0.1:{proxy.port}/v1/completions",
                                  json=body("slow:2.0"))
        assert resp.status == 200 and (await resp.json())["ok"]
    assert told == [] and backend(pool, "gpu0/a").routable


async def test_the_first_byte_timeout_ends_a_request_before_its_head_without_condemning(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """A request the engine never answers gets 504 after ``first_byte_timeout_s``; that is the
    request's limit, not a verdict on the engine (it stays routable, its group is not told)."""
    pool = make_pool({"gpu0/a": engines[0].url})
    told = told_to(pool)
    async with running_proxy(pool, stall_timeout_s=0.3, first_byte_timeout_s=1.5) as proxy:
        resp = await session.post(f"http://127.0.0.1:{proxy.port}/v1/completions",
                                  json=body("hang"))
        assert resp.status == 504
    assert told == [] and backend(pool, "gpu0/a").routable and pool.inflight_total() == 0


async def test_a_client_that_stops_reading_does_not_condemn_the_engine(
        engines: list[ScriptedEngine]) -> None:
    """A stream whose client stops reading pauses the engine's connection: the engine waits
    for the client, it is not hung. Four stall timeouts pass; nothing is condemned, and once
    the client reads, the whole stream arrives."""
    pool = make_pool({"gpu0/a": engines[0].url})
    told = told_to(pool)
    async with running_proxy(pool, stall_timeout_s=0.5) as proxy:
        sock = await non_reader(proxy.port, body("flood:200000", stream=True))
        await until(lambda: engines[0].requests, what="the request reached the engine")
        await asyncio.sleep(2.5)
        assert told == [] and backend(pool, "gpu0/a").routable
        assert pool.inflight_total() == 1  # still being served
        received = bytearray()
        loop = asyncio.get_running_loop()
        while not received.endswith(b"0\r\n\r\n"):
            received += await loop.sock_recv(sock, 1 << 16)
        sock.close()
    assert received.count(b"data: ") == 200001
    assert told == [] and pool.inflight_total() == 0


@pytest.mark.parametrize("how", ["condemned", "removed"])
async def test_the_exchanges_of_a_condemned_or_removed_engine_end_at_once(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession, how: str) -> None:
    """Engine a holds three exchanges: a stream its client reads, a stream its client stopped
    reading (paused), a request before its head. When a is condemned (or removed), all three
    end at once and release their leases; the one before its head is served by b."""
    pool = make_pool({"gpu0/a": engines[0].url, "gpu1/b": engines[1].url})
    a, b = backend(pool, "gpu0/a"), backend(pool, "gpu1/b")
    async with running_proxy(pool, stall_timeout_s=0) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/v1/completions"
        pool.set_routable("gpu1/b", False)  # everything goes to a first
        reading = await session.post(url, json=body("hold", stream=True))
        paused = await non_reader(proxy.port, body("flood:200000", stream=True))
        await until(lambda: a.inflight == 2, what="two streams on a")
        engines[0].override = "hang"  # a never answers this one; b would
        before_head = asyncio.ensure_future(session.post(url, json=body("ok")))
        await until(lambda: len(engines[0].requests) == 3, what="three exchanges on a")
        pool.set_routable("gpu1/b", True)
        if how == "condemned":
            pool.eject(a, 0.0, "engine_dead", "test", dead=True)
        else:
            pool.remove("gpu0/a")
        await until(lambda: a.inflight == 0, within_s=0.5, what="a's leases released")
        events = sse_events(await reading.read())
        assert events[-1] == "[DONE]" and "taken out of service" in events[-2]["error"]["message"]
        resp = await before_head
        assert resp.status == 200 and resp.headers["x-engine"] == "b"
        resp.close()
        paused.close()
        await until(lambda: b.inflight == 0, what="b idle")
    engines[0].release()
