"""`mpsd status` says where each engine's last start went, phase by phase."""

from __future__ import annotations

from typing import Any

from mpsd.control.text import render


def status(*engines: dict[str, Any]) -> dict[str, Any]:
    return {"status": "x", "groups": [{"gpu": "gpu0", "device": "0", "state": "running",
                                       "since": 0, "engines": list(engines)}]}


def test_each_engines_last_start_by_phase_and_one_under_way() -> None:
    text = render(status(
        {"key": "gpu0/q-0", "state": "ready",
         "phases": {"process": 19.2, "weights": 0.3, "compile": 46.7, "ready": 0.16}},
        {"key": "gpu0/q-1", "state": "starting", "phases": {"process": 9.0}},
        {"key": "gpu0/q-2", "state": "backoff"}), now=10)
    lines = text.splitlines()
    start = lines.index("  Last start:")
    assert lines[start + 1] == ("    gpu0/q-0  66.4 s: process 19.2 s, weights 0.3 s, "
                                "compile 46.7 s, ready 0.2 s")
    assert lines[start + 2] == "    gpu0/q-1  9.0 s so far: process 9.0 s"
    assert "gpu0/q-2" not in "\n".join(lines[start:])


def test_an_older_daemon_without_phases_shows_no_section() -> None:
    assert "Last start" not in render(status({"key": "gpu0/q-0", "phases": "junk"}), now=10)
