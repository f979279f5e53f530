"""Every command that changes what mpsd should be doing, and the one queue they go through.

SIGHUP and ``mpsd reload``, ``mpsd restart|drain``, SIGTERM, NVML's Xid verdicts and the
proxy's engine verdicts all become a :class:`Command`; the supervisor applies them one at a time
to the desired state, in the order they arrived, and answers each with its outcome. Applying a
command never waits on a process (that is the groups' reconcile loops' work), so a stop is
never stuck behind a slow start; and once a stop has been submitted, a command that would start
something is refused (systemd's rule: a stop job wins over a start).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from mpsd.plan.build import EnginePlan, Plan
from mpsd.supervise.contract import GroupOptions
from mpsd.supervise.faults import Fault


@dataclass(frozen=True)
class Reload:
    plan: Plan
    options: GroupOptions


@dataclass(frozen=True)
class Restart:
    gpu: str


@dataclass(frozen=True)
class Drain:
    gpu: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Verdict:
    """A GPU needs an operator (a hardware Xid): FAILED until ``mpsd restart``."""

    gpu: str
    reason: str


@dataclass(frozen=True)
class GpuFault:
    """A fault of a whole GPU seen outside its group (an application Xid)."""

    gpu: str
    fault: Fault


@dataclass(frozen=True)
class EngineVerdict:
    """The proxy (or the MPS log) found an engine dead or hung."""

    gpu: str
    engine: str
    signal: str
    reason: str


@dataclass(frozen=True)
class SetEngine:
    """One step of a rollout: this engine runs ``plan`` now (``None``: it is removed)."""

    gpu: str
    engine: str
    plan: EnginePlan | None


Command = Reload | Restart | Drain | Stop | Verdict | GpuFault | EngineVerdict | SetEngine
STARTS = (Reload, Restart, SetEngine)  # commands a submitted stop refuses


class CommandQueue:
    """FIFO of commands with a future each; one consumer (the supervisor) applies them."""

    def __init__(self) -> None:
        self._items: asyncio.Queue[tuple[Command, asyncio.Future[Any]]] = asyncio.Queue()
        self.stop_submitted = False

    def submit(self, command: Command) -> asyncio.Future[Any]:
        """Queue ``command``; the future gets its outcome once it is applied. Callable from
        synchronous code on the loop (signal handlers, the pool, the Xid watcher's callback)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if isinstance(command, Stop):
            self.stop_submitted = True
        self._items.put_nowait((command, future))
        return future

    async def next(self) -> tuple[Command, asyncio.Future[Any]]:
        return await self._items.get()
