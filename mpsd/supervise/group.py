"""One GPU as one fault domain, run as a level-triggered reconcile loop (architecture.md §6).

Each pass observes (its slots, the MPS daemon, faults seen since), asks the pure
:func:`~mpsd.supervise.reconcile.decide` for the next step toward the desired state, and takes
that one bounded step; it runs again after every event (a fault, a start that ended, a new
desired state) and at least every :data:`RESYNC_S`. Every action is contained: a spawn that
fails, a port taken, a start-up timeout, an MPS command that fails, a fork error — each becomes
a fault *of that engine* (or of the MPS daemon) with a reason, never an exception in a task
group; a process that outlives SIGKILL makes the GPU FAILED "needs an operator". The desired
state is written only by the supervisor's command queue; this loop is the only writer of the
group's observed state and of its engines' routability.
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
from mpsd.errors import MemberExited, MpsdError, ProcessWillNotDie
from mpsd.plan.build import EnginePlan, GroupPlan
from mpsd.pool import BackendPool
from mpsd.status import HistoryEntry
from mpsd.supervise.contract import GroupObserver, GroupOptions
from mpsd.supervise.desired import Desired
from mpsd.supervise.engine import Engine
from mpsd.supervise.faults import Fault, watch_engine, watch_mps
from mpsd.supervise.mps import MpsDaemon
from mpsd.supervise.mps_log import MpsLogEvent, MpsLogKind
from mpsd.supervise.reconcile import (
    Action,
    GroupView,
    Phase,
    Recover,
    Reset,
    RestartEngine,
    StartEngine,
    StartMps,
    StopEngines,
    StopMps,
    Wait,
    decide,
    engine_state,
    group_state,
)
from mpsd.supervise.recovery import recover_mps, stop_engine
from mpsd.supervise.slot import Slot
from mpsd.supervise.states import (
    EngineState,
    GroupState,
    RestartPolicy,
    Restarts,
    can_transition,
    jittered,
)

_log = logs.get("mpsd.group")
RESYNC_S = 5.0  # a pass at least this often, whatever happens (level-triggered)
_NOT_COMING = frozenset({GroupState.FAILED, GroupState.STOPPING, GroupState.STOPPED})
_COMING = frozenset({EngineState.STARTING, EngineState.BACKOFF, EngineState.STOPPED,
                     EngineState.STOPPING})


class GpuGroup:
    """Reconciles one GPU's MPS daemon and engines toward its :class:`Desired` state."""

    def __init__(self, desired: Desired, pool: BackendPool, session: aiohttp.ClientSession,
                 observer: GroupObserver, rng: random.Random | None = None) -> None:
        self.desired = desired
        self.key = desired.plan.key
        self._pool = pool
        self._session = session
        self._observer = observer
        self._rng = rng or random.Random()
        self.state = GroupState.STOPPED
        self.since = time.time()
        self.reason = ""
        self.history: deque[HistoryEntry] = deque(maxlen=50)
        self.slots: dict[str, Slot] = {}
        self.mps: MpsDaemon | None = None
        self._mps_up = False
        self._mps_scope: anyio.CancelScope | None = None
        self._fault: Fault | None = None
        self._backoff_until = 0.0
        self._failed = ""
        self._restarts = Restarts()
        self._restart_generation = desired.restart_generation
        self._unkillable = ""
        self._recovering = False
        self._recovering_since: float | None = None
        self._serving = False
        self.observed_generation = 0
        self._wake = anyio.Event()
        self._passed = anyio.Event()
        self._tg: TaskGroup | None = None
        self.done = anyio.Event()

    # -- what others read ----------------------------------------------------------------

    @property
    def plan(self) -> GroupPlan:
        return self.desired.plan

    @property
    def options(self) -> GroupOptions:
        return self.desired.options

    @property
    def engines(self) -> dict[str, Engine]:
        """The engines whose process runs now."""
        return {k: s.engine for k, s in self.slots.items() if s.engine is not None}

    @property
    def restarts_in_window(self) -> int:
        policy = self._policy()
        return self._restarts.count(time.monotonic(), policy)

    def engine_state(self, plan: EnginePlan) -> tuple[EngineState, str, int]:
        """A planned engine's state, its reason and its restarts in the window (status)."""
        slot = self.slots.get(plan.key) or Slot(plan.key)
        now = time.monotonic()
        state = engine_state(plan, slot.view(), self.desired.stopping, now)
        reason = slot.failed or (slot.last_fault if state is not EngineState.READY else "")
        return state, reason, slot.restarts.count(now, self._policy())

    @property
    def has_capacity(self) -> bool:
        """Serving, or on its way back to serving (starting, recovering, backing off): a change
        of its engines is a rollout that must not take that capacity away. Not when drained,
        FAILED, condemned or stopping: there is nothing to keep."""
        d = self.desired
        return (self.state not in (GroupState.FAILED, GroupState.STOPPED, GroupState.STOPPING)
                and not (d.stopping or d.drained or d.verdict))

    @property
    def restart_acted_on(self) -> bool:
        """The last operator restart has been acted on: what ran before it is stopped."""
        return self._restart_generation >= self.desired.restart_generation

    async def next_pass(self) -> None:
        """Until the loop has looked at the world once more (after a desired-state change)."""
        await self._passed.wait()

    def engine_outcome(self, plan: EnginePlan, failures_before: int) -> str | None:
        """For a rollout: ``"ready"`` once ``plan`` serves, the fault's reason once a start of
        it failed after ``failures_before`` faults, else None (still on its way)."""
        slot = self.slots.get(plan.key)
        if slot is None or slot.plan != plan:
            return None
        if slot.phase is Phase.READY:
            return "ready"
        if slot.failures > failures_before:
            return slot.failed or slot.last_fault or "failed"
        return None

    def failures(self, key: str) -> int:
        slot = self.slots.get(key)
        return slot.failures if slot is not None else 0

    def crashed(self, reason: str) -> None:
        """Its loop died of a bug (everything it ran is already killed): FAILED with the
        error, so that status says so; ``mpsd restart`` starts a fresh loop."""
        self._serving = False
        if self.state is not GroupState.FAILED:
            self._set_state(GroupState.FAILED, reason)

    # -- inputs: the supervisor's desired state, and faults seen outside -----------------

    def set_desired(self, desired: Desired) -> None:
        """The command queue's new desired state (the only writer)."""
        self.desired = desired
        self._wake.set()

    def report_fault(self, fault: Fault) -> None:
        """A fault of the whole GPU seen outside its own watchers (an application Xid)."""
        self._group_fault(fault)

    def report_engine_fault(self, key: str, signal: str, reason: str) -> None:
        """One engine is dead or hung (the proxy saw it, or MPS logged its client's exit):
        unrouted now, and its watcher ends it like any other fault of that engine."""
        slot = self.slots.get(key)
        if slot is None or slot.engine is None or slot.engine.stopping:
            return
        self._route(key, False)
        slot.engine.condemn(signal, reason)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until the desired state says stop and nothing runs; leaves nothing behind.

        An unexpected exception in an action is a fault of the whole GPU with the error as its
        reason (FAILED "internal error"): the loop goes on and stops what runs.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                while await self._pass():
                    pass
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._abandon()
            for key in [b["key"] for b in self._pool.snapshot() if b["gpu"] == self.key]:
                self._pool.remove(key)
            self.done.set()

    async def _pass(self) -> bool:
        """One observe → decide → act; False when the group is stopped for good."""
        self._wake = anyio.Event()
        now = time.monotonic()
        self._sync_pool()
        view = self._view()
        action = decide(self.desired, view, now)
        self._publish(view, now)
        self.observed_generation = self.desired.generation
        passed, self._passed = self._passed, anyio.Event()
        passed.set()
        if self.desired.stopping and self._unkillable:  # a stop must end: leave it behind
            _log.error("stop_leaves_a_process", gpu=self.key, reason=self._unkillable)
            return False
        if isinstance(action, Wait):
            if self.desired.stopping and not view.live:
                return False
            await self._sleep(action.until)
            return True
        try:
            await self._act(action)
        except ProcessWillNotDie as exc:
            _log.error("process_will_not_die", gpu=self.key, error=str(exc))
            self._unkillable = f"needs an operator: {exc}"
        except Exception as exc:  # a bug: FAILED with its reason, never a dead task
            _log.exception("group_error", gpu=self.key, action=type(action).__name__)
            self._failed = f"internal error: {exc!r}"
        return True

    async def _sleep(self, until: float | None) -> None:
        timeout = RESYNC_S if until is None else min(RESYNC_S, until - time.monotonic())
        with anyio.move_on_after(max(timeout, 0.0)):
            await self._wake.wait()

    def _view(self) -> GroupView:
        engines = {k: s.view() for k, s in self.slots.items()}
        mps_live = self.mps is not None and self.mps.pid is not None
        return GroupView(engines, mps_live, mps_live and self._mps_up, self._fault,
                         self._backoff_until, self._failed, self._restarts,
                         self._restart_generation, self._unkillable)

    async def _act(self, action: Action) -> None:
        if isinstance(action, StopEngines):
            await self._stop_engines(action.keys, kill=action.kill)
        elif isinstance(action, StopMps):
            await self._stop_mps()
        elif isinstance(action, Reset):
            self._reset(action.generation)
        elif isinstance(action, Recover):
            await self._recover(action)
        elif isinstance(action, RestartEngine):
            await self._restart_engine(action)
        elif isinstance(action, StartMps):
            await self._start_mps()
        elif isinstance(action, StartEngine):
            await self._start_engine(action.plan)

    # -- actions ---------------------------------------------------------------------------

    async def _stop_engines(self, keys: tuple[str, ...], *, kill: bool) -> None:
        """In parallel; each bounded (drain, ``stop_timeout_s``, the reaping deadline)."""
        slots = [self.slots[k] for k in keys]
        for slot in slots:
            self._route(slot.key, False)
            if slot.scope is not None:
                slot.scope.cancel()
        unkillable: list[str] = []

        async def stop(slot: Slot) -> None:
            engine = slot.engine
            if engine is None:
                return
            engine.stopping = True
            try:
                if kill:
                    await engine.process.kill()
                else:
                    await self._stop_safely(engine)
            except ProcessWillNotDie as exc:
                unkillable.append(str(exc))
                return
            slot.gone()

        async with anyio.create_task_group() as tg:
            for slot in slots:
                tg.start_soon(stop, slot)
        if unkillable:
            raise ProcessWillNotDie("; ".join(unkillable))

    async def _stop_safely(self, engine: Engine) -> None:
        mps = self.mps if self.plan.mps else None
        await stop_engine(engine, self._pool, mps, self.options.drain_timeout_s)

    async def _stop_mps(self) -> None:
        if self._mps_scope is not None:
            self._mps_scope.cancel()
            self._mps_scope = None
        mps, self.mps, self._mps_up = self.mps, None, False
        if mps is not None:
            await mps.stop()

    def _reset(self, generation: int) -> None:
        """An operator restart reached the loop: every fault of the past is forgotten."""
        self._restart_generation = generation
        self._fault, self._failed, self._backoff_until = None, "", 0.0
        self._unkillable = ""
        self._restarts, self._serving = Restarts(), False
        for slot in self.slots.values():
            slot.reset()
        _log.info("restart_history_reset", gpu=self.key, generation=generation)

    async def _recover(self, action: Recover) -> None:
        """one_for_all: SIGKILL every engine at once (the shared context is poisoned, a grace
        period buys nothing), get the MPS server ACTIVE again or replace it, then back off."""
        fault = action.fault
        t0 = time.monotonic()
        self._recovering, self._serving = True, False
        self._recovering_since = self._recovering_since or t0
        self._unroute_all()
        self._note_fault(fault)
        self._publish(self._view(), t0)
        try:
            await self._stop_engines(tuple(k for k, s in self.slots.items() if s.engine),
                                     kill=True)
            if self.mps is not None:
                if self._mps_scope is not None:
                    self._mps_scope.cancel()
                    self._mps_scope = None
                if await recover_mps(self.mps, self.options.mps.recover_timeout_s, fault):
                    self._watch_mps(self.mps)
                else:
                    self.mps, self._mps_up = None, False
                self._observer.recovered(self, "mps", time.monotonic() - t0)
        finally:
            self._recovering = False
        now = time.monotonic()
        self._restarts = self._restarts.record(now, self._policy())
        self._fault = None
        for slot in self.slots.values():
            slot.fault = None
        if action.give_up:
            self._failed = action.give_up
        else:
            self._backoff_until = now + jittered(action.backoff_step, self._rng.random())

    async def _restart_engine(self, action: RestartEngine) -> None:
        """one_for_one: this engine alone is stopped, counted, and backs off or is FAILED."""
        slot = self.slots[action.key]
        fault = replace(action.fault, engine=action.key)
        self._route(slot.key, False)
        _log.error("fault_detected", gpu=self.key, engine=slot.key, signal=fault.signal,
                   reason=fault.reason, at=time.time())
        engine = slot.engine
        if engine is not None:
            engine.stopping = True
            if slot.scope is not None:
                slot.scope.cancel()
            if self.plan.mps and engine.pid is not None:
                await self._stop_safely(engine)  # maybe busy: terminate_client before SIGKILL
            else:
                await engine.process.kill()
        slot.gone()
        now = time.monotonic()
        slot.restarts = slot.restarts.record(now, self._policy())
        slot.last_fault, slot.failures = fault.reason, slot.failures + 1
        self._note_fault(fault, count=not action.give_up)
        if action.give_up:
            slot.failed = action.give_up
            _log.error("engine_failed", gpu=self.key, engine=slot.key, reason=action.give_up)
            return
        delay = jittered(action.backoff_step, self._rng.random())
        slot.backoff_until = now + delay
        _log.warning("engine_restart", gpu=self.key, engine=slot.key, reason=fault.reason,
                     delay_s=round(delay, 2))

    async def _start_mps(self) -> None:
        """Start this GPU's MPS daemon; any failure is a fault of the GPU (backoff, budget)."""
        assert self._tg is not None
        mps = self.mps = MpsDaemon(
            self.key, self.options.mps.control_binary, self.plan.uuid, self.plan.pipe_dir,
            self.plan.log_dir, environ=self.options.environ, extra_env=self.options.mps.env,
            registry=self.options.registry, command_timeout_s=self.options.mps.command_timeout_s,
            on_log=self._on_mps_log)
        _log.info("mps_daemon_starting", gpu=self.key,
                  msg=f"{self.key}: starting its MPS control daemon")
        try:
            await mps.start()
        except (MpsdError, OSError) as exc:
            await mps.kill()
            self.mps = None
            self._group_fault(Fault("mps_start", f"MPS daemon did not come up: {exc}"))
            return
        self._mps_up = True
        self._watch_mps(mps)

    def _watch_mps(self, mps: MpsDaemon) -> None:
        assert self._tg is not None
        scope = self._mps_scope = anyio.CancelScope()

        async def watch() -> None:
            with scope:
                await watch_mps(mps, self.options.mps.status_interval_s, self._group_fault)

        self._tg.start_soon(watch)

    async def _start_engine(self, plan: EnginePlan) -> None:
        """Spawn one engine; its task waits for readiness, then watches its fault signals."""
        assert self._tg is not None
        slot = self.slots.setdefault(plan.key, Slot(plan.key))
        engine = Engine(plan, self._session, self.options.registry)
        slot.begin(engine)
        order = next((i for i, e in enumerate(self.plan.engines, 1) if e.key == plan.key), 0)
        _log.info("engine_starting", gpu=self.key, engine=plan.key, model=plan.model,
                  msg=f"{plan.key}: starting, engine {order} of {len(self.plan.engines)} "
                      f"on {self.key}")
        try:
            await engine.start()
        except Exception as exc:  # port taken, no executable, fork's EAGAIN/ENOMEM, ...
            slot.gone()
            slot.fault = Fault("spawn", str(exc))
            return
        slot.scope = anyio.CancelScope()
        self._tg.start_soon(self._engine_task, slot, engine, slot.scope)

    async def _engine_task(self, slot: Slot, engine: Engine, scope: anyio.CancelScope) -> None:
        """Start-up, then the fault watchers: whatever ends them is a fault of this engine."""
        with scope:
            try:
                await engine.wait_ready(self.mps if self.plan.mps else None)
            except MemberExited as exc:
                self._engine_fault(slot, engine, Fault("engine_exit", str(exc)))
                return
            except Exception as exc:  # start-up timeout, canary, MPS attach, a bug
                signal = "startup" if isinstance(exc, MpsdError) else "internal"
                self._engine_fault(slot, engine, Fault(signal, str(exc) or repr(exc)))
                return
            slot.phase, slot.ever_ready = Phase.READY, True
            slot.restarts = slot.restarts.healthy(time.monotonic())
            self._route(slot.key, True, fresh=True)
            self._wake.set()
            try:
                fault = await watch_engine(engine, self._router(slot, engine),
                                           lambda f: self._engine_fault(slot, engine, f))
            except Exception as exc:
                fault = Fault("internal", f"{slot.key}: watching it failed: {exc!r}")
            self._engine_fault(slot, engine, fault)

    # -- faults ----------------------------------------------------------------------------

    def _engine_fault(self, slot: Slot, engine: Engine, fault: Fault) -> None:
        """MPS on and the engine had served: every engine of the GPU is unrouted in this tick
        (their context is shared); else only this one. The reason carries the engine's own last
        error line when it said one (a model that does not load, a bad flag), and where its
        whole output is."""
        cause = engine.process.last_error
        if cause and engine.process.returncode is not None:
            where = engine.process.output_file
            fault = replace(fault, reason=f"{fault.reason}: {cause}"
                            + (f" (whole output: {where})" if where else ""))
        if not slot.report(engine, fault):
            return
        if self.plan.mps and slot.ever_ready:
            self._unroute_all()
        else:
            self._route(slot.key, False)
        self._announce(self._view(), time.monotonic())
        self._wake.set()

    def _group_fault(self, fault: Fault) -> None:
        if self._fault is None:
            self._fault = fault
        self._unroute_all()
        self._announce(self._view(), time.monotonic())
        self._wake.set()

    def _on_mps_log(self, event: MpsLogEvent) -> None:
        """A fatal line faults the GPU; a client of a running engine going away (EngineCore
        died: 2 ms after the kill on the H200) condemns that engine at once."""
        if event.kind is MpsLogKind.FATAL:
            self._group_fault(Fault("mps_log", f"{event.source}: {event.line}"))
        elif event.kind is MpsLogKind.CLIENT_EXITED and event.pid is not None:
            for key, engine in self.engines.items():
                if event.pid in engine.mps_pids:
                    self.report_engine_fault(key, "mps_client_exit",
                                             f"{key}: MPS client {event.pid} went away")

    def _note_fault(self, fault: Fault, *, count: bool = True) -> None:
        """History and observers; the log line tests and operators look for."""
        entry: HistoryEntry = {"at": time.time(), "signal": fault.signal, "reason": fault.reason}
        if fault.engine:
            entry["engine"] = fault.engine
        else:
            _log.error("fault_detected", gpu=self.key, signal=fault.signal, reason=fault.reason,
                       at=time.time())
        self.history.append(entry)
        if count:
            self._observer.fault(self, fault)

    async def _abandon(self) -> None:
        """Leaving the loop by cancellation: nothing may outlive mpsd's group (bounded)."""
        for slot in self.slots.values():
            if slot.engine is not None:
                try:
                    await slot.engine.process.kill()
                except ProcessWillNotDie as exc:
                    _log.error("process_will_not_die", gpu=self.key, error=str(exc))
                slot.gone()
        if self.mps is not None:
            await self.mps.kill()
            self.mps = None

    # -- routing and state -----------------------------------------------------------------

    def _sync_pool(self) -> None:
        """The pool lists every engine the plan wants (503, not 404, while one starts) and what
        still runs; a changed engine's entry is replaced once its old process is gone."""
        wanted = {p.key: p for p in self.plan.engines}
        for key in [k for k, s in self.slots.items() if k not in wanted and s.engine is None]:
            del self.slots[key]  # removed by a reload and stopped
        for backend in [b for b in self._pool.snapshot() if b["gpu"] == self.key]:
            key, slot = backend["key"], self.slots.get(backend["key"])
            plan = wanted.get(key)
            running = slot is not None and slot.engine is not None
            if running:
                continue
            if plan is None or (backend["model"], backend["url"]) != (plan.model, plan.base_url):
                self._pool.remove(key)
        for plan in self.plan.engines:
            if self._pool.get(plan.key) is None:
                self._pool.add(Backend(plan.key, plan.gpu, plan.model, plan.base_url))

    def _router(self, slot: Slot, engine: Engine) -> Callable[[bool], None]:
        def route(ok: bool) -> None:
            if not ok or (slot.engine is engine and not engine.stopping and not engine.condemned
                          and slot.fault is None):
                self._route(slot.key, ok)
        return route

    def _route(self, key: str, routable: bool, *, fresh: bool = False) -> None:
        if self._pool.get(key) is not None:
            self._pool.set_routable(key, routable, fresh=fresh)

    def _unroute_all(self) -> None:
        for key in self.slots:
            self._route(key, False)

    def _policy(self) -> RestartPolicy:
        return RestartPolicy.of(self.options.restart)

    def _publish(self, view: GroupView, now: float) -> None:
        state, reason = group_state(self.desired, view, now, recovering=self._recovering,
                                    serving=self._serving)
        if state in (GroupState.RUNNING, GroupState.DEGRADED):
            if not self._serving and self._recovering_since is not None:
                self._observer.recovered(self, "engine", now - self._recovering_since)
                self._recovering_since = None
            self._serving = True
            self._restarts = self._restarts.healthy(now)
        elif state is not GroupState.RECOVERING:
            self._serving = False
        self._set_state(state, reason)
        self._announce(view, now)

    def _announce(self, view: GroupView, now: float) -> None:
        """Tell the pool which engines are on their way back (starting, backing off, being
        replaced, or this GPU recovering): the proxy may hold their model's requests for them.
        A FAILED engine or GPU, a drain or a stop is not coming back."""
        d = self.desired
        hopeful = self.state not in _NOT_COMING and not (d.stopping or d.drained or d.verdict)
        for plan in self.plan.engines:
            backend = self._pool.get(plan.key)
            if backend is None:
                continue
            state = engine_state(plan, view.engine(plan.key), False, now)
            faulted = state is EngineState.READY and not backend.routable  # about to restart
            self._pool.set_coming(plan.key, hopeful and (state in _COMING or faulted))

    def _set_state(self, new: GroupState, reason: str) -> None:
        """The one writer of ``state``. An edge the state machine lacks is a bug: logged as
        ``illegal_transition`` (every test that runs mpsd fails on it), then taken anyway —
        the state must say what the world is, and the loop must go on."""
        old = self.state
        if new is old:
            if reason != self.reason:
                self.reason = reason
                self._observer.state_changed(self, old, new)
            return
        if not can_transition(old, new):
            _log.error("illegal_transition", gpu=self.key, **{"from": str(old)}, to=str(new),
                       reason=reason)
        self.state, self.since, self.reason = new, time.time(), reason
        if new is GroupState.FAILED:
            self._serving = False
            self._unroute_all()
        log = _log.error if new is GroupState.FAILED else _log.info
        log("group_state", gpu=self.key, **{"from": str(old)}, to=str(new), reason=reason)
        self._observer.state_changed(self, old, new)
