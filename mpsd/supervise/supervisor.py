"""All GPUs of the host: the one command queue, the desired state, and the groups' loops.

The supervisor is the only writer of every group's :class:`~mpsd.supervise.desired.Desired`
state: each command (:mod:`mpsd.supervise.commands`) is applied in arrival order and answered
with its outcome; each group's reconcile loop then works toward it. A reload is a rollout
(:mod:`mpsd.supervise.rollout`) that stops at the first engine that does not become ready and
puts that engine back on its previous plan. A FAILED GPU never stops the daemon: readiness and
status say it; the daemon's own exit is for SIGTERM.

The supervisor is also the groups' observer and passes their events on to its own observers
(the metrics); every transition refreshes the one-line status systemd and ``mpsd status`` show.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import anyio
from anyio.abc import TaskGroup

from mpsd import logs
from mpsd.backend import Backend
from mpsd.errors import ExitCode, MpsdError
from mpsd.plan.build import Plan
from mpsd.pool import BackendPool
from mpsd.status import BackendStatus, DaemonStatus, EngineStatus, GpuDiagnosis, GroupStatus
from mpsd.supervise.commands import (
    STARTS,
    Command,
    CommandQueue,
    Drain,
    EngineVerdict,
    GpuFault,
    Reload,
    Restart,
    SetEngine,
    Stop,
    Verdict,
)
from mpsd.supervise.contract import GroupObserver, GroupOptions
from mpsd.supervise.desired import Desired, identity
from mpsd.supervise.faults import Fault
from mpsd.supervise.group import GpuGroup
from mpsd.supervise.rollout import Rollout
from mpsd.supervise.states import GroupState
from mpsd.supervise.xids import HARDWARE_XIDS, classify_xid

_log = logs.get("mpsd.supervisor")
SETTLED = frozenset({GroupState.RUNNING, GroupState.DEGRADED, GroupState.FAILED,
                     GroupState.STOPPED})


class Supervisor:
    """Owns one :class:`GpuGroup` per planned GPU and the queue of commands to them."""

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
        self._queue = CommandQueue()
        self._stopping = False
        self._settled = anyio.Event()
        self._tg: TaskGroup | None = None
        self._rollouts: set[Rollout] = set()
        self.groups = {g.key: self._new_group(Desired(g, options)) for g in plan.groups}
        pool.on_engine_fault = self._engine_fault
        # a GPU's live CPU-bound diagnosis for status (the daemon sets the metrics poller's)
        self.diagnose: Callable[[str], GpuDiagnosis | None] = lambda gpu: None

    # -- GroupObserver ---------------------------------------------------------------------

    def state_changed(self, group: GpuGroup, old: GroupState, new: GroupState) -> None:
        for observer in self.observers:
            observer.state_changed(group, old, new)
        self._publish()
        if all(g.state in SETTLED for g in self.groups.values()):
            self._settled.set()

    def fault(self, group: GpuGroup, fault: Fault) -> None:
        for observer in self.observers:
            observer.fault(group, fault)

    def recovered(self, group: GpuGroup, phase: str, seconds: float) -> None:
        _log.info("recovery_phase", gpu=group.key, phase=phase, seconds=round(seconds, 3))
        for observer in self.observers:
            observer.recovered(group, phase, seconds)

    # -- commands (each goes through the queue) ---------------------------------------------

    async def reload(self, plan: Plan, options: GroupOptions) -> dict[str, Any]:
        """Apply a new plan: unchanged GPUs are untouched, changed engines roll out one at a
        time (a failed one is rolled back and ``problems`` says why), GPUs whose identity
        changed restart, removed ones stop, added ones start."""
        result: dict[str, Any] = await self._queue.submit(Reload(plan, options))
        return result

    async def restart_group(self, key: str) -> GpuGroup:
        """``mpsd restart GPU``: stop what runs the safe way, forget the fault history, clear
        a drain or a verdict, start again."""
        self._require(key)  # an unknown GPU is answered at once
        group: GpuGroup = await self._queue.submit(Restart(key))
        while not group.restart_acted_on and not group.done.is_set():  # old processes gone
            await group.next_pass()
        return group

    async def drain_group(self, key: str) -> GpuGroup:
        """Take one GPU out of service on purpose: its engines drain and stop, its MPS daemon
        quits; it stays STOPPED (drained, across reloads) until ``restart_group``."""
        self._require(key)
        group: GpuGroup = await self._queue.submit(Drain(key))
        settled = (GroupState.STOPPED, GroupState.FAILED)
        while group.state not in settled and not group.done.is_set():
            await group.next_pass()
        return group

    def refuse_starts(self) -> None:
        """A stop is coming (SIGTERM's grace period): from now on, nothing new starts."""
        self._queue.stop_submitted = True

    def stop(self) -> None:
        """Stop everything; final: nothing starts after it."""
        if not self._stopping:
            self._queue.submit(Stop())

    def report_xid(self, uuid: str, xid: int) -> None:
        """An NVML Xid on a GPU: application Xids recover its group, hardware ones fail it."""
        group = next((g for g in self.groups.values() if g.plan.uuid == uuid), None)
        kind = classify_xid(xid)
        _log.warning("xid", gpu=group.key if group else uuid, xid=xid, kind=kind)
        if group is None or kind == "informational":
            return
        if kind == "hardware":
            reason = f"hardware Xid {xid} ({HARDWARE_XIDS.get(xid, 'see NVIDIA Xid catalogue')})"
            self._queue.submit(Verdict(group.key, f"{reason}: the GPU needs an operator"))
        else:
            self._queue.submit(GpuFault(group.key, Fault("xid", f"application Xid {xid}")))

    def _engine_fault(self, backend: Backend, signal: str, reason: str) -> None:
        """The proxy saw an engine dead or stalled: its group hears it like its own signal."""
        self._queue.submit(EngineVerdict(backend.gpu, backend.key, signal, reason))

    # -- the queue's consumer: the one writer of desired state ------------------------------

    async def run(self) -> ExitCode:
        """Run every group and apply commands until a stop has stopped every group."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for group in self.groups.values():
                self._spawn(group)
            while not (self._stopping and all(g.done.is_set() for g in self.groups.values())):
                with anyio.move_on_after(0.5 if self._stopping else 60.0):
                    command, future = await self._queue.next()
                    self._answer(command, future)
            tg.cancel_scope.cancel()
        self._tg = None
        return self.exit_code

    def _answer(self, command: Command, future: asyncio.Future[Any]) -> None:
        """Apply one command; its outcome (or why it was refused) goes to its future."""
        try:
            outcome = self._apply(command, future)
        except Exception as exc:  # a refused command, never a dead consumer
            if isinstance(exc, KeyError | MpsdError):
                _log.info("command_refused", command=type(command).__name__, error=str(exc))
            else:
                _log.exception("command_failed", command=type(command).__name__)
            if not future.done():
                future.set_exception(exc)
            return
        if outcome is not _LATER and not future.done():
            future.set_result(outcome)

    def _apply(self, command: Command, future: asyncio.Future[Any]) -> object:
        if isinstance(command, STARTS) and (self._stopping or self._queue.stop_submitted):
            raise MpsdError("mpsd is shutting down")
        if isinstance(command, Stop):
            self._stopping = True
            for rollout in list(self._rollouts):
                rollout.cancel("mpsd is stopping")
            for group in self.groups.values():
                group.set_desired(group.desired.stop())
            return None
        if isinstance(command, Reload):
            return self._reload(command, future)
        if isinstance(command, SetEngine):
            group = self._require(command.gpu)
            group.set_desired(group.desired.with_engine(command.engine, command.plan))
            return group
        group = self._require(command.gpu)
        if isinstance(command, Restart):
            if group.done.is_set() and not self._stopping:  # its loop died: a fresh one
                group = self.groups[group.key] = self._new_group(group.desired.restarted())
                self._spawn(group)
            else:
                group.set_desired(group.desired.restarted())
            self._settled = anyio.Event()
        elif isinstance(command, Drain):
            group.set_desired(group.desired.drain())
        elif isinstance(command, Verdict):
            group.set_desired(group.desired.condemn(command.reason))
        elif isinstance(command, GpuFault):
            group.report_fault(command.fault)
        elif isinstance(command, EngineVerdict):
            group.report_engine_fault(command.engine, command.signal, command.reason)
        return group

    def _reload(self, command: Reload, future: asyncio.Future[Any]) -> object:
        """The new desired state of every GPU; changed engines of a serving GPU go to a
        rollout whose end answers the reload (until then the queue goes on: a stop is never
        held up) — also while it recovers. A GPU with nothing to keep (drained, FAILED,
        condemned) takes its new plan at once, and its drain or verdict stays as it is."""
        plan, options = command.plan, command.options
        for rollout in list(self._rollouts):
            rollout.cancel("a newer reload superseded it")
        new = {g.key: g for g in plan.groups}
        mps_same = _mps_identity(options) == _mps_identity(self.options)
        self.plan, self.options = plan, options
        result: dict[str, Any] = {"unchanged": [], "changed": [], "rolled": [],
                                  "restarted": [], "removed": [], "added": [], "problems": []}
        rollouts: list[Rollout] = []
        for key, group in list(self.groups.items()):
            desired = group.desired
            if key not in new:
                group.set_desired(desired.stop())
                result["removed"].append(key)
                continue
            target = new[key]
            if identity(target) != identity(desired.plan) or (target.mps and not mps_same):
                group.set_desired(desired.reidentified(target, options))
                result["changed"].append(key)
                result["restarted"].append(key)
            elif target.engines != desired.plan.engines and not group.has_capacity:
                group.set_desired(desired.with_plan(target, options))  # nothing to keep up
                result["changed"].append(key)
            elif target.engines != desired.plan.engines:
                group.set_desired(desired.with_plan(desired.plan, options))
                rollouts.append(Rollout(group, desired.plan, target, self._queue.submit))
                result["changed"].append(key)
                result["rolled"].append(key)
            else:
                group.set_desired(desired.with_plan(desired.plan, options))
                result["unchanged"].append(key)
        for key in [k for k in new if k not in self.groups]:
            group = self.groups[key] = self._new_group(Desired(new[key], options))
            self._spawn(group)
            result["added"].append(key)
        self._settled = anyio.Event()
        _log.info("reload_plan", **{k: v for k, v in result.items() if k != "problems"})
        if not rollouts:
            return result
        assert self._tg is not None
        self._rollouts.update(rollouts)
        self._tg.start_soon(self._finish_reload, rollouts, result, future)
        return _LATER

    async def _finish_reload(self, rollouts: list[Rollout], result: dict[str, Any],
                             future: asyncio.Future[Any]) -> None:
        async def run(rollout: Rollout) -> None:
            result["problems"] += await rollout.run()

        try:
            async with anyio.create_task_group() as tg:
                for rollout in rollouts:
                    tg.start_soon(run, rollout)
        finally:
            self._rollouts.difference_update(rollouts)
            if not future.done():
                future.set_result(result)

    # -- groups ------------------------------------------------------------------------------

    def _require(self, key: str) -> GpuGroup:
        group = self.group(key)
        if group is None:
            raise KeyError(f"no GPU {key!r}; known: {', '.join(self.groups)}")
        return group

    def _new_group(self, desired: Desired) -> GpuGroup:
        return GpuGroup(desired, self.pool, self._session, self, self._rng)

    def _spawn(self, group: GpuGroup) -> None:
        assert self._tg is not None, "groups start only inside run()"

        async def run_group() -> None:
            try:
                await group.run()
            except Exception as exc:  # a bug in one group must not take the other GPUs down
                _log.exception("group_crashed", gpu=group.key)
                group.crashed(f"internal error: {exc!r}")
            if group.desired.stopping and group.key not in {g.key for g in self.plan.groups}:
                self.groups.pop(group.key, None)  # removed by a reload
                self._publish()

        self._tg.start_soon(run_group)

    def held_ports(self) -> set[int]:
        """Ports mpsd's own engines listen on now (a reload may reuse them)."""
        return {e.plan.port for g in self.groups.values() for e in g.engines.values()
                if e.pid is not None}

    def alive(self) -> bool:
        """For the systemd watchdog: the supervisor runs (a FAILED GPU is a state with its
        reason, which restarting mpsd would not mend)."""
        return self._tg is not None

    async def wait_settled(self) -> None:
        """Until every group is RUNNING, DEGRADED, FAILED or STOPPED (systemd's READY=1)."""
        await self._settled.wait()

    def group(self, key: str) -> GpuGroup | None:
        """A group by its key (``gpu0``) or by its configured device (``0``, a UUID)."""
        return self.groups.get(key) or next(
            (g for g in self.groups.values() if key in (g.plan.device, g.plan.uuid)), None)

    # -- views -------------------------------------------------------------------------------

    def status_line(self) -> str:
        groups = list(self.groups.values())
        running = sum(g.state in (GroupState.RUNNING, GroupState.DEGRADED) for g in groups)
        engines = len(self.pool.snapshot())
        ready = self.pool.routable_count()
        line = f"{running}/{len(groups)} GPUs running, {ready}/{engines} engines ready"
        for state in (GroupState.FAILED, GroupState.DEGRADED):
            line += "".join(f"; {g.key} {state.name}: {g.reason}" for g in groups
                            if g.state is state)
        return line

    def status(self) -> DaemonStatus:
        """Everything ``mpsd status`` and ``/mpsd/status`` show."""
        backends = {b["key"]: b for b in self.pool.snapshot()}
        return {
            "status": self.status_line(),
            "pid": os.getpid(),
            "mps": {"enabled": self.plan.mps_enabled, "reason": self.plan.mps_reason},
            "groups": [_diagnosed(_group_view(g, backends), self.diagnose(g.key))
                       for g in self.groups.values()],
        }

    def _publish(self) -> None:
        if self._on_status is not None:
            self._on_status(self.status_line())


_LATER = object()  # an outcome the command's own task will give


def _mps_identity(options: GroupOptions) -> tuple[str, dict[str, str]]:
    """The MPS settings that need a new daemon when they change."""
    return options.mps.control_binary, dict(options.mps.env)


def _diagnosed(view: GroupStatus, diagnosis: GpuDiagnosis | None) -> GroupStatus:
    view["diagnosis"] = diagnosis
    return view


def _group_view(group: GpuGroup, backends: dict[str, BackendStatus]) -> GroupStatus:
    mps = group.mps
    desired = group.desired
    engines: list[EngineStatus] = []
    for e in group.plan.engines:
        state, reason, restarts = group.engine_state(e)
        running = group.engines.get(e.key)
        engines.append({
            "key": e.key,
            "model": e.model,
            "port": e.port,
            "pid": running.pid if running is not None else None,
            "cpus": list(e.cpus or ()),
            "ready": e.key in backends and backends[e.key]["routable"],
            "inflight": backends[e.key]["inflight"] if e.key in backends else 0,
            "state": str(state),
            "reason": reason,
            "restarts_in_window": restarts,
        })
        if running is not None and running.phases.seconds:
            engines[-1]["phases"] = dict(running.phases.seconds)
    return {
        "gpu": group.key,
        "device": group.plan.device,
        "uuid": group.plan.uuid,
        "state": str(group.state),
        "since": group.since,
        "reason": group.reason,
        "strategy": "one_for_all" if group.plan.mps else "one_for_one",
        "desired": {"generation": desired.generation, "drained": desired.drained,
                    "verdict": desired.verdict or None},
        "observed_generation": group.observed_generation,
        "restarts_in_window": group.restarts_in_window,
        "history": list(group.history),
        "mps": None if not group.plan.mps else {
            "pid": mps.pid if mps else None,
            "pipe_dir": str(group.plan.pipe_dir),
            "applied": mps.applied if mps else {},
        },
        "engines": engines,
    }
