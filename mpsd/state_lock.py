"""One ``mpsd run`` per state directory: an exclusive ``flock`` on ``state_dir/mpsd.lock``.

Two daemons on one state directory would share the MPS pipe directories, the control socket and
the record of child process groups: the second one would reap the first one's live engines as
"leftovers". The lock is taken before anything else, so a second ``mpsd run`` refuses at once
and touches nothing. The kernel drops the lock when its holder dies, however it dies, so the
next owner knows the previous one is really gone and may reap what it left. The file holds the
owner's PID, to say who holds it; the lock, not the file's presence, is what counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from mpsd.errors import MpsdError

LOCK_NAME = "mpsd.lock"


class StateDirBusy(MpsdError):
    """Another live process holds the state directory's lock."""


class StateLock:
    """The held lock; it lasts as long as this object's file stays open (or the process)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def release(self) -> None:
        """Close the file, which drops the lock (the file stays: removing it would race a
        next owner that already opened it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.release()


def acquire(state_dir: Path) -> StateLock:
    """Take ``state_dir``'s lock and write our PID into it; :class:`StateDirBusy` if another
    process holds it, :class:`MpsdError` if the directory cannot hold a lock at all."""
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise MpsdError(f"cannot create the lock file {path} in daemon.state_dir: "
                        f"{exc.strerror}; make the directory writable for mpsd's user") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise MpsdError(f"cannot lock {path}: {exc.strerror}") from exc
        raise StateDirBusy(busy_message(state_dir, path)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)


def held(state_dir: Path) -> bool:
    """Whether a live process owns ``state_dir`` now (read-only: for ``check-config``, which
    may run as a user who cannot write there, and must never take the lock itself)."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EACCES)
    finally:
        os.close(fd)  # also drops the shared lock, if it was taken
    return False


def busy_message(state_dir: Path, path: Path) -> str:
    """Who holds the lock and how to stop it, in one paragraph."""
    pid = _holder_pid(path)
    if pid is None:  # the holder had not written its PID yet
        return (f"another mpsd already runs with daemon.state_dir {state_dir} (it holds "
                f"{path}); stop it first (`systemctl stop mpsd` if it is the service)")
    command = _command_line(pid)
    unit = _systemd_unit(pid)
    how = (f"`systemctl stop {unit}`" if unit
           else f"`systemctl stop mpsd` if it is the service, else `kill {pid}`")
    return (f"another mpsd already runs with daemon.state_dir {state_dir}: PID {pid}"
            f"{f' ({command})' if command else ''} holds {path}. One mpsd per state directory: "
            f"stop that one first ({how}), or give this one another daemon.state_dir")


def _holder_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def _command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return ""


def _systemd_unit(pid: int) -> str | None:
    """The mpsd service unit ``pid`` runs in (from its cgroup), if any: never another unit's
    name, which ``systemctl stop`` would take down instead."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            leaf = line.rpartition("/")[2]
            if leaf.startswith("mpsd") and leaf.endswith(".service"):
                return leaf
    return None
