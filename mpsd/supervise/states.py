"""Group states, the legal transitions between them, and the restart budget (architecture.md §6).

Pure: no I/O, no clock of its own. Callers pass ``now`` so the budget is testable exhaustively.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpsd.config import RestartConfig


class GroupState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


class IllegalTransition(RuntimeError):
    """A group tried an edge the state machine lacks: a bug, never skipped silently."""


_S = GroupState
TRANSITIONS: dict[GroupState, frozenset[GroupState]] = {
    _S.STOPPED: frozenset({_S.STARTING, _S.FAILED, _S.STOPPING}),  # FAILED: a fatal Xid first
    _S.STARTING: frozenset({_S.RUNNING, _S.RECOVERING, _S.FAILED, _S.STOPPING}),
    _S.RUNNING: frozenset({_S.RECOVERING, _S.FAILED, _S.STOPPING}),
    _S.RECOVERING: frozenset({_S.BACKOFF, _S.FAILED, _S.STOPPING}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.FAILED, _S.STOPPING}),
    _S.FAILED: frozenset({_S.STARTING, _S.STOPPING}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.FAILED}),  # FAILED: the stop itself broke
}


def can_transition(current: GroupState, new: GroupState) -> bool:
    """Whether ``current → new`` is a legal edge of the group state machine."""
    return new in TRANSITIONS[current]


@dataclass
class RestartBudget:
    """Counts restarts in a sliding window; says when a group must give up (crash loop).

    Uptime of ``stable_after_s`` in RUNNING forgives every earlier restart (systemd ≥ 254
    ``RestartSteps`` shape); ``reset()`` is what ``mpsd restart GPU`` does.
    """

    max_restarts: int
    window_s: float
    stable_after_s: float
    backoff_initial_s: float
    backoff_max_s: float
    _times: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> None:
        """Note one restart at ``now``."""
        self._times.append(now)
        self._expire(now)

    def count(self, now: float) -> int:
        """Restarts still inside the window at ``now``."""
        self._expire(now)
        return len(self._times)

    def exhausted(self, now: float) -> bool:
        """True once more than ``max_restarts`` restarts fall inside ``window_s``."""
        return self.count(now) > self.max_restarts

    def ran_stable(self, running_since: float, now: float) -> bool:
        """Forget earlier restarts when the group ran ``stable_after_s`` without a fault."""
        if now - running_since >= self.stable_after_s:
            self._times.clear()
            return True
        return False

    def reset(self) -> None:
        self._times.clear()

    def update(self, config: RestartConfig) -> None:
        """Take new limits (reload) and keep the restarts already counted."""
        self.max_restarts = config.max_restarts
        self.window_s = config.window_s
        self.stable_after_s = config.stable_after_s
        self.backoff_initial_s = config.backoff_initial_s
        self.backoff_max_s = config.backoff_max_s

    def next_start(self, now: float, fatal: bool, rng: random.Random) -> float | None:
        """Count a restart at ``now``: the delay before the next start, or None when the fault
        is ``fatal`` or this restart makes a crash loop."""
        self.record(now)
        return None if fatal or self.exhausted(now) else self.backoff(now, rng)

    def crash_loop(self, now: float, reason: str) -> str:
        """Why a group gave up: the restarts in the window, then the last fault's reason."""
        return f"crash loop ({self.count(now)} restarts in {self.window_s:g} s): {reason}"

    def backoff(self, now: float, rng: random.Random) -> float:
        """Delay before the next start: exponential in the recent restarts, with jitter.

        Half of the exponential step is fixed and half random ("equal jitter"), so restarts of
        several groups spread out without any of them retrying at once.
        """
        attempts = max(self.count(now), 1)
        step = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (attempts - 1))
        jitter: float = rng.uniform(0, step / 2)
        return step / 2 + jitter

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
