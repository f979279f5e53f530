"""One engine process: start it, decide when it is ready, probe it while it runs.

Ready means three things (docs/architecture.md §2): ``/health`` answers 200, a canary request is
answered (``/health`` alone lies when EngineCore died silently, vllm #39863), and with MPS on,
one of the engine's processes is a client of its group's MPS server (a client with a wrong pipe dir
silently runs outside MPS).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import aiohttp
import anyio

from mpsd import logs
from mpsd.errors import HealthCheckFailed, MemberExited, SpawnError, StartupTimeout
from mpsd.plan.build import EnginePlan
from mpsd.supervise.mps import MpsDaemon
from mpsd.supervise.process import ChildProcess

_log = logs.get("mpsd.engine")
_READY_POLL_S = 0.1
_PROBE_TIMEOUT_S = 5.0


def group_pids(pgid: int) -> set[int]:
    """Every live process whose process group is ``pgid`` (an engine and what it forked)."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.add(int(entry.name))
    return pids


def port_free(port: int) -> bool:
    """Whether ``127.0.0.1:port`` can be bound (as the engine will, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Engine:
    """A running (or about to run) engine of a group."""

    def __init__(self, plan: EnginePlan, session: aiohttp.ClientSession,
                 registry: Path | None) -> None:
        self.plan = plan
        self._session = session
        self.process = ChildProcess(
            plan.key, plan.argv, plan.env, cpus=plan.cpus, registry=registry,
            log_fields={"gpu": plan.gpu, "engine": plan.key})
        self.stopping = False
        self.answered = False  # /health said 200 once: it booted, whatever happens next

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def pid(self) -> int | None:
        return self.process.running_pid

    async def start(self) -> None:
        """Spawn; :class:`SpawnError` when its port is taken (the engine would die on bind
        after a long model load, or worse, another server would answer in its place)."""
        if not port_free(self.plan.port):
            raise SpawnError(f"{self.key}: port {self.plan.port} on 127.0.0.1 is already in use; "
                             "free it or change daemon.engine_port_base")
        await self.process.start()

    async def wait_ready(self, mps: MpsDaemon | None) -> float:
        """Until ready; seconds it took. Raises on exit, timeout or a failed canary."""
        started = time.monotonic()
        with anyio.fail_after(self.plan.startup_timeout_s) as scope:
            try:
                while not await self._healthy():
                    self._check_alive("during start-up")
                    await anyio.sleep(_READY_POLL_S)
                self.answered = True
                await self.canary()
                if mps is not None:
                    await self._wait_attached(mps)
            except TimeoutError:
                if scope.cancel_called:
                    raise StartupTimeout(f"{self.key} not ready after "
                                         f"{self.plan.startup_timeout_s:g}s") from None
                raise
        took = time.monotonic() - started
        _log.info("engine_ready", gpu=self.plan.gpu, engine=self.key, port=self.plan.port,
                  seconds=round(took, 3))
        return took

    async def watch_health(self) -> None:
        """Probe every ``health_interval_s``; raise after ``health_failures`` in a row."""
        failures = 0
        while True:
            await anyio.sleep(self.plan.health_interval_s)
            if await self._healthy():
                failures = 0
                continue
            failures += 1
            _log.warning("health_probe_failed", gpu=self.plan.gpu, engine=self.key,
                         failures=failures, limit=self.plan.health_failures)
            if failures >= self.plan.health_failures:
                raise HealthCheckFailed(f"{self.key}: {failures} failed health probes")

    async def canary(self) -> None:
        """One cheap real request: proves the engine core answers, not just the HTTP layer."""
        if self.plan.canary == "none":
            return
        url = self.plan.base_url
        try:
            if self.plan.canary == "models":
                async with self._session.get(f"{url}/v1/models") as resp:
                    ok = resp.status == 200
            else:
                body = {"model": self.plan.model, "prompt": "ping", "max_tokens": 1}
                async with self._session.post(f"{url}/v1/completions", json=body) as resp:
                    await resp.read()
                    ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise HealthCheckFailed(f"{self.key}: canary request failed: {exc}") from exc
        if not ok:
            raise HealthCheckFailed(f"{self.key}: canary request answered {resp.status}")

    async def mps_clients(self, mps: MpsDaemon) -> set[int]:
        """Those of this engine's processes that are clients of the group's MPS server."""
        if self.pid is None:
            return set()
        return group_pids(self.pid) & await mps.clients()

    async def _wait_attached(self, mps: MpsDaemon) -> None:
        while not await self.mps_clients(mps):
            self._check_alive("before attaching to MPS")
            await anyio.sleep(_READY_POLL_S)

    async def _healthy(self) -> bool:
        try:
            async with self._session.get(
                f"{self.plan.base_url}{self.plan.health_path}",
                timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _check_alive(self, when: str) -> None:
        code = self.process.returncode
        if code is not None:
            raise MemberExited(f"{self.key} exited with code {code} {when}")
