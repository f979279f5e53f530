"""Fake ``nvidia-cuda-mps-control`` (driver 580): control daemon (``-f``/``-d``) and client tool.

Why: mpsd owns one MPS control daemon per GPU and drives it only through the binary's documented
interface (``-f``, and command lines on stdin in client mode). Tests need that interface, the
``control.log``/``server.log`` lines of mps.md section 2.6 and MPS's fault semantics on machines
without a GPU. The server lives in ``fake_mps_server.py`` as its own process, started lazily on
the first client with the *default* settings current at that moment, as real MPS does.

Environment: ``CUDA_MPS_PIPE_DIRECTORY`` (default /tmp/nvidia-mps), ``CUDA_MPS_LOG_DIRECTORY``
(default /var/log/nvidia-mps), ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (initial default ATP),
``CUDA_VISIBLE_DEVICES`` (a ``GPU-`` UUID shows up in ``ps``), ``FAKE_MPS_EVENTS`` (JSON-lines
events file). Test knobs: ``FAKE_MPS_READY_DELAY_S`` (delay before the control socket exists),
``FAKE_MPS_SERVER_START_DELAY_S`` (server stays INITIALIZING that long),
``FAKE_MPS_CRASH_AFTER_S`` + ``FAKE_MPS_EXIT_CODE`` (daemon dies abruptly; default code 1),
``FAKE_MPS_IGNORE_SIGTERM=1``, ``FAKE_MPS_IGNORE_QUIT=1``, ``FAKE_MPS_MAX_CLIENTS`` (48),
``FAKE_MPS_DEVICE_NAME`` (server.log device name, default ``NVIDIA H200``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fakes import fake_mps_client, fakeutil
from tests.fakes.fake_mps_commands import Commands, ServerHandle
from tests.fakes.fakeutil import JsonObj

HERE = Path(__file__).resolve().parent
HELP = """Usage: nvidia-cuda-mps-control [OPTION]...
  -d, --daemon              Start the MPS control daemon in the background
  -f, --forground           Start the MPS control daemon in the foreground
  -M, --multiuser-server    Enable multi-user server (Only root user may enable)
  -q, --ready-devices       Prepare the daemon to query devices on startup
  -h, --help                Display this help message
"""


def _dirs() -> tuple[str, str]:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or fakeutil.DEFAULT_PIPE_DIR
    log = os.environ.get("CUDA_MPS_LOG_DIRECTORY") or fakeutil.DEFAULT_LOG_DIR
    return pipe, log


class Daemon:
    """The control daemon: socket, pid file, control.log, lazy server, command dispatch."""

    def __init__(self, pipe_dir: str, log_dir: str) -> None:
        self.pid = os.getpid()
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.control_path = Path(pipe_dir) / fakeutil.CONTROL_SOCKET
        self.pid_path = Path(pipe_dir) / fakeutil.PID_FILE
        self.log_path = str(Path(log_dir) / "control.log")
        self.ev = fakeutil.EventLog("FAKE_MPS_EVENTS", "mps-control")
        self.server: ServerHandle | None = None
        self.quitting = False
        self.done = asyncio.Event()
        self.commands = Commands(self)
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn_lock = asyncio.Lock()

    def log(self, message: str) -> None:
        """One control.log line in the driver's bracket format (on stderr under ``-f``)."""
        fakeutil.mps_log(self.log_path, fakeutil.mps_log_line("Control", self.pid, message))

    async def run(self) -> int:
        """Listen on ``<pipe>/control`` until quit, SIGTERM or SIGINT; return the exit code."""
        delay = fakeutil.knob_float("FAKE_MPS_READY_DELAY_S", 0.0) or 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        if not _prepare_dirs(self.control_path, self.log_dir):
            print("An instance of this daemon is already running", file=sys.stderr)
            return 1
        listener = await asyncio.start_unix_server(self._on_connection,
                                                   path=str(self.control_path))
        _write_text(self.pid_path, f"{self.pid}\n")
        self.log(f"Starting control daemon using socket {self.control_path}")
        self.log("To connect CUDA applications to this daemon, set env "
                 f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}")
        self.ev.emit("daemon_start", pipe_dir=self.pipe_dir, log_dir=self.log_dir,
                     cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        crash_after = fakeutil.knob_float("FAKE_MPS_CRASH_AFTER_S", None)
        if crash_after is not None:
            loop.call_later(crash_after, self._crash)
        await self.done.wait()
        listener.close()
        for path in (self.control_path, self.pid_path):
            path.unlink(missing_ok=True)
        self.log("Exit")
        self.ev.emit("daemon_exit", code=0)
        return 0

    def _crash(self) -> None:
        """FAKE_MPS_CRASH_AFTER_S: die without cleanup, like a crashed daemon."""
        code = int(fakeutil.knob_float("FAKE_MPS_EXIT_CODE", 1) or 0)
        self.ev.emit("daemon_crash", code=code)
        os._exit(code)

    def _on_signal(self, sig: int) -> None:
        ignored = fakeutil.knob_bool("FAKE_MPS_IGNORE_SIGTERM") and sig == signal.SIGTERM
        self.ev.emit("signal", signal=int(sig), ignored=ignored)
        if ignored or self.quitting:
            return
        self.quitting = True
        self.log(f"Caught signal {int(sig)}, shutting down")
        self._tasks.add(asyncio.create_task(self.stop_server(0.0)))

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """Every connection logs the driver's noise lines, then is a UI or a CUDA client."""
        self.log("Accepting connection...")
        self.log("User did not send valid credentials")
        try:
            hello = await fakeutil.read_obj(reader)
            if hello is None:
                return
            if hello.get("hello") == "ui":
                await self._serve_ui(reader, writer)
            elif hello.get("hello") == "client":
                reply = await self._route_client(hello)
                writer.write(fakeutil.encode(reply))
                await writer.drain()
        except (OSError, RuntimeError):
            pass
        finally:
            writer.close()

    async def _serve_ui(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log("NEW UI")
        while True:
            line = await reader.readline()
            if not line:
                break
            command = line.decode(errors="replace").strip()
            self.log(f"Cmd:{command}")
            out = await self.commands.run(command)
            for result_line in out.splitlines():
                self.log(result_line)
            self.ev.emit("command", command=command, out=out)
            writer.write(fakeutil.encode({"out": out}))
            await writer.drain()
        self.log("UI closed")

    async def _route_client(self, hello: JsonObj) -> JsonObj:
        """Hand a CUDA client to the server, starting it lazily (pending until it is ready)."""
        cpid = int(hello.get("pid", 0))
        uid = int(hello.get("uid", 0))
        new = f"NEW CLIENT {cpid} from user {uid}: "
        if self.quitting:
            self.log(new + "Server is shutting down, reject the client")
            return _refuse(fakeutil.CUDA_ERROR_MPS_CONNECTION_FAILED, "daemon is shutting down")
        server, spawned = await self.ensure_server(uid)
        if spawned or not server.ready.done():
            self.log(new + "Server is not ready, push client to pending list")
        elif server.shutting_down:
            self.log(new + "Server is not ready, push client to pending list")
            return _refuse(fakeutil.CUDA_ERROR_MPS_SERVER_NOT_READY, "server is shutting down")
        else:
            status = (await server.call({"op": "status"}) or {}).get("status")
            if status != "ACTIVE":
                self.log(new + "Server is not ready, push client to pending list")
                return _refuse(fakeutil.CUDA_ERROR_MPS_SERVER_NOT_READY, f"server is {status}")
            self.log(new + "Server already exists")
        if not await server.ready:
            return _refuse(fakeutil.CUDA_ERROR_MPS_CONNECTION_FAILED, "server failed to start")
        return {"ok": True, "server_pid": server.pid, "socket": server.socket}

    async def ensure_server(self, uid: int = 0) -> tuple[ServerHandle, bool]:
        """The current server, or a freshly spawned one (then the flag is True)."""
        async with self._spawn_lock:
            if self.server is not None:
                return self.server, False
            return await self._spawn_server(uid), True

    async def _spawn_server(self, uid: int) -> ServerHandle:
        """Spawn the server with the current defaults; ``ready`` resolves when it is up."""
        script = str(HERE / "fake_mps_server.py")
        defaults = self.commands.defaults
        proc = await asyncio.create_subprocess_exec(
            sys.executable, script, self.pipe_dir, self.log_dir, str(defaults.atp),
            defaults.pinned_json(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        server = ServerHandle(proc)
        self.server = server
        self.log(f"Starting new server {proc.pid} for user {uid}")
        self._tasks.add(asyncio.create_task(self._watch_server(server)))
        self._tasks.add(asyncio.create_task(self._announce(server)))
        return server

    async def _announce(self, server: ServerHandle) -> None:
        if await server.wait_ready():
            self.log(f"NEW SERVER {server.pid}: Ready")

    async def _watch_server(self, server: ServerHandle) -> None:
        code = await server.proc.wait()
        status = code if code >= 0 else 128 - code
        self.log(f"Server {server.pid} exited with status {status}")
        self.ev.emit("server_exit", server_pid=server.pid, status=code)
        if not server.ready.done():
            server.ready.set_result(False)
        if self.server is server:
            self.server = None

    async def stop_server(self, grace_s: float | None) -> None:
        """quit/SIGTERM: stop the server (forced after ``grace_s``), then let the daemon exit."""
        server = self.server
        if server is not None:
            server.shutting_down = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(server.ready), 10)
            await server.call({"op": "shutdown", "force": grace_s == 0.0})
            try:
                await asyncio.wait_for(server.proc.wait(), grace_s)
            except TimeoutError:
                self.log(f"Server {server.pid} did not exit in time, forcing shutdown")
                await server.call({"op": "shutdown", "force": True})
                try:
                    await asyncio.wait_for(server.proc.wait(), 2.0)
                except TimeoutError:
                    server.proc.kill()
                    await server.proc.wait()
            await asyncio.sleep(0)  # let _watch_server log the exit first
        self.done.set()


def _refuse(code: int, message: str) -> JsonObj:
    return {"ok": False, "error": code, "message": message}


def _prepare_dirs(control: Path, log_dir: str) -> bool:
    """Create the directories and drop a stale socket; False if a live daemon owns it."""
    control.parent.mkdir(parents=True, exist_ok=True)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    if _daemon_alive(control):
        return False
    control.unlink(missing_ok=True)
    return True


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _daemon_alive(path: Path) -> bool:
    """Whether another daemon answers on this pipe dir (stale sockets are replaced)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _background() -> int:
    """``-d``: start ``-f`` detached in its own session, like the real daemon's fork."""
    subprocess.Popen([sys.executable, str(HERE / "fake_mps_control.py"), "-f"],
                     start_new_session=True, env={**os.environ, "FAKE_MPS_LOG_FILES": "1"},
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    pipe_dir, _ = _dirs()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _daemon_alive(Path(pipe_dir) / fakeutil.CONTROL_SOCKET):
            return 0
        time.sleep(0.02)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Dispatch on the real binary's options."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        return fake_mps_client.main()
    if args[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    if args[0] in ("-f", "--forground", "--foreground"):
        fakeutil.set_process_name("nvidia-cuda-mps")
        return asyncio.run(Daemon(*_dirs()).run())
    if args[0] in ("-d", "--daemon"):
        return _background()
    print(f"Unknown option {args[0]}", file=sys.stderr)
    print(HELP, end="", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
