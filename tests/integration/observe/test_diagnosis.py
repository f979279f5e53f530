"""The CPU-bound diagnosis live: a GPU whose engine spins a core while NVML says the GPU idles
is diagnosed in ``/mpsd/status``, ``mpsd status`` and ``/metrics``; its neighbour is not.

NVML is the fake in ``tests/fakes/nvml`` (first on mpsd's PYTHONPATH); the CPU-bound engine is
the fake EngineCore with ``FAKE_ENGINE_CPU_BOUND`` (a thread on a whole core), so the demand
mpsd reads from /proc is real.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mpsd.observe.diagnosis import ADVICE
from tests.harness import FAKES, Mpsd, wait_until
from tests.integration.observe.test_observe import scrape, value

UUIDS = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000"]


def test_a_gpu_waiting_for_its_engines_cpu_is_diagnosed(mpsd: Mpsd,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state = mpsd.workdir / "nvml.json"
    gpus = [{"uuid": u, "name": "NVIDIA H200", "memory_total": 150_000_000_000,
             "memory_used": 20_000_000_000, "util": 30, "cpus": [0, 1]} for u in UUIDS]
    state.write_text(json.dumps({"mode": "ok", "gpus": gpus, "events": []}))
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.setenv("PYTHONPATH", f"{FAKES / 'nvml'}:{FAKES.parent.parent}")
    mpsd.gpus, mpsd.replicas, mpsd.mps = 2, 1, "off"
    mpsd.engine_env = {f"FAKE_ENGINE_CPU_BOUND_PORT_{mpsd.engine_port_base}": "1"}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    mpsd.wait_state("gpu1", "running")

    def diagnoses() -> dict[str, dict[str, object]] | None:
        found = {g["gpu"]: g.get("diagnosis") for g in mpsd.status()["groups"]}
        gpu0, gpu1 = found["gpu0"], found["gpu1"]
        done = gpu0 and gpu0["cpu_bound"] and gpu1 and gpu1["samples"] >= 3
        return found if done else None

    found = wait_until(diagnoses, 30, lambda: f"a verdict on gpu0\n{mpsd.status()['groups']}")
    assert found["gpu0"]["advice"] == ADVICE
    assert found["gpu0"]["gpu_utilization"] == 0.3
    # not 0: on a host whose cores are all busy, a thread that wakes often waits long for a
    # CPU and may want a core in a poll or two; the verdict needs half of them
    assert found["gpu1"]["cpu_bound"] is False and found["gpu1"]["cpu_bound_ratio"] < 0.5
    assert found["gpu1"]["advice"] is None

    samples = scrape(mpsd)
    assert value(samples, "mpsd_gpu_cpu_bound_ratio", gpu="gpu0") >= 0.5
    assert value(samples, "mpsd_gpu_cpu_bound_ratio", gpu="gpu1") < 0.5
    assert value(samples, "mpsd_engine_busiest_thread_cpu_ratio", gpu="gpu0") >= 0.85

    text = subprocess.run([sys.executable, "-m", "mpsd", "status", "-c", str(mpsd.config_file)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    gpu0_part, gpu1_part = text.split("● gpu1")
    said = "CPU side: the GPU waited for the engines' CPU"
    assert ADVICE in gpu0_part and said in gpu0_part
    assert ADVICE not in gpu1_part and said in gpu1_part
    assert mpsd.terminate() == 0
