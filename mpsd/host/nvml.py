"""What NVML says about this host's GPUs: inventory, live samples, and Xid events.

Every function here blocks (NVML is a C library that can stall for seconds on a sick GPU), so the
event loop calls them through ``anyio.to_thread.run_sync``; :class:`XidWatcher` runs its blocking
wait on a thread of its own. NVML is process-wide state: it is initialised once, lazily, by the
first call that needs it, and shut down by :func:`shutdown_nvml` (also registered with ``atexit``).
A host without the driver, the library or any GPU is normal (CI, a CPU box): nothing here raises
for that; the functions return ``None`` / ``False`` instead.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pynvml
import structlog

# Named through the factory argument: a `logger=` keyword clashes with structlog's own parameter.
_log: structlog.typing.FilteringBoundLogger = structlog.get_logger("mpsd.gpus")

# Why NVML init failed, in words an operator can act on; other codes fall back to NVML's text.
_INIT_REASONS: dict[int, str] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 not found (no NVIDIA driver installed)",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
}


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML enumerates it (``index`` is nvidia-smi's index, i.e. PCI bus order)."""

    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    cpus: tuple[int, ...] | None  # CPUs NVML calls ideal for this GPU (its NUMA node), if known
    driver_version: str


@dataclass(frozen=True)
class GpuInventory:
    """The GPUs found at probe time; configs name GPUs by index or UUID and resolve here."""

    gpus: tuple[GpuInfo, ...]

    def resolve(self, device: str) -> GpuInfo | None:
        """Find a GPU by its index (``"0"``) or its UUID (``"GPU-…"``, case-insensitive)."""
        device = device.strip()
        if device.isdigit():
            return next((g for g in self.gpus if g.index == int(device)), None)
        wanted = device.casefold()
        return next((g for g in self.gpus if g.uuid.casefold() == wanted), None)


@dataclass(frozen=True)
class GpuSample:
    """A point-in-time reading of one GPU, for metrics and the restart gate."""

    memory_used: int  # bytes
    memory_total: int  # bytes
    utilization: float  # 0..1 over NVML's last sample period; 0.0 where NVML cannot tell
    processes: tuple[tuple[int, int], ...]  # (pid, used bytes): MPS clients, then other contexts


class _Nvml:
    """The process's one NVML session.

    NVML keeps a reference count per ``nvmlInit``; holding exactly one keeps shutdown simple and
    makes the lifetime explicit. The lock serialises init/shutdown between the event loop's worker
    threads and the watcher threads (NVML's own calls are thread-safe). Watchers are tracked so
    that shutdown can stop them first: freeing NVML under a thread blocked in
    ``nvmlEventSetWait`` is undefined behaviour in the C library.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._up = False
        self._atexit_registered = False
        self.watchers: weakref.WeakSet[XidWatcher] = weakref.WeakSet()

    def ensure(self) -> None:
        """Initialise NVML if needed; raises ``pynvml.NVMLError`` when it cannot be."""
        with self._lock:
            if self._up:
                return
            pynvml.nvmlInit()
            self._up = True
            if not self._atexit_registered:
                atexit.register(self.shutdown)
                self._atexit_registered = True

    def shutdown(self) -> None:
        """Stop watchers, then release NVML; a later call to ``ensure`` starts a new session."""
        for watcher in list(self.watchers):
            watcher.stop()
        with self._lock:
            if not self._up:
                return
            self._up = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as err:
                _log.debug("nvml_shutdown_failed", error=str(err))


_NVML = _Nvml()


def shutdown_nvml() -> None:
    """Release NVML (stopping any :class:`XidWatcher` first). Call when no NVML user is left."""
    _NVML.shutdown()


def _text(value: str | bytes) -> str:
    """NVML strings: ``str`` from current nvidia-ml-py, ``bytes`` from older releases."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _cpu_affinity(handle: object) -> tuple[int, ...] | None:
    """Decode NVML's CPU bitmask (64 CPUs per word); None where NVML cannot say."""
    words = ((os.cpu_count() or 1) + 63) // 64
    try:
        mask = pynvml.nvmlDeviceGetCpuAffinity(handle, words)
    except pynvml.NVMLError:
        return None
    cpus = tuple(
        word_index * 64 + bit
        for word_index, word in enumerate(mask)
        for bit in range(64)
        if int(word) >> bit & 1
    )
    return cpus or None


def _gpu_info(index: int, driver_version: str) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return GpuInfo(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        cpus=_cpu_affinity(handle),
        driver_version=driver_version,
    )


def probe_inventory() -> GpuInventory | None:
    """Enumerate the GPUs, or return None (after one ``nvml_unavailable`` line) without NVML.

    A GPU that fails to answer during enumeration is left out with a warning rather than hiding
    the healthy ones: a config that names it then fails to resolve, which is the right outcome.
    """
    try:
        _NVML.ensure()
        driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        count = int(pynvml.nvmlDeviceGetCount())
    except (pynvml.NVMLError, OSError) as err:
        code = getattr(err, "value", None)
        reason = _INIT_REASONS.get(code, str(err)) if isinstance(code, int) else str(err)
        _log.info("nvml_unavailable", reason=reason)
        return None
    gpus: list[GpuInfo] = []
    for index in range(count):
        try:
            gpus.append(_gpu_info(index, driver_version))
        except pynvml.NVMLError as err:
            _log.warning("gpu_probe_failed", index=index, error=str(err))
    return GpuInventory(gpus=tuple(gpus))


def _processes(handle: object) -> tuple[tuple[int, int], ...]:
    """MPS clients first, then any other compute context, each pid once.

    Both lists matter: under MPS the plain list shows only ``nvidia-cuda-mps-server`` (whose
    figure is the sum of its clients), while an engine that missed the pipe directory runs
    outside MPS and appears only there (mps.md §2.5). Either call may be unsupported.
    """
    seen: dict[int, int] = {}
    for query in (
        pynvml.nvmlDeviceGetMPSComputeRunningProcesses,
        pynvml.nvmlDeviceGetComputeRunningProcesses,
    ):
        try:
            procs = query(handle)
        except pynvml.NVMLError:
            continue
        for proc in procs:
            seen.setdefault(int(proc.pid), int(proc.usedGpuMemory or 0))
    return tuple(seen.items())


def sample(uuid: str) -> GpuSample | None:
    """Read memory, utilisation and per-process memory of one GPU; None if NVML cannot."""
    try:
        _NVML.ensure()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError as err:
        _log.debug("gpu_sample_failed", gpu=uuid, error=str(err))
        return None
    try:
        utilization = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
    except pynvml.NVMLError:
        utilization = 0.0  # some SKUs/vGPU profiles do not report it; memory is still useful
    return GpuSample(
        memory_used=int(memory.used),
        memory_total=int(memory.total),
        utilization=min(max(utilization, 0.0), 1.0),
        processes=_processes(handle),
    )


def _handle_key(handle: object) -> int | None:
    """A hashable identity for an NVML device handle (a ctypes pointer)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value  # type: ignore[arg-type]
    except (TypeError, ctypes.ArgumentError):
        return None


class XidWatcher:
    """Delivers ``(uuid, xid)`` for every critical Xid NVML reports on the watched GPUs.

    NVML's event API is a blocking wait, so it runs on a daemon thread that wakes every
    ``wait_timeout_s`` to notice :meth:`stop`. ``deliver`` is called *on that thread*: wrap it
    (``loop.call_soon_threadsafe``) before handing it in. ``start`` and ``stop`` block too.
    """

    def __init__(
        self,
        uuids: Sequence[str],
        deliver: Callable[[str, int], None],
        *,
        wait_timeout_s: float = 1.0,
    ) -> None:
        self._uuids = tuple(uuids)
        self._deliver = deliver
        self._wait_ms = max(1, int(wait_timeout_s * 1000))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Register for Xid events and start the thread; False (one log line) if unsupported."""
        if self._thread is not None:
            return True
        try:
            _NVML.ensure()
            event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            _log.info("xid_events_unsupported", reason=str(err))
            return False
        owners: dict[int, str] = {}
        try:
            for uuid in self._uuids:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                pynvml.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, event_set
                )
                key = _handle_key(handle)
                if key is not None:
                    owners[key] = uuid
        except pynvml.NVMLError as err:
            _log.info("xid_events_unsupported", gpu=uuid, reason=str(err))
            _free(event_set)
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(event_set, owners), name="mpsd-xid-watcher", daemon=True
        )
        _NVML.watchers.add(self)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Ask the thread to finish and wait for it (at most about one wait timeout)."""
        thread, self._thread = self._thread, None
        _NVML.watchers.discard(self)
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=self._wait_ms / 1000 + 5.0)
        if thread.is_alive():
            _log.warning("xid_watcher_stuck", wait_ms=self._wait_ms)

    def _run(self, event_set: object, owners: dict[int, str]) -> None:
        """The thread body: it owns ``event_set`` and frees it, so no wait is ever cut short."""
        try:
            while not self._stop.is_set():
                try:
                    data = pynvml.nvmlEventSetWait(event_set, self._wait_ms)
                except pynvml.NVMLError as err:
                    if err.value != pynvml.NVML_ERROR_TIMEOUT:
                        # e.g. GPU lost: don't spin; the Xid that explains it is usually queued.
                        _log.warning("xid_wait_failed", error=str(err))
                        self._stop.wait(self._wait_ms / 1000)
                    continue
                if int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
                    self._dispatch(data, owners)
        finally:
            _free(event_set)

    def _dispatch(self, data: object, owners: dict[int, str]) -> None:
        """Attribute an event to its GPU and pass it on; a failing callback is only logged."""
        xid = int(data.eventData)  # type: ignore[attr-defined]
        device = data.device  # type: ignore[attr-defined]
        key = _handle_key(device)
        uuid = owners.get(key) if key is not None else None
        if uuid is None:
            try:
                uuid = _text(pynvml.nvmlDeviceGetUUID(device))
            except pynvml.NVMLError as err:
                _log.warning("xid_unattributed", xid=xid, error=str(err))
                return
        try:
            self._deliver(uuid, xid)
        except Exception:
            # The thread is a boundary: a broken callback must not end Xid monitoring.
            _log.exception("xid_delivery_failed", gpu=uuid, xid=xid)


def _free(event_set: object) -> None:
    try:
        pynvml.nvmlEventSetFree(event_set)
    except pynvml.NVMLError as err:
        _log.debug("nvml_event_set_free_failed", error=str(err))
