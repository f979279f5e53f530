"""A reload's engine changes on one GPU, rolled out one engine at a time, with rollback.

Like a Kubernetes Deployment with ``maxUnavailable: 1, maxSurge: 0``: each step is one command
(:class:`~mpsd.supervise.commands.SetEngine`) through the supervisor's queue — this engine now
runs its new plan — and the group's reconcile loop replaces the engine the safe way (drain →
SIGTERM → ``terminate_client`` → SIGKILL) and starts the new one. The next step waits until
the new engine is ready. The first one that fails to start ends the rollout: that engine goes
back to its previous plan (started from it again), the engines not reached keep theirs, and
the reload answers with the reason — a failed reload never leaves a model with fewer ready
engines than before. Every wait is bounded by the engine's own timeouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from mpsd import logs
from mpsd.plan.build import EnginePlan, GroupPlan
from mpsd.supervise.commands import Command, SetEngine

if TYPE_CHECKING:
    from mpsd.supervise.group import GpuGroup

_log = logs.get("mpsd.rollout")
_MARGIN_S = 30.0  # beyond an engine's own drain, stop and start-up timeouts
Submit = Callable[[Command], "asyncio.Future[Any]"]


class Rollout:
    """The engine changes of one group from ``old`` to ``new``."""

    def __init__(self, group: GpuGroup, old: GroupPlan, new: GroupPlan, submit: Submit) -> None:
        self.group = group
        self.old = {e.key: e for e in old.engines}
        self.new = {e.key: e for e in new.engines}
        self._submit = submit
        self._cancelled = ""
        self._scope = anyio.CancelScope()

    def cancel(self, why: str) -> None:
        """A stop or a newer reload: the rollout ends where it is (no rollback: what comes
        next decides)."""
        self._cancelled = why
        self._scope.cancel()

    async def run(self) -> list[str]:
        """Every step; what went wrong (empty when every new engine is ready)."""
        steps = [k for k in self.old if self.old[k] != self.new.get(k)]
        steps += [k for k in self.new if k not in self.old]
        with self._scope:
            for key in steps:
                problem = await self._step(key)
                if problem:
                    return [problem]
        if self._cancelled:
            return [f"{self.group.key}: rollout ended early: {self._cancelled}"]
        return []

    async def _step(self, key: str) -> str:
        target = self.new.get(key)
        before = self.group.failures(key)
        await self._submit(SetEngine(self.group.key, key, target))
        if key in self.old:
            await self._stopped(key)
            _log.info("engine_rolled_out", gpu=self.group.key, engine=key)
        if target is None:
            return ""
        outcome = await self._outcome(target, before)
        if outcome == "ready":
            _log.info("engine_rolled_in", gpu=self.group.key, engine=key)
            return ""
        previous = self.old.get(key)
        _log.error("engine_roll_in_failed", gpu=self.group.key, engine=key, reason=outcome,
                   rollback=previous is not None)
        await self._submit(SetEngine(self.group.key, key, previous))
        back = ("rolled back to its previous config" if previous is not None
                else "left out")
        return (f"reload: {key} failed to start ({outcome}); {back}, and the rollout stopped "
                "there")

    async def _stopped(self, key: str) -> None:
        """Until the old process of ``key`` is gone (bounded by its own drain and stop)."""
        old = self.old[key]
        limit = old.stop_timeout_s + self.group.options.drain_timeout_s + _MARGIN_S
        with anyio.move_on_after(limit):
            while (engine := self.group.engines.get(key)) is not None and engine.plan == old:
                await self.group.next_pass()

    async def _outcome(self, target: EnginePlan, before: int) -> str:
        """``"ready"``, or why not: its start failed, or it did not get ready in time."""
        limit = (target.startup_timeout_s + target.stop_timeout_s
                 + self.group.options.drain_timeout_s + _MARGIN_S)
        with anyio.move_on_after(limit):
            while (outcome := self.group.engine_outcome(target, before)) is None:
                await self.group.next_pass()
            return outcome
        return f"not ready within {limit:g}s"
