"""Child processes mpsd owns: spawn, drain output into logs, stop, and reap leftovers.

Every child runs in its own session, so one ``killpg`` reaches what it forked (vLLM's
EngineCore and Worker). ``PR_SET_PDEATHSIG`` makes a child hear SIGTERM if mpsd dies, and a
record of every live process group in ``state_dir/pgids`` lets the next mpsd reap what a
``kill -9`` of the previous one left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio

from mpsd import logs
from mpsd.errors import ProcessWillNotDie, SpawnError

_PR_SET_PDEATHSIG = 1
_LINE_LIMIT = 1 << 20
REAP_TIMEOUT_S = 10.0
_log = logs.get("mpsd.process")


def _child_setup(cpus: Sequence[int] | None, parent: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with mpsd, sit on the planned cores."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # mpsd died between fork and prctl
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat): tells a PID from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


class ChildProcess:
    """One supervised child in its own session, its output turned into log events."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], *,
                 cpus: Sequence[int] | None = None, registry: Path | None = None,
                 log_fields: Mapping[str, Any] | None = None,
                 on_line: Callable[[str], None] | None = None,
                 levels: Callable[[str, str], str | None] | None = None,
                 output_file: Path | None = None) -> None:
        """``on_line`` takes over the child's output lines; else each is an ``output`` event at
        the level ``levels(line, previous line's level)`` gives (default: the level the line
        states, :func:`mpsd.logs.engine_line_level`), or dropped where that is None. Every line
        also goes to ``output_file`` if given (:class:`mpsd.logs.OutputTap`)."""
        self.name = name
        self.argv = tuple(argv)
        self.env = dict(env)
        self.cpus = tuple(cpus) if cpus else None
        self._registry = registry
        self._fields = dict(log_fields or {})
        self._on_line = on_line
        self._levels = levels or logs.engine_line_level
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._output = logs.OutputTap(output_file)

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc.pid

    @property
    def running_pid(self) -> int | None:
        """The PID while the child runs; None before start and after exit."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def last_error(self) -> str | None:
        """Why the child failed, in one line: its output's last meaningful error line
        (:class:`mpsd.logs.LastError`), or None when it printed none."""
        return self._output.last_error.line

    @property
    def output_file(self) -> Path | None:
        """The file that holds the child's whole output (None: only the log events)."""
        return self._output.file.path if self._output.file is not None else None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    async def start(self) -> None:
        """Spawn; :class:`SpawnError` when the executable cannot be run at all."""
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, limit=_LINE_LIMIT,
                preexec_fn=_child_setup(self.cpus, os.getpid()),
            )
        except OSError as exc:  # no executable, no permission, fork's EAGAIN/ENOMEM, ...
            raise SpawnError(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from exc
        except MemoryError as exc:
            raise SpawnError(f"cannot run {self.argv[0]!r}: out of memory") from exc
        self._remember()
        self._output.started(self.pid, self.argv)
        self._drain = asyncio.ensure_future(self._drain_output())
        _log.info("process_started", name=self.name, pid=self.pid, argv=" ".join(self.argv),
                  cpus=list(self.cpus or ()), **self._fields)

    async def wait(self) -> int:
        """Wait for the exit of the leader; then kill what it left in its group, and reap."""
        assert self._proc is not None
        code = await self._proc.wait()
        self.kill_group(signal.SIGKILL)
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._drain), 2.0)
        self._forget()
        return code

    async def _reap(self) -> int:
        """After SIGKILL: the leader's exit within :data:`REAP_TIMEOUT_S`, or
        :class:`ProcessWillNotDie` (a wait without a deadline would hang recovery and stop)."""
        assert self._proc is not None
        with anyio.move_on_after(REAP_TIMEOUT_S):
            return await self.wait()
        raise ProcessWillNotDie(f"{self.name} (PID {self._proc.pid}) still alive "
                                f"{REAP_TIMEOUT_S:g} s after SIGKILL")

    def send(self, sig: signal.Signals) -> None:
        """Signal the leader only (vLLM's API server stops its own children in order)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def kill_group(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal every process of the child's session (orphaned EngineCore included)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    async def terminate(self, grace: float,
                        before_kill: Callable[[], Any] | None = None) -> int:
        """SIGTERM → wait up to ``grace`` → (``before_kill``) → SIGKILL the group → reap.

        Shielded from cancellation: a stop that is interrupted would leave orphans.
        """
        if self._proc is None:
            return 0
        with anyio.CancelScope(shield=True):
            if self._proc.returncode is None:
                self.send(signal.SIGTERM)
                with anyio.move_on_after(grace):
                    await self._proc.wait()
                if self._proc.returncode is None:
                    _log.warning("stop_deadline_passed", name=self.name, pid=self.pid,
                                 grace_s=grace, **self._fields)
                    if before_kill is not None:
                        result = before_kill()
                        if asyncio.iscoroutine(result):
                            await result
                    self.kill_group(signal.SIGKILL)
            code = await self._reap()
        return code

    async def kill(self) -> int:
        """SIGKILL the whole group at once and reap (fail-fast recovery); bounded."""
        if self._proc is None:
            return 0
        with anyio.CancelScope(shield=True):
            self.kill_group(signal.SIGKILL)
            code = await self._reap()
        return code

    async def _drain_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fields = {"name": self.name, "pid": self._proc.pid, **self._fields}
        level = "info"
        while True:
            try:
                raw = await self._proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not raw:
                self._output.close()
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._output.feed(line)
            if self._on_line is not None:  # the owner parses and logs this output itself
                self._on_line(line)
                continue
            stated = self._levels(line, level)
            if stated is None:
                continue
            level = stated
            _log.log(logs.level_number(level), "output", line=line, **fields)

    def _record_file(self) -> Path | None:
        if self._registry is None or self._proc is None:
            return None
        return self._registry / f"{self._proc.pid}"

    def _remember(self) -> None:
        """Best effort: a registry that cannot be written (a read-only or full ``state_dir``)
        costs only the reaping of this child after a ``kill -9`` of mpsd, never the child."""
        path = self._record_file()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{_start_time(self.pid)} {self.name}\n")
        except OSError as exc:
            _log.warning("pgid_registry_unwritable", name=self.name, path=str(path),
                         error=str(exc), **self._fields)

    def _forget(self) -> None:
        path = self._record_file()
        if path is None:
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            _log.warning("pgid_registry_unwritable", name=self.name, path=str(path),
                         error=str(exc), **self._fields)


def reap_leftovers(registry: Path) -> list[int]:
    """Kill the process groups a previous mpsd recorded and did not clean up; return them.

    A record names a PID and its kernel start time; a PID reused since by something else does
    not match and is left alone.
    """
    killed: list[int] = []
    if not registry.is_dir():
        return killed
    for record in registry.iterdir():
        if not record.name.isdigit():
            continue
        pid = int(record.name)
        started = record.read_text().split(" ", 1)[0]
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
        else:  # the leader is gone: its group may still hold orphans with pgid == pid
            with contextlib.suppress(OSError):
                if _group_alive(pid):
                    os.killpg(pid, signal.SIGKILL)
                    killed.append(pid)
        record.unlink(missing_ok=True)
    if killed:
        _log.warning("leftovers_reaped", pgids=killed)
    return killed


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
