"""The errors mpsd itself answers, in the shape OpenAI clients and vLLM users expect.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP
status, exactly the shape vLLM uses for its own errors (vllm.md §4, §10), so a client sees one
shape whether the engine or mpsd refused the request. ``type`` names follow the OpenAI SDK's
exception classes where one exists. In the middle of an SSE stream (the status line is gone) the
same object travels as one ``data:`` event, the way vLLM reports an engine failure mid-stream.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpsd.proxy.framing import Request
    from mpsd.proxy.front import FrontConnection

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    417: "ExpectationFailedError",
    431: "RequestHeaderFieldsTooLargeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
    505: "HTTPVersionNotSupportedError",
}


# the ``reason`` label of mpsd_proxy_rejected_requests_total, per status the front door answers
_REJECTED = {
    400: "malformed", 401: "unauthorized", 405: "method", 408: "timeout", 413: "body_too_large",
    417: "expectation", 431: "head_too_large", 501: "not_implemented", 503: "overloaded",
    505: "http_version",
}


def rejection_reason(status: int) -> str:
    """Why the front door refused a request, as a short metrics label."""
    return _REJECTED.get(status, "other")


def error_type(status: int) -> str:
    return _TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """The JSON body of an error mpsd answers with ``status``."""
    return json.dumps(
        {"error": {"message": message, "type": error_type(status), "param": param,
                   "code": status}},
        separators=(",", ":"),
    ).encode()


def sse_error_event(status: int, message: str) -> bytes:
    """An SSE event carrying the error, then ``[DONE]``, for a stream cut after its head."""
    return b"data: " + error_body(status, message) + b"\n\ndata: [DONE]\n\n"


def reason(status: int) -> bytes:
    """The reason phrase of ``status`` (cached: every local answer needs one)."""
    phrase = _REASONS.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
        _REASONS[status] = phrase
    return phrase


_REASONS: dict[int, bytes] = {}


def reply(conn: FrontConnection, request: Request, status: int, message: str, *,
          param: str | None = None, extra: bytes = b"", finish: bool = True) -> None:
    """Answer ``request`` on ``conn`` with mpsd's own error (``extra``: whole header lines)."""
    conn.respond(status, error_body(status, message, param), keep_alive=request.keep_alive,
                 extra=extra, head_only=request.method == b"HEAD", finish=finish)
