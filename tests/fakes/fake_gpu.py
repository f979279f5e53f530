"""The shared-GPU model of the fake engine: knobs, the pure step-time math and the memory check.

Why: ``mpsd tune`` searches engines per GPU, MPS on/off and the active thread percentage, and
its tests need fake engines whose throughput reacts to those choices the way engines sharing a
GPU do. The fixed per-token delay (``FAKE_ENGINE_TOKEN_DELAY_S``) makes N engines exactly N
times as fast; this model makes more engines help only while the GPU has idle time, then
plateau, makes MPS off (time-sliced contexts) worse than MPS on, lets idle co-tenants cost
nothing, and refuses start-up when the memory shares of co-tenants do not fit. It is opt-in
(``FAKE_GPU_DIR``); without it the fake paces exactly as before.

Model (continuous batching): while an engine has running requests it runs steps, and each
running request gets one token per step. Engine ``i``'s step takes

    W_i    = (STEP_S + SEQ_S * running + PREFILL_S * new_prompt_tokens) * 100 / p_i
    step_i = CPU_S + W_i * f_i
    f_i    = max(1, sum over busy engines j of u_j * p_j / 100)   [* (1 + PENALTY) when MPS is
             off and at least two engines are busy]

where ``u_j = W_j * f_j / step_j`` is engine j's GPU occupancy (published as a moving average
in the registry, see fake_gpu_clock.py) and ``p`` is ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
(100 without MPS). With ``CPU_S == STEP_S``: one engine has the GPU busy half the time, so two
engines under MPS double the throughput, a third adds nothing, and MPS off costs 1.3x.

Knobs (environment, read once at start; each may be overridden per port with ``_PORT_<port>``):
  FAKE_GPU_DIR                 directory shared by the fake engines of a test (turns it on)
  FAKE_GPU_CPU_S               engine CPU time per step (default 0.02)
  FAKE_GPU_STEP_S              GPU time of a decode step at 100 % of the SMs (default 0.02)
  FAKE_GPU_SEQ_S               GPU time per running sequence per step (default 0.0001)
  FAKE_GPU_PREFILL_S           GPU time per prompt token admitted since the last step (0.00002)
  FAKE_GPU_TIMESLICE_PENALTY   extra factor with MPS off and two or more busy engines (0.3)
  FAKE_GPU_MEMORY_GIB          device memory (default 80)
  FAKE_GPU_MODEL_GIB           weights of the model (default 1.0)
MPS is on when ``CUDA_MPS_PIPE_DIRECTORY`` is set (mpsd sets it only with MPS enabled); the
device is the first entry of ``CUDA_VISIBLE_DEVICES`` (default ``0``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.fakes import fakeutil

GIB = 1024**3
DEFAULT_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default
_SIZE_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class GpuConfig:
    """The knobs of one engine's view of its GPU (see the module docstring)."""

    dir: Path
    device: str = "0"
    cpu_s: float = 0.02
    step_s: float = 0.02
    seq_s: float = 0.0001
    prefill_s: float = 0.00002
    penalty: float = 0.3
    memory_gib: float = 80.0
    model_gib: float = 1.0
    mps: bool = False
    pct: float = 100.0

    @classmethod
    def from_env(cls, port: int | None = None) -> GpuConfig | None:
        """The configuration from the environment; None when ``FAKE_GPU_DIR`` is unset."""
        root = fakeutil.knob("FAKE_GPU_DIR", port)
        if not root:
            return None
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        device = devices.split(",")[0].strip().replace("/", "_") or "0"
        mps = bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
        pct = _float(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"), 100.0) if mps else 100.0
        d = cls(Path(root))

        def knob(name: str, default: float) -> float:
            value = fakeutil.knob_float(f"FAKE_GPU_{name}", default, port)
            return default if value is None else value

        return cls(
            dir=Path(root), device=device, cpu_s=knob("CPU_S", d.cpu_s),
            step_s=knob("STEP_S", d.step_s), seq_s=knob("SEQ_S", d.seq_s),
            prefill_s=knob("PREFILL_S", d.prefill_s),
            penalty=knob("TIMESLICE_PENALTY", d.penalty),
            memory_gib=knob("MEMORY_GIB", d.memory_gib), model_gib=knob("MODEL_GIB", d.model_gib),
            mps=mps, pct=min(100.0, max(1.0, pct)))


def _float(raw: str | None, default: float) -> float:
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


@dataclass(frozen=True)
class Load:
    """One busy engine as the step model sees it: GPU occupancy ``u`` (0..1), SM share ``pct``."""

    u: float
    pct: float = 100.0


def gpu_work(cfg: GpuConfig, running: int, prompt_tokens: int) -> float:
    """``W``: seconds of GPU time of one step on this engine's SM share, without contention."""
    return (cfg.step_s + cfg.seq_s * running + cfg.prefill_s * prompt_tokens) * 100.0 / cfg.pct


def contention(busy: Sequence[Load], mps: bool, penalty: float) -> float:
    """``f``: how much the busy engines of a device (this one included) stretch GPU work."""
    f = max(1.0, sum(b.u * b.pct / 100.0 for b in busy))
    if not mps and len(busy) >= 2:
        f *= 1.0 + penalty
    return f


def step_time(cpu_s: float, work_s: float, own: Load, peers: Sequence[Load], mps: bool,
              penalty: float) -> tuple[float, float]:
    """One step of an engine: ``(step seconds, its GPU occupancy u during that step)``.

    ``own`` is this engine's current (smoothed) occupancy, ``peers`` the busy co-tenants.
    """
    gpu = work_s * contention([own, *peers], mps, penalty)
    step = cpu_s + gpu
    return step, (gpu / step if step > 0 else 0.0)


def parse_size(text: str) -> int:
    """vLLM's human-readable integers: ``4G`` is 4 GiB, ``4g`` is 4e9, plain numbers as is."""
    text = text.strip()
    if text and text[-1] in _SIZE_UNITS:
        return int(float(text[:-1]) * _SIZE_UNITS[text[-1]])
    return int(float(text))


def memory_request(flags: Mapping[str, str]) -> tuple[float, float]:
    """``(--gpu-memory-utilization, --kv-cache-memory-bytes in GiB)`` from ``vllm serve`` flags."""
    util = _float(flags.get("gpu-memory-utilization"), DEFAULT_UTILIZATION)
    raw_kv = flags.get("kv-cache-memory-bytes")
    return util, (parse_size(raw_kv) / GIB if raw_kv else 0.0)


def memory_error(util: float, others: float, cfg: GpuConfig, kv_gib: float = 0.0) -> str | None:
    """vLLM's start-up refusal for a share ``util`` next to co-tenants holding ``others``
    (sum of their shares), or None when it fits."""
    total = cfg.memory_gib
    free = max(0.0, 1.0 - others) * total
    wanted = util * total
    if util + others > 1.0 + 1e-9:
        return (f"Free memory on device cuda:0 ({free:.2f}/{total:.2f} GiB) on startup is less "
                f"than desired GPU memory utilization ({util}, {wanted:.2f} GiB). Decrease GPU "
                "memory utilization or reduce GPU memory used by other processes.")
    if wanted < cfg.model_gib + kv_gib:
        return ("No available memory for the cache blocks. Try increasing "
                "`gpu_memory_utilization` when initializing the engine.")
    return None
