"""Client mode of the fake ``nvidia-cuda-mps-control``: stdin command lines -> daemon -> stdout.

Why its own module: mpsd runs the client tool for every query (``get_server_status`` polls,
``get_client_list`` attach checks), so it imports only the standard library pieces it needs and
starts in a few tens of milliseconds instead of paying for asyncio.

Like the real tool: one connection per invocation, every non-empty stdin line is one command,
each reply is printed on stdout; when no daemon answers on ``$CUDA_MPS_PIPE_DIRECTORY/control``
it prints ``Cannot find MPS control daemon process`` on stderr and exits 1.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from tests.fakes import fakeutil

NO_DAEMON = "Cannot find MPS control daemon process"


def main() -> int:
    """Send each stdin line to the daemon, print each reply; 1 if there is no daemon."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or fakeutil.DEFAULT_PIPE_DIR
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(Path(pipe_dir) / fakeutil.CONTROL_SOCKET))
    except OSError:
        sock.close()
        print(NO_DAEMON, file=sys.stderr)
        return 1
    with sock, sock.makefile("rwb") as stream:
        stream.write(fakeutil.encode({"hello": "ui"}))
        stream.flush()
        for raw in sys.stdin:
            command = raw.strip()
            if not command:
                continue
            stream.write(command.encode() + b"\n")
            stream.flush()
            reply = stream.readline()
            if not reply:
                break
            out = str(json.loads(reply).get("out", ""))
            if out:
                print(out, flush=True)
    return 0
