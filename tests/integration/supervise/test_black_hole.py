"""A dead EngineCore is never a black hole (issue #10), with fake engines, MPS on and off.

Two GPUs with two engines each serve one model under mixed load (streaming and not) through
mpsd's proxy. ``kill -9`` of one gpu0 engine's ``EngineCore`` child leaves its API server up
and answering 500 with vLLM's ``EngineDeadError`` body for seconds (``FAKE_ENGINE_DEAD_EXIT_S``),
as real vLLM does. mpsd must notice the death itself (the pidfd on the process, or the MPS
server's client-exit line), not the API server's exit or failed probes; only requests already
in flight on the faulted GPU may fail; gpu1 loses nothing. The numbers are printed
(``pytest -s``): kill to unrouted, in flight on the faulted GPU at the kill, failures.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from typing import Any

import pytest

from tests.harness import Mpsd, http, wait_until
from tests.load import MixedLoad, engine_core, first_fault

pytestmark = pytest.mark.timeout(120)
CLIENTS = 16


def kill_numbers(m: Mpsd, load: MixedLoad, t_kill: float) -> dict[str, Any]:
    ports = {e["port"]: g["gpu"] for g in m.status()["groups"] for e in g["engines"]}
    fault = first_fault(m, "gpu0", t_kill)
    assert fault is not None
    in_flight = [s for s in load.sent if s.t0 < t_kill < s.t1]
    # a request that failed without an engine's answer is counted against gpu0 (conservative)
    on_gpu0 = [s for s in in_flight if s.port is None or ports.get(s.port) == "gpu0"]
    failed = [s for s in load.sent if not s.ok and s.t1 > t_kill]
    return {
        "signal": fault["signal"],
        "kill_to_unrouted_ms": round((fault["at"] - t_kill) * 1000, 1),
        "in_flight_at_kill": len(in_flight),
        "in_flight_on_gpu0_at_kill": len(on_gpu0),
        "failed": len(failed),
        "failed_on_gpu1": sum(1 for s in failed if s.port and ports.get(s.port) == "gpu1"),
        "failures": sorted({s.what[:120] for s in failed})[:3],
        "served": sum(1 for s in load.sent if s.ok),
    }


@pytest.mark.parametrize("mps", ["on", "off"])
def test_enginecore_kill_under_mixed_load_fails_only_what_was_in_flight_on_its_gpu(
        mpsd: Mpsd, mps: str) -> None:
    """1. 2 GPUs x 2 engines, 16 clients (half streaming), load running
    2. kill -9 of gpu0's first engine's EngineCore; its API server keeps answering 500
    3. mpsd's fault is the process death itself (pidfd), MPS's client-exit line, or the proxy
       ejecting the engine at its first dead answer
    4. failures <= requests in flight on gpu0 at the kill; none on gpu1; no illegal state"""
    mpsd.gpus, mpsd.mps = 2, mps
    mpsd.engine_env = {"FAKE_ENGINE_TOKEN_DELAY_S": "0.005", "FAKE_ENGINE_DEAD_EXIT_S": "5"}
    mpsd.start()
    for gpu in ("gpu0", "gpu1"):
        mpsd.wait_state(gpu, "running")
    leader = mpsd.engine_pids("gpu0")["gpu0/tiny-0"]
    core = engine_core(leader)
    with MixedLoad(mpsd.url, CLIENTS) as load:
        wait_until(lambda: sum(s.ok for s in load.sent) >= 4 * CLIENTS, 30, "load warmed up")
        t_kill = time.time()
        os.kill(core, signal.SIGKILL)
        mpsd.wait_log("fault_detected", gpu="gpu0")
        restarted = "running" if mps == "on" else None
        if restarted:
            mpsd.wait_state("gpu0", "running", after=1)
        else:
            mpsd.wait_log("engine_ready", count=5)  # 4 at the start, then the restarted one
        served = sum(s.ok for s in load.sent)
        wait_until(lambda: sum(s.ok for s in load.sent) >= served + 2 * CLIENTS, 30,
                   "load served again")
    numbers = kill_numbers(mpsd, load, t_kill)
    print(f"\nblack hole, mps {mps}: {json.dumps(numbers)}")
    # the death itself (pidfd, MPS), or the proxy reading a dead engine's answer: never the
    # API server's exit or failed probes, which come seconds later
    assert numbers["signal"] in {"engine_process_exit", "mps_client_exit", "mps_log",
                                 "engine_dead"}, numbers
    assert numbers["failed"] <= numbers["in_flight_on_gpu0_at_kill"], numbers
    assert numbers["failed_on_gpu1"] == 0, numbers
    assert not mpsd.events("illegal_transition") and not mpsd.events("group_error")


def test_a_hung_engine_is_unrouted_at_its_first_failed_probe_long_before_its_fault(
        mpsd: Mpsd) -> None:
    """MPS off, ``health_failures = 4``: a hung engine (every request and ``/health`` hang) is
    out of routing after one probe times out (the timeout follows ``health_interval_s``), its
    sibling takes every request meanwhile, and only the fourth failure restarts it."""
    mpsd.mps = "off"
    mpsd.overrides = {"defaults": {"health_interval_s": 0.5, "health_failures": 4}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    hung, sibling = mpsd.engine_ports()
    t_hang = time.time()
    mpsd.control(hung, "hang")
    first = mpsd.wait_log("health_probe_failed", engine="gpu0/tiny-0", timeout=10)[0]
    ready = {e["port"]: e["ready"] for e in mpsd.status()["groups"][0]["engines"]}
    assert ready == {hung: False, sibling: True} and not mpsd.events("fault_detected")
    code, headers, _ = http("POST", f"{mpsd.url}/v1/completions",
                            {"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=5)
    assert code == 200 and headers["x-fake-engine"] == str(sibling)
    fault = mpsd.wait_log("fault_detected", gpu="gpu0", timeout=20)[0]
    assert fault["signal"] == "health" and fault["engine"] == "gpu0/tiny-0"
    unrouted = datetime.fromisoformat(first["timestamp"]).timestamp() - t_hang
    print(f"\nhung engine: unrouted after {unrouted:.1f} s, restarted after "
          f"{fault['at'] - t_hang:.1f} s")
    assert unrouted < fault["at"] - t_hang
