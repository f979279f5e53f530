"""The control socket end to end: a real Supervisor running a real (tiny) engine process, the
real ControlServer on a unix socket, and the CLI's client functions talking to it.

The engine is ``python -m http.server`` (kind ``command``, MPS off), so drain and restart stop
and start real processes. The client is blocking (the CLI's), so it runs in a worker thread
while the daemon side runs on the test's event loop. Waiting is polling with a deadline.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import aiohttp
import anyio
import pytest
import structlog

from mpsd.config import parse_config
from mpsd.control import client as control_client
from mpsd.control.server import ControlServer, ControlSocketError
from mpsd.control.text import ago, clean, ready_line, render
from mpsd.plan.build import HostFacts, build_plan
from mpsd.plan.cpus import cpu_list
from mpsd.pool import BackendPool
from mpsd.status import DaemonStatus, EngineStatus, GroupStatus
from mpsd.supervise.contract import GroupOptions
from mpsd.supervise.states import GroupState
from mpsd.supervise.supervisor import Supervisor
from tests.harness import REPO, free_ports, until

pytestmark = pytest.mark.anyio
ENGINE = "gpu0/web-0"
Reload = Callable[[], Awaitable[dict[str, Any]]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def events() -> Iterator[list[MutableMapping[str, Any]]]:
    """The daemon side's log events, kept off stdout (where the CLI's answers are read)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


def make_supervisor(workdir: Path, session: aiohttp.ClientSession) -> Supervisor:
    """One GPU group (MPS off) whose engine is a real HTTP server on a free port."""
    config = parse_config({
        "daemon": {"state_dir": str(workdir / "state"), "log_dir": str(workdir / "log")},
        "mps": {"enabled": "off"},
        "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
        "gpu": [{"device": "0", "engine": [{
            "model": "tiny", "name": "web", "kind": "command", "port": free_ports(1)[0],
            "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1",
                        "--directory", str(workdir)],
            "health_path": "/", "canary": "none", "cpu_affinity": "off",
            "health_interval_s": 0.5, "stop_timeout_s": 5, "startup_timeout_s": 30}]}],
    })
    plan = build_plan(config, HostFacts(inventory=None, mps_binary=None, cpus=(0, 1)), "f")
    options = GroupOptions(mps=config.mps, restart=config.restart, drain_timeout_s=1,
                           registry=None, environ={})
    return Supervisor(plan, options, BackendPool(), session)


def engine_pid(sup: Supervisor) -> int | None:
    group = sup.group("gpu0")
    engine = group.engines.get(ENGINE) if group else None
    return engine.pid if engine else None


def running(sup: Supervisor) -> bool:
    group = sup.group("gpu0")
    return bool(group and group.state is GroupState.RUNNING and sup.pool.routable_count() == 1)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def ok_reload() -> dict[str, Any]:
    return {"ok": True, "unchanged": ["gpu0"], "changed": [], "removed": [], "added": []}


@dataclass
class Daemon:
    sup: Supervisor
    server: ControlServer
    sock: Path


@asynccontextmanager
async def daemon(workdir: Path, reload: Reload = ok_reload,
                 start_groups: bool = True) -> AsyncIterator[Daemon]:
    """Supervisor + ControlServer; everything stopped (and awaited) on the way out."""
    sock = workdir / "state" / "control.sock"
    async with aiohttp.ClientSession() as session:
        sup = make_supervisor(workdir, session)
        server = ControlServer(sock, sup, reload)
        async with anyio.create_task_group() as tg:
            if start_groups:
                tg.start_soon(sup.run)
            try:
                await server.start()
                if start_groups:
                    await until(lambda: running(sup), 20.0, "gpu0 running")
                yield Daemon(sup, server, sock)
            finally:
                await server.stop()
                sup.stop()


async def call(fn: Callable[..., int], *args: Any) -> int:
    return await anyio.to_thread.run_sync(fn, *args)


# -- the daemon side through the CLI's functions ---------------------------------------------


async def test_status_json_text_and_colours(workdir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    async with daemon(workdir) as d:
        assert await call(control_client.status, d.sock, True, False) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["status"] == "1/1 GPUs running, 1/1 engines ready"
        (group,) = body["groups"]
        assert group["gpu"] == "gpu0" and group["state"] == "running"
        (engine,) = group["engines"]
        assert engine["key"] == ENGINE and engine["ready"] is True
        assert engine["pid"] == engine_pid(d.sup) and engine["pid"] is not None
        # the served document is exactly the typed contract (mpsd/status.py)
        assert body.keys() == get_type_hints(DaemonStatus).keys()
        assert group.keys() == get_type_hints(GroupStatus).keys()
        assert engine.keys() == get_type_hints(EngineStatus).keys()

        assert await call(control_client.status, d.sock, False, False) == 0
        text = capsys.readouterr().out
        assert text.startswith("\u25cf mpsd - 1/1 GPUs running, 1/1 engines ready")
        assert "State: running since" in text and ENGINE in text and "\033[" not in text
        assert "MPS: off" in text

        assert await call(control_client.status, d.sock, False, True) == 0
        coloured = capsys.readouterr().out
        assert "\033[32mrunning\033[0m" in coloured and "\033[32m\u25cf\033[0m" in coloured


async def test_drain_stops_the_group_and_restart_starts_it(
        workdir: Path, capsys: pytest.CaptureFixture[str],
        events: list[MutableMapping[str, Any]]) -> None:
    async with daemon(workdir) as d:
        first = engine_pid(d.sup)
        assert first is not None and alive(first)

        assert await call(control_client.drain, d.sock, "gpu0") == 0
        assert "gpu0: drained and stopped" in capsys.readouterr().out
        assert d.sup.groups["gpu0"].state is GroupState.STOPPED  # drain returns once stopped
        assert not alive(first)
        assert d.sup.pool.routable_count() == 0
        (audit,) = [e for e in events if e["event"] == "control_command"]
        assert audit["action"] == "drain" and audit["gpu"] == "gpu0"
        assert audit["peer_uid"] == os.getuid() and audit["peer_pid"] == os.getpid()

        assert await call(control_client.status, d.sock, False, False) == 0
        assert "State: stopped (drained) since" in capsys.readouterr().out

        assert await call(control_client.restart, d.sock, "0") == 0  # by device, too
        assert "gpu0: restarting" in capsys.readouterr().out
        await until(lambda: running(d.sup), 20.0, "gpu0 running again")
        second = engine_pid(d.sup)
        assert second is not None and second != first and alive(second)

        # restart of a running group: stopped safely, started again with a new process
        assert await call(control_client.restart, d.sock, "gpu0") == 0
        assert not alive(second)
        await until(lambda: running(d.sup), 20.0, "gpu0 running after the restart")
        assert engine_pid(d.sup) not in (None, second)


async def test_unknown_gpu_is_exit_1_with_the_supervisors_message(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with daemon(workdir, start_groups=False) as d:
        assert await call(control_client.restart, d.sock, "gpu9") == 1
        assert "mpsd: restart gpu9: no GPU 'gpu9'; known: gpu0" in capsys.readouterr().err
        assert await call(control_client.drain, d.sock, "a/b c") == 1
        assert "no GPU 'a/b c'" in capsys.readouterr().err
        code, body = await anyio.to_thread.run_sync(
            control_client.request, d.sock, "POST", "/gpus/gpu9/drain")
        assert code == 404 and body["ok"] is False
        code, body = await anyio.to_thread.run_sync(
            control_client.request, d.sock, "GET", "/nope")
        assert code == 404 and "Not Found" in body["error"]
        code, body = await anyio.to_thread.run_sync(
            control_client.request, d.sock, "GET", "/reload")
        assert code == 405


async def test_reload_results(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with daemon(workdir, start_groups=False) as d:
        assert await call(control_client.reload, d.sock) == 0
        assert capsys.readouterr().out.strip() == "reloaded: unchanged gpu0"

    async def rejected() -> dict[str, Any]:
        return {"ok": False, "error": "invalid config (f): bad. Fix: good"}

    async with daemon(workdir, reload=rejected, start_groups=False) as d:
        assert await call(control_client.reload, d.sock) == 1
        err = capsys.readouterr().err
        assert "reload failed: invalid config (f): bad. Fix: good" in err
        assert "previous config keeps running" in err

    async def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    async with daemon(workdir, reload=broken, start_groups=False) as d:
        assert await call(control_client.reload, d.sock) == 1
        assert "reload failed: RuntimeError: boom" in capsys.readouterr().err
        assert await call(control_client.status, d.sock, True, False) == 0  # still serving


# -- the socket file -------------------------------------------------------------------------


async def test_socket_mode_group_and_removal_on_stop(workdir: Path) -> None:
    async with daemon(workdir, start_groups=False) as d:
        st = d.sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert not d.sock.exists()


async def test_socket_group_is_set_when_the_group_exists(workdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's group to one we are not in needs root")
    target = next(g for g in ("daemon", "nogroup", "adm", "bin") if _gid(g) is not None)
    async with aiohttp.ClientSession() as session:
        sup = make_supervisor(workdir, session)
        server = ControlServer(workdir / "g.sock", sup, ok_reload, group=target)
        await server.start()
        try:
            assert (workdir / "g.sock").stat().st_gid == _gid(target)
        finally:
            await server.stop()
        missing = ControlServer(workdir / "m.sock", sup, ok_reload, group="no-such-group-x")
        await missing.start()  # a missing group is logged, never fatal
        await missing.stop()


def _gid(name: str) -> int | None:
    import grp  # noqa: PLC0415

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


async def test_stale_socket_is_replaced_and_a_live_one_refused(workdir: Path) -> None:
    sock = workdir / "state" / "control.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a crashed run's socket: the file exists, nobody listens
    stale.close()
    async with daemon(workdir, start_groups=False) as d:
        assert stat.S_IMODE(d.sock.stat().st_mode) == 0o660
        second = ControlServer(d.sock, d.sup, ok_reload)
        with pytest.raises(ControlSocketError, match="another mpsd is running"):
            await second.start()
        assert await call(control_client.status, d.sock, True, False) == 0  # untouched


async def test_a_file_that_is_not_a_socket_is_never_removed(workdir: Path) -> None:
    path = workdir / "control.sock"
    path.write_text("precious")
    async with aiohttp.ClientSession() as session:
        server = ControlServer(path, make_supervisor(workdir, session), ok_reload)
        with pytest.raises(ControlSocketError, match="is not a socket"):
            await server.start()
    assert path.read_text() == "precious"


# -- the client when the daemon cannot be reached --------------------------------------------


def test_not_running(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = workdir / "nope" / "control.sock"
    assert control_client.status(missing) == 1
    assert f"mpsd: mpsd is not running (no socket at {missing})" in capsys.readouterr().err
    assert control_client.drain(missing, "gpu0") == 1
    assert "mpsd is not running" in capsys.readouterr().err

    stale = workdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    assert control_client.reload(stale) == 1
    assert "mpsd is not running (nothing answers on" in capsys.readouterr().err


async def test_permission_denied_says_what_to_do(workdir: Path) -> None:
    async with daemon(workdir, start_groups=False) as d:
        if os.geteuid() == 0:
            code, err = await anyio.to_thread.run_sync(_status_as_nobody, workdir, d.sock)
        else:
            d.sock.chmod(0)
            code, err = await anyio.to_thread.run_sync(_status_stderr, d.sock)
        assert code == 1, err
        assert (f"cannot open {d.sock}: permission denied (are you in group mpsd? try sudo)"
                in err)


def _status_as_nobody(workdir: Path, sock: Path) -> tuple[int, str]:
    """Root passes any mode check: ask as nobody, who may reach the socket (the directories
    are opened up) but is neither its owner nor in its group. The child drops to nobody after
    its imports, because the interpreter may live in a home directory nobody cannot read."""
    nobody = pwd.getpwnam("nobody")
    workdir.chmod(0o755)
    sock.parent.chmod(0o755)
    script = ("import os, sys; from pathlib import Path; "
              "from mpsd.control import client as control_client; "
              f"os.setgroups([]); os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid}); "
              "sys.exit(control_client.status(Path(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", script, str(sock)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stderr


def _status_stderr(sock: Path) -> tuple[int, str]:
    try:
        control_client.request(sock, "GET", "/status")
    except control_client.ControlUnavailable as exc:
        return 1, str(exc)
    return 0, ""


def test_resolve_socket(tmp_path: Path) -> None:
    assert control_client.resolve_socket("/x/y.sock", "ignored") == Path("/x/y.sock")
    file = tmp_path / "mpsd.toml"
    file.write_text('[daemon]\nstate_dir = "/srv/mpsd"\n[[gpu]]\nnot valid yet = \n')
    assert control_client.resolve_socket(None, str(file)) == Path("/run/mpsd/control.sock")
    file.write_text('[daemon]\nstate_dir = "/srv/mpsd"\n[[gpu]]\ndevice = 0\n')  # invalid
    assert control_client.resolve_socket(None, str(file)) == Path("/srv/mpsd/control.sock")
    assert control_client.resolve_socket(None, str(tmp_path / "missing.toml")) == Path(
        "/run/mpsd/control.sock")
    file.write_text('[daemon]\nstate_dir = "../run"\n')  # from the file's directory
    expected = tmp_path.parent / "run" / "control.sock"
    assert control_client.resolve_socket(None, str(file)) == expected


# -- rendering (pure) ------------------------------------------------------------------------


def canned(now: float) -> dict[str, Any]:
    return {
        "status": "1/2 GPUs running, 2/3 engines ready; gpu1 FAILED: crash loop",
        "mps": {"enabled": True, "reason": "MPS on (nvidia-cuda-mps-control)"},
        "groups": [
            {"gpu": "gpu0", "device": "0", "uuid": "GPU-0000", "state": "running",
             "since": now - 185, "reason": "2 engines ready", "restarts_in_window": 1,
             "history": [{"at": now - 100 * i, "signal": "health", "engine": "gpu0/q-1",
                          "reason": f"fault {i}"} for i in range(7, 0, -1)],
             "mps": {"pid": 4242, "pipe_dir": "/p",
                     "applied": {"default_active_thread_percentage": "100"}},
             "engines": [
                 {"key": "gpu0/q-0", "port": 18100, "pid": 5001, "cpus": [0, 1, 2, 5],
                  "ready": True, "inflight": 12},
                 {"key": "gpu0/q-1", "port": 18101, "pid": 5002, "cpus": [],
                  "ready": False, "inflight": 0}]},
            {"gpu": "gpu1", "device": "1", "state": "failed", "since": now - 7200,
             "reason": "crash loop: \033[2Jexited\nagain",
             "engines": [{"key": "gpu1/q-0"}]},
        ],
    }


def test_render_layout() -> None:
    now = 1_800_000_000.0
    text = render(canned(now), color=False, now=now)
    lines = text.splitlines()
    assert lines[0] == "\u25cf mpsd - 1/2 GPUs running, 2/3 engines ready; gpu1 FAILED: crash loop"
    assert lines[1] == "     MPS: MPS on (nvidia-cuda-mps-control)"
    assert "\u25cf gpu0 - device 0 (GPU-0000)" in lines
    assert any(ln.startswith("     State: running since ") and ln.endswith("; 3 min ago")
               for ln in lines)
    assert "       MPS: pid 4242 (default_active_thread_percentage=100)" in lines
    assert "    ENGINE     PID   PORT  READY  IN-FLIGHT  CORES" in lines
    assert "    gpu0/q-0  5001  18100  yes           12  0-2,5" in lines
    assert "    gpu0/q-1  5002  18101  no             0  -" in lines
    assert "  Last restarts (2 earlier not shown):" in lines
    assert sum("health gpu0/q-1: fault" in ln for ln in lines) == 5
    assert lines.index("  Last restarts (2 earlier not shown):") < next(
        i for i, ln in enumerate(lines) if "fault 1" in ln)
    # gpu1 came from a daemon that sends fewer fields: shown with what it has, no traceback
    assert "\u25cf gpu1 - device 1" in lines
    assert "    Reason: crash loop: ?[2Jexited again" in lines  # no escape reaches the terminal
    assert "    gpu1/q-0    -     -  no             0  -" in lines
    assert "\033" not in text


def test_render_colours_states() -> None:
    now = 1_800_000_000.0
    text = render(canned(now), color=True, now=now)
    assert text.startswith("\033[31m\u25cf\033[0m mpsd")  # a failed GPU makes the dot red
    assert "\033[32mrunning\033[0m" in text and "\033[31mfailed\033[0m" in text
    assert "\033[32myes\033[0m" in text and "\033[33mno\033[0m" in text
    plain = render(canned(now), color=False, now=now).splitlines()
    engines = [ln for ln in text.splitlines() if "gpu0/q-" in ln and "health" not in ln]
    stripped = [ln.replace("\033[32m", "").replace("\033[33m", "").replace("\033[0m", "")
                for ln in engines]
    assert all(ln in plain for ln in stripped)  # colour does not move the columns
    starting = {"status": "", "groups": [{"state": "backoff"}, {"state": "running"}]}
    assert render(starting, color=True).startswith("\033[33m\u25cf")
    assert render({"groups": [{"state": "stopped"}]}, color=True).startswith("\033[90m\u25cf")
    assert "(no GPUs configured)" in render({})
    assert "     MPS: off (mps.enabled = \"off\")" in render(
        {"mps": {"enabled": False, "reason": 'mps.enabled = "off"'}}).splitlines()


@pytest.mark.parametrize(("seconds", "text"), [
    (-3, "just now"), (0.4, "just now"), (45, "45 s ago"), (60, "1 min ago"),
    (185, "3 min ago"), (3600, "1 h ago"), (3900, "1 h 5 min ago"), (86400, "1 day ago"),
    (2 * 86400 + 7200, "2 days 2 h ago"),
])
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


def test_cpu_list_and_clean() -> None:
    assert cpu_list([5, 0, 1, 2, 2, 9, 10]) == "0-2,5,9-10"
    assert cpu_list([]) == ""
    assert clean(None) == "-" and clean("") == "-" and clean(3) == "3"
    assert clean("a\tb\x1b[31mc\x9bd") == "a b?[31mc?d"


def test_ready_line_gives_a_request_that_a_shell_can_run() -> None:
    line = ready_line(2, 2, "0.0.0.0:8000", "it's", True, "1/1 GPUs running")
    assert line.startswith("ready: 2/2 engines \u2014 try: curl -s http://127.0.0.1:8000/v1/")
    assert "-H 'Authorization: Bearer KEY'" in line
    command = line.split("try: ", 1)[1]
    argv = shlex.split(command)
    assert json.loads(argv[-1]) == {"model": "it's", "prompt": "Hello", "max_tokens": 8}
    failed = ready_line(0, 2, "[::1]:8000", None, False, "0/1 GPUs running; gpu0 FAILED: x")
    assert failed == ("not ready: 0/2 engines serve (0/1 GPUs running; gpu0 FAILED: x); "
                      "see `mpsd status`")
