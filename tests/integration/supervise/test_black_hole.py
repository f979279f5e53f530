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

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Mpsd, wait_until

pytestmark = pytest.mark.timeout(120)
CLIENTS = 16


@dataclass
class Sent:
    """One request of the load: when, to which engine port (from the answer), how it ended."""

    t0: float
    t1: float
    stream: bool
    port: int | None  # x-fake-engine of the answer; None when no engine answered
    ok: bool
    what: str


class MixedLoad:
    """Closed-loop clients on a thread: half streaming, lengths at random."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.clients = clients
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> MixedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _main(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(self._client(session, n) for n in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(n)
        while not self._stop.is_set():
            stream = n % 2 == 0
            body = {"model": "tiny", "prompt": "hi", "max_tokens": rng.randint(10, 60),
                    "stream": stream}
            t0 = time.time()
            port, ok, what = None, False, ""
            try:
                async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                    engine = resp.headers.get("x-fake-engine")
                    port = int(engine) if engine and engine.isdigit() else None
                    data = await resp.read()
                    ok = resp.status == 200 and (not stream or (
                        data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data))
                    what = f"{resp.status} {data[-160:]!r}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                what = repr(exc)
            self.sent.append(Sent(t0, time.time(), stream, port, ok, what))


def engine_core(leader: int) -> int:
    """The fake ``VLLM::EngineCore`` child of an engine's API server."""
    for task in Path(f"/proc/{leader}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if "EngineCor" in Path(f"/proc/{child}/comm").read_text():
                    return int(child)
    raise AssertionError(f"no EngineCore under {leader}")


def kill_numbers(m: Mpsd, load: MixedLoad, t_kill: float) -> dict[str, Any]:
    ports = {e["port"]: g["gpu"] for g in m.status()["groups"] for e in g["engines"]}
    faults = [e for e in m.events("fault_detected", gpu="gpu0") if e.get("at", 0) >= t_kill]
    fault = min(faults, key=lambda e: e["at"])
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
    3. mpsd's fault is the process death itself (pidfd) or MPS's client-exit line
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
    assert numbers["signal"] in {"engine_process_exit", "mps_client_exit", "mps_log"}, numbers
    assert numbers["failed"] <= numbers["in_flight_on_gpu0_at_kill"], numbers
    assert numbers["failed_on_gpu1"] == 0, numbers
    assert not mpsd.events("illegal_transition") and not mpsd.events("group_error")
