"""Does a GPU wait for its engines' CPU? The study's main finding, said live per GPU.

MPS pays when an engine's CPU side — vLLM's EngineCore scheduler loop, its API server — keeps
the GPU idle: one engine cannot issue kernels faster than one core runs its Python, so a second
engine under MPS (or vLLM's async scheduling) fills the gaps. mpsd can see that state: every
engine of the GPU has a thread that wants a whole core while NVML says the GPU had idle time.

What a thread "wants" is read from ``/proc/<pid>/task/<tid>/schedstat``: the time it ran plus
the time it waited for a CPU, over the poll interval. Unlike CPU time alone, this stays near 1
for a CPU-bound thread on a host whose cores are contended (it is then runnable, not running),
and stays low for a thread that blocks on the GPU or the network. An engine's threads are the
threads of its process group (mpsd starts every engine as a group leader), so EngineCore and
the API server count without knowing vLLM's process tree.

Each poll round is one sample per GPU; the diagnosis is the fraction of the samples of the last
:data:`WINDOW_S` in which the GPU waited for the CPU. Nothing here can fail the poll: a process
that exits between two reads only leaves its thread out of that sample.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import anyio
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from mpsd.host.nvml import GpuSample
from mpsd.status import GpuDiagnosis

# A thread running or runnable this fraction of the interval wants a core ("near one core").
CPU_BOUND_THREAD = 0.85
# NVML utilisation below this: kernels ran less than this fraction of the time, the GPU idled.
GPU_IDLE_BELOW = 0.80
# The fraction of the window's samples from which the GPU is said to wait for the CPU.
VERDICT_RATIO = 0.5
WINDOW_S = 300.0
MIN_SAMPLES = 3  # fewer say nothing yet (a start, a burst)
_K = TypeVar("_K", bound=Hashable)
ADVICE = ("the GPU waits for the engines' CPU: one more engine under MPS, or vLLM's async "
          "scheduling, is likely to pay — `mpsd tune` measures it")


class EngineLike(Protocol):
    @property
    def pid(self) -> int | None: ...


class GroupPlanLike(Protocol):
    @property
    def key(self) -> str: ...


class GroupLike(Protocol):
    """The part of :class:`mpsd.supervise.group.GpuGroup` the diagnosis reads."""

    @property
    def plan(self) -> GroupPlanLike: ...
    @property
    def engines(self) -> Mapping[str, EngineLike]: ...


@dataclass(frozen=True)
class _Sample:
    at: float
    waiting: bool  # every engine wanted a core while the GPU idled


def _process_groups(proc: Path, leaders: set[int]) -> dict[int, list[int]]:
    """PIDs of the process groups led by ``leaders`` (one scan of /proc)."""
    members: dict[int, list[int]] = {leader: [] for leader in leaders}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            stat = (proc / entry.name / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) in members:
            members[int(fields[2])].append(int(entry.name))
    return members


def _thread_times(proc: Path, pid: int) -> Iterator[tuple[int, int]]:
    """(tid, ns run + ns waiting for a CPU) of every thread of ``pid``."""
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return
    for task in tasks:
        try:
            run, wait = (task / "schedstat").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        yield int(task.name), int(run) + int(wait)


class CpuDemand:
    """Per engine, how much of the last interval its busiest thread ran or waited for a CPU."""

    def __init__(self, proc: Path = Path("/proc"),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._proc = proc
        self._clock = clock
        self._last: dict[int, int] = {}
        self._last_at: float | None = None

    def read(self, leaders: Mapping[_K, int]) -> dict[_K, float]:
        """``{engine: busiest thread's share of the interval}`` for ``{engine: its process
        group leader}``; empty on the first call (there is no interval yet). Blocking file
        reads: run it on a worker thread."""
        now = self._clock()
        members = _process_groups(self._proc, set(leaders.values()))
        current: dict[int, int] = {}
        out: dict[_K, float] = {}
        for engine, leader in leaders.items():
            busiest = 0.0
            for pid in members.get(leader, []):
                for tid, ns in _thread_times(self._proc, pid):
                    current[tid] = ns
                    before = self._last.get(tid)
                    if before is not None and self._last_at is not None:
                        busiest = max(busiest, (ns - before) / 1e9 / (now - self._last_at))
            out[engine] = min(busiest, 1.0)
        first = self._last_at is None
        self._last, self._last_at = current, now
        return {} if first else out


class Diagnosis:
    """The per-GPU diagnosis: fed one sample per poll round, read by the status and /metrics."""

    def __init__(self, demand: CpuDemand | None = None, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._demand = demand or CpuDemand(clock=clock)
        self._window_s = window_s
        self._clock = clock
        self._samples: dict[str, deque[_Sample]] = {}
        self._engines: dict[str, dict[str, float]] = {}
        self._utilization: dict[str, float] = {}

    async def observe(self, groups: Iterable[GroupLike], gpus: Mapping[str, GpuSample],
                      serving: Collection[str]) -> None:
        """One poll round: the CPU demand of the engines that are ``serving`` (routable)
        against each GPU's NVML utilisation. An engine starting up is left out: loading a model
        keeps a core busy while the GPU idles, which says nothing about serving. A GPU without
        an NVML sample or without a serving engine adds no sample. The groups are read and the
        samples kept on the event loop (scrapes read them there); /proc is read on a worker
        thread."""
        leaders = {(group.plan.key, key): engine.pid for group in groups
                   for key, engine in group.engines.items()
                   if engine.pid is not None and key in serving}
        demand = await anyio.to_thread.run_sync(self._demand.read, leaders)
        now = self._clock()
        per_gpu: dict[str, dict[str, float]] = {}
        for (gpu, key), share in demand.items():
            per_gpu.setdefault(gpu, {})[key] = share
        for gpu in {gpu for gpu, _ in leaders} | set(self._samples):
            samples = self._samples.setdefault(gpu, deque())
            while samples and now - samples[0].at > self._window_s:
                samples.popleft()
            engines, reading = per_gpu.get(gpu), gpus.get(gpu)
            self._engines[gpu] = engines or {}
            if not engines or reading is None:
                continue
            self._utilization[gpu] = reading.utilization
            waiting = (reading.utilization < GPU_IDLE_BELOW
                       and min(engines.values()) >= CPU_BOUND_THREAD)
            samples.append(_Sample(now, waiting))

    def of(self, gpu: str) -> GpuDiagnosis | None:
        """The GPU's diagnosis for ``mpsd status`` and the status page; None before any sample."""
        samples = self._samples.get(gpu)
        if not samples:
            return None
        ratio = sum(s.waiting for s in samples) / len(samples)
        cpu_bound = len(samples) >= MIN_SAMPLES and ratio >= VERDICT_RATIO
        return {"cpu_bound": cpu_bound, "cpu_bound_ratio": round(ratio, 3),
                "window_s": self._window_s, "samples": len(samples),
                "gpu_utilization": self._utilization.get(gpu),
                "engine_cpu": {k: round(v, 3) for k, v in self._engines.get(gpu, {}).items()},
                "advice": ADVICE if cpu_bound else None}

    def collect(self) -> Iterator[Metric]:
        """Prometheus collector protocol (registered on mpsd's registry)."""
        ratio = GaugeMetricFamily(
            "mpsd_gpu_cpu_bound_ratio",
            f"Fraction of the last {WINDOW_S:g} s in which every engine of the GPU had a thread "
            "wanting a whole core while the GPU had idle time (NVML): the GPU waits for the "
            "engines' CPU.", labels=["gpu"])
        for gpu, samples in self._samples.items():
            if samples:
                ratio.add_metric([gpu], sum(s.waiting for s in samples) / len(samples))
        busiest = GaugeMetricFamily(
            "mpsd_engine_busiest_thread_cpu_ratio",
            "Fraction of the last poll interval in which the engine's busiest thread ran or "
            "waited for a CPU (1: it wants a whole core).", labels=["gpu", "engine"])
        for gpu, engines in self._engines.items():
            for engine, share in engines.items():
                busiest.add_metric([gpu, engine], share)
        yield from (ratio, busiest)
