"""What every HTTP parser of the proxy shares: the limits, the error a broken rule raises, and
RFC 9110 field-name tokens (with their lower case remembered, since clients send few names).

Pure, no I/O: :mod:`mpsd.proxy.framing` (requests, response heads) and :mod:`mpsd.proxy.chunked`
(bodies) both build on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# header names already found to be tokens, to their lower case (bounded below)
KNOWN_NAMES: dict[bytes, bytes] = {}


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


def lower_name(name: bytes) -> bytes | None:
    """A header name in lower case; None if it is not a token."""
    lname = KNOWN_NAMES.get(name)
    if lname is not None:
        return lname
    if TOKEN.fullmatch(name) is None:
        return None
    lname = name.lower()
    if len(KNOWN_NAMES) < 1024:  # clients send the same few names: remember them
        KNOWN_NAMES[name] = lname
    return lname


DEFAULT_LIMITS = Limits()
