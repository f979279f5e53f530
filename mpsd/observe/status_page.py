"""``GET /mpsd/``: a one-file status page over ``/mpsd/status`` for an operator's browser
(``GET /mpsd``, as people type it, redirects there).

Self-contained on purpose: mpsd runs on GPU hosts that often reach no CDN, and a page with no
external assets, no build step and no framework keeps working (and reviewable) as one string.
The page polls the JSON every 2 s and renders it with ``textContent`` only, because fault
reasons carry raw log lines that must never be interpreted as HTML. Fields the JSON does not
have (older or newer daemons) are shown as a dash or left out, never an error.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PAGE = resources.files(__package__).joinpath("status_page.html").read_text(encoding="utf-8")

_BODY = PAGE.encode()
_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    # Inline script and style only, fetches to this origin only: nothing else can load.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
}


async def status_page_handler(request: web.BaseRequest) -> web.Response:
    """Serve the page (register it on ``GET /mpsd/``; it fetches ``/mpsd/status`` itself)."""
    return web.Response(body=_BODY, headers=_HEADERS)


async def status_page_redirect(request: web.BaseRequest) -> web.Response:
    """``GET /mpsd`` → ``/mpsd/``. The location is relative (``mpsd/``) so that it stays right
    behind a reverse proxy that mounts mpsd under a prefix."""
    return web.Response(status=308, headers={"Location": "mpsd/", "Cache-Control": "no-store"})
