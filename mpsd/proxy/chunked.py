"""The one chunked-coding decoder of the proxy, for request bodies and engine responses alike.

Strict where laxness lets a body be read two ways: chunk sizes are plain hex digits (``0x3``,
``+3``, ``1_0``, `` 3`` are what Python's ``int(x, 16)`` would take), the CRLF after each chunk's
data is checked, trailers are bounded in size and count and their names must be tokens. Bodies
are gathered in linear time whatever their chunking. Pure, no I/O.
"""

from __future__ import annotations

import enum
import re

from mpsd.proxy.http_rules import HttpError, Limits, lower_name

# control bytes other than HTAB, CR and LF (CR and LF are checked as line ends)
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_HEXDIGITS = b"0123456789abcdefABCDEF"

_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\t\x20-\x7e\x80-\xff]*)?[ \t]*")

MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions

# plain chunk-size lines already read, to their size: an engine's SSE events come in a few sizes,
# and a dict lookup is a third of checking and converting the hex digits (bounded below)
_SIZE_LINES: dict[bytes, int] = {}


def chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions allowed); -1 if it is not one.

    Plain hex digits only: ``int(x, 16)`` alone would also take ``0x3``, ``+3``, ``1_0`` and
    surrounding whitespace, which other parsers on the path read differently.
    """
    if 0 < len(line) <= 16 and not line.translate(None, _HEXDIGITS):
        return int(line, 16)
    match = _CHUNK_LINE.fullmatch(line)
    return int(match.group(1), 16) if match is not None else -1


class FramingError(HttpError):
    """The chunked framing is broken (or over a limit): nothing after it can be trusted."""


class Chunk(enum.IntEnum):
    """Where a :class:`ChunkedDecoder` is in a chunked body."""

    SIZE = 0      # at a chunk-size line
    DATA = 1      # inside a chunk's data
    DATA_END = 2  # at the CRLF that ends a chunk's data
    TRAILER = 3   # in the trailer section (after the last chunk)
    DONE = 4

# module-level names: an enum member looked up on its class costs ~65 ns, per relayed read
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = Chunk


class ChunkedDecoder:
    """An incremental chunked-coding decoder, for request bodies and engine responses alike.

    :meth:`feed` takes the bytes as they arrive, appends the chunk payloads to ``out`` when the
    caller wants them (a request body, an HTTP/1.0 client's response) and says where the body
    ended. The work is linear in the bytes fed: a chunk-size line split across reads is the only
    thing kept back, and it is bounded like the trailer section.
    """

    __slots__ = ("_partial", "_trailer_bytes", "_trailers", "left", "limits", "max_body",
                 "state", "total")

    def __init__(self, limits: Limits, max_body: int) -> None:
        self.limits = limits
        self.max_body = max_body
        self.state = Chunk.SIZE
        self.left = 0  # data bytes still to come in the current chunk
        self.total = 0  # payload bytes so far
        self._partial = b""
        self._trailer_bytes = 0
        self._trailers = 0

    @property
    def at_boundary(self) -> bool:
        """Between two chunks (where an SSE stream can be ended cleanly)."""
        return self.state == Chunk.SIZE and not self._partial

    def feed(self, data: bytes, out: list[bytes] | None = None) -> int:
        """Advance over ``data``; return the index just past the body's end, else -1.

        Raises :class:`FramingError` on malformed framing or a body over ``max_body``.
        """
        # One loop over the decoder's states, kept whole on purpose (longer than ~60 lines): it
        # is the hot path of every chunked body, and a call per state would cost per chunk.
        if out is None and self.state == _SIZE and not self._partial:
            # the hot path of a relayed stream: one read is exactly one chunk (an SSE event)
            nl = data.find(b"\r\n", 0, 18)
            if nl > 0:
                line = data[:nl]
                size = _SIZE_LINES.get(line, -1)
                if size < 0:
                    size = chunk_size(line)
                    if size > 0 and len(_SIZE_LINES) < 4096:
                        _SIZE_LINES[line] = size
                if size > 0 and len(data) == nl + size + 4 and data.endswith(b"\r\n"):
                    self.total += size
                    if self.total > self.max_body:
                        raise FramingError(413, f"the body exceeds {self.max_body} bytes")
                    return -1
        offset = len(self._partial)
        buf = self._partial + data if offset else data
        pos, n, state, left = 0, len(buf), self.state, self.left
        while True:
            if state == _DATA:
                if n - pos < left:
                    if out is not None and n > pos:
                        out.append(buf[pos:] if pos else buf)
                    self.left, self.state, self._partial = left - (n - pos), state, b""
                    return -1
                if out is not None:
                    out.append(buf[pos:pos + left])
                pos += left
                left = 0
                state = _DATA_END
            if state == _DATA_END:
                if not buf.startswith(b"\r\n", pos):
                    if n - pos >= 2 or not b"\r".startswith(buf[pos:]):
                        raise FramingError(400, "chunk data not followed by CRLF")
                    self._keep(buf, pos, state)
                    return -1
                pos += 2
                state = _SIZE
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                self._keep(buf, pos, state)
                return -1
            if state == _SIZE:
                size = chunk_size(buf[pos:nl])
                if size < 0:
                    raise FramingError(400, "malformed chunk-size line")
                pos = nl + 2
                if size == 0:
                    state = _TRAILER
                    continue
                self.total += size
                if self.total > self.max_body:
                    raise FramingError(413, f"the body exceeds {self.max_body} bytes")
                state, left = _DATA, size
            elif state == _TRAILER:
                if nl == pos:
                    self.state, self._partial = _DONE, b""
                    return nl + 2 - offset
                self._trailer_line(buf[pos:nl])
                pos = nl + 2
            else:
                raise FramingError(400, "bytes after the end of a chunked body")

    def _keep(self, buf: bytes, pos: int, state: Chunk) -> None:
        """Keep an incomplete line for the next read (bounded: a line is never that long)."""
        rest = buf[pos:]
        limit = self.limits.max_trailer_bytes if state == Chunk.TRAILER else MAX_CHUNK_LINE_BYTES
        if len(rest) > limit:
            raise FramingError(400 if state != Chunk.TRAILER else 431,
                               "a chunk-size or trailer line is too long")
        self._partial = bytes(rest)
        self.state, self.left = state, 0

    def _trailer_line(self, line: bytes) -> None:
        self._trailers += 1
        self._trailer_bytes += len(line) + 2
        if (self._trailers > self.limits.max_trailers
                or self._trailer_bytes > self.limits.max_trailer_bytes):
            raise FramingError(431, "the trailer section is over its limits "
                                    f"({self.limits.max_trailers} fields, "
                                    f"{self.limits.max_trailer_bytes} bytes)")
        name, sep, _ = line.partition(b":")
        if not sep or lower_name(name) is None or _CTL.search(line) or b"\r" in line:
            raise FramingError(400, "malformed trailer field")
