"""The group state machine and the restart budget (pure; ``now`` is passed in)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpsd.supervise.states import TRANSITIONS, GroupState, RestartBudget, can_transition

S = GroupState


def budget(max_restarts: int = 3, window: float = 60.0) -> RestartBudget:
    return RestartBudget(max_restarts, window, stable_after_s=30.0, backoff_initial_s=1.0,
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


def test_budget_exhausts_after_max_restarts_in_window() -> None:
    b = budget(max_restarts=3, window=60)
    for t in (0, 1, 2):
        b.record(t)
        assert not b.exhausted(t)
    b.record(3)
    assert b.exhausted(3)
    assert not b.exhausted(63.5)  # the first three left the window


def test_stable_uptime_forgives_restarts() -> None:
    b = budget()
    b.record(0)
    b.record(1)
    assert not b.ran_stable(running_since=2, now=20)
    assert b.count(20) == 2
    assert b.ran_stable(running_since=2, now=40)
    assert b.count(40) == 0


def test_backoff_grows_exponentially_and_is_capped() -> None:
    b = budget(max_restarts=100)
    rng = random.Random(1)
    delays = []
    for t in range(6):
        b.record(t)
        delays.append(b.backoff(t, rng))
    for n, delay in enumerate(delays, 1):
        step = min(8.0, 2.0 ** (n - 1))
        assert step / 2 <= delay <= step


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=40), st.integers(0, 10))
def test_budget_counts_only_the_window(times: list[float], max_restarts: int) -> None:
    b = budget(max_restarts=max_restarts, window=100)
    for t in sorted(times):
        b.record(t)
    now = max(times, default=0.0)
    inside = sum(1 for t in times if now - t <= 100)
    assert b.count(now) == inside
    assert b.exhausted(now) == (inside > max_restarts)
