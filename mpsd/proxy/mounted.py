"""Routes other modules mount on the proxy's port (``/metrics``, the status page), served by
aiohttp's low-level server.

The hot path never reaches this: the front door hands a connection over only for a path it does
not answer itself, aiohttp serves that one request (``handler_cancellation=True``, no access log)
and the connection closes afterwards.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from mpsd.proxy.errors import error_body

RouteHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Route:
    __slots__ = ("auth", "handler", "method", "path", "prefix")

    def __init__(self, method: str, path: str, handler: RouteHandler, prefix: bool,
                 auth: bool) -> None:
        self.method, self.path, self.handler = method.upper(), path, handler
        self.prefix, self.auth = prefix, auth


class MountedRoutes:
    """The mounted handlers, in the order they were added; the first match serves."""

    def __init__(self, authorized: Callable[[bytes], bool]) -> None:
        self._routes: list[_Route] = []
        self._authorized = authorized

    def add(self, method: str, path: str, handler: RouteHandler, *, prefix: bool,
            auth: bool) -> None:
        self._routes.append(_Route(method, path, handler, prefix, auth))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Serve one mounted route; the connection closes after the response."""
        request.protocol.close()
        route = next((r for r in self._routes if (r.method in ("*", request.method)) and (
            request.path.startswith(r.path) if r.prefix else request.path == r.path)), None)
        if route is None:
            resp: web.StreamResponse = _error(404, f"no route for {request.path}")
        elif route.auth and not self._authorized(
                request.headers.get("Authorization", "").encode()):
            resp = _error(401, "Incorrect API key provided.")
        else:
            resp = await route.handler(request)
        if not resp.prepared:
            resp.force_close()
        return resp


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=error_body(status, message),
                        content_type="application/json")
