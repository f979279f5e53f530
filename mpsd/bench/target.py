"""The mpsd under test: one already running, or a private one started for the run.

:class:`Running` reads a live daemon's ``/mpsd/status`` for its ready engines (their ports,
models and cores) and its PID. :class:`Temporary` starts ``mpsd run`` on a copy of a config whose
addresses and directories are private (a free proxy port, a free block of engine ports, its own
state and log directories), so it never disturbs a daemon already serving on this host; it can
then reload itself with more engines, which is how bench and tune add engines without a cold
start of the ones already up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpsd.bench import toml_writer
from mpsd.config import load_config
from mpsd.control import client as control_client


class TargetError(RuntimeError):
    """The daemon under test could not be reached, started or reloaded (the message says why)."""


@dataclass(frozen=True)
class Engine:
    """One ready engine, as the benchmark reaches it directly."""

    key: str
    model: str
    url: str
    cpus: tuple[int, ...]


@dataclass(frozen=True)
class Snapshot:
    """What the benchmark needs of a daemon at one moment."""

    url: str
    pid: int | None
    mps: bool
    engines: tuple[Engine, ...]
    failed: tuple[str, ...]  # "gpu0: reason" of every FAILED group

    def models(self) -> list[str]:
        return sorted({e.model for e in self.engines})


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/mpsd/status", timeout=timeout) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


def snapshot(url: str) -> Snapshot:
    """The daemon at ``url`` now; :class:`TargetError` when nothing (or no mpsd) answers."""
    try:
        status = fetch_status(url)
    except (OSError, ValueError) as exc:
        raise TargetError(f"no mpsd answers at {url}/mpsd/status ({exc}); start one "
                          "(mpsd run), or add --start to let bench start a private one from "
                          "the config") from None
    host = url.split("://", 1)[-1].rsplit(":", 1)[0]
    engines = tuple(
        Engine(e["key"], e["model"], f"http://{host}:{e['port']}", tuple(e.get("cpus", ())))
        for g in status.get("groups", []) for e in g.get("engines", []) if e.get("ready"))
    failed = tuple(f"{g['gpu']}: {g.get('reason', '')}" for g in status.get("groups", [])
                   if g.get("state") == "failed")
    pid = status.get("pid")
    return Snapshot(url, pid if isinstance(pid, int) else None,
                    bool(status.get("mps", {}).get("enabled")), engines, failed)


def vocab_size(engine_url: str, model: str) -> int:
    """The model's vocabulary size from the ``config.json`` beside the engine's weights (vLLM's
    ``/v1/models`` names the folder as ``root``); 0 when the engine or the file says nothing."""
    try:
        with urllib.request.urlopen(f"{engine_url}/v1/models", timeout=5) as resp:
            models = json.loads(resp.read()).get("data", [])
        root = next((m.get("root") for m in models if m.get("id") == model), None)
        config = json.loads((Path(str(root)) / "config.json").read_text()) if root else {}
        return int(config.get("vocab_size", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _engine_port_base() -> int:
    """A block of 64 ports below the ephemeral range that nothing listens on: the load
    generator's thousands of client sockets never take an engine's port before it binds."""
    for _ in range(50):
        base = 20000 + 64 * int.from_bytes(os.urandom(2), "big") % 12000 // 64 * 64
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + 8):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise TargetError("no free block of engine ports between 20000 and 32000")


class Temporary:
    """``mpsd run`` on a private copy of a config, stopped (engines and all) on :meth:`stop`."""

    def __init__(self, document: dict[str, Any], cpus: tuple[int, ...] = (),
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="mpsd-bench-"))
        self.port = free_port()
        self.cpus = cpus
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.file = self.workdir / "mpsd.toml"
        self.log_file = self.workdir / "mpsd.log"
        self.engine_port_base = _engine_port_base()
        self.document: dict[str, Any] = {}
        self.write(document)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, document: dict[str, Any]) -> None:
        """Write ``document`` with this run's private addresses and directories."""
        doc = {k: dict(v) if isinstance(v, dict) else v for k, v in document.items()}
        daemon = doc.setdefault("daemon", {})
        daemon.update(state_dir=str(self.workdir / "run"), log_dir=str(self.workdir / "log"),
                      log_format="json", engine_port_base=self.engine_port_base)
        doc.setdefault("proxy", {})["listen"] = f"127.0.0.1:{self.port}"
        doc["proxy"].pop("api_keys_file", None)
        self.document = doc
        self.file.write_text(toml_writer.dumps(doc))

    def start(self, timeout: float) -> Snapshot:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        cpus = self.cpus

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpsd", "run", "-c", str(self.file)], stdout=out,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=pin)  # noqa: PLW1509 - only sets the child's affinity
        return self.wait_ready(timeout)

    def planned(self) -> int:
        return sum(int(e.get("replicas", 1)) for g in self.document.get("gpu", [])
                   for e in g.get("engine", []))

    def wait_ready(self, timeout: float) -> Snapshot:
        """Until every planned engine is ready; a FAILED group or mpsd's exit ends it early."""
        want = self.planned()
        deadline = time.monotonic() + timeout
        shown = -1
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise TargetError(f"mpsd exited with status {self.proc.returncode} while "
                                  f"starting; its log: {self.log_file}\n{self.tail()}")
            with contextlib.suppress(TargetError):
                snap = snapshot(self.url)
                if snap.failed:
                    raise TargetError(f"{'; '.join(snap.failed)} (log: {self.log_file})")
                if len(snap.engines) != shown:
                    shown = len(snap.engines)
                    self.log(f"{shown}/{want} engines ready")
                if len(snap.engines) >= want:
                    return snap
            if time.monotonic() > deadline:
                raise TargetError(f"engines not ready after {timeout:.0f} s (log: "
                                  f"{self.log_file})\n{self.tail()}")
            time.sleep(0.2)

    def reload(self, document: dict[str, Any], timeout: float) -> Snapshot:
        """Apply ``document`` through the control socket; only changed engines restart."""
        self.write(document)
        sock = Path(self.document["daemon"]["state_dir"]) / "control.sock"
        try:
            code, body = control_client.request(sock, "POST", "/reload", timeout)
        except control_client.ControlUnavailable as exc:
            raise TargetError(f"reload: {exc}") from None
        if code != 200 or not body.get("ok", False):
            raise TargetError(f"reload failed: {body.get('error', f'HTTP {code}')}")
        return self.wait_ready(timeout)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, keep_log: Path | None = None) -> None:
        """SIGTERM, wait for the ordered stop, SIGKILL the session if it hangs; clean up."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if keep_log is not None:
            with contextlib.suppress(OSError):
                shutil.copy(self.log_file, keep_log)
        shutil.rmtree(self.workdir, ignore_errors=True)


def load_document(path: Path) -> dict[str, Any]:
    """An operator's config, validated and with its paths made absolute, as plain data: what a
    :class:`Temporary` copies. A bad file raises :class:`~mpsd.errors.ConfigError`."""
    return load_config(path).model_dump(mode="json")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads); None when it is gone or elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
