"""Which engine gets the next request: least-in-flight, random tie-break (architecture.md §2).

The dominant bug of every router the project studied (vllm-router #179, LiteLLM #39322) is
load-counter bookkeeping: a missed decrement, a double one, or a tie always broken toward the
first backend, and all traffic ends up on one engine. So the rules here are strict:

* A :class:`Lease` (from :meth:`BackendPool.lease`, or :meth:`BackendPool.try_lease` on the
  proxy's synchronous hot path) is the **only** thing that changes an in-flight count: +1 exactly
  once when a backend is handed out, -1 exactly once on release — ``__aexit__`` of
  ``async with``, or :meth:`Lease.release` by whoever owns the request's end, which is idempotent
  so that "release on every path" can never become "release twice".
* :func:`~mpsd.backend.pick` is pure: fewest in flight among routable backends under the cap,
  ties broken by the injected ``random.Random``.
* State changes (:meth:`~BackendPool.set_routable`, :meth:`~BackendPool.remove`) are synchronous,
  so a group marking its engines unroutable takes effect for the very next pick, in the same tick.
* Routable = *ready* (the supervisor's word: the engine passed its checks) and not *ejected*
  (the proxy's word: passive outlier ejection, as in Envoy and nginx). An answer that shows the
  engine dead, a refused connection or a stalled stream (judged per exchange by the proxy's
  relay) ejects at once and tells the engine's group (``on_engine_fault``); ``eject_after_errors``
  5xx in a row eject it for a while, longer each time in a row. So an engine that fails fast —
  and so always has the fewest requests in flight — is never the one least-loaded keeps picking.
* An engine condemned (ejected as dead) or removed has its exchanges ended at once by the proxy
  (``on_backend_gone``), so that none of them keeps its lease: a paused one would never notice
  that its engine is gone.
* When every candidate is at the cap (or none is ready), callers wait in **one FIFO queue**, and a
  slot that frees goes straight to the oldest waiter that can use it (no polling, no thundering
  herd): waiting is bounded by the caller's ``wait_s`` (``admission_wait_s``).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Callable, Collection, Iterable
from types import TracebackType

from mpsd.backend import Backend, NoCapacity, UnknownModel, pick
from mpsd.status import BackendStatus


class _Waiter:
    __slots__ = ("exclude", "future", "model")

    def __init__(self, model: str | None, exclude: Collection[Backend],
                 future: asyncio.Future[Backend]) -> None:
        self.model = model
        self.exclude = exclude
        self.future = future


class BackendPool:
    """Every engine the proxy may use, their in-flight counts, and the admission queue."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._cap = 0
        self._eject_after_errors = 0
        self._eject_base_s = 0.0
        self._eject_max_s = 0.0
        self._rng = rng or random.Random()
        # set once by the supervisor: a backend the proxy found dead or stalled
        self.on_engine_fault: Callable[[Backend, str, str], None] | None = None
        # set once by the proxy: end every exchange on a backend condemned or removed
        self.on_backend_gone: Callable[[Backend], None] | None = None
        self._backends: dict[str, Backend] = {}
        self._by_model: dict[str, list[Backend]] = {}
        self._all: list[Backend] = []
        self._waiters: deque[_Waiter] = deque()

    # -- registration (called by the supervisor / groups) -----------------------------------

    def add(self, backend: Backend) -> None:
        """Register ``backend``; it is not routable until ``set_routable(key, True)``."""
        if backend.key in self._backends:
            raise ValueError(f"backend {backend.key!r} is already registered")
        backend.routable = False
        self._backends[backend.key] = backend
        self._by_model.setdefault(backend.model, []).append(backend)
        self._all = list(self._backends.values())

    def remove(self, key: str) -> None:
        """Forget ``key`` at once; requests already on it finish and release into the object."""
        backend = self._backends.pop(key, None)
        if backend is None:
            return
        backend.routable = False
        peers = self._by_model[backend.model]
        peers.remove(backend)
        if not peers:
            del self._by_model[backend.model]
        self._all = list(self._backends.values())
        if self.on_backend_gone is not None:
            self.on_backend_gone(backend)

    def set_routable(self, key: str, routable: bool, *, fresh: bool = False) -> None:
        """The supervisor's readiness of ``key``, effective for the very next pick. A ``fresh``
        (re)started engine that passed its checks starts with a clean slate: no ejection, no
        5xx count; a probe that passes again does not overrule the proxy's ejection."""
        backend = self._backends.get(key)
        if backend is None:
            raise KeyError(key)
        backend.ready = routable
        if fresh:
            backend.ejected_until = 0.0
            backend.consecutive_5xx = backend.ejections_in_row = 0
        backend.routable = routable and not backend.ejected_until
        if backend.routable:
            self._dispatch()

    def set_coming(self, key: str, coming: bool) -> None:
        """The supervisor expects ``key`` ready soon (starting, recovering, backing off), or no
        longer does (ready, FAILED, drained, stopping). Requests held for a model none of whose
        engines is coming any more get their 503 at once."""
        backend = self._backends.get(key)
        if backend is None or backend.coming == coming:
            return
        backend.coming = coming
        if not coming and self._waiters:
            self._drop_hopeless()

    def coming(self, model: str | None) -> bool:
        """Nothing of ``model`` is routable, but an engine of it is expected soon: a request
        may be held for it (through a recovery) instead of answered 503 at once."""
        candidates = self._candidates_or_empty(model)
        return any(b.coming for b in candidates) and not any(b.routable for b in candidates)

    def configure(self, *, max_inflight_per_engine: int = 0, eject_after_errors: int = 0,
                  eject_base_s: float = 0.0, eject_max_s: float = 0.0) -> None:
        """The proxy's settings (start and live reload); a raised cap serves queued requests."""
        self._cap = max_inflight_per_engine
        self._eject_after_errors = eject_after_errors
        self._eject_base_s = eject_base_s
        self._eject_max_s = eject_max_s
        self._dispatch()

    # -- passive health (called by the proxy) -------------------------------------------------

    def eject(self, backend: Backend, now: float, signal: str, reason: str, *,
              dead: bool) -> None:
        """Out of routing from this tick. ``dead``: the engine is gone or hung, its group is
        told (and readmits it once restarted) and the proxy ends its exchanges; else it returns
        after the ejection time."""
        if dead:
            backend.ejected_until = math.inf
            backend.coming = True  # its group restarts it: its model's requests may be held
        else:
            backend.ejections_in_row += 1
            span = min(self._eject_base_s * backend.ejections_in_row, self._eject_max_s)
            backend.ejected_until = max(backend.ejected_until, now + span)
        if backend.routable:  # counted when the proxy is what took it out of routing
            backend.ejections += 1
        backend.routable = False
        if dead and self.on_engine_fault is not None and backend.key in self._backends:
            self.on_engine_fault(backend, signal, reason)
        if dead and self.on_backend_gone is not None:
            self.on_backend_gone(backend)

    def answered_5xx(self, backend: Backend, now: float, status: int) -> bool:
        """An engine answered a 5xx; True when that ejected it (``eject_after_errors`` in a row).
        Never the last routable engine of a model: a fault of the requests, not the engines."""
        backend.consecutive_5xx += 1
        limit = self._eject_after_errors
        if not limit or backend.consecutive_5xx < limit or not backend.routable:
            return False
        peers = self._by_model.get(backend.model, ())
        if not any(p.routable for p in peers if p is not backend):
            return False
        self.eject(backend, now, "5xx", f"{backend.consecutive_5xx} answers 5xx in a row "
                   f"(last {status})", dead=False)
        return True

    def answered_ok(self, backend: Backend) -> None:
        """A good answer: the 5xx streak and the ejection multiplier start over."""
        backend.consecutive_5xx = backend.ejections_in_row = 0

    def readmit(self, now: float) -> None:
        """End the ejections whose time is up (the proxy's housekeeping calls this)."""
        back = False
        for backend in self._all:
            if backend.ejected_until and now >= backend.ejected_until:
                backend.ejected_until = 0.0
                backend.routable = backend.ready
                back = back or backend.routable
        if back:
            self._dispatch()

    async def drain(self, key: str, timeout: float) -> bool:  # noqa: ASYNC109 (the contract)
        """Make ``key`` unroutable now and wait until it has nothing in flight; True if idle."""
        backend = self._backends.get(key)
        if backend is None:
            raise KeyError(key)
        backend.routable = backend.ready = False  # not readmitted by an ejection's end
        if backend.inflight == 0:
            return True
        idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        backend._idle.append(idle)
        try:
            async with asyncio.timeout(timeout):
                await idle
        except TimeoutError:
            return backend.inflight == 0
        finally:
            if idle in backend._idle:
                backend._idle.remove(idle)
        return True

    # -- queries -------------------------------------------------------------------------------

    @property
    def cap(self) -> int:
        return self._cap

    def get(self, key: str) -> Backend | None:
        return self._backends.get(key)

    def backends(self) -> list[Backend]:
        return list(self._all)

    def models(self) -> list[str]:
        """Models with at least one backend registered, routable or not (sorted)."""
        return sorted(self._by_model)

    def snapshot(self) -> list[BackendStatus]:
        return [b.as_dict() for b in self._all]

    def model_count(self) -> int:
        return len(self._by_model)

    def connect_failed(self, backend: Backend) -> None:
        """Count a failed connect (the request went to another engine, or got a 503)."""
        backend.connect_failures += 1

    def routable_besides(self, model: str | None, exclude: Collection[Backend]) -> bool:
        """Whether another engine of ``model`` could take a request that failed on ``exclude``."""
        return _any_routable(self._candidates_or_empty(model), exclude)

    def routable_count(self) -> int:
        return sum(1 for b in self._all if b.routable)

    def queued(self) -> int:
        """Requests waiting in the admission queue right now."""
        return sum(1 for w in self._waiters if not w.future.done())

    def inflight_total(self) -> int:
        return sum(b.inflight for b in self._all)

    # -- leasing ------------------------------------------------------------------------------

    def lease(self, model: str | None, *, wait_s: float = 0.0,
              exclude: Collection[Backend] = ()) -> Lease:
        """``async with pool.lease(model) as backend:`` — the only way in-flight counts change.

        ``model=None`` means any backend. Raises :class:`UnknownModel` when no backend serves
        ``model``, :class:`NoCapacity` when none is routable and free within ``wait_s``.
        """
        return Lease(self, model, wait_s, exclude)

    def try_lease(self, model: str | None, exclude: Collection[Backend] = ()) -> Lease | None:
        """A lease already holding a free backend, or ``None`` if none is free right now.

        The synchronous form of :meth:`lease` for the proxy's hot path: the caller owns the
        returned lease and must call :meth:`Lease.release` exactly once when the request ends
        (it is idempotent, so "at least once" on every path is enough).
        """
        backend = self._take_now(model, exclude)
        if backend is None:
            return None
        lease = Lease(self, model, 0.0, exclude)
        lease.backend = backend
        return lease

    def _candidates(self, model: str | None) -> list[Backend]:
        if model is None:
            return self._all
        peers = self._by_model.get(model)
        if peers is None:
            raise UnknownModel(model, sorted(self._by_model))
        return peers

    def _take_now(self, model: str | None, exclude: Collection[Backend]) -> Backend | None:
        backend = pick(self._candidates(model), self._cap, self._rng, exclude)
        if backend is not None:
            backend.inflight += 1
            backend.requests += 1
        return backend

    async def _take(self, model: str | None, wait_s: float,
                    exclude: Collection[Backend]) -> Backend:
        # FIFO holds without checking the queue: every state change that frees a slot runs
        # _dispatch at once, so a queued request never waits while a slot it could use is free.
        backend = self._take_now(model, exclude)
        if backend is not None:
            return backend
        if wait_s <= 0:
            raise NoCapacity(model, ready=_any_routable(self._candidates(model), exclude),
                             waited_s=0.0)
        future: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(model, exclude, future))
        self._dispatch()
        try:
            async with asyncio.timeout(wait_s):
                return await future
        except TimeoutError:
            if _granted(future):  # granted as the clock ran out
                self._release(future.result())
            raise NoCapacity(model, ready=_any_routable(self._candidates_or_empty(model),
                                                        exclude), waited_s=wait_s) from None
        except BaseException:
            if _granted(future):  # granted, then cancelled: give back
                self._release(future.result())
            elif not future.done():
                future.cancel()
            raise

    def _candidates_or_empty(self, model: str | None) -> list[Backend]:
        return self._all if model is None else self._by_model.get(model, [])

    def _dispatch(self) -> None:
        """Hand free slots to queued requests, oldest first."""
        if not self._waiters:
            return
        kept: deque[_Waiter] = deque()
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            candidates = self._candidates_or_empty(waiter.model)
            backend = pick(candidates, self._cap, self._rng, waiter.exclude)
            if backend is None:
                kept.append(waiter)
                continue
            backend.inflight += 1
            backend.requests += 1
            waiter.future.set_result(backend)
        self._waiters = kept

    def _drop_hopeless(self) -> None:
        """Held requests whose model has nothing routable and nothing coming: 503 now."""
        for waiter in self._waiters:
            candidates = self._candidates_or_empty(waiter.model)
            if waiter.future.done() or any(b.coming or b.routable for b in candidates):
                continue
            waiter.future.set_exception(NoCapacity(waiter.model, ready=False, waited_s=0.0))

    def _release(self, backend: Backend) -> None:
        backend.inflight -= 1
        if self._waiters:
            self._dispatch()
        if backend.inflight == 0 and backend._idle:
            for idle in backend._idle:
                if not idle.done():
                    idle.set_result(None)


def _granted(future: asyncio.Future[Backend]) -> bool:
    """A backend was handed to this waiter (not cancelled, not refused)."""
    return future.done() and not future.cancelled() and future.exception() is None


def _any_routable(candidates: Iterable[Backend], exclude: Collection[Backend]) -> bool:
    return any(b.routable and b not in exclude for b in candidates)


class Lease:
    """One request's claim on a backend: +1 in flight when acquired, -1 on release, once.

    Use it as ``async with pool.lease(model) as backend:`` (released on every way out of the
    block), or hand it to whoever ends the request and call :meth:`release` there; a second
    release is a no-op, so it can never decrement twice. A plain class rather than
    ``@asynccontextmanager``: it runs once per proxied request.
    """

    __slots__ = ("_exclude", "_model", "_pool", "_wait_s", "backend")

    def __init__(self, pool: BackendPool, model: str | None, wait_s: float,
                 exclude: Collection[Backend]) -> None:
        self._pool = pool
        self._model = model
        self._wait_s = wait_s
        self._exclude = exclude
        self.backend: Backend | None = None

    async def acquire(self) -> Backend:
        """Wait (FIFO, up to ``wait_s``) for a backend; raise ``UnknownModel``/``NoCapacity``."""
        if self.backend is not None:
            raise RuntimeError("a Lease is acquired once")
        self.backend = await self._pool._take(self._model, self._wait_s, self._exclude)
        return self.backend

    @property
    def pool(self) -> BackendPool:
        """The pool the lease is from (the relay reports the engine's health to it)."""
        return self._pool

    def release(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            self._pool._release(backend)

    async def __aenter__(self) -> Backend:
        return await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()
