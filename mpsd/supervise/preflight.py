"""What a reload checks before it touches anything: a plan that cannot start is refused whole.

A typo in an engine's ``executable``, a port another program took, or a log directory that
cannot be created would otherwise surface only after the old engine was stopped — too late to
keep it. These are the checks that can be made without starting anything; what remains (a model
that does not load) is the new engine's own failure, and the group says so in its state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from mpsd.plan.build import Plan
from mpsd.supervise.engine import port_free


def _runnable(command: str, path: str | None) -> bool:
    return shutil.which(command, path=path) is not None


def _writable(directory: Path) -> bool:
    """Whether ``directory`` exists writable, or could be created (nearest existing parent)."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def preflight(plan: Plan, *, control_binary: str, state_dir: Path,
              held_ports: Iterable[int]) -> list[str]:
    """Every reason ``plan`` cannot start here (empty: go ahead). ``held_ports`` are the ports
    mpsd's own running engines listen on: a changed engine gets its port back once stopped."""
    problems: list[str] = []
    held = set(held_ports)
    dirs = [state_dir]
    if plan.mps_enabled and any(g.mps for g in plan.groups) and not _runnable(
            control_binary, os.environ.get("PATH")):
        problems.append(f"mps.control_binary {control_binary!r} is not an executable")
    for group in plan.groups:
        dirs += [group.log_dir, group.pipe_dir] if group.mps else []
        for engine in group.engines:
            command = engine.argv[0]
            if not _runnable(command, engine.env.get("PATH") or os.environ.get("PATH")):
                problems.append(f"{engine.key}: executable {command!r} not found or not "
                                "executable")
            if engine.port not in held and not port_free(engine.port):
                problems.append(f"{engine.key}: port {engine.port} on 127.0.0.1 is in use by "
                                "another program")
    problems += [f"directory {d} cannot be created or written" for d in dirs if not _writable(d)]
    return problems
