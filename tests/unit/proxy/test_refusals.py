"""Refusals at the front door, through a whole FrontConnection (issue 21 items 2 and 3).

* Every invalid request of the corpus, followed by megabytes more from the client: answered at
  once with its status and ``connection: close``, a FIN after the answer, **no byte read after
  the answer** (reading stops: a client past a limit may send for ever), and the connection cut
  ``LINGER_S`` later, unread.
* ``Expect: 100-continue``: the final status instead of ``100 Continue`` when the head already
  decides (a body over ``max_body_bytes``, a refused key, what the server's ``decide`` says), so
  the client never sends the body at all (RFC 9110 §10.1.1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mpsd.proxy.front import LINGER_S
from mpsd.proxy.http_rules import Limits
from tests.unit.proxy.fake_front import FakeHandler, connect, feed
from tests.unit.proxy.test_corpus import cases, load

MiB = 1024 * 1024
MORE = b"x" * (4 * MiB)  # what a hostile client keeps sending after its request


def status_of(out: bytes | bytearray) -> int:
    return int(bytes(out[9:12]))


def expect_request(length: int, body: bytes = b"") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (length, body))


@pytest.mark.parametrize("path", cases("invalid"))
def test_every_refusal_is_answered_at_once_and_nothing_more_is_read(path: Path) -> None:
    expect, raw = load(path)
    handler = FakeHandler(Limits(**expect.get("limits", {})))
    conn, transport, loop = connect(handler)
    read_after = feed(conn, transport, raw + MORE)
    head = bytes(transport.out).partition(b"\r\n\r\n")[0].lower()
    assert status_of(transport.out) == expect["status"], transport.out
    assert b"connection: close" in head and transport.eof
    assert read_after == 0 and transport.paused
    assert handler.rejections == [expect["status"]] and not handler.handled
    conn.expire(loop.now + LINGER_S / 2, 30.0, 30.0, 75.0, 60.0)
    assert not transport.aborted  # time for the client to read the answer ...
    conn.expire(loop.now + LINGER_S + 0.1, 30.0, 30.0, 75.0, 60.0)
    assert transport.aborted  # ... then cut, unread (a close would wait for a silent client)


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: "
     + b"a" * (24 * MiB), 431),                                 # a 24 MiB trailer line
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nX-H: " + b"a" * (24 * MiB), 431),  # a 24 MiB header
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"f" * (24 * MiB), 400),                                 # a 24 MiB chunk-size line
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"1000000\r\n" + b"a" * (24 * MiB), 413),            # a 16 MiB chunk, 1 MiB allowed
], ids=["trailer-line", "header-line", "chunk-line", "chunked-body"])
def test_past_a_limit_the_rest_is_never_read(raw: bytes, status: int) -> None:
    """Issue 21: a 24 MiB trailer line was read whole before the 431. The answer comes at the
    read that crosses the limit; not one byte after it is read."""
    handler = FakeHandler(Limits(max_body_bytes=MiB))
    conn, transport, _ = connect(handler)
    read_after = feed(conn, transport, raw)
    assert status_of(transport.out) == status and read_after == 0 and transport.paused


class TestExpectContinue:
    def test_a_body_over_the_limit_gets_413_instead_of_100(self) -> None:
        handler = FakeHandler(Limits(max_body_bytes=1000))
        conn, transport, _ = connect(handler)
        read_after = feed(conn, transport, expect_request(100_000) + b"x" * 100_000)
        assert bytes(transport.out).startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in transport.out and read_after == 0

    def test_what_the_head_decides_is_answered_instead_of_100(self) -> None:
        handler = FakeHandler(Limits(), decision=(503, "shutting down", b"retry-after: 5\r\n"))
        conn, transport, _ = connect(handler)
        feed(conn, transport, expect_request(10))
        assert bytes(transport.out).startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 5" in transport.out and b"100 Continue" not in transport.out

    def test_a_refused_key_is_answered_instead_of_100(self) -> None:
        handler = FakeHandler(Limits(), refuse=(401, "bad key", b""))
        conn, transport, _ = connect(handler)
        feed(conn, transport, expect_request(10))
        assert bytes(transport.out).startswith(b"HTTP/1.1 401 ")
        assert b"100 Continue" not in transport.out

    def test_a_wanted_body_gets_100_then_the_answer(self) -> None:
        handler = FakeHandler(Limits(max_body_bytes=1000))
        conn, transport, _ = connect(handler)
        feed(conn, transport, expect_request(10))
        assert bytes(transport.out) == b"HTTP/1.1 100 Continue\r\n\r\n"
        feed(conn, transport, b"0123456789")
        assert bytes(transport.out).startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
        assert [r.body for r in handler.handled] == [b"0123456789"]


def test_a_refused_well_framed_request_has_what_follows_read_and_dropped() -> None:
    """Not a limit: a bad key on a well-framed request. Its client may be sending its whole
    body before it reads; that is read and dropped for LINGER_S (bounded in time), so that it
    gets the 401 rather than a reset, and never handled."""
    handler = FakeHandler(Limits(), refuse=(401, "bad key", b""))
    conn, transport, _ = connect(handler)
    body = b"x" * MiB
    feed(conn, transport, b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
         % (len(body), body))
    assert status_of(transport.out) == 401 and transport.eof and not transport.paused
    assert not handler.handled and len(transport.out.split(b"HTTP/1.1 ")) == 2  # one answer
