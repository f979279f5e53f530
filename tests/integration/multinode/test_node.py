"""One ``mpsd run`` as a node behind a load balancer: readiness, liveness and leaving the
rotation (SIGTERM and ``mpsd drain --all``) with real processes and sockets.

Readiness (``/health``) is what a balancer routes by: 503 as soon as the node should get no new
requests. Liveness (``/livez``) is what a supervisor restarts by: a FAILED GPU is not a reason
to restart the daemon. Leaving the rotation turns readiness off first and keeps serving every
request for ``proxy.unready_grace_s``, the time a balancer's checks need to notice.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from datetime import datetime
from typing import Any

import aiohttp

from mpsd.config import ProxyConfig
from mpsd.proxy.server import ProxyServer
from tests.harness import Mpsd, free_ports, http, wait_until
from tests.proxy_helpers import Recorder, make_pool

COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 1}


def get(m: Mpsd, path: str) -> int:
    return http("GET", f"{m.url}{path}", timeout=5)[0]


def complete(m: Mpsd, max_tokens: int = 1) -> int:
    return http("POST", f"{m.url}/v1/completions", {**COMPLETION, "max_tokens": max_tokens},
                timeout=30)[0]


def cli(m: Mpsd, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpsd", *args, "-c", str(m.config_file)],
                          capture_output=True, text=True, timeout=60, check=False)


def stamp(event: dict[str, Any]) -> float:
    """Seconds since the epoch of a log event (mpsd's JSON log stamps ISO times in UTC)."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def long_request(m: Mpsd, codes: list[int]) -> threading.Thread:
    """A request that takes ~2 s (60 tokens at FAKE_ENGINE_TOKEN_DELAY_S = 0.03)."""
    thread = threading.Thread(target=lambda: codes.append(complete(m, max_tokens=60)))
    thread.start()
    wait_until(lambda: m.status()["inflight"] >= 1, 10, "the long request in flight")
    return thread


def test_sigterm_turns_readiness_off_and_serves_new_requests_through_the_grace(
        mpsd: Mpsd) -> None:
    mpsd.overrides = {"proxy": {"unready_grace_s": 2.0}}
    mpsd.engine_env = {"FAKE_ENGINE_TOKEN_DELAY_S": "0.03"}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    assert (get(mpsd, "/health"), get(mpsd, "/livez")) == (200, 200)
    codes: list[int] = []
    in_flight = long_request(mpsd, codes)
    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: get(mpsd, "/health") == 503, 2, "readiness 503 right after SIGTERM")
    # newly arriving requests are still served while the balancer notices; liveness holds
    assert complete(mpsd) == 200
    assert get(mpsd, "/livez") == 200
    assert not mpsd.events("engine_stopping")
    in_flight.join(30)
    assert codes == [200]
    assert mpsd.proc.wait(30) == 0
    # the engines began to stop only once the grace had passed
    off_at = stamp(mpsd.events("readiness_off", reason="stopping", grace_s=2.0)[0])
    stopping_at = stamp(mpsd.events("group_state", gpu="gpu0", to="stopping")[0])
    assert stopping_at - off_at >= 2.0


def test_second_sigterm_cuts_the_grace_short(mpsd: Mpsd) -> None:
    mpsd.overrides = {"proxy": {"unready_grace_s": 600.0}}
    mpsd.start()
    mpsd.wait_state("gpu0", "running")
    assert mpsd.proc is not None
    mpsd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: get(mpsd, "/health") == 503, 2, "readiness 503")
    mpsd.proc.send_signal(signal.SIGTERM)
    assert mpsd.proc.wait(30) == 0


def test_drain_all_leaves_the_rotation_then_stops_every_gpu_and_stays_alive(
        mpsd: Mpsd) -> None:
    mpsd.gpus = 2
    mpsd.replicas = 1
    mpsd.overrides = {"proxy": {"unready_grace_s": 1.5}}
    mpsd.start()
    for gpu in ("gpu0", "gpu1"):
        mpsd.wait_state(gpu, "running")
    drain = subprocess.Popen([sys.executable, "-m", "mpsd", "drain", "--all", "-c",
                              str(mpsd.config_file)], stdout=subprocess.PIPE, text=True)
    wait_until(lambda: get(mpsd, "/health") == 503, 5, "readiness 503 after drain --all")
    assert complete(mpsd) == 200  # still served during the grace
    out, _ = drain.communicate(timeout=60)
    assert drain.returncode == 0, out
    assert "gpu0, gpu1: drained and stopped" in out
    assert [mpsd.group_state(g) for g in ("gpu0", "gpu1")] == ["stopped", "stopped"]
    assert (get(mpsd, "/health"), get(mpsd, "/livez")) == (503, 200)
    assert complete(mpsd) == 503  # the node is unavailable (a balancer retries), not 404
    assert b"\nmpsd_ready 0.0\n" in http("GET", f"{mpsd.url}/metrics")[2]
    # a GPU started again makes the node ready again: the drain is not a latch
    assert cli(mpsd, "restart", "gpu1").returncode == 0
    mpsd.wait_state("gpu1", "running", after=1)
    wait_until(lambda: get(mpsd, "/health") == 200, 10, "ready again after a restart")
    assert b"\nmpsd_ready 1.0\n" in http("GET", f"{mpsd.url}/metrics")[2]
    assert mpsd.terminate() == 0


def test_failed_gpu_is_not_ready_but_alive(mpsd: Mpsd) -> None:
    mpsd.gpus = 2
    mpsd.replicas = 1
    mpsd.engine_env = {f"FAKE_ENGINE_FAIL_START_PORT_{mpsd.engine_port_base}": "1"}
    mpsd.start()
    mpsd.wait_state("gpu0", "failed")
    mpsd.wait_state("gpu1", "running")
    assert (get(mpsd, "/health"), get(mpsd, "/livez")) == (200, 200)
    assert cli(mpsd, "drain", "gpu1").returncode == 0
    # no routable engine: not ready; the daemon itself is fine, so alive
    assert (get(mpsd, "/health"), get(mpsd, "/livez")) == (503, 200)
    assert mpsd.terminate() == 0


def test_drain_needs_a_gpu_or_all(mpsd: Mpsd) -> None:
    mpsd.write_config()
    for args in (("drain",), ("drain", "gpu0", "--all")):
        result = cli(mpsd, *args)
        assert result.returncode == 2
        assert "give a GPU" in result.stderr and "or --all" in result.stderr


def test_livez_says_what_the_daemon_says_and_readiness_turns_off_on_its_own() -> None:
    """In process: ``/livez`` asks the daemon's liveness; ``set_ready(False)`` makes
    ``/health`` 503 while the pool still has a routable engine."""
    alive = [True]

    async def main() -> list[tuple[int, int]]:
        pool = make_pool({"gpu0/a": "http://127.0.0.1:9"})
        config = ProxyConfig(listen=f"127.0.0.1:{free_ports(1)[0]}")
        server = ProxyServer(config, pool, dict, Recorder(), alive=lambda: alive[0])
        await server.start()
        seen: list[tuple[int, int]] = []
        try:
            async with aiohttp.ClientSession() as session:
                async def codes() -> tuple[int, int]:
                    out = []
                    for path in ("/health", "/livez"):
                        async with session.get(f"http://127.0.0.1:{server.port}{path}") as r:
                            out.append(r.status)
                    return out[0], out[1]

                seen.append(await codes())
                server.set_ready(False)
                seen.append(await codes())
                alive[0] = False
                seen.append(await codes())
                server.set_ready(True)
                seen.append(await codes())
        finally:
            await server.stop(1.0)
        return seen

    assert asyncio.run(main()) == [(200, 200), (503, 200), (503, 503), (200, 503)]
