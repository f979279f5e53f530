"""sd_notify for ``mpsd run`` under systemd (docs/architecture.md §7); every method is a no-op
without it.

What the daemon tells systemd, and when:

* ``READY=1`` once the proxy listens and every group is RUNNING or FAILED (:meth:`Notifier.ready`);
* ``EXTEND_TIMEOUT_USEC=`` while models load, so that ``TimeoutStartSec=`` need not cover the
  slowest possible start (:meth:`Notifier.extend_timeout`); the same message extends
  ``TimeoutStopSec=`` while a long drain is under way;
* ``STATUS=2/2 GPUs running, 4/4 engines ready`` on every group transition
  (:meth:`Notifier.status`);
* ``RELOADING=1`` + ``MONOTONIC_USEC=`` on SIGHUP, then ``READY=1`` when the reload is applied
  (:meth:`Notifier.reloading`);
* ``STOPPING=1`` when shutdown begins (:meth:`Notifier.stopping`);
* ``WATCHDOG=1`` from a task of the event loop, only while the supervisor says it is alive
  (:meth:`Notifier.watchdog`): a stalled loop or dead supervisor tasks starve the watchdog and
  systemd restarts the unit.

Why a plain socket and not :class:`sdnotify.SystemdNotifier`:
sdnotify reads ``os.environ`` only (the tests and the daemon pass an explicit mapping), uses a
*blocking* socket (a full notify queue would stall the event loop, and so the watchdog that is
meant to detect stalls), swallows every error silently (an operator should hear once that
notifications are lost), and knows nothing of ``WATCHDOG_USEC``/``WATCHDOG_PID``. What it does is
one ``socket()`` and one ``send()``; doing that here, non-blocking, costs a dozen lines.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Mapping

import anyio

from mpsd import logs

_log = logs.get("mpsd.systemd")


def _socket_address(value: str) -> str | bytes | None:
    """The address to ``sendto`` for a ``NOTIFY_SOCKET`` value, or ``None`` if unusable.

    ``@name`` is Linux's abstract namespace (a leading NUL byte on the wire), which systemd uses
    in some containers; a relative or other-family address (``vsock:…``) is not something this
    daemon is ever handed by a host's systemd, so it disables notifications with a warning.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` if it is meant for this process.

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for: a child that
    inherited the variables (or a process started by a script under the unit) must not ping.
    """
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid and (not raw_pid.isdigit() or int(raw_pid) != os.getpid()):
        return None
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    return int(raw)


class Notifier:
    """Sends sd_notify datagrams to ``NOTIFY_SOCKET``; without it every call does nothing.

    Sending never blocks and never raises into the caller: systemd's queue being full or the
    socket being gone must not take the daemon down. The first failure is logged as a warning,
    later ones at debug level (a lost ``STATUS=`` is not worth a log line per transition).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            _log.warning("notify_socket_unsupported", notify_socket=raw)
        self._sock: socket.socket | None = None
        if self._address is not None:
            # Non-blocking: a stalled systemd must not stall the event loop (see module doc).
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.enabled: bool = self._sock is not None
        self._watchdog_usec = _watchdog_usec(env) if self.enabled else None
        self._warned = False

    # messages -----------------------------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """``READY=1``: start-up (or a reload) is complete."""
        self._send("READY=1", status)

    def status(self, line: str) -> None:
        """``STATUS=``: the one line ``systemctl status`` shows."""
        self._send(f"STATUS={_one_line(line)}")

    def extend_timeout(self, seconds: float) -> None:
        """``EXTEND_TIMEOUT_USEC=``: the current start/stop needs ``seconds`` more from now.

        systemd fails the unit only if no further extension arrives in time *and* the original
        ``TimeoutStartSec=``/``TimeoutStopSec=`` has passed, so call this again before it runs out.
        """
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC=``: a reload began; ``ready()`` ends it.

        The timestamp (``CLOCK_MONOTONIC``, as systemd reads it) lets systemd ≥ 253 tie this
        message to the reload it requested and not to an older one.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``: shutdown began (``systemctl status`` shows *deactivating*)."""
        self._send("STOPPING=1", status)

    # watchdog -----------------------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``WATCHDOG_USEC`` (systemd's advice), or ``None``."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    async def watchdog(self, alive: Callable[[], bool]) -> None:
        """Ping ``WATCHDOG=1`` every interval while ``alive()`` is true; forever.

        Run it as a task of the daemon's event loop, next to the supervisor: because the ping is
        sent *from* the loop, a blocked loop sends nothing; because it asks ``alive()`` (whether
        the supervisor's own tasks still run) first, a wedged supervisor sends nothing either. In
        both cases systemd's ``WatchdogSec=`` fires and the unit is restarted. An ``alive()`` that
        raises counts as not alive. Returns at once when there is no watchdog to feed.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        starving = False
        while True:
            try:
                ok = bool(alive())
            except Exception:  # the check itself failing is a reason to starve, not to crash
                _log.exception("watchdog_check_failed")
                ok = False
            if ok:
                if starving:
                    _log.info("watchdog_resumed")
                self._send("WATCHDOG=1")
            elif not starving:
                _log.warning("watchdog_starved", detail="supervisor not alive; not pinging")
            starving = not ok
            await anyio.sleep(interval)

    # plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (later calls are no-ops)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str, status: str | None = None) -> None:
        if self._sock is None or self._address is None:
            return
        if status is not None:
            message += f"\nSTATUS={_one_line(status)}"
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, str(exc))
            if self._warned:
                _log.debug("sd_notify_failed", message=message, error=reason)
            else:
                self._warned = True
                _log.warning("sd_notify_failed", message=message, error=reason,
                             detail="systemd may not see readiness/status/watchdog; "
                                    "further failures are logged at debug level")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _one_line(text: str) -> str:
    """A notify value must not contain a newline (it would start a new ``KEY=``)."""
    return " ".join(text.splitlines())
