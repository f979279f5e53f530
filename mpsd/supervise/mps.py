"""One ``nvidia-cuda-mps-control -f`` per GPU, owned by mpsd (docs/architecture.md §2, mps.md §6.1).

The daemon runs in the foreground as mpsd's child with ``CUDA_VISIBLE_DEVICES=<uuid>`` and
private pipe and log directories, so its death is seen by ``wait()`` and nothing else on the
host shares it. Commands go to it through the client binary on stdin, the way NVIDIA's tools do.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio

from mpsd import logs
from mpsd.errors import MpsCommandError, SpawnError
from mpsd.plan.engine import inherited_env
from mpsd.supervise.mps_log import MpsLogEvent, MpsOutput
from mpsd.supervise.process import ChildProcess

_log = logs.get("mpsd.mps")
DEFAULT_THREAD_PERCENTAGE = 100


class MpsDaemon:
    """The MPS control daemon of one group, and the commands mpsd sends it."""

    def __init__(self, group: str, binary: str, uuid: str, pipe_dir: Path, log_dir: Path, *,
                 environ: Mapping[str, str], extra_env: Mapping[str, str],
                 registry: Path | None, command_timeout_s: float,
                 on_log: Callable[[MpsLogEvent], None]) -> None:
        self.group = group
        self.binary = binary
        self.uuid = uuid
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self._env = inherited_env(environ) | dict(extra_env)
        self._env.update(CUDA_VISIBLE_DEVICES=uuid, CUDA_MPS_PIPE_DIRECTORY=str(pipe_dir),
                         CUDA_MPS_LOG_DIRECTORY=str(log_dir))
        self._registry = registry
        self._timeout = command_timeout_s
        self._on_log = on_log
        self._proc: ChildProcess | None = None
        self.applied: dict[str, str] = {}

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.running_pid


    async def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start the daemon, wait until it answers, apply and read back its settings."""
        self._prepare_dirs()
        self._proc = ChildProcess(f"mps-control-{self.group}", (self.binary, "-f"), self._env,
                                  registry=self._registry, log_fields={"gpu": self.group},
                                  on_line=MpsOutput(self.group, self._on_log))
        await self._proc.start()
        await self._wait_answering(ready_timeout_s)
        await self.apply_settings()
        _log.info("mps_daemon_ready", gpu=self.group, pid=self._proc.pid, applied=self.applied)

    async def apply_settings(self) -> None:
        """Set the defaults the next server starts with, then read them back (mps.md §6.1.2).

        A mismatch is an error: a daemon that silently ignores a setting (k8s-device-plugin
        #2055) would run every engine with the wrong share of the GPU.
        """
        pct = DEFAULT_THREAD_PERCENTAGE
        await self.command(f"set_default_active_thread_percentage {pct}")
        got = (await self.command("get_default_active_thread_percentage")).strip()
        self.applied = {"default_active_thread_percentage": got}
        with contextlib.suppress(ValueError):
            if float(got) == pct:
                return
        raise MpsCommandError(f"{self.group}: active thread percentage reads back {got!r}, "
                              f"expected {pct}")

    async def wait(self) -> int:
        """Until the daemon exits; its exit code (an exit mpsd did not ask for is a fault)."""
        assert self._proc is not None
        return await self._proc.wait()

    async def command(self, line: str) -> str:
        """Send one command line through the client binary; its stdout."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary, env=self._env, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise MpsCommandError(f"cannot run {self.binary}: {exc}") from exc
        try:
            with anyio.fail_after(self._timeout):
                out, err = await proc.communicate((line + "\n").encode())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise MpsCommandError(f"{self.group}: {line!r} timed out after {self._timeout}s") \
                from None
        text = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            detail = (err or out).decode("utf-8", "replace").strip()
            raise MpsCommandError(f"{self.group}: {line!r} failed ({proc.returncode}): {detail}")
        return text

    async def server_pids(self) -> list[int]:
        return [int(w) for w in (await self.command("get_server_list")).split() if w.isdigit()]

    async def server_status(self, server: int) -> str:
        return (await self.command(f"get_server_status {server}")).strip()

    async def clients(self) -> set[int]:
        """Client PIDs of every server of this daemon (normally one)."""
        pids: set[int] = set()
        for server in await self.server_pids():
            out = await self.command(f"get_client_list {server}")
            pids.update(int(w) for w in out.split() if w.isdigit())
        return pids

    async def terminate_client(self, client: int) -> bool:
        """Stop one client's GPU work safely; its siblings are unaffected (mps.md §1.2)."""
        for server in await self.server_pids():
            out = await self.command(f"terminate_client {server} {client}")
            if out.strip().splitlines()[-1:] == ["0"]:
                _log.info("mps_client_terminated", gpu=self.group, client=client, server=server)
                return True
        return False

    async def wait_recovered(self, timeout_s: float) -> bool:
        """After a fault: True once no client is left and the server is ACTIVE (or gone)."""
        with anyio.move_on_after(timeout_s):
            while True:
                try:
                    servers = await self.server_pids()
                    states = [await self.server_status(s) for s in servers]
                    if not await self.clients() and all(s != "FAULT" for s in states):
                        return True
                except MpsCommandError:
                    if self.pid is None:
                        return False
                await anyio.sleep(0.05)
        return False

    async def stop(self, timeout_s: float = 5.0) -> None:
        """``quit -t`` (servers stop), then the daemon; SIGKILL of its group at the deadline."""
        with anyio.CancelScope(shield=True):
            if self._proc is None:
                return
            if self._proc.returncode is None:
                try:
                    await self.command(f"quit -t {max(1, int(timeout_s))}")
                except MpsCommandError as exc:
                    _log.warning("mps_quit_failed", gpu=self.group, error=str(exc))
            await self._proc.terminate(timeout_s)
            self._clean_pipe_dir()
            _log.info("mps_daemon_stopped", gpu=self.group)

    async def kill(self) -> None:
        """The daemon is unresponsive or gone: kill it and its servers, clean the pipe dir."""
        with anyio.CancelScope(shield=True):
            if self._proc is not None:
                await self._proc.kill()
            self._clean_pipe_dir()

    async def _wait_answering(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.returncode is not None:
                raise SpawnError(f"{self.binary} -f exited with {self._proc.returncode} at start")
            if (self.pipe_dir / "control").exists():
                try:
                    await self.command("get_server_list")
                    return
                except MpsCommandError:
                    pass
            if time.monotonic() > deadline:
                raise MpsCommandError(f"{self.group}: MPS daemon not answering after {timeout_s}s")
            await anyio.sleep(0.05)

    def _prepare_dirs(self) -> None:
        """A directory that cannot be made is a boot failure of the group (FAILED, with why)."""
        self._clean_pipe_dir()
        for directory, mode in ((self.pipe_dir, 0o700), (self.log_dir, 0o750)):
            try:
                directory.mkdir(parents=True, exist_ok=True, mode=mode)
            except OSError as exc:
                raise SpawnError(f"cannot create {directory}: {exc.strerror}") from exc

    def _clean_pipe_dir(self) -> None:
        """A dead daemon's sockets and pid file would confuse the next one and its clients."""
        if self.pipe_dir.is_dir():
            shutil.rmtree(self.pipe_dir, ignore_errors=True)
