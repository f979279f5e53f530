"""The group state machine and restart intensity (pure; ``now`` is passed in)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpsd.supervise.states import (
    TRANSITIONS,
    GroupState,
    RestartPolicy,
    Restarts,
    can_transition,
    jittered,
)

S = GroupState


def policy(max_restarts: int = 3, window: float = 60.0) -> RestartPolicy:
    return RestartPolicy(max_restarts, window, stable_after_s=30.0, backoff_initial_s=1.0,
                         backoff_max_s=8.0)


@pytest.mark.parametrize(("old", "new"), [
    (S.STOPPED, S.STARTING), (S.STARTING, S.RUNNING), (S.RUNNING, S.RECOVERING),
    (S.RECOVERING, S.BACKOFF), (S.BACKOFF, S.STARTING), (S.RECOVERING, S.FAILED),
    (S.FAILED, S.STARTING), (S.RUNNING, S.STOPPING), (S.STOPPING, S.STOPPED),
])
def test_lifecycle_edges_are_legal(old: GroupState, new: GroupState) -> None:
    assert can_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.STOPPED, S.RUNNING), (S.RUNNING, S.STARTING), (S.STOPPING, S.RUNNING),
    (S.FAILED, S.RUNNING), (S.BACKOFF, S.RUNNING), (S.STOPPING, S.STARTING),
])
def test_illegal_edges_are_refused(old: GroupState, new: GroupState) -> None:
    assert not can_transition(old, new)


def test_every_state_can_be_stopped() -> None:
    for state in GroupState:
        assert state is S.STOPPED or state is S.STOPPING or can_transition(state, S.STOPPING)
    assert set(TRANSITIONS) == set(GroupState)


def test_intensity_exhausts_after_max_restarts_in_window() -> None:
    p, r = policy(max_restarts=3, window=60), Restarts()
    for t in (0, 1, 2):
        r = r.record(t, p)
        assert not r.exhausted(t, p)
    r = r.record(3, p)
    assert r.exhausted(3, p)
    assert not r.exhausted(63.5, p)  # the first three left the window


def test_a_stable_run_forgives_the_restarts_before_it() -> None:
    p = policy()
    r = Restarts().record(0, p).record(1, p).healthy(2)
    assert r.record(20, p).count(20, p) == 3  # healthy for 18 s only: they still count
    assert r.record(40, p).count(40, p) == 1  # healthy for 38 s: only the new one counts


def test_a_new_fault_clears_healthy_and_only_a_new_health_counts() -> None:
    p = policy()
    r = Restarts().healthy(0).record(10, p)  # 10 s healthy: nothing forgiven, not healthy now
    assert r.stable_since is None
    assert r.record(50, p).count(50, p) == 2  # crashing since, never healthy: no forgiveness


def test_backoff_grows_exponentially_and_is_capped() -> None:
    p, r = policy(max_restarts=100), Restarts()
    for n in range(1, 7):
        r = r.record(n, p)
        step = r.backoff_step(n, p)
        assert step == min(8.0, 2.0 ** (n - 1))
        assert jittered(step, 0.0) == step / 2 and jittered(step, 0.999) < step


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=40), st.integers(0, 10))
def test_intensity_counts_only_the_window(times: list[float], max_restarts: int) -> None:
    p, r = policy(max_restarts=max_restarts, window=100), Restarts()
    for t in sorted(times):
        r = r.record(t, p)
    now = max(times, default=0.0)
    inside = sum(1 for t in times if now - t <= 100)
    assert r.count(now, p) == inside
    assert r.exhausted(now, p) == (inside > max_restarts)
