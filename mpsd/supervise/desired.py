"""What one GPU should be doing: the desired state its reconcile loop works toward.

Only the supervisor's command queue writes it (every reload, restart, drain, stop and verdict
becomes a new value); a group only reads it. Immutable, so a loop pass sees one consistent
version and ``generation`` tells which one status describes (Kubernetes' ``observedGeneration``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mpsd.plan.build import EnginePlan, GroupPlan
from mpsd.supervise.contract import GroupOptions


@dataclass(frozen=True)
class Desired:
    """One GPU's desired state.

    ``plan`` is every engine that should run, each exactly as planned (a rollout changes it one
    engine at a time). ``restart_generation`` grows with every operator restart (and a change of
    the GPU's identity): the group stops everything, forgets its fault history and starts over.
    ``drained`` keeps it stopped on purpose; ``stopping`` is final. ``verdict`` is a reason the
    GPU needs an operator (a hardware Xid): it stays FAILED until a restart clears it.
    """

    plan: GroupPlan
    options: GroupOptions
    generation: int = 1
    restart_generation: int = 0
    drained: bool = False
    stopping: bool = False
    verdict: str = ""

    def _next(self, **changes: object) -> Desired:
        return replace(self, generation=self.generation + 1, **changes)  # type: ignore[arg-type]

    def with_plan(self, plan: GroupPlan, options: GroupOptions) -> Desired:
        return self._next(plan=plan, options=options)

    def with_engine(self, key: str, engine: EnginePlan | None) -> Desired:
        """One engine replaced, added (at the end) or removed (``None``): a rollout's step."""
        engines: list[EnginePlan] = []
        for current in self.plan.engines:
            if current.key != key:
                engines.append(current)
            elif engine is not None:
                engines.append(engine)
        if engine is not None and all(e.key != key for e in self.plan.engines):
            engines.append(engine)
        return self._next(plan=replace(self.plan, engines=tuple(engines)))

    def reidentified(self, plan: GroupPlan, options: GroupOptions) -> Desired:
        """A reload changes what the GPU runs on (MPS switched, other dirs, another MPS
        binary): everything restarts from ``plan``. Drained stays drained, and a verdict stays
        unless the GPU itself is another one."""
        other_gpu = (plan.device, plan.uuid) != (self.plan.device, self.plan.uuid)
        return self._next(plan=plan, options=options,
                          restart_generation=self.restart_generation + 1,
                          verdict="" if other_gpu else self.verdict)

    def restarted(self) -> Desired:
        """``mpsd restart GPU``: start over, undrained, with no verdict."""
        return self._next(restart_generation=self.restart_generation + 1, drained=False,
                          verdict="")

    def drain(self) -> Desired:
        return self._next(drained=True)

    def stop(self) -> Desired:
        return self._next(stopping=True)

    def condemn(self, verdict: str) -> Desired:
        return self._next(verdict=verdict)


def identity(plan: GroupPlan) -> tuple[object, ...]:
    """What cannot change under running engines: another GPU, MPS switched, other dirs."""
    return plan.device, plan.uuid, plan.mps, plan.pipe_dir, plan.log_dir
