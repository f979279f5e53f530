"""Three mpsd nodes behind HAProxy (leastconn, active checks on /health, L7 retries), under load.

What a cluster balancer needs from a node: it stops getting traffic within the balancer's check
interval once it cannot serve (every GPU FAILED, or the daemon killed), with failures bounded by
the requests it had in flight; and a rolling restart of every node, one by one, loses nothing.
The numbers these tests print are in docs/multi-host.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Mpsd, wait_until
from tests.integration.multinode.cluster import (
    CHECK_INTER_MS,
    FALL,
    HAPROXY,
    UNREADY_GRACE_S,
    HAProxy,
    Load,
    node,
    start_nodes,
)

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="no haproxy: apt-get install haproxy")

#: HAProxy marks a server DOWN after FALL failed checks, one every CHECK_INTER_MS; allow one
#: more interval for the check that was already on its way, and scheduling on a busy machine.
DETECT_S = (FALL + 1) * CHECK_INTER_MS / 1000 + 0.5


@pytest.fixture
def cluster(workdir: Path) -> Iterator[tuple[list[Mpsd], HAProxy]]:
    nodes = [node(workdir, i) for i in range(3)]
    nodes[0].overrides["restart"] = {"max_restarts": 0}  # its first fault is FAILED
    balancer = HAProxy(workdir, nodes)
    try:
        start_nodes(nodes)
        balancer.start()
        for i in range(len(nodes)):
            balancer.wait_status(f"node{i}", "UP")
        yield nodes, balancer
    finally:
        balancer.stop()
        for n in nodes:
            n.kill()


def stamp(event: dict[str, Any]) -> float:
    """Wall-clock seconds of a log event (mpsd's JSON log stamps ISO times in UTC)."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def monotonic(wall: float) -> float:
    """A wall-clock time on this process's monotonic clock (what Load records)."""
    return wall - (time.time() - time.monotonic())


def test_a_node_whose_gpus_all_failed_leaves_the_rotation_within_the_check_interval(
        cluster: tuple[list[Mpsd], HAProxy]) -> None:
    nodes, balancer = cluster
    sick = nodes[0]
    with Load(balancer.port) as load:
        wait_until(lambda: len(load.served_by("node0")) >= 5, 20, "node0 serving")
        pids = [*sick.engine_pids("gpu0").values(), *sick.engine_pids("gpu1").values()]
        fault = time.monotonic()
        for pid in pids:  # every engine of node0 dies: both GPUs go FAILED (no budget left)
            os.kill(pid, signal.SIGKILL)
        down = balancer.wait_status("node0", "DOWN")
        wait_until(lambda: load.count(since=down + 1.0) >= 20, 30, "load after the fault")
    sick.wait_state("gpu0", "failed")
    sick.wait_state("gpu1", "failed")
    assert sick.proc is not None and sick.proc.poll() is None  # alive, and out of rotation
    late = load.served_by("node0", since=down)
    failed = load.failures()
    print(f"\nGPUs FAILED: HAProxy DOWN after {down - fault:.2f} s; "
          f"{len(load.outcomes)} requests, {len(failed)} failed, node0 after DOWN: {len(late)}")
    assert down - fault <= DETECT_S + 1.0  # + the time mpsd takes to see both engines die
    assert not late
    # failures: only requests that reached node0 before HAProxy took it out of rotation.
    # node0 stays up with its GPUs FAILED (mpsd never exits for that) and answers 503 at once
    # until its /health checks mark it DOWN; leastconn favours a node that answers that fast,
    # so a request's retries may all land on it in that window. After DOWN: nothing fails.
    detected = max(monotonic(stamp(e)) for e in sick.events("fault_detected"))
    late_failures = [o for o in failed if o.started > down + 0.05]
    print(f"mpsd saw both deaths after {(detected - fault) * 1000:.0f} ms; failed before "
          f"DOWN: {len(failed) - len(late_failures)} (codes {sorted({o.code for o in failed})}), "
          f"after: {len(late_failures)}")
    assert not late_failures, late_failures


def test_a_killed_daemon_leaves_the_rotation_and_only_its_in_flight_requests_fail(
        cluster: tuple[list[Mpsd], HAProxy]) -> None:
    nodes, balancer = cluster
    victim = nodes[1]
    with Load(balancer.port) as load:
        wait_until(lambda: len(load.served_by("node1")) >= 5, 20, "node1 serving")
        assert victim.proc is not None
        killed = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        down = balancer.wait_status("node1", "DOWN")
        wait_until(lambda: load.count(since=down + 1.0) >= 20, 30, "load after the kill")
    failed = load.failures()
    print(f"\ndaemon SIGKILL: HAProxy DOWN after {down - killed:.2f} s; "
          f"{len(load.outcomes)} requests, {len(failed)} failed "
          f"(codes {sorted({o.code for o in failed})})")
    assert down - killed <= DETECT_S
    assert not load.served_by("node1", since=killed)
    # what failed was cut with node1 (streams it was sending) or sent to it in the moments
    # before HAProxy's checks noticed; nothing after that
    assert all(o.started <= down for o in failed), failed
    assert len(failed) <= 2 * load.clients


def test_rolling_restart_of_every_node_under_load_loses_no_request(
        cluster: tuple[list[Mpsd], HAProxy]) -> None:
    nodes, balancer = cluster
    with Load(balancer.port) as load:
        wait_until(lambda: all(load.served_by(f"node{i}") for i in range(3)), 20,
                   "every node serving")
        for i, n in enumerate(nodes):
            started = time.monotonic()
            assert n.terminate() == 0  # readiness 503, UNREADY_GRACE_S of service, stop
            stopped = time.monotonic()
            n.start()  # a new log: its states count from zero again
            n.wait_state("gpu0", "running")
            n.wait_state("gpu1", "running")
            balancer.wait_status(f"node{i}", "UP")
            wait_until(lambda i=i, t=stopped: load.served_by(f"node{i}", since=t), 20,
                       f"node{i} serving again")
            print(f"\nnode{i}: stop {stopped - started:.2f} s, back in rotation after "
                  f"{time.monotonic() - stopped:.2f} s")
    failed = load.failures()
    print(f"rolling restart: {len(load.outcomes)} requests, {len(failed)} failed")
    assert not failed, failed[:5]
    assert len(load.outcomes) >= 50
    assert UNREADY_GRACE_S * 1000 > FALL * CHECK_INTER_MS  # the grace outlasts the detection
