"""``mpsd status`` as text, laid out like ``systemctl status``.

Pure: takes the daemon's ``/status`` JSON (``Supervisor.status()``) and returns a string, so
every layout decision is unit-testable without a daemon. The JSON may come from a different
mpsd version than this CLI (an upgrade installs the new CLI before the daemon restarts), so
every field is optional here and a missing one is shown as ``-``, never a traceback. Strings
from the daemon carry engine output (fault reasons) and are stripped of control characters
before they reach the operator's terminal.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from mpsd.plan.cpus import cpu_list
from mpsd.status import DaemonStatus

DOT = "\u25cf"
HISTORY_SHOWN = 5

_RESET = "\033[0m"
_BOLD = "\033[1m"
_GREEN, _YELLOW, _RED, _GREY = "\033[32m", "\033[33m", "\033[31m", "\033[90m"
_STATE_COLOR = {
    "running": _GREEN,
    "starting": _YELLOW,
    "recovering": _YELLOW,
    "backoff": _YELLOW,
    "stopping": _YELLOW,
    "failed": _RED,
    "stopped": _GREY,
}


def use_color(stream: TextIO) -> bool:
    """Colour on a terminal only, and never when ``NO_COLOR`` is set or ``TERM=dumb``."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def ago(seconds: float) -> str:
    """A duration in the past as people say it: ``45 s ago``, ``3 min ago``, ``2 h 5 min ago``."""
    s = max(0, int(seconds))
    if s < 1:
        return "just now"
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min ago" if m else f"{h} h ago"
    d, h = divmod(s // 3600, 24)
    return f"{d} day{'s' if d > 1 else ''} {h} h ago" if h else f"{d} day{'s' if d > 1 else ''} ago"


def clean(value: object) -> str:
    """A daemon-supplied value as one safe line: no escape sequences, no line breaks."""
    text = "-" if value is None or value == "" else str(value)
    return "".join(ch if ch.isprintable() else " " if ch in "\t\r\n" else "?" for ch in text)


class _Paint:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self.enabled and code else text

    def state(self, state: str) -> str:
        return self(state, _STATE_COLOR.get(state, ""))

    def dot(self, state: str) -> str:
        return self(DOT, _STATE_COLOR.get(state, ""))


def _overall(groups: Sequence[Mapping[str, Any]]) -> str:
    """The state whose colour the first line's dot takes."""
    states = [str(g.get("state", "")) for g in groups]
    if any(s == "failed" for s in states):
        return "failed"
    if states and all(s == "running" for s in states):
        return "running"
    if all(s == "stopped" for s in states):
        return "stopped"
    return "starting"


def _when(at: object, now: float) -> str:
    if not isinstance(at, int | float):
        return "-"
    stamp = time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(at))
    return f"{stamp}; {ago(now - at)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int],
           indent: str, paint: Callable[[int, str, str], str]) -> list[str]:
    """Aligned columns; ``paint(column, plain, padded)`` colours a cell after padding so that
    escape codes never skew the widths."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str], is_header: bool) -> str:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            padded = cell.rjust(width) if i in right else cell.ljust(width)
            cells.append(padded if is_header else paint(i, cell, padded))
        return indent + "  ".join(cells).rstrip()

    return [line(header, True)] + [line(r, False) for r in rows]


def _mps_line(mps: object) -> str:
    if mps is None:
        return "off"
    if not isinstance(mps, Mapping):
        return "-"
    pid = mps.get("pid")
    text = f"pid {pid}" if pid else "not running"
    applied = mps.get("applied")
    if isinstance(applied, Mapping) and applied:
        text += " (" + ", ".join(f"{clean(k)}={clean(v)}" for k, v in applied.items()) + ")"
    return text


def _engines(engines: Sequence[Mapping[str, Any]], paint: _Paint) -> list[str]:
    if not engines:
        return ["    (no engines)"]
    rows = []
    for e in engines:
        cpus = e.get("cpus")
        rows.append([
            clean(e.get("key")),
            clean(e.get("pid")),
            clean(e.get("port")),
            "yes" if e.get("ready") else "no",
            clean(e.get("inflight", 0)),
            cpu_list(cpus) if isinstance(cpus, list) and cpus
            and all(isinstance(c, int) for c in cpus) else "-",
        ])

    def ready(column: int, cell: str, padded: str) -> str:
        if column != 3:
            return padded
        return padded.replace(cell, paint(cell, _GREEN if cell == "yes" else _YELLOW), 1)

    lines = _table(["ENGINE", "PID", "PORT", "READY", "IN-FLIGHT", "CORES"], rows, {1, 2, 4},
                   "    ", ready)
    lines[0] = paint(lines[0], _BOLD)
    return lines


def _phases(engines: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each engine's last start by phase (``weights``, ``compile``, ...): where its time went,
    so a slow disk reads apart from a cold compile cache. An engine still starting shows the
    phases done so far."""
    lines = []
    for e in engines:
        phases = e.get("phases")
        if not isinstance(phases, Mapping) or not phases:
            continue
        said = {clean(k): v for k, v in phases.items() if isinstance(v, int | float)}
        so_far = " so far" if e.get("state") == "starting" else ""
        lines.append(f"    {clean(e.get('key'))}  {sum(said.values()):.1f} s{so_far}: "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in said.items()))
    return ["  Last start:", *lines] if lines else []


def _history(history: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    if not history:
        return ["  Last restarts: none"]
    shown = list(history)[-HISTORY_SHOWN:]
    earlier = len(history) - len(shown)
    lines = ["  Last restarts" + (f" ({earlier} earlier not shown):" if earlier else ":")]
    for item in shown:
        at = item.get("at")
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f" ({ago(now - at)})"
                if isinstance(at, int | float) else "-")
        engine = f" {clean(item['engine'])}" if item.get("engine") else ""
        lines.append(f"    {when}  {clean(item.get('signal'))}{engine}: "
                     f"{clean(item.get('reason'))}")
    return lines


def _diagnosis(found: Mapping[str, Any]) -> list[str]:
    """The CPU-bound diagnosis (mpsd.observe.diagnosis): how often the GPU waited for its
    engines' CPU, what NVML and the engines' busiest threads said last, and the advice."""
    ratio, window = found.get("cpu_bound_ratio"), found.get("window_s")
    if not isinstance(ratio, int | float) or not isinstance(window, int | float):
        return []
    line = (f"  CPU side: the GPU waited for the engines' CPU {ratio:.0%} of the last "
            f"{window / 60:g} min")
    util, cpu = found.get("gpu_utilization"), found.get("engine_cpu")
    if isinstance(util, int | float) and isinstance(cpu, Mapping) and cpu:
        cores = ", ".join(f"{v:.2f}" for v in cpu.values() if isinstance(v, int | float))
        line += f" (GPU {util:.0%} busy; busiest engine threads {cores} of a core)"
    lines = [line]
    if found.get("advice"):
        lines.append(f"    Advice: {clean(found['advice'])}")
    return lines


def _group(group: Mapping[str, Any], paint: _Paint, now: float) -> list[str]:
    state = str(group.get("state", "unknown"))
    device = clean(group.get("device"))
    uuid = group.get("uuid")
    title = f"{clean(group.get('gpu'))} - device {device}"
    if uuid and uuid != group.get("device"):
        title += f" ({clean(uuid)})"
    desired = group.get("desired")
    drained = isinstance(desired, Mapping) and bool(desired.get("drained"))
    lines = [f"{paint.dot(state)} {paint(title, _BOLD)}",
             f"     State: {paint.state(state)}{' (drained)' if drained else ''} since "
             f"{_when(group.get('since'), now)}"]
    if drained:  # on purpose, not a fault: say so, and how to undo it
        lines.append(f"    Reason: drained by an operator; `mpsd restart "
                     f"{clean(group.get('gpu'))}` starts it again")
    elif group.get("reason"):
        lines.append(f"    Reason: {clean(group.get('reason'))}")
    if "mps" in group:
        lines.append(f"       MPS: {_mps_line(group.get('mps'))}")
    if isinstance(group.get("restarts_in_window"), int):
        lines.append(f"  Restarts: {group['restarts_in_window']} in the restart window")
    diagnosis = group.get("diagnosis")
    if isinstance(diagnosis, Mapping):
        lines += _diagnosis(diagnosis)
    engines = group.get("engines")
    listed = [e for e in engines if isinstance(e, Mapping)] if isinstance(engines, list) else []
    lines += _engines(listed, paint)
    lines += _phases(listed)
    history = group.get("history")
    if isinstance(history, list):
        lines += _history([h for h in history if isinstance(h, Mapping)], now)
    return lines


def render(status: DaemonStatus | Mapping[str, Any], color: bool = False,
           now: float | None = None) -> str:
    """The whole ``mpsd status`` text (no trailing newline). Read defensively: the document
    comes over a socket from a daemon that may be older or newer than this command."""
    paint = _Paint(color)
    now = time.time() if now is None else now
    groups = [g for g in status.get("groups", []) if isinstance(g, Mapping)]
    lines = [f"{paint.dot(_overall(groups))} mpsd - {clean(status.get('status'))}"]
    mps = status.get("mps")
    if isinstance(mps, Mapping):
        on = "on" if mps.get("enabled") else "off"
        reason = clean(mps.get("reason")) if mps.get("reason") else ""
        if reason.lower().startswith(("mps on", "mps off")):
            lines.append(f"     MPS: {reason}")  # the daemon's reason already says on/off
        else:
            lines.append(f"     MPS: {on}" + (f" ({reason})" if reason else ""))
    for group in groups:
        lines.append("")
        lines += _group(group, paint, now)
    if not groups:
        lines.append("     (no GPUs configured)")
    return "\n".join(lines)


def ready_line(ready: int, total: int, listen: str, model: str | None, auth: bool,
               status_line: str) -> str:
    """The line ``mpsd run`` prints once every GPU settled: how many engines serve, and a
    request to try (on a wildcard address, through loopback)."""
    if not ready or model is None:
        return f"not ready: 0/{total} engines serve ({status_line}); see `mpsd status`"
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    key = " -H 'Authorization: Bearer KEY'" if auth else ""
    body = shlex.quote(json.dumps({"model": model, "prompt": "Hello", "max_tokens": 8}))
    return (f"ready: {ready}/{total} engines \u2014 try: curl -s http://{host}:{port}"
            f"/v1/completions -H 'Content-Type: application/json'{key} -d {body}")
