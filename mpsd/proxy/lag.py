"""The event loop's lag: how late it runs a timer, sampled all the time (issue 21).

Every proxied byte goes through the one event loop, so anything that holds it — a callback that
parses for milliseconds, a worker thread holding the GIL, a collection of the garbage collector —
shows up in the tail latency of every request in flight. This module makes that visible at no
cost worth measuring: one timer every :data:`INTERVAL_S`, and how late it fired goes to
``mpsd_event_loop_lag_seconds`` (a histogram, like Node's ``monitorEventLoopDelay``). A hold of
``d`` seconds is seen by the timer due during it, late by up to ``d``; a hold shorter than the
interval is caught in proportion to its length. uvloop runs timers at millisecond resolution, so
lags below ~1 ms are the loop's own granularity, not a hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

INTERVAL_S = 0.02


class LoopLag:
    """Samples the loop's lag every ``interval_s`` and hands each sample to ``observe``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, observe: Callable[[float], None],
                 interval_s: float = INTERVAL_S) -> None:
        self._loop = loop
        self._observe = observe
        self._interval_s = interval_s
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._schedule(time.perf_counter())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        self._due = now + self._interval_s
        self._handle = self._loop.call_later(self._interval_s, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self._observe(max(now - self._due, 0.0))
        self._schedule(now)
