"""Fixtures shared by every test: a short work directory and the no-leftover-process check."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Mpsd, processes_mentioning


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory with a short path (MPS pipe sockets must fit in sun_path)."""
    path = Path(tempfile.mkdtemp(prefix="mpsd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test that leaves a process behind (found by its work directory)."""
    if "workdir" not in request.fixturenames:
        yield
        return
    workdir: Path = request.getfixturevalue("workdir")
    yield
    # children told to die by PR_SET_PDEATHSIG get a moment to finish exiting
    deadline = time.monotonic() + 5
    while (leaked := list(processes_mentioning(str(workdir)))) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes outlived the test: {leaked}"


@pytest.fixture
def mpsd(workdir: Path) -> Iterator[Mpsd]:
    """An unstarted ``mpsd run`` (configure, then ``.start()``); killed if the test did not."""
    daemon = Mpsd(workdir)
    yield daemon
    daemon.kill()
    # every test that runs mpsd is part of the fault matrix: no group may try an illegal edge
    assert not daemon.events("illegal_transition"), daemon.events("illegal_transition")
