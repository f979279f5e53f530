#!/usr/bin/env python3
"""What one engine's fault costs under MPS: errors, held requests and time until the GPU is back.

::

    benchmarks/recovery.py [--gpus 2] [--kills 3] [--clients 16] [--start-delay 3]
                           [--arms seq:0,seq:30,together:0,together:30] [--json FILE] [--keep]

With MPS on, one engine's fault restarts every engine of its GPU (one_for_all: the clients of
one MPS server share a context). What that costs is set by mpsd: how its engines come back (one
after another, or together when every engine has ``--kv-cache-memory-bytes`` and vLLM need not
profile free memory) and what a request meets meanwhile (an immediate 503, or a hold of up to
``[proxy] recovery_hold_s`` until an engine of the model is ready again).

Each arm starts ``mpsd run`` on the fake MPS binary and fake engines (``--gpus`` GPUs x 2
engines, each engine taking ``--start-delay`` seconds to load), runs ``--clients`` closed-loop
clients (half streaming) and ``kill -9``s one gpu0 engine's ``EngineCore`` ``--kills`` times,
each once gpu0 is RUNNING again and serving. An arm is ``START:HOLD``: ``seq`` (no KV flag:
one after another) or ``together`` (``--kv-cache-memory-bytes`` on every engine), and the
``recovery_hold_s`` in seconds. Per kill it records:

- requests *sent after* the kill (until gpu0 is fully back) that failed (the goal is 0),
- requests in flight at the kill, and how many of them failed (those on gpu0 die with it),
- fault -> first engine of gpu0 ready, fault -> the first 200 answered by gpu0 (response
  head), fault -> gpu0 RUNNING (every engine back), and the slowest answer head of a request
  sent after the kill (the latency a hold costs instead of an error).

With ``--gpus 2`` the other GPU serves the model, so nothing should wait and nothing fail;
``--gpus 1`` is the case where holding matters. A client that gets an error waits 50 ms before
its next request (so the error counts depend on that pause; the error window does not).
Arms run one after another in one invocation (same host, same load); the table shows the
median over kills. Absolute times on the fakes only compare arms; GPU times come from
``tests/gpu/test_black_hole.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Event, Mpsd, wait_until  # noqa: E402
from tests.load import engine_core, first_fault  # noqa: E402

KILLED = "gpu0/tiny-1"
KV_ARGS = ["--kv-cache-memory-bytes", "1073741824"]
ERROR_PAUSE_S = 0.05


@dataclass
class Sent:
    """One request: sent, response head, end; the engine port that answered; how it ended."""

    t0: float
    t_head: float | None
    t1: float
    port: int | None
    status: int  # 0: no response
    ok: bool


class Load:
    """Closed-loop clients on a thread of their own (half streaming, lengths at random)."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.clients = clients
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)

    def ok_count(self, ports: set[int] | None = None) -> int:
        return sum(s.ok and (ports is None or s.port in ports) for s in list(self.sent))

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=90)  # longer than a hold
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session, n) for n in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(n)
        while not self._stop.is_set():
            stream = n % 2 == 0
            body = {"model": "tiny", "prompt": "hi", "max_tokens": rng.randint(10, 60),
                    "stream": stream}
            t0, t_head, port, status, ok = time.time(), None, None, 0, False
            try:
                async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                    t_head, status = time.time(), resp.status
                    engine = resp.headers.get("x-fake-engine")
                    port = int(engine) if engine and engine.isdigit() else None
                    data = await resp.read()
                    ok = status == 200 and (not stream or (
                        data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data))
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.sent.append(Sent(t0, t_head, time.time(), port, status, ok))
            if not ok:
                await asyncio.sleep(ERROR_PAUSE_S)


def epoch(event: Event) -> float:
    """A JSON log event's ISO timestamp as epoch seconds."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def first_after(m: Mpsd, t: float, event: str, **match: Any) -> float | None:
    return min((epoch(e) for e in m.events(event, **match) if epoch(e) > t), default=None)


def one_kill(m: Mpsd, load: Load, gpu0_ports: set[int]) -> dict[str, float]:
    """Kill the EngineCore of a serving gpu0 engine; return once gpu0 is back and serving."""
    running_before = len(m.events("group_state", gpu="gpu0", to="running"))
    leader = m.engine_pids("gpu0")[KILLED]
    core = wait_until(lambda: engine_core(leader), 30, "EngineCore")
    t_kill = time.time()
    os.kill(core, signal.SIGKILL)
    m.wait_state("gpu0", "running", timeout=120, after=running_before)
    served = load.ok_count(gpu0_ports)
    wait_until(lambda: load.ok_count(gpu0_ports) >= served + 4, 60, "gpu0 serving again")
    fault = wait_until(lambda: first_fault(m, "gpu0", t_kill), 10, "mpsd's fault event")
    time.sleep(1.0)  # settle: the next kill meets a steady load
    ready = first_after(m, t_kill, "engine_ready", gpu="gpu0")
    back = first_after(m, t_kill, "group_state", gpu="gpu0", to="running")
    group = first_after(m, t_kill, "group_state", gpu="gpu0", to="recovering")
    assert ready is not None and back is not None and group is not None
    phases = {f"{e['phase']}_phase_s": float(e["seconds"])
              for e in m.events("recovery_phase", gpu="gpu0") if t_kill < epoch(e) < back + 0.1}
    return {"t_kill": t_kill, "t_fault": float(fault["at"]), "t_group": group,
            "t_ready": ready, "t_back": back, **phases}


def kill_numbers(sent: list[Sent], kill: dict[str, float], gpu0_ports: set[int]) -> dict[str, Any]:
    """What the load saw around one kill (see the module docstring)."""
    t_kill, t_fault, t_back = kill["t_kill"], kill["t_fault"], kill["t_back"]
    t_group = kill["t_group"]
    in_flight = [s for s in sent if s.t0 < t_kill < s.t1]
    after = [s for s in sent if t_kill <= s.t0 <= t_back]
    failed_after = [s for s in after if not s.ok]
    by_status: dict[str, int] = {}
    for s in failed_after:
        by_status[str(s.status)] = by_status.get(str(s.status), 0) + 1
    # sent once the whole GPU was unrouted (before that a sibling may still answer briefly)
    first_200 = min((s.t_head for s in sent if s.ok and s.port in gpu0_ports and s.t0 >= t_group
                     and s.t_head is not None), default=float("nan"))
    heads = [s.t_head - s.t0 for s in after if s.t_head is not None]
    return {
        "kill_to_fault_ms": round((t_fault - t_kill) * 1000, 1),
        "kill_to_group_fault_ms": round((t_group - t_kill) * 1000, 1),
        "mps_phase_s": kill.get("mps_phase_s", float("nan")),
        "engine_phase_s": kill.get("engine_phase_s", float("nan")),
        "fault_to_first_ready_s": round(kill["t_ready"] - t_fault, 3),
        "fault_to_first_200_s": round(first_200 - t_fault, 3),
        "fault_to_back_s": round(t_back - t_fault, 3),
        "in_flight": len(in_flight), "in_flight_failed": sum(not s.ok for s in in_flight),
        "sent_after": len(after), "failed_after": len(failed_after),
        "failed_after_by_status": by_status,
        # sent after the kill but before the whole GPU was unrouted (the fault's detection)
        "failed_before_group_fault": sum(s.t0 < t_group for s in failed_after),
        "failed_after_ports": sorted({s.port for s in failed_after if s.port is not None}),
        "error_window_s": round(max((s.t0 for s in failed_after), default=t_kill) - t_kill, 3),
        "max_head_after_s": round(max(heads, default=0.0), 3),
    }


def run_arm(arm: str, gpus: int, kills: int, clients: int, start_delay: float,
            keep: bool) -> list[dict[str, Any]]:
    start, _, hold = arm.partition(":")
    workdir = Path(tempfile.mkdtemp(prefix="mrec-"))
    m = Mpsd(workdir, gpus=gpus, mps="on")
    m.engine_env = {"FAKE_ENGINE_TOKEN_DELAY_S": "0.005",
                    "FAKE_ENGINE_START_DELAY_S": str(start_delay)}
    m.overrides = {
        "restart": {"max_restarts": kills + 5, "backoff_initial_s": 0.05},
        "proxy": {"recovery_hold_s": float(hold)},
        # probes that a loaded CI host can answer in time (the harness's are tight)
        "defaults": {"startup_timeout_s": 60, "health_interval_s": 1.0, "health_failures": 3},
    }
    if start == "together":
        m.overrides["engine"] = {"args": KV_ARGS}
    results: list[dict[str, Any]] = []
    try:
        m.start()
        for g in range(gpus):
            m.wait_state(f"gpu{g}", "running", timeout=180)
        gpu0_ports = {int(e["port"]) for g in m.status()["groups"] if g["gpu"] == "gpu0"
                      for e in g["engines"]}
        marks: list[dict[str, float]] = []
        with Load(m.url, clients) as load:
            wait_until(lambda: load.ok_count() >= 4 * clients, 60, "warm-up")
            try:
                for _ in range(kills):
                    marks.append(one_kill(m, load, gpu0_ports))
            except AssertionError as exc:  # a host too loaded to recover in time: say so
                print(f"{arm}: kill {len(marks) + 1} not measured: {str(exc)[:300]}",
                      file=sys.stderr)
        for mark in marks:
            results.append({"arm": arm, "gpus": gpus,
                            **kill_numbers(list(load.sent), mark, gpu0_ports)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        m.kill()
        if keep:
            print(f"{arm}: mpsd's log and the fakes' events in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


COLUMNS = [("failed_after", "failed sent after kill"),
           ("failed_before_group_fault", "of them before GPU unrouted"),
           ("in_flight", "in flight"), ("in_flight_failed", "of them failed"),
           ("mps_phase_s", "MPS phase s"), ("engine_phase_s", "engine phase s"),
           ("fault_to_first_ready_s", "fault→1st ready s"),
           ("fault_to_first_200_s", "fault→1st 200 gpu0 s"),
           ("fault_to_back_s", "fault→GPU back s"),
           ("max_head_after_s", "slowest head after s")]


def table(results: list[dict[str, Any]], arms: list[str], gpus: int) -> str:
    """Markdown: one row per arm, the median over its kills (failed: also the total)."""
    head = ["arm (start:hold_s)", "kills", *(title for _, title in COLUMNS)]
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm and r["gpus"] == gpus]
        if not rows:
            continue
        cells = [arm, str(len(rows))]
        for key, _ in COLUMNS:
            median = statistics.median(r[key] for r in rows)
            cell = f"{median:g}"
            if key.startswith("failed"):
                cell += f" (Σ {sum(r[key] for r in rows)})"
            cells.append(cell)
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--start-delay", type=float, default=3.0)
    parser.add_argument("--arms", default="seq:0,seq:30,together:0,together:30")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    for arm in arms:
        start, _, hold = arm.partition(":")
        if start not in ("seq", "together") or not hold.replace(".", "", 1).isdigit():
            parser.error(f"arm {arm!r}: START:HOLD_S with START seq or together")
    results: list[dict[str, Any]] = []
    for arm in arms:
        results += run_arm(arm, args.gpus, args.kills, args.clients, args.start_delay,
                           args.keep)
    print(f"\n{args.gpus} GPU(s) x 2 engines, MPS on, engine start {args.start_delay:g} s, "
          f"{args.clients} clients; median over kills\n")
    print(table(results, arms, args.gpus))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
