"""Every process of an engine, watched: the death of any of them is seen within milliseconds.

vLLM's API server outlives its ``EngineCore`` by seconds (and answers 500 meanwhile): waiting
for the leader's exit, or for health probes, leaves a dead engine routable for that long. So once
an engine is ready, each process of its process group (EngineCore, its workers, the resource
tracker) gets a pidfd, which becomes readable the moment that process exits — no polling, no
signal handler, one file descriptor per process. The group is scanned at once, again
:data:`SETTLE_S` later, then every ``rescan_s``; a process is watched from its second sighting
on, so a short-lived helper that comes and goes between two scans is never mistaken for a dead
engine. The leader is not watched
here: its exit (with its code) is :meth:`ChildProcess.wait`'s to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import anyio

from mpsd import logs

_log = logs.get("mpsd.tree")
SETTLE_S = 0.1


def group_pids(pgid: int) -> set[int]:
    """Every live process whose process group is ``pgid`` (an engine and what it forked)."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            pids.add(int(entry.name))
    return pids


def process_name(pid: int) -> str:
    """``comm`` of ``pid`` (``VLLM::EngineCor``), or ``?`` once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class TreeWatch:
    """pidfds on the processes of one process group; :meth:`wait_exit` returns the first death."""

    def __init__(self, pgid: int, name: str, rescan_s: float) -> None:
        self.pgid = pgid
        self.name = name
        self.rescan_s = rescan_s
        self._fds: dict[int, int] = {}
        self._names: dict[int, str] = {}
        self._seen_once: set[int] = set()
        self._dead: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def watched(self) -> set[int]:
        return set(self._fds)

    async def wait_exit(self) -> tuple[int, str]:
        """Until a watched process exits: its PID and name. Closes every pidfd on the way out."""
        self._loop = asyncio.get_running_loop()
        self._dead = self._loop.create_future()
        try:
            self.scan()
            delay = min(SETTLE_S, self.rescan_s)
            while True:
                with anyio.move_on_after(delay):
                    pid = await asyncio.shield(self._dead)
                    return pid, self._names.get(pid, "?")
                self.scan()
                delay = self.rescan_s
        finally:
            self.close()

    def scan(self) -> None:
        """Watch the processes of the group seen on this scan and the one before."""
        now = group_pids(self.pgid) - {self.pgid}
        fresh = now - set(self._fds)
        adopt = fresh & self._seen_once
        self._seen_once = fresh - adopt
        for pid in sorted(adopt):
            self._open(pid)

    def _open(self, pid: int) -> None:
        assert self._loop is not None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone between the scan and now: a helper, or a death
            return  # that the next probe or the leader's exit reports
        except OSError as exc:  # no pidfd support (Linux < 5.3): probes and the leader remain
            _log.warning("pidfd_unavailable", engine=self.name, pid=pid, error=str(exc))
            return
        self._fds[pid] = fd
        self._names[pid] = process_name(pid)
        self._loop.add_reader(fd, self._exited, pid)
        _log.debug("process_watched", engine=self.name, pid=pid, comm=self._names[pid])

    def _exited(self, pid: int) -> None:
        if self._dead is not None and not self._dead.done():
            self._dead.set_result(pid)

    def close(self) -> None:
        for fd in self._fds.values():
            if self._loop is not None:
                self._loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
