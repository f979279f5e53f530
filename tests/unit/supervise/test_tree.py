"""Every process of an engine's tree watched through pidfds (real processes, no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anyio
import pytest

from mpsd.supervise.tree import TreeWatch, group_pids
from tests.harness import until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def spawn(script: str) -> subprocess.Popen[bytes]:
    """A leader in its own session (as mpsd starts engines) running ``script``."""
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)

# a leader that forks two children into its own process group, then sleeps
TREE = """
import os, subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(60)
"""


async def test_the_death_of_any_process_of_the_tree_is_seen_at_once() -> None:
    """1. a leader with two children in its own session
    2. the watch adopts both children (never the leader: its exit is ``wait()``'s)
    3. SIGKILL of one child: the watch returns that PID within milliseconds"""
    leader = spawn(TREE)
    try:
        assert leader.stdout is not None
        kids = [int(p) for p in leader.stdout.readline().split()]
        assert group_pids(leader.pid) >= {leader.pid, *kids}
        watch = TreeWatch(leader.pid, "test", rescan_s=5.0)
        async with anyio.create_task_group() as tg:
            died: list[tuple[int, str]] = []

            async def run() -> None:
                died.append(await watch.wait_exit())

            tg.start_soon(run)
            await until(lambda: watch.watched == set(kids), what="both children watched")
            t_kill = time.monotonic()
            os.kill(kids[1], signal.SIGKILL)
            await until(lambda: died, within_s=2, what="the death seen")
            seen_after = time.monotonic() - t_kill
        assert died[0][0] == kids[1] and watch.watched == set()  # pidfds closed
        assert seen_after < 1.0  # a pidfd is readable at once; no polling interval involved
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        if leader.stdout is not None:
            leader.stdout.close()


# a leader that runs a short-lived helper (in its process group) every 20 ms
HELPERS = """
import subprocess, time
while True:
    subprocess.run(["true"])
    time.sleep(0.02)
"""


async def test_a_short_lived_helper_between_two_scans_is_not_a_death() -> None:
    """A process first seen on a rescan is watched only from its second sighting on."""
    leader = spawn(HELPERS)
    try:
        watch = TreeWatch(leader.pid, "test", rescan_s=0.01)
        with anyio.move_on_after(1.0) as scope:
            await watch.wait_exit()
        assert scope.cancelled_caught  # dozens of helpers came and went: none was a death
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        if leader.stdout is not None:
            leader.stdout.close()
