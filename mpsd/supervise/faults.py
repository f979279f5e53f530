"""The fault signals of a group, each turned into one :class:`Fault` (architecture.md §6).

Per engine: its leader exits (:meth:`ChildProcess.wait`), any other process of its tree exits
(pidfds, :mod:`mpsd.supervise.tree`), its health probes fail ``health_failures`` times, or
someone *condemns* it — the proxy seeing a dead engine's answer or a stall, or the MPS server
logging that one of its clients went away. Per MPS daemon: it exits, its server reports
``FAULT``, it stops answering, or it logs a fatal fault. Whichever comes first wins; what the
group does about it (the whole group or one engine) is :mod:`mpsd.supervise.group`'s business.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from mpsd import logs
from mpsd.errors import HealthCheckFailed, MpsCommandError
from mpsd.supervise.engine import Engine
from mpsd.supervise.mps import MpsDaemon

_log = logs.get("mpsd.faults")
_STATUS_FAILURES = 3


@dataclass(frozen=True)
class Fault:
    """Why an attempt ended. ``fatal`` faults go to FAILED without a restart. ``engine`` names
    the one engine that restarts alone (MPS off); empty when the whole group restarts."""

    signal: str
    reason: str
    fatal: bool = False
    engine: str = ""


async def watch_engine(engine: Engine, route: Callable[[bool], None],
                       on_fault: Callable[[Fault], None] | None = None) -> Fault:
    """Until the engine fails one of its signals; unroutes it (``route(False)``) and tells
    ``on_fault`` in the same tick the signal arrives (MPS on: the whole GPU is unrouted then,
    not once the other watchers have been cancelled).

    ``route`` also follows the health probes: one failed probe unroutes, a good one routes
    again (until a fault ends the watch).
    """
    found: list[Fault] = []
    async with anyio.create_task_group() as tg:

        def report(fault: Fault) -> None:
            if not found:
                found.append(fault)
                route(False)
                if on_fault is not None:
                    on_fault(fault)
                _log.warning("engine_fault", gpu=engine.plan.gpu, engine=engine.key,
                             signal=fault.signal, reason=fault.reason, at=time.time())
            tg.cancel_scope.cancel()

        async def leader() -> None:
            code = await engine.process.wait()
            report(Fault("engine_exit", f"{engine.key} exited with code {code}"))

        async def tree() -> None:
            pid, name = await engine.watch_tree()
            if pid:
                report(Fault("engine_process_exit",
                             f"{engine.key}: its process {pid} ({name}) exited"))

        async def health() -> None:
            try:
                await engine.watch_health(route)
            except HealthCheckFailed as exc:
                report(Fault("health", str(exc)))

        async def condemned() -> None:
            signal, reason = await engine.wait_condemned()
            report(Fault(signal, reason))

        for watcher in (leader, tree, health, condemned):
            tg.start_soon(watcher)
    return found[0]


async def watch_mps(mps: MpsDaemon, status_interval_s: float,
                    on_fault: Callable[[Fault], None]) -> None:
    """The daemon's exit and its servers' status, until one of them is a fault."""
    async with anyio.create_task_group() as tg:

        async def exited() -> None:
            code = await mps.wait()
            on_fault(Fault("mps_daemon_exit", f"MPS control daemon exited with code {code}"))
            tg.cancel_scope.cancel()

        async def status() -> None:
            fault = await _poll_status(mps, status_interval_s)
            on_fault(fault)
            tg.cancel_scope.cancel()

        tg.start_soon(exited)
        tg.start_soon(status)


async def _poll_status(mps: MpsDaemon, interval_s: float) -> Fault:
    failures = 0
    while True:
        await anyio.sleep(interval_s)
        try:
            for server in await mps.server_pids():
                if await mps.server_status(server) == "FAULT":
                    return Fault("mps_status", f"MPS server {server} status FAULT")
            failures = 0
        except MpsCommandError as exc:
            failures += 1
            if failures >= _STATUS_FAILURES:
                return Fault("mps_unresponsive", f"MPS daemon not answering: {exc}")
