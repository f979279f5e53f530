"""What ``check-config``, ``mpsd run`` and a reload check before they touch anything: a plan that
cannot start is refused whole, with the same verdict from all three.

A typo in an engine's ``executable``, a model directory that is not there, a port another
program took, or a log directory that cannot be created would otherwise surface only after the
old engine was stopped — too late to keep it — or, at start-up, as an engine's traceback after
a long wait. These are the checks that can be made without starting anything; what remains (a
model that does not load or fit, a hub download, the MPS daemon) only start-up can tell, and
:func:`start_up_only` says so.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

import anyio

from mpsd.config import Config
from mpsd.errors import ConfigError
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


def _listen_free(host: str, port: int) -> bool:
    """Whether the proxy could listen on ``host:port`` now (as aiohttp does, SO_REUSEADDR)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError:
        return False
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


def preflight(plan: Plan, *, control_binary: str, state_dir: Path,
              held_ports: Iterable[int], listen: tuple[str, int] | None = None) -> list[str]:
    """Every reason ``plan`` cannot start here (empty: go ahead). ``held_ports`` are the ports
    mpsd's own running engines listen on: a changed engine gets its port back once stopped.
    ``listen`` is the proxy's address where it is not mpsd's own yet (start-up, check-config
    with no daemon running)."""
    return (taken_ports(plan, held_ports, listen)
            + _missing(plan, control_binary=control_binary, state_dir=state_dir))


def taken_ports(plan: Plan, held_ports: Iterable[int],
                listen: tuple[str, int] | None) -> list[str]:
    """The ports the plan needs that another program holds now (see :func:`preflight`)."""
    problems: list[str] = []
    if listen is not None and not _listen_free(*listen):
        problems.append(f"proxy.listen {listen[0]}:{listen[1]} is in use by another program "
                        "(or the address is not this host's)")
    held = set(held_ports)
    problems += [f"{e.key}: port {e.port} on 127.0.0.1 is in use by another program"
                 for g in plan.groups for e in g.engines
                 if e.port not in held and not port_free(e.port)]
    return problems


def _missing(plan: Plan, *, control_binary: str, state_dir: Path) -> list[str]:
    """Executables, model directories and writable directories the plan needs."""
    problems: list[str] = []
    dirs = [state_dir]
    if plan.mps_enabled and any(g.mps for g in plan.groups) and not _runnable(
            control_binary, os.environ.get("PATH")):
        problems.append(f"mps.control_binary {control_binary!r} is not an executable")
    # one line per cause, naming every engine it stops (replicas share their executable)
    engines_of: dict[str, list[str]] = {}
    for group in plan.groups:
        dirs += [group.log_dir, group.pipe_dir] if group.mps else [group.log_dir]
        for engine in group.engines:
            command = engine.argv[0]
            if not _runnable(command, engine.env.get("PATH") or os.environ.get("PATH")):
                engines_of.setdefault(f"executable {command!r} not found or not executable",
                                      []).append(engine.key)
            if engine.model_dir is not None and not engine.model_dir.exists():
                engines_of.setdefault(
                    f"model {str(engine.model_dir)!r} does not exist (a relative path is taken "
                    "from the config file's directory; a hub id is written without ./, e.g. "
                    "Qwen/Qwen2.5-0.5B-Instruct)", []).append(engine.key)
    problems += [f"{', '.join(keys)}: {cause}" for cause, keys in engines_of.items()]
    problems += [f"directory {d} cannot be created or written" for d in dirs if not _writable(d)]
    return problems


class CannotStart(ConfigError):
    """The preflight refused the plan at start-up: exit 78, as for any config error (a restart
    would not mend a missing executable)."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(file, "", "", "")

    def __str__(self) -> str:
        return cannot_start(self.file, self.problems)


def cannot_start(file: str, problems: list[str]) -> str:
    """The verdict, worded the same by ``check-config`` and ``mpsd run``."""
    return f"{file} cannot start on this host:" + "".join(f"\n  - {p}" for p in problems)


async def preflight_start(plan: Plan, config: Config, *, settle_s: float) -> list[str]:
    """:func:`preflight` at start-up, where every port must be free (the proxy's included).
    Ports still held are checked again for up to ``settle_s``: leftovers of a previous run
    reaped a moment ago let go of theirs as they finish exiting."""
    deadline = anyio.current_time() + settle_s
    listen = (config.proxy.host, config.proxy.port)
    while True:  # polling: the kernel tells no one when a dying process's socket closes
        taken = taken_ports(plan, (), listen)
        if not taken or anyio.current_time() >= deadline:
            return taken + _missing(plan, control_binary=config.mps.control_binary,
                                    state_dir=config.daemon.state_dir)
        await anyio.sleep(0.05)


def start_up_only(plan: Plan) -> list[str]:
    """What no check can tell before the engines start, said so that a clean preflight is not
    taken for more than it is."""
    hub = sorted({e.model_source for g in plan.groups for e in g.engines
                  if e.kind == "vllm" and e.model_dir is None})
    said = ["whether each model loads and fits in its memory share (the engine's own start-up)"]
    if hub:
        said.append(f"hub models {', '.join(hub)}: downloaded (or read from the cache) at "
                    "start-up")
    if any(g.mps for g in plan.groups):
        said.append("whether each GPU's MPS daemon starts and its engines attach to it")
    return said
