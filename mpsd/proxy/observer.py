"""What the proxy tells the outside about requests: one protocol, implemented by the metrics.

The proxy defines it (and never imports who implements it), so the import rules hold: the
metrics module depends on the proxy's contract, not the other way round.
"""

from __future__ import annotations

from typing import Protocol


class RequestObserver(Protocol):
    """Per-request hooks (``metrics.py`` implements them); called on the event loop.

    ``request_done`` once per request that reached the proxying stage: ``model`` is the model it
    went to (``None`` if it named none and none was chosen), ``engine`` the backend key (``None``
    if no engine was picked: 404, 503), ``code`` the status the client got — 499 when the client
    went away first, 502 when the engine broke after the head went out.
    """

    def request_done(self, model: str | None, engine: str | None, code: int, duration_s: float,
                     ttfb_s: float | None) -> None: ...

    def queue_wait(self, seconds: float) -> None: ...

    def request_rejected(self, status: int) -> None:
        """The front door refused a request itself (framing, limits, keys, timeouts)."""

    def connections_changed(self, opened: int) -> None:
        """Client connections opened (+1) or closed (-1)."""

    def connection_refused(self) -> None:
        """A client connection over ``max_client_connections`` was refused."""

    def request_retried(self, reason: str) -> None:
        """A request went to another engine (``connect``, ``reset``, ``engine_dead``, ``5xx``)."""

    def holding(self, delta: int) -> None:
        """Requests held for a model whose engines are all on their way back: +1 / -1."""

    def held(self, seconds: float, served: bool) -> None:
        """A held request left the hold after ``seconds``: with an engine, or for its 503."""

    def send_timed_out(self) -> None:
        """A client took nothing of its response for ``send_timeout_s``: cut, its request
        aborted at the engine."""

    def loop_lag(self, seconds: float) -> None:
        """How late a timer of the event loop fired (see :mod:`mpsd.proxy.lag`)."""
