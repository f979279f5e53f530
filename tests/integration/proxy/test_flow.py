"""Clients that do not read (issue 21 item 1): the send timeout and what such a client can pin.

A client that stops reading its response must neither hold its engine slot for ever nor make
mpsd (or the kernel, on mpsd's behalf) buffer its answer: the proxy stops reading the engine at a
small high-water mark, the client socket's kernel send buffer is capped
(``client_send_buffer_bytes``) and so is the engine connection's receive buffer, and after
``send_timeout_s`` without any progress the request is aborted at the engine, the lease given
back, the connection closed and ``send_timed_out`` counted. What is held is counted in user space
(mpsd's buffers) and in the kernel (the socket queues of mpsd's two sockets, from
``/proc/net/tcp``), not from RSS alone.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mpsd.proxy.front import FrontConnection
from mpsd.proxy.relay import Exchange
from mpsd.proxy.server import ProxyServer
from tests.harness import until
from tests.proxy_helpers import Recorder, ScriptedEngine, make_pool, running_proxy

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MiB = 1024 * 1024
#: what the docs state a client that does not read can pin in mpsd and in mpsd's sockets:
#: the 64 KiB write buffer and one engine read (256 KiB) in user space; the client socket's
#: send queue (client_send_buffer_bytes, booked twice by the kernel) and the engine socket's
#: receive queue (256 KiB, booked twice) in the kernel
BOUND = 2 * MiB


@pytest.fixture
async def engine() -> AsyncIterator[ScriptedEngine]:
    started = await ScriptedEngine("a").start()
    yield started
    started.close()


def raw_post(mode: str, **extra: Any) -> bytes:
    data = json.dumps({"model": "tiny", "prompt": "hi", "mode": mode, **extra}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data))


async def non_reader(port: int, data: bytes, rcvbuf: int = 4096) -> socket.socket:
    """A client that sends ``data`` and never reads (or reads when the test says so)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    await asyncio.get_running_loop().sock_sendall(sock, data)
    return sock


def the_connection(proxy: ProxyServer) -> FrontConnection:
    (conn,) = proxy._conns
    return conn


def user_space(conn: FrontConnection) -> int:
    """What mpsd holds for this client in user space: its read buffer, its write buffer, and
    the engine connection's buffers of the exchange in flight."""
    held = len(conn._buf)
    if conn.transport is not None:
        held += conn.transport.get_write_buffer_size()
    exchange = conn.exchange
    if isinstance(exchange, Exchange):
        held += len(exchange._buf) + len(exchange.held)
        if exchange.upstream.transport is not None:
            held += exchange.upstream.transport.get_write_buffer_size()
    return held


def socket_queues(local_port: int, remote_port: int) -> int:
    """Bytes in the kernel queues (send + receive) of mpsd's two sockets of this exchange: the
    client connection (local port = the proxy's) and the engine connection (remote port = the
    engine's; the engine's own socket has it as its local port)."""
    total = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(name)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            lport, rport = int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)
            if lport == local_port or rport == remote_port:
                tx, rx = queues.split(":")
                total += int(tx, 16) + int(rx, 16)
    return total


class TestSendTimeout:
    @pytest.mark.parametrize("mode", ["big:20000000", "flood:400000"], ids=["json", "sse"])
    async def test_a_client_that_never_reads_is_cut_and_its_engine_slot_freed(
            self, engine: ScriptedEngine, mode: str) -> None:
        """1. a client asks for a 20 MB answer (or a long stream) and reads nothing
        2. after send_timeout_s without progress: the engine sees the request aborted, the
           lease is back, the connection is closed and the timeout is counted (code 499)"""
        recorder = Recorder()
        pool = make_pool({"gpu0/a": engine.url})
        async with running_proxy(pool, recorder, send_timeout_s=1.0) as proxy:
            sock = await non_reader(proxy.port, raw_post(mode, stream=mode.startswith("f")))
            await until(lambda: pool.inflight_total() == 1, what="the request in flight")
            await until(lambda: recorder.send_timeouts == 1, within_s=5, what="a send timeout")
            await until(lambda: pool.inflight_total() == 0, what="the lease back")
            await until(lambda: not proxy._conns, what="the connection closed")
            sock.close()
        assert recorder.done == [("tiny", "gpu0/a", 499)]

    async def test_a_slow_reader_that_makes_progress_is_not_cut(
            self, engine: ScriptedEngine) -> None:
        """Reading 32 KiB every 0.3 s is slow, and the proxy's own buffer does not go down for
        many seconds (the kernel's send queue drains first): progress all the same, seen in
        the kernel's queue. 3 send timeouts pass and the whole answer arrives."""
        recorder = Recorder()
        async with running_proxy(make_pool({"gpu0/a": engine.url}), recorder,
                                 send_timeout_s=1.0) as proxy:
            sock = await non_reader(proxy.port, raw_post("big:2000000"), rcvbuf=1 << 15)
            loop = asyncio.get_running_loop()
            received = bytearray()
            while len(received) < 2_000_000:
                await asyncio.sleep(0.3)
                received += await loop.sock_recv(sock, 1 << 15)
                if len(received) > 300_000:  # then quickly, so that the test ends
                    while len(received) < 2_000_000:
                        received += await loop.sock_recv(sock, 1 << 20)
            sock.close()
        assert recorder.send_timeouts == 0 and recorder.done == [("tiny", "gpu0/a", 200)]

    async def test_an_idle_connection_with_unread_bytes_is_not_kept_for_ever(
            self, engine: ScriptedEngine) -> None:
        """The answer fit in the buffers, the exchange ended, and the client never reads: the
        connection is cut after send_timeout_s too (a close() would wait for it for ever)."""
        recorder = Recorder()
        async with running_proxy(make_pool({"gpu0/a": engine.url}), recorder,
                                 send_timeout_s=0.5, client_send_buffer_bytes=4096) as proxy:
            sock = await non_reader(proxy.port, raw_post("big:300000"))
            await until(lambda: recorder.done, what="the exchange over")
            await until(lambda: recorder.send_timeouts == 1, within_s=5, what="a send timeout")
            await until(lambda: not proxy._conns, what="the connection closed")
            sock.close()


class TestBoundedBuffering:
    async def test_pipelined_64_mib_answers_never_read_pin_a_bounded_amount(
            self, engine: ScriptedEngine) -> None:
        """Two pipelined requests for 64 MiB answers, never read (issue 21: 68 MiB were held).
        The engine has written its whole answer (into its own buffers): mpsd holds at most
        BOUND in user space and in its two sockets' kernel queues together, the second
        request never reaches the engine, and the send timeout ends it all."""
        recorder = Recorder()
        pool = make_pool({"gpu0/a": engine.url})
        async with running_proxy(pool, recorder, send_timeout_s=3.0) as proxy:
            sock = await non_reader(proxy.port, raw_post("big:67108864") * 2)
            await until(lambda: engine.requests, what="the first request at the engine")
            conn = the_connection(proxy)
            most = 0
            for _ in range(40):
                await asyncio.sleep(0.05)
                if conn.closed:
                    break
                held = user_space(conn) + socket_queues(proxy.port, engine.port)
                most = max(most, held)
            assert len(engine.requests) == 1 and most < BOUND, most
            await until(lambda: recorder.send_timeouts == 1, within_s=8, what="a send timeout")
            await until(lambda: pool.inflight_total() == 0, what="the lease back")
            sock.close()
            await until(lambda: proxy._upstreams.open_connections == 0,
                        what="the engine connection dropped (the engine aborts the request)")
        assert len(engine.requests) == 1
