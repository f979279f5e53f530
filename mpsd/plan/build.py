"""Resolve a validated config against this host into the exact plan of what will run.

Pure functions over :class:`HostFacts` (GPU inventory, MPS binary, usable cores): every
engine's argv, environment, port, memory share and cores. ``mpsd check-config`` prints this
plan, and the supervisor runs it, so what an operator reads is what starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mpsd.config import Config, EngineConfig, GpuConfig, gpu_key, parse_size
from mpsd.errors import ConfigError
from mpsd.plan.cpus import assign_cpus, cpu_list
from mpsd.plan.engine import engine_argv, engine_env, memory_share

if TYPE_CHECKING:
    from mpsd.host.nvml import GpuInfo, GpuInventory


@dataclass(frozen=True)
class HostFacts:
    """What the plan depends on besides the file: read once at start (and on reload)."""

    inventory: GpuInventory | None
    mps_binary: str | None
    cpus: tuple[int, ...]
    environ: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EnginePlan:
    """One engine process exactly as it will be started."""

    key: str
    gpu: str
    name: str
    replica: int
    kind: Literal["vllm", "command"]
    model: str
    #: What the engine loads: a local path (absolute once planned) or a hub id.
    model_source: str
    #: The engine's whole output, every restart appended (the journal has its warnings and
    #: errors; its routine lines only here and at debug).
    log_file: Path
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    memory_share: float | None
    pinned_limit_bytes: int | None
    active_thread_percentage: int
    cpus: tuple[int, ...] | None
    health_path: str
    canary: Literal["completion", "models", "none"]
    startup_timeout_s: float
    stop_timeout_s: float
    health_interval_s: float
    health_failures: int

    @property
    def model_dir(self) -> Path | None:
        """The local model directory (None for a hub id, which is fetched at start-up)."""
        return Path(self.model_source) if Path(self.model_source).is_absolute() else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class GroupPlan:
    """One GPU: its MPS daemon (if on) and its engines, started in this order."""

    key: str
    device: str
    uuid: str
    mps: bool
    pipe_dir: Path
    log_dir: Path
    engines: tuple[EnginePlan, ...]

    @property
    def start_together(self) -> tuple[bool, str]:
        """Whether the engines of this GPU may start at the same time, and why.

        vLLM sizes its KV cache by profiling free GPU memory, which counts a sibling's
        allocations when two start at once; given ``--kv-cache-memory-bytes`` it does not
        profile. So a GPU comes back in the time of its slowest engine only when every engine
        has an explicit KV size; otherwise they start one after another.
        """
        if len(self.engines) <= 1:
            return True, "one engine"
        for engine in self.engines:
            if engine.kind != "vllm":
                return False, (f"{engine.key} is a command engine: how it sizes its memory is "
                               "unknown")
            if not any(a == KV_BYTES_FLAG or a.startswith(f"{KV_BYTES_FLAG}=")
                       for a in engine.argv):
                return False, (f"{engine.key} has no {KV_BYTES_FLAG}: vLLM would size its KV "
                               "cache from free memory, which a sibling starting at the same "
                               "time changes")
        return True, f"every engine has {KV_BYTES_FLAG} (no memory profiling)"


@dataclass(frozen=True)
class Plan:
    groups: tuple[GroupPlan, ...]
    mps_enabled: bool
    mps_reason: str
    proxy_cpus: tuple[int, ...] | None
    warnings: tuple[str, ...]


KV_BYTES_FLAG = "--kv-cache-memory-bytes"
PORTS_PER_GPU = 64  # more than the MPS clients a GPU takes (48, or 60 on CUDA > 13.0)


def build_plan(config: Config, facts: HostFacts, file: str) -> Plan:
    """The whole plan; :class:`ConfigError` when the file cannot work on this host."""
    warnings: list[str] = []
    mps_on, reason = _mps_decision(config, facts, file)
    infos = [_resolve_gpu(g, i, facts, file, warnings) for i, g in enumerate(config.gpu)]
    cores, proxy_cpus = assign_cpus(config, facts, infos, warnings)
    groups: list[GroupPlan] = []
    used_ports = {config.proxy.port}
    for index, (gpu, info) in enumerate(zip(config.gpu, infos, strict=True)):
        key = gpu_key(gpu, index)
        port = port_block(config.daemon.engine_port_base, gpu.device, index)
        group_dir = config.daemon.state_dir / key
        pipe_dir, log_dir = group_dir / "pipe", config.daemon.log_dir / key
        _check_gpu_capacity(gpu, index, info, config, file)
        uuid = info.uuid if info else gpu.device
        engines: list[EnginePlan] = []
        for e_index, engine in enumerate(gpu.engine):
            for replica in range(engine.replicas):
                if engine.port:
                    this_port = engine.port + replica
                else:
                    while port in used_ports:
                        port += 1
                    this_port = port
                where = f"gpu[{index}].engine[{e_index}].port"
                if this_port in used_ports:
                    raise ConfigError(file, where, f"port {this_port} is used twice",
                                      "give every engine its own port range")
                used_ports.add(this_port)
                engines.append(_engine_plan(
                    key, engine, replica, this_port, uuid, info,
                    pipe_dir if mps_on else None, log_dir,
                    cores.get((index, e_index, replica)), facts.environ, warnings,
                ))
        groups.append(GroupPlan(key, gpu.device, uuid, mps_on, pipe_dir, log_dir, tuple(engines)))
    return Plan(tuple(groups), mps_on, reason, proxy_cpus, tuple(warnings))


def port_block(base: int, device: str, position: int) -> int:
    """The first automatic port of a GPU's engines: a block of :data:`PORTS_PER_GPU` per GPU
    index (its position in the file for a UUID), so that adding, removing or resizing the
    engines of one GPU never moves another GPU's ports (a moved port restarts the engine)."""
    return base + PORTS_PER_GPU * (int(device) if device.isdigit() else position)


def _mps_decision(config: Config, facts: HostFacts, file: str) -> tuple[bool, str]:
    mode = config.mps.enabled
    if mode == "off":
        return False, "mps.enabled = \"off\""
    if facts.mps_binary is None:
        if mode == "on":
            raise ConfigError(file, "mps.control_binary",
                              f"{config.mps.control_binary!r} was not found",
                              "install the NVIDIA driver's MPS tools, give the binary's path, or "
                              "set mps.enabled = \"auto\"")
        return False, f"no MPS control binary ({config.mps.control_binary}) on this host"
    if mode == "auto" and not (facts.inventory and facts.inventory.gpus):
        return False, "no GPU visible through NVML"
    return True, f"MPS on ({facts.mps_binary})"


def _resolve_gpu(gpu: GpuConfig, index: int, facts: HostFacts, file: str,
                 warnings: list[str]) -> GpuInfo | None:
    if facts.inventory is None:
        warnings.append(f"gpu[{index}]: no NVML, device {gpu.device!r} taken as given")
        return None
    info = facts.inventory.resolve(gpu.device)
    if info is None:
        known = ", ".join(f"{g.index} ({g.uuid})" for g in facts.inventory.gpus) or "none"
        raise ConfigError(file, f"gpu[{index}].device", f"no GPU {gpu.device!r} on this host",
                          f"use an index or UUID of a present GPU: {known}")
    return info


def _check_gpu_capacity(gpu: GpuConfig, index: int, info: GpuInfo | None, config: Config,
                        file: str) -> None:
    contexts = sum(e.replicas * e.contexts_per_replica for e in gpu.engine)
    if contexts > config.mps.max_clients_per_gpu:
        raise ConfigError(file, f"gpu[{index}].engine",
                          f"{contexts} MPS client contexts exceed the driver's limit of "
                          f"{config.mps.max_clients_per_gpu}", "run fewer replicas on this GPU")
    if info is None:
        return
    pinned = sum(parse_size(e.pinned_memory_limit) * e.replicas
                 for e in gpu.engine if e.pinned_memory_limit)
    if pinned > info.memory_total:
        raise ConfigError(file, f"gpu[{index}].engine",
                          f"pinned_memory_limit x replicas = {pinned / 2**30:.1f} GiB is more than "
                          f"the GPU's {info.memory_total / 2**30:.1f} GiB",
                          "lower the limits or the replicas")


def _engine_plan(gpu: str, engine: EngineConfig, replica: int, port: int, uuid: str,
                 info: GpuInfo | None, pipe_dir: Path | None, log_dir: Path,
                 cpus: tuple[int, ...] | None, environ: Mapping[str, str],
                 warnings: list[str]) -> EnginePlan:
    share = memory_share(engine, info.memory_total if info else None)
    pinned = parse_size(engine.pinned_memory_limit) if engine.pinned_memory_limit else None
    if pinned is not None and pipe_dir is None:
        warnings.append(f"{gpu}/{engine.display_name}: pinned_memory_limit needs MPS; not applied")
        pinned = None
    name = engine.display_name
    substitute = {"port": str(port), "model": engine.model, "name": name,
                  "replica": str(replica), "gpu": gpu, "cpus": cpu_list(cpus or ())}
    return EnginePlan(
        key=f"{gpu}/{name}-{replica}", gpu=gpu, name=name, replica=replica, kind=engine.kind,
        model=engine.served_name, port=port,
        model_source=engine.model, log_file=log_dir / f"{name}-{replica}.log",
        argv=engine_argv(engine, port, share, substitute),
        env=engine_env(environ, uuid, pipe_dir, log_dir, engine, pinned, substitute),
        memory_share=share, pinned_limit_bytes=pinned,
        active_thread_percentage=engine.active_thread_percentage, cpus=cpus,
        health_path=engine.health_path, canary=engine.canary,
        startup_timeout_s=engine.startup_timeout_s, stop_timeout_s=engine.stop_timeout_s,
        health_interval_s=engine.health_interval_s, health_failures=engine.health_failures,
    )


