"""A reload that changes engines of a running group: one engine at a time, the others serve.

Each removed or changed engine is stopped the safe way (drain → SIGTERM → ``terminate_client``
→ SIGKILL), then its replacement starts and must be ready before the next one is touched. A new
engine that fails to start is its own problem, not its serving siblings': it is killed, left
out, and the reload reports why. Every step is bounded (``stop_timeout_s``,
``startup_timeout_s``), so a reload always ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpsd import logs
from mpsd.backend import Backend
from mpsd.errors import SpawnError
from mpsd.plan.build import EnginePlan, GroupPlan
from mpsd.supervise.faults import Fault
from mpsd.supervise.states import GroupState

if TYPE_CHECKING:
    from mpsd.supervise.group import GpuGroup

_log = logs.get("mpsd.rolling")
_IDENTITY = ("device", "uuid", "mps", "pipe_dir", "log_dir")


async def roll_engines(group: GpuGroup, plan: GroupPlan) -> tuple[bool, str]:
    """Apply ``plan`` to ``group`` engine by engine; ``(done, problems)``.

    ``done`` is False when rolling is impossible (another GPU, MPS switched, the group not
    RUNNING): then the caller restarts the whole group. ``problems`` says what did not come
    up, empty when everything did.
    """
    if any(getattr(plan, a) != getattr(group.plan, a) for a in _IDENTITY):
        return False, ""
    if group.state is not GroupState.RUNNING or group.attempt is None:
        return False, ""
    old = {e.key: e for e in group.plan.engines}
    new = {e.key: e for e in plan.engines}
    group.plan = plan
    problems: list[str] = []
    for key in [k for k in old if old[k] != new.get(k)]:
        engine = group.engines.pop(key, None)
        if engine is not None:
            await group.stop_engine(engine)
        group.pool.remove(key)
        _log.info("engine_rolled_out", gpu=group.key, engine=key)
        if key in new:
            problems += await _roll_in(group, new[key])
    for engine_plan in plan.engines:
        if engine_plan.key not in old:
            problems += await _roll_in(group, engine_plan)
    group.set_reason(group.ready_reason("; ".join(problems)))
    return True, "; ".join(problems)


async def _roll_in(group: GpuGroup, plan: EnginePlan) -> list[str]:
    """Start one engine of a running group; what went wrong, if anything."""
    attempt = group.attempt
    if attempt is None or group.state is not GroupState.RUNNING:
        return [f"{plan.key} not started: {group.key} is {group.state} ({group.reason})"]
    group.pool.add(Backend(plan.key, plan.gpu, plan.model, plan.base_url))
    failed: list[Fault] = []
    try:
        engine = await group.start_engine(plan, group.mps, failed.append)
    except SpawnError as exc:  # its executable went away since the reload's preflight
        failed.append(Fault("spawn", str(exc)))
        engine = None
    if engine is None:
        why = failed[0].reason if failed else "stopped while starting"
        dropped = group.engines.pop(plan.key, None)
        if dropped is not None:
            await dropped.process.kill()
        group.pool.remove(plan.key)
        _log.error("engine_roll_in_failed", gpu=group.key, engine=plan.key, reason=why)
        return [f"reload: {plan.key} failed to start ({why}); the others serve"]
    group.watch(attempt, engine)
    _log.info("engine_rolled_in", gpu=group.key, engine=plan.key)
    return []
