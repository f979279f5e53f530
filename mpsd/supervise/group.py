"""One GPU as one fault domain: its MPS daemon, its engines, their recovery (architecture.md §6).

A group is the single writer of its state, its options and its restart budget. One *attempt*
is one task group: start MPS, start engines one after another, then watch the fault signals
(:mod:`mpsd.supervise.faults`). The first fault cancels the attempt in the same tick it marks
every engine unroutable; recovery then kills every engine at once (their shared context is
already poisoned), waits for the MPS server to come back (or replaces the daemon), backs off,
and starts over — until the restart budget says crash loop. With MPS off there is no shared
context, so each engine restarts alone. Whatever goes wrong — a fault, a boot failure, a bug —
ends in a state with a reason, never in a dead task.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import anyio
from anyio.abc import TaskGroup

from mpsd import logs
from mpsd.backend import Backend
from mpsd.errors import HealthCheckFailed, MemberExited, MpsCommandError, SpawnError, StartupTimeout
from mpsd.plan.build import EnginePlan, GroupPlan
from mpsd.pool import BackendPool
from mpsd.status import HistoryEntry
from mpsd.supervise.contract import GroupObserver, GroupOptions
from mpsd.supervise.engine import Engine
from mpsd.supervise.faults import Fault, watch_engine, watch_mps
from mpsd.supervise.mps import MpsDaemon
from mpsd.supervise.mps_log import MpsLogEvent, MpsLogKind
from mpsd.supervise.recovery import kill_engines, recover_mps, stop_engine
from mpsd.supervise.rolling import roll_engines
from mpsd.supervise.states import GroupState, IllegalTransition, RestartBudget, can_transition

_log = logs.get("mpsd.group")
OnFault = Callable[[Fault], None]


class GpuGroup:
    """Supervises one GPU's MPS daemon and engines."""

    def __init__(self, plan: GroupPlan, options: GroupOptions, pool: BackendPool,
                 session: aiohttp.ClientSession, observer: GroupObserver,
                 rng: random.Random | None = None) -> None:
        self.plan = plan
        self.options = options
        self._pool = pool
        self._session = session
        self._observer = observer
        self._rng = rng or random.Random()
        self.state = GroupState.STOPPED
        self.since = time.time()
        self.reason = ""
        self.engines: dict[str, Engine] = {}
        self.mps: MpsDaemon | None = None
        self.history: deque[HistoryEntry] = deque(maxlen=50)
        r = options.restart
        self.budget = RestartBudget(r.max_restarts, r.window_s, r.stable_after_s,
                                    r.backoff_initial_s, r.backoff_max_s)
        self._stop = anyio.Event()
        self._wake = anyio.Event()
        self._on_fault: OnFault | None = None
        self._ever_ready = False
        self._recovering_since: float | None = None
        self._fatal_pending: Fault | None = None
        self._tg: TaskGroup | None = None

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def pool(self) -> BackendPool:
        return self._pool

    @property
    def attempt(self) -> TaskGroup | None:
        """The task group of the running attempt (engines started later join it)."""
        return self._tg

    # -- commands from outside (supervisor, control API, NVML, proxy) --------------------

    def stop(self) -> None:
        """Ask the group to stop; ``run()`` returns once engines and MPS are down."""
        self._stop.set()
        self._wake.set()

    def restart(self) -> None:
        """Operator's ``mpsd restart GPU``: forget the crash history, start again if FAILED."""
        self.budget.reset()
        self._ever_ready = False
        if self.state is GroupState.FAILED:
            self._wake.set()

    def crashed(self, reason: str) -> None:
        """``run()`` itself raised (a bug while stopping): FAILED with the error as reason,
        nothing of it routed or left running."""
        for plan in self.plan.engines:
            self._pool.remove(plan.key)
        for engine in self.engines.values():
            engine.process.kill_group()
        if can_transition(self.state, GroupState.FAILED):
            self._set_state(GroupState.FAILED, reason)

    def retune(self, options: GroupOptions) -> None:
        """Reload: new restart, drain and MPS-timing settings; restarts already counted stay."""
        self.options = options
        self.budget.update(options.restart)

    def report_fault(self, fault: Fault) -> None:
        """A fault of the whole group seen outside its own watchers (an NVML Xid)."""
        if self._on_fault is not None:
            self._on_fault(fault)
        elif fault.fatal:
            self._fatal_pending = fault
            self._wake.set()

    def report_engine_fault(self, key: str, signal: str, reason: str) -> None:
        """One engine is dead or hung (the proxy saw it, or MPS logged its client's exit):
        unrouted now, and its watcher ends it like any other fault of that engine."""
        engine = self.engines.get(key)
        if engine is None or engine.stopping or engine.pid is None:
            return
        self._route(key, False)
        engine.condemn(signal, reason)

    async def reconfigure(self, plan: GroupPlan) -> tuple[bool, str]:
        """Roll engine-level changes one engine at a time (:func:`roll_engines`)."""
        return await roll_engines(self, plan)

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, supervise and recover until ``stop()``; always leaves nothing running.

        An unexpected exception anywhere in an attempt or its recovery is a fatal fault: the
        group goes FAILED with the error as its reason and waits for the operator.
        """
        for plan in self.plan.engines:
            self._pool.add(Backend(plan.key, plan.gpu, plan.model, plan.base_url))
        reason = "start"
        try:
            while not self._stop.is_set():
                try:
                    reason = await self._cycle(reason)
                except Exception as exc:  # a bug must end in FAILED, not in a dead task
                    _log.exception("group_error", gpu=self.key)
                    await kill_engines(self.engines.values())
                    await self._fail(Fault("internal", f"internal error: {exc!r}", fatal=True))
                    reason = "operator restart"
        finally:
            await self._shutdown()
            for plan in self.plan.engines:
                self._pool.remove(plan.key)

    async def _cycle(self, reason: str) -> str:
        """One attempt and what follows it; the reason for the next start."""
        pending, self._fatal_pending = self._fatal_pending, None
        if pending is not None:
            await self._fail(pending)
            return "operator restart"
        self._set_state(GroupState.STARTING, reason)
        fault = await self._attempt()
        if fault is None:
            return reason
        self._set_state(GroupState.RECOVERING, fault.reason)
        delay = self._count_restart(fault)
        await self._recover(fault)
        if delay is None:
            await self._fail(fault if fault.fatal else self._crash_loop(fault))
            return "operator restart"
        self._set_state(GroupState.BACKOFF, f"restart in {delay:.1f}s after {fault.signal}")
        with anyio.move_on_after(delay):
            await self._wait_wake()
        return f"restart after {fault.signal}"

    def _count_restart(self, fault: Fault) -> float | None:
        """The one restart bookkeeping (the group, or ``fault.engine`` alone): history, budget,
        observers. The backoff before the next start, or None when fatal or a crash loop."""
        entry: HistoryEntry = {"at": time.time(), "signal": fault.signal, "reason": fault.reason}
        if fault.engine:
            entry["engine"] = fault.engine
        self.history.append(entry)
        delay = self.budget.next_start(time.monotonic(), fault.fatal, self._rng)
        if delay is not None or not fault.engine:  # an engine's crash loop is the group's
            self._observer.fault(self, fault)
        return delay

    def _crash_loop(self, fault: Fault) -> Fault:
        return Fault(fault.signal, self.budget.crash_loop(time.monotonic(), fault.reason), True)

    async def _fail(self, fault: Fault) -> None:
        """FAILED with the fault's reason, until ``restart()`` or ``stop()``."""
        self._set_state(GroupState.FAILED, fault.reason)
        await self._wait_wake()

    async def _attempt(self) -> Fault | None:
        """One start-and-watch cycle; the fault that ended it, or None when asked to stop."""
        faults: list[Fault] = []
        async with anyio.create_task_group() as tg:

            def on_fault(fault: Fault) -> None:
                if faults:
                    return
                faults.append(fault)
                for key in self.engines:
                    self._route(key, False)
                _log.error("fault_detected", gpu=self.key, signal=fault.signal,
                           reason=fault.reason, at=time.time())
                tg.cancel_scope.cancel()

            self._on_fault, self._tg = on_fault, tg
            tg.start_soon(self._cancel_on_stop, tg)
            try:
                await self._start_all(tg, on_fault)
            except SpawnError as exc:
                on_fault(Fault("spawn", f"boot failure: {exc}", fatal=True))
        self._on_fault, self._tg = None, None
        if faults:
            return faults[0]
        if self._stop.is_set():
            return None
        return Fault("internal", "attempt ended without a fault", fatal=True)

    async def _start_all(self, tg: TaskGroup, on_fault: OnFault) -> None:
        t0 = time.monotonic()
        mps = await self._ensure_mps(tg, on_fault) if self.plan.mps else None
        for plan in self.plan.engines:
            engine = await self.start_engine(plan, mps, on_fault)
            if engine is None:
                return
            self.watch(tg, engine)
        if self._recovering_since is not None:
            self._observer.recovered(self, "engine", time.monotonic() - t0)
            self._recovering_since = None
        self._ever_ready = True
        self._set_state(GroupState.RUNNING, self.ready_reason())
        tg.start_soon(self._forgive_when_stable)

    async def start_engine(self, plan: EnginePlan, mps: MpsDaemon | None,
                            on_fault: OnFault) -> Engine | None:
        """Start one engine and wait until it is ready; None after reporting a fault."""
        engine = Engine(plan, self._session, self.options.registry)
        self.engines[plan.key] = engine
        order = next((i for i, e in enumerate(self.plan.engines, 1) if e.key == plan.key), 0)
        _log.info("engine_starting", gpu=self.key, engine=plan.key, model=plan.model,
                  msg=f"{plan.key}: starting, engine {order} of {len(self.plan.engines)} "
                      f"on {self.key}")
        await engine.start()
        try:
            await engine.wait_ready(mps)
        except MemberExited as exc:
            boot = not self._ever_ready and not engine.answered
            on_fault(Fault("engine_exit", f"{'boot failure: ' if boot else ''}{exc}", fatal=boot))
            return None
        except (StartupTimeout, HealthCheckFailed, MpsCommandError) as exc:
            await engine.process.kill()
            on_fault(Fault("startup", str(exc)))
            return None
        self._route(plan.key, True, fresh=True)
        return engine

    def watch(self, tg: TaskGroup, engine: Engine) -> None:
        """MPS on: any engine's fault is the group's. MPS off: the engine restarts alone."""
        if self.plan.mps:
            tg.start_soon(self._watch_mps_engine, engine)
        else:
            tg.start_soon(self._engine_slot, engine)

    def _router(self, engine: Engine) -> Callable[[bool], None]:
        def route(ok: bool) -> None:
            if not ok or not (engine.stopping or engine.condemned):
                self._route(engine.key, ok)
        return route

    async def _watch_mps_engine(self, engine: Engine) -> None:
        fault = await watch_engine(engine, self._router(engine))
        if not engine.stopping and self._on_fault is not None:
            self._on_fault(fault)

    async def _engine_slot(self, engine: Engine) -> None:
        """MPS off: this engine alone is its fault domain; its siblings keep serving."""
        while True:
            fault = await watch_engine(engine, self._router(engine))
            if engine.stopping:
                return
            _log.error("fault_detected", gpu=self.key, engine=engine.key, signal=fault.signal,
                       reason=fault.reason, at=time.time())
            await engine.process.kill()
            fault = replace(fault, engine=engine.key)
            delay = self._count_restart(fault)
            if delay is None:
                if self._on_fault is not None:
                    self._on_fault(replace(fault if fault.fatal else self._crash_loop(fault),
                                           engine=""))
                return
            if self.state is GroupState.RUNNING:
                self.set_reason(self.ready_reason(f"{engine.key} restarting: {fault.reason}"))
            _log.warning("engine_restart", gpu=self.key, engine=engine.key, reason=fault.reason,
                         delay_s=round(delay, 2))
            await anyio.sleep(delay)
            plan = engine.plan
            if self.engines.get(plan.key) is not engine:  # rolled out meanwhile
                return
            assert self._on_fault is not None
            restarted = await self.start_engine(plan, None, self._on_fault)
            if restarted is None:
                return
            engine = restarted
            if self.state is GroupState.RUNNING:  # back after a restart
                self.set_reason(self.ready_reason())

    async def _ensure_mps(self, tg: TaskGroup, on_fault: OnFault) -> MpsDaemon:
        if self.mps is None or self.mps.pid is None:
            self.mps = MpsDaemon(
                self.key, self.options.mps.control_binary, self.plan.uuid, self.plan.pipe_dir,
                self.plan.log_dir, environ=self.options.environ, extra_env=self.options.mps.env,
                registry=self.options.registry,
                command_timeout_s=self.options.mps.command_timeout_s, on_log=self._on_mps_log)
            _log.info("mps_daemon_starting", gpu=self.key,
                      msg=f"{self.key}: starting its MPS control daemon")
            try:
                await self.mps.start()
            except MpsCommandError as exc:
                await self.mps.kill()
                raise SpawnError(f"MPS daemon did not come up: {exc}") from exc
        mps = self.mps
        tg.start_soon(watch_mps, mps, self.options.mps.status_interval_s, on_fault)
        return mps

    def _on_mps_log(self, event: MpsLogEvent) -> None:
        """A fatal line faults the group; a client of a running engine going away (EngineCore
        died: 2 ms after the kill on the H200) condemns that engine at once."""
        if event.kind is MpsLogKind.FATAL and self._on_fault is not None:
            self._on_fault(Fault("mps_log", f"{event.source}: {event.line}"))
        elif event.kind is MpsLogKind.CLIENT_EXITED and event.pid is not None:
            for engine in list(self.engines.values()):
                if event.pid in engine.mps_pids:
                    self.report_engine_fault(engine.key, "mps_client_exit",
                                             f"{engine.key}: MPS client {event.pid} went away")

    async def _recover(self, fault: Fault) -> None:
        """Fail fast: SIGKILL every engine at once, then get the MPS server ACTIVE again."""
        t0 = time.monotonic()
        self._recovering_since = t0
        await kill_engines(self.engines.values())
        if self.mps is not None:
            if not await recover_mps(self.mps, self.options.mps.recover_timeout_s, fault):
                self.mps = None
            self._observer.recovered(self, "mps", time.monotonic() - t0)

    async def stop_engine(self, engine: Engine) -> None:
        await stop_engine(engine, self._pool, self.mps, self.options.drain_timeout_s)

    async def _shutdown(self) -> None:
        with anyio.CancelScope(shield=True):
            self._set_state(GroupState.STOPPING, "stop requested")
            async with anyio.create_task_group() as tg:
                for engine in self.engines.values():
                    tg.start_soon(self.stop_engine, engine)
            if self.mps is not None:
                await self.mps.stop()
                self.mps = None
            self._set_state(GroupState.STOPPED, "stopped")

    async def _cancel_on_stop(self, tg: TaskGroup) -> None:
        await self._stop.wait()
        tg.cancel_scope.cancel()

    async def _forgive_when_stable(self) -> None:
        since = time.monotonic()
        await anyio.sleep(self.budget.stable_after_s)
        if self.budget.ran_stable(since, time.monotonic()):
            _log.info("restart_budget_reset", gpu=self.key, stable_s=self.budget.stable_after_s)

    async def _wait_wake(self) -> None:
        self._wake = anyio.Event()
        if self._stop.is_set() or self._fatal_pending is not None:
            return
        await self._wake.wait()

    def ready_reason(self, note: str = "") -> str:
        """``2/2 engines ready`` (what the pool routes to now), and what is wrong if any."""
        ready = sum(1 for b in self._pool.snapshot() if b["gpu"] == self.key and b["routable"])
        text = f"{ready}/{len(self.plan.engines)} engines ready"
        return f"{text}; {note}" if note else text

    def _route(self, key: str, routable: bool, *, fresh: bool = False) -> None:
        """Routability of one of this group's engines (gone from the pool: nothing to do)."""
        if self._pool.get(key) is not None:
            self._pool.set_routable(key, routable, fresh=fresh)

    def set_reason(self, reason: str) -> None:
        self.reason = reason
        self._observer.state_changed(self, self.state, self.state)

    def _set_state(self, new: GroupState, reason: str) -> None:
        """The one writer of ``state``; an edge the state machine lacks is a bug and raises."""
        old = self.state
        if new is old:
            self.set_reason(reason)
            return
        if not can_transition(old, new):
            _log.error("illegal_transition", gpu=self.key, **{"from": str(old)}, to=str(new),
                       reason=reason)
            raise IllegalTransition(f"{self.key}: {old} -> {new} ({reason})")
        self.state, self.since, self.reason = new, time.time(), reason
        log = _log.error if new is GroupState.FAILED else _log.info
        log("group_state", gpu=self.key, **{"from": str(old)}, to=str(new), reason=reason)
        self._observer.state_changed(self, old, new)
