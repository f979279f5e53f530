"""The fake vLLM ``EngineCore`` child process (spawned by fake_vllm.py, not run by hand).

Why a separate process: real vLLM's API server forks ``VLLM::EngineCore``, and only that process
opens a CUDA context, i.e. becomes the MPS client (vllm.md section 1, mps.md section 2.6). mpsd's
attach check looks for this PID in ``get_client_list``, its process-group kill must reach it, and
an orphaned EngineCore (API server SIGKILLed) must keep living like the real one does.

Behaviour:
* If ``CUDA_MPS_PIPE_DIRECTORY`` is set and ``<dir>/control`` exists, join the fake MPS daemon as
  a client with this PID; a refusal (e.g. 807 while the server is FAULT) fails start-up with
  exit code 1. Without the socket, or when nobody answers on it (a stale socket), it runs
  "outside MPS" silently, like CUDA does in DEFAULT compute mode.
* Then sleep ``FAKE_ENGINE_START_DELAY_S`` (model load) and print one JSON ready line on stdout.
* stdin lines from the API server: ``busy``/``idle`` (forwarded to MPS), ``crash`` (die at once
  with exit 1 and no MPS goodbye: a busy crash faults MPS siblings), ``exit`` (goodbye, exit 0).
* MPS notices: fault -> ``CUDA error: an illegal memory access was encountered``, exit 1 after
  ``FAKE_ENGINE_MPS_EXIT_DELAY_S`` (default 0.4 s, the measured reaction time) unless
  ``FAKE_ENGINE_IGNORE_MPS_FAULT=1`` (a stuck client that keeps the server in FAULT); terminate
  -> ``CUDA_ERROR_MPS_CLIENT_TERMINATED``, exit 1 after 0.05 s; server lost -> exit 1.
* stdin EOF means the API server died: stay alive (orphaned, like vLLM) but exit after
  ``FAKE_ENGINE_ORPHAN_EXIT_S`` (default 120) so stray fakes never live forever.
* SIGTERM exits 0 after an MPS goodbye (vLLM's EngineCore raises SystemExit), unless
  ``FAKE_ENGINE_IGNORE_SIGTERM=1``.
* ``FAKE_ENGINE_CPU_BOUND=1`` (opt-in, per port like every knob): from readiness on, a thread
  spins on a whole core, like vLLM's scheduler loop when the engine's CPU side is what limits
  it (what mpsd's CPU-bound diagnosis looks for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fakes import fakeutil
from tests.fakes.fakeutil import JsonObj

_CUDA_MESSAGES = {
    fakeutil.CUDA_ERROR_ILLEGAL_ADDRESS: "an illegal memory access was encountered",
    fakeutil.CUDA_ERROR_MPS_CLIENT_TERMINATED:
        "CUDA_ERROR_MPS_CLIENT_TERMINATED: the MPS client has been terminated by the server",
    fakeutil.CUDA_ERROR_MPS_RPC_FAILURE:
        "CUDA_ERROR_MPS_RPC_FAILURE: the remote procedural call between the MPS server and "
        "the MPS client failed",
    fakeutil.CUDA_ERROR_MPS_SERVER_NOT_READY:
        "CUDA_ERROR_MPS_SERVER_NOT_READY: the MPS server is not ready to accept new MPS client "
        "requests",
}


class MpsAttachError(Exception):
    """The fake CUDA client could not join MPS; ``code`` is the CUDA error it would get."""

    def __init__(self, code: int, message: str, answered: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.answered = answered  # False: nobody listened on the control socket


@dataclass
class MpsClient:
    """An attached fake CUDA client: the server connection and what the server told us."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server_pid: int
    reply: JsonObj

    def send(self, obj: JsonObj) -> None:
        """Fire-and-forget message to the server (busy/idle/bye); errors mean it is gone."""
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write(fakeutil.encode(obj))


async def mps_attach(pipe_dir: str, pid: int, comm: str, wait_s: float = 30.0) -> MpsClient:
    """Join the fake MPS daemon at ``pipe_dir`` like ``cuInit``/``cuCtxCreate`` under MPS would.

    The daemon starts the server lazily and answers with the server's socket; the client then
    registers its own PID there. Raises ``MpsAttachError`` with the CUDA error code on refusal.
    """
    path = str(Path(pipe_dir) / fakeutil.CONTROL_SOCKET)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise MpsAttachError(fakeutil.CUDA_ERROR_MPS_CONNECTION_FAILED, str(exc),
                             answered=False) from exc
    try:
        hello = {"hello": "client", "pid": pid, "comm": comm, "uid": os.getuid()}
        writer.write(fakeutil.encode(hello))
        answer = await asyncio.wait_for(fakeutil.read_obj(reader), wait_s)
    except (OSError, TimeoutError) as exc:
        raise MpsAttachError(fakeutil.CUDA_ERROR_MPS_CONNECTION_FAILED, str(exc)) from exc
    finally:
        writer.close()
    if answer is None or not answer.get("ok"):
        answer = answer or {}
        code = int(answer.get("error", fakeutil.CUDA_ERROR_MPS_CONNECTION_FAILED))
        raise MpsAttachError(code, str(answer.get("message", "MPS control daemon refused")))
    try:
        reader, writer = await asyncio.open_unix_connection(str(answer["socket"]))
        writer.write(fakeutil.encode({"op": "hello", "pid": pid, "comm": comm}))
        reply = await asyncio.wait_for(fakeutil.read_obj(reader), wait_s)
    except (OSError, TimeoutError) as exc:
        raise MpsAttachError(fakeutil.CUDA_ERROR_MPS_RPC_FAILURE, str(exc)) from exc
    if reply is None or not reply.get("ok"):
        writer.close()
        reply = reply or {}
        code = int(reply.get("error", fakeutil.CUDA_ERROR_MPS_RPC_FAILURE))
        raise MpsAttachError(code, str(reply.get("message", "MPS server refused")))
    return MpsClient(reader, writer, int(answer["server_pid"]), reply)


def _spin() -> None:
    """Keep one core busy for ever (the thread is a daemon: it ends with the process)."""
    while True:
        pass


class EngineCore:
    """One fake EngineCore: MPS client state plus the command channel from the API server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pid = os.getpid()
        self.ev = fakeutil.EventLog("FAKE_ENGINE_EVENTS", f"engine-core:{port}")
        self.mps: MpsClient | None = None
        self.ignore_sigterm = fakeutil.knob_bool("FAKE_ENGINE_IGNORE_SIGTERM", port)
        self.exit_code: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()

    def log(self, level: str, message: str) -> None:
        """vLLM-style line on stderr (stdout is the ready channel)."""
        stamp = time.strftime("%m-%d %H:%M:%S")
        print(f"(EngineCore pid={self.pid}) {level} {stamp} [core.py:1] {message}",
              file=sys.stderr, flush=True)

    def finish(self, code: int, reason: str) -> None:
        """Resolve the exit code once; later calls are ignored."""
        if not self.exit_code.done():
            self.ev.emit("engine_core_stop", code=code, reason=reason)
            self.exit_code.set_result(code)

    def cuda_error(self, code: int, reason: str) -> None:
        """Log a CUDA error like a crashing vLLM worker would, then exit 1."""
        self.log("ERROR", "EngineCore encountered a fatal error.")
        print(f"RuntimeError: CUDA error: {_CUDA_MESSAGES.get(code, str(code))}\n"
              "CUDA kernel errors might be asynchronously reported at some other API call, so "
              "the stacktrace below might be incorrect.", file=sys.stderr, flush=True)
        self.finish(1, reason)

    async def run(self) -> int:
        """Attach, load, report ready, then follow commands until told or forced to exit."""
        loop = asyncio.get_running_loop()
        if self.ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self.log("INFO", "Initializing a V1 LLM engine (v0.32.0)")
        self._spawn(self._stdin_loop())  # "exit" must work during attach and load too
        attach: asyncio.Future[None] = asyncio.ensure_future(self._attach())
        exiting: asyncio.Future[Any] = self.exit_code
        await asyncio.wait([attach, exiting], return_when=asyncio.FIRST_COMPLETED)
        attach.cancel()
        delay = fakeutil.knob_float("FAKE_ENGINE_START_DELAY_S", 0.0, self.port) or 0.0
        if delay > 0 and not self.exit_code.done():
            await asyncio.wait([self.exit_code], timeout=delay)
        if not self.exit_code.done():
            ready = {"ready": True, "mps": self.mps is not None,
                     "server_pid": None if self.mps is None else self.mps.server_pid}
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()
            if fakeutil.knob_bool("FAKE_ENGINE_CPU_BOUND", self.port):
                threading.Thread(target=_spin, name="scheduler", daemon=True).start()
        code = await self.exit_code
        if self.mps is not None and code == 0:
            self.mps.send({"op": "bye"})
            await _drain(self.mps.writer)
        return code

    async def _attach(self) -> None:
        """Become an MPS client if a daemon socket exists; a daemon that does not answer means
        "run without MPS" (what CUDA does in DEFAULT compute mode), a refusal fails start-up."""
        pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
        if not pipe_dir or not _socket_exists(pipe_dir):
            return
        try:
            self.mps = await mps_attach(pipe_dir, self.pid, "VLLM::EngineCor")
        except MpsAttachError as exc:
            if not exc.answered:
                self.ev.emit("mps_unavailable", error=exc.code, message=str(exc))
                return
            self.ev.emit("mps_refused", error=exc.code, message=str(exc))
            self.cuda_error(exc.code, "mps_refused")
            return
        self.ev.emit("mps_connect", server_pid=self.mps.server_pid, client_pid=self.pid)
        self._spawn(self._mps_loop(self.mps))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.add(asyncio.create_task(coro))

    def _on_sigterm(self) -> None:
        self.log("INFO", "Received SIGTERM, shutting down EngineCore.")
        self.finish(0, "sigterm")

    async def _stdin_loop(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = line.strip().decode()
            if command in ("busy", "idle") and self.mps is not None:
                self.mps.send({"op": command})
            elif command == "crash":
                self.ev.emit("engine_core_crash")
                self.log("ERROR", "EngineCore failed: simulated crash (FAKE_ENGINE crash knob)")
                sys.stderr.flush()
                os._exit(1)  # abrupt on purpose: no MPS goodbye, like a segfault
            elif command == "exit":
                self.finish(0, "exit")
        orphan_s = fakeutil.knob_float("FAKE_ENGINE_ORPHAN_EXIT_S", 120.0, self.port) or 0.0
        self.ev.emit("engine_core_orphaned", exit_after_s=orphan_s)
        await asyncio.sleep(orphan_s)
        self.finish(1, "orphan_timeout")

    async def _mps_loop(self, client: MpsClient) -> None:
        """React to server notices; EOF without a notice means the server died."""
        while True:
            notice = await fakeutil.read_obj(client.reader)
            kind = "lost" if notice is None else str(notice.get("notice"))
            code = fakeutil.CUDA_ERROR_MPS_RPC_FAILURE if notice is None else int(
                notice.get("error", fakeutil.CUDA_ERROR_MPS_RPC_FAILURE))
            if kind == "fault" and fakeutil.knob_bool("FAKE_ENGINE_IGNORE_MPS_FAULT", self.port):
                self.ev.emit("mps_fault", error=code, ignored=True)
                continue
            self.ev.emit(f"mps_{kind}", error=code)
            if self.exit_code.done():
                return
            if kind == "terminate":
                delay = 0.05
            else:
                delay = fakeutil.knob_float("FAKE_ENGINE_MPS_EXIT_DELAY_S", 0.4, self.port) or 0.0
            await asyncio.sleep(delay)
            self.cuda_error(code, f"mps_{kind}")
            return


async def _drain(writer: asyncio.StreamWriter) -> None:
    try:
        await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()
    except (OSError, TimeoutError, RuntimeError):
        pass


def _socket_exists(pipe_dir: str) -> bool:
    return (Path(pipe_dir) / fakeutil.CONTROL_SOCKET).exists()


async def _amain(port: int) -> int:
    return await EngineCore(port).run()


def main(argv: list[str] | None = None) -> int:
    """``fake_engine_core.py <port>``."""
    args = sys.argv[1:] if argv is None else argv
    fakeutil.set_process_name("VLLM::EngineCore")
    return asyncio.run(_amain(int(args[0])))


if __name__ == "__main__":
    sys.exit(main())
