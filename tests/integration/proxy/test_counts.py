"""In-flight counts return to exactly 0 whatever happens to requests (hypothesis).

Random mixes of engine behaviours (answer, stream, die mid-stream, hang past the first-byte
timeout, close before answering, error), client behaviours (read, vanish at once, vanish after
the first bytes), an unreachable engine (connect retries), per-engine caps and admission waits,
all at once. Afterwards every count is 0, nothing is queued, the proxy logged no failure and no
protocol callback raised. An engine that closes a new connection unanswered is condemned (the
engine is going), and its other requests end at once: where a ``close`` is in the mix, any
request may end that way (502 before the head, an error event after it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.harness import free_ports, until
from tests.proxy_helpers import ScriptedEngine, make_pool, running_proxy

MODES = ["ok", "stream:3", "cut:2", "hang", "close", "status:500", "slow:0.01", "stream:1",
         "cutjson"]
CLIENT = ["read", "drop_early", "drop_after_first"]

_OPS = st.lists(st.tuples(st.sampled_from(MODES), st.sampled_from(CLIENT),
                          st.sampled_from(["tiny", "tiny", "tiny", "unknown"])),
                min_size=1, max_size=10)


async def _client(port: int, mode: str, action: str, model: str) -> bytes:
    payload = json.dumps({"model": model, "prompt": "x", "mode": mode}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    out = b""
    try:
        if action == "drop_early":
            return out
        if action == "drop_after_first":
            return await reader.read(1)
        while chunk := await reader.read(65536):
            out += chunk
        return out
    finally:
        writer.close()


async def _scenario(ops: list[tuple[str, str, str]], cap: int, wait_s: float,
                    seed: int) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    engines = [await ScriptedEngine("a").start(), await ScriptedEngine("b").start()]
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    pool = make_pool({"gpu0/a": engines[0].url, "gpu0/dead": dead, "gpu1/b": engines[1].url},
                     seed=seed, cap=cap)
    try:
        with capture_logs() as logs:
            async with running_proxy(pool, first_byte_timeout_s=0.1, connect_timeout_s=0.5,
                                     admission_wait_s=wait_s) as proxy:
                replies = await asyncio.gather(*(_client(proxy.port, *op) for op in ops))
                await until(lambda: pool.inflight_total() == 0 and pool.queued() == 0,
                            what="in-flight back to 0")
                condemned = any(mode == "close" for mode, _, _ in ops)
                for (mode, action, model), reply in zip(ops, replies, strict=True):
                    if action == "read" and not (condemned and _ended_by_condemnation(reply)):
                        _check_reply(mode, model, reply)
            await until(lambda: proxy._upstreams.open_connections == 0)
    finally:
        for engine in engines:
            engine.close()
    assert [b.inflight for b in pool.backends()] == [0, 0, 0]
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not loop_errors, loop_errors


def _ended_by_condemnation(reply: bytes) -> bool:
    """Ended because its engine was condemned meanwhile (before or after the head)."""
    return (reply.startswith(b"HTTP/1.1 502") and b"failed before answering" in reply) or (
        b"taken out of service" in reply)


def _check_reply(mode: str, model: str, reply: bytes) -> None:
    head = reply.partition(b"\r\n")[0]
    if model == "unknown":
        assert head.startswith(b"HTTP/1.1 404"), reply
    elif b" 503 " in head:  # saturated (cap) or every engine tried
        assert b"retry-after" in reply.lower()
    elif mode == "hang":
        assert head.startswith(b"HTTP/1.1 504"), reply
    elif mode == "close":
        assert head.startswith(b"HTTP/1.1 502"), reply
    elif mode == "cut:2":
        assert b'"code":502' in reply and reply.endswith(b"0\r\n\r\n"), reply
    elif mode == "cutjson":  # head went out, body cut: the connection simply ends
        assert head.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"partial"'), reply
    elif mode.startswith("status"):
        assert head.startswith(b"HTTP/1.1 500"), reply
    else:
        assert head.startswith(b"HTTP/1.1 200"), reply


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=_OPS, cap=st.sampled_from([0, 1, 2]), wait_s=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 1000))
def test_counts_return_to_zero(ops: list[tuple[str, str, str]], cap: int, wait_s: float,
                               seed: int) -> None:
    asyncio.run(_scenario(ops, cap, wait_s, seed))
