"""sd_notify: the exact datagrams systemd would receive, through a real AF_UNIX socket.

A listener bound in a temp dir plays systemd's notify socket. Tests wait for datagrams with a
deadline (``recv`` with a timeout), never sleep to synchronise.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from mpsd.observe.systemd import Notifier

DEADLINE_S = 5.0


class Listener:
    """A bound SOCK_DGRAM socket standing in for systemd's ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def recv(self, timeout: float = DEADLINE_S) -> str:
        """The next datagram, or a test failure after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            pytest.fail(f"no datagram within {timeout}s")

    def pending(self) -> list[str]:
        """Every datagram already queued (non-blocking)."""
        self.sock.setblocking(False)
        out: list[str] = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out

    async def arecv(self) -> str:
        """``recv`` for async tests: waits for readability on the loop, with a deadline."""
        with anyio.fail_after(DEADLINE_S):
            await anyio.wait_readable(self.sock)
        return self.sock.recv(4096).decode()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # A short path: sun_path holds 108 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="mpsd-sd-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[tuple[Listener, str]]:
    address = str(sock_dir / "notify")
    lis = Listener(address)
    yield lis, address
    lis.sock.close()


def notifier(address: str, **extra: str) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": address, **extra})


def test_ready_with_and_without_status(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    n = notifier(address)
    assert n.enabled
    n.ready()
    assert lis.recv() == "READY=1"
    n.ready("2/2 GPUs running, 4/4 engines ready")
    assert lis.recv() == "READY=1\nSTATUS=2/2 GPUs running, 4/4 engines ready"


def test_status_is_one_line(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    n = notifier(address)
    n.status("1/2 GPUs running, 2/4 engines ready")
    assert lis.recv() == "STATUS=1/2 GPUs running, 2/4 engines ready"
    n.status("gpu0 FAILED: boom\nREADY=1")
    assert lis.recv() == "STATUS=gpu0 FAILED: boom READY=1"


@pytest.mark.parametrize(("seconds", "usec"), [(900, 900_000_000), (1.5, 1_500_000), (0, 0),
                                                (-3, 0)])
def test_extend_timeout(listener: tuple[Listener, str], seconds: float, usec: int) -> None:
    lis, address = listener
    notifier(address).extend_timeout(seconds)
    assert lis.recv() == f"EXTEND_TIMEOUT_USEC={usec}"


def test_reloading_carries_monotonic_usec(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    before = time.monotonic_ns() // 1000
    notifier(address).reloading()
    after = time.monotonic_ns() // 1000
    first, second = lis.recv().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    n = notifier(address)
    n.stopping()
    assert lis.recv() == "STOPPING=1"
    n.stopping("stopping 2 GPUs")
    assert lis.recv() == "STOPPING=1\nSTATUS=stopping 2 GPUs"


def test_abstract_namespace_socket() -> None:
    name = f"mpsd-test-{uuid.uuid4().hex}"
    lis = Listener(b"\0" + name.encode())
    try:
        n = notifier(f"@{name}")
        assert n.enabled
        n.ready()
        assert lis.recv() == "READY=1"
    finally:
        lis.sock.close()


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for n in (Notifier({}), Notifier({"WATCHDOG_USEC": "30000000"}), Notifier()):
        assert not n.enabled
        assert n.watchdog_interval() is None
        n.ready("x")
        n.status("x")
        n.extend_timeout(1)
        n.reloading()
        n.stopping()
        anyio.run(n.watchdog, lambda: True)  # returns at once: nothing to feed


def test_unsupported_address_disables() -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000"})
    assert not n.enabled
    assert n.watchdog_interval() is None
    n.ready()


def test_send_failure_never_raises_and_warns_once(sock_dir: Path) -> None:
    n = notifier(str(sock_dir / "nobody-listens"))
    assert n.enabled
    with capture_logs() as events:
        n.ready()  # ENOENT: logged, not raised
        n.status("again")
        n.status("and again")
    assert [e["log_level"] for e in events] == ["warning", "debug", "debug"]
    assert events[0]["event"] == "sd_notify_failed"
    assert events[0]["error"] == "ENOENT"
    n.close()
    n.ready()  # closed: a no-op


def test_full_queue_does_not_block(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    lis.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    n = notifier(address)
    start = time.monotonic()
    with capture_logs() as events:
        for _ in range(2_000):  # far beyond the tiny receive queue: EAGAIN, dropped, no block
            n.status("x" * 200)
    assert time.monotonic() - start < DEADLINE_S
    assert events[0]["error"] == "EAGAIN"
    assert lis.pending()


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({}, None),
])
def test_watchdog_interval(listener: tuple[Listener, str], env: dict[str, str],
                           interval: float | None) -> None:
    _, address = listener
    assert notifier(address, **env).watchdog_interval() == interval


def test_watchdog_of_another_pid_sends_nothing(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    n = notifier(address, WATCHDOG_USEC="20000", WATCHDOG_PID=str(os.getpid() + 1))

    async def main() -> None:
        with anyio.fail_after(DEADLINE_S):
            await n.watchdog(lambda: True)  # returns at once
        n.ready()  # a marker: had the watchdog pinged, its datagram would come first

    anyio.run(main)
    assert lis.recv() == "READY=1"


class Probe:
    """An ``alive()`` for the watchdog that counts its calls and can be told to fail."""

    def __init__(self) -> None:
        self.alive = True
        self.raises = False
        self.calls = 0
        self.wanted = 0
        self.reached: anyio.Event | None = None

    def __call__(self) -> bool:
        self.calls += 1
        if self.reached is not None and self.calls >= self.wanted:
            self.reached.set()
        if self.raises:
            raise RuntimeError("supervisor gone")
        return self.alive

    async def more_calls(self, count: int) -> None:
        """Until the watchdog has asked ``count`` more times (with a deadline)."""
        self.reached = anyio.Event()
        self.wanted = self.calls + count
        with anyio.fail_after(DEADLINE_S):
            await self.reached.wait()


def test_watchdog_pings_only_while_alive(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    n = notifier(address, WATCHDOG_USEC="20000", WATCHDOG_PID=str(os.getpid()))  # every 10 ms
    probe = Probe()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(n.watchdog, probe)
            for _ in range(3):  # alive: pings arrive
                assert await lis.arecv() == "WATCHDOG=1"
            probe.alive = False
            lis.pending()  # drop pings sent before the switch (no await since: none after it)
            await probe.more_calls(5)  # the watchdog asked five times more...
            assert lis.pending() == []  # ...and sent nothing
            probe.alive = True
            assert await lis.arecv() == "WATCHDOG=1"  # alive again: pings resume
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_watchdog_check_that_raises_starves(listener: tuple[Listener, str]) -> None:
    lis, address = listener
    n = notifier(address, WATCHDOG_USEC="20000")
    probe = Probe()
    probe.raises = True

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(n.watchdog, probe)
            await probe.more_calls(3)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert lis.pending() == []
