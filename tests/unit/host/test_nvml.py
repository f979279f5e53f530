"""mpsd.host.nvml against the fake NVML library in tests/fakes/nvml (never mpsd's own code)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

_FAKE_DIR = Path(__file__).resolve().parents[2] / "fakes" / "nvml"


def _import_with_fake_nvml() -> tuple[Any, Any]:
    """Make ``import pynvml`` resolve to the fake, even if something imported the real one."""
    if str(_FAKE_DIR) not in sys.path:
        sys.path.insert(0, str(_FAKE_DIR))
    loaded = sys.modules.get("pynvml")
    if loaded is not None and Path(loaded.__file__ or "").parent != _FAKE_DIR:
        del sys.modules["pynvml"]
        sys.modules.pop("mpsd.host.nvml", None)  # re-import it so it binds the fake
    fake = importlib.import_module("pynvml")
    module = importlib.import_module("mpsd.host.nvml")
    assert module.pynvml is fake
    return fake, module


fake_nvml, host_nvml = _import_with_fake_nvml()

UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
GIB = 1 << 30


def _default_state() -> dict[str, Any]:
    return {
        "mode": "ok",
        "driver_version": "580.159.04",
        "gpus": [
            {
                "uuid": UUID0,
                "name": "NVIDIA H200",
                "memory_total": 140 * GIB,
                "memory_used": 30 * GIB,
                "util": 37,
                "cpus": [0, 1, 2, 3, 70],
                "processes": [{"pid": 900, "used": 29 * GIB}, {"pid": 101, "used": 5 * GIB}],
                "mps_processes": [{"pid": 101, "used": 10 * GIB}, {"pid": 102, "used": None}],
            },
            {
                "uuid": UUID1,
                "name": "NVIDIA H200",
                "memory_total": 140 * GIB,
                "util": None,
                "cpus": None,
                "mps_processes": None,
            },
        ],
        "events": [],
    }


class FakeNvml:
    """Writes the fake's state file atomically, so a reader never sees half a document."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state = _default_state()
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)

    def append_event(self, uuid: str, xid: int) -> None:
        self.state["events"].append({"uuid": uuid, "xid": xid})
        self.write()


@pytest.fixture
def nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    """A fresh fake NVML per test, and NVML released after it (checked through the fake)."""
    fake = FakeNvml(tmp_path / "nvml.json")
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake.path))
    yield fake
    host_nvml.shutdown_nvml()
    assert fake_nvml.init_count() == 0


class TestInventory:
    def test_lists_gpus_with_memory_driver_and_numa_cpus(self, nvml: FakeNvml) -> None:
        inventory = host_nvml.probe_inventory()

        assert inventory is not None
        first, second = inventory.gpus
        assert first == host_nvml.GpuInfo(
            index=0,
            uuid=UUID0,
            name="NVIDIA H200",
            memory_total=140 * GIB,
            cpus=(0, 1, 2, 3, 70) if (os.cpu_count() or 1) > 64 else (0, 1, 2, 3),
            driver_version="580.159.04",
        )
        assert second.index == 1
        assert second.cpus is None  # NVML could not say: unknown, not "no CPUs"

    @pytest.mark.parametrize(
        ("device", "expected"),
        [
            ("0", UUID0),
            ("1", UUID1),
            (UUID1, UUID1),
            (UUID0.upper().replace("GPU", "gpu"), UUID0),
            (" 0 ", UUID0),
            ("2", None),
            ("GPU-nope", None),
            ("", None),
        ],
    )
    def test_resolve_by_index_or_uuid(
        self, nvml: FakeNvml, device: str, expected: str | None
    ) -> None:
        inventory = host_nvml.probe_inventory()
        assert inventory is not None

        found = inventory.resolve(device)

        assert (found.uuid if found else None) == expected

    def test_probe_twice_initialises_nvml_once(self, nvml: FakeNvml) -> None:
        assert host_nvml.probe_inventory() is not None
        assert host_nvml.probe_inventory() is not None
        assert fake_nvml.init_count() == 1

    @pytest.mark.parametrize(
        ("mode", "reason"),
        [
            ("no_driver", "the NVIDIA kernel driver is not loaded"),
            ("no_library", "libnvidia-ml.so.1 not found (no NVIDIA driver installed)"),
        ],
    )
    def test_without_nvml_returns_none_and_logs_one_line(
        self, nvml: FakeNvml, mode: str, reason: str
    ) -> None:
        nvml.state["mode"] = mode
        nvml.write()

        with structlog.testing.capture_logs() as logs:
            inventory = host_nvml.probe_inventory()

        assert inventory is None
        assert logs == [{"event": "nvml_unavailable", "reason": reason, "log_level": "info"}]


class TestSample:
    def test_reads_memory_utilisation_and_processes(self, nvml: FakeNvml) -> None:
        result = host_nvml.sample(UUID0)

        assert result == host_nvml.GpuSample(
            memory_used=30 * GIB,
            memory_total=140 * GIB,
            utilization=0.37,
            # MPS clients first; pid 101 keeps its MPS figure; the MPS server (900) comes after.
            processes=((101, 10 * GIB), (102, 0), (900, 29 * GIB)),
        )

    def test_unsupported_counters_degrade_instead_of_failing(self, nvml: FakeNvml) -> None:
        result = host_nvml.sample(UUID1)

        assert result == host_nvml.GpuSample(
            memory_used=0, memory_total=140 * GIB, utilization=0.0, processes=()
        )

    def test_unknown_gpu_or_no_driver_gives_none(self, nvml: FakeNvml) -> None:
        assert host_nvml.sample("GPU-missing") is None
        host_nvml.shutdown_nvml()
        nvml.state["mode"] = "no_driver"
        nvml.write()
        assert host_nvml.sample(UUID0) is None


class Received:
    """Collects watcher deliveries; tests wait on it with a deadline, never with sleep."""

    def __init__(self, expected: int) -> None:
        self.items: list[tuple[str, int, str]] = []
        self.expected = expected
        self.done = threading.Event()

    def __call__(self, uuid: str, xid: int) -> None:
        self.items.append((uuid, xid, threading.current_thread().name))
        if len(self.items) >= self.expected:
            self.done.set()


class TestXidWatcher:
    def test_delivers_appended_events_for_watched_gpus_and_stops_promptly(
        self, nvml: FakeNvml
    ) -> None:
        """
        1. A watcher on GPU 0 starts with no pending events.
        2. Events are appended while it runs: one for an unwatched GPU, two for GPU 0.
        3. Only GPU 0's Xids arrive, in order, on the watcher thread.
        4. stop() returns well within one wait timeout plus margin, and NVML can shut down.
        """
        received = Received(expected=2)
        watcher = host_nvml.XidWatcher([UUID0], received, wait_timeout_s=0.2)
        assert watcher.start()
        try:
            nvml.append_event(UUID1, 48)
            nvml.append_event(UUID0, 79)
            nvml.append_event(UUID0, 13)

            assert received.done.wait(timeout=5)
        finally:
            stopped = threading.Event()
            stopper = threading.Thread(target=lambda: (watcher.stop(), stopped.set()))
            stopper.start()
            assert stopped.wait(timeout=2), "stop() did not return promptly"

        assert [(uuid, xid) for uuid, xid, _ in received.items] == [(UUID0, 79), (UUID0, 13)]
        assert {thread for _, _, thread in received.items} == {"mpsd-xid-watcher"}

    def test_a_failing_callback_does_not_end_monitoring(self, nvml: FakeNvml) -> None:
        received = Received(expected=1)

        def deliver(uuid: str, xid: int) -> None:
            if xid == 31:
                raise RuntimeError("loop closed")
            received(uuid, xid)

        watcher = host_nvml.XidWatcher([UUID0, UUID1], deliver, wait_timeout_s=0.2)
        assert watcher.start()
        try:
            with structlog.testing.capture_logs() as logs:
                nvml.append_event(UUID0, 31)
                nvml.append_event(UUID1, 95)
                assert received.done.wait(timeout=5)
        finally:
            watcher.stop()

        assert [(u, x) for u, x, _ in received.items] == [(UUID1, 95)]
        assert [entry["event"] for entry in logs] == ["xid_delivery_failed"]

    @pytest.mark.parametrize("mode", ["events_unsupported", "no_driver"])
    def test_start_returns_false_with_one_line_when_unsupported(
        self, nvml: FakeNvml, mode: str
    ) -> None:
        nvml.state["mode"] = mode
        nvml.write()
        watcher = host_nvml.XidWatcher([UUID0], Received(expected=1))

        with structlog.testing.capture_logs() as logs:
            assert watcher.start() is False

        assert [(entry["event"], entry["log_level"]) for entry in logs] == [
            ("xid_events_unsupported", "info")
        ]
        watcher.stop()  # harmless when never started

    def test_shutdown_nvml_stops_running_watchers(self, nvml: FakeNvml) -> None:
        watcher = host_nvml.XidWatcher([UUID0], Received(expected=1), wait_timeout_s=0.2)
        assert watcher.start()
        assert any(t.name == "mpsd-xid-watcher" for t in threading.enumerate())

        host_nvml.shutdown_nvml()

        assert fake_nvml.init_count() == 0
        assert not any(t.name == "mpsd-xid-watcher" for t in threading.enumerate())
