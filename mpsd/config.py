"""The TOML configuration contract (docs/architecture.md §7) as frozen pydantic models.

`load_config` is the only way in: it parses, merges ``[defaults]`` into every engine, validates
with ``extra="forbid"`` and turns the first problem into a :class:`ConfigError` that names the
file, the TOML key and the fix. Relative paths in a file are relative to the file's directory
(as in nginx), so a config means the same daemon whatever the current directory of ``mpsd run``
or of the ``mpsd status`` that looks for it. Host-dependent values (GPU UUIDs, physical memory,
cores) are resolved later by :mod:`mpsd.plan.build`; this module checks only what the file alone
can tell.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mpsd.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/mpsd/mpsd.toml"
MAX_TOTAL_MEMORY_SHARE = 0.95
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT])i?B?$", re.IGNORECASE)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_CPU_LIST_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``30G`` or ``512M`` (binary units, as MPS reads them)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. \"30G\" or \"512M\"")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Cores in a Linux cpu-list such as ``0-3,8``."""
    if not _CPU_LIST_RE.match(text):
        raise ValueError(f"{text!r} is not a cpu list; write e.g. \"0-3\" or \"0,2,4\"")
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.extend(range(int(low), int(high or low) + 1))
    return tuple(sorted(set(cores)))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonConfig(_Frozen):
    """``[daemon]``: where mpsd keeps its sockets and logs, and how it logs."""

    state_dir: Path = Path("/run/mpsd")
    log_dir: Path = Path("/var/log/mpsd")
    log_format: Literal["auto", "console", "json", "journal"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    engine_port_base: Annotated[int, Field(ge=1024, le=65000)] = 18100
    metrics_interval_s: Annotated[float, Field(gt=0)] = 10.0


class ProxyConfig(_Frozen):
    """``[proxy]``: the OpenAI-compatible front door."""

    listen: str = "127.0.0.1:8000"
    api_keys_file: str = ""
    max_body_bytes: Annotated[int, Field(gt=0)] = 32 * 1024 * 1024
    connect_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    first_byte_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    admission_wait_s: Annotated[float, Field(ge=0)] = 0.0
    recovery_hold_s: Annotated[float, Field(ge=0)] = 30.0
    recovery_hold_max: Annotated[int, Field(ge=0)] = 1024
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    unready_grace_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    max_inflight_per_engine: Annotated[int, Field(ge=0)] = 0
    max_connections: Annotated[int, Field(gt=0)] = 8192
    max_request_line_bytes: Annotated[int, Field(ge=64)] = 8192
    max_header_line_bytes: Annotated[int, Field(ge=64)] = 16384
    max_head_bytes: Annotated[int, Field(ge=256)] = 65536
    max_headers: Annotated[int, Field(gt=0)] = 100
    max_trailer_bytes: Annotated[int, Field(ge=0)] = 8192
    max_trailers: Annotated[int, Field(ge=0)] = 32
    head_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    keepalive_timeout_s: Annotated[float, Field(gt=0)] = 75.0
    # a client that does not read (issue 21): no write progress this long ends its request
    send_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    client_send_buffer_bytes: Annotated[int, Field(ge=0)] = 256 * 1024
    max_client_connections: Annotated[int, Field(ge=0)] = 0
    reserved_fds: Annotated[int, Field(ge=0)] = 1024
    # failover (issue 10): passive ejection, retry before the first byte, stall detection
    eject_after_errors: Annotated[int, Field(ge=0)] = 5
    eject_base_s: Annotated[float, Field(gt=0)] = 10.0
    eject_max_s: Annotated[float, Field(gt=0)] = 120.0
    retry_budget: Annotated[float, Field(ge=0, le=1)] = 0.2
    retry_min_concurrency: Annotated[int, Field(ge=0)] = 3
    stall_timeout_s: Annotated[float, Field(ge=0)] = 60.0

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port; write e.g. \"127.0.0.1:8000\"")
        return value

    @model_validator(mode="after")
    def _head_limits_fit(self) -> ProxyConfig:
        for key in ("max_request_line_bytes", "max_header_line_bytes"):
            if getattr(self, key) > self.max_head_bytes:
                raise ValueError(f"{key} ({getattr(self, key)}) is larger than max_head_bytes "
                                 f"({self.max_head_bytes}); a line is part of the head")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class MpsConfig(_Frozen):
    """``[mps]``: ownership of one ``nvidia-cuda-mps-control -f`` per GPU."""

    enabled: Literal["auto", "on", "off"] = "auto"
    control_binary: str = "nvidia-cuda-mps-control"
    recover_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    status_interval_s: Annotated[float, Field(gt=0)] = 1.0
    command_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    max_clients_per_gpu: Annotated[int, Field(gt=0)] = 48
    env: dict[str, str] = {}


class RestartConfig(_Frozen):
    """``[restart]``: backoff and the crash-loop budget of a group."""

    backoff_initial_s: Annotated[float, Field(ge=0)] = 1.0
    backoff_max_s: Annotated[float, Field(ge=0)] = 60.0
    max_restarts: Annotated[int, Field(ge=0)] = 5
    window_s: Annotated[float, Field(gt=0)] = 600.0
    stable_after_s: Annotated[float, Field(gt=0)] = 300.0


CpuAffinity = Literal["auto", "off"] | list[str]


class EngineConfig(_Frozen):
    """``[[gpu.engine]]`` after ``[defaults]`` were merged in: one model, N replicas."""

    model: str
    kind: Literal["vllm", "command"] = "vllm"
    name: str = ""
    served_model_name: str = ""
    executable: str = "vllm"
    command: list[str] = []
    health_path: str = "/health"
    canary: Literal["completion", "models", "none"] = "completion"
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    pinned_memory_limit: str = ""
    memory_headroom: str = "1G"
    active_thread_percentage: Annotated[int, Field(ge=1, le=100)] = 100
    cpu_affinity: CpuAffinity = "auto"
    args: list[str] = []
    env: dict[str, str] = {}
    startup_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    stop_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    health_interval_s: Annotated[float, Field(gt=0)] = 2.0
    health_failures: Annotated[int, Field(ge=1)] = 3
    contexts_per_replica: Annotated[int, Field(ge=1)] = 1

    @field_validator("pinned_memory_limit", "memory_headroom")
    @classmethod
    def _size(cls, value: str) -> str:
        if value:
            parse_size(value)
        return value

    @field_validator("cpu_affinity")
    @classmethod
    def _cpu_lists(cls, value: CpuAffinity) -> CpuAffinity:
        if isinstance(value, list):
            for item in value:
                parse_cpu_list(item)
        return value

    @field_validator("env")
    @classmethod
    def _env_allowed(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key in _RESERVED_ENV or key.startswith(("WATCHDOG_", "LISTEN_")):
                raise ValueError(f"{key} is set by mpsd (or must never reach an engine)")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> EngineConfig:
        if self.kind == "command" and not self.command:
            raise ValueError("kind = \"command\" needs command; write e.g. "
                             "[\"server\", \"--port\", \"{port}\"]")
        if self.kind == "command" and not any("{port}" in part for part in self.command):
            raise ValueError("command must contain \"{port}\" so mpsd can give it its port")
        if isinstance(self.cpu_affinity, list) and len(self.cpu_affinity) != self.replicas:
            raise ValueError(
                f"cpu_affinity lists {len(self.cpu_affinity)} core sets for {self.replicas} "
                "replicas; give one cpu list per replica, or \"auto\""
            )
        if self.pinned_memory_limit and self.gpu_memory_utilization is not None:
            raise ValueError(
                "set either gpu_memory_utilization or pinned_memory_limit (mpsd derives the "
                "utilisation from the limit), not both"
            )
        return self

    @property
    def display_name(self) -> str:
        """Engine name used in ids such as ``gpu0/qwen2.5-0.5b-instruct-1``."""
        if self.name:
            return self.name
        base = self.served_model_name or self.model
        return re.sub(r"[^a-z0-9._-]+", "-", Path(base).name.lower()).strip("-") or "engine"

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model


_RESERVED_ENV = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_MPS_PIPE_DIRECTORY",
        "CUDA_MPS_LOG_DIRECTORY",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
        "NOTIFY_SOCKET",
    }
)


class GpuConfig(_Frozen):
    """``[[gpu]]``: one GPU, one MPS server, one fault domain."""

    device: str
    name: str = ""
    engine: Annotated[list[EngineConfig], Field(min_length=1)]

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if value and not re.fullmatch(r"[a-z0-9_-]+", value):
            raise ValueError(f"{value!r} may hold only a-z, 0-9, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _unique_engines(self) -> GpuConfig:
        seen: set[str] = set()
        for engine in self.engine:
            if engine.display_name in seen:
                raise ValueError(
                    f"two engines are named {engine.display_name!r}; give one a distinct name"
                )
            seen.add(engine.display_name)
        share = sum((e.gpu_memory_utilization or 0.0) * e.replicas for e in self.engine)
        if share > MAX_TOTAL_MEMORY_SHARE:
            raise ValueError(
                f"engines ask for {share:.2f} of the GPU's memory (gpu_memory_utilization x "
                f"replicas); keep the sum at or below {MAX_TOTAL_MEMORY_SHARE}"
            )
        return self


class Config(_Frozen):
    """The whole file."""

    daemon: DaemonConfig = DaemonConfig()
    proxy: ProxyConfig = ProxyConfig()
    mps: MpsConfig = MpsConfig()
    restart: RestartConfig = RestartConfig()
    gpu: Annotated[list[GpuConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_gpus(self) -> Config:
        names = [gpu_key(g, i) for i, g in enumerate(self.gpu)]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"two [[gpu]] entries resolve to {name!r}; give each a distinct "
                                 "device (or name)")
        devices = [g.device for g in self.gpu]
        for i, dev in enumerate(devices):
            if dev in devices[:i]:
                raise ValueError(f"device {dev!r} is listed twice; list every GPU once")
        return self


def gpu_key(gpu: GpuConfig, position: int) -> str:
    """Stable short name of a group (``gpu0``): used in ids, directories, metrics labels."""
    if gpu.name:
        return gpu.name
    return f"gpu{gpu.device}" if gpu.device.isdigit() else f"gpu{position}"


def config_path(explicit: str | None) -> str:
    """The file to read: ``-c``, else ``$MPSD_CONFIG``, else ``/etc/mpsd/mpsd.toml``."""
    return explicit or os.environ.get("MPSD_CONFIG") or DEFAULT_CONFIG_PATH


def relative_to_file(value: str | os.PathLike[str], file: str | os.PathLike[str]) -> Path:
    """A path written in ``file``: relative ones are taken from the file's directory (and
    ``..`` folded, so that plans and messages show ``/srv/.mpsd``, not ``/srv/etc/../.mpsd``)."""
    return Path(os.path.normpath(Path(file).absolute().parent / value))


def _command_path(value: str, file: str) -> str:
    """An executable as a shell takes it: a bare name is looked up on PATH, a path is a path."""
    return str(relative_to_file(value, file)) if "/" in value else value


def _anchor_engine(engine: EngineConfig, file: str) -> EngineConfig:
    changes: dict[str, Any] = {"executable": _command_path(engine.executable, file)}
    if engine.command:
        changes["command"] = [_command_path(engine.command[0], file), *engine.command[1:]]
    local_model = relative_to_file(engine.model, file)
    written_as_path = engine.model.startswith(("./", "../"))
    if not Path(engine.model).is_absolute() and (written_as_path or local_model.exists()):
        # a model directory beside the config (one that is missing is the preflight's to
        # report); clients keep asking for the name as written
        changes.update(model=str(local_model), served_model_name=engine.served_name)
    return engine.model_copy(update=changes)


def anchor_paths(config: Config, file: str) -> Config:
    """``config`` with its relative paths made absolute from ``file``'s directory: state and
    log dirs, the API key file, executables written as paths, and a model written as a path
    (``./m``, ``../m``) or existing there (a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``
    stays as it is)."""
    daemon = config.daemon.model_copy(update={
        "state_dir": relative_to_file(config.daemon.state_dir, file),
        "log_dir": relative_to_file(config.daemon.log_dir, file)})
    proxy = config.proxy
    if proxy.api_keys_file:
        proxy = proxy.model_copy(update={
            "api_keys_file": str(relative_to_file(proxy.api_keys_file, file))})
    mps = config.mps.model_copy(update={
        "control_binary": _command_path(config.mps.control_binary, file)})
    gpus = [gpu.model_copy(update={"engine": [_anchor_engine(e, file) for e in gpu.engine]})
            for gpu in config.gpu]
    return config.model_copy(update={"daemon": daemon, "proxy": proxy, "mps": mps, "gpu": gpus})


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, merge ``[defaults]``, validate and anchor relative paths at the file's directory;
    raise :class:`ConfigError` on the first problem."""
    file = str(path)
    try:
        raw = tomllib.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(file, "", "the file does not exist",
                          "create it (see etc/mpsd/mpsd.toml) or pass -c FILE") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read it ({exc.strerror})",
                          "make it readable by the mpsd user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"it is not valid TOML ({exc})",
                          "correct the syntax at that line") from None
    return anchor_paths(parse_config(raw, file), file)


def parse_config(raw: dict[str, Any], file: str = "<config>") -> Config:
    """Validate an already parsed TOML document (``load_config`` without the file I/O)."""
    data = dict(raw)
    defaults = data.pop("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(file, "defaults", "must be a table", "write [defaults] with engine keys")
    unknown = set(defaults) - set(EngineConfig.model_fields) - {"model"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(file, f"defaults.{key}", "unknown engine key",
                          f"use one of: {', '.join(sorted(EngineConfig.model_fields))}")
    gpus = data.get("gpu")
    if isinstance(gpus, list):
        data["gpu"] = [_merge_defaults(gpu, defaults) for gpu in gpus]
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(file, exc) from None


def _merge_defaults(gpu: Any, defaults: dict[str, Any]) -> Any:
    if not isinstance(gpu, dict) or not isinstance(gpu.get("engine"), list):
        return gpu
    engines = [{**defaults, **e} if isinstance(e, dict) else e for e in gpu["engine"]]
    return {**gpu, "engine": engines}


def _toml_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_FIXES = {
    "missing": "add this key",
    "extra_forbidden": "remove it or correct its spelling (see etc/mpsd/mpsd.toml for every key)",
    "literal_error": "use one of the values listed",
    "greater_than": "use a larger number",
    "greater_than_equal": "use a larger number",
    "less_than_equal": "use a smaller number",
    "too_short": "add at least one entry",
}


def _config_error(file: str, exc: ValidationError) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    message = str(err["msg"]).removeprefix("Value error, ")
    fix = _FIXES.get(err["type"], "write a value of the expected type")
    if err["type"] == "value_error":
        problem, _, hint = message.partition("; ")
        return ConfigError(file, _toml_path(loc), problem, hint or "see the comment in "
                           "etc/mpsd/mpsd.toml for this key")
    got = err.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return ConfigError(file, _toml_path(loc), f"{message}{shown}", fix)
