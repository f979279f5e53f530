#!/usr/bin/env python3
"""A co-tenant MPS client that poisons the shared GPU context on request.

mpsd runs it as an engine of ``kind = "command"`` next to the vLLM engines of a GPU, so that it
is one more client of the group's MPS server. It opens a CUDA context at start (through torch),
compiles a tiny Triton kernel and checks it with an in-bounds store, then serves HTTP:

- ``GET /health``: 200 while the context is usable, 503 once it has faulted;
- ``POST /fault``: launch the kernel with a store about 4 TiB past a live buffer (an illegal
  address: an MMU fault, Xid 31), synchronize, and answer with the CUDA error it got.

A real fatal GPU fault under MPS is reported to every client of the server, the bystanders
included (mps.md §1.1): the vLLM engines next to this program die with the same error. After
the fault the program does *not* exit: a client that stays attached keeps the MPS server in
``FAULT`` until someone kills it, which is exactly what mpsd's group recovery has to do.

``--fake`` runs without CUDA against the fake MPS daemon of ``tests/fakes`` (for a dry run of
the GPU tests on a CPU machine): a fake ``EngineCore`` child joins MPS as this program's client,
and ``/fault`` asks the fake daemon to poison every client, like a real fatal fault.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ILLEGAL_OFFSET = 1 << 40  # elements past the buffer: ~4 TiB for float32, never mapped


class Device:
    """The CUDA side: a context, a buffer and the kernel that can store out of bounds."""

    def __init__(self) -> None:
        import torch  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
        import triton  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
        import triton.language as tl  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415

        @triton.jit
        def store(ptr, offset_ptr):  # type: ignore[no-untyped-def]  # no annotations in Triton
            tl.store(ptr + tl.load(offset_ptr), 1.0)

        self.torch = torch
        self.kernel = store
        self.buffer = torch.zeros(1024, device="cuda")
        # The offset lives in device memory, so the fault launches the kernel compiled here.
        self.offset = torch.zeros(1, dtype=torch.int64, device="cuda")
        self.kernel[(1,)](self.buffer, self.offset)  # compile now; prove the store path works
        torch.cuda.synchronize()
        self.faulted = ""
        self.lock = threading.Lock()
        threading.Thread(target=self._pulse, name="pulse", daemon=True).start()

    def _pulse(self) -> None:
        """A small kernel every 50 ms: a busy client, which notices a sibling's fault itself."""
        while not self.faulted:
            try:
                with self.lock:
                    self.buffer.add_(1.0)
                    self.torch.cuda.synchronize()
            except Exception as exc:
                self.faulted = f"{type(exc).__name__}: {exc}"
                print(json.dumps({"event": "cotenant_cuda_error", "at": time.time(),
                                  "error": self.faulted[:300]}), flush=True)
                return
            time.sleep(0.05)

    def fault(self) -> str:
        try:
            with self.lock:
                self.offset.fill_(ILLEGAL_OFFSET)
                self.kernel[(1,)](self.buffer, self.offset)
                self.torch.cuda.synchronize()
        except Exception as exc:
            self.faulted = f"{type(exc).__name__}: {exc}"
        else:
            self.faulted = ""
        return self.faulted or "no error (the store did not fault)"

    def healthy(self) -> bool:
        if self.faulted:
            return False
        try:
            with self.lock:
                self.torch.cuda.synchronize()
        except Exception as exc:
            self.faulted = f"{type(exc).__name__}: {exc}"
            return False
        return True


class FakeDevice:
    """``--fake``: a fake EngineCore child is the MPS client; a fault goes to the fake daemon."""

    def __init__(self, port: int) -> None:
        core = REPO / "tests" / "fakes" / "fake_engine_core.py"
        self.core = subprocess.Popen([sys.executable, str(core), str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.core.stdout is not None
        self.core.stdout.readline()  # its ready line: attached and "loaded"
        self.faulted = ""

    def fault(self) -> str:
        binary = os.environ.get("COTENANT_FAKE_MPS", "")
        out = subprocess.run([binary], input="fake_fault\n", capture_output=True, text=True,
                             timeout=10, check=False)
        self.faulted = "CUDA error: an illegal memory access was encountered (fake)"
        print(out.stdout + out.stderr, flush=True)
        return self.faulted

    def healthy(self) -> bool:
        return not self.faulted and self.core.poll() is None


def serve(port: int, device: Device | FakeDevice) -> None:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                with lock:
                    ok = device.healthy()
                self._reply(200 if ok else 503, {"healthy": ok, "error": device.faulted})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/fault":
                self._reply(404, {"error": "not found"})
                return
            started = time.time()
            print(json.dumps({"event": "cotenant_fault", "at": started}), flush=True)
            with lock:
                error = device.fault()
            print(json.dumps({"event": "cotenant_fault_result", "error": error,
                              "seconds": round(time.time() - started, 3)}), flush=True)
            self._reply(200, {"error": error, "at": started})

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(json.dumps({"event": "cotenant_ready", "port": port, "pid": os.getpid()}), flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fake", action="store_true", help="no CUDA: fake MPS (CPU dry run)")
    args = parser.parse_args()
    device: Device | FakeDevice = FakeDevice(args.port) if args.fake else Device()
    serve(args.port, device)


if __name__ == "__main__":
    main()
