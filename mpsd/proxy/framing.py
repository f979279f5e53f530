"""HTTP/1.1 framing for the proxy, with no I/O: request heads, bodies, chunked coding, trailers.

Everything here works on bytes the caller already has, so it is tested alone (the corpus and the
h11-oracle property test in tests/unit/proxy) and shared by both sides of the proxy: the client
side (:mod:`mpsd.proxy.front`) reads requests with :class:`RequestParser`, and the engine side
(:mod:`mpsd.proxy.relay`) finds where a chunked response ends with the same
:class:`ChunkedDecoder` the client side decodes request bodies with.

Strict where laxness lets a request be read two ways (request smuggling towards the engines):
bare CR, LF or NUL and other control bytes in the head, obs-fold, header names that are not
RFC 9110 tokens, Content-Length together with Transfer-Encoding, two different Content-Lengths,
transfer codings other than ``chunked``, chunk sizes that are not plain hex digits (``0x3``,
``+3``, ``1_0``, `` 3`` are what Python's ``int(x, 16)`` would take). Every size is bounded by a
:class:`Limits` value, and bodies are gathered in linear time whatever their chunking.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# Hop-by-hop request headers: never forwarded to an engine (RFC 9110 §7.6.1), plus the ones
# mpsd rewrites itself (host, content-length) and expect (answered here).
_HOP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"host", b"content-length", b"expect", b"proxy-authorization",
})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# control bytes other than HTAB, CR and LF (CR and LF are checked as line ends)
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_METHODS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
_ABSOLUTE = re.compile(rb"(?i)https?://[^/?#]+")
_HEXDIGITS = b"0123456789abcdefABCDEF"
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\t\x20-\x7e\x80-\xff]*)?[ \t]*")
# every byte but the control bytes (HTAB allowed): deleted from a head, what is left must be
# its CRLFs and nothing else (no other control byte, no bare CR or LF), in one C-level pass
_PLAIN = bytes([0x09, *range(0x20, 0x7f), *range(0x80, 0x100)])
# header names already found to be tokens, to their lower case (bounded below)
_KNOWN_NAMES: dict[bytes, bytes] = {}
# single bytes looked for as ints: on Python 3.11 ``b"#" in data`` first tries the needle as an
# int and raises and clears a TypeError (~150 ns); ``35 in data`` is a plain memchr
_TAB, _HASH, _DOT, _BACKSLASH = b"\t#.\\"
MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions
# plain chunk-size lines already read, to their size: an engine's SSE events come in a few sizes,
# and a dict lookup is a third of checking and converting the hex digits (bounded below)
_SIZE_LINES: dict[bytes, int] = {}


class HttpError(Exception):
    """A request that cannot be served: answered with ``status``; the connection is closed,
    since what follows on it can no longer be framed with confidence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may take; the defaults are ProxyConfig's (see etc/mpsd/mpsd.toml)."""

    max_request_line_bytes: int = 8192
    max_header_line_bytes: int = 16384
    max_head_bytes: int = 65536
    max_headers: int = 100
    max_body_bytes: int = 32 * 1024 * 1024
    max_trailer_bytes: int = 8192
    max_trailers: int = 32


class Request:
    """One parsed request. ``forward`` holds the end-to-end header lines, verbatim;
    ``target`` is in origin form (an absolute-form target is reduced to its path and query)."""

    __slots__ = ("authorization", "body", "chunked", "content_length", "expect_continue",
                 "forward", "http11", "keep_alive", "method", "path", "target")

    def __init__(self, method: bytes, target: bytes, http11: bool) -> None:
        self.method = method
        self.target = target
        self.path = target.partition(b"?")[0]
        self.http11 = http11
        self.keep_alive = http11
        self.forward: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.authorization = b""
        self.body = b""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def parse_head(head: bytes, limits: Limits = Limits()) -> Request:
    """Parse a request head (without the blank line); raise :class:`HttpError` if malformed."""
    lines = head.split(b"\r\n")
    if len(head.translate(None, _PLAIN)) != 2 * (len(lines) - 1):
        raise HttpError(400, "bare CR or LF, or a control byte, in the request head")
    request = _request_line(lines[0], limits)
    if len(lines) - 1 > limits.max_headers:
        raise HttpError(431, f"more than {limits.max_headers} header lines")
    forward = request.forward
    connection = b""
    hosts = 0
    long_lines = len(head) > limits.max_header_line_bytes
    for line in lines[1:]:
        if long_lines and len(line) > limits.max_header_line_bytes:
            raise HttpError(431, f"a header line is longer than {limits.max_header_line_bytes} "
                                 "bytes")
        name, sep, value = line.partition(b":")
        lname = _KNOWN_NAMES.get(name)
        if lname is None or not sep:
            lname = _lower_name(name) if sep else None
            if lname is None:
                raise HttpError(400, "malformed header line (the name must be a token, then "
                                     "':')")
        if lname not in _HOP_REQUEST:
            forward.append(line)
            if lname == b"authorization":
                request.authorization = value.strip(b" \t")
            continue
        value = value.strip(b" \t")
        if lname == b"content-length":
            _content_length(request, value)
        elif lname == b"transfer-encoding":
            if value.lower() != b"chunked" or request.chunked:
                raise HttpError(501, "only Transfer-Encoding: chunked is supported")
            request.chunked = True
        elif lname == b"connection":
            connection += b"," + value.lower()
        elif lname == b"host":
            hosts += 1
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise HttpError(417, "only Expect: 100-continue is supported")
            request.expect_continue = True
    if request.chunked and request.content_length is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if hosts > 1 or (hosts == 0 and request.http11):
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
    if connection:
        _connection_options(request, connection)
    return request


def _request_line(line: bytes, limits: Limits) -> Request:
    if len(line) > limits.max_request_line_bytes:
        raise HttpError(431, f"the request line is longer than {limits.max_request_line_bytes} "
                             "bytes")
    parts = line.split(b" ")
    # (control bytes other than HTAB were refused for the whole head already)
    if (len(parts) != 3 or not parts[1] or _TAB in parts[1]
            or (parts[0] not in _METHODS and not _TOKEN.fullmatch(parts[0]))):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        http11 = True
    elif version == b"HTTP/1.0":
        http11 = False
    else:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not target.startswith(b"/"):  # absolute form: a server must accept it (RFC 9112 §3.2.2)
        authority = _ABSOLUTE.match(target)
        if authority is None:
            raise HttpError(400, "the request target must be a path or an absolute http URL")
        target = target[authority.end():]
        target = target if target.startswith(b"/") else b"/" + target
    request = Request(method, target, http11)
    path = request.path
    if (_DOT in path and path.find(b"/..") >= 0) or _BACKSLASH in path or _HASH in target:
        raise HttpError(400, "the request target must be an absolute path without '..'")
    return request


def _lower_name(name: bytes) -> bytes | None:
    """A header name in lower case; None if it is not a token."""
    lname = _KNOWN_NAMES.get(name)
    if lname is not None:
        return lname
    if _TOKEN.fullmatch(name) is None:
        return None
    lname = name.lower()
    if len(_KNOWN_NAMES) < 1024:  # clients send the same few names: remember them
        _KNOWN_NAMES[name] = lname
    return lname


def _content_length(request: Request, value: bytes) -> None:
    if not value.isdigit() or len(value) > 18 or not value.isascii():
        raise HttpError(400, "invalid Content-Length")
    length = int(value)
    if request.content_length is not None and request.content_length != length:
        raise HttpError(400, "two different Content-Length headers")
    request.content_length = length


def _connection_options(request: Request, connection: bytes) -> None:
    tokens = {t.strip() for t in connection.split(b",") if t.strip()}
    if b"close" in tokens:
        request.keep_alive = False
    elif b"keep-alive" in tokens and not request.http11:
        request.keep_alive = True
    extra = tokens - {b"close", b"keep-alive"}
    if extra:  # headers the client marked hop-by-hop
        request.forward = [x for x in request.forward
                           if x.partition(b":")[0].lower() not in extra]


def chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions allowed); -1 if it is not one.

    Plain hex digits only: ``int(x, 16)`` alone would also take ``0x3``, ``+3``, ``1_0`` and
    surrounding whitespace, which other parsers on the path read differently.
    """
    if 0 < len(line) <= 16 and not line.translate(None, _HEXDIGITS):
        return int(line, 16)
    match = _CHUNK_LINE.fullmatch(line)
    return int(match.group(1), 16) if match is not None else -1


# Hop-by-hop response headers: dropped when a head is rebuilt for the client.
HOP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"content-length", b"proxy-authenticate",
})
# The response header fields the proxy acts on, found by one C-level scan of a lower-cased head
# (name, value); the hop-by-hop ones but transfer-encoding make the head rebuilt.
_RESPONSE_FIELDS = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|keep-alive|te|trailer|upgrade"
    rb"|proxy-[^:\r]*):([^\r]*)")


class ResponseHead:
    """What the proxy needs from an engine's response head, read without splitting it: the
    relay forwards most heads verbatim, so the usual head costs one lower-casing and one scan."""

    __slots__ = ("chunked", "close", "hop_by_hop", "http11", "length", "sse", "status")

    def __init__(self, head: bytes, status: int) -> None:
        """``status``: :func:`status_of` the head. Raise ``ValueError`` for a head that is not
        an HTTP/1.x response."""
        lower = head.lower()
        if not lower.startswith(b"http/1."):
            raise ValueError(head[:20])
        self.status = status
        self.http11 = http11 = lower.startswith(b"http/1.1 ")
        self.sse = lower.find(b"text/event-stream") >= 0  # (see _TAB)
        length = coding = connection = None
        hop_by_hop = False
        for name, value in _RESPONSE_FIELDS.findall(lower):  # the first of each one counts
            if name == b"content-length":
                length = value if length is None else length
            elif name == b"transfer-encoding":  # relayed as it is: not rebuilt for it
                coding = value if coding is None else coding
            else:
                hop_by_hop = True
                if name == b"connection" and connection is None:
                    connection = value
        self.close = not http11 or (connection is not None and connection.find(b"close") >= 0)
        self.chunked = coding is not None and coding.strip().endswith(b"chunked")
        self.hop_by_hop = hop_by_hop
        self.length = None
        if length is not None and (length := length.strip()):
            if not (length.isdigit() and length.isascii()):
                raise ValueError(length)
            self.length = int(length)


def status_of(head: bytes) -> int:
    """The status code of a response head; 0 if it has none."""
    code = head[9:12]
    return int(code) if len(code) == 3 and code.isdigit() and code.isascii() else 0


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
        if not sep or _lower_name(name) is None or _CTL.search(line) or b"\r" in line:
            raise FramingError(400, "malformed trailer field")


class Phase(enum.IntEnum):
    """Where a :class:`RequestParser` is in the current request."""

    HEAD = 0
    BODY = 1


_HEAD, _BODY = Phase  # module-level names: see _SIZE


class RequestParser:
    """Requests out of one connection's byte buffer, head first, then (when asked) the body.

    The caller decides between the two (authentication, the body limit, ``100 Continue``), so a
    refused request's body is never read. Both steps consume from the caller's ``bytearray``
    and are linear in the bytes received: the head search resumes where the last one ended and
    bodies are gathered as a list of slices, joined once.
    """

    __slots__ = ("_decoder", "_parts", "_scanned", "head_bytes", "limits", "phase", "request",
                 "started")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.phase: Phase = _HEAD
        self.request: Request | None = None
        self._scanned = 0
        # part of a request has arrived (a head is being read or a body awaited); an attribute,
        # not a property: the connection asks on every read
        self.started = False
        self.head_bytes = b""  # the last head as it came, without the blank line
        self._decoder: ChunkedDecoder | None = None
        self._parts: list[bytes] = []

    def head(self, buf: bytearray) -> Request | None:
        """The next request's head once it is complete (consumed from ``buf``), else None."""
        scanned = self._scanned
        end = buf.find(b"\r\n\r\n", scanned - 3 if scanned > 3 else 0)
        if end < 0:
            self._scanned = len(buf)
            self.started = len(buf) > 0
            if len(buf) > self.limits.max_head_bytes:
                raise HttpError(431, f"the request head is larger than "
                                     f"{self.limits.max_head_bytes} bytes")
            first = buf.find(b"\r\n", 0, self.limits.max_request_line_bytes + 2)
            if first < 0 and len(buf) > self.limits.max_request_line_bytes:
                raise HttpError(431, "the request line is longer than "
                                     f"{self.limits.max_request_line_bytes} bytes")
            return None
        if end > self.limits.max_head_bytes:
            raise HttpError(431, f"the request head is larger than "
                                 f"{self.limits.max_head_bytes} bytes")
        self.head_bytes = bytes(buf[:end])
        del buf[:end + 4]
        self._scanned = 0
        request = parse_head(self.head_bytes, self.limits)
        self.request = request
        self.phase = _BODY
        self.started = True
        if request.chunked:
            self._decoder = ChunkedDecoder(self.limits, self.limits.max_body_bytes)
        return request

    def body(self, buf: bytearray) -> bool:
        """Read the current request's body from ``buf``; True once it is complete."""
        request = self.request
        assert request is not None
        decoder = self._decoder
        if decoder is not None:
            end = decoder.feed(bytes(buf), self._parts)  # a copy: the slices outlive buf
            if end < 0:
                buf.clear()
                return False
            del buf[:end]
            request.body = b"".join(self._parts)
            self._parts = []
            self._decoder = None
        elif request.content_length:
            n = request.content_length
            if n > self.limits.max_body_bytes:  # here, not in head(): keys are checked first
                raise HttpError(413, f"the request body exceeds {self.limits.max_body_bytes} "
                                     "bytes")
            if len(buf) < n:
                return False
            if len(buf) == n:  # the usual read: this body and nothing after it
                request.body = bytes(buf)
                buf.clear()
            else:
                with memoryview(buf) as view:  # one copy of a body that may be 32 MiB
                    request.body = bytes(view[:n])
                del buf[:n]
        self.phase = _HEAD
        self.started = False
        self.request = None
        return True
