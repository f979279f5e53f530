"""One GPU as one fault domain: its MPS daemon, its engines, their recovery (architecture.md §6).

A group is the single writer of its state. One *attempt* is one task group: start MPS, start
engines one after another, then watch the five fault signals. The first fault cancels the
attempt in the same tick it marks every engine unroutable; recovery then kills every engine at
once (their shared context is already poisoned), waits for the MPS server to come back (or
replaces the daemon), backs off, and starts over — until the restart budget says crash loop.
With MPS off there is no shared context, so each engine restarts alone.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import anyio
from anyio.abc import TaskGroup

from mpsd import logs
from mpsd.config import MpsConfig, RestartConfig
from mpsd.errors import HealthCheckFailed, MemberExited, MpsCommandError, SpawnError, StartupTimeout
from mpsd.plan.build import EnginePlan, GroupPlan
from mpsd.pool import Backend, BackendPool
from mpsd.status import HistoryEntry
from mpsd.supervise.engine import Engine
from mpsd.supervise.mps import MpsDaemon
from mpsd.supervise.mps_log import MpsLogEvent, MpsLogKind
from mpsd.supervise.states import GroupState, RestartBudget, can_transition

_log = logs.get("mpsd.group")
_STATUS_FAILURES = 3


@dataclass(frozen=True)
class Fault:
    """Why an attempt ended. ``fatal`` faults go to FAILED without a restart. ``engine`` names
    the one engine that restarts alone (MPS off); empty when the whole group restarts."""

    signal: str
    reason: str
    fatal: bool = False
    engine: str = ""


class GroupObserver(Protocol):
    """The one way to hear about groups: a group tells the supervisor, which tells its own
    observers (the metrics) the same three events. Each method must be cheap: it runs on the
    event loop inside the state machine."""

    def state_changed(self, group: GpuGroup, old: GroupState, new: GroupState) -> None: ...
    def fault(self, group: GpuGroup, fault: Fault) -> None: ...
    def recovered(self, group: GpuGroup, phase: str, seconds: float) -> None: ...


@dataclass
class GroupOptions:
    """Settings a group needs beyond its plan (all from the config's other sections)."""

    mps: MpsConfig
    restart: RestartConfig
    drain_timeout_s: float
    registry: Path | None
    environ: Mapping[str, str]


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
        self._on_fault: Callable[[Fault], None] | None = None
        self._ever_ready = False
        self._recovering_since: float | None = None
        self._fatal_pending: Fault | None = None
        self._tg: TaskGroup | None = None

    @property
    def key(self) -> str:
        return self.plan.key

    # -- commands from outside (supervisor, control API, NVML) ---------------------------

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

    def report_fault(self, fault: Fault) -> None:
        """A fault seen outside the group's own watchers (an NVML Xid)."""
        if self._on_fault is not None:
            self._on_fault(fault)
        elif fault.fatal:
            self._fatal_pending = fault
            self._wake.set()

    async def reconfigure(self, plan: GroupPlan) -> bool:
        """Roll engine-level changes one engine at a time while the others keep serving.

        Each removed or changed engine is stopped the safe way (drain → SIGTERM →
        ``terminate_client`` → SIGKILL), then its replacement starts and must be ready before
        the next one is touched. False when that is impossible (another GPU, MPS switched,
        the group not RUNNING): then the caller restarts the whole group.
        """
        identity = ("device", "uuid", "mps", "pipe_dir", "log_dir")
        if any(getattr(plan, a) != getattr(self.plan, a) for a in identity):
            return False
        if self.state is not GroupState.RUNNING or self._tg is None:
            return False
        old = {e.key: e for e in self.plan.engines}
        new = {e.key: e for e in plan.engines}
        self.plan = plan
        for key in [k for k in old if old[k] != new.get(k)]:
            engine = self.engines.pop(key, None)
            if engine is not None:
                await self._stop_engine(engine)
            self._pool.remove(key)
            _log.info("engine_rolled_out", gpu=self.key, engine=key)
            replacement = new.get(key)
            if replacement is not None and not await self._roll_in(replacement):
                return True
        for engine_plan in plan.engines:
            if engine_plan.key not in old and not await self._roll_in(engine_plan):
                return True
        self._set_reason(self._ready_reason())
        return True

    async def _roll_in(self, plan: EnginePlan) -> bool:
        """Start one engine of a reconfigured, running group; False once the attempt ended."""
        tg, on_fault = self._tg, self._on_fault
        if tg is None or on_fault is None or self.state is not GroupState.RUNNING:
            return False
        self._pool.add(Backend(plan.key, plan.gpu, plan.model, plan.base_url))
        failed: list[Fault] = []
        if self.mps is None:
            ready = anyio.Event()
            tg.start_soon(self._engine_slot, plan, ready, on_fault)
            await ready.wait()
        else:
            # A new engine that fails to start is its own problem, not its serving siblings':
            # it is killed and left out; real faults of the shared context still arrive
            # through the MPS signals and end the attempt.
            engine = await self._start_engine(plan, self.mps, failed.append)
            if engine is None:
                await self._drop_engine(plan.key, failed[0].reason)
                return True
            tg.start_soon(self._watch_mps_engine, engine, on_fault)
        _log.info("engine_rolled_in", gpu=self.key, engine=plan.key)
        return True

    async def _drop_engine(self, key: str, reason: str) -> None:
        engine = self.engines.pop(key, None)
        if engine is not None:
            await engine.process.kill()
        self._pool.remove(key)
        _log.error("engine_roll_in_failed", gpu=self.key, engine=key, reason=reason)
        self._set_reason(f"reload: {key} failed to start ({reason}); the others serve")

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, supervise and recover until ``stop()``; always leaves nothing running."""
        for plan in self.plan.engines:
            self._pool.add(Backend(plan.key, plan.gpu, plan.model, plan.base_url))
        reason = "start"
        try:
            while not self._stop.is_set():
                if self._fatal_pending is not None:
                    self._set_state(GroupState.FAILED, self._fatal_pending.reason)
                    self._fatal_pending = None
                    await self._wait_wake()
                    continue
                self._set_state(GroupState.STARTING, reason)
                fault = await self._attempt()
                if fault is None:
                    break
                self._observer.fault(self, fault)
                self.history.append({"at": time.time(), "signal": fault.signal,
                                     "reason": fault.reason})
                self._set_state(GroupState.RECOVERING, fault.reason)
                await self._recover(fault)
                now = time.monotonic()
                self.budget.record(now)
                if fault.fatal or self.budget.exhausted(now):
                    why = fault.reason if fault.fatal else (
                        f"crash loop ({self.budget.count(now)} restarts in "
                        f"{self.budget.window_s:g} s): {fault.reason}")
                    self._set_state(GroupState.FAILED, why)
                    await self._wait_wake()
                    reason = "operator restart"
                    continue
                delay = self.budget.backoff(now, self._rng)
                self._set_state(GroupState.BACKOFF, f"restart in {delay:.1f}s after {fault.signal}")
                with anyio.move_on_after(delay):
                    await self._wait_wake()
                reason = f"restart after {fault.signal}"
        finally:
            await self._shutdown()
            for plan in self.plan.engines:
                self._pool.remove(plan.key)

    async def _attempt(self) -> Fault | None:
        """One start-and-watch cycle; the fault that ended it, or None when asked to stop."""
        faults: list[Fault] = []
        async with anyio.create_task_group() as tg:

            def on_fault(fault: Fault) -> None:
                if faults:
                    return
                faults.append(fault)
                for key in self.engines:
                    self._pool.set_routable(key, False)
                _log.error("fault_detected", gpu=self.key, signal=fault.signal,
                           reason=fault.reason)
                tg.cancel_scope.cancel()

            self._on_fault, self._tg = on_fault, tg
            tg.start_soon(self._cancel_on_stop, tg)
            try:
                await self._start_all(tg, on_fault)
            except SpawnError as exc:
                on_fault(Fault("spawn", f"boot failure: {exc}", fatal=True))
        self._on_fault, self._tg = None, None
        if not faults and not self._stop.is_set():  # pragma: no cover - defensive
            return Fault("internal", "attempt ended without a fault")
        return faults[0] if faults else None

    async def _start_all(self, tg: TaskGroup, on_fault: Callable[[Fault], None]) -> None:
        t0 = time.monotonic()
        mps = await self._ensure_mps(tg, on_fault) if self.plan.mps else None
        for plan in self.plan.engines:
            if mps is None:
                ready = anyio.Event()
                tg.start_soon(self._engine_slot, plan, ready, on_fault)
                await ready.wait()
                continue
            engine = await self._start_engine(plan, mps, on_fault)
            if engine is None:
                return
            tg.start_soon(self._watch_mps_engine, engine, on_fault)
        if self._recovering_since is not None:
            self._observer.recovered(self, "engine", time.monotonic() - t0)
            self._recovering_since = None
        self._ever_ready = True
        self._set_state(GroupState.RUNNING, self._ready_reason())
        tg.start_soon(self._forgive_when_stable)

    async def _start_engine(self, plan: EnginePlan, mps: MpsDaemon | None,
                            on_fault: Callable[[Fault], None]) -> Engine | None:
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
            on_fault(Fault("startup", str(exc)))
            return None
        self._pool.set_routable(plan.key, True)
        return engine

    async def _watch_mps_engine(self, engine: Engine, on_fault: Callable[[Fault], None]) -> None:
        signal, reason = await self._watch_engine(engine)
        if not engine.stopping:
            on_fault(Fault(signal, reason))

    async def _engine_slot(self, plan: EnginePlan, ready: anyio.Event,
                           on_fault: Callable[[Fault], None]) -> None:
        """MPS off: this engine alone is its fault domain; its siblings keep serving."""
        while True:
            engine = await self._start_engine(plan, None, on_fault)
            if engine is None:
                return
            if ready.is_set() and self.state is GroupState.RUNNING:  # back after a restart
                self._set_reason(self._ready_reason())
            ready.set()
            signal, reason = await self._watch_engine(engine)
            if engine.stopping:
                return
            self._pool.set_routable(plan.key, False)
            await engine.process.kill()
            self.history.append({"at": time.time(), "signal": signal, "reason": reason,
                                 "engine": plan.key})
            now = time.monotonic()
            self.budget.record(now)
            if self.budget.exhausted(now):
                on_fault(Fault(signal, f"crash loop ({self.budget.count(now)} restarts in "
                                       f"{self.budget.window_s:g} s): {reason}", fatal=True))
                return
            self._observer.fault(self, Fault(signal, reason, engine=plan.key))
            if self.state is GroupState.RUNNING:
                self._set_reason(self._ready_reason(f"{plan.key} restarting: {reason}"))
            delay = self.budget.backoff(now, self._rng)
            _log.warning("engine_restart", gpu=self.key, engine=plan.key, reason=reason,
                         delay_s=round(delay, 2))
            await anyio.sleep(delay)

    async def _watch_engine(self, engine: Engine) -> tuple[str, str]:
        """Until the engine exits or fails its health probes: (signal, reason)."""
        result: list[tuple[str, str]] = []
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                code = await engine.process.wait()
                result.append(("engine_exit", f"{engine.key} exited with code {code}"))
                tg.cancel_scope.cancel()

            async def health() -> None:
                try:
                    await engine.watch_health()
                except HealthCheckFailed as exc:
                    result.append(("health", str(exc)))
                    tg.cancel_scope.cancel()

            tg.start_soon(exited)
            tg.start_soon(health)
        return result[0]

    async def _ensure_mps(self, tg: TaskGroup, on_fault: Callable[[Fault], None]) -> MpsDaemon:
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
        tg.start_soon(self._watch_mps_daemon, mps, on_fault)
        tg.start_soon(self._poll_mps_status, mps, on_fault)
        return mps

    async def _watch_mps_daemon(self, mps: MpsDaemon, on_fault: Callable[[Fault], None]) -> None:
        code = await mps.wait()
        on_fault(Fault("mps_daemon_exit", f"MPS control daemon exited with code {code}"))

    async def _poll_mps_status(self, mps: MpsDaemon, on_fault: Callable[[Fault], None]) -> None:
        failures = 0
        while True:
            await anyio.sleep(self.options.mps.status_interval_s)
            try:
                for server in await mps.server_pids():
                    if await mps.server_status(server) == "FAULT":
                        on_fault(Fault("mps_status", f"MPS server {server} status FAULT"))
                        return
                failures = 0
            except MpsCommandError as exc:
                failures += 1
                if failures >= _STATUS_FAILURES:
                    on_fault(Fault("mps_unresponsive", f"MPS daemon not answering: {exc}"))
                    return

    def _on_mps_log(self, event: MpsLogEvent) -> None:
        if event.kind is MpsLogKind.FATAL and self._on_fault is not None:
            self._on_fault(Fault("mps_log", f"{event.source}: {event.line}"))

    async def _recover(self, fault: Fault) -> None:
        """Fail fast: SIGKILL every engine at once, then get the MPS server ACTIVE again."""
        t0 = time.monotonic()
        self._recovering_since = t0
        await self._kill_engines()
        if self.mps is not None:
            recovered = self.mps.pid is not None and await self.mps.wait_recovered(
                self.options.mps.recover_timeout_s)
            if not recovered:
                _log.warning("mps_daemon_replace", gpu=self.key, reason=fault.reason)
                if self.mps.pid is not None:
                    await self.mps.stop(1.0)
                else:
                    await self.mps.kill()
                self.mps = None
            self._observer.recovered(self, "mps", time.monotonic() - t0)

    async def _kill_engines(self) -> None:
        async with anyio.create_task_group() as tg:
            for engine in self.engines.values():
                tg.start_soon(engine.process.kill)

    async def _stop_engine(self, engine: Engine) -> None:
        """On purpose: drain → SIGTERM → at the deadline ``terminate_client`` → SIGKILL.

        SIGKILL of a busy MPS client faults its siblings; ``terminate_client`` first makes
        the kill safe (mps.md §1.2).
        """
        engine.stopping = True
        if engine.pid is None:
            return
        await self._pool.drain(engine.key, self.options.drain_timeout_s)
        mps = self.mps

        async def terminate_clients() -> None:
            if mps is None or mps.pid is None:
                return
            try:
                for pid in await engine.mps_clients(mps):
                    await mps.terminate_client(pid)
            except MpsCommandError as exc:
                _log.warning("terminate_client_failed", gpu=self.key, engine=engine.key,
                             error=str(exc))

        code = await engine.process.terminate(engine.plan.stop_timeout_s, terminate_clients)
        _log.info("engine_stopped", gpu=self.key, engine=engine.key, code=code)

    async def _shutdown(self) -> None:
        with anyio.CancelScope(shield=True):
            self._set_state(GroupState.STOPPING, "stop requested")
            async with anyio.create_task_group() as tg:
                for engine in self.engines.values():
                    tg.start_soon(self._stop_engine, engine)
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
        if self._stop.is_set():
            return
        await self._wake.wait()

    def _ready_reason(self, note: str = "") -> str:
        """``2/2 engines ready`` (what the pool routes to now), and what is wrong if any."""
        ready = sum(1 for b in self._pool.snapshot() if b["gpu"] == self.key and b["routable"])
        text = f"{ready}/{len(self.plan.engines)} engines ready"
        return f"{text}; {note}" if note else text

    def _set_reason(self, reason: str) -> None:
        self.reason = reason
        self._observer.state_changed(self, self.state, self.state)

    def _set_state(self, new: GroupState, reason: str) -> None:
        old = self.state
        if new is old or not can_transition(old, new):
            if new is not old:
                _log.debug("transition_skipped", gpu=self.key, **{"from": str(old)},
                           to=str(new))
            return
        self.state, self.since, self.reason = new, time.time(), reason
        log = _log.error if new is GroupState.FAILED else _log.info
        log("group_state", gpu=self.key, **{"from": str(old)}, to=str(new), reason=reason)
        self._observer.state_changed(self, old, new)
