"""A progress bar with an ETA for runs of known length, on stderr.

On a terminal the bar redraws in place; anywhere else (a log, CI) each step is one line, so the
output stays readable. The ETA comes from the planned seconds of the steps left, scaled by how
far the finished ones overran their plan (engine starts and reloads are the usual overrun).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """``total_s`` planned seconds of work; :meth:`step` after each piece with its plan."""

    def __init__(self, total_s: float, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.planned_left = total_s
        self.planned_done = 0.0
        self.started = time.monotonic()

    def eta(self) -> float:
        spent = time.monotonic() - self.started
        pace = spent / self.planned_done if self.planned_done else 1.0
        return self.planned_left * max(pace, 0.5)

    def step(self, planned_s: float, label: str) -> None:
        self.planned_done += planned_s
        self.planned_left = max(0.0, self.planned_left - planned_s)
        self.show(label)

    def show(self, label: str) -> None:
        whole = self.planned_done + self.planned_left
        share = self.planned_done / whole if whole else 1.0
        bar = "#" * int(WIDTH * share) + "." * (WIDTH - int(WIDTH * share))
        line = f"[{bar}] {share:4.0%}  ETA {clock(self.eta())}  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a start, a reload, a warning) above the bar."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
