"""One fake engine's share of the fake GPU: its registry entry and its continuous-batching clock.

Why apart from fake_gpu.py: that module is the pure model; this one is what an engine process
does with it. Engines of one test see each other only through files, like processes sharing a
real GPU see each other only through its memory and SMs:

* Registry: ``<FAKE_GPU_DIR>/<device>/<pid>`` (the API server's PID) holds one JSON object
  ``{"pid", "core_pid", "util", "u", "pct", "mps", "busy_until"}``, replaced atomically (temp
  file + rename). ``util`` is the engine's ``--gpu-memory-utilization``, ``u`` its smoothed GPU
  occupancy, ``busy_until`` (CLOCK_MONOTONIC, system-wide) the end of its last step. An entry
  counts while its PID or its EngineCore's PID lives (an orphaned EngineCore keeps its memory);
  the API server removes it on exit. A co-tenant is busy while ``now - busy_until < BUSY_S``,
  so an idle engine costs the others nothing. Entries are written at most every
  ``PUBLISH_S`` and peers re-read the directory at most every ``READ_S``.
* Start-up: the engine writes its entry first, then sums the shares of the live entries; when
  they do not fit it removes its entry and fails like vLLM. Engines started one after another
  (as mpsd starts the engines of a GPU) therefore always see each other.
* StepClock: while requests run, one task runs steps of the model's length on a fixed grid
  (sleep overshoot does not accumulate); every request that was running when a step started
  gets one token when it ends, so N output tokens take N steps whether streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

from tests.fakes.fake_gpu import (
    GpuConfig,
    Load,
    gpu_work,
    memory_error,
    memory_request,
    step_time,
)
from tests.fakes.fakeutil import JsonObj

BUSY_S = 0.3
PUBLISH_S = 0.075
READ_S = 0.075
ALPHA = 0.3  # weight of the newest step in the occupancy average


class GpuMemoryError(Exception):
    """The engine's memory share does not fit next to its co-tenants (vLLM's ValueError)."""


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _num(entry: JsonObj, key: str, default: float = 0.0) -> float:
    value = entry.get(key, default)
    return float(value) if isinstance(value, int | float) else default


class Registry:
    """This engine's file under ``<dir>/<device>/`` and a cached view of its co-tenants."""

    def __init__(self, cfg: GpuConfig, pid: int | None = None) -> None:
        self.root = cfg.dir / cfg.device
        self.pid = pid or os.getpid()
        self.path = self.root / str(self.pid)
        self.entry: JsonObj = {"pid": self.pid, "core_pid": 0, "util": 0.0, "u": 0.0,
                               "pct": cfg.pct, "mps": cfg.mps, "busy_until": 0.0}
        self._peers: list[JsonObj] = []
        self._read_at = -math.inf

    def write(self, **fields: object) -> None:
        """Update and publish the entry in one rename (readers never see half a file)."""
        self.entry.update(fields)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.pid}.tmp"
        tmp.write_text(json.dumps(self.entry))
        tmp.replace(self.path)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)

    def peers(self, now: float | None = None) -> list[JsonObj]:
        """The live co-tenants' entries; re-read at most every READ_S (``now=None``: now)."""
        if now is not None and now - self._read_at < READ_S:
            return self._peers
        self._read_at = time.monotonic() if now is None else now
        found: list[JsonObj] = []
        with contextlib.suppress(OSError):
            for item in self.root.iterdir():
                if not item.name.isdigit() or int(item.name) == self.pid:
                    continue
                try:
                    entry = json.loads(item.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(entry, dict) and (
                        alive(int(item.name)) or alive(int(_num(entry, "core_pid")))):
                    found.append(entry)
        self._peers = found
        return found


class SharedGpu:
    """One engine on the fake GPU: the step time it gets and the occupancy it publishes."""

    def __init__(self, cfg: GpuConfig, registry: Registry) -> None:
        self.cfg = cfg
        self.registry = registry
        self.u = 0.0
        self.busy_until = -math.inf
        self._published = -math.inf

    def step(self, running: int, prompt_tokens: int, now: float) -> float:
        """Seconds of the step starting at ``now`` (monotonic) for this batch."""
        cfg = self.cfg
        peers = [Load(_num(e, "u"), _num(e, "pct", 100.0)) for e in self.registry.peers(now)
                 if now - _num(e, "busy_until") < BUSY_S]
        work = gpu_work(cfg, running, prompt_tokens)
        step, u = step_time(cfg.cpu_s, work, Load(self.u, cfg.pct), peers, cfg.mps, cfg.penalty)
        fresh = now - self.busy_until > BUSY_S  # back from idle: no history worth averaging
        self.u = u if fresh else self.u + ALPHA * (u - self.u)
        self.busy_until = now + step
        if fresh or step > PUBLISH_S or now - self._published >= PUBLISH_S:
            self._published = now
            with contextlib.suppress(OSError):
                self.registry.write(u=round(self.u, 5), busy_until=self.busy_until)
        return step

    def close(self) -> None:
        self.registry.remove()


def register(port: int, flags: Mapping[str, str]) -> SharedGpu | None:
    """Join the fake GPU at start-up (``vllm serve`` flags give the memory share).

    None when ``FAKE_GPU_DIR`` is unset; GpuMemoryError (vLLM's message) when it does not fit.
    """
    cfg = GpuConfig.from_env(port)
    if cfg is None:
        return None
    util, kv_gib = memory_request(flags)
    registry = Registry(cfg)
    registry.write(util=util)
    others = sum(_num(e, "util") for e in registry.peers())
    error = memory_error(util, others, cfg, kv_gib)
    if error is not None:
        registry.remove()
        raise GpuMemoryError(error)
    return SharedGpu(cfg, registry)


class Slot:
    """One running request in the batch: tokens the engine still owes it, made and taken."""

    __slots__ = ("left", "made", "taken")

    def __init__(self, tokens: int) -> None:
        self.left = tokens
        self.made = 0
        self.taken = 0


class StepClock:
    """Continuous batching: one step loop per engine, one token per running request per step."""

    def __init__(self, gpu: SharedGpu) -> None:
        self.gpu = gpu
        self.active: set[Slot] = set()
        self.pending_prompt = 0
        self.steps = 0
        self._tick = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def join(self, prompt_tokens: int, max_tokens: int) -> Slot:
        """A request starts running; its prompt is prefilled in the next step."""
        slot = Slot(max_tokens)
        self.active.add(slot)
        self.pending_prompt += prompt_tokens
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return slot

    def leave(self, slot: Slot) -> None:
        """A request ends (done, aborted or failed); no-op when its tokens were all made."""
        self.active.discard(slot)

    async def token(self, slot: Slot) -> None:
        """Wait for the request's next token (at once when the engine made it already)."""
        while slot.made <= slot.taken:
            await self._tick.wait()
        slot.taken += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        grid = loop.time()
        while True:
            if not self.active:
                self._wake.clear()
                await self._wake.wait()
            members = list(self.active)
            tokens, self.pending_prompt = self.pending_prompt, 0
            now = loop.time()
            step = self.gpu.step(len(members), tokens, now)
            if grid < now - step:  # idle or stalled: restart the grid, catch up one step at most
                grid = now
            grid += step
            await asyncio.sleep(max(0.0, grid - loop.time()))
            self.steps += 1
            for slot in members:
                if slot in self.active:
                    slot.made += 1
                    slot.left -= 1
                    if slot.left <= 0:
                        self.active.discard(slot)
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()
