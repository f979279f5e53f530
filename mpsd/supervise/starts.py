"""An engine's previous start, kept so that a much slower start can say which phase grew.

A cold compile cache, a slow disk or a busy host each make one phase of a start longer
(``compile``, ``weights``, ``process``): the operator is told which, against the engine's last
start. The phases of that start are one small JSON file per engine under
``state_dir/starts/`` (written best effort), so a restart of mpsd compares with the start
before it too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

#: "Much slower": at least this many times the previous start, and ...
SLOWER_RATIO = 1.5
#: ... this many seconds more (a start of a tiny model varies by a second or two).
SLOWER_MIN_S = 2.0


def load(path: Path) -> dict[str, float] | None:
    """The phases saved at ``path``; None when there are none (or they cannot be read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}


def save(path: Path, phases: Mapping[str, float]) -> None:
    """Replace what ``path`` holds, atomically; a state directory that refuses is ignored
    (the comparison is advice, never a reason to fail a start)."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(phases)))
        tmp.replace(path)


def grown(before: Mapping[str, float],
          after: Mapping[str, float]) -> tuple[str, float, float] | None:
    """``(phase, seconds before, seconds now)`` of the phase that grew most, when the whole
    start took :data:`SLOWER_RATIO` times and :data:`SLOWER_MIN_S` more than ``before``."""
    then, now = sum(before.values()), sum(after.values())
    if now < then * SLOWER_RATIO or now - then < SLOWER_MIN_S:
        return None
    name = max(after, key=lambda phase: after[phase] - before.get(phase, 0.0))
    return name, before.get(name, 0.0), after[name]
