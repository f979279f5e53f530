"""The framing module alone: the chunked decoder both proxy sides use, and request parsing."""

from __future__ import annotations

import time

import pytest

from mpsd.proxy.chunked import ChunkedDecoder, FramingError, chunk_size
from mpsd.proxy.framing import ResponseHead, status_of
from mpsd.proxy.http_rules import Limits

DEFAULTS = Limits()
BODY = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n"


def decode(data: bytes, *, cuts: list[int] | None = None,
           limits: Limits = DEFAULTS, max_body: int = 1 << 30) -> tuple[bytes, int]:
    """Feed ``data`` in pieces cut at ``cuts``; the payload and the end index in ``data``."""
    decoder = ChunkedDecoder(limits, max_body)
    out: list[bytes] = []
    at = 0
    for cut in [*(cuts or []), len(data)]:
        end = decoder.feed(data[at:cut], out)
        if end >= 0:
            return b"".join(out), at + end
        at = cut
    return b"".join(out), -1


class TestChunkedDecoder:
    def test_whole_body_in_one_read(self) -> None:
        assert decode(BODY + b"NEXT") == (b"Wikipedia in\r\n\r\nchunks.", len(BODY))

    def test_every_split_point_gives_the_same_result(self) -> None:
        for cut in range(1, len(BODY)):
            assert decode(BODY, cuts=[cut]) == (b"Wikipedia in\r\n\r\nchunks.", len(BODY)), cut
        assert decode(BODY, cuts=list(range(1, len(BODY)))) == (
            b"Wikipedia in\r\n\r\nchunks.", len(BODY))

    def test_passthrough_scan_finds_the_end_without_collecting(self) -> None:
        decoder = ChunkedDecoder(Limits(), 1 << 30)
        assert decoder.feed(BODY[:10]) == -1
        assert not decoder.at_boundary
        assert decoder.feed(BODY[10:] + b"rest") == len(BODY) - 10

    @pytest.mark.parametrize("line", [b"0x3", b"+3", b"1_0", b" 3", b"-0", b"", b"g",
                                      b"3 ;x", b"11111111111111111"])
    def test_chunk_sizes_python_would_take_are_refused(self, line: bytes) -> None:
        assert chunk_size(line) == -1
        with pytest.raises(FramingError):
            decode(line + b"\r\nabc\r\n0\r\n\r\n")

    @pytest.mark.parametrize(("line", "size"), [(b"a", 10), (b"00F", 15), (b"3;name=v", 3),
                                                 (b"3 ", 3), (b"3;a=\"b c\"", 3)])
    def test_chunk_sizes_accepted(self, line: bytes, size: int) -> None:
        assert chunk_size(line) == size

    def test_data_must_end_with_crlf(self) -> None:
        with pytest.raises(FramingError):
            decode(b"3\r\nabcX\r\n0\r\n\r\n")
        with pytest.raises(FramingError):
            decode(b"3\r\nabc\rX0\r\n\r\n", cuts=[7])

    def test_trailers_are_bounded_in_size_and_count(self) -> None:
        limits = Limits(max_trailer_bytes=100, max_trailers=3)
        assert decode(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", limits=limits)[1] > 0
        with pytest.raises(FramingError) as info:
            decode(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", limits=limits)
        assert info.value.status == 431
        with pytest.raises(FramingError):  # one endless trailer line, never a CRLF
            decode(b"0\r\nA: " + b"x" * 200, limits=limits, cuts=[10, 50, 100])
        with pytest.raises(FramingError):
            decode(b"0\r\nnot a field\r\n\r\n")

    def test_body_limit_is_checked_at_the_size_line(self) -> None:
        with pytest.raises(FramingError) as info:
            decode(b"10\r\n", max_body=15)
        assert info.value.status == 413

    def test_many_tiny_chunks_decode_in_linear_time(self) -> None:
        """160k chunks once took 72 s (``bytes +=``); linear decoding takes well under 1 s."""
        body = b"10\r\n0123456789abcdef\r\n" * 160_000 + b"0\r\n\r\n"
        started = time.perf_counter()
        payload, end = decode(body, cuts=list(range(65536, len(body), 65536)))
        assert end == len(body) and len(payload) == 16 * 160_000
        assert time.perf_counter() - started < 5  # a bound, not a benchmark


def response(head: bytes) -> ResponseHead:
    return ResponseHead(head, status_of(head))


class TestRelayedReads:
    """The engine side's reads, one chunk each (SSE events): sizes are remembered, not trusted."""

    def test_one_chunk_per_read(self) -> None:
        decoder = ChunkedDecoder(Limits(), 1 << 62)
        for _ in range(2):  # the second time, the size lines are known
            assert decoder.feed(b"3\r\nabc\r\n") == -1
            assert decoder.feed(b"3;n=v\r\nabc\r\n") == -1
        assert decoder.total == 12
        assert decoder.feed(b"0\r\n\r\n") == 5

    def test_a_known_size_line_still_needs_its_data_and_crlf(self) -> None:
        ChunkedDecoder(Limits(), 1 << 62).feed(b"3\r\nabc\r\n")
        with pytest.raises(FramingError):
            ChunkedDecoder(Limits(), 1 << 62).feed(b"3\r\nabcX\r\n")
        decoder = ChunkedDecoder(Limits(), 1 << 62)
        assert decoder.feed(b"3\r\nab") == -1  # split: the general path takes it
        assert decoder.feed(b"c\r\n0\r\n\r\n") == 8
        with pytest.raises(FramingError):
            ChunkedDecoder(Limits(), 1 << 62).feed(b"0x3\r\nabc\r\n")


class TestResponseHead:
    """An engine's head, read by one scan: what makes the relay forward it verbatim or not."""

    def test_a_plain_json_head_is_forwarded_verbatim(self) -> None:
        head = response(b"HTTP/1.1 200 OK\r\ndate: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 12")
        assert (head.status, head.http11, head.length, head.chunked) == (200, True, 12, False)
        assert not head.close and not head.hop_by_hop and not head.sse

    def test_a_chunked_stream_is_not_rebuilt_for_its_transfer_encoding(self) -> None:
        head = response(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                        b"Transfer-Encoding:  Chunked ")
        assert head.chunked and head.sse and not head.hop_by_hop and head.length is None

    def test_hop_by_hop_fields_and_close(self) -> None:
        for field in (b"Connection: close", b"Keep-Alive: timeout=5", b"TE: trailers",
                      b"Trailer: x", b"Upgrade: h2c", b"Proxy-Authenticate: Basic"):
            head = response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + field)
            assert head.hop_by_hop, field
            assert head.close == field.startswith(b"Connection"), field
        assert not response(b"HTTP/1.1 200 OK\r\nx-te: 1\r\nconnectionx: close").hop_by_hop
        assert response(b"HTTP/1.0 200 OK\r\ncontent-length: 0").close

    def test_the_first_content_length_counts_and_must_be_digits(self) -> None:
        assert response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 7").length == 5
        for bad in (b"+5", b"0x5", b"5 5", b"\xd9\xa3"):
            with pytest.raises(ValueError):
                response(b"HTTP/1.1 200 OK\r\ncontent-length: " + bad)
        with pytest.raises(ValueError):
            response(b"ICY 200 OK\r\ncontent-length: 1")
