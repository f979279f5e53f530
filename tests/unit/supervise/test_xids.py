"""The Xid policy: which Xids recover a group, which fail it, which are only logged."""

from __future__ import annotations

import pytest

from mpsd.supervise import xids


@pytest.mark.parametrize(
    ("xid", "expected"),
    [
        *[(x, "application") for x in (13, 31, 43, 45, 68, 109)],
        *[(x, "hardware") for x in (48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 121, 140, 154)],
        *[(x, "informational") for x in (0, 8, 32, 38, 69, 93, 999)],
    ],
)
def test_classify_xid(xid: int, expected: str) -> None:
    assert xids.classify_xid(xid) == expected


def test_every_hardware_xid_has_a_reason_and_no_overlap() -> None:
    assert all(reason.strip() for reason in xids.HARDWARE_XIDS.values())
    assert not xids.APPLICATION_XIDS & xids.HARDWARE_XIDS.keys()
