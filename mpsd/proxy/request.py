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
_SCALAR = re.compile(rb"[^,}\]\s]*")
# strings and other bytes up to the next bracket: one C-level match per bracket skipped
_RUN = re.compile(rb'[^"{}\[\]]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"{}\[\]]*)*')
_STEP = 256  # brackets skipped between two yields of the scan (~50 µs of work)

ModelScan = Generator[None, None, "str | None"]


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
    """Find the top-level ``model`` of a JSON body, yielding every :data:`_STEP` brackets.

    A scan of the top-level object only: nested values are skipped by counting brackets (no
    recursion, so no depth limit to hit), and a ``"model"`` inside them is never taken for the
    body's. ``None`` for no top-level string ``model`` or a body that is not a JSON object (the
    engine then answers the 400). The caller runs it in bounded slices (:func:`run_scan`), so a
    32 MiB body never holds the event loop.
    """
    pos = _WS.match(body).end()  # type: ignore[union-attr]
    if body[pos:pos + 1] != b"{":
        return None
    pos += 1
    while True:
        key = _STRING.match(body, _WS.match(body, pos).end())  # type: ignore[union-attr]
        if key is None:
            return None
        pos = _WS.match(body, key.end()).end()  # type: ignore[union-attr]
        if body[pos:pos + 1] != b":":
            return None
        pos = _WS.match(body, pos + 1).end()  # type: ignore[union-attr]
        first = body[pos:pos + 1]
        if first == b'"':
            value = _STRING.match(body, pos)
            if value is None:
                return None
            name = key.group()
            if name == b'"model"' or (b"\\" in name and _text(name) == "model"):
                return _text(value.group())
            pos = value.end()
        elif first in (b"{", b"["):
            depth = 0
            steps = 0
            while True:
                bracket = body[pos:pos + 1]
                if bracket in (b"{", b"["):
                    depth += 1
                elif bracket in (b"}", b"]"):
                    depth -= 1
                else:  # the end of the body, or an unterminated string
                    return None
                pos += 1
                if depth == 0:
                    break
                pos = _RUN.match(body, pos).end()  # type: ignore[union-attr]
                steps += 1
                if steps % _STEP == 0:
                    yield
        else:
            pos = _SCALAR.match(body, pos).end()  # type: ignore[union-attr]
        pos = _WS.match(body, pos).end()  # type: ignore[union-attr]
        if body[pos:pos + 1] != b",":
            return None
        pos += 1


def run_scan(scan: ModelScan, slices: int) -> tuple[bool, str | None]:
    """Advance ``scan`` by at most ``slices`` yields: ``(done, model)``."""
    try:
        for _ in range(slices):
            next(scan)
    except StopIteration as stop:
        return True, stop.value
    return False, None


def model_of(body: bytes) -> str | None:
    """The top-level ``model`` of a JSON body, scanned to the end in one go (tests, tools)."""
    return run_scan(model_scan(body), 1 << 62)[1]


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


def upstream_request(request: Request, host: bytes) -> bytes:
    """The request as the engine gets it: end-to-end headers verbatim, body re-framed."""
    body = request.body
    sized = body or request.content_length is not None or request.chunked
    headers = b"\r\n".join(request.forward)
    return b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s%s%s" % (
        request.method, request.target, host, headers, b"\r\n" if headers else b"",
        b"content-length: %d\r\n\r\n" % len(body) if sized else b"\r\n", body)
