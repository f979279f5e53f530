"""Passive outlier ejection and retry before the first byte, against scripted engines.

A dead engine answers fastest, so least-loaded routing would send it nearly everything (issue
#10: 34,163 failures against 5,803 served in 60 s). These tests pin down that it is ejected in
the tick its answer arrives, that its group hears of it, and that requests it failed before the
client saw a byte are served by another engine — within the retry budget.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from mpsd.backend import Backend
from tests.harness import until
from tests.proxy_helpers import Recorder, ScriptedEngine, make_pool, running_proxy

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


ENGINE_NAMES = ("a", "b", "c")


def body(mode: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hi", "mode": mode, **extra}


async def post(session: aiohttp.ClientSession, port: int,
               payload: Any) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=payload) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_dead_engine_is_ejected_at_its_first_answer_and_the_request_served_elsewhere(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """1. engine a answers like vLLM after its EngineCore died (500, EngineDeadError)
    2. the client's request goes to b and gets b's 200; a is out of routing from that answer
    3. a's group is told (``on_engine_fault``) once; nothing more is sent to a"""
    engines[0].override = "dead"
    told: list[tuple[str, str]] = []
    pool = make_pool({"gpu0/a": engines[0].url, "gpu1/b": engines[1].url})
    pool.on_engine_fault = lambda backend, signal, reason: told.append((backend.key, signal))
    recorder = Recorder()
    async with running_proxy(pool, recorder) as proxy:
        results = [await post(session, proxy.port, body()) for _ in range(20)]
    assert [r[0] for r in results] == [200] * 20
    assert all(r[1]["x-engine"] == "b" for r in results)
    assert len(engines[0].requests) <= 1  # at most the one that found it dead
    a = pool.get("gpu0/a")
    assert a is not None and not a.routable and a.ejections == (len(engines[0].requests))
    assert told == [("gpu0/a", "engine_dead")] * len(engines[0].requests)
    assert recorder.retries == ["engine_dead"] * len(engines[0].requests)
    assert pool.inflight_total() == 0


async def test_fast_failing_engine_is_never_preferred_under_load(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """1. engine a answers 500 at once (not a dead-engine body), b and c answer slowly
    2. 32 clients, each sending request after request: a always has the fewest in flight
    3. a is ejected after ``eject_after_errors`` 5xx in a row; what it held then is retried
       elsewhere as far as the retry budget allows (20 % of 32 in flight: 6), so a gets no
       more than its share of the first burst and the clients see a handful of failures"""
    engines[0].override = "status:500"
    pool = make_pool({"gpu0/a": engines[0].url, "gpu0/b": engines[1].url,
                      "gpu1/c": engines[2].url})
    codes: list[int] = []

    async def client() -> None:
        for _ in range(10):
            codes.append((await post(session, proxy.port, body("slow:0.02")))[0])

    async with running_proxy(pool, eject_after_errors=3, eject_base_s=30.0) as proxy:
        await asyncio.gather(*(client() for _ in range(32)))
    assert len(codes) == 320 and codes.count(500) <= 2 + 6
    assert len(engines[0].requests) <= 32 // 3 + 3  # its share of the first burst, no more
    a = pool.get("gpu0/a")
    assert a is not None and not a.routable and a.ejected_until > 0


async def test_503_and_reset_are_retried_once_per_engine_but_4xx_and_other_5xx_are_not(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """A 503 goes to the next engine; when every engine answered 503, the client gets the
    last engine's own answer. A 400 or a plain 500 is the client's, as the engine said it."""
    pool = make_pool({"gpu0/a": engines[0].url, "gpu0/b": engines[1].url})
    async with running_proxy(pool, eject_after_errors=0) as proxy:
        status, _, raw = await post(session, proxy.port, body("status:503"))
        assert status == 503 and b"engine says no" in raw
        assert len(engines[0].requests) == len(engines[1].requests) == 1
        for mode, code in (("status:400", 400), ("status:500", 500)):
            status, _, _ = await post(session, proxy.port, body(mode))
            assert status == code
        assert len(engines[0].requests) + len(engines[1].requests) == 4
    assert pool.inflight_total() == 0


async def test_retry_budget_keeps_an_outage_from_doubling_the_load(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """With a budget of no retries at all, a dead engine's 500 reaches the client untouched
    (still ejecting the engine); with the default budget the same request is served."""
    engines[0].override = "dead"
    pool = make_pool({"gpu0/a": engines[0].url, "gpu1/b": engines[1].url})
    async with running_proxy(pool, retry_budget=0.0, retry_min_concurrency=0) as proxy:
        status, headers, raw = await post(session, proxy.port, body())
    assert status == 500 and headers["x-engine"] == "a" and b"EngineCore encountered" in raw
    a = pool.get("gpu0/a")
    assert a is not None and not a.routable


async def test_ejection_ends_after_its_time_and_a_restarted_engine_starts_clean(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """A 5xx run ejects for ``eject_base_s``; the proxy's housekeeping readmits it. A dead
    engine stays out until its group marks the restarted engine ready again."""
    engines[0].override = "status:500"
    pool = make_pool({"gpu0/a": engines[0].url, "gpu1/b": engines[1].url})
    async with running_proxy(pool, eject_after_errors=1, eject_base_s=0.3,
                             first_byte_timeout_s=1.0) as proxy:
        await post(session, proxy.port, body())
        a = pool.get("gpu0/a")
        assert a is not None
        await until(lambda: not a.routable, what="a ejected")
        await until(lambda: a.routable, within_s=5, what="a readmitted by housekeeping")
        pool.eject(a, 0.0, "engine_dead", "test", dead=True)
        await asyncio.sleep(1.2)  # a housekeeping round passes: a dead engine stays out
        assert not a.routable
        pool.set_routable("gpu0/a", True)  # a probe passing again: still ejected
        assert not a.routable
        pool.set_routable("gpu0/a", True, fresh=True)  # its group restarted it
        assert a.routable and a.ejected_until == 0 and a.consecutive_5xx == 0


async def test_stalled_stream_ejects_its_engine_as_dead(
        engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
    """A stream that sends nothing for ``stall_timeout_s`` while its client reads is a hung
    engine (its /health may still answer): ejected, and its group told with the signal
    ``stall`` (the cases that are not stalls: tests/integration/proxy/test_stalls.py)."""
    told: list[str] = []
    pool = make_pool({"gpu0/a": engines[0].url})
    pool.on_engine_fault = lambda backend, signal, reason: told.append(signal)
    async with running_proxy(pool, stall_timeout_s=0.5, first_byte_timeout_s=3.0) as proxy:
        status, _, raw = await post(session, proxy.port, body("hold", stream=True))
    assert told == ["stall"] and status == 200 and b"sent nothing" in raw
    backend: Backend | None = pool.get("gpu0/a")
    assert backend is not None and not backend.routable
    engines[0].release()
