"""What a group needs from outside (its options) and how the outside hears from it.

Kept apart from :mod:`mpsd.supervise.group` so that the supervisor, the metrics and the tests
can name these without the group's machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mpsd.config import MpsConfig, RestartConfig

if TYPE_CHECKING:
    from mpsd.supervise.faults import Fault
    from mpsd.supervise.group import GpuGroup
    from mpsd.supervise.states import GroupState


class GroupObserver(Protocol):
    """The one way to hear about groups: a group tells the supervisor, which tells its own
    observers (the metrics) the same three events. Each method must be cheap: it runs on the
    event loop inside the state machine."""

    def state_changed(self, group: GpuGroup, old: GroupState, new: GroupState) -> None: ...
    def fault(self, group: GpuGroup, fault: Fault) -> None: ...
    def recovered(self, group: GpuGroup, phase: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class GroupOptions:
    """Settings a group needs beyond its plan (all from the config's other sections)."""

    mps: MpsConfig
    restart: RestartConfig
    drain_timeout_s: float
    registry: Path | None
    environ: Mapping[str, str]
