"""The exceptions mpsd raises and the exit codes it promises (docs/architecture.md §7).

Every failure an operator can act on has its own type so that callers decide by type, never
by parsing messages.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes: the unit's ``RestartPreventExitStatus=78`` relies on CONFIG."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 78


class MpsdError(Exception):
    """Base of every error mpsd raises on purpose."""


class ConfigError(MpsdError):
    """An invalid configuration: names the file, the TOML key and what to write instead."""

    def __init__(self, file: str, key: str, problem: str, fix: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}, key `{self.key}`" if self.key else self.file
        return f"invalid config ({where}): {self.problem}. Fix: {self.fix}"


class SpawnError(MpsdError):
    """A child could not be started at all (missing executable, its port taken, fork failed
    with ``EAGAIN``/``ENOMEM``): a fault of that child, retried within its restart intensity."""


class ProcessWillNotDie(MpsdError):
    """A child outlived SIGKILL past the reaping deadline (D state, e.g. after a GPU fault):
    only an operator can help, so its GPU goes FAILED "needs an operator"."""


class MemberExited(MpsdError):
    """A supervised process (engine or MPS daemon) exited without mpsd asking it to."""


class HealthCheckFailed(MpsdError):
    """An engine failed ``health_failures`` probes in a row, or its canary failed."""


class StartupTimeout(MpsdError):
    """An engine did not become ready within ``startup_timeout_s``."""


class MpsFault(MpsdError):
    """The MPS server of a group reported a fatal fault (status FAULT or a log line)."""


class MpsCommandError(MpsdError):
    """A command sent to ``nvidia-cuda-mps-control`` failed or timed out."""
