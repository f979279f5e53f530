"""Run one schedule against a fresh ``mpsd run`` and say what broke, with a replay command.

A schedule stops at its first step whose invariants fail (later steps would only pile up on
the same fault), then still stops mpsd with SIGTERM and checks the stop: exit 0 within its
bound and no process left. The report names the seed, the steps that ran, the violations, a
log excerpt and the one line that replays it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.explorer.invariants import SETTLE_S, idle, log_clean, requests_ok, settle
from tests.explorer.steps import STEPS, Effect, Step, generate
from tests.explorer.world import STOP_BOUND_S, World
from tests.harness import wait_until


@dataclass
class Schedule:
    """What to run: steps on a 2-GPU config with MPS on or off; ``name`` for fixed ones."""

    steps: list[Step]
    mps: str = "on"
    seed: int | None = None
    name: str = ""
    replicas: int = 2

    @classmethod
    def seeded(cls, seed: int, mps: str, steps: int) -> Schedule:
        return cls(generate(seed, mps, steps), mps=mps, seed=seed)

    def replay(self) -> str:
        if self.seed is not None:
            return (f"python -m tests.explorer --seed {self.seed} --mps {self.mps} "
                    f"--steps {len(self.steps) - 1}")
        plan = ",".join(map(str, self.steps))
        return (f"python -m tests.explorer --mps {self.mps} --replicas {self.replicas} "
                f"--plan '{plan}'")


@dataclass
class Report:
    schedule: Schedule
    ran: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    failed_step: str = ""
    excerpt: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def text(self) -> str:
        s = self.schedule
        head = f"schedule {s.name or f'seed={s.seed}'} mps={s.mps}: "
        if self.ok:
            return head + f"ok in {self.seconds:.0f} s: " + " -> ".join(self.ran)
        lines = [head + f"FAILED at {self.failed_step}",
                 "  steps: " + " -> ".join(self.ran),
                 *(f"  - {v}" for v in self.violations),
                 f"  replay: {s.replay()}"]
        if self.excerpt:
            lines += ["  log:", *(f"    {line}" for line in self.excerpt.splitlines())]
        return "\n".join(lines)


def _excerpt(w: World, since: float, lines: int = 16) -> str:
    """What mpsd decided from ``since`` (epoch seconds) on: its warnings, errors and state
    changes, and any line that is not JSON (a traceback)."""
    keep: list[str] = []
    for line in w.m.log_file.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            keep.append(line)
            continue
        if '"level": "debug"' in line or not ('"warning"' in line or '"error"' in line
                                               or '"group_state"' in line):
            continue
        stamp = line.rpartition('"timestamp": "')[2][:26]
        with contextlib.suppress(ValueError):
            if datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp() < since:
                continue
        keep.append(line)
    return "\n".join(line[:240] for line in keep[:lines])


def run_schedule(schedule: Schedule, workdir: Path | None = None) -> Report:
    """Run ``schedule`` in ``workdir`` (a fresh temporary one if None, removed afterwards)."""
    own = workdir is None
    path = workdir or Path(tempfile.mkdtemp(prefix="mpsd-x"))
    report = Report(schedule)
    started = time.monotonic()
    w = World(path, mps=schedule.mps, replicas=schedule.replicas)
    try:
        _run(w, schedule, report)
    finally:
        w.teardown()
        report.seconds = time.monotonic() - started
        if own:
            shutil.rmtree(path, ignore_errors=True)
    return report


def _run(w: World, schedule: Schedule, report: Report) -> None:
    w.start()
    found = settle(w, [], bound=SETTLE_S)
    if found:
        report.failed_step, report.violations = "start", found
        report.excerpt = _excerpt(w, 0.0)
        return
    w.start_load()
    seen: dict[int, int] = {}
    steps = list(schedule.steps)
    if not steps or steps[-1].kind != "sigterm":
        steps.append(Step("sigterm"))
    *middle, last = steps
    for i, step in enumerate(middle):
        overlap = last.arg if i == len(middle) - 1 else 0.0
        report.ran.append(str(step))
        if overlap:
            timer = threading.Timer(overlap, w.sigterm)
            timer.start()
            _act(w, step)
            timer.join()
            report.ran.append(str(last))
            break
        t0, t_step = time.monotonic(), time.time() - 1.0
        effect = _act(w, step)
        found = effect.violations + settle(w, effect.checks)
        w.disturb(effect.disturbs)  # mending the fault may disturb its GPU again
        for cleanup in effect.cleanup:
            cleanup()
        if effect.cleanup and not found:
            found = settle(w, [])
        found += requests_ok(w, seen)
        note = f"; {effect.note}" if effect.note else ""
        report.ran[-1] += f" ({time.monotonic() - t0:.1f} s{note})"
        if found:
            report.failed_step, report.violations = str(step), found
            report.excerpt = _excerpt(w, t_step)
            break
    else:
        report.ran.append(str(last))
        w.stop_load()
        found = settle(w, [], bound=SETTLE_S) + requests_ok(w, seen) + log_clean(w)
        if not found:
            found = _poll(lambda: idle(w), 10)
        if found:
            report.failed_step, report.violations = "end", found
            report.excerpt = _excerpt(w, time.time() - SETTLE_S - 5)
        w.sigterm()
    w.stop_load()
    stop = _stopped(w)
    if stop:
        report.failed_step = report.failed_step or str(last)
        report.violations += stop
        report.excerpt = report.excerpt or _excerpt(w, w.stopping_at or 0.0)


def _act(w: World, step: Step) -> Effect:
    """Run one step; a step that raises (mpsd gone under it, say) is a finding of its own,
    except while SIGTERM is stopping mpsd under it on purpose."""
    started = time.time()
    try:
        effect = STEPS[step.kind](w, step)
    except Exception as exc:  # any error of a step is reported, not raised
        effect = Effect(disturbs=set(range(w.gpus)))
        if w.stopping_at is None:
            effect.violations.append(f"step {step} raised {exc!r}")
    w.disturb(effect.disturbs, started)
    return effect


def _poll(check: object, bound: float) -> list[str]:
    assert callable(check)
    deadline = time.monotonic() + bound
    while (found := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return list(found)


def _stopped(w: World) -> list[str]:
    """SIGTERM was sent (or is sent now): exit 0 within the bound, then no process left."""
    proc = w.m.proc
    assert proc is not None
    if proc.poll() is None and w.stopping_at is None:
        w.sigterm()
    out: list[str] = []
    try:
        code = proc.wait(STOP_BOUND_S)
        if code != 0:
            out.append(f"mpsd exited {code} after SIGTERM (want 0)")
    except subprocess.TimeoutExpired:
        out.append(f"mpsd did not exit within {STOP_BOUND_S:g} s of SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    try:
        wait_until(lambda: not [p for p in w.processes() if p.pid not in w.helpers], 5)
    except AssertionError:
        left = [f"{p.role} {p.pid}" for p in w.processes()]
        out.append(f"processes left after mpsd exited: {left}")
    return out
