"""HTTP/1.1 framing for the proxy, with no I/O: request heads and bodies, response heads.

Everything here works on bytes the caller already has, so it is tested alone (the corpus and the
h11-oracle property test in tests/unit/proxy) and shared by both sides of the proxy: the client
side (:mod:`mpsd.proxy.front`) reads requests with :class:`RequestParser`, and the engine side
(:mod:`mpsd.proxy.relay`) finds where a chunked response ends with the same
:class:`~mpsd.proxy.chunked.ChunkedDecoder` (:mod:`mpsd.proxy.chunked`) the client side decodes
request bodies with; the limits and field-name rules both use live in :mod:`mpsd.proxy.http_rules`.

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

from mpsd.proxy.chunked import ChunkedDecoder
from mpsd.proxy.http_rules import DEFAULT_LIMITS, KNOWN_NAMES, TOKEN, HttpError, Limits, lower_name

# Hop-by-hop request headers: never forwarded to an engine (RFC 9110 §7.6.1), plus the ones
# mpsd rewrites itself (host, content-length) and expect (answered here).
_HOP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"host", b"content-length", b"expect", b"proxy-authorization",
})
_METHODS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
_ABSOLUTE = re.compile(rb"(?i)https?://[^/?#]+")
# every byte but the control bytes (HTAB allowed): deleted from a head, what is left must be
# its CRLFs and nothing else (no other control byte, no bare CR or LF), in one C-level pass
_PLAIN = bytes([0x09, *range(0x20, 0x7f), *range(0x80, 0x100)])
# single bytes looked for as ints: on Python 3.11 ``b"#" in data`` first tries the needle as an
# int and raises and clears a TypeError (~150 ns); ``35 in data`` is a plain memchr
_TAB, _HASH, _DOT, _BACKSLASH = b"\t#.\\"


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


def parse_head(head: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
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
        lname = KNOWN_NAMES.get(name)
        if lname is None or not sep:
            lname = lower_name(name) if sep else None
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
            or (parts[0] not in _METHODS and not TOKEN.fullmatch(parts[0]))):
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
