"""structlog setup: the one module with global state.

Formats: ``console`` (a TTY), ``json`` (one object per line, for files and tests), ``journal``
(``<N>`` priority prefixes and no timestamp, because journald stamps lines itself and
``journalctl -p warning`` reads the prefix). ``auto`` picks journal when stderr is connected to
journald (``JOURNAL_STREAM``), console on a TTY, json otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

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


def _journal_renderer(_: Any, method: str, event: structlog.typing.EventDict) -> str:
    level = str(event.pop("level", method))
    message = str(event.pop("event", ""))
    fields = " ".join(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
                      for k, v in event.items())
    return f"<{_JOURNAL_PRIORITY.get(level, 6)}>{message} {fields}".rstrip()


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
        processors += [structlog.processors.TimeStamper(fmt="%H:%M:%S.%f"),
                       structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library: keep only their warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("aiohttp.access").disabled = True


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name (``mpsd.supervise.group``)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger


def level_number(name: str) -> int:
    """The numeric level of ``debug``/``info``/…, for ``logger.log``."""
    return _LEVELS[name]
