"""Numbers from requests, and when a difference between two arms is real (pure, no I/O).

Why paired ratios: arms run interleaved (A B B A ...), so the drift of a shared host hits both
arms of one repeat alike; the ratio of the two within a repeat cancels it, where the ratio of two
medians taken minutes apart would not. A gain is called *inside the noise* when the paired ratios
straddle 1, or when it is smaller than the arms' own spread between repeats: then the honest
answer is "no measurable difference", and one engine (or the simpler setup) wins.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mpsd.bench.loadgen import Outcome, RunResult

#: The metrics a run reports, in table order.
METRICS = ("output_tok_per_s", "total_tok_per_s", "req_per_s", "ttft_p50_s", "ttft_p99_s",
           "itl_p50_s", "itl_p99_s", "latency_p50_s", "latency_p99_s")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def _in_window(outcome: Outcome, w0: float, w1: float) -> float:
    """Output tokens of one request generated inside [w0, w1): spread evenly from its first
    token (a stream) or its sending (an answer that comes whole) to its end. Counting whole
    requests by their end instead quantizes: closed-loop clients of equal requests finish in
    waves, and a window holds 2 or 3 waves, not 2.5."""
    start = outcome.first if outcome.streamed else outcome.sent
    if outcome.end <= start:
        return float(outcome.output_tokens) if w0 <= outcome.end < w1 else 0.0
    overlap = min(outcome.end, w1) - max(start, w0)
    return outcome.output_tokens * max(0.0, overlap) / (outcome.end - start)


def summarize(result: RunResult) -> dict[str, Any]:
    """One run over its window: tokens generated inside it (prompt tokens count when their
    prefill ended, i.e. at the first token), requests that ended inside it, their latencies;
    errors are counted over the whole run."""
    w0, w1 = result.window
    seconds = max(1e-9, w1 - w0)
    ok = [o for o in result.outcomes if o.ok]
    counted = [o for o in result.counted if o.ok]
    prompt = sum(o.prompt_tokens for o in ok if w0 <= o.first < w1)
    output = sum(_in_window(o, w0, w1) for o in ok)
    gaps = [g for o in counted for g in o.gaps]
    failed = [o for o in result.outcomes if not o.ok]
    return {
        "requests": len(counted),
        "seconds": round(seconds, 3),
        "req_per_s": len(counted) / seconds,
        "output_tok_per_s": output / seconds,
        "total_tok_per_s": (prompt + output) / seconds,
        "prompt_tokens": prompt,
        "output_tokens": round(output),
        "ttft_p50_s": percentile([o.first - o.sent for o in counted], 50),
        "ttft_p99_s": percentile([o.first - o.sent for o in counted], 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "latency_p50_s": percentile([o.end - o.sent for o in counted], 50),
        "latency_p99_s": percentile([o.end - o.sent for o in counted], 99),
        "errors": len(failed),
        "error_samples": sorted({o.error for o in failed})[:3],
    }


@dataclass(frozen=True)
class Spread:
    """Median and range of one metric over the repeats of one arm."""

    median: float
    low: float
    high: float
    n: int

    @property
    def relative(self) -> float:
        """(max - min) / median: how much the repeats disagree."""
        return (self.high - self.low) / self.median if self.median else math.inf

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        clean = [v for v in values if not math.isnan(v)]
        if not clean:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(clean), min(clean), max(clean), len(clean))


@dataclass(frozen=True)
class Gain:
    """One arm against a baseline: the paired ratios, their median and the verdict."""

    ratios: tuple[float, ...]
    median: float
    low: float
    high: float
    noise: bool
    why: str

    def text(self) -> str:
        spread = f" ({self.low:.2f}-{self.high:.2f})" if len(self.ratios) > 1 else ""
        return f"{self.median:.2f}x{spread}{' inside the noise' if self.noise else ''}"


def gain(arm: Sequence[float], base: Sequence[float]) -> Gain:
    """``arm`` over ``base``, repeat by repeat (same index = same repeat, run side by side)."""
    ratios = tuple(a / b for a, b in zip(arm, base, strict=False) if b > 0 and not math.isnan(a))
    if not ratios:
        return Gain((), math.nan, math.nan, math.nan, True, "nothing measured")
    median = statistics.median(ratios)
    low, high = min(ratios), max(ratios)
    own = max(Spread.of(arm).relative, Spread.of(base).relative)
    if len(ratios) < 2:
        return Gain(ratios, median, low, high, abs(median - 1) < 0.05,
                    "one repeat: no spread to judge by, only a 5 % margin")
    if low <= 1 <= high:
        return Gain(ratios, median, low, high, True, f"paired ratios {low:.2f}-{high:.2f} "
                    "straddle 1")
    if abs(median - 1) <= own:
        return Gain(ratios, median, low, high, True, f"{abs(median - 1):.0%} is within the "
                    f"repeats' own spread ({own:.0%})")
    return Gain(ratios, median, low, high, False, f"paired ratios {low:.2f}-{high:.2f}")


def better(a: Gain, b: Gain) -> bool:
    """Is ``a`` a real improvement over ``b``: above b's range, by more than either's spread?"""
    if math.isnan(a.median) or math.isnan(b.median):
        return not math.isnan(a.median)
    margin = max(a.high - a.low, b.high - b.low, 0.05 * b.median)
    return a.median - b.median > margin / 2 and a.low > b.median
