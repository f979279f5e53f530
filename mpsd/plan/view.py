"""How ``mpsd check-config`` shows a plan: as text for people, as JSON for scripts."""

from __future__ import annotations

import shlex
from typing import Any

from mpsd.plan.build import EnginePlan, Plan
from mpsd.plan.cpus import cpu_list


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain data: every engine's argv, env, port, memory share and cores."""
    return {
        "mps": {"enabled": plan.mps_enabled, "reason": plan.mps_reason},
        "proxy_cpus": list(plan.proxy_cpus) if plan.proxy_cpus else None,
        "warnings": list(plan.warnings),
        "groups": [
            {
                "gpu": g.key, "device": g.device, "uuid": g.uuid, "mps": g.mps,
                "pipe_dir": str(g.pipe_dir), "log_dir": str(g.log_dir),
                "start_together": g.start_together[0], "start_order": g.start_together[1],
                "engines": [_engine_dict(e) for e in g.engines],
            }
            for g in plan.groups
        ],
    }


def _engine_dict(e: EnginePlan) -> dict[str, Any]:
    return {
        "key": e.key, "model": e.model, "kind": e.kind, "port": e.port,
        "memory_share": e.memory_share, "pinned_limit_bytes": e.pinned_limit_bytes,
        "active_thread_percentage": e.active_thread_percentage,
        "cpus": list(e.cpus) if e.cpus else None, "argv": list(e.argv), "env": dict(e.env),
        "log_file": str(e.log_file),
    }


def plan_text(plan: Plan) -> str:
    """A readable plan; the environment shows only what mpsd sets beyond the inherited basics."""
    lines = [f"MPS: {'on' if plan.mps_enabled else 'off'} ({plan.mps_reason})"]
    if plan.proxy_cpus:
        lines.append(f"proxy cores: {cpu_list(plan.proxy_cpus)}")
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    for g in plan.groups:
        lines.append("")
        lines.append(f"{g.key}  device {g.device}  uuid {g.uuid}  mps {'on' if g.mps else 'off'}")
        if g.mps:
            lines.append(f"  pipe dir {g.pipe_dir}  log dir {g.log_dir}")
        together, why = g.start_together
        lines.append(f"  engines start {'together' if together else 'one after another'}: {why}")
        for order, e in enumerate(g.engines, 1):
            share = "-" if e.memory_share is None else f"{e.memory_share:g}"
            cores = cpu_list(e.cpus) if e.cpus else "any"
            lines.append(f"  {order}. {e.key}  model {e.model}  port {e.port}  "
                         f"memory share {share}  threads {e.active_thread_percentage}%  "
                         f"cores {cores}")
            lines.append(f"     argv: {shlex.join(e.argv)}")
            lines.append(f"     output: {e.log_file}")
            shown = {k: v for k, v in e.env.items()
                     if k.startswith("CUDA_") or k not in _BASIC_ENV}
            for key, value in sorted(shown.items()):
                lines.append(f"     env:  {key}={value}")
    return "\n".join(lines)


_BASIC_ENV = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM"})
