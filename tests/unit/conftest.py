"""Fixtures of the unit tests that run fake processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_fakes import Rig


@pytest.fixture
def rig(workdir: Path) -> Iterator[Rig]:
    """Fake engines and MPS daemons of one test, all stopped at its end."""
    r = Rig(workdir)
    try:
        yield r
    finally:
        r.cleanup()
