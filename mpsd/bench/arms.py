"""Arms measured side by side: one engine direct, every engine through mpsd, the client balancing.

- ``direct1``: one engine of the model, loaded directly on its own port; its co-tenants sit
  idle (an idle MPS client launches no kernels), so this is what one engine alone serves;
- ``mpsd``: every engine of the model through mpsd's proxy;
- ``client``: the same engines with the load generator balancing by itself (fewest in flight),
  the ceiling any proxy can reach.

Within a repeat every workload runs every arm; the order of the arms flips every repeat
(A B C, C B A, ...) so that drift of the host hits each arm alike, and the paired ratios of
:mod:`mpsd.bench.stats` compare arms of the same repeat.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpsd.bench import loadgen
from mpsd.bench.progress import Progress
from mpsd.bench.stats import summarize
from mpsd.bench.target import Snapshot, cpu_seconds, vocab_size
from mpsd.bench.workloads import Workload

ARMS = ("direct1", "mpsd", "client")
Row = dict[str, Any]


@dataclass(frozen=True)
class Plan:
    """What one bench (or one tune stage) measures, and from which cores."""

    workloads: tuple[Workload, ...]
    arms: tuple[str, ...] = ("direct1", "mpsd")
    repeats: int = 3
    warmup_s: float = 3.0
    duration_s: float = 10.0
    num_requests: int = 0
    procs: int = 1
    cpus: tuple[int, ...] = ()
    api_key: str = ""

    def run_seconds(self) -> float:
        """Planned seconds of one run (a count-mode run is guessed at the window's length)."""
        return self.warmup_s + self.duration_s + 1.0

    def total_seconds(self) -> float:
        return self.run_seconds() * self.repeats * len(self.workloads) * len(self.arms)


@dataclass(frozen=True)
class Cores:
    """The load generator's cores, and what the operator must know when they are not its own."""

    cpus: tuple[int, ...]
    procs: int
    warning: str


def daemon_cores(max_loadgen: int = 4) -> tuple[int, ...]:
    """Cores for a daemon bench starts itself: all but a quarter (at most ``max_loadgen``) of
    this process's, which stay free for the load generator. With fewer than four cores there is
    nothing to spare (:func:`loadgen_cores` then says so)."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 4:
        return tuple(usable)
    keep = min(max_loadgen, len(usable) // 4)
    return tuple(usable[:-keep])


def loadgen_cores(snap: Snapshot, max_procs: int = 4) -> Cores:
    """Cores of this process's affinity that no engine (and not mpsd itself) is pinned to."""
    usable = set(os.sched_getaffinity(0))
    taken = {c for e in snap.engines for c in e.cpus}
    if snap.pid is not None:
        try:
            daemon = set(os.sched_getaffinity(snap.pid))
        except OSError:
            daemon = set()
        if daemon and daemon != usable:
            taken |= daemon
    free = tuple(sorted(usable - taken))
    if any(not e.cpus for e in snap.engines):
        return Cores(tuple(sorted(usable)), min(max_procs, max(1, len(usable) // 4)),
                     "engines are not pinned to cores (cpu_affinity = \"off\"): the load "
                     "generator may share their cores, which understates the one-engine arm")
    if not free:
        return Cores(tuple(sorted(usable)), 1,
                     "no core is free of engines: the load generator shares the engines' cores, "
                     "which understates the one-engine arm and overstates the gain (give bench "
                     "cores of its own with taskset, or fewer to the engines)")
    return Cores(free, min(max_procs, len(free)), "")


def arm_urls(snap: Snapshot, model: str) -> dict[str, tuple[str, ...]]:
    engines = [e.url for e in snap.engines if e.model == model]
    if not engines:
        raise ValueError(f"no ready engine serves {model!r}; ready: "
                         f"{', '.join(snap.models()) or 'none'}")
    return {"direct1": (engines[0],), "mpsd": (snap.url,), "client": tuple(engines)}


def measure(snap: Snapshot, model: str, plan: Plan, progress: Progress,
            emit: Callable[[Row], None], tags: Row | None = None) -> list[Row]:
    """Every repeat x workload x arm, interleaved; one row per run, also given to ``emit``."""
    urls = arm_urls(snap, model)
    engines = sum(1 for e in snap.engines if e.model == model)
    vocab = vocab_size(urls["direct1"][0], model)
    rows: list[Row] = []
    seq = 0
    for repeat in range(plan.repeats):
        order = plan.arms if repeat % 2 == 0 else plan.arms[::-1]
        for workload in plan.workloads:
            for arm in order:
                seq += 1
                spec = loadgen.LoadSpec(
                    urls[arm], model, workload, plan.warmup_s, plan.duration_s,
                    plan.num_requests, plan.procs, plan.cpus, seed=repeat * 100 + seq,
                    api_key=plan.api_key, vocab_size=vocab)
                before = cpu_seconds(snap.pid) if snap.pid is not None else None
                t0 = time.monotonic()
                result = loadgen.run(spec)
                wall = time.monotonic() - t0
                after = cpu_seconds(snap.pid) if snap.pid is not None else None
                row: Row = {"kind": "run", **(tags or {}), "workload": workload.name,
                            "metric": workload.metric, "arm": arm, "repeat": repeat,
                            "engines": 1 if arm == "direct1" else engines,
                            "concurrency": workload.concurrency, "stream": workload.stream,
                            "input_len": workload.input_len, "output_len": workload.output_len,
                            **summarize(result)}
                if arm == "client":
                    row["per_engine"] = loadgen.balance(result.counted, len(urls[arm]))
                if before is not None and after is not None:
                    row["mpsd_cpu_cores"] = round((after - before) / wall, 3)
                rows.append(row)
                emit(row)
                progress.step(plan.run_seconds(), f"{workload.name} {arm} repeat "
                              f"{repeat + 1}/{plan.repeats}: "
                              f"{row[workload.metric]:,.0f} {_unit(workload)}")
    return rows


def _unit(workload: Workload) -> str:
    return "tok/s" if workload.metric == "output_tok_per_s" else "total tok/s"
