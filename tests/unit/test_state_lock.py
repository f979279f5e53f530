"""One owner per state directory: the lock refuses a second holder and names the first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpsd import state_lock
from mpsd.errors import MpsdError


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    state = tmp_path / "run" / "mpsd"  # created on the way
    held = state_lock.acquire(state)
    assert (state / state_lock.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    with pytest.raises(state_lock.StateDirBusy) as refused:
        state_lock.acquire(state)
    said = str(refused.value)
    assert f"PID {os.getpid()}" in said and f"kill {os.getpid()}" in said
    assert "systemctl stop mpsd" in said and str(state) in said
    held.release()
    state_lock.acquire(state).release()  # free again once the holder let go


def test_a_stale_pid_in_the_file_does_not_hold_the_directory(tmp_path: Path) -> None:
    """Only the kernel's lock counts: a file a dead owner left behind is taken over."""
    (tmp_path / state_lock.LOCK_NAME).write_text("999999999 and more\n")
    held = state_lock.acquire(tmp_path)
    assert (tmp_path / state_lock.LOCK_NAME).read_text() == f"{os.getpid()}\n"
    held.release()


def test_a_state_dir_that_cannot_be_created_says_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(MpsdError, match=r"cannot create the lock file .*daemon\.state_dir"):
        state_lock.acquire(tmp_path / "file" / "state")


def test_held_tells_an_owned_directory_without_taking_it(tmp_path: Path) -> None:
    assert not state_lock.held(tmp_path)  # no lock file
    owner = state_lock.acquire(tmp_path)
    assert state_lock.held(tmp_path)
    assert state_lock.held(tmp_path)  # asking twice takes nothing
    owner.release()
    assert not state_lock.held(tmp_path)  # the file is left; the lock is what counts
