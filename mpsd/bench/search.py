"""Which setups ``mpsd tune`` measures, in which order, and which one it recommends (pure).

A setup is engines per GPU, MPS on or off, and the active thread percentage. Each is scored by
its gain over one engine of the same stage, measured side by side (so drift cancels; see
:mod:`mpsd.bench.stats`). The search walks the axes in the order that costs fewest cold starts:

1. MPS on, engines 2, 3, ... up to the limit, each stage one reload (only the new engine
   starts); it stops at the first stage that is no real improvement over the one before, because
   every engine costs memory and widens the fault domain (measured: 3-4 engines of a small model
   are no better than 2);
2. MPS off at the best count so far (one cold start): the same gain without MPS is worth having,
   because MPS has no fault isolation between engines;
3. each other thread percentage at the best count with MPS on (a restart of those engines).

:func:`recommend` takes the best score, then the simplest setup whose score is not really worse
(fewer engines, then MPS off, then 100 % threads); and one engine when no gain is outside the
noise. An exhaustive sweep measures every setup; :func:`replay` runs the search on a sweep's
results, to show what the search would have picked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mpsd.bench.stats import Gain, better


@dataclass(frozen=True, order=True)
class Setup:
    """One way to run the model on one GPU."""

    engines: int
    mps: bool
    threads: int = 100

    def simplicity(self) -> tuple[int, int, int]:
        """Lower is simpler: fewer engines, MPS off (isolation), no thread limit."""
        return (self.engines, int(self.mps), int(self.threads != 100))

    def text(self) -> str:
        limit = f", {self.threads} % threads" if self.threads != 100 else ""
        return f"{self.engines} engine{'s' if self.engines > 1 else ''}, " \
            f"MPS {'on' if self.mps else 'off'}{limit}"


ONE = Setup(1, False)


@dataclass(frozen=True)
class Score:
    """A setup's measured gain over one engine (a combination over the workloads)."""

    gain: Gain
    throughput: float  # median of the judged metric with all engines, first workload


@dataclass(frozen=True)
class Recommendation:
    setup: Setup
    score: Score | None  # None: one engine, the baseline itself
    reason: str


Measure = Callable[[Setup], Score | None]  # None: could not be measured (start failed, budget)


def search(max_engines: int, mps_modes: Iterable[bool], threads: Iterable[int],
           measure: Measure) -> dict[Setup, Score | None]:
    """Run the search with ``measure``; every setup tried, with its score (None: not measured)."""
    modes = list(mps_modes)
    tried: dict[Setup, Score | None] = {}

    def take(setup: Setup) -> Score | None:
        if setup not in tried:
            tried[setup] = measure(setup)
        return tried[setup]

    first_mode = True in modes
    best_n, last = 1, None
    for n in range(2, max_engines + 1):
        score = take(Setup(n, first_mode))
        if score is None:
            break
        if last is None and (score.gain.noise or score.gain.median <= 1):
            break  # two engines gain nothing: more will not either
        if last is not None and not better(score.gain, last.gain):
            break
        best_n, last = n, score
    if best_n > 1:
        if first_mode and False in modes:
            take(Setup(best_n, False))
        if first_mode:
            for p in threads:
                if p != 100:
                    take(Setup(best_n, True, p))
    return tried


def recommend(results: dict[Setup, Score | None]) -> Recommendation:
    """The best measured setup, or a simpler one that is not really worse; one engine when no
    gain stands out of the noise."""
    scored = [(s, r) for s, r in results.items() if r is not None and not math.isnan(
        r.gain.median)]
    if not scored:
        return Recommendation(ONE, None, "nothing could be measured; one engine is the safe "
                              "default")
    best_setup, best = max(scored, key=lambda item: item[1].gain.median)
    if best.gain.noise or best.gain.median <= 1:
        return Recommendation(ONE, None, f"the best gain, {best.gain.text()} with "
                              f"{best_setup.text()}, is no real gain ({best.gain.why}); one "
                              "engine serves as much with less memory and no shared fault domain")
    equal = [(s, r) for s, r in scored if not better(best.gain, r.gain)]
    setup, score = min(equal, key=lambda item: item[0].simplicity())
    reason = f"{score.gain.text()} over one engine ({score.gain.why})"
    if setup != best_setup:
        reason += f"; {best_setup.text()} measured {best.gain.median:.2f}x, not really more, " \
            "so the simpler setup wins"
    if not setup.mps and any(s.mps for s, _ in scored):
        reason += "; MPS off keeps the engines' faults apart"
    return Recommendation(setup, score, reason)


def replay(sweep: dict[Setup, Score | None], max_engines: int, mps_modes: Iterable[bool],
           threads: Iterable[int]) -> tuple[Recommendation, list[Setup]]:
    """What the search would have measured and recommended, using a sweep's results."""
    order: list[Setup] = []

    def lookup(setup: Setup) -> Score | None:
        order.append(setup)
        return sweep.get(setup)

    return recommend(search(max_engines, mps_modes, threads, lookup)), order


def sweep_setups(max_engines: int, mps_modes: Iterable[bool],
                 threads: Iterable[int]) -> list[Setup]:
    """Every setup, in the order a sweep measures them: per MPS mode, engines upward (one
    reload each), thread limits after."""
    out = []
    thread_list = list(threads)
    for mps in mps_modes:
        for p in (thread_list if mps else [100]):
            out += [Setup(n, mps, p) for n in range(2, max_engines + 1)]
    return out
