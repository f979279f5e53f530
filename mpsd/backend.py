"""One engine as the router sees it, the two ways a request cannot get one, and :func:`pick`.

:func:`pick` is pure — fewest requests in flight among routable backends under the cap, ties
broken by the injected ``random.Random`` — so the least-loaded rule is tested exhaustively apart
from the pool's bookkeeping (:mod:`mpsd.pool`), which is the only writer of a backend's state.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from mpsd.errors import MpsdError
from mpsd.status import BackendStatus

RETRY_AFTER_SATURATED_S = 1
RETRY_AFTER_NOT_READY_S = 5


@dataclass(eq=False, slots=True)
class Backend:
    """One engine the proxy can send requests to.

    ``key``/``gpu``/``model``/``base_url`` are what the supervisor registers; the rest is
    runtime state owned by the pool (never written by anyone else). Identity semantics
    (``eq=False``): two backends are never equal just because they look alike.
    """

    key: str
    gpu: str
    model: str
    base_url: str
    inflight: int = 0
    routable: bool = False
    ready: bool = False
    ejected_until: float = 0.0
    requests: int = 0
    connect_failures: int = 0
    consecutive_5xx: int = 0
    ejections_in_row: int = 0
    ejections: int = 0
    coming: bool = False  # not ready, but expected soon: starting, recovering or backing off
    _idle: list[asyncio.Future[None]] = field(default_factory=list, init=False, repr=False)

    def as_dict(self) -> BackendStatus:
        return {
            "key": self.key,
            "gpu": self.gpu,
            "model": self.model,
            "url": self.base_url,
            "routable": self.routable,
            "inflight": self.inflight,
            "requests": self.requests,
            "connect_failures": self.connect_failures,
            "ejected": self.ejected_until > 0,
            "ejections": self.ejections,
        }


class PoolError(MpsdError):
    """A request cannot be given a backend; the proxy turns it into an HTTP error."""


class UnknownModel(PoolError):
    """No backend serves this model at all (HTTP 404)."""

    def __init__(self, model: str | None, known: list[str]) -> None:
        self.model = model
        self.known = known
        super().__init__(f"The model `{model}` does not exist. Valid models: {', '.join(known)}.")


class NoCapacity(PoolError):
    """Backends exist for the model but none is ready or free within the wait (HTTP 503)."""

    def __init__(self, model: str | None, *, ready: bool, waited_s: float) -> None:
        self.model = model
        self.ready = ready
        self.retry_after_s = RETRY_AFTER_SATURATED_S if ready else RETRY_AFTER_NOT_READY_S
        what = "every engine is at its in-flight cap" if ready else "no engine is ready"
        waited = f" after waiting {waited_s:g}s" if waited_s > 0 else ""
        super().__init__(f"{what} for model `{model}`{waited}; retry later")


def pick(
    candidates: Iterable[Backend],
    cap: int,
    rng: random.Random,
    exclude: Collection[Backend] = (),
) -> Backend | None:
    """The routable backend with the fewest requests in flight, ties broken at random.

    ``cap`` = 0 means no per-engine cap; ``exclude`` holds backends already tried for this request.
    Pure apart from drawing from ``rng``: no I/O, no state change.
    """
    best: Backend | None = None
    low = math.inf
    ties = 0
    for backend in candidates:
        n = backend.inflight
        if not backend.routable or (cap and n >= cap) or (exclude and backend in exclude):
            continue
        if n < low:
            best, low, ties = backend, n, 1
        elif n == low:
            ties += 1  # reservoir sampling: each of the k ties ends up chosen with p = 1/k
            if rng.random() * ties < 1.0:
                best = backend
    return best
