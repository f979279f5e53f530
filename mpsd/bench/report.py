"""What bench shows: a table per workload (medians, spread, gains with their noise verdict),
the rows as JSON lines, and a PNG plot when matplotlib is installed (``pip install mpsd[plot]``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from mpsd.bench.stats import Gain, Spread, gain

Row = dict[str, Any]


@contextlib.contextmanager
def jsonl_sink(path: Path | None) -> Iterator[IO[str] | None]:
    """The file ``--jsonl`` names, open for the run's rows; None when none was named."""
    if path is None:
        yield None
        return
    with path.open("w") as out:
        yield out


def write_jsonl(rows: Iterable[Row], out: IO[str]) -> None:
    for row in rows:
        out.write(json.dumps(row, default=str) + "\n")
    out.flush()


def _metric(rows: Sequence[Row]) -> str:
    """The throughput the rows' workload is judged by (see ``Workload.metric``)."""
    return str(rows[0].get("metric", "output_tok_per_s"))


def by_repeat(rows: Sequence[Row], arm: str, metric: str) -> list[float]:
    """``metric`` of ``arm`` per repeat, in repeat order (NaN where a repeat lacks it)."""
    found = {int(r["repeat"]): float(r[metric]) for r in rows if r["arm"] == arm}
    repeats = sorted({int(r["repeat"]) for r in rows})
    return [found.get(k, math.nan) for k in repeats]


def gains(rows: Sequence[Row], arm: str, base: str) -> Gain | None:
    if not any(r["arm"] == arm for r in rows) or not any(r["arm"] == base for r in rows):
        return None
    metric = _metric(rows)
    return gain(by_repeat(rows, arm, metric), by_repeat(rows, base, metric))


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}" if seconds >= 0.1 else \
        f"{seconds * 1000:.1f}"


def table(rows: Sequence[Row]) -> str:
    """One block per workload: each arm's medians, then the gains over one engine."""
    out: list[str] = []
    grouped: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        if row.get("kind") == "run":
            grouped[str(row["workload"])].append(row)
    for workload, items in grouped.items():
        metric = _metric(items)
        unit = "out tok/s" if metric == "output_tok_per_s" else "total tok/s"
        first = items[0]
        out.append(f"{workload}: {first['input_len']} in / {first['output_len']} out, "
                   f"concurrency {first['concurrency']}, "
                   f"{'stream' if first['stream'] else 'no stream'}")
        out.append(f"  {'arm':<8} {'engines':>7} {unit:>12} {'min-max':>17} {'req/s':>8} "
                   f"{'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'errors':>6} "
                   f"{'mpsd CPU':>8}")
        for arm in dict.fromkeys(r["arm"] for r in items):
            mine = [r for r in items if r["arm"] == arm]
            tput = Spread.of([float(r[metric]) for r in mine])
            rps = Spread.of([float(r["req_per_s"]) for r in mine]).median
            ttft = (Spread.of([float(r["ttft_p50_s"]) for r in mine]).median,
                    Spread.of([float(r["ttft_p99_s"]) for r in mine]).median)
            itl = (Spread.of([float(r["itl_p50_s"]) for r in mine]).median,
                   Spread.of([float(r["itl_p99_s"]) for r in mine]).median)
            cpu = Spread.of([float(r["mpsd_cpu_cores"]) for r in mine if "mpsd_cpu_cores" in r])
            errors = sum(int(r["errors"]) for r in mine)
            out.append(
                f"  {arm:<8} {mine[0]['engines']:>7} {tput.median:>12,.0f} "
                f"{f'{tput.low:,.0f}-{tput.high:,.0f}':>17} {rps:>8.1f} "
                f"{_ms(ttft[0]) + '/' + _ms(ttft[1]):>16} {_ms(itl[0]) + '/' + _ms(itl[1]):>15} "
                f"{errors:>6} {'-' if not cpu.n else f'{cpu.median:.2f}':>8}")
        samples = sorted({e for r in items for e in r.get("error_samples", [])})[:3]
        if samples:
            out.append(f"  errors, e.g.: {'; '.join(samples)}")
        for arm, base in (("mpsd", "direct1"), ("client", "direct1"), ("mpsd", "client")):
            found = gains(items, arm, base)
            if found is not None:
                out.append(f"  {arm} / {base}: {found.text()} ({found.why})")
        out.append("")
    return "\n".join(out)


def plot(rows: Sequence[Row], dest: Path, title: str = "") -> None:
    """Bars of each arm's median per workload, whiskers at min and max. Needs matplotlib."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

    runs = [r for r in rows if r.get("kind") == "run"]
    workloads = list(dict.fromkeys(str(r["workload"]) for r in runs))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4),
                             squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        items = [r for r in runs if r["workload"] == workload]
        metric = _metric(items)
        arms = list(dict.fromkeys(r["arm"] for r in items))
        spreads = [Spread.of([float(r[metric]) for r in items if r["arm"] == a]) for a in arms]
        ax.bar(arms, [s.median for s in spreads],
               yerr=[[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]],
               capsize=4, color=["#8da0cb", "#66c2a5", "#fc8d62"][:len(arms)])
        ax.set_title(workload)
        ax.set_ylabel("output tok/s" if metric == "output_tok_per_s" else "total tok/s")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
