"""One engine of a group as its reconcile loop tracks it: the observed half of the reconcile.

A slot holds what the loop knows of one engine key — its process (if any), the plan that
process was started from, how far its start got, a fault not acted on yet, its restart
intensity and backoff. Only the group's loop and the engine's own task (start-up, then the
fault watchers) write it; :meth:`view` is the frozen copy :func:`~mpsd.supervise.reconcile.decide`
reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anyio import CancelScope

from mpsd.plan.build import EnginePlan
from mpsd.supervise.engine import Engine
from mpsd.supervise.faults import Fault
from mpsd.supervise.reconcile import EngineView, Phase
from mpsd.supervise.states import Restarts


@dataclass
class Slot:
    key: str
    engine: Engine | None = None
    phase: Phase = Phase.ABSENT
    plan: EnginePlan | None = None
    fault: Fault | None = None
    ever_ready: bool = False
    backoff_until: float = 0.0
    failed: str = ""
    restarts: Restarts = field(default_factory=Restarts)
    last_fault: str = ""
    failures: int = 0  # faults acted on for ``plan``: a rollout waits on this
    scope: CancelScope | None = None  # the engine's task (start-up, then its watchers)

    def view(self) -> EngineView:
        return EngineView(self.key, self.phase, self.plan, self.fault, self.ever_ready,
                          self.backoff_until, self.failed, self.restarts, self.last_fault)

    def begin(self, engine: Engine) -> None:
        """A process is being started from ``engine.plan``; a new plan starts a fresh count."""
        if engine.plan != self.plan:
            self.failed, self.restarts, self.backoff_until, self.failures = "", Restarts(), 0.0, 0
            self.last_fault = ""
        self.engine, self.plan, self.phase = engine, engine.plan, Phase.STARTING
        self.fault, self.ever_ready = None, False

    def gone(self) -> None:
        """Its process is stopped and reaped (on purpose, or after a fault)."""
        if self.scope is not None:
            self.scope.cancel()
        self.engine, self.phase, self.scope, self.fault, self.ever_ready = (
            None, Phase.ABSENT, None, None, False)

    def reset(self) -> None:
        """An operator restart: the fault history of this engine is forgotten."""
        self.failed, self.restarts, self.backoff_until, self.failures = "", Restarts(), 0.0, 0
        self.last_fault, self.fault = "", None

    def report(self, engine: Engine, fault: Fault) -> bool:
        """A fault of ``engine``; False when it is stale (another process, or being stopped)."""
        if self.engine is not engine or engine.stopping or self.fault is not None:
            return False
        self.fault = fault
        return True
