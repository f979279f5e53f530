"""The proxy against scripted in-process engines: relay, errors, retries, queue, lifecycle.

Every engine behaviour here is chosen per request (``"mode"`` in the body, see
``tests/proxy_helpers.py``), so failures happen exactly where a test wants them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, get_type_hints

import aiohttp
import pytest
from aiohttp import web

from mpsd.config import ProxyConfig
from mpsd.proxy.server import ProxyServer
from mpsd.status import BackendStatus, DaemonStatus, ProxyStatus
from tests.harness import free_ports, until
from tests.proxy_helpers import Recorder, ScriptedEngine, make_pool, running_proxy, sse_events

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def body(mode: str = "ok", model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "mode": mode, **extra}


async def post(session: aiohttp.ClientSession, proxy: ProxyServer, payload: Any,
               path: str = "/v1/completions",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"http://127.0.0.1:{proxy.port}{path}", json=payload,
                            headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def error_of(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    return dict(doc["error"])


async def raw_exchange(port: int, data: bytes, until_eof: bool = False,
                       expect: int = 1) -> bytes:
    """Send raw bytes; read until EOF, or until ``expect`` responses' heads were seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            out += chunk
            if not until_eof and out.count(b"HTTP/1.1 ") >= expect and out.endswith(
                    (b"}", b"0\r\n\r\n")):
                break
    finally:
        writer.close()
    return out


class TestRelay:
    async def test_json_and_sse_pass_through(self, engines: list[ScriptedEngine],
                                             session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            status, headers, raw = await post(session, proxy, body())
            assert status == 200 and json.loads(raw) == {"engine": "a", "ok": True}
            assert headers["x-engine"] == "a"  # end-to-end headers survive
            status, headers, raw = await post(session, proxy, body("stream:4"))
            assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(raw)
            assert events[-1] == "[DONE]" and len(events) == 5
        assert pool.inflight_total() == 0

    async def test_sse_is_relayed_unbuffered(self, engines: list[ScriptedEngine],
                                             session: aiohttp.ClientSession) -> None:
        """1. The engine sends its head and one event, then holds the stream open.
        2. The client reads that event while the engine still holds (nothing buffered).
        3. The engine finishes; the client sees the rest and [DONE]."""
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            url = f"http://127.0.0.1:{proxy.port}/v1/completions"
            async with session.post(url, json=body("hold")) as resp:
                first = await resp.content.readuntil(b"\n\n")
                assert first.startswith(b"data: ") and engines[0].held
                engines[0].release()
                rest = await resp.read()
            assert sse_events(first + rest)[-1] == "[DONE]"

    async def test_engine_death_mid_stream_gives_an_error_event(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        recorder = Recorder()
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, observer=recorder) as proxy:
            status, _, raw = await post(session, proxy, body("cut:2"))
            assert status == 200
            events = sse_events(raw)
            assert [e["choices"][0]["text"] for e in events[:2]] == ["t0", "t1"]
            assert events[2]["error"]["code"] == 502 and events[3] == "[DONE]"
            status, _, _ = await post(session, proxy, body())  # the connection still works
            assert status == 200
        assert ("tiny", "gpu0/a", 502) in recorder.done
        assert pool.inflight_total() == 0

    async def test_engine_death_mid_body_closes_the_client_connection(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        """A cut JSON body cannot be repaired: the client sees the connection end early."""
        recorder = Recorder()
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, observer=recorder) as proxy:
            with pytest.raises(aiohttp.ClientPayloadError):
                await post(session, proxy, body("cutjson"))
            await until(lambda: ("tiny", "gpu0/a", 502) in recorder.done)
            status, _, _ = await post(session, proxy, body())  # a new connection works
            assert status == 200
        assert pool.inflight_total() == 0

    async def test_client_disconnect_mid_stream_aborts_the_engine_request(
            self, engines: list[ScriptedEngine]) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            payload = json.dumps(body("hang")).encode()
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (len(payload), payload))
            await until(lambda: pool.inflight_total() == 1 and engines[0].requests)
            writer.close()
            await until(lambda: engines[0].events == ["abort"], what="engine saw the abort")
            await until(lambda: pool.inflight_total() == 0)

    async def test_keep_alive_pipelining_chunked_body_and_expect(
            self, engines: list[ScriptedEngine]) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            one = json.dumps(body()).encode()
            req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
                len(one), one)
            chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                           len(one), one))
            out = await raw_exchange(proxy.port, req + chunked + req, expect=4)
            assert out.count(b"HTTP/1.1 200 OK") == 3
            assert out.count(b"HTTP/1.1 100 Continue") == 1
            assert out.count(b'{"engine":"a","ok":true}') == 3
            # the engine got a re-framed body, never the client's chunked encoding
            assert all(b"transfer-encoding" not in head.lower()
                       for head, _ in engines[0].requests)

    async def test_http10_client_gets_a_dechunked_stream(
            self, engines: list[ScriptedEngine]) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            one = json.dumps(body("stream:3")).encode()
            out = await raw_exchange(proxy.port, b"POST /v1/completions HTTP/1.0\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(one), one),
                                     until_eof=True)
            head, _, payload = out.partition(b"\r\n\r\n")
            assert b"transfer-encoding" not in head.lower()
            assert b"connection: close" in head.lower()
            assert len(sse_events(payload)) == 4


class TestErrors:
    async def test_unknown_model_404_and_unknown_path_404(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            status, _, raw = await post(session, proxy, body(model="nope"))
            err = error_of(raw)
            assert status == 404 and err["type"] == "NotFoundError" and err["param"] == "model"
            status, _, raw = await post(session, proxy, {}, path="/nope")
            assert status == 404 and error_of(raw)["code"] == 404

    async def test_body_too_large_413(self, engines: list[ScriptedEngine],
                                      session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, max_body_bytes=1000) as proxy:
            status, _, raw = await post(session, proxy, body(prompt="x" * 2000))
            assert status == 413 and error_of(raw)["type"] == "RequestTooLargeError"
            big = b"x" * 3000
            out = await raw_exchange(proxy.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                                     % (len(big), big), until_eof=True)
            assert out.startswith(b"HTTP/1.1 413 ")
        assert not engines[0].requests

    async def test_engine_closing_before_the_head_is_retried_once_per_engine_then_502(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url, "gpu0/b": engines[1].url})
        async with running_proxy(pool) as proxy:
            status, _, raw = await post(session, proxy, body("close"))
            assert status == 502 and error_of(raw)["type"] == "BadGatewayError"
        # each engine got the request exactly once, and both reset a fresh connection: ejected
        assert len(engines[0].requests) == len(engines[1].requests) == 1
        assert pool.routable_count() == 0 and pool.inflight_total() == 0

    async def test_first_byte_timeout_504(self, engines: list[ScriptedEngine],
                                          session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, first_byte_timeout_s=0.2) as proxy:
            status, _, raw = await post(session, proxy, body("hang"))
            assert status == 504 and error_of(raw)["type"] == "GatewayTimeoutError"
            await until(lambda: engines[0].events == ["abort"])  # the engine request is dropped
        assert pool.inflight_total() == 0

    async def test_nothing_ready_503_with_retry_after(self, engines: list[ScriptedEngine],
                                                      session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url}, routable=False)
        async with running_proxy(pool) as proxy:
            status, headers, raw = await post(session, proxy, body())
            assert status == 503 and int(headers["Retry-After"]) > 0
            assert error_of(raw)["type"] == "ServiceUnavailableError"
            async with session.get(f"http://127.0.0.1:{proxy.port}/health") as resp:
                assert resp.status == 503

    async def test_api_keys_401(self, engines: list[ScriptedEngine], tmp_path: Path,
                                session: aiohttp.ClientSession) -> None:
        keys = tmp_path / "keys"
        keys.write_text("# operators\nsk-good\n\nsk-other\n")
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, api_keys_file=str(keys)) as proxy:
            for headers in ({}, {"Authorization": "Bearer sk-bad"},
                            {"Authorization": "Basic sk-good"}):
                status, resp_headers, raw = await post(session, proxy, body(), headers=headers)
                assert status == 401 and error_of(raw)["type"] == "AuthenticationError"
                assert resp_headers["WWW-Authenticate"].startswith("Bearer")
            status, _, _ = await post(session, proxy, body(),
                                      headers={"Authorization": "Bearer sk-other"})
            assert status == 200
            async with session.get(f"http://127.0.0.1:{proxy.port}/health") as resp:
                assert resp.status == 200  # health stays open, like vLLM's
            keys.write_text("sk-new\n")
            proxy.apply(proxy._config.model_copy(update={"api_keys_file": str(keys)}))
            status, _, _ = await post(session, proxy, body(),
                                      headers={"Authorization": "Bearer sk-good"})
            assert status == 401
            status, _, _ = await post(session, proxy, body(),
                                      headers={"Authorization": "Bearer sk-new"})
            assert status == 200

    async def test_engine_errors_pass_through_untouched(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            status, _, raw = await post(session, proxy, body("status:400"))
            assert status == 400 and error_of(raw)["message"] == "engine says no"

    async def test_missing_model_is_400_only_when_ambiguous(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        recorder = Recorder()
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, observer=recorder) as proxy:
            status, _, _ = await post(session, proxy, {"prompt": "hi"})
            assert status == 200  # one model: served by it, like vLLM
            await until(lambda: recorder.done)
            assert recorder.done == [("tiny", "gpu0/a", 200)]  # recorded under the real model
        pool = make_pool({"gpu0/a": engines[0].url})
        pool.add(make_pool({"gpu0/b": engines[1].url}, model="other").backends()[0])
        async with running_proxy(pool) as proxy:
            status, _, raw = await post(session, proxy, {"prompt": "hi"})
            assert status == 400 and error_of(raw)["param"] == "model"


class TestRouting:
    async def test_connect_failure_retries_on_another_engine(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        dead = f"http://127.0.0.1:{free_ports(1)[0]}"
        pool = make_pool({"gpu0/dead": dead, "gpu1/b": engines[1].url})
        # no hold: a refused engine is taken for one on its way back (its group restarts
        # it), and here no group ever says otherwise
        async with running_proxy(pool, recovery_hold_s=0.0) as proxy:
            for _ in range(10):
                status, headers, _ = await post(session, proxy, body())
                assert status == 200 and headers["x-engine"] == "b"
            dead_backend = pool.get("gpu0/dead")
            assert dead_backend is not None and dead_backend.connect_failures >= 1
            pool.set_routable("gpu1/b", False)
            pool.set_routable("gpu0/dead", True, fresh=True)  # its group restarted it
            status, headers, raw = await post(session, proxy, body())
            assert status == 503 and "no engine reachable" in error_of(raw)["message"]
        assert pool.inflight_total() == 0

    async def test_group_down_gets_nothing_from_that_tick(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url, "gpu1/b": engines[1].url})
        async with running_proxy(pool) as proxy:
            await asyncio.gather(*(post(session, proxy, body()) for _ in range(20)))
            assert engines[0].requests and engines[1].requests
            before = len(engines[0].requests)
            pool.set_routable("gpu0/a", False)  # what a group does when it goes down
            results = await asyncio.gather(*(post(session, proxy, body()) for _ in range(30)))
            assert all(r[1]["x-engine"] == "b" for r in results)
            assert len(engines[0].requests) == before

    async def test_saturated_requests_queue_fifo_within_admission_wait(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        recorder = Recorder()
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool, max_inflight_per_engine=1,
                                 admission_wait_s=5.0, observer=recorder) as proxy:
            results = await asyncio.gather(*(post(session, proxy, body("slow:0.02"))
                                             for _ in range(4)))
            assert [r[0] for r in results] == [200] * 4
            assert sum(1 for w in recorder.waits if w > 0.01) >= 2
            proxy.apply(proxy._config.model_copy(update={"admission_wait_s": 0.0}))
            results = await asyncio.gather(*(post(session, proxy, body("slow:0.05"))
                                             for _ in range(3)))
            codes = sorted(r[0] for r in results)
            assert codes == [200, 503, 503]
            assert all(int(r[1]["Retry-After"]) >= 1 for r in results if r[0] == 503)
        assert pool.inflight_total() == 0

    async def test_waits_for_an_engine_to_become_ready(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url}, routable=False)
        async with running_proxy(pool, admission_wait_s=5.0) as proxy:
            request = asyncio.ensure_future(post(session, proxy, body()))
            await until(lambda: pool.queued() == 1)
            pool.set_routable("gpu0/a", True)
            status, _, _ = await request
            assert status == 200


class TestLocalEndpoints:
    async def test_health_models_status_and_mounted_routes(
            self, engines: list[ScriptedEngine], session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        pool.add(make_pool({"gpu1/b": engines[1].url}, model="alpha").backends()[0])

        async def metrics(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(text="mpsd_up 1\n", content_type="text/plain")

        async with running_proxy(pool) as proxy:
            proxy.add_route("GET", "/metrics", metrics)
            base = f"http://127.0.0.1:{proxy.port}"
            async with session.get(f"{base}/health") as resp:
                assert resp.status == 200 and await resp.read() == b""
            async with session.head(f"{base}/health") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/v1/models") as resp:
                doc = await resp.json()
                assert [m["id"] for m in doc["data"]] == ["alpha", "tiny"]
            async with session.get(f"{base}/v1/models/alpha") as resp:
                assert (await resp.json())["id"] == "alpha"
            async with session.get(f"{base}/mpsd/status") as resp:
                doc = await resp.json()
                assert doc["groups"] == [{"gpu": "gpu0", "state": "RUNNING"}]
                assert {e["key"] for e in doc["engines"]} == {"gpu0/a", "gpu1/b"}
                assert doc["inflight"] == 0
                pool_part = get_type_hints(ProxyStatus).keys() - get_type_hints(DaemonStatus).keys()
                assert pool_part <= doc.keys()  # the pool's part of the typed contract
                assert all(e.keys() == get_type_hints(BackendStatus).keys() for e in doc["engines"])
            async with session.get(f"{base}/metrics") as resp:
                assert resp.status == 200 and await resp.text() == "mpsd_up 1\n"
                assert resp.headers["Connection"] == "close"
            async with session.post(f"{base}/health") as resp:
                assert resp.status == 405


class TestLifecycle:
    async def test_bind_conflict_raises_oserror(self) -> None:
        port = free_ports(1)[0]
        config = ProxyConfig(listen=f"127.0.0.1:{port}")
        first = ProxyServer(config, make_pool({}), dict, Recorder())
        await first.start()
        try:
            second = ProxyServer(config, make_pool({}), dict, Recorder())
            with pytest.raises(OSError):
                await second.start()
        finally:
            await first.stop(0.1)

    async def test_stop_lets_in_flight_streams_finish(self, engines: list[ScriptedEngine],
                                                      session: aiohttp.ClientSession) -> None:
        pool = make_pool({"gpu0/a": engines[0].url})
        async with running_proxy(pool) as proxy:
            url = f"http://127.0.0.1:{proxy.port}/v1/completions"
            async with session.post(url, json=body("hold")) as resp:
                await resp.content.readuntil(b"\n\n")
                stopping = asyncio.ensure_future(proxy.stop(5.0))
                await until(lambda: proxy._draining)
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as other:
                        await other.get(f"http://127.0.0.1:{proxy.port}/health")
                engines[0].release()
                rest = await resp.read()
                await stopping
            assert sse_events(rest)[-1] == "[DONE]"
        assert pool.inflight_total() == 0
