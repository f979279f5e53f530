"""The reconcile decision run against a simulated world under random faults and commands.

FoundationDB-style, but of the pure part only: a seeded schedule of faults (engine crashes,
spawn failures, GPU faults) and commands (stop, drain, restart, reload of one engine) is
played against ``decide``; the simulator applies each action the way the group's loop does.
Checked on every step: nothing starts under a stop, a drain or a verdict; the group states
follow the transition table. Checked at the end, once the faults stop: the loop converges —
nothing left to do, and every wanted engine ready or FAILED with a reason (or everything
stopped under a stop). Hypothesis shrinks a failing schedule to a minimal one.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from mpsd.supervise.desired import Desired
from mpsd.supervise.faults import Fault
from mpsd.supervise.reconcile import (
    Action,
    EngineView,
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
    group_state,
)
from mpsd.supervise.states import GroupState, RestartPolicy, can_transition
from tests.unit.supervise.test_reconcile import desired

EVENTS = ("crash", "crash_starting", "spawn_fail", "gpu_fault", "stop", "drain", "restart",
          "reload", "verdict", "nothing", "nothing", "nothing")


class World:
    """The group's observed state, changed by the actions ``decide`` asks for and by faults."""

    def __init__(self, d: Desired) -> None:
        self.d = d
        self.v = GroupView({})
        self.now = 0.0
        self.state = GroupState.STOPPED
        self.serving = False
        self.spawn_fails = 0
        self.policy = RestartPolicy.of(d.options.restart)
        self.uncounted: set[str] = set()  # started, and neither ready nor counted since

    def engines(self, **changes: EngineView) -> None:
        self.v = replace(self.v, engines={**self.v.engines, **changes})

    def act(self, action: Action) -> None:
        v, now = self.v, self.now
        if isinstance(action, StopEngines):
            self.engines(**{k: replace(v.engines[k], phase=Phase.ABSENT, fault=None,
                                       ever_ready=False) for k in action.keys})
        elif isinstance(action, StopMps):
            self.v = replace(v, mps_live=False, mps_up=False)
        elif isinstance(action, Reset):
            self.v = replace(v, restart_generation=action.generation, fault=None, failed="",
                             backoff_until=0.0, restarts=type(v.restarts)(), engines={
                                 k: EngineView(k, e.phase, e.plan, ever_ready=e.ever_ready)
                                 for k, e in v.engines.items()})
        elif isinstance(action, Recover):
            self.engines(**{k: replace(e, phase=Phase.ABSENT, fault=None, ever_ready=False)
                            for k, e in v.engines.items()})
            self.v = replace(self.v, fault=None, restarts=v.restarts.record(now, self.policy),
                             failed=action.give_up,
                             backoff_until=0.0 if action.give_up else now + action.backoff_step)
            self.serving = False
        elif isinstance(action, RestartEngine):
            e = v.engines[action.key]
            self.engines(**{action.key: replace(
                e, phase=Phase.ABSENT, fault=None, ever_ready=False,
                restarts=e.restarts.record(now, self.policy), failed=action.give_up,
                backoff_until=0.0 if action.give_up else now + action.backoff_step,
                last_fault=action.fault.reason)})
        elif isinstance(action, StartMps):
            self.v = replace(v, mps_live=True, mps_up=True)
        elif isinstance(action, StartEngine):
            old = v.engine(action.plan.key)
            fresh = old.plan != action.plan
            base = EngineView(action.plan.key) if fresh else old
            if self.spawn_fails:
                self.spawn_fails -= 1
                self.engines(**{base.key: replace(base, plan=action.plan, phase=Phase.ABSENT,
                                                  fault=Fault("spawn", "port taken"))})
            else:
                self.engines(**{base.key: replace(base, plan=action.plan,
                                                  phase=Phase.STARTING, fault=None)})
        elif isinstance(action, Wait):
            self.now = max(now + 1.0, action.until or 0.0)
            self.engines(**{k: replace(e, phase=Phase.READY, ever_ready=True)
                            for k, e in v.engines.items()
                            if e.phase is Phase.STARTING and e.fault is None})

    def event(self, name: str, pick: int) -> None:
        live = [k for k, e in self.v.engines.items() if e.live]
        ready = [k for k in live if self.v.engines[k].phase is Phase.READY]
        starting = [k for k in live if self.v.engines[k].phase is Phase.STARTING]
        if name == "crash" and ready:
            key = ready[pick % len(ready)]
            self.engines(**{key: replace(self.v.engines[key], fault=Fault("exit", "crashed"))})
        elif name == "crash_starting" and starting:
            key = starting[pick % len(starting)]
            self.engines(**{key: replace(self.v.engines[key], fault=Fault("startup", "slow"))})
        elif name == "spawn_fail":
            self.spawn_fails += 1
        elif name == "gpu_fault" and self.v.mps_live:
            self.v = replace(self.v, fault=Fault("mps_status", "FAULT"))
        elif name == "stop":
            self.d = self.d.stop()
        elif name == "drain":
            self.d = self.d.drain()
        elif name == "restart" and not self.d.stopping:
            self.d = self.d.restarted()
        elif name == "verdict":
            self.d = self.d.condemn("hardware Xid 79")
        elif name == "reload":
            plan = self.d.plan.engines[pick % len(self.d.plan.engines)]
            self.d = self.d.with_engine(plan.key, replace(plan, argv=(*plan.argv, f"-{pick}")))

    def publish(self) -> None:
        """The loop's state bookkeeping: the derived state must take a legal edge."""
        new, reason = group_state(self.d, self.v, self.now, recovering=False,
                                  serving=self.serving)
        assert new is self.state or can_transition(self.state, new), (self.state, new, reason)
        self.serving = new in (GroupState.RUNNING, GroupState.DEGRADED)
        self.state = new

    def step(self) -> Action:
        action = decide(self.d, self.v, self.now)
        held = self.d.stopping or self.d.drained or bool(self.d.verdict)
        if held:
            assert not isinstance(action, StartEngine | StartMps), action
        self.no_hot_loop(action)
        if isinstance(action, Recover):  # the loop publishes RECOVERING before it acts
            recovering, _ = group_state(self.d, self.v, self.now, recovering=True,
                                        serving=self.serving)
            assert can_transition(self.state, recovering) or self.state is recovering
            self.state = recovering
        self.act(action)
        self.publish()
        return action

    def no_hot_loop(self, action: Action) -> None:
        """An engine is started again only after it was ready, stopped, or its failure was
        counted (restart intensity and backoff): never a tight loop of starts."""
        ready = {k for k, e in self.v.engines.items() if e.phase is Phase.READY}
        self.uncounted -= ready
        if isinstance(action, StartEngine):
            assert action.plan.key not in self.uncounted, ("started twice", action.plan.key)
            self.uncounted.add(action.plan.key)
        elif isinstance(action, RestartEngine):
            self.uncounted.discard(action.key)
        elif isinstance(action, StopEngines):
            self.uncounted -= set(action.keys)
        elif isinstance(action, Recover | Reset):
            self.uncounted.clear()

    def settle(self, steps: int = 80) -> None:
        """No more faults: the loop must reach "nothing to do" with everything explained."""
        for _ in range(steps):
            starting = any(e.phase is Phase.STARTING for e in self.v.engines.values())
            action = self.step()
            if action == Wait() and not starting:
                break
        else:
            raise AssertionError(f"no convergence: last {action}, view {self.v}")
        wanted = self.d.plan.engines
        if self.d.stopping or self.d.drained:
            assert not self.v.live and self.state is GroupState.STOPPED
        elif self.d.verdict or self.v.failed:
            assert not any(e.live for e in self.v.engines.values())
            assert self.state is GroupState.FAILED
        else:
            for plan in wanted:
                engine = self.v.engine(plan.key)
                assert (engine.phase is Phase.READY and engine.plan == plan) or \
                    engine.failed_for(plan), (plan.key, engine)


@settings(max_examples=200, deadline=None)
@given(mps=st.booleans(),
       schedule=st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 7)), max_size=40))
def test_the_reconcile_converges_under_random_faults_and_commands(
        mps: bool, schedule: list[tuple[str, int]]) -> None:
    world = World(desired(mps=mps))
    for name, pick in schedule:
        world.event(name, pick)
        world.step()
    world.spawn_fails = 0
    world.settle()
