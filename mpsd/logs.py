"""structlog setup: the one module with global state; and how engine output becomes events.

Formats: ``console`` (for people at a terminal: ``HH:MM:SS level what key=value``, engine output
as ``engine | line``), ``json`` (one object per line, for files, log shippers and tests),
``journal`` (``<N>`` priority prefixes and no timestamp, because journald stamps lines itself and
``journalctl -p warning`` reads the prefix). ``auto`` picks journal when stderr is connected to
journald (``JOURNAL_STREAM``, i.e. under systemd), console on a TTY, json otherwise (output
piped or redirected is read by programs more often than by people).

Logging never takes mpsd down: a line that cannot be written (the reader of stderr went away,
the disk under a redirected log is full) is dropped and counted (:func:`write_errors`, exported
as ``mpsd_log_write_errors_total``), never raised into the code that logged it.

An event may carry ``msg``: a sentence for people (``ready: 2/2 engines — try: curl …``). The
console and the journal show it instead of the event name; JSON keeps both.

Engine output arrives as lines. :func:`engine_line_level` reads the level each line states in
vLLM's, uvicorn's, glog's or Python's warning format (a line that states none, such as a
traceback's, keeps the level of the line before), and :func:`probe_access_line` recognises
access-log lines of mpsd's own probes, which must never reach the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import structlog

LogFormat = Literal["auto", "console", "json", "journal"]
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_JOURNAL_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def resolve_format(requested: LogFormat) -> Literal["console", "json", "journal"]:
    """The concrete format for ``auto``: journald first, then a terminal, else JSON."""
    if requested != "auto":
        return requested
    if _stderr_is_journal():
        return "journal"
    return "console" if sys.stderr.isatty() else "json"


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not inode:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


def _fields(event: structlog.typing.EventDict) -> str:
    return " ".join(f"{k}={v!r}" if isinstance(v, str) and (" " in v or not v) else f"{k}={v}"
                    for k, v in event.items())


def _headline(event: structlog.typing.EventDict) -> str:
    """What a person reads first: engine output as ``engine | line``, else ``msg`` or the
    event name. Pops what it used, and the component (implied by the text)."""
    event.pop("component", None)
    name = str(event.pop("event", ""))
    if name == "output" and "line" in event:
        source = event.pop("engine", None) or event.pop("name", "?")
        for implied in ("name", "gpu", "pid"):
            event.pop(implied, None)
        return f"{source} | {event.pop('line')}"
    return str(event.pop("msg", name))


def _journal_renderer(_: Any, method: str, event: structlog.typing.EventDict) -> str:
    level = str(event.pop("level", method))
    line = f"{_headline(event)} {_fields(event)}".rstrip()
    return f"<{_JOURNAL_PRIORITY.get(level, 6)}>{line}"


_VLLM_PREFIX = re.compile(r"\| \(([\w.-]+) pid=\d+\) [A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\] ?")
_RESET, _DIM, _BOLD = "\033[0m", "\033[2m", "\033[1m"
_LEVEL_STYLE = {"debug": ("debug", "\033[90m"), "info": ("info ", ""),
                "warning": ("warn ", "\033[33m"), "error": ("error", "\033[31m"),
                "critical": ("crit ", "\033[31;1m")}


class _ConsoleRenderer:
    """``15:04:05 info  ready: 2/2 engines — try: curl …`` for a person at a terminal."""

    def __init__(self, colors: bool) -> None:
        self._colors = colors

    def _paint(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self._colors and code else text

    def __call__(self, _: Any, method: str, event: structlog.typing.EventDict) -> str:
        level = str(event.pop("level", method))
        stamp = str(event.pop("timestamp", ""))
        exc = event.pop("exception", None)
        label, color = _LEVEL_STYLE.get(level, (level[:5].ljust(5), ""))
        is_output = event.get("event") == "output"
        headline = _headline(event)
        if is_output:  # the console stamps lines itself: vLLM's own stamp and source go
            headline = _VLLM_PREFIX.sub(r"| \1: ", headline, count=1)
        else:
            headline = self._paint(headline, _BOLD if level == "info" else color)
        fields = _fields(event)
        line = (f"{self._paint(stamp, _DIM)} {self._paint(label, color)} {headline}"
                + (f"  {self._paint(fields, _DIM)}" if fields else ""))
        return f"{line}\n{exc}" if exc else line


class _Sink:
    """Writes whole lines to a stream and swallows what the stream refuses (``EPIPE``,
    ``ENOSPC``, ``EAGAIN``, a closed stream), counting each dropped line.

    A stream with a file descriptor is written with ``os.write``, below Python's buffer: a
    failed buffered write would stay in the buffer, fail again at every later flush and at exit
    (exit status 120 instead of mpsd's own).
    """

    def __init__(self, stream: IO[str]) -> None:
        self.errors = 0
        self.attach(stream)

    def attach(self, stream: IO[str]) -> None:
        """Write to ``stream`` from now on (the count goes on)."""
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError):  # io.StringIO and friends: no descriptor
            self._fd = None

    def write_line(self, text: str) -> None:
        try:
            if self._fd is None:
                self._stream.write(text + "\n")
                self._stream.flush()
                return
            data = memoryview((text + "\n").encode("utf-8", "replace"))
            while data:
                data = data[os.write(self._fd, data):]
        except (OSError, ValueError):
            self.errors += 1


class _SinkLogger:
    """structlog's logger for the sink: every level method writes one rendered line."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write_line(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _SinkHandler(logging.Handler):
    """Standard-library records (aiohttp, asyncio) through the same sink."""

    def __init__(self, sink: _Sink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted is dropped like a failed write
            self._sink.errors += 1
            return
        self._sink.write_line(text)


_sink = _Sink(sys.stderr)


def write_errors() -> int:
    """Log lines dropped since start because their stream refused them."""
    return _sink.errors


def setup(fmt: LogFormat = "auto", level: str = "info") -> None:
    """Configure structlog for the whole process (call once, before any logging)."""
    concrete = resolve_format(fmt)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if concrete == "journal":
        processors += [structlog.processors.format_exc_info, _journal_renderer]
    elif concrete == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True),
                       structlog.processors.format_exc_info,
                       structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.processors.TimeStamper(fmt="%H:%M:%S"),
                       structlog.processors.format_exc_info,
                       _ConsoleRenderer(colors=_colors(sys.stderr))]
    _sink.attach(sys.stderr)
    logger = _SinkLogger(_sink)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *_: logger,
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library: keep only their warnings.
    handler = _SinkHandler(_sink)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("aiohttp.access").disabled = True


def _colors(stream: Any) -> bool:
    """Colour only on a terminal, and never with ``NO_COLOR`` set or ``TERM=dumb``."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except ValueError:
        return False


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name (``mpsd.supervise.group``)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger


def level_number(name: str) -> int:
    """The numeric level of ``debug``/``info``/…, for ``logger.log``."""
    return _LEVELS[name]


_VLLM = re.compile(r"^\([\w.-]+ pid=\d+\) (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
_UVICORN = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):\s")
_GLOG = re.compile(r"^\[?([IWEF])\d{4} \d\d:\d\d:\d\d")
_PY_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
_GLOG_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}


def engine_line_level(line: str, previous: str = "info") -> str:
    """The level a line of engine output states (vLLM's ``(APIServer pid=1) WARNING …``,
    uvicorn's ``ERROR:    …``, glog's ``W1204 15:53:37…``, a Python warning), else
    ``previous``: a traceback's lines belong to the line that announced it."""
    if match := _VLLM.match(line) or _UVICORN.match(line):
        return match.group(1).lower()
    if match := _GLOG.match(line):
        return _GLOG_LEVELS[match.group(1)]
    if _PY_WARNING.match(line):
        return "warning"
    return previous


_ACCESS = re.compile(r'"(?:GET|HEAD|POST) (/[^ ?"]*)[^ "]* HTTP/[\d.]+" \d{3}')


def probe_access_line(paths: Collection[str]) -> Callable[[str], bool]:
    """A test for an HTTP server's access-log line (uvicorn's, aiohttp's, nginx-like ones) of
    a request to one of ``paths`` — what mpsd's health probes and metrics scrapes cause."""
    wanted = frozenset(paths)

    def matches(line: str) -> bool:
        found = _ACCESS.search(line)
        return found is not None and found.group(1) in wanted

    return matches


_SOURCE = re.compile(r"\[[\w.]+:\d+\]")


class EngineOutput:
    """The level of each output line of one engine, or None for a line never to log.

    Routine lines go to debug (:func:`console_level`): the console shows mpsd's phases and
    the engine's warnings and errors, not vLLM's 200 lines of start-up.
    Drops access-log lines of mpsd's own probes (``probe_paths``). While ``stopping()`` says
    mpsd asked the engine to stop, the traceback vLLM (0.32) logs on every orderly stop —
    "AsyncLLM output_handler failed" … ``EngineDeadError``, because its engine client stops
    EngineCore before the output handler — goes to debug, announced by one info event: it is
    the shutdown order, not a fault. The same lines at any other time stay errors. Every line
    also goes to ``phases`` (:class:`StartPhases`), given one.
    """

    def __init__(self, engine: str, probe_paths: Collection[str],
                 stopping: Callable[[], bool], phases: StartPhases | None = None) -> None:
        self._engine = engine
        self._probe = probe_access_line(probe_paths)
        self._stopping = stopping
        self._phases = phases
        self._expected_source: str | None = None

    def __call__(self, line: str, previous: str) -> str | None:
        if self._phases is not None:
            self._phases.feed(line)
        if self._probe(line):
            return None
        if self._expected_source is not None:
            if self._expected_source in line:
                return "debug"
            self._expected_source = None
        if "AsyncLLM output_handler failed" in line and self._stopping():
            source = _SOURCE.search(line)
            self._expected_source = source.group(0) if source else None
            get("mpsd.engine").info(
                "engine_stop_traceback", engine=self._engine,
                msg=f"{self._engine}: vLLM logs an EngineDeadError traceback when it stops "
                    "(its own shutdown order, not a fault); shown at log_level debug")
            return "debug"
        return console_level(line, previous)


_PROCESS_PREFIX = re.compile(r"^\([\w.-]+ pid=\d+\) ")
_LOG_HEADER = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:]+ \[[^\]]*\] ")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*(?:Error|Exception|Exit|Fault)): (\S.*)$")
#: Warnings a vLLM start prints on an ordinary host that an operator can do nothing about, or
#: that only repeat the operator's own flags (seen on vLLM 0.32 for CPU and 0.26 on an H200).
_ROUTINE_WARNING = re.compile(
    r"Triton|ulimit|tcmalloc|LD_PRELOAD|FutureWarning|DeprecationWarning|NUMA binding|"
    r"Enforce eager set|disabled by user settings|Reset SSM cache type")


def _message(line: str) -> str:
    """A line of engine output without vLLM's ``(Proc pid=N)`` prefix and log header."""
    return _LOG_HEADER.sub("", _PROCESS_PREFIX.sub("", line, count=1), count=1)


def console_level(line: str, previous: str) -> str:
    """The level an engine's output line is logged at: its own errors and the warnings that
    need a person stay; its routine — every line it states as info (vLLM's route table, its
    configuration, uvicorn's start-up) and the known environment warnings above — goes to
    debug, because mpsd's own phase events already say what the engine is doing.

    A traceback shows as its exception line (``ValueError: …``, at error, with the indented
    detail lines after it); its header and frames go to debug, and to the engine's file in
    full. vLLM prints some tracebacks unlabelled and labels every line of others ERROR: both
    read the same."""
    message = _message(line)
    if message.startswith("Traceback (most recent call last)"):
        return "debug"
    if not message[:1].isspace() and _EXCEPTION.match(message.rstrip()):
        return "error"
    stated = engine_line_level(line, "")
    if not stated or (message[:1].isspace() and stated in ("error", "critical")):
        return previous  # a frame follows its header, a detail its exception
    if stated == "info" or (stated == "warning" and _ROUTINE_WARNING.search(line)):
        return "debug"
    return stated


_POINTS_ELSEWHERE = re.compile(r"root cause", re.IGNORECASE)
_ERROR_LIMIT = 400


class LastError:
    """The last meaningful error line of a child's output: why it failed, in one line.

    An exception's last line (``HFValidationError: Repo id must be …``, the dotted module path
    dropped) wins over a plain error-level line; a line that only points at a cause printed
    earlier (vLLM's "Engine core initialization failed. See root cause above.") never replaces
    one already seen. Bounded: one line of at most 400 characters is kept, whatever the output.
    """

    def __init__(self) -> None:
        self._exception: str | None = None
        self._error: str | None = None
        self._detail_wanted = False  # an exception line was the last line seen

    def feed(self, line: str) -> None:
        message = _message(line)
        text = message.strip()
        wanted, self._detail_wanted = self._detail_wanted, False
        if wanted and message[:1].isspace() and text and self._exception is not None and (
                not text.startswith("For further information")):
            # pydantic and others say what was wrong on the line after the exception's
            self._exception = f"{self._exception}: {text}"[:_ERROR_LIMIT]
        elif match := _EXCEPTION.match(text):
            said = f"{match.group(1)}: {match.group(2)}"[:_ERROR_LIMIT]
            if self._exception is None or not _POINTS_ELSEWHERE.search(said):
                self._exception = said
                self._detail_wanted = True
        elif engine_line_level(line) in ("error", "critical") and not message[:1].isspace() and (
                not text.startswith("Traceback")):
            self._error = text[:_ERROR_LIMIT]

    @property
    def line(self) -> str | None:
        """The cause, or None when the output said nothing that reads as an error."""
        return self._exception or self._error


class OutputFile:
    """Every line of one child's output, appended to its own file (``log_dir/gpu0/qwen-0.log``):
    what the journal leaves out at the default level (an engine's routine lines) is there in
    full, and a fault's one-line reason can point at it.

    Bounded: past ``max_bytes`` the file moves to ``<name>.1`` (replacing the one before) and
    a new one starts. A write that fails (a full disk, a directory gone) is dropped and counted
    with the other log write errors (:func:`write_errors`); the child never notices.
    """

    def __init__(self, path: Path, max_bytes: int = 16 << 20) -> None:
        self.path = path
        self._max = max_bytes
        self._file: IO[str] | None = None
        self._size = 0

    def write(self, line: str) -> None:
        try:
            if self._file is None or self._size >= self._max:
                self._reopen()
            assert self._file is not None
            self._file.write(line + "\n")
            self._file.flush()
            self._size += len(line) + 1
        except (OSError, ValueError):
            _sink.errors += 1

    def _reopen(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8", errors="replace")
        self._size = self.path.stat().st_size

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class OutputTap:
    """What :class:`~mpsd.supervise.process.ChildProcess` keeps of a child's output besides
    the log events: the cause of a failure (:class:`LastError`) and, given a path, the whole
    output in a file (:class:`OutputFile`)."""

    def __init__(self, path: Path | None = None) -> None:
        self.last_error = LastError()
        self.file = OutputFile(path) if path is not None else None

    def started(self, pid: int, argv: Sequence[str]) -> None:
        """Mark a new process in the file, which the restarts of one engine share."""
        if self.file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.file.write(f"--- {stamp} mpsd started PID {pid}: {shlex.join(argv)}")

    def feed(self, line: str) -> None:
        self.last_error.feed(line)
        if self.file is not None:
            self.file.write(line)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


#: The phases of a vLLM start, each ended by the line that says it is over, in the order vLLM
#: reaches them (0.26 on an H200, 0.32 for CPU; docs/operations.md). ``process``: the first
#: line in vLLM's own format (Python and vLLM imported: 8-20 s); ``engine_core``: the API
#: server's set-up, EngineCore's (and a CPU worker's) process and imports, until "Starting to
#: load model"; ``weights``: "Loading weights took" (GPU), "Initializing model took" (CPU), so a
#: slow disk shows here alone; ``compile``: torch.compile and the warm-up
#: (CPU: "Warming up done."); ``kv_cache``: "GPU/CPU KV cache size: N tokens"; ``cuda_graphs``:
#: absent with ``--enforce-eager`` and on CPU; ``api_server``: uvicorn listens.
_PHASE_ENDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("process", _VLLM),
    ("engine_core", re.compile(r"Starting to load model")),
    ("weights", re.compile(r"Loading weights took|Model loading took|Initializing model took")),
    ("compile", re.compile(r"torch\.compile takes|Warming up done")),
    ("kv_cache", re.compile(r"KV cache size: ")),
    ("cuda_graphs", re.compile(r"Graph capturing finished")),
    ("api_server", re.compile(r"Application startup complete")),
)


class StartPhases:
    """How long each phase of one engine start took, read from its output as it arrives.

    A phase lasts from the end of the one before (or the spawn) until the line that ends it,
    as mpsd reads them: the phases add up to the whole start, and a slow disk (``weights``)
    reads apart from a cold compile cache (``compile``). Only phases the engine reported are
    kept, in vLLM's order: a line is matched only against the phases after the last one that
    ended, so nothing counts twice and nothing is read once the API server listens.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.begin()

    def begin(self) -> None:
        """The spawn: a new start (an engine restart starts a fresh record)."""
        self._last = self.started = self._clock()
        self.seconds: dict[str, float] = {}
        self._ahead = _PHASE_ENDS

    def feed(self, line: str) -> None:
        for index, (name, ends) in enumerate(self._ahead):
            if ends.search(line):
                self._ahead = self._ahead[index + 1:]
                self.end(name)
                return

    def end(self, name: str) -> None:
        """Close the phase ``name`` now (mpsd's own checks end ``ready`` this way)."""
        now = self._clock()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now

    @property
    def last(self) -> str | None:
        """The phase that ended last (None: the engine said nothing yet)."""
        return next(reversed(self.seconds), None)

    def text(self) -> str:
        """``weights 3.1 s, compile 15.0 s, …`` for people."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
