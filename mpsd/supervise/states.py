"""Group and engine states, the legal group transitions, and restart intensity (architecture.md §6).

Pure: no I/O, no clock of its own. Callers pass ``now`` so that every rule is table-testable.
Restart intensity is Erlang/OTP's: at most ``max_restarts`` restarts in ``window_s`` seconds,
for each engine and for each group; a run of ``stable_after_s`` without a fault forgives the
restarts before it (systemd's ``RestartSteps`` shape).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpsd.config import RestartConfig


class GroupState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"  # some engine FAILED on its own budget; the others serve
    RECOVERING = "recovering"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


class EngineState(enum.StrEnum):
    """One engine as status shows it: what the plan wants of it and how far it got."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


class IllegalTransition(RuntimeError):
    """A group tried an edge the state machine lacks: a bug, never skipped silently."""


_S = GroupState
# STOPPED is reachable from every state: a stop (drain, restart) of a GPU with nothing
# running left is immediate, without a STOPPING in between.
TRANSITIONS: dict[GroupState, frozenset[GroupState]] = {
    _S.STOPPED: frozenset({_S.STARTING, _S.FAILED, _S.STOPPING}),  # FAILED: a verdict first
    _S.STARTING: frozenset({_S.RUNNING, _S.DEGRADED, _S.RECOVERING, _S.FAILED, _S.STOPPING,
                            _S.STOPPED}),
    _S.RUNNING: frozenset({_S.DEGRADED, _S.RECOVERING, _S.FAILED, _S.STOPPING, _S.STOPPED}),
    _S.DEGRADED: frozenset({_S.RUNNING, _S.RECOVERING, _S.FAILED, _S.STOPPING, _S.STOPPED}),
    _S.RECOVERING: frozenset({_S.BACKOFF, _S.FAILED, _S.STOPPING, _S.STOPPED}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.RECOVERING, _S.FAILED, _S.STOPPING, _S.STOPPED}),
    _S.FAILED: frozenset({_S.STARTING, _S.STOPPING, _S.STOPPED}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.FAILED}),  # FAILED: a process would not die
}


def can_transition(current: GroupState, new: GroupState) -> bool:
    """Whether ``current → new`` is a legal edge of the group state machine."""
    return new in TRANSITIONS[current]


@dataclass(frozen=True)
class RestartPolicy:
    """Intensity and backoff, from ``[restart]``; the same numbers bound an engine and a group."""

    max_restarts: int
    window_s: float
    stable_after_s: float
    backoff_initial_s: float
    backoff_max_s: float

    @classmethod
    def of(cls, config: RestartConfig) -> RestartPolicy:
        return cls(config.max_restarts, config.window_s, config.stable_after_s,
                   config.backoff_initial_s, config.backoff_max_s)


@dataclass(frozen=True)
class Restarts:
    """The restarts of one engine or group still counting against its intensity (immutable).

    ``times`` are monotonic seconds. ``stable_since`` is when it last became healthy (ready,
    or RUNNING): a fault after ``stable_after_s`` of health forgives the restarts before it.
    """

    times: tuple[float, ...] = ()
    stable_since: float | None = None

    def count(self, now: float, policy: RestartPolicy) -> int:
        """Restarts inside the window at ``now``."""
        return sum(1 for t in self.times if now - t <= policy.window_s)

    def record(self, now: float, policy: RestartPolicy) -> Restarts:
        """One more restart at ``now`` (after forgiving a long healthy run); ``stable_since``
        is cleared: it is healthy again only once it says so (:meth:`healthy`)."""
        kept = () if self.forgiven(now, policy) else self.times
        return Restarts((*(t for t in kept if now - t <= policy.window_s), now), None)

    def forgiven(self, now: float, policy: RestartPolicy) -> bool:
        return self.stable_since is not None and now - self.stable_since >= policy.stable_after_s

    def healthy(self, now: float) -> Restarts:
        """It became healthy at ``now`` (kept when it already was)."""
        return self if self.stable_since is not None else Restarts(self.times, now)

    def unhealthy(self) -> Restarts:
        return Restarts(self.times, None)

    def exhausted(self, now: float, policy: RestartPolicy) -> bool:
        """More than ``max_restarts`` restarts inside ``window_s``: give up (crash loop)."""
        return self.count(now, policy) > policy.max_restarts

    def backoff_step(self, now: float, policy: RestartPolicy) -> float:
        """The exponential step before the next start: ``backoff_initial_s`` doubled per
        recent restart, at most ``backoff_max_s``. Half of it is fixed, half is jitter
        (:func:`jittered`), so that several GPUs restarting together spread out."""
        attempts = max(self.count(now, policy), 1)
        return min(policy.backoff_max_s, policy.backoff_initial_s * 2.0 ** (attempts - 1))

    def crash_loop(self, now: float, policy: RestartPolicy, reason: str) -> str:
        """Why it gave up: the restarts in the window, then the last fault's reason."""
        return f"crash loop ({self.count(now, policy)} restarts in {policy.window_s:g} s): {reason}"


def jittered(step: float, uniform: float) -> float:
    """Equal jitter: ``step/2`` fixed plus ``uniform`` (in [0, 1)) of the other half."""
    return step / 2 + uniform * step / 2
