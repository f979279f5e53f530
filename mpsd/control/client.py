"""The CLI side of the control socket: ``mpsd status``, ``restart``, ``drain`` and ``reload``.

These commands talk to the running daemon over ``<state_dir>/control.sock`` (HTTP/JSON, see
:mod:`mpsd.control.server`). The client uses :mod:`http.client` over an ``AF_UNIX`` socket
rather than aiohttp: importing aiohttp alone costs a third of a second, and an operator types these
commands by hand. Every function prints one human answer and returns the exit code
(docs/architecture.md §7):
0 when the daemon did it, 1 when it refused, failed, or cannot be reached — with a message
saying which, because "connection refused" tells an operator nothing.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from mpsd.errors import ExitCode

SOCKET_NAME = "control.sock"
#: ``status`` must answer at once; a daemon that takes longer is stuck and the operator should
#: hear so rather than wait.
STATUS_TIMEOUT_S = 10.0
#: ``drain`` waits for in-flight requests and engine shutdown (``drain_timeout_s`` plus
#: ``stop_timeout_s`` per engine) and ``reload`` may stop several groups: allow for that.
ACTION_TIMEOUT_S = 900.0
_CONNECT_TIMEOUT_S = 5.0


class ControlUnavailable(Exception):
    """The daemon cannot be reached; the message is what the operator should read.

    ``not_running`` when nothing listens there at all (rather than a daemon that refused or
    hung): then the socket may simply be the wrong one.
    """

    def __init__(self, message: str, not_running: bool = False) -> None:
        super().__init__(message)
        self.not_running = not_running


def socket_path(state_dir: Path) -> Path:
    """Where the daemon whose ``[daemon] state_dir`` is ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


def resolve_socket(explicit: str | None, config_file: str) -> Path:
    """The socket for a CLI call: ``--socket``, else the config's ``[daemon] state_dir``
    (a relative one taken from the config file's directory, as ``mpsd run`` takes it).

    Only ``state_dir`` is read, without validating the rest of the file: ``mpsd status`` must
    keep working while the file holds an edit that is not valid yet (the running daemon still
    serves its previous config, and that is what the operator wants to see). A missing or
    unreadable file means the default directory.
    """
    if explicit:
        return Path(explicit)
    from mpsd.config import DaemonConfig, relative_to_file  # noqa: PLC0415 - pydantic on demand

    state_dir = DaemonConfig.model_fields["state_dir"].default
    try:
        raw = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return socket_path(Path(state_dir))
    daemon = raw.get("daemon")
    if isinstance(daemon, dict) and isinstance(daemon.get("state_dir"), str):
        state_dir = relative_to_file(daemon["state_dir"], config_file)
    return socket_path(Path(state_dir))


def not_running_hint(config_file: str, chosen_by: str, command: str) -> str:
    """What to tell an operator whose daemon was not found through ``config_file``:
    which config was read, why that one, and how to point the CLI elsewhere."""
    missing = "; the file does not exist" if not Path(config_file).exists() else ""
    return (f"  tried: [daemon] state_dir of {config_file} ({chosen_by}{missing})\n"
            f"  a daemon started with another config: mpsd {command} -c FILE, "
            "or export MPSD_CONFIG=FILE, or --socket PATH")


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the host name is only what goes into ``Host:``)."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("mpsd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_CONNECT_TIMEOUT_S)
            sock.connect(str(self._path))
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(path: Path, method: str, url: str,
            timeout: float | None = STATUS_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """One request to the daemon: (HTTP status, JSON object); :class:`ControlUnavailable` when
    it cannot be reached or does not answer with a JSON object."""
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, url, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    except FileNotFoundError:
        raise ControlUnavailable(f"mpsd is not running (no socket at {path})", True) from None
    except ConnectionRefusedError:
        raise ControlUnavailable(
            f"mpsd is not running (nothing answers on {path}; a stale socket)", True) from None
    except PermissionError:
        raise ControlUnavailable(
            f"cannot open {path}: permission denied (are you in group mpsd? try sudo)"
        ) from None
    except TimeoutError:
        within = _CONNECT_TIMEOUT_S if timeout is None else timeout
        raise ControlUnavailable(f"mpsd did not answer on {path} within {within:g} s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ControlUnavailable(f"cannot talk to mpsd on {path}: {exc}") from None
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ControlUnavailable(
            f"unexpected answer from {path} (HTTP {resp.status}): {raw[:200]!r}")
    return resp.status, body


def running_engine_ports(state_dir: Path) -> list[int] | None:
    """The ports of the engines of the daemon that owns ``state_dir``; None when none answers
    there (``check-config`` then takes every port in use as another program's)."""
    try:
        code, body = request(socket_path(state_dir), "GET", "/status")
    except ControlUnavailable:
        return None
    if code != 200:
        return None
    return [int(e["port"]) for g in body.get("groups", []) for e in g.get("engines", [])
            if isinstance(e, dict) and isinstance(e.get("port"), int)]


def _fail(message: str) -> int:
    print(f"mpsd: {message}", file=sys.stderr)
    return ExitCode.FAILURE


def _call(path: Path, method: str, url: str, timeout: float | None,
          hint: str) -> tuple[int, dict[str, Any]] | None:
    try:
        return request(path, method, url, timeout)
    except ControlUnavailable as exc:
        _fail(f"{exc}\n{hint}" if hint and exc.not_running else str(exc))
        return None


def status(socket_path: Path, as_json: bool = False, color: bool | None = None,
           hint: str = "", gpu: str | None = None) -> int:
    """``mpsd status [GPU] [--json]``: the systemctl-like view, or the daemon's raw JSON;
    with ``gpu`` (``gpu0``, a device index or a UUID) only that GPU's group.

    ``color=None`` colours only on a terminal (and never with ``NO_COLOR`` set). ``hint``
    (see :func:`not_running_hint`), in every command here, follows "mpsd is not running".
    """
    answer = _call(socket_path, "GET", "/status", STATUS_TIMEOUT_S, hint)
    if answer is None:
        return ExitCode.FAILURE
    code, body = answer
    if code != 200:
        return _fail(f"status failed: {body.get('error', f'HTTP {code}')}")
    if gpu is not None:
        groups = [g for g in body.get("groups", []) if isinstance(g, dict)]
        chosen = [g for g in groups if gpu in (g.get("gpu"), g.get("device"), g.get("uuid"))]
        if not chosen:
            known = ", ".join(str(g.get("gpu")) for g in groups) or "none"
            return _fail(f"no GPU {gpu!r} in this daemon (its GPUs: {known})")
        body = {**body, "groups": chosen}
    if as_json:
        print(json.dumps(body, indent=2))
        return ExitCode.OK
    from mpsd.control.text import render, use_color  # noqa: PLC0415 - only for the text view

    print(render(body, color=use_color(sys.stdout) if color is None else color))
    return ExitCode.OK


def _gpu_action(socket_path: Path, action: str, gpu: str,
                hint: str) -> tuple[int, dict[str, Any]] | None:
    url = f"/gpus/{urllib.parse.quote(gpu, safe='')}/{action}"
    answer = _call(socket_path, "POST", url, ACTION_TIMEOUT_S, hint)
    if answer is None:
        return None
    code, body = answer
    if code != 200 or not body.get("ok", False):
        _fail(f"{action} {gpu}: {body.get('error', f'HTTP {code}')}")
        return None
    return answer


def restart(socket_path: Path, gpu: str, hint: str = "") -> int:
    """``mpsd restart GPU``: a running GPU is stopped safely and started, a FAILED one forgets
    its crash history, a drained one starts again. Returns once the start has begun."""
    return _gpu_command(socket_path, "restart", gpu,
                        "{key}: restarting; `mpsd status` shows when it is running again", hint)


def drain(socket_path: Path, gpu: str, hint: str = "") -> int:
    """``mpsd drain GPU``: returns once the GPU's engines and MPS daemon have stopped."""
    return _gpu_command(socket_path, "drain", gpu,
                        "{key}: drained and stopped; `mpsd restart {key}` starts it again", hint)


def drain_all(socket_path: Path, hint: str = "") -> int:
    """``mpsd drain --all``: readiness (``/health``) turns 503 at once, requests are still
    served for ``proxy.unready_grace_s`` so that a load balancer notices, then every GPU drains
    and stops. Returns once all are stopped; the daemon keeps running."""
    answer = _call(socket_path, "POST", "/drain", ACTION_TIMEOUT_S, hint)
    if answer is None:
        return ExitCode.FAILURE
    code, body = answer
    if code != 200 or not body.get("ok", False):
        return _fail(f"drain --all: {body.get('error', f'HTTP {code}')}")
    gpus = ", ".join(map(str, body.get("gpus", [])))
    print(f"{gpus}: drained and stopped; the node is out of rotation "
          "(`mpsd restart GPU` starts one again)")
    return ExitCode.OK


def _gpu_command(socket_path: Path, action: str, gpu: str, done: str, hint: str) -> int:
    """Run ``action`` on ``gpu``; print ``done`` (with the group's key) and return the code."""
    answer = _gpu_action(socket_path, action, gpu, hint)
    if answer is None:
        return ExitCode.FAILURE
    print(done.format(key=answer[1].get("gpu", gpu)))
    return ExitCode.OK


def reload(socket_path: Path, hint: str = "") -> int:
    """``mpsd reload``: the daemon rereads its config; groups whose plan did not change keep
    serving. A rejected config leaves the old one running, and says why."""
    answer = _call(socket_path, "POST", "/reload", ACTION_TIMEOUT_S, hint)
    if answer is None:
        return ExitCode.FAILURE
    code, body = answer
    if code != 200 or not body.get("ok", False):
        kept = " (the previous config keeps running)" if body.get("kept", True) else ""
        return _fail(f"reload failed: {body.get('error', f'HTTP {code}')}{kept}")
    parts = [f"{what} {', '.join(map(str, keys))}"
             for what in ("unchanged", "changed", "removed", "added")
             if isinstance(keys := body.get(what), list) and keys]
    print("reloaded" + (": " + "; ".join(parts) if parts else ""))
    return ExitCode.OK
