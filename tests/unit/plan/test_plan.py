"""The resolved plan: argv, env, ports, memory shares and cores, as pure functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpsd.config import parse_config, parse_cpu_list
from mpsd.errors import ConfigError
from mpsd.host.nvml import GpuInfo, GpuInventory
from mpsd.plan.build import HostFacts, build_plan
from mpsd.plan.cpus import cpu_list
from mpsd.plan.engine import fill, memory_share, vllm_shutdown_timeout

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-99999999-1111-2222-3333-444444444444"
GIB = 1 << 30


def inventory() -> GpuInventory:
    return GpuInventory(gpus=(
        GpuInfo(0, UUID0, "NVIDIA H200", 140 * GIB, (0, 1, 2, 3, 4, 5, 6, 7), "580.159.04"),
        GpuInfo(1, UUID1, "NVIDIA H200", 140 * GIB, (8, 9, 10, 11, 12, 13, 14, 15), "580.159.04"),
    ))


def facts(gpu: bool = True, mps: bool = True, cpus: int = 16,
          environ: dict[str, str] | None = None) -> HostFacts:
    return HostFacts(inventory=inventory() if gpu else None,
                     mps_binary="/usr/bin/nvidia-cuda-mps-control" if mps else None,
                     cpus=tuple(range(cpus)), environ=environ or {})


def config(*gpus: dict[str, Any], **sections: Any) -> Any:
    return parse_config({"gpu": list(gpus), **sections})


def gpu(device: str = "0", **engine: Any) -> dict[str, Any]:
    return {"device": device, "engine": [{"model": "Qwen/Qwen2.5-0.5B-Instruct", **engine}]}


def test_one_gpus_change_never_moves_another_gpus_ports() -> None:
    """Scaling gpu0 from 3 engines to 1 leaves gpu1's ports (and so its engines) alone."""
    def ports(replicas: int) -> list[list[int]]:
        plan = build_plan(config(gpu("0", replicas=replicas, gpu_memory_utilization=0.3),
                                 gpu("1", replicas=2, gpu_memory_utilization=0.3)), facts(), "f")
        return [[e.port for e in g.engines] for g in plan.groups]

    assert ports(3) == [[18100, 18101, 18102], [18164, 18165]]
    assert ports(1) == [[18100], [18164, 18165]]


def test_vllm_argv_env_and_ports() -> None:
    environ = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
               "LISTEN_FDS": "1", "SECRET": "x", "LC_ALL": "C"}
    plan = build_plan(config(gpu(replicas=2, gpu_memory_utilization=0.45,
                                 active_thread_percentage=50, args=["--port-hint", "{port}"])),
                      facts(environ=environ), "f")
    assert plan.mps_enabled
    group = plan.groups[0]
    assert group.key == "gpu0" and group.uuid == UUID0
    first, second = group.engines
    assert first.key == "gpu0/qwen2.5-0.5b-instruct-0"
    assert (first.port, second.port) == (18100, 18101)
    assert first.argv == (
        "vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct", "--host", "127.0.0.1", "--port", "18100",
        "--served-model-name", "Qwen/Qwen2.5-0.5B-Instruct", "--gpu-memory-utilization", "0.45",
        "--shutdown-timeout", "15", "--disable-uvicorn-access-log", "--port-hint", "18100")
    env = first.env
    assert env["CUDA_VISIBLE_DEVICES"] == UUID0
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/mpsd/gpu0/pipe"
    assert env["CUDA_MPS_LOG_DIRECTORY"] == "/var/log/mpsd/gpu0"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert env["PATH"] == "/usr/bin" and env["LC_ALL"] == "C"
    for banned in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "SECRET"):
        assert banned not in env


def test_pinned_limit_derives_utilisation_from_physical_memory() -> None:
    plan = build_plan(config(gpu(replicas=2, pinned_memory_limit="30G")), facts(), "f")
    engine = plan.groups[0].engines[0]
    assert engine.memory_share == pytest.approx((30 - 1) / 140, abs=0.001)
    assert engine.memory_share is not None and engine.memory_share <= (30 - 1) / 140
    assert engine.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"{UUID0}=30720M"


def test_pinned_limits_over_physical_memory_are_refused() -> None:
    with pytest.raises(ConfigError, match="more than") as info:
        build_plan(config(gpu(replicas=5, pinned_memory_limit="30G")), facts(), "f")
    assert info.value.key == "gpu[0].engine"


def test_too_many_mps_clients_are_refused() -> None:
    with pytest.raises(ConfigError, match="client contexts"):
        build_plan(config(gpu(replicas=40, contexts_per_replica=2)), facts(), "f")


def test_unknown_gpu_lists_the_present_ones() -> None:
    with pytest.raises(ConfigError, match=UUID1) as info:
        build_plan(config(gpu("7")), facts(), "f")
    assert info.value.key == "gpu[0].device"


def test_device_by_uuid_resolves() -> None:
    plan = build_plan(config(gpu(UUID1)), facts(), "f")
    assert plan.groups[0].uuid == UUID1
    assert plan.groups[0].key == "gpu0"  # by position when named by UUID


def test_without_nvml_devices_are_taken_as_given_with_a_warning() -> None:
    plan = build_plan(config(gpu("3")), facts(gpu=False), "f")
    assert not plan.mps_enabled and "NVML" in plan.mps_reason
    assert plan.groups[0].uuid == "3"
    assert any("taken as given" in w for w in plan.warnings)


def test_mps_on_without_binary_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_plan(config(gpu(), mps={"enabled": "on"}), facts(mps=False), "f")
    assert info.value.key == "mps.control_binary"


def test_mps_off_engines_get_no_mps_variables() -> None:
    plan = build_plan(config(gpu(), mps={"enabled": "off"}), facts(), "f")
    env = plan.groups[0].engines[0].env
    assert not any(k.startswith("CUDA_MPS") for k in env)
    assert env["CUDA_VISIBLE_DEVICES"] == UUID0


def test_command_kind_fills_placeholders() -> None:
    plan = build_plan(config(gpu(kind="command", command=["srv", "--port", "{port}",
                                                          "--model={model}", "{\"json\": 1}"])),
                      facts(), "f")
    assert plan.groups[0].engines[0].argv == (
        "srv", "--port", "18100", "--model=Qwen/Qwen2.5-0.5B-Instruct", "{\"json\": 1}")


def test_auto_cpus_are_disjoint_numa_local_and_leave_the_proxy_a_core() -> None:
    plan = build_plan(config(gpu("0", replicas=2), gpu("1", replicas=2)), facts(), "f")
    cores = [e.cpus for g in plan.groups for e in g.engines]
    assert plan.proxy_cpus == (0,)
    flat = [c for cs in cores if cs for c in cs]
    assert len(flat) == len(set(flat)) and 0 not in flat
    assert all(c < 8 for c in cores[0] or ()) and all(c < 8 for c in cores[1] or ())
    assert all(c >= 8 for c in cores[2] or ()) and all(c >= 8 for c in cores[3] or ())
    assert plan.groups[0].engines[0].env  # placeholders such as {cpus} are rendered
    assert cpu_list(cores[0] or ()) in ("1-3", "1-4")


def test_explicit_and_off_affinity() -> None:
    plan = build_plan(config(gpu(replicas=2, cpu_affinity=["2-3", "4"]),
                             gpu("1", cpu_affinity="off")), facts(), "f")
    assert [e.cpus for e in plan.groups[0].engines] == [(2, 3), (4,)]
    assert plan.groups[1].engines[0].cpus is None and plan.proxy_cpus is None


def test_more_engines_than_cores_share_and_warn() -> None:
    plan = build_plan(config(gpu(replicas=3)), facts(cpus=2), "f")
    assert plan.proxy_cpus is None
    assert all(e.cpus for e in plan.groups[0].engines)
    assert any("not pinned" in w for w in plan.warnings)


def test_ports_skip_the_proxy_port_and_explicit_ports_clash() -> None:
    plan = build_plan(config(gpu(replicas=2), proxy={"listen": "127.0.0.1:18100"}), facts(), "f")
    assert [e.port for e in plan.groups[0].engines] == [18101, 18102]
    with pytest.raises(ConfigError, match="used twice"):
        build_plan(config(gpu(replicas=2, port=9000), gpu("1", port=9001)), facts(), "f")


@given(st.floats(min_value=1, max_value=100))
def test_shutdown_timeout_leaves_room_before_the_kill(stop: float) -> None:
    assert 1 <= vllm_shutdown_timeout(stop) <= max(1, stop / 2)


@given(st.sets(st.integers(min_value=0, max_value=64), min_size=1))
def test_cpu_list_round_trips(cores: set[int]) -> None:
    assert parse_cpu_list(cpu_list(cores)) == tuple(sorted(cores))


def test_fill_keeps_other_braces() -> None:
    assert fill('{"a": "{port}"}', {"port": "1"}) == '{"a": "1"}'


def test_memory_share_without_physical_memory_is_unknown() -> None:
    engine = config(gpu(pinned_memory_limit="10G")).gpu[0].engine[0]
    assert memory_share(engine, None) is None
    assert memory_share(engine, 80 * GIB) == pytest.approx(9 / 80, abs=0.001)


def test_state_dir_layout(tmp_path: Path) -> None:
    plan = build_plan(config(gpu(), daemon={"state_dir": str(tmp_path), "log_dir": "/l"}),
                      facts(), "f")
    assert plan.groups[0].pipe_dir == tmp_path / "gpu0" / "pipe"
    assert plan.groups[0].log_dir == Path("/l/gpu0")
