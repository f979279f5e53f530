"""The status document: one typed contract for every view of a running mpsd.

The supervisor builds :class:`DaemonStatus`; the control socket serves it as ``GET /status``
(what ``mpsd status`` renders as text and ``--json`` prints); the proxy serves it, plus the
pool's view of every engine, as ``GET /mpsd/status`` (:class:`ProxyStatus`), which the status
page at ``/mpsd/`` polls. Keys are only ever added: readers of an older or newer daemon treat
a missing key as unknown, never as an error. Pure data, no I/O: every layer may import it.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict


class MpsMode(TypedDict):
    """Whether MPS is on for this host, and why (``mps.enabled = "auto"`` decides per host)."""

    enabled: bool
    reason: str


class GroupMps(TypedDict):
    """A group's MPS control daemon: its PID, pipe directory and the settings read back."""

    pid: int | None
    pipe_dir: str
    applied: dict[str, str]


class EngineStatus(TypedDict):
    """One planned engine as its group sees it."""

    key: str
    model: str
    port: int
    pid: int | None
    cpus: list[int]
    ready: bool
    inflight: int
    # what the reconcile loop says of it: stopped|starting|ready|backoff|failed|stopping
    state: NotRequired[str]
    reason: NotRequired[str]  # its last fault, or why it is FAILED
    restarts_in_window: NotRequired[int]
    # its last start (or the one under way) by phase, in order: seconds each, as the engine
    # reported them (process, engine_core, weights, compile, kv_cache, cuda_graphs, api_server)
    # and mpsd's own checks (ready)
    phases: NotRequired[dict[str, float]]


class DesiredStatus(TypedDict):
    """What the command queue last asked of a GPU (``generation`` grows with each change)."""

    generation: int
    drained: bool
    verdict: str | None  # why it needs an operator (a hardware Xid)


class HistoryEntry(TypedDict):
    """One fault or restart of a group (newest last, at most 50 kept)."""

    at: float
    signal: str
    reason: str
    engine: NotRequired[str]


class GpuDiagnosis(TypedDict):
    """Whether the GPU waits for its engines' CPU (:mod:`mpsd.observe.diagnosis`)."""

    cpu_bound: bool  # the verdict: cpu_bound_ratio over the threshold, with enough samples
    cpu_bound_ratio: float  # fraction of the window's samples in which the GPU waited
    window_s: float
    samples: int
    gpu_utilization: float | None  # NVML, last sample (0-1)
    engine_cpu: dict[str, float]  # engine -> its busiest thread's share of a core, last sample
    advice: str | None  # what to try, when cpu_bound


class GroupStatus(TypedDict):
    """One GPU: its state, why it is in it, its MPS daemon, engines and recent faults."""

    gpu: str
    device: str
    uuid: str
    state: str
    since: float
    reason: str
    restarts_in_window: int
    history: list[HistoryEntry]
    mps: GroupMps | None
    engines: list[EngineStatus]
    strategy: NotRequired[str]  # one_for_all (MPS on) or one_for_one (MPS off)
    desired: NotRequired[DesiredStatus]
    observed_generation: NotRequired[int]  # the desired generation the state describes
    diagnosis: NotRequired[GpuDiagnosis | None]  # None until the metrics poll has samples


class DaemonStatus(TypedDict):
    """``GET /status`` on the control socket: the status line, MPS mode and every group."""

    status: str
    pid: int  # the daemon's own process (its CPU time is what the proxy costs)
    mps: MpsMode
    groups: list[GroupStatus]


class BackendStatus(TypedDict):
    """One engine as the pool (and so the proxy) sees it."""

    key: str
    gpu: str
    model: str
    url: str
    routable: bool
    inflight: int
    requests: int
    connect_failures: int
    ejected: bool  # taken out of routing by the proxy (dead answer, refused, stall, 5xx run)
    ejections: int


class ProxyStatus(DaemonStatus):
    """``GET /mpsd/status`` on the proxy port: the daemon's status plus the pool's view."""

    engines: list[BackendStatus]
    inflight: int
    queued: int
    routable: int
