"""Where an engine's start goes: its phases in /mpsd/status, `mpsd status`, the ready line and
/metrics, and a warning naming the phase when a start is much slower than the one before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import Mpsd, wait_until
from tests.integration.observe.test_observe import scrape, value

GPU_PHASES = ["process", "engine_core", "weights", "compile", "kv_cache", "cuda_graphs",
              "api_server", "ready"]


def daemon(workdir: Path, phases: str) -> Mpsd:
    return Mpsd(workdir, replicas=1, mps="off", engine_env={"FAKE_ENGINE_PHASES_S": phases})


def test_start_phases_are_shown_and_a_slower_start_names_the_phase(workdir: Path) -> None:
    first = daemon(workdir, "weights=0.3,compile=0.5").start()
    try:
        first.wait_state("gpu0", "running")
        engine = first.status()["groups"][0]["engines"][0]
        phases = engine["phases"]
        assert list(phases) == GPU_PHASES
        assert phases["weights"] >= 0.3 and phases["compile"] >= 0.5
        ready = first.wait_log("engine_ready")[0]
        assert list(ready["phases"]) == GPU_PHASES
        text = subprocess.run([sys.executable, "-m", "mpsd", "status", "-c",
                               str(first.config_file)], capture_output=True, text=True,
                              timeout=60, check=True).stdout
        assert "Last start:" in text and "gpu0/tiny-0" in text and "compile" in text

        def compile_seconds() -> float:
            return value(scrape(first), "mpsd_engine_start_seconds", gpu="gpu0",
                         engine="gpu0/tiny-0", phase="compile")

        assert wait_until(compile_seconds, 20, "mpsd_engine_start_seconds on /metrics") >= 0.5
        assert not first.events("engine_start_slower")
        assert first.terminate() == 0
    finally:
        first.kill()

    second = daemon(workdir, "weights=0.3,compile=5").start()  # a cold compile cache
    try:
        slower = second.wait_log("engine_start_slower")[0]
        assert slower["engine"] == "gpu0/tiny-0" and slower["phase"] == "compile"
        assert slower["phase_previous_s"] < 2 and slower["phase_s"] >= 5
        assert "compile grew from" in slower["msg"]
    finally:
        second.kill()
