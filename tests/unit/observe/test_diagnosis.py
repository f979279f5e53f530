"""The CPU-bound diagnosis: the verdict from CPU demand and NVML utilisation, and the demand
read from a real /proc for real processes (a spinning one, a sleeping one).

The verdict tests write a /proc tree of their own (``stat`` and ``schedstat`` files, the
kernel's formats) and drive the clock, so each sample's demand is exact.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mpsd.host.nvml import GpuSample
from mpsd.observe.diagnosis import ADVICE, CpuDemand, Diagnosis
from tests.harness import wait_until

INTERVAL_S = 10.0


@dataclass
class Plan:
    key: str


@dataclass
class Engine:
    pid: int | None


@dataclass
class Group:
    plan: Plan
    engines: Mapping[str, Engine]


@dataclass
class FakeProc:
    """A /proc with one single-threaded process group per engine, and a clock."""

    root: Path
    now: float = 1000.0
    ns: dict[int, int] = field(default_factory=dict)

    def process(self, pid: int) -> None:
        (self.root / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (self.root / str(pid) / "stat").write_text(f"{pid} (VLLM::EngineCor) R 1 {pid} {pid} 0")
        self.ns[pid] = 0
        self.write(pid)

    def write(self, pid: int) -> None:
        (self.root / str(pid) / "task" / str(pid) / "schedstat").write_text(
            f"{self.ns[pid] // 2} {self.ns[pid] - self.ns[pid] // 2} 7\n")

    def advance(self, shares: Mapping[int, float]) -> None:
        """``INTERVAL_S`` pass; each process ran or waited ``share`` of them."""
        self.now += INTERVAL_S
        for pid, share in shares.items():
            self.ns[pid] += int(share * INTERVAL_S * 1e9)
            self.write(pid)

    def clock(self) -> float:
        return self.now


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path)
    for pid in (101, 102, 201):
        fake.process(pid)
    return fake


GROUPS = [Group(Plan("gpu0"), {"gpu0/a-0": Engine(101), "gpu0/a-1": Engine(102)}),
          Group(Plan("gpu1"), {"gpu1/b-0": Engine(201), "gpu1/b-1": Engine(None)})]


def nvml(utilization: float) -> GpuSample:
    return GpuSample(memory_used=1, memory_total=2, utilization=utilization, processes=())


SERVING = {key for group in GROUPS for key in group.engines}


def rounds(diagnosis: Diagnosis, proc: FakeProc, shares: Mapping[int, float],
           gpus: Mapping[str, GpuSample], count: int, serving: set[str] = SERVING) -> None:
    async def main() -> None:
        for _ in range(count):
            proc.advance(shares)
            await diagnosis.observe(GROUPS, gpus, serving)

    anyio.run(main)


def make(proc: FakeProc, window_s: float = 300.0) -> Diagnosis:
    diagnosis = Diagnosis(CpuDemand(proc.root, proc.clock), window_s, proc.clock)
    rounds(diagnosis, proc, {}, {}, 1)  # the first read has no interval yet
    return diagnosis


def exported(diagnosis: Diagnosis) -> dict[str, dict[str, float]]:
    registry = CollectorRegistry()
    registry.register(diagnosis)
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            key = sample.labels.get("engine") or sample.labels["gpu"]
            out.setdefault(sample.name, {})[key] = sample.value
    return out


def test_engines_on_a_core_each_while_the_gpu_idles_is_the_diagnosis(proc: FakeProc) -> None:
    diagnosis = make(proc)
    gpus = {"gpu0": nvml(0.45), "gpu1": nvml(0.45)}
    rounds(diagnosis, proc, {101: 1.0, 102: 0.93, 201: 0.2}, gpus, 2)
    early = diagnosis.of("gpu0")
    assert early is not None and early["cpu_bound_ratio"] == 1.0
    assert not early["cpu_bound"], "two samples are too few for a verdict"
    rounds(diagnosis, proc, {101: 1.0, 102: 0.93, 201: 0.2}, gpus, 1)
    gpu0 = diagnosis.of("gpu0")
    assert gpu0 == {"cpu_bound": True, "cpu_bound_ratio": 1.0, "window_s": 300.0, "samples": 3,
                    "gpu_utilization": 0.45, "engine_cpu": {"gpu0/a-0": 1.0, "gpu0/a-1": 0.93},
                    "advice": ADVICE}
    gpu1 = diagnosis.of("gpu1")
    assert gpu1 is not None and not gpu1["cpu_bound"] and gpu1["advice"] is None
    assert gpu1["engine_cpu"] == {"gpu1/b-0": 0.2}
    metrics = exported(diagnosis)
    assert metrics["mpsd_gpu_cpu_bound_ratio"] == {"gpu0": 1.0, "gpu1": 0.0}
    assert metrics["mpsd_engine_busiest_thread_cpu_ratio"] == {
        "gpu0/a-0": 1.0, "gpu0/a-1": 0.93, "gpu1/b-0": 0.2}


def test_one_engine_with_spare_cpu_or_a_busy_gpu_is_no_diagnosis(proc: FakeProc) -> None:
    diagnosis = make(proc)
    # gpu0: one engine has spare CPU (least-loaded routing would feed it first)
    rounds(diagnosis, proc, {101: 1.0, 102: 0.5, 201: 1.0}, {"gpu0": nvml(0.3),
                                                             "gpu1": nvml(0.95)}, 4)
    for gpu in ("gpu0", "gpu1"):  # gpu1: its engine is CPU-bound, but so is the GPU
        found = diagnosis.of(gpu)
        assert found is not None and found["cpu_bound_ratio"] == 0.0 and not found["cpu_bound"]


def test_the_ratio_is_over_the_window_and_old_samples_leave_it(proc: FakeProc) -> None:
    diagnosis = make(proc, window_s=4 * INTERVAL_S)
    gpus = {"gpu0": nvml(0.2)}
    rounds(diagnosis, proc, {101: 1.0, 102: 1.0}, gpus, 4)
    rounds(diagnosis, proc, {101: 0.1, 102: 0.1}, gpus, 2)
    found = diagnosis.of("gpu0")
    assert found is not None and (found["samples"], found["cpu_bound_ratio"]) == (5, 0.6)
    assert found["cpu_bound"]
    rounds(diagnosis, proc, {101: 0.1, 102: 0.1}, gpus, 2)
    found = diagnosis.of("gpu0")
    assert found is not None and found["cpu_bound_ratio"] == 0.2 and not found["cpu_bound"]


def test_engines_starting_up_are_left_out(proc: FakeProc) -> None:
    """Loading a model keeps a core busy while the GPU idles: not what the diagnosis is about."""
    diagnosis = make(proc)
    gpus = {"gpu0": nvml(0.1), "gpu1": nvml(0.1)}
    rounds(diagnosis, proc, {101: 1.0, 102: 1.0, 201: 1.0}, gpus, 4, serving={"gpu0/a-0"})
    gpu0 = diagnosis.of("gpu0")
    assert gpu0 is not None and gpu0["engine_cpu"] == {"gpu0/a-0": 1.0}
    assert gpu0["cpu_bound"]  # its serving engine wants a core
    assert diagnosis.of("gpu1") is None  # none of its engines serves yet


def test_without_nvml_there_is_no_diagnosis_and_no_series(proc: FakeProc) -> None:
    diagnosis = make(proc)
    rounds(diagnosis, proc, {101: 1.0, 102: 1.0, 201: 1.0}, {}, 4)
    assert diagnosis.of("gpu0") is None
    assert "mpsd_gpu_cpu_bound_ratio" not in exported(diagnosis)


@pytest.fixture
def spinner_and_sleeper() -> Iterator[dict[str, int]]:
    code = {"spin": "while True: pass", "sleep": "import time; time.sleep(120)"}
    procs = {name: subprocess.Popen([sys.executable, "-c", body], start_new_session=True)
             for name, body in code.items()}
    yield {name: p.pid for name, p in procs.items()}
    for p in procs.values():
        p.kill()
        p.wait()


def test_demand_of_real_processes(spinner_and_sleeper: dict[str, int]) -> None:
    """A spinning process wants a core even when it shares it; a sleeping one does not."""
    demand = CpuDemand()
    assert demand.read(spinner_and_sleeper) == {}
    seen: list[dict[str, float]] = []

    def measured() -> bool:
        seen.append(demand.read(spinner_and_sleeper))
        return len(seen) >= 3 and seen[-1]["spin"] >= 0.85 and seen[-1]["sleep"] < 0.05

    wait_until(measured, 10, lambda: f"demand readings {seen[-5:]}")
