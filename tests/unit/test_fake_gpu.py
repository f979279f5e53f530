"""The fake engine's shared-GPU model (tests/fakes/fake_gpu.py, fake_gpu_clock.py).

Why: ``mpsd tune`` is tested on fake engines, so the fake must react to engines per GPU, MPS
on/off and the active thread percentage like engines sharing a GPU do. The fixed points of the
step model are pinned with the pure math (no processes); the registry, the step clock and the
start-up memory check are exercised in-process; two short process tests check that real fake
engines decode at the model's rate, slow each other down only while both are busy, and refuse
an over-subscribed GPU with vLLM's message.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fakes.fake_gpu import (
    GpuConfig,
    Load,
    gpu_work,
    memory_error,
    memory_request,
    parse_size,
    step_time,
)
from tests.fakes.fake_gpu_clock import Registry, SharedGpu, StepClock
from tests.fakes.fake_vllm_api import _prompt_tokens
from tests.harness import free_ports
from tests.unit.test_fakes import Rig, request

S = 0.02  # STEP_S == CPU_S in the fixed-point checks


def config(tmp: Path = Path("/nonexistent"), mps: bool = True, pct: float = 100.0,
           step_s: float = S) -> GpuConfig:
    """CPU_S == STEP_S, no per-sequence or prefill work."""
    return GpuConfig(tmp, cpu_s=step_s, step_s=step_s, seq_s=0.0, prefill_s=0.0, mps=mps,
                     pct=pct)


def settle(pcts: list[float], mps: bool = True) -> list[float]:
    """Each engine's step time at the fixed point of ``u_i = W_i f_i / step_i``."""
    cfgs = [config(mps=mps, pct=p) for p in pcts]
    u = [0.0] * len(cfgs)
    steps = [0.0] * len(cfgs)
    for _ in range(300):
        before = u
        results = [step_time(c.cpu_s, gpu_work(c, 1, 0), Load(u[i], c.pct),
                             [Load(u[j], cfgs[j].pct) for j in range(len(cfgs)) if j != i],
                             mps, c.penalty) for i, c in enumerate(cfgs)]
        steps = [r[0] for r in results]
        u = [r[1] for r in results]
    assert max(abs(a - b) for a, b in zip(u, before, strict=True)) < 1e-9, "no fixed point"
    return steps


def throughput(steps: list[float]) -> float:
    """Tokens per second of all engines with one running request each."""
    return sum(1 / s for s in steps)


def test_more_engines_help_until_the_gpu_is_full_then_plateau() -> None:
    one, two, three = settle([100]), settle([100] * 2), settle([100] * 3)
    assert one == pytest.approx([2 * S])
    assert two == pytest.approx([2 * S] * 2)
    assert throughput(two) == pytest.approx(2 * throughput(one))
    assert three == pytest.approx([3 * S] * 3)
    assert throughput(three) == pytest.approx(throughput(two))


def test_mps_off_is_worse_and_a_smaller_thread_share_costs_throughput() -> None:
    assert settle([100] * 2, mps=False) == pytest.approx([2.6 * S] * 2)  # 1.3x the MPS step
    assert settle([100], mps=False) == pytest.approx([2 * S])  # alone: no time-slicing
    half = settle([50] * 2)
    assert half == pytest.approx([3 * S] * 2)
    assert throughput(half) == pytest.approx(throughput(settle([100] * 2)) * 2 / 3)


def test_work_grows_with_sequences_prompt_tokens_and_a_smaller_share() -> None:
    cfg = GpuConfig(Path("/x"), step_s=0.02, seq_s=0.0001, prefill_s=0.00002)
    assert gpu_work(cfg, 10, 1000) == pytest.approx(0.02 + 0.001 + 0.02)
    assert gpu_work(replace(cfg, pct=25), 0, 0) == pytest.approx(0.08)


def test_knobs_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FAKE_GPU_DIR", raising=False)
    assert GpuConfig.from_env() is None
    monkeypatch.setenv("FAKE_GPU_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_GPU_SEQ_S", "0")
    monkeypatch.setenv("FAKE_GPU_CPU_S_PORT_8001", "0.5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc,GPU-def")
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "40")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    cfg = GpuConfig.from_env(8001)
    assert cfg is not None
    assert (cfg.device, cfg.seq_s, cfg.cpu_s, cfg.mps, cfg.pct) == ("GPU-abc", 0.0, 0.5, False, 100)
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    cfg = GpuConfig.from_env()
    assert cfg is not None and (cfg.mps, cfg.pct, cfg.cpu_s) == (True, 40.0, 0.02)


def test_memory_check_messages_and_flags() -> None:
    cfg = GpuConfig(Path("/x"), memory_gib=80.0, model_gib=1.0)
    assert memory_error(0.5, 0.5, cfg) is None
    assert memory_error(0.45, 0.45 + 0.1, cfg) is None  # float sums that add up to 1 fit
    assert memory_error(0.5, 0.6, cfg) == (
        "Free memory on device cuda:0 (32.00/80.00 GiB) on startup is less than desired GPU "
        "memory utilization (0.5, 40.00 GiB). Decrease GPU memory utilization or reduce GPU "
        "memory used by other processes.")
    assert (memory_error(0.01, 0.0, cfg) or "").startswith("No available memory for the cache")
    assert memory_error(0.1, 0.0, cfg, kv_gib=8.0) is not None  # 8 GiB < 1 + 8 GiB
    assert memory_request({}) == (0.9, 0.0)
    assert memory_request({"gpu-memory-utilization": "0.3",
                           "kv-cache-memory-bytes": "2G"}) == (0.3, 2.0)
    assert parse_size("4g") == 4 * 10**9 and parse_size("1024") == 1024


def test_token_id_prompts_count_exactly() -> None:
    assert _prompt_tokens({"prompt": list(range(1000))}, "completion") == 1000
    assert _prompt_tokens({"prompt": [[1, 2, 3], [4, 5]]}, "completion") == 5
    assert _prompt_tokens({"prompt": ["Hi", "abcdefgh"]}, "completion") == 1 + 2
    assert _prompt_tokens({"prompt": "abcdefgh"}, "completion") == 2


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_idle_and_dead_co_tenants_cost_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, mps=False)
    own = Registry(cfg, pid=dead_pid())  # its own PID is never read back
    peer = Registry(cfg, pid=os.getpid())
    gone = Registry(cfg, pid=dead_pid())
    now = time.monotonic()
    gone.write(u=0.5, util=0.5, busy_until=now + 10)
    peer.write(u=0.5, util=0.3, busy_until=now - 1)  # stepped a second ago: idle
    assert SharedGpu(cfg, own).step(1, 0, now) == pytest.approx(2 * S)
    peer.write(busy_until=now + 10)
    assert SharedGpu(cfg, own).step(1, 0, now + 1) == pytest.approx(S + 1.3 * S)
    assert json.loads(own.path.read_text())["u"] == pytest.approx(1.3 / 2.3, abs=1e-4)
    assert [e["util"] for e in own.peers()] == [0.3]


def test_step_clock_gives_every_running_request_one_token_per_step(tmp_path: Path) -> None:
    cfg = config(tmp_path, step_s=0.005)
    got: dict[str, list[int]] = {"a": [], "b": [], "late": []}

    async def consume(clock: StepClock, name: str, tokens: int,
                      second: asyncio.Event | None = None) -> None:
        slot = clock.join(10, tokens)
        for _ in range(tokens):
            await clock.token(slot)
            got[name].append(clock.steps)
            if second is not None and len(got[name]) == 2:
                second.set()
        clock.leave(slot)

    async def scenario() -> int:
        clock = StepClock(SharedGpu(cfg, Registry(cfg)))
        second = asyncio.Event()
        first = asyncio.gather(consume(clock, "a", 6, second), consume(clock, "b", 3))
        await second.wait()  # step 3 starts as step 2 ends: "late" joins during step 3
        await asyncio.gather(first, consume(clock, "late", 2))
        return clock.steps

    assert asyncio.run(scenario()) == 6
    assert got == {"a": [1, 2, 3, 4, 5, 6], "b": [1, 2, 3], "late": [4, 5]}


# -- real fake engines -------------------------------------------------------------------------




def decode_rate(port: int, tokens: int, out: dict[int, float] | None = None) -> float:
    """Tokens per second of one non-stream request with a token-id prompt."""
    started = time.monotonic()
    status, body = request(port, "POST", "/v1/completions",
                           {"prompt": [7] * 100, "max_tokens": tokens}, timeout=20) or (0, b"")
    rate = tokens / (time.monotonic() - started)
    assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] == 100
    if out is not None:
        out[port] = rate
    return rate


def test_engines_decode_at_the_model_rate_and_slow_each_other_only_when_busy(rig: Rig) -> None:
    knobs = {"FAKE_GPU_DIR": str(rig.dir / "gpu"), "FAKE_GPU_CPU_S": "0.01",
             "FAKE_GPU_STEP_S": "0.01"}
    ports = free_ports(2)
    engines = [rig.engine(p, "--gpu-memory-utilization", "0.4", mps=False, **knobs)
               for p in ports]
    for port, proc in zip(ports, engines, strict=True):
        rig.ready(port, proc)
    decode_rate(ports[0], 2)  # warm-up: first-request costs of the HTTP stack
    alone = decode_rate(ports[0], 50)  # the other engine is registered but idle
    assert alone == pytest.approx(1 / 0.02, rel=0.15)
    both: dict[int, float] = {}
    threads = [threading.Thread(target=decode_rate, args=(p, 50, both)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(both) == 2
    for rate in both.values():  # MPS off, both busy: 0.01 + 1.6 * 0.01 per step at the fixed point
        assert rate == pytest.approx(1 / 0.026, rel=0.15)
    for proc in engines:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not list((rig.dir / "gpu" / "0").iterdir())


def test_oversubscribed_gpu_memory_fails_start_like_vllm(rig: Rig) -> None:
    gpu = rig.dir / "gpu"
    stale = Registry(GpuConfig(gpu, device="GPU-fake-1"), pid=dead_pid())
    stale.write(util=0.9)  # a SIGKILLed engine's file: its PID is dead, so it holds nothing
    knobs = {"FAKE_GPU_DIR": str(gpu), "CUDA_VISIBLE_DEVICES": "GPU-fake-1"}
    first, second, tiny = free_ports(3)
    holder = rig.engine(first, "--gpu-memory-utilization", "0.6", mps=False, **knobs)
    rig.ready(first, holder)
    assert json.loads((gpu / "GPU-fake-1" / str(holder.pid)).read_text())["util"] == 0.6
    refused = rig.engine(second, "--gpu-memory-utilization", "0.5", mps=False, **knobs)
    assert refused.wait(15) == 1
    starved = rig.engine(tiny, "--gpu-memory-utilization", "0.01", mps=False, **knobs)
    assert starved.wait(15) == 1
    log = (rig.dir / f"engine-{second}.log").read_text()
    assert ("ValueError: Free memory on device cuda:0 (32.00/80.00 GiB) on startup is less than "
            "desired GPU memory utilization (0.5, 40.00 GiB). Decrease GPU memory utilization "
            "or reduce GPU memory used by other processes.") in log
    assert ("ValueError: No available memory for the cache blocks. Try increasing "
            "`gpu_memory_utilization` when initializing the engine.") in (
        rig.dir / f"engine-{tiny}.log").read_text()
    names = {p.name for p in (gpu / "GPU-fake-1").iterdir()}
    assert names == {str(holder.pid), str(stale.pid)}
