"""All groups of the host: runs them, aggregates their state, decides the exit code.

The supervisor is the groups' observer (and passes their events on to its own observers,
the metrics): every transition refreshes the one-line status
(``2/2 GPUs running, 4/4 engines ready``) that systemd and ``mpsd status`` show, and when
every group has FAILED the daemon exits 1 so that systemd's ``Restart=on-failure`` and the
operator see it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import aiohttp
import anyio
from anyio.abc import TaskGroup

from mpsd import logs
from mpsd.backend import Backend
from mpsd.errors import ExitCode, MpsdError
from mpsd.plan.build import GroupPlan, Plan
from mpsd.pool import BackendPool
from mpsd.status import BackendStatus, DaemonStatus, GroupStatus
from mpsd.supervise.contract import GroupObserver, GroupOptions
from mpsd.supervise.faults import Fault
from mpsd.supervise.group import GpuGroup
from mpsd.supervise.states import GroupState
from mpsd.supervise.xids import HARDWARE_XIDS, classify_xid

_log = logs.get("mpsd.supervisor")


class Supervisor:
    """Owns one :class:`GpuGroup` per planned GPU."""

    def __init__(self, plan: Plan, options: GroupOptions, pool: BackendPool,
                 session: aiohttp.ClientSession,
                 observers: list[GroupObserver] | None = None,
                 on_status: Callable[[str], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.plan = plan
        self.pool = pool
        self.observers = list(observers or [])
        self._on_status = on_status
        self.exit_code = ExitCode.OK
        self.started = time.time()
        self.options = options
        self._session = session
        self._rng = rng
        self._stopped = anyio.Event()
        self._settled = anyio.Event()
        self._done: dict[str, anyio.Event] = {}
        self._tg: TaskGroup | None = None
        self.groups = {g.key: self._new_group(g) for g in plan.groups}
        pool.on_engine_fault = self._engine_fault

    # GroupObserver -------------------------------------------------------------------

    def state_changed(self, group: GpuGroup, old: GroupState, new: GroupState) -> None:
        for observer in self.observers:
            observer.state_changed(group, old, new)
        self._publish()
        states = [g.state for g in self.groups.values()]
        if all(s in (GroupState.RUNNING, GroupState.FAILED) for s in states):
            self._settled.set()
        if states and all(s is GroupState.FAILED for s in states) and not self._stopped.is_set():
            _log.error("all_groups_failed", groups=list(self.groups))
            self.exit_code = ExitCode.FAILURE
            self.stop()

    def fault(self, group: GpuGroup, fault: Fault) -> None:
        for observer in self.observers:
            observer.fault(group, fault)

    def recovered(self, group: GpuGroup, phase: str, seconds: float) -> None:
        _log.info("recovery_phase", gpu=group.key, phase=phase, seconds=round(seconds, 3))
        for observer in self.observers:
            observer.recovered(group, phase, seconds)

    def _engine_fault(self, backend: Backend, signal: str, reason: str) -> None:
        """The proxy saw an engine dead or stalled: its group hears it like its own signal."""
        group = self.groups.get(backend.gpu)
        if group is not None:
            group.report_engine_fault(backend.key, signal, reason)

    # control ---------------------------------------------------------------------------

    async def run(self) -> ExitCode:
        """Run every group until ``stop()``; returns the exit code the daemon should use."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for group in self.groups.values():
                self._spawn(group)
            await self._stopped.wait()
            for group in self.groups.values():
                group.stop()
        self._tg = None
        return self.exit_code

    async def reload(self, plan: Plan, options: GroupOptions) -> dict[str, list[str]]:
        """Apply a new plan by diff: untouched groups keep serving, others stop/start.

        A group is untouched when its plan and its MPS settings are equal; restart and drain
        settings are applied to every group live. Removed groups drain and stop. A changed
        group whose GPU and MPS setup stay the same rolls its engines one at a time
        (:meth:`GpuGroup.reconfigure`); any other changed group is stopped safely and started
        from the new plan. ``problems`` lists what did not come up (the reload still happened).
        """
        if self._stopped.is_set():
            raise MpsdError("mpsd is shutting down")
        old = self.groups
        new = {g.key: g for g in plan.groups}
        mps_same = _mps_identity(options) == _mps_identity(self.options)
        unchanged = [k for k in old if k in new and old[k].plan == new[k] and mps_same]
        changed = [k for k in old if k in new and k not in unchanged]
        removed = [k for k in old if k not in new]
        added = [k for k in new if k not in old]
        _log.info("reload_plan", unchanged=unchanged, changed=changed, removed=removed,
                  added=added)
        self.plan, self.options = plan, options
        for key in unchanged + (changed if mps_same else []):
            old[key].retune(options)
        rolled: list[str] = []
        problems: list[str] = []
        for key in changed if mps_same else []:
            done, problem = await old[key].reconfigure(new[key])
            if done:
                rolled.append(key)
            if problem:
                problems.append(f"{key}: {problem}")
        restarted = [k for k in changed if k not in rolled]
        async with anyio.create_task_group() as tg:
            for key in restarted + removed:
                tg.start_soon(self._stop_group, key)
        for key in removed:
            del self.groups[key]
        for key in restarted + added:
            self.groups[key] = self._new_group(new[key])
            self._spawn(self.groups[key])
        self.groups = {g.key: self.groups[g.key] for g in plan.groups}
        self._settled = anyio.Event()
        self._publish()
        return {"unchanged": unchanged, "changed": changed, "rolled": rolled,
                "restarted": restarted, "removed": removed, "added": added,
                "problems": problems}

    async def drain_group(self, key: str) -> GpuGroup:
        """Take one GPU out of service on purpose: its engines drain and stop, its MPS daemon
        quits, and it stays STOPPED until ``restart_group``. Other GPUs are untouched."""
        group = self._require(key)
        if group.state is not GroupState.STOPPED:
            await self._stop_group(group.key)
        return group

    async def restart_group(self, key: str) -> GpuGroup:
        """``mpsd restart GPU``: a FAILED group forgets its crash history and starts again; a
        drained (STOPPED) one starts again; a running one is stopped safely and started."""
        group = self._require(key)
        if self._stopped.is_set():
            raise MpsdError("mpsd is shutting down")
        if group.state is GroupState.FAILED and not self._done[group.key].is_set():
            group.restart()
            return group
        if group.state is not GroupState.STOPPED:
            await self._stop_group(group.key)
        fresh = self.groups[group.key] = self._new_group(group.plan)
        self._spawn(fresh)
        return fresh

    def _require(self, key: str) -> GpuGroup:
        group = self.group(key)
        if group is None:
            raise KeyError(f"no GPU {key!r}; known: {', '.join(self.groups)}")
        return group

    def _new_group(self, plan: GroupPlan) -> GpuGroup:
        return GpuGroup(plan, self.options, self.pool, self._session, self, self._rng)

    def _spawn(self, group: GpuGroup) -> None:
        assert self._tg is not None, "groups start only inside run()"
        done = self._done[group.key] = anyio.Event()

        async def run_group() -> None:
            try:
                await group.run()
            except Exception as exc:  # a bug in one group must not take the other GPUs down
                _log.exception("group_crashed", gpu=group.key)
                group.crashed(f"internal error: {exc!r}")
            finally:
                done.set()

        self._tg.start_soon(run_group)

    async def _stop_group(self, key: str) -> None:
        self.groups[key].stop()
        await self._done[key].wait()

    def held_ports(self) -> set[int]:
        """Ports mpsd's own engines listen on now (a reload may reuse them)."""
        return {e.plan.port for g in self.groups.values() for e in g.engines.values()
                if e.pid is not None}

    def alive(self) -> bool:
        """For the systemd watchdog: the supervisor runs (a group that crashed is FAILED with
        its reason, which restarting mpsd would not mend)."""
        return self._tg is not None

    def stop(self) -> None:
        self._stopped.set()
        for group in self.groups.values():
            group.stop()

    async def wait_settled(self) -> None:
        """Until every group is RUNNING or FAILED (systemd's READY=1 moment)."""
        await self._settled.wait()

    def report_xid(self, uuid: str, xid: int) -> None:
        """An NVML Xid on a GPU: application Xids recover its group, hardware ones fail it."""
        group = next((g for g in self.groups.values() if g.plan.uuid == uuid), None)
        kind = classify_xid(xid)
        _log.warning("xid", gpu=group.key if group else uuid, xid=xid, kind=kind)
        if group is None or kind == "informational":
            return
        if kind == "hardware":
            reason = f"hardware Xid {xid} ({HARDWARE_XIDS.get(xid, 'see NVIDIA Xid catalogue')})"
            group.report_fault(Fault("xid", f"{reason}: the GPU needs an operator", fatal=True))
        else:
            group.report_fault(Fault("xid", f"application Xid {xid}"))

    def group(self, key: str) -> GpuGroup | None:
        """A group by its key (``gpu0``) or by its configured device (``0``, a UUID)."""
        return self.groups.get(key) or next(
            (g for g in self.groups.values() if key in (g.plan.device, g.plan.uuid)), None)

    # views -------------------------------------------------------------------------------

    def status_line(self) -> str:
        groups = list(self.groups.values())
        running = sum(g.state is GroupState.RUNNING for g in groups)
        engines = len(self.pool.snapshot())
        ready = self.pool.routable_count()
        line = f"{running}/{len(groups)} GPUs running, {ready}/{engines} engines ready"
        failed = [g for g in groups if g.state is GroupState.FAILED]
        if failed:
            line += "; " + "; ".join(f"{g.key} FAILED: {g.reason}" for g in failed)
        return line

    def status(self) -> DaemonStatus:
        """Everything ``mpsd status`` and ``/mpsd/status`` show."""
        backends = {b["key"]: b for b in self.pool.snapshot()}
        return {
            "status": self.status_line(),
            "pid": os.getpid(),
            "mps": {"enabled": self.plan.mps_enabled, "reason": self.plan.mps_reason},
            "groups": [_group_view(g, backends) for g in self.groups.values()],
        }

    def _publish(self) -> None:
        if self._on_status is not None:
            self._on_status(self.status_line())


def _mps_identity(options: GroupOptions) -> tuple[str, dict[str, str]]:
    """The MPS settings that need a new daemon when they change."""
    return options.mps.control_binary, dict(options.mps.env)


def _group_view(group: GpuGroup, backends: dict[str, BackendStatus]) -> GroupStatus:
    mps = group.mps
    return {
        "gpu": group.key,
        "device": group.plan.device,
        "uuid": group.plan.uuid,
        "state": str(group.state),
        "since": group.since,
        "reason": group.reason,
        "restarts_in_window": group.budget.count(time.monotonic()),
        "history": list(group.history),
        "mps": None if not group.plan.mps else {
            "pid": mps.pid if mps else None,
            "pipe_dir": str(group.plan.pipe_dir),
            "applied": mps.applied if mps else {},
        },
        "engines": [
            {
                "key": e.key,
                "model": e.model,
                "port": e.port,
                "pid": group.engines[e.key].pid if e.key in group.engines else None,
                "cpus": list(e.cpus or ()),
                "ready": e.key in backends and backends[e.key]["routable"],
                "inflight": backends[e.key]["inflight"] if e.key in backends else 0,
            }
            for e in group.plan.engines
        ],
    }


