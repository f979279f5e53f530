"""Read the facts a plan depends on from this host, and plan a config file against them.

Shared by ``mpsd check-config`` (prints the plan, starts nothing), ``mpsd run`` and reload.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import anyio

from mpsd.config import Config, load_config
from mpsd.host import nvml
from mpsd.plan.build import HostFacts, Plan, build_plan


@dataclass(frozen=True)
class Resolved:
    """A config file read and planned against this host."""

    file: str
    config: Config
    plan: Plan


async def host_facts(config: Config) -> HostFacts:
    """GPU inventory (NVML, off the loop), the MPS control binary, the usable cores."""
    inventory = await anyio.to_thread.run_sync(nvml.probe_inventory)
    return HostFacts(inventory=inventory, mps_binary=shutil.which(config.mps.control_binary),
                     cpus=usable_cpus(), environ=dict(os.environ))


async def resolve(file: str) -> Resolved:
    """Load and plan; :class:`mpsd.errors.ConfigError` when the file cannot work here."""
    config = load_config(file)
    plan = build_plan(config, await host_facts(config), file)
    return Resolved(file, config, plan)


def usable_cpus() -> tuple[int, ...]:
    """Cores this process may run on (honours cgroup/cpuset limits via sched_getaffinity)."""
    return tuple(sorted(os.sched_getaffinity(0)))
