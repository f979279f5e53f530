#!/usr/bin/env python3
"""Kill to unrouted, over repeated EngineCore kills: how fast mpsd stops routing to a dead engine.

::

    benchmarks/fault_unroute.py [--kills 20] [--mps on|off] [--clients 16] [--json FILE] [--keep]

Starts ``mpsd run`` with the fake MPS binary and fake engines (2 GPUs x 2 engines, as
``tests/integration/supervise/test_black_hole.py``), runs a mixed closed-loop load (half
streaming), and ``kill -9``s one gpu0 engine's ``EngineCore`` ``--kills`` times, each once the
group serves again. For each kill: the time from the kill to mpsd's first ``engine_fault`` or
``fault_detected`` (the engine is unrouted in that tick), the first signal, the requests in
flight, how many failed.
Prints p50/p99/max of kill-to-unrouted (the target is p99 <= 100 ms) and the failure counts.
The numbers depend on the host's load; on a loaded 2-core VM they are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness import Mpsd, wait_until  # noqa: E402
from tests.load import MixedLoad, engine_core, first_fault  # noqa: E402

KILLED = "gpu0/tiny-0"


def one_kill(m: Mpsd, load: MixedLoad, mps: str, clients: int) -> dict[str, Any]:
    """Kill the EngineCore once the engine serves; wait until it serves again."""
    restarts = len(m.events("engine_ready", engine=KILLED))
    leader = m.engine_pids("gpu0")[KILLED]
    core = wait_until(lambda: engine_core(leader), 30, "EngineCore")
    t_kill = time.time()
    os.kill(core, signal.SIGKILL)
    fault = wait_until(lambda: first_fault(m, "gpu0", t_kill), 30, "fault")
    wait_until(lambda: len(m.events("engine_ready", engine=KILLED)) > restarts, 60, "ready")
    served = sum(s.ok for s in load.sent)
    wait_until(lambda: sum(s.ok for s in load.sent) >= served + clients, 60, "serving")
    in_flight = [s for s in load.sent if s.t0 < t_kill < s.t1]
    failed = [s for s in load.sent if not s.ok and t_kill < s.t1 and s.t0 < fault["at"] + 5]
    return {"mps": mps, "signal": fault["signal"],
            "kill_to_unrouted_ms": round((fault["at"] - t_kill) * 1000, 2),
            "in_flight": len(in_flight), "failed": len(failed)}


def run(kills: int, mps: str, clients: int, keep: bool) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="mfu-"))
    m = Mpsd(workdir, gpus=2, mps=mps)
    m.engine_env = {"FAKE_ENGINE_TOKEN_DELAY_S": "0.005", "FAKE_ENGINE_DEAD_EXIT_S": "5"}
    m.overrides = {"restart": {"max_restarts": kills + 5, "backoff_initial_s": 0.05}}
    results: list[dict[str, Any]] = []
    try:
        m.start()
        m.wait_state("gpu0", "running")
        m.wait_state("gpu1", "running")
        with MixedLoad(m.url, clients) as load:
            wait_until(lambda: sum(s.ok for s in load.sent) >= 4 * clients, 60, "warm-up")
            for _ in range(kills):
                results.append(one_kill(m, load, mps, clients))
                print(json.dumps(results[-1]), flush=True)
    finally:
        m.kill()
        if keep:
            print(f"mpsd's log and the fakes' events: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--mps", choices=["on", "off"], default="off")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    results = run(args.kills, args.mps, args.clients, args.keep)
    times = sorted(r["kill_to_unrouted_ms"] for r in results)
    summary = {
        "mps": args.mps, "kills": len(results),
        "kill_to_unrouted_ms": {"p50": statistics.median(times),
                                "p99": times[min(len(times) - 1, int(0.99 * len(times)))],
                                "max": times[-1]},
        "signals": sorted({r["signal"] for r in results}),
        "failed": sum(r["failed"] for r in results),
        "in_flight": sum(r["in_flight"] for r in results),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "kills": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
