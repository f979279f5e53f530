"""``mpsd status`` after ``mpsd drain gpu0``: the GPU reads as drained on purpose, not stopped
for an unknown reason, and says how to bring it back."""

from __future__ import annotations

import time

from mpsd.control.text import render


def group(drained: bool) -> dict[str, object]:
    return {"gpu": "gpu0", "device": "0", "state": "stopped", "since": time.time(),
            "reason": "stopped", "desired": {"generation": 1, "drained": drained,
                                             "verdict": None},
            "engines": [], "history": []}


def test_a_drained_gpu_says_so_and_how_to_undo_it() -> None:
    shown = render({"status": "0/1 GPUs running", "groups": [group(drained=True)]})
    assert "State: stopped (drained) since" in shown
    assert "Reason: drained by an operator; `mpsd restart gpu0` starts it again" in shown
    assert "Reason: stopped" not in shown
    plain = render({"status": "0/1 GPUs running", "groups": [group(drained=False)]})
    assert "Reason: stopped" in plain and "drained" not in plain
