"""The control socket: the HTTP/JSON API that ``mpsd status|restart|drain|reload`` use.

It listens on ``<state_dir>/control.sock``, a unix socket rather than a TCP port, so that who
may drain a GPU is decided by file permissions: mode 0660, group ``mpsd`` — the daemon's user
and the operators in group ``mpsd`` may use it, nobody else. The mode is set between ``bind``
and ``listen``, so there is no moment when a looser umask lets anyone connect.

Routes (every answer is a JSON object; errors are ``{"error": "..."}``):

``GET /status``               ``Supervisor.status()``
``POST /gpus/{gpu}/restart``  restart one GPU (returns once the new start has begun)
``POST /gpus/{gpu}/drain``    drain and stop one GPU (returns once it is stopped)
``POST /drain``               the whole node: readiness off, the grace period, then every GPU
``POST /reload``              reread the config, apply it by diff

Commands that change state run one at a time, in a task of their own that outlives the
request: an operator pressing Ctrl-C on ``mpsd restart`` (or the server shutting down) must not
leave a GPU stopped half-way and never started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
from aiohttp import web

from mpsd import logs
from mpsd.errors import MpsdError
from mpsd.supervise.group import GpuGroup
from mpsd.supervise.supervisor import Supervisor

_log = logs.get("mpsd.control")
SOCKET_MODE = 0o660
SOCKET_GROUP = "mpsd"
_SHUTDOWN_TIMEOUT_S = 5.0
_dumps = partial(json.dumps, default=str)

Reload = Callable[[], Awaitable[dict[str, Any]]]
T = TypeVar("T")


class ControlSocketError(MpsdError):
    """The control socket cannot be created (another mpsd serves it, or the path is taken)."""


class ControlServer:
    """Serves the control API for one :class:`Supervisor` on a unix socket."""

    def __init__(self, path: Path, supervisor: Supervisor, reload: Reload, *,
                 drain_all: Reload | None = None, group: str = SOCKET_GROUP) -> None:
        self.path = path
        self._supervisor = supervisor
        self._reload = reload
        self._drain_all = drain_all
        self._group = group
        self._lock = anyio.Lock()
        self._orphans: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._inode: tuple[int, int] | None = None
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/status", self._status)
        app.router.add_post("/gpus/{gpu}/restart", self._restart)
        app.router.add_post("/gpus/{gpu}/drain", self._drain)
        app.router.add_post("/reload", self._reload_config)
        if drain_all is not None:
            app.router.add_post("/drain", self._drain_node)
        self._app = app

    async def start(self) -> None:
        """Bind, set mode and group, then listen; :class:`ControlSocketError` if another live
        daemon answers on the path (a stale socket of a crashed run is removed)."""
        await anyio.to_thread.run_sync(_clear_stale, self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                sock.bind(str(self.path))
                st = self.path.stat()
                self._inode = (st.st_dev, st.st_ino)
                self.path.chmod(SOCKET_MODE)
            except OSError as exc:
                raise ControlSocketError(f"cannot create the control socket {self.path}: "
                                         f"{exc.strerror or exc}") from None
            self._chgrp()
            runner = web.AppRunner(self._app, access_log=None,
                                   shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
            await runner.setup()
            self._runner = runner
            await web.SockSite(runner, sock).start()  # listen() happens here
        except BaseException:
            sock.close()
            await self.stop()
            raise
        _log.info("control_listening", socket=str(self.path))

    async def stop(self) -> None:
        """Stop serving and remove the socket file (only if it is still ours)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = self.path.stat()
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            self._inode = None

    def _chgrp(self) -> None:
        """Give the socket to group ``mpsd`` where that group exists and we may; never fatal:
        a daemon running as user mpsd already owns it with group mpsd."""
        try:
            gid = grp.getgrnam(self._group).gr_gid
        except KeyError:
            _log.info("control_socket_group_missing", group=self._group, socket=str(self.path),
                      detail="only the daemon's user can use the control socket")
            return
        if self.path.stat().st_gid == gid:
            return
        try:
            os.chown(self.path, -1, gid)
        except OSError as exc:
            _log.warning("control_socket_chgrp_failed", group=self._group,
                         socket=str(self.path), error=exc.strerror)

    # -- handlers ------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self._supervisor.status())

    async def _restart(self, request: web.Request) -> web.Response:
        return await self._gpu_command(request, "restart", self._supervisor.restart_group)

    async def _drain(self, request: web.Request) -> web.Response:
        return await self._gpu_command(request, "drain", self._supervisor.drain_group)

    async def _gpu_command(self, request: web.Request, action: str,
                           command: Callable[[str], Awaitable[GpuGroup]]) -> web.Response:
        gpu = request.match_info["gpu"]
        _log.info("control_command", action=action, gpu=gpu, **_peer(request))
        try:
            group = await self._serialised(partial(command, gpu))
        except KeyError as exc:
            return _json({"ok": False, "error": _key_error(exc)}, status=404)
        _log.info("control_command_done", action=action, gpu=group.key, state=str(group.state))
        return _json({"ok": True, "gpu": group.key, "state": str(group.state)})

    async def _reload_config(self, request: web.Request) -> web.Response:
        _log.info("control_command", action="reload", **_peer(request))
        result = await self._serialised(self._reload)
        return _json(result, status=200 if result.get("ok", True) else 422)

    async def _drain_node(self, request: web.Request) -> web.Response:
        assert self._drain_all is not None  # the route exists only with it
        _log.info("control_command", action="drain --all", **_peer(request))
        return _json(await self._serialised(self._drain_all))

    async def _serialised(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` after the commands before it, to completion even if the request is
        cancelled (then its outcome is only logged)."""
        async def locked() -> T:
            async with self._lock:
                return await work()

        task = asyncio.ensure_future(locked())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._orphans.add(task)
            task.add_done_callback(self._orphan_done)
            raise

    def _orphan_done(self, task: asyncio.Task[Any]) -> None:
        self._orphans.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, KeyError):
            _log.error("control_command_failed", error=f"{type(exc).__name__}: {exc}")


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                       ) -> web.StreamResponse:
    """Every answer is JSON, unknown routes and crashes included (the CLI parses them)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"ok": False, "error": f"{exc.reason}: {request.method} {request.path}"},
                     status=exc.status)
    except Exception as exc:
        _log.exception("control_error", path=request.path)
        return _json({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, status=500)


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _key_error(exc: KeyError) -> str:
    """``KeyError``'s own ``str()`` quotes its message; show the message itself."""
    return str(exc.args[0]) if exc.args else "unknown GPU"


def _peer(request: web.Request) -> dict[str, int]:
    """Who sent a command (``SO_PEERCRED``): the audit trail of ``mpsd drain``."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return {}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return {}
    pid, uid, gid = struct.unpack("3i", raw)
    return {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}


def _clear_stale(path: Path) -> None:
    """Remove a previous run's socket; refuse when something live still answers on it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(
            f"{path} exists and is not a socket; remove it or change [daemon] state_dir")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody listens: a crashed run's leftover
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlSocketError(
                f"cannot check whether another mpsd uses {path}: {exc.strerror}") from None
    else:
        raise ControlSocketError(
            f"another mpsd is running: it answers on {path} (stop it first, or give this one "
            "another [daemon] state_dir)")
    finally:
        probe.close()
    _log.info("control_socket_stale_removed", socket=str(path))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
