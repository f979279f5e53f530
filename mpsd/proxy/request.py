"""Per-request decisions of the proxy that need no I/O: keys, model, the engine's request."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Generator
from pathlib import Path

from mpsd.errors import ConfigError
from mpsd.proxy.framing import Request

_WS = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_CONTENT = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')  # a string's inside, up to its quote
_SCALAR = re.compile(rb"[^,}\]\s]*")
# strings and other bytes up to the next bracket: one C-level match per bracket skipped
_RUN = re.compile(rb'[^"{}\[\]]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"{}\[\]]*)*')
_FIRST_MODEL = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"model"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')
SMALL_BODY = 1 << 16  # bodies the json module parses in well under a millisecond
_WINDOW = 1 << 16  # bytes one regex call may look at (~0.1 ms): a 32 MiB string is many calls
_STEP = 256  # brackets (or windows) between two yields of the scan

ModelScan = Generator[None, None, "str | None"]
_Span = Generator[None, None, int]


def load_api_keys(path: str) -> tuple[bytes, ...] | None:
    """Keys from ``api_keys_file`` (one per line, ``#`` comments); ``None`` when auth is off."""
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "proxy.api_keys_file", f"cannot read it ({exc.strerror})",
                          "make the file readable by mpsd, or set api_keys_file = \"\"") from None
    keys = [line.strip() for line in text.splitlines()]
    return tuple(k.encode() for k in keys if k and not k.startswith("#"))


def model_scan(body: bytes) -> ModelScan:
    """Find the top-level ``model`` of a JSON body, yielding after every bounded piece of work.

    A scan of the top-level object only: nested values are skipped by counting brackets (no
    recursion, so no depth limit to hit), and a ``"model"`` inside them is never taken for the
    body's. No regex call looks at more than :data:`_WINDOW` bytes, so a huge string or a run of
    brackets is many small steps. ``None`` for no top-level string ``model`` or a body that is
    not a JSON object (the engine then answers the 400). The caller runs it in slices
    (:func:`run_scan`), so a 32 MiB body never holds the event loop.
    """
    pos = yield from _span(_WS, body, 0)
    if body[pos:pos + 1] != b"{":
        return None
    pos += 1
    while True:
        start = yield from _span(_WS, body, pos)
        pos = yield from _string(body, start)
        if pos < 0:
            return None
        name = body[start:pos] if pos - start < 64 else b""
        pos = yield from _span(_WS, body, pos)
        if body[pos:pos + 1] != b":":
            return None
        pos = yield from _span(_WS, body, pos + 1)
        first = body[pos:pos + 1]
        if first == b'"':
            value_at = pos
            pos = yield from _string(body, pos)
            if pos < 0:
                return None
            if name == b'"model"' or (b"\\" in name and _text(name) == "model"):
                return _text(body[value_at:pos])
        elif first in (b"{", b"["):
            pos = yield from _nested(body, pos)
            if pos < 0:
                return None
        else:
            pos = yield from _span(_SCALAR, body, pos)
        pos = yield from _span(_WS, body, pos)
        if body[pos:pos + 1] != b",":
            return None
        pos += 1


def _span(pattern: re.Pattern[bytes], body: bytes, pos: int) -> _Span:
    """Where ``pattern`` (one that cannot fail) stops matching from ``pos``, a window at a time."""
    n = len(body)
    while True:
        end = min(pos + _WINDOW, n)
        stop = pattern.match(body, pos, end).end()  # type: ignore[union-attr]
        if stop < end or end == n:
            return stop
        pos = stop
        yield


def _string(body: bytes, pos: int) -> _Span:
    """The index just past the JSON string at ``pos``; -1 if there is none."""
    match = _STRING.match(body, pos, pos + _WINDOW)
    if match is not None:
        return match.end()
    if body[pos:pos + 1] != b'"':
        return -1
    pos += 1
    while True:
        pos = yield from _span(_CONTENT, body, pos)
        if body[pos:pos + 1] == b'"':
            return pos + 1
        if body[pos:pos + 1] != b"\\" or pos + 2 > len(body):
            return -1  # the body ended inside the string
        pos += 2  # an escape the window cut in two


def _nested(body: bytes, pos: int) -> _Span:
    """The index just past the object or array at ``pos``, by counting brackets."""
    depth = 0
    steps = 0
    n = len(body)
    while True:
        char = body[pos:pos + 1]
        if char in (b"{", b"["):
            depth += 1
            pos += 1
        elif char in (b"}", b"]"):
            depth -= 1
            pos += 1
            if depth == 0:
                return pos
        elif char == b'"':  # a string longer than a window
            pos = yield from _string(body, pos)
            if pos < 0:
                return -1
        elif pos >= n:
            return -1
        pos = _RUN.match(body, pos, min(pos + _WINDOW, n)).end()  # type: ignore[union-attr]
        steps += 1
        if steps % _STEP == 0:
            yield


def run_scan(scan: ModelScan, slices: int) -> tuple[bool, str | None]:
    """Advance ``scan`` by at most ``slices`` yields: ``(done, model)``."""
    try:
        for _ in range(slices):
            next(scan)
    except StopIteration as stop:
        return True, stop.value
    return False, None


def model_of(body: bytes) -> str | None:
    """The top-level ``model`` of a body of at most :data:`SMALL_BODY` bytes (larger ones:
    :func:`model_scan`), or of any body when blocking does not matter (tests, tools)."""
    first = _FIRST_MODEL.match(body)  # '{"model": "x", ...': the first key is top-level
    if first is not None:
        return first.group(1).decode("utf-8", "replace")
    if len(body) <= SMALL_BODY:  # the json module is quicker here, and bounded
        try:
            return _model_parsed(json.loads(body))
        except ValueError:
            return None
        except RecursionError:
            pass  # deeply nested: the scan has no depth limit
    return run_scan(model_scan(body), 1 << 62)[1]


def _model_parsed(doc: object) -> str | None:
    value = doc.get("model") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _text(token: bytes) -> str | None:
    """A JSON string token's text (escapes are rare: only then the json module)."""
    if b"\\" not in token:
        return token[1:-1].decode("utf-8", "replace")
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def authorized(keys: tuple[bytes, ...], header: bytes) -> bool:
    """``Authorization: Bearer <key>`` against every key, in constant time (no early exit)."""
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key, token)
    return ok and scheme.lower() == b"bearer"


def upstream_request(request: Request, host: bytes) -> tuple[bytes, bytes]:
    """The request as the engine gets it: end-to-end headers verbatim, body re-framed.

    ``(data, rest)``: a body up to :data:`SMALL_BODY` travels in ``data`` (one write); a larger
    one is ``rest``, written on its own rather than copied once more into a joined buffer.
    """
    body = request.body
    sized = body or request.content_length is not None or request.chunked
    headers = b"\r\n".join(request.forward)
    joined = len(body) <= SMALL_BODY
    data = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s%s%s" % (
        request.method, request.target, host, headers, b"\r\n" if headers else b"",
        b"content-length: %d\r\n\r\n" % len(body) if sized else b"\r\n",
        body if joined else b"")
    return data, b"" if joined else body
