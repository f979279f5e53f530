"""A fake ``pynvml`` (nvidia-ml-py) for tests: only the calls mpsd makes, driven by a JSON file.

Tests put this directory first on ``sys.path`` (or ``PYTHONPATH`` for subprocesses) so that
``import pynvml`` finds it. The file named by ``FAKE_NVML_STATE`` is re-read on every call, so a
test can change the GPUs or append Xid events while code under test runs::

    {
      "mode": "ok",                  # or "no_driver", "no_library", "events_unsupported"
      "driver_version": "580.159.04",
      "gpus": [{"uuid": "GPU-…", "name": "NVIDIA H200", "memory_total": 150000000000,
                "memory_used": 0, "util": 37, "cpus": [0, 1, 2, 3],
                "processes": [{"pid": 12, "used": 1024}],      # plain compute processes
                "mps_processes": [{"pid": 34, "used": 512}]}],  # null => call unsupported
      "events": [{"uuid": "GPU-…", "xid": 79}]
    }

Like the real library, every call before ``nvmlInit`` (or after the matching ``nvmlShutdown``)
raises ``NVML_ERROR_UNINITIALIZED``; ``init_count()`` lets a test check the balance.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12

nvmlEventTypeXidCriticalError = 0x0000000000000008

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}

_HANDLE_BASE = 0x1000  # handles are ctypes pointers, like the real c_nvmlDevice_t
_POLL_S = 0.005  # how often a blocked nvmlEventSetWait re-reads the state file

_lock = threading.Lock()
_init = {"count": 0}  # a dict, not a rebound global: nvmlInit/nvmlShutdown mutate it in place


class NVMLError(Exception):
    """Same shape as the real one: the NVML return code is in ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"Unknown Error {self.value}")


def init_count() -> int:
    """How many ``nvmlInit`` calls are not yet balanced by ``nvmlShutdown`` (test helper)."""
    return _init["count"]


def _state() -> dict[str, Any]:
    path = os.environ.get("FAKE_NVML_STATE")
    if not path:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def _initialised() -> dict[str, Any]:
    if _init["count"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _state()


def _gpu(handle: ctypes.c_void_p) -> dict[str, Any]:
    gpus: list[dict[str, Any]] = _initialised()["gpus"]
    index = (handle.value or 0) - _HANDLE_BASE
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return gpus[index]


def nvmlInit() -> None:
    mode = _state().get("mode", "ok")
    if mode == "no_driver":
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    if mode == "no_library":
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    with _lock:
        _init["count"] += 1


def nvmlShutdown() -> None:
    with _lock:
        if _init["count"] <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _init["count"] -= 1


def nvmlSystemGetDriverVersion() -> str:
    return str(_initialised().get("driver_version", "580.159.04"))


def nvmlDeviceGetCount() -> int:
    return len(_initialised()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> ctypes.c_void_p:
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return ctypes.c_void_p(_HANDLE_BASE + index)


def nvmlDeviceGetHandleByUUID(uuid: str) -> ctypes.c_void_p:
    for index, gpu in enumerate(_initialised()["gpus"]):
        if gpu["uuid"] == uuid:
            return ctypes.c_void_p(_HANDLE_BASE + index)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(handle: ctypes.c_void_p) -> str:
    return str(_gpu(handle)["uuid"])


def nvmlDeviceGetName(handle: ctypes.c_void_p) -> str:
    return str(_gpu(handle).get("name", "NVIDIA Fake GPU"))


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None


def nvmlDeviceGetMemoryInfo(handle: ctypes.c_void_p) -> _Memory:
    gpu = _gpu(handle)
    total, used = int(gpu.get("memory_total", 0)), int(gpu.get("memory_used", 0))
    return _Memory(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle: ctypes.c_void_p) -> _Utilization:
    util = _gpu(handle).get("util")
    if util is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return _Utilization(gpu=int(util), memory=0)


def nvmlDeviceGetCpuAffinity(handle: ctypes.c_void_p, cpuSetSize: int) -> list[int]:
    cpus = _gpu(handle).get("cpus")
    if cpus is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    words = [0] * cpuSetSize
    for cpu in cpus:
        if cpu < cpuSetSize * 64:  # the real call silently drops what does not fit
            words[cpu // 64] |= 1 << (cpu % 64)
    return words


def _process_list(entries: list[dict[str, int]] | None) -> list[_Process]:
    if entries is None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return [_Process(pid=int(e["pid"]), usedGpuMemory=e.get("used")) for e in entries]


def nvmlDeviceGetMPSComputeRunningProcesses(handle: ctypes.c_void_p) -> list[_Process]:
    return _process_list(_gpu(handle).get("mps_processes", []))


def nvmlDeviceGetComputeRunningProcesses(handle: ctypes.c_void_p) -> list[_Process]:
    return _process_list(_gpu(handle).get("processes", []))


@dataclass
class _EventSet:
    uuids: set[str] = field(default_factory=set)
    consumed: int = 0  # index into the state file's "events" already looked at
    freed: bool = False


@dataclass
class _EventData:
    device: ctypes.c_void_p
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


def nvmlEventSetCreate() -> _EventSet:
    _initialised()
    return _EventSet()


def nvmlDeviceRegisterEvents(handle: ctypes.c_void_p, eventTypes: int, eventSet: _EventSet) -> None:
    if _initialised().get("mode") == "events_unsupported":
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if eventTypes & nvmlEventTypeXidCriticalError:
        eventSet.uuids.add(_gpu(handle)["uuid"])


def nvmlEventSetWait(eventSet: _EventSet, timeoutms: int) -> _EventData:
    """Return the next appended event for a registered GPU, or raise TIMEOUT after timeoutms."""
    deadline = time.monotonic() + timeoutms / 1000
    while True:
        if eventSet.freed:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        state = _initialised()
        events: list[dict[str, Any]] = state.get("events", [])
        while eventSet.consumed < len(events):
            event = events[eventSet.consumed]
            eventSet.consumed += 1
            if event["uuid"] in eventSet.uuids:
                handle = nvmlDeviceGetHandleByUUID(event["uuid"])
                return _EventData(handle, nvmlEventTypeXidCriticalError, int(event["xid"]))
        if time.monotonic() >= deadline:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        time.sleep(_POLL_S)


def nvmlEventSetFree(eventSet: _EventSet) -> None:
    _initialised()
    eventSet.freed = True
