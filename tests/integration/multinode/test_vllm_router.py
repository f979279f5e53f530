"""Two mpsd nodes behind vllm-router (``pip install vllm-router``) with its ``power_of_two`` policy.

How that policy measures load (vllm-router 0.1.x, ``src/policies/power_of_two.rs`` and the
regular router's load monitor): it picks two workers at random and takes the one with the lower
``cached + local`` load, where ``local`` is the number of requests the router itself has in
flight to that worker and ``cached`` a ``{"load": N}`` polled from each worker's
``GET /get_load`` (SGLang's endpoint; vLLM has none). Version 0.1.17 polled that once, at
start-up, and never again (seen with a recording worker), so in practice it balances by its own
in-flight counts — which is what these tests check: equal nodes share the load, a slower node
gets less. Failover is the router's health check on ``/health`` (mpsd's readiness).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO, Mpsd, free_ports, http, wait_until
from tests.integration.multinode.cluster import (
    MAX_TOKENS,
    TOKEN_DELAY_S,
    Load,
    node,
    start_nodes,
)

ROUTER = next((str(p) for p in (REPO / ".venv-cluster" / "bin" / "vllm-router",)
               if p.exists()), None) or shutil.which("vllm-router")
pytestmark = pytest.mark.skipif(ROUTER is None, reason="no vllm-router: scripts/test installs "
                                "it into .venv-cluster (pip install vllm-router)")
#: The router checks /health every second (one failure marks a worker down): a node leaving the
#: rotation keeps serving longer than that.
ROUTER_GRACE_S = 3.0


class Router:
    """``vllm-router --policy power_of_two`` over ``nodes``, health checks every second."""

    def __init__(self, workdir: Path, nodes: list[Mpsd]) -> None:
        self.port, metrics_port = free_ports(2)
        assert ROUTER is not None
        with (workdir / "router.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [ROUTER, "--host", "127.0.0.1", "--port", str(self.port),
                 "--policy", "power_of_two", "--worker-urls", *[n.url for n in nodes],
                 "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)],
                stdout=log, stderr=subprocess.STDOUT)
        self.log = workdir / "router.log"
        wait_until(self._ready, 60, f"vllm-router ready\n{self.log.read_text()[-2000:]}")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            return http("GET", f"http://127.0.0.1:{self.port}/health", timeout=2)[0] == 200
        except OSError:
            return False

    def complete(self) -> str:
        """One completion through the router; the node that served it."""
        code, headers, body = http("POST", f"http://127.0.0.1:{self.port}/v1/completions",
                                   {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert code == 200, body
        return headers.get("x-fake-engine", "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def routed(workdir: Path) -> Iterator[tuple[list[Mpsd], Router]]:
    nodes = [node(workdir, i) for i in range(2)]
    for n in nodes:
        n.overrides["proxy"] = {"unready_grace_s": ROUTER_GRACE_S}
    router: Router | None = None
    try:
        start_nodes(nodes)
        router = Router(workdir, nodes)
        yield nodes, router
    finally:
        if router is not None:
            router.stop()
        for n in nodes:
            n.kill()


def shares(load: Load) -> dict[str, float]:
    return {name: round(len(load.served_by(name)) / len(load.outcomes), 2)
            for name in ("node0", "node1")}


def test_power_of_two_shares_equal_nodes_and_favours_the_faster_one(
        routed: tuple[list[Mpsd], Router]) -> None:
    nodes, router = routed
    with Load(router.port) as equal:
        wait_until(lambda: equal.count() >= 80, 30, "80 requests through the router")
    print(f"\nvllm-router power_of_two, equal nodes: {len(equal.outcomes)} requests, "
          f"shares {shares(equal)}, {len(equal.failures())} failed")
    assert not equal.failures()
    assert min(shares(equal).values()) >= 0.3
    for port in nodes[0].engine_ports():  # node0's engines now generate 4x slower
        nodes[0].control(port, f"slow {4 * TOKEN_DELAY_S}")
    wait_until(lambda: slower(nodes[0]), 10, "node0 slower")
    with Load(router.port) as skewed:
        wait_until(lambda: skewed.count() >= 80, 60, "80 requests through the router")
    print(f"node0 4x slower: {len(skewed.outcomes)} requests, shares {shares(skewed)}")
    assert not skewed.failures()
    assert len(skewed.served_by("node1")) >= 2 * len(skewed.served_by("node0"))


def slower(m: Mpsd) -> bool:
    """One request straight to ``m`` takes as long as its engines' new token delay says."""
    started = time.monotonic()
    code, _, _ = http("POST", f"{m.url}/v1/completions",
                      {"model": "tiny", "prompt": "hi", "max_tokens": MAX_TOKENS})
    return code == 200 and time.monotonic() - started >= 3 * TOKEN_DELAY_S * MAX_TOKENS


def test_failover_when_a_node_leaves_the_rotation_and_when_one_is_killed(
        routed: tuple[list[Mpsd], Router]) -> None:
    nodes, router = routed
    with Load(router.port) as graceful:
        wait_until(lambda: graceful.served_by("node0") and graceful.served_by("node1"), 20,
                   "both nodes serving")
        stopped = time.monotonic()
        assert nodes[0].terminate() == 0  # /health 503, ROUTER_GRACE_S of service, then stop
        wait_until(lambda: graceful.count(since=stopped + ROUTER_GRACE_S + 1) >= 20, 30,
                   "load after node0 stopped")
    print(f"\nvllm-router, node0 SIGTERM: {len(graceful.outcomes)} requests, "
          f"{len(graceful.failures())} failed")
    assert not graceful.failures(), graceful.failures()[:5]
    nodes[0].start()
    nodes[0].wait_state("gpu0", "running")
    nodes[0].wait_state("gpu1", "running")
    with Load(router.port) as load:
        wait_until(lambda: load.served_by("node0") and load.served_by("node1"), 20,
                   "node0 back in the router's rotation")
        assert nodes[1].proc is not None
        killed = time.monotonic()
        nodes[1].proc.send_signal(signal.SIGKILL)
        wait_until(lambda: load.count(since=killed + 3.0) >= 20, 30, "load after the kill")
    failed = load.failures()
    after = [o for o in load.outcomes if o.started > killed + 2.0]
    print(f"vllm-router, node1 SIGKILL: {len(load.outcomes)} requests, {len(failed)} failed "
          f"(the last {max((o.started - killed for o in failed), default=0):.2f} s after)")
    assert all(o.code == 200 and o.node == "node0" for o in after)
    assert len(failed) <= 2 * load.clients
