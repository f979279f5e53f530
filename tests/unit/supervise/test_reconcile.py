"""The reconcile decision as tables: (desired, observed, now) → the next action, and the state
status shows. Pure: no process, no clock, no I/O — every case is one line of data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mpsd.config import MpsConfig, RestartConfig, parse_config
from mpsd.host.nvml import GpuInfo, GpuInventory
from mpsd.plan.build import EnginePlan, GroupPlan, HostFacts, build_plan
from mpsd.supervise.contract import GroupOptions
from mpsd.supervise.desired import Desired
from mpsd.supervise.faults import Fault
from mpsd.supervise.reconcile import (
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
from mpsd.supervise.states import GroupState, RestartPolicy, Restarts

GIB = 1 << 30
RESTART = RestartConfig(max_restarts=2, window_s=60, stable_after_s=30, backoff_initial_s=1,
                        backoff_max_s=8)
POLICY = RestartPolicy.of(RESTART)
NOW = 1000.0
CRASH = Fault("engine_exit", "exited with code 1")


def group_plan(mps: bool = True) -> GroupPlan:
    inventory = GpuInventory(gpus=(GpuInfo(0, "GPU-0", "NVIDIA H200", 140 * GIB, None, "580"),))
    config = parse_config({"gpu": [{"device": "0", "engine": [
        {"model": "Qwen/Qwen2.5-0.5B-Instruct", "name": "q", "replicas": 2}]}]})
    facts = HostFacts(inventory=inventory, mps_binary="/usr/bin/nvidia-cuda-mps-control"
                      if mps else None, cpus=tuple(range(8)))
    return build_plan(config, facts, "test.toml").groups[0]


def desired(mps: bool = True, **changes: object) -> Desired:
    options = GroupOptions(mps=MpsConfig(), restart=RESTART, drain_timeout_s=1.0,
                           registry=None, environ={})
    return replace(Desired(group_plan(mps), options), **changes)  # type: ignore[arg-type]


def engines(d: Desired) -> tuple[EnginePlan, EnginePlan]:
    first, second = d.plan.engines
    return first, second


def ready(plan: EnginePlan, **changes: object) -> EngineView:
    view = EngineView(plan.key, Phase.READY, plan, ever_ready=True)
    return replace(view, **changes)  # type: ignore[arg-type]


def serving(d: Desired, **changes: object) -> GroupView:
    """Both engines ready, MPS up (when on)."""
    a, b = engines(d)
    view = GroupView({a.key: ready(a), b.key: ready(b)}, mps_live=d.plan.mps,
                     mps_up=d.plan.mps)
    return replace(view, **changes)  # type: ignore[arg-type]


def restarts(count: int) -> Restarts:
    return Restarts(tuple(NOW - 1 - i for i in range(count)))


# -- decide ----------------------------------------------------------------------------------


def test_a_serving_gpu_has_nothing_to_do() -> None:
    d = desired()
    assert decide(d, serving(d), NOW) == Wait()


@pytest.mark.parametrize("change", [{"stopping": True}, {"drained": True},
                                    {"restart_generation": 1}])
def test_stop_drain_and_restart_stop_every_engine_first_then_mps(
        change: dict[str, object]) -> None:
    d = replace(desired(), **change)  # type: ignore[arg-type]
    a, b = engines(d)
    view = serving(d)
    assert decide(d, view, NOW) == StopEngines((a.key, b.key))
    stopped = replace(view, engines={})
    assert decide(d, stopped, NOW) == StopMps()
    idle = replace(stopped, mps_live=False, mps_up=False)
    assert decide(d, idle, NOW) == (Reset(1) if "restart_generation" in change else Wait())


def test_a_stop_wins_over_faults_backoff_and_starts() -> None:
    d = desired(stopping=True)
    a, _ = engines(d)
    view = GroupView({a.key: EngineView(a.key, Phase.STARTING, a, fault=CRASH)}, True, True,
                     fault=CRASH, backoff_until=NOW + 10)
    assert decide(d, view, NOW) == StopEngines((a.key,))


def test_a_verdict_kills_every_engine_and_holds_nothing() -> None:
    d = desired(verdict="hardware Xid 79")
    a, b = engines(d)
    assert decide(d, serving(d), NOW) == StopEngines((a.key, b.key), kill=True)
    assert decide(d, serving(d, engines={}), NOW) == StopMps()
    assert decide(d, GroupView({}), NOW) == Wait()


def test_a_gpu_fault_recovers_the_group_with_backoff() -> None:
    d = desired()
    action = decide(d, serving(d, fault=Fault("mps_status", "FAULT")), NOW)
    assert isinstance(action, Recover) and not action.give_up
    assert action.backoff_step == 1.0


def test_a_gpu_fault_over_the_intensity_gives_up_with_the_crash_loop() -> None:
    d = desired()
    action = decide(d, serving(d, fault=CRASH, restarts=restarts(2)), NOW)
    assert isinstance(action, Recover)
    assert action.give_up.startswith("crash loop (3 restarts in 60 s)")


def test_a_fatal_gpu_fault_gives_up_at_once() -> None:
    d = desired()
    fatal = Fault("xid", "hardware", fatal=True)
    assert decide(d, serving(d, fault=fatal), NOW) == Recover(fatal, give_up="hardware")


def test_mps_on_a_serving_engine_fault_is_one_for_all() -> None:
    d = desired(mps=True)
    a, b = engines(d)
    view = serving(d, engines={a.key: ready(a), b.key: ready(b, fault=CRASH)})
    action = decide(d, view, NOW)
    assert isinstance(action, Recover) and action.fault == CRASH


def test_mps_off_a_serving_engine_fault_is_one_for_one() -> None:
    d = desired(mps=False)
    a, b = engines(d)
    view = serving(d, engines={a.key: ready(a), b.key: ready(b, fault=CRASH)})
    assert decide(d, view, NOW) == RestartEngine(b.key, CRASH, backoff_step=1.0)


def test_mps_on_an_engine_that_failed_before_ready_restarts_alone() -> None:
    d = desired(mps=True)
    a, b = engines(d)
    late = EngineView(b.key, Phase.STARTING, b, fault=Fault("startup", "not ready after 2s"))
    action = decide(d, serving(d, engines={a.key: ready(a), b.key: late}), NOW)
    assert isinstance(action, RestartEngine) and action.key == b.key


def test_a_spawn_that_failed_restarts_that_engine_and_over_intensity_fails_it_alone() -> None:
    d = desired()
    a, b = engines(d)
    spawn = Fault("spawn", "port 20000 on 127.0.0.1 is already in use")
    view = serving(d, engines={a.key: ready(a), b.key: EngineView(b.key, plan=b, fault=spawn)})
    assert decide(d, view, NOW) == RestartEngine(b.key, spawn, backoff_step=1.0)
    tired = EngineView(b.key, plan=b, fault=spawn, restarts=restarts(2))
    action = decide(d, replace(view, engines={a.key: ready(a), b.key: tired}), NOW)
    assert isinstance(action, RestartEngine) and action.give_up.startswith("crash loop")


def test_changed_and_removed_engines_are_replaced_one_at_a_time() -> None:
    d = desired()
    a, b = engines(d)
    old_a, old_b = replace(a, argv=(*a.argv, "--old")), replace(b, argv=(*b.argv, "--old"))
    view = serving(d, engines={a.key: ready(old_a), b.key: ready(old_b)})
    assert decide(d, view, NOW) == StopEngines((a.key,))
    removed = ready(replace(a, key="gpu0/x-0"))
    gone = serving(d, engines={a.key: ready(a), b.key: ready(b), removed.key: removed})
    assert decide(d, gone, NOW) == StopEngines(("gpu0/x-0",))


def test_nothing_starts_during_the_groups_backoff() -> None:
    d = desired()
    assert decide(d, GroupView({}, backoff_until=NOW + 3), NOW) == Wait(NOW + 3)


def test_mps_comes_first_then_engines_one_after_another() -> None:
    d = desired(mps=True)
    a, b = engines(d)
    assert decide(d, GroupView({}), NOW) == StartMps()
    assert decide(d, GroupView({}, mps_live=True, mps_up=False), NOW) == StopMps()
    up = GroupView({}, mps_live=True, mps_up=True)
    assert decide(d, up, NOW) == StartEngine(a)
    starting = replace(up, engines={a.key: EngineView(a.key, Phase.STARTING, a)})
    assert decide(d, starting, NOW) == Wait()
    assert decide(d, replace(up, engines={a.key: ready(a)}), NOW) == StartEngine(b)


def test_mps_off_needs_no_daemon() -> None:
    d = desired(mps=False)
    a, _ = engines(d)
    assert decide(d, GroupView({}), NOW) == StartEngine(a)


def test_an_engine_in_backoff_lets_the_next_one_start_and_sets_the_wake_up() -> None:
    d = desired()
    a, b = engines(d)
    waiting = EngineView(a.key, plan=a, backoff_until=NOW + 2)
    up = GroupView({a.key: waiting}, mps_live=True, mps_up=True)
    assert decide(d, up, NOW) == StartEngine(b)
    both = replace(up, engines={a.key: waiting, b.key: ready(b)})
    assert decide(d, both, NOW) == Wait(NOW + 2)
    assert decide(d, both, NOW + 2) == StartEngine(a)


def test_a_failed_engine_stays_down_until_its_plan_changes() -> None:
    d = desired()
    a, b = engines(d)
    failed = EngineView(a.key, plan=a, failed="crash loop")
    view = GroupView({a.key: failed, b.key: ready(b)}, mps_live=True, mps_up=True)
    assert decide(d, view, NOW) == Wait()
    fixed = replace(a, argv=(*a.argv, "--fixed"))
    d2 = d.with_engine(a.key, fixed)
    assert decide(d2, view, NOW) == StartEngine(fixed)


def test_a_process_that_will_not_die_leaves_everything_to_an_operator() -> None:
    d = desired()
    a, b = engines(d)
    stuck = serving(d, unkillable="needs an operator", fault=CRASH)
    assert decide(d, stuck, NOW) == Wait()
    assert decide(d.restarted(), stuck, NOW) == StopEngines((a.key, b.key))  # tries again


# -- what status says ------------------------------------------------------------------------


def state(d: Desired, view: GroupView, *, serving_: bool = False,
          recovering: bool = False) -> GroupState:
    return group_state(d, view, NOW, recovering=recovering, serving=serving_)[0]


def test_group_states() -> None:
    d = desired()
    a, b = engines(d)
    up = serving(d)
    one = replace(up, engines={a.key: ready(a)})
    failed_b = EngineView(b.key, plan=b, failed="crash loop")
    backoff_b = EngineView(b.key, plan=b, backoff_until=NOW + 1, last_fault="exited")
    assert state(d, up) is GroupState.RUNNING
    assert state(d, one) is GroupState.STARTING
    assert state(d, one, serving_=True) is GroupState.RUNNING
    assert state(d, replace(up, engines={a.key: ready(a), b.key: failed_b})) \
        is GroupState.DEGRADED
    all_failed = {a.key: EngineView(a.key, plan=a, failed="x"), b.key: failed_b}
    assert state(d, replace(up, engines=all_failed)) is GroupState.FAILED
    assert state(d, replace(up, engines={a.key: ready(a), b.key: backoff_b}),
                 serving_=True) is GroupState.RUNNING
    assert state(d, up, recovering=True) is GroupState.RECOVERING
    assert state(d, replace(up, backoff_until=NOW + 1)) is GroupState.BACKOFF
    assert state(d, replace(up, failed="crash loop")) is GroupState.FAILED
    assert state(replace(d, verdict="Xid 79"), GroupView({})) is GroupState.FAILED
    assert state(replace(d, drained=True), up) is GroupState.STOPPING
    assert group_state(replace(d, drained=True), GroupView({}), NOW, recovering=False,
                       serving=False) == (GroupState.STOPPED, "drained")


def test_the_reason_names_every_engine_that_is_not_ready() -> None:
    d = desired()
    a, b = engines(d)
    view = serving(d, engines={a.key: ready(a), b.key: EngineView(
        b.key, plan=b, backoff_until=NOW + 1, last_fault="port 20001 already in use")})
    reason = group_state(d, view, NOW, recovering=False, serving=True)[1]
    assert reason == f"1/2 engines ready; {b.key} backoff (port 20001 already in use)"


# -- the desired state's own edits ---------------------------------------------------------


def test_a_rollout_step_replaces_adds_and_removes_one_engine() -> None:
    d = desired()
    a, b = engines(d)
    changed = replace(b, argv=(*b.argv, "--new"))
    assert d.with_engine(b.key, changed).plan.engines == (a, changed)
    assert d.with_engine(b.key, None).plan.engines == (a,)
    extra = replace(b, key="gpu0/q-2")
    assert d.with_engine(extra.key, extra).plan.engines == (a, b, extra)
    assert d.with_engine(b.key, changed).generation == d.generation + 1


def test_a_verdict_and_a_drain_survive_a_reload_of_the_same_gpu() -> None:
    d = desired(verdict="Xid 79", drained=True)
    other_mps = replace(d.plan, log_dir=d.plan.log_dir / "x")
    again = d.reidentified(other_mps, d.options)
    assert again.verdict == "Xid 79" and again.drained
    assert again.restart_generation == d.restart_generation + 1
    assert not d.restarted().verdict and not d.restarted().drained


def test_engines_with_an_explicit_kv_size_start_together() -> None:
    """With ``--kv-cache-memory-bytes`` vLLM does not profile free memory: the GPU starts every
    engine at once (and comes back in the time of its slowest one); without it, in order."""
    d = desired()
    a, b = engines(d)
    sized = tuple(replace(e, argv=(*e.argv, "--kv-cache-memory-bytes", "1073741824"))
                  for e in (a, b))
    together = replace(d, plan=replace(d.plan, engines=sized))
    assert together.plan.start_together[0] and not d.plan.start_together[0]
    assert "--kv-cache-memory-bytes" in d.plan.start_together[1]
    up = GroupView({sized[0].key: EngineView(sized[0].key, Phase.STARTING, sized[0])},
                   mps_live=True, mps_up=True)
    assert decide(together, up, NOW) == StartEngine(sized[1])
    plain = replace(up, engines={a.key: EngineView(a.key, Phase.STARTING, a)})
    assert decide(d, plain, NOW) == Wait()
