"""The decision of a GPU's reconcile loop: (desired, observed, now) → the next action. Pure.

Level-triggered, the Kubernetes controller way: the loop (:mod:`mpsd.supervise.group`)
observes the processes, asks :func:`decide` for one bounded step toward the desired state,
takes it, and asks again — after every event and on a timer. Nothing here remembers an event:
a missed one is harmless because the next pass sees the world as it is, and nothing the plan
wants can be forgotten: an engine that should run and does not is started, backing off with a
reason, or FAILED with a reason.

The restart strategy is Erlang/OTP's. MPS on is **one_for_all**: the engines share one GPU
context, so a fault of an engine that was serving restarts every engine of the GPU (and the
MPS server is checked or replaced). MPS off is **one_for_one**: an engine restarts alone and
its siblings are never touched. An engine that fails before it was ever ready is contained to
itself in both (a poisoned MPS server still shows up as an MPS fault of the whole GPU).
Restart intensity (:class:`~mpsd.supervise.states.Restarts`) bounds both an engine, which goes
FAILED alone (its GPU DEGRADED), and the group, which goes FAILED.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from mpsd.plan.build import EnginePlan
from mpsd.supervise.desired import Desired
from mpsd.supervise.faults import Fault
from mpsd.supervise.states import EngineState, GroupState, RestartPolicy, Restarts


class Phase(enum.StrEnum):
    """Where an engine's process is (``ABSENT``: none runs)."""

    ABSENT = "absent"
    STARTING = "starting"
    READY = "ready"


@dataclass(frozen=True)
class EngineView:
    """One engine as the loop observed it."""

    key: str
    phase: Phase = Phase.ABSENT
    plan: EnginePlan | None = None  # of the running process, else of the last one started
    fault: Fault | None = None  # seen, not acted on yet
    ever_ready: bool = False  # the running process became ready (an MPS client that served)
    backoff_until: float = 0.0
    failed: str = ""  # over its own restart intensity, for ``plan``
    restarts: Restarts = field(default_factory=Restarts)
    last_fault: str = ""  # the reason of the last fault acted on

    @property
    def live(self) -> bool:
        return self.phase is not Phase.ABSENT

    def failed_for(self, plan: EnginePlan) -> bool:
        """FAILED for this very plan (a reload that changes the engine starts it afresh)."""
        return bool(self.failed) and self.plan == plan

    def waiting_for(self, plan: EnginePlan, now: float) -> float | None:
        """The end of this engine's backoff, while one holds for ``plan``."""
        return self.backoff_until if self.plan == plan and now < self.backoff_until else None


@dataclass(frozen=True)
class GroupView:
    """One GPU as the loop observed it."""

    engines: Mapping[str, EngineView]
    mps_live: bool = False  # an MPS control daemon process of this group exists
    mps_up: bool = False  # ... and answers with its settings applied
    fault: Fault | None = None  # a fault of the whole GPU, not acted on yet
    backoff_until: float = 0.0
    failed: str = ""  # the group gave up (crash loop, or a fatal fault)
    restarts: Restarts = field(default_factory=Restarts)
    restart_generation: int = 0  # the last operator restart acted on
    unkillable: str = ""  # a process that would not die: only an operator can help

    @property
    def live(self) -> bool:
        return self.mps_live or any(e.live for e in self.engines.values())

    def engine(self, key: str) -> EngineView:
        return self.engines.get(key) or EngineView(key)


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Nothing to do until an event, or until ``until`` (monotonic) when given."""

    until: float | None = None


@dataclass(frozen=True)
class StopEngines:
    """Stop these engines: the safe way (drain → SIGTERM → ``terminate_client`` → SIGKILL), or
    at once with SIGKILL when ``kill`` (their context is poisoned or the GPU is condemned)."""

    keys: tuple[str, ...]
    kill: bool = False


@dataclass(frozen=True)
class StopMps:
    pass


@dataclass(frozen=True)
class Reset:
    """Forget the fault history (an operator restart was acted on)."""

    generation: int


@dataclass(frozen=True)
class Recover:
    """one_for_all: SIGKILL every engine, get the MPS server ACTIVE (or replace it), count a
    group restart; then back off for ``backoff_step`` or, when ``give_up``, go FAILED."""

    fault: Fault
    give_up: str = ""  # the FAILED reason, when this restart is one too many or fatal
    backoff_step: float = 0.0


@dataclass(frozen=True)
class RestartEngine:
    """one_for_one (and any engine that failed before it was ever ready): stop it alone, count
    an engine restart; then back off for ``backoff_step`` or, when ``give_up``, FAILED alone."""

    key: str
    fault: Fault
    give_up: str = ""
    backoff_step: float = 0.0


@dataclass(frozen=True)
class StartMps:
    pass


@dataclass(frozen=True)
class StartEngine:
    plan: EnginePlan


Action = Wait | StopEngines | StopMps | Reset | Recover | RestartEngine | StartMps | StartEngine


def decide(desired: Desired, view: GroupView, now: float) -> Action:
    """The next step toward ``desired``; the order of the checks is the priority of the work.

    A stop (and a drain, an operator restart) wins over everything; a GPU that needs an
    operator holds nothing; faults are handled before anything starts; a changed engine is
    replaced before missing ones start; engines start one at a time (concurrent vLLM starts on
    one GPU size their KV cache from each other's allocations) unless every engine of the GPU
    has an explicit KV size (:attr:`GroupPlan.start_together`): then all at once, and the GPU
    comes back in the time of its slowest engine, not the sum.
    """
    plan = desired.plan
    policy = RestartPolicy.of(desired.options.restart)
    live = tuple(k for k, e in view.engines.items() if e.live)
    restart_pending = desired.restart_generation > view.restart_generation
    if view.unkillable and not (desired.stopping or restart_pending):
        return Wait()  # only an operator can help; `mpsd restart` tries the kill again
    if desired.stopping or desired.drained or restart_pending:
        if live:
            return StopEngines(live)
        if view.mps_live:
            return StopMps()
        return Reset(desired.restart_generation) if restart_pending else Wait()
    if desired.verdict or view.failed:
        if live:
            return StopEngines(live, kill=True)
        return StopMps() if view.mps_live else Wait()
    if view.fault is not None:
        return _recover(view.fault, view.restarts, now, policy)
    wanted = {e.key: e for e in plan.engines}
    for key in live:  # faults of running engines, in the order they are planned
        engine = view.engines[key]
        if engine.fault is None:
            continue
        if plan.mps and engine.ever_ready:
            return _recover(engine.fault, view.restarts, now, policy)
        return _restart_engine(engine, engine.fault, now, policy)
    for engine in view.engines.values():  # a start that failed before any process ran
        if not engine.live and engine.fault is not None:
            return _restart_engine(engine, engine.fault, now, policy)
    stale = tuple(k for k in live if view.engines[k].plan != wanted.get(k))
    if stale:
        return StopEngines(stale[:1])  # removed or changed: replaced one at a time
    if now < view.backoff_until:
        return Wait(view.backoff_until)
    if plan.mps and not view.mps_up:
        return StopMps() if view.mps_live else StartMps()
    if not plan.start_together[0] and any(view.engines[k].phase is Phase.STARTING
                                          for k in live):
        return Wait()
    wake: float | None = None
    for engine_plan in plan.engines:
        engine = view.engine(engine_plan.key)
        if engine.live or engine.failed_for(engine_plan):
            continue
        until = engine.waiting_for(engine_plan, now)
        if until is None:
            return StartEngine(engine_plan)
        wake = until if wake is None else min(wake, until)
    return Wait(wake)


def _recover(fault: Fault, restarts: Restarts, now: float, policy: RestartPolicy) -> Recover:
    after = restarts.record(now, policy)
    if fault.fatal:
        return Recover(fault, give_up=fault.reason)
    if after.exhausted(now, policy):
        return Recover(fault, give_up=after.crash_loop(now, policy, fault.reason))
    return Recover(fault, backoff_step=after.backoff_step(now, policy))


def _restart_engine(engine: EngineView, fault: Fault, now: float,
                    policy: RestartPolicy) -> RestartEngine:
    after = engine.restarts.record(now, policy)
    if fault.fatal:
        return RestartEngine(engine.key, fault, give_up=fault.reason)
    if after.exhausted(now, policy):
        return RestartEngine(engine.key, fault,
                             give_up=after.crash_loop(now, policy, fault.reason))
    return RestartEngine(engine.key, fault, backoff_step=after.backoff_step(now, policy))


# -- what status says ------------------------------------------------------------------------


def engine_state(plan: EnginePlan, view: EngineView, stopping: bool, now: float) -> EngineState:
    """One planned engine's state as status shows it."""
    if view.live:
        if stopping or view.plan != plan:
            return EngineState.STOPPING
        return EngineState.READY if view.phase is Phase.READY else EngineState.STARTING
    if view.failed_for(plan):
        return EngineState.FAILED
    if view.waiting_for(plan, now) is not None:
        return EngineState.BACKOFF
    return EngineState.STOPPED


def group_state(desired: Desired, view: GroupView, now: float, *, recovering: bool,
                serving: bool) -> tuple[GroupState, str]:
    """The group's state and reason. ``serving``: every engine that can be ready was, since
    the last start (a later engine-alone restart keeps it RUNNING, with a note)."""
    if view.unkillable:
        return GroupState.FAILED, view.unkillable
    if desired.stopping or desired.drained or desired.restart_generation > view.restart_generation:
        why = ("drained" if desired.drained else "stop requested" if desired.stopping
               else "restart requested")
        return (GroupState.STOPPING, why) if view.live else (GroupState.STOPPED, why)
    if desired.verdict or view.failed:
        return GroupState.FAILED, desired.verdict or view.failed
    if recovering:
        return GroupState.RECOVERING, view.fault.reason if view.fault else "recovering"
    if now < view.backoff_until:
        return GroupState.BACKOFF, f"restart in {view.backoff_until - now:.1f}s"
    plans = desired.plan.engines
    states = {p.key: engine_state(p, view.engine(p.key), False, now) for p in plans}
    failed = [p.key for p in plans if states[p.key] is EngineState.FAILED]
    if plans and len(failed) == len(plans):
        return GroupState.FAILED, "every engine failed: " + view.engine(failed[0]).failed
    ready = sum(s is EngineState.READY for s in states.values())
    notes = [f"{k} failed: {view.engine(k).failed}" for k in failed]
    notes += [f"{p.key} {states[p.key]}" + _why(view.engine(p.key)) for p in plans
              if states[p.key] in (EngineState.BACKOFF, EngineState.STARTING,
                                   EngineState.STOPPING, EngineState.STOPPED)]
    reason = f"{ready}/{len(plans)} engines ready" + "".join(f"; {n}" for n in notes)
    if not serving and ready + len(failed) < len(plans):
        return GroupState.STARTING, reason
    return (GroupState.DEGRADED if failed else GroupState.RUNNING), reason


def _why(view: EngineView) -> str:
    return f" ({view.last_fault})" if view.last_fault else ""
