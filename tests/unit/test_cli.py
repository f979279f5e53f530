"""The ``mpsd`` command as people use it: piped into ``head``, stopped with Ctrl-C.

Each test runs the real CLI in a subprocess. The daemon side is a real unix-socket HTTP server
in a thread that answers ``GET /status`` with a canned status document (or accepts and never
answers), so the CLI's whole path — connect, read, render, print — runs for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.harness import REPO

STATUS = {
    "status": "1/1 GPUs running, 2/2 engines ready",
    "mps": {"enabled": False, "reason": "MPS off"},
    "groups": [{"gpu": f"gpu{i}", "device": str(i), "state": "running", "reason": "ready",
                "engines": [{"key": f"gpu{i}/tiny-{j}", "pid": 100 + j, "port": 18100 + j,
                             "ready": True, "inflight": 0} for j in range(2)],
                "history": []} for i in range(200)],
}


class _StatusHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(STATUS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def control_socket(workdir: Path) -> Iterator[Path]:
    """A control socket that answers ``/status`` like a daemon with 200 GPUs (a long text)."""
    path = workdir / "control.sock"
    server = _UnixHTTPServer(str(path), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with stdout a pipe whose reader is already gone (``| head`` that exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "mpsd", *args], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60, check=False, cwd=REPO)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [
    ("status",), ("status", "--json"), ("check-config", "-c", "examples/cpu.toml"),
    ("check-config", "--json", "-c", "examples/cpu.toml"),
])
def test_a_closed_pipe_ends_the_command_quietly(control_socket: Path,
                                                args: tuple[str, ...]) -> None:
    if args[0] == "status":
        args = (*args, "--socket", str(control_socket))
    out = run_into_closed_pipe(*args)
    assert out.returncode == 141, out.stderr
    assert out.stderr == b""


def test_ctrl_c_while_waiting_for_the_daemon_ends_without_a_traceback(workdir: Path) -> None:
    path = workdir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(30)
        proc = subprocess.Popen([sys.executable, "-m", "mpsd", "status", "--socket", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        conn, _ = listener.accept()  # the CLI is connected and waits for an answer
        with conn:
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"Traceback" not in stderr and stdout == b""


def test_check_config_prints_only_its_report() -> None:
    # --file-only: vLLM for CPU need not be installed here for the plan to be shown
    out = subprocess.run([sys.executable, "-m", "mpsd", "check-config", "--file-only", "-c",
                          "examples/cpu.toml"], capture_output=True, text=True, timeout=60,
                         check=True, cwd=REPO)
    assert out.stdout.startswith("MPS: ")
    assert "{" not in out.stderr and "nvml_unavailable" not in out.stdout + out.stderr


def test_a_daemon_not_found_names_the_config_and_how_to_point_elsewhere(workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MPSD_CONFIG"}
    config = workdir / "etc" / "mpsd.toml"
    for args, extra in (((), {}), (("-c", str(config)), {}), ((), {"MPSD_CONFIG": str(config)})):
        out = subprocess.run([sys.executable, "-m", "mpsd", "drain", "gpu0", *args],
                             capture_output=True, text=True, timeout=60, check=False,
                             cwd=REPO, env={**env, **extra})
        assert out.returncode == 1
        file = str(config) if args or extra else "/etc/mpsd/mpsd.toml"
        why = "given with -c" if args else "from $MPSD_CONFIG" if extra else "the default"
        assert f"tried: [daemon] state_dir of {file} ({why}" in out.stderr, out.stderr
        assert "mpsd drain -c FILE, or export MPSD_CONFIG=FILE, or --socket PATH" in out.stderr


def mpsd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpsd", *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)


def test_drain_without_a_gpu_shows_drains_usage() -> None:
    out = mpsd_cli("drain")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: mpsd drain ")
    assert "mpsd drain: error: give a GPU (gpu0, a device index or a UUID) or --all" in out.stderr


def test_status_of_one_gpu(control_socket: Path) -> None:
    out = mpsd_cli("status", "gpu7", "--json", "--socket", str(control_socket))
    assert out.returncode == 0, out.stderr
    assert [g["gpu"] for g in json.loads(out.stdout)["groups"]] == ["gpu7"]
    by_device = mpsd_cli("status", "12", "--socket", str(control_socket))
    assert by_device.returncode == 0 and "gpu12 - device 12" in by_device.stdout
    assert "gpu13" not in by_device.stdout
    missing = mpsd_cli("status", "gpu999", "--socket", str(control_socket))
    assert missing.returncode == 1
    assert "no GPU 'gpu999' in this daemon (its GPUs: gpu0, gpu1," in missing.stderr


def test_bench_and_tune_help_show_one_set_of_defaults() -> None:
    for command in ("bench", "tune"):
        out = mpsd_cli(command, "--help")
        assert out.returncode == 0
        text = " ".join(out.stdout.split())  # argparse wraps lines
        assert "seconds measured (default: 10.0)" in text, text
        assert "seconds not counted (default: 3.0)" in text
        assert "(default: None)" not in text and "(default: False)" not in text


def test_bench_without_a_daemon_names_the_flag_that_starts_one(workdir: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    out = mpsd_cli("bench", "--url", f"http://127.0.0.1:{port}", "--duration", "1")
    assert out.returncode != 0
    assert "add --start to let bench start a private one" in out.stderr, out.stderr
    assert "give -c CONFIG" not in out.stderr
