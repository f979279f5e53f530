"""The fake ``nvidia-cuda-mps-server``: a separate process owned by the fake control daemon.

Why a real process: mpsd reads the server PID from ``get_server_list``, watches it, and may kill
it, and the fault domain of real MPS is the server. This process holds the client registrations
and the ACTIVE/FAULT state, writes ``server.log`` like driver 580 (mps.md section 2.6) and models
the fault rules of mps.md sections 1 and 2.4:

* a fault is reported to every registered client, which must exit by itself; the status stays
  ``FAULT`` until the last client is gone, then returns to ``ACTIVE`` with the same PID, and
  clients that try to join meanwhile are refused with 807;
* a client whose connection ends without a goodbye while it reported itself busy faults its
  siblings (SIGKILL of a busy client); an idle or terminated one does not;
* ``terminate_client`` marks the client terminated (sticky 810) without touching its siblings.

It talks to the daemon through its stdin/stdout (JSON lines, one reply per request) and exits
when stdin reaches EOF, i.e. when the daemon is gone, so a killed daemon never leaves it behind.
Started as ``python3 fake_mps_server.py <pipe_dir> <log_dir> <atp> <pinned json> <device>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fakes import fakeutil
from tests.fakes.fakeutil import JsonObj


@dataclass
class Client:
    """One registered MPS client context (one per process, context ID 1 like the samples)."""

    pid: int
    ident: int
    comm: str
    writer: asyncio.StreamWriter
    busy: bool = False
    graceful: bool = False
    terminated: bool = False

    @property
    def tag(self) -> str:
        """The ``{PID: X, Context ID: 1}`` form the real server.log uses."""
        return f"{{PID: {self.pid}, Context ID: 1}}"


class Server:
    """State and behaviour of one fake MPS server."""

    def __init__(self, pipe_dir: str, log_dir: str, atp: float, pinned: dict[str, int]) -> None:
        self.pid = os.getpid()
        self.socket_path = str(Path(pipe_dir) / f"server.{self.pid}")
        self.log_path = str(Path(log_dir) / "server.log")
        self.atp = atp
        self.pinned = dict(pinned)
        self.device = os.environ.get("FAKE_MPS_DEVICE_NAME", "NVIDIA H200")
        self.max_clients = int(fakeutil.knob_float("FAKE_MPS_MAX_CLIENTS", 48) or 48)
        self.status = "ACTIVE"
        self.clients: dict[int, Client] = {}
        self.accepting = True
        self.context_ready = False
        self.next_ident = 1
        self.done = asyncio.Event()
        self.ev = fakeutil.EventLog("FAKE_MPS_EVENTS", "mps-server")

    def log(self, message: str) -> None:
        """One server.log line in the driver's bracket format (on stderr under ``-f``)."""
        fakeutil.mps_log(self.log_path, fakeutil.mps_log_line("Server", self.pid, message))

    def _ensure_context(self) -> None:
        """The server context is created at start and lazily again after a fault recovery."""
        if not self.context_ready:
            self.log(f"Creating server context on device 0 ({self.device})")
            self.context_ready = True

    async def run(self) -> int:
        """Start, announce readiness on stdout, serve until told to stop or orphaned."""
        delay = fakeutil.knob_float("FAKE_MPS_SERVER_START_DELAY_S", 0.0) or 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        self._ensure_context()
        self.log(f"Active Threads Percentage set to {self.atp:.1f}")
        for dev, limit in self.pinned.items():
            self.log(f"Device pinned memory limit for device {dev} set to {limit:#x} bytes")
        _unlink(self.socket_path)
        server = await asyncio.start_unix_server(self._on_client, path=self.socket_path)
        self.log("Server has started")
        self.ev.emit("server_start", server_pid=self.pid, atp=self.atp, pinned=self.pinned)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: self.fault(None, "sigusr1"))
        loop.add_signal_handler(signal.SIGTERM, lambda: self.shutdown(force=True))
        sys.stdout.write(json.dumps({"ready": True, "socket": self.socket_path}) + "\n")
        sys.stdout.flush()
        stdin_task = asyncio.create_task(self._stdin_loop())
        await self.done.wait()
        stdin_task.cancel()
        server.close()
        for client in list(self.clients.values()):
            client.writer.close()
        _unlink(self.socket_path)
        self.ev.emit("server_stop", server_pid=self.pid, clients=sorted(self.clients))
        return 0

    async def _stdin_loop(self) -> None:
        """Serve the daemon's requests; EOF means the daemon died: behave like a lost server."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            request = await fakeutil.read_obj(reader)
            if request is None:
                self.log("Control daemon connection lost, server exiting")
                self.shutdown(force=True)
                return
            reply = self.handle(request)
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()

    def handle(self, req: JsonObj) -> JsonObj:
        """One daemon request (see fake_mps_control for the commands that map to these)."""
        op = req.get("op")
        if op == "status":
            return {"status": self.status}
        if op == "clients":
            return {"clients": [
                {"pid": c.pid, "id": c.ident, "comm": c.comm} for c in self.clients.values()
            ]}
        if op == "set_atp":
            self.atp = float(req["value"])
            return {"value": self.atp}
        if op == "get_atp":
            return {"value": self.atp}
        if op == "set_pinned":
            self.pinned[str(req["dev"])] = int(req["value"])
            return {}
        if op == "get_pinned":
            return {"value": self.pinned.get(str(req["dev"]))}
        if op == "terminate":
            return self.terminate(int(req["pid"]))
        if op == "fault":
            pid = req.get("pid")
            if pid is not None and int(pid) not in self.clients:
                return {"error": f"Client {pid} not found"}
            self.fault(None if pid is None else int(pid), "fake_fault")
            return {}
        if op == "shutdown":
            self.shutdown(force=bool(req.get("force")))
            return {}
        return {"error": f"bad op {op!r}"}

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Register one CUDA client, follow its busy/idle reports, notice how it leaves."""
        hello = await fakeutil.read_obj(reader)
        if hello is None or hello.get("op") != "hello":
            writer.close()
            return
        pid = int(hello.get("pid", 0))
        self.log("Received new client request")
        refusal = self._refusal()
        if refusal is not None:
            code, message = refusal
            self.ev.emit("client_refused", server_pid=self.pid, client_pid=pid, error=code)
            writer.write(fakeutil.encode({"ok": False, "error": code, "message": message}))
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        self._ensure_context()
        client = Client(pid, self.next_ident, str(hello.get("comm", "python3")), writer)
        self.next_ident += 1
        self.clients[pid] = client
        self.log(f"Status of client {client.tag} is ACTIVE")
        self.ev.emit("client_connect", server_pid=self.pid, client_pid=pid,
                     clients=len(self.clients))
        writer.write(fakeutil.encode({"ok": True, "server_pid": self.pid, "context_id": 1,
                                      "atp": self.atp, "pinned": self.pinned}))
        while (msg := await fakeutil.read_obj(reader)) is not None:
            op = msg.get("op")
            if op in ("busy", "idle"):
                client.busy = op == "busy"
                self.ev.emit("client_state", server_pid=self.pid, client_pid=pid, state=op)
            elif op == "bye":
                client.graceful = True
        writer.close()
        self._on_disconnect(client)

    def _refusal(self) -> tuple[int, str] | None:
        """Why a new client cannot join now, as (CUDA error, message), or None."""
        if self.status == "FAULT":
            return fakeutil.CUDA_ERROR_MPS_SERVER_NOT_READY, "MPS server is not ready (FAULT)"
        if not self.accepting:
            return fakeutil.CUDA_ERROR_MPS_SERVER_NOT_READY, "MPS server is shutting down"
        if len(self.clients) >= self.max_clients:
            return fakeutil.CUDA_ERROR_MPS_MAX_CLIENTS_REACHED, "MPS max clients reached"
        return None

    def _on_disconnect(self, client: Client) -> None:
        """A client left: count it down, fault siblings if it died busy, recover after FAULT."""
        if self.clients.get(client.pid) is not client:
            return
        del self.clients[client.pid]
        if not client.graceful:  # what the H200 printed 2 ms after a kill -9 of EngineCore
            self.log(f"Client process {client.pid} disconnected")
        self.log("Server failed to recevie command with status 806, assuming client "
                 f"{client.tag} exit")
        self.log(f"Client {client.tag} exiting. "
                 f"Number of active client contexts is {len(self.clients)}.")
        self.ev.emit("client_exit", server_pid=self.pid, client_pid=client.pid,
                     graceful=client.graceful, busy=client.busy,
                     terminated=client.terminated, remaining=len(self.clients))
        abrupt_busy = client.busy and not client.graceful and not client.terminated
        if abrupt_busy and self.status == "ACTIVE" and self.accepting:
            self.fault(client.pid, "busy_client_died", gone=client.pid)
        elif self.status == "FAULT" and not self.clients:
            self._recover()
        if not self.accepting and not self.clients:
            self.done.set()

    def fault(self, faulter: int | None, reason: str, gone: int | None = None) -> None:
        """A fatal GPU fault: every client gets the sticky error; FAULT until all are gone."""
        if self.status == "FAULT":
            return
        pids = sorted(self.clients)
        culprit = faulter if faulter is not None else (pids[0] if pids else 0)
        bystanders = [p for p in pids if p != culprit]
        blamed = bystanders[0] if bystanders else culprit
        self.status = "FAULT"
        self.log(f"Client {{PID: {blamed}, Context: 1}} encountered a fatal GPU error.")
        self.log("Server is handling a fatal GPU error.")
        self.log(f"Client {{PID: {culprit}, Context ID: 1}} on device 0 to be torn down")
        self.log(f"All clients belonging to error trigging process {culprit} will be torn down")
        self.log("The following devices will be reset:")
        self.log("0")
        sticky = sorted({*pids, *([gone] if gone is not None else [])})
        self.log("The following client process have a sticky error set:")
        self.log(" / ".join(str(p) for p in sticky))
        self.ev.emit("fault", server_pid=self.pid, faulter=culprit, reason=reason, clients=pids)
        self.ev.emit("status", server_pid=self.pid, status="FAULT")
        notice = fakeutil.encode({"notice": "fault", "error": fakeutil.CUDA_ERROR_ILLEGAL_ADDRESS})
        for client in self.clients.values():
            with contextlib.suppress(OSError, RuntimeError):
                client.writer.write(notice)
        if not self.clients:
            self._recover()

    def _recover(self) -> None:
        """Last client of a FAULT is gone: destroy the context; ACTIVE again, same PID."""
        self.log(f"Destroy server context on device 0 ({self.device})")
        self.context_ready = False
        self.status = "ACTIVE"
        self.ev.emit("status", server_pid=self.pid, status="ACTIVE")

    def terminate(self, pid: int) -> JsonObj:
        """``terminate_client``: sticky CLIENT_TERMINATED for one client, siblings untouched."""
        client = self.clients.get(pid)
        if client is None:
            return {"error": f"Client {pid} not found"}
        self.log(f"MPS server requesting client {client.tag} to exit")
        client.terminated = True
        client.busy = False
        with contextlib.suppress(OSError, RuntimeError):
            client.writer.write(fakeutil.encode(
                {"notice": "terminate", "error": fakeutil.CUDA_ERROR_MPS_CLIENT_TERMINATED}))
        self.log("Client termination succeeded.")
        self.ev.emit("terminate_client", server_pid=self.pid, client_pid=pid)
        return {"rc": 0}

    def shutdown(self, *, force: bool) -> None:
        """Stop accepting clients; exit when they are gone, or now (clients lose the server)."""
        self.accepting = False
        self.ev.emit("server_shutdown", server_pid=self.pid, force=force,
                     clients=sorted(self.clients))
        if force:
            notice = fakeutil.encode(
                {"notice": "shutdown", "error": fakeutil.CUDA_ERROR_MPS_RPC_FAILURE})
            for client in self.clients.values():
                with contextlib.suppress(OSError, RuntimeError):
                    client.writer.write(notice)
        if force or not self.clients:
            self.done.set()


def _unlink(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point used by the fake control daemon; not meant to be run by hand."""
    args = sys.argv[1:] if argv is None else argv
    pipe_dir, log_dir, atp, pinned = args[0], args[1], float(args[2]), json.loads(args[3])
    fakeutil.set_process_name("nvidia-cuda-mps-server")
    server = Server(pipe_dir, log_dir, atp, {str(k): int(v) for k, v in pinned.items()})
    return asyncio.run(server.run())


if __name__ == "__main__":
    sys.exit(main())
