"""Which cores each engine (and the proxy) runs on: one place for cpu-lists and placement."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from mpsd.config import Config, parse_cpu_list

if TYPE_CHECKING:
    from mpsd.host.nvml import GpuInfo
    from mpsd.plan.build import HostFacts

def cpu_list(cores: Iterable[int]) -> str:
    """Render cores as a compact Linux cpu-list (``0-3,8``)."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    start = prev = ordered[0] if ordered else 0
    for core in [*ordered[1:], None]:
        if core is not None and core == prev + 1:
            prev = core
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if core is not None:
            start = prev = core
    return ",".join(parts) if ordered else ""



def assign_cpus(config: Config, facts: HostFacts, infos: list[GpuInfo | None],
                warnings: list[str]) -> tuple[dict[tuple[int, int, int], tuple[int, ...]],
                                              tuple[int, ...] | None]:
    """Cores per engine replica, keyed ``(gpu index, engine index, replica)``, and the proxy's.

    ``auto`` gives every engine a disjoint set of cores, NUMA-local to its GPU where NVML says
    which cores those are, and keeps the first usable core for mpsd's proxy when there are
    more cores than engines. One vLLM EngineCore saturates a core: sharing one is a slowdown.
    """
    out: dict[tuple[int, int, int], tuple[int, ...]] = {}
    auto: list[tuple[int, int, int]] = []
    taken: set[int] = set()
    for g, gpu in enumerate(config.gpu):
        for e, engine in enumerate(gpu.engine):
            for r in range(engine.replicas):
                if isinstance(engine.cpu_affinity, list):
                    out[(g, e, r)] = parse_cpu_list(engine.cpu_affinity[r])
                    taken.update(out[(g, e, r)])
                elif engine.cpu_affinity == "auto":
                    auto.append((g, e, r))
    if not auto:
        return out, None
    free = [c for c in facts.cpus if c not in taken]
    proxy: tuple[int, ...] | None = None
    if len(free) > len(auto):
        proxy, free = (free[0],), free[1:]
    else:
        warnings.append(f"cpu_affinity auto: {len(free)} free cores for {len(auto)} engines "
                        "and the proxy; the proxy is not pinned")
    per = max(1, len(free) // len(auto)) if free else 0
    if not free:
        warnings.append("cpu_affinity auto: no free cores; engines are not pinned")
        return out, proxy
    pool = list(free)
    for slot in auto:
        info = infos[slot[0]]
        local = set(info.cpus) if info and info.cpus else set(pool)
        ordered = [c for c in pool if c in local] + [c for c in pool if c not in local]
        if not ordered:  # more engines than cores: share round-robin, and say so
            warnings.append(f"cpu_affinity auto: engine {slot} shares cores with another engine")
            ordered = free[(len(out) % len(free)):] + free[:(len(out) % len(free))]
            out[slot] = tuple(sorted(ordered[:per]))
            continue
        chosen = ordered[:per]
        out[slot] = tuple(sorted(chosen))
        pool = [c for c in pool if c not in chosen]
    return out, proxy
