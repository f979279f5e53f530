"""The endpoints the proxy answers itself, from the pool and the daemon's status, no engine.

``/health`` is readiness (200 while the node wants new requests: an engine is routable and the
node is not leaving the rotation), ``/livez`` liveness (200 while the daemon's own tasks are
alive, a FAILED GPU included), ``/ping`` (SageMaker's), ``/mpsd/status`` the typed status
document, ``/v1/models`` the union of what the engines serve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from mpsd.pool import BackendPool
from mpsd.proxy.errors import reply
from mpsd.proxy.framing import Request
from mpsd.proxy.front import FrontConnection
from mpsd.status import DaemonStatus, ProxyStatus

PATHS = frozenset({b"/health", b"/livez", b"/ping", b"/mpsd/status"})


def method_allowed(request: Request) -> bool:
    """Whether one of :data:`PATHS` answers ``request``'s method (else 405)."""
    if request.path == b"/ping":
        return request.method in (b"GET", b"HEAD", b"POST")
    return request.method in (b"GET", b"HEAD")


class LocalEndpoints:
    """Answers :data:`PATHS` and ``/v1/models`` on the client's connection, synchronously."""

    def __init__(self, pool: BackendPool, status: Callable[[], DaemonStatus],
                 ready: Callable[[], bool], alive: Callable[[], bool]) -> None:
        self._pool = pool
        self._status = status
        self._ready = ready
        self._alive = alive
        self._created = int(time.time())

    def answer(self, conn: FrontConnection, request: Request) -> None:
        """One of :data:`PATHS`."""
        if not method_allowed(request):
            reply(conn, request, 405, "Method Not Allowed", extra=b"allow: GET, HEAD\r\n")
            return
        if request.path == b"/mpsd/status":
            body = json.dumps(self.status(), default=str).encode()
            conn.respond(200, body, keep_alive=request.keep_alive,
                         head_only=request.method == b"HEAD")
            return
        ok = self._alive() if request.path == b"/livez" else self._ready()
        conn.respond(200 if ok else 503, b"", keep_alive=request.keep_alive)

    def status(self) -> ProxyStatus:
        """What ``GET /mpsd/status`` answers: the daemon's status plus engines and in-flight."""
        return {**self._status(), "engines": self._pool.snapshot(),
                "inflight": self._pool.inflight_total(), "queued": self._pool.queued(),
                "routable": self._pool.routable_count()}

    def models(self, conn: FrontConnection, request: Request) -> None:
        """``GET /v1/models`` and ``/v1/models/{id}``."""
        cards = [{"id": m, "object": "model", "created": self._created, "owned_by": "mpsd",
                  "root": m, "parent": None} for m in self._pool.models()]
        wanted = request.path[len(b"/v1/models"):]
        if wanted in (b"", b"/"):
            doc: dict[str, Any] = {"object": "list", "data": cards}
        else:
            name = wanted[1:].decode("utf-8", "replace")
            found = [c for c in cards if c["id"] == name]
            if not found:
                reply(conn, request, 404, f"The model `{name}` does not exist.", param="model")
                return
            doc = found[0]
        conn.respond(200, json.dumps(doc).encode(), keep_alive=request.keep_alive,
                     head_only=request.method == b"HEAD")
