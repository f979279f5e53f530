"""Per-request decisions of the proxy that need no I/O: keys, model, the engine's request."""

from __future__ import annotations

import hmac
import json
import re
from pathlib import Path

from mpsd.errors import ConfigError
from mpsd.proxy.front import Request

_MODEL_KEY = b'"model"'
_MODEL_VALUE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


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


def model_of(body: bytes) -> str | None:
    """The top-level ``model`` of a JSON body, without parsing all of it when that is safe.

    One ``"model": "..."`` occurrence is read in place (a prompt's own quotes are escaped, so
    they cannot match); anything else — several occurrences, a non-string value — is decided by
    ``json.loads``. Unparseable bodies give ``None`` (the engine then answers the 400).
    """
    count = body.count(_MODEL_KEY)
    if count == 0:
        return None
    if count == 1:
        match = _MODEL_VALUE.match(body, body.find(_MODEL_KEY))
        if match is not None:
            raw = match.group(1)
            if b"\\" not in raw:
                return raw.decode("utf-8", "replace")
    return _model_parsed(body)


def _model_parsed(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    value = doc.get("model") if isinstance(doc, dict) else None
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
