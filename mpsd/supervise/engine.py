"""One engine process: start it, decide when it is ready, probe it while it runs.

Ready means three things (docs/architecture.md §2): ``/health`` answers 200, a canary request is
answered (``/health`` alone lies when EngineCore died silently, vllm #39863), and with MPS on,
one of the engine's processes is a client of its group's MPS server (a client with a wrong pipe dir
silently runs outside MPS).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anyio

from mpsd import logs
from mpsd.errors import HealthCheckFailed, MemberExited, SpawnError, StartupTimeout
from mpsd.plan.build import EnginePlan
from mpsd.supervise import starts
from mpsd.supervise.mps import MpsDaemon
from mpsd.supervise.process import ChildProcess
from mpsd.supervise.tree import TreeWatch, group_pids

_log = logs.get("mpsd.engine")
_READY_POLL_S = 0.1
_START_PROBE_TIMEOUT_S = 5.0
_MIN_PROBE_TIMEOUT_S = 1.0
PROGRESS_EVERY_S = 15.0
#: What mpsd itself asks every engine, often: the engine's access-log lines of these requests
#: would bury everything else in the journal (vLLM runs with its access log off anyway).
_PROBED_PATHS = frozenset({"/health", "/metrics", "/v1/models"})


def port_free(port: int) -> bool:
    """Whether ``127.0.0.1:port`` can be bound (as the engine will, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _Progress:
    """Tells an operator watching a start which phase an engine is in: at each change, and
    every ``PROGRESS_EVERY_S`` while one lasts (a model load takes minutes), with the phases
    the engine itself reported done so far (weights, compile, ...)."""

    def __init__(self, plan: EnginePlan, started: float, phases: logs.StartPhases) -> None:
        self._plan = plan
        self._started = self._said = started
        self._phases = phases
        self.phase = ""

    def enter(self, phase: str) -> None:
        self.phase = phase
        self._say("engine_phase", "{key}: {phase} ({seconds:.0f} s)")

    def tick(self) -> None:
        if time.monotonic() - self._said >= PROGRESS_EVERY_S:
            done = f"; done: {self._phases.text()}" if self._phases.seconds else ""
            self._say("engine_loading", "{key}: still {phase}, {seconds:.0f} s so far "
                      f"(gives up at {self._plan.startup_timeout_s:g} s){done}")

    def _say(self, event: str, template: str) -> None:
        self._said = time.monotonic()
        seconds = round(self._said - self._started, 1)
        _log.info(event, gpu=self._plan.gpu, engine=self._plan.key, phase=self.phase,
                  seconds=seconds, engine_phases=dict(self._phases.seconds),
                  msg=template.format(key=self._plan.key, phase=self.phase, seconds=seconds))


class Engine:
    """A running (or about to run) engine of a group."""

    def __init__(self, plan: EnginePlan, session: aiohttp.ClientSession,
                 registry: Path | None) -> None:
        self.plan = plan
        self._session = session
        #: this start's phases as the engine reports them (``mpsd status``, the metrics)
        self.phases = logs.StartPhases()
        # the previous start's, beside the child records in state_dir
        self._history = (registry.parent / "starts" / f"{plan.key}.json"
                         if registry is not None else None)
        self.process = ChildProcess(
            plan.key, plan.argv, plan.env, cpus=plan.cpus, registry=registry,
            log_fields={"gpu": plan.gpu, "engine": plan.key},
            levels=logs.EngineOutput(plan.key, _PROBED_PATHS | {plan.health_path},
                                     lambda: self.stopping, self.phases),
            output_file=plan.log_file)
        self.stopping = False
        self.answered = False  # /health said 200 once: it booted, whatever happens next
        self.mps_pids: frozenset[int] = frozenset()  # its MPS clients, seen by the attach check
        self._condemned = anyio.Event()
        self._verdict = ("", "")

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def pid(self) -> int | None:
        return self.process.running_pid

    def condemn(self, signal: str, reason: str) -> None:
        """A fault seen from outside its own watchers (the proxy, the MPS server's log)."""
        if not self._condemned.is_set():
            self._verdict = (signal, reason)
            self._condemned.set()

    @property
    def condemned(self) -> bool:
        return self._condemned.is_set()

    async def wait_condemned(self) -> tuple[str, str]:
        """Until :meth:`condemn`: (signal, reason)."""
        await self._condemned.wait()
        return self._verdict

    async def start(self) -> None:
        """Spawn; :class:`SpawnError` when its port is taken (the engine would die on bind
        after a long model load, or worse, another server would answer in its place)."""
        if not port_free(self.plan.port):
            raise SpawnError(f"{self.key}: port {self.plan.port} on 127.0.0.1 is already in use; "
                             "free it or change daemon.engine_port_base")
        self.phases.begin()
        await self.process.start()

    async def wait_ready(self, mps: MpsDaemon | None) -> float:
        """Until ready; seconds it took. Raises on exit, timeout or a failed canary."""
        started = time.monotonic()
        progress = _Progress(self.plan, started, self.phases)
        try:
            with anyio.fail_after(self.plan.startup_timeout_s):
                progress.enter("loading, waiting for /health")
                while not await self._healthy(_START_PROBE_TIMEOUT_S):
                    self._check_alive("during start-up")
                    progress.tick()
                    await anyio.sleep(_READY_POLL_S)
                self.answered = True
                progress.enter("/health answered, canary request")
                await self.canary()
                if mps is not None:
                    progress.enter("waiting for it to attach to MPS")
                    await self._wait_attached(mps, progress)
        except TimeoutError:  # fail_after raises on leaving its block, so it is caught here
            raise StartupTimeout(f"{self.key} not ready after "
                                 f"{self.plan.startup_timeout_s:g}s") from None
        took = time.monotonic() - started
        self.phases.end("ready")
        _log.info("engine_ready", gpu=self.plan.gpu, engine=self.key, port=self.plan.port,
                  seconds=round(took, 3), phases=dict(self.phases.seconds),
                  msg=f"{self.key}: ready in {took:.1f} s ({self.phases.text()})")
        self._compare_with_previous_start()
        return took

    def _compare_with_previous_start(self) -> None:
        """Warn when this start was much slower than the engine's previous one, naming the
        phase that grew; then this start becomes the previous one."""
        if self._history is None:
            return
        before = starts.load(self._history)
        starts.save(self._history, self.phases.seconds)
        if before is None or (grew := starts.grown(before, self.phases.seconds)) is None:
            return
        phase, then, now = grew
        total_then, total_now = sum(before.values()), sum(self.phases.seconds.values())
        _log.warning("engine_start_slower", gpu=self.plan.gpu, engine=self.key, phase=phase,
                     seconds=round(total_now, 3), previous_s=round(total_then, 3),
                     phase_s=now, phase_previous_s=then,
                     msg=f"{self.key}: this start took {total_now:.1f} s, the previous one "
                         f"{total_then:.1f} s; {phase} grew from {then:.1f} s to {now:.1f} s")

    async def watch_health(self, on_probe: Callable[[bool], None]) -> None:
        """Probe every ``health_interval_s``; raise after ``health_failures`` in a row.

        A probe times out after the interval itself (at least 1 s), not a fixed 5 s: a stopped
        or stuck engine is then unrouted after one failed probe (``on_probe(False)``, about
        3 s with the defaults) and a fault after ``health_failures``; ``on_probe(True)``
        routes it again after a single slow answer.
        """
        interval = self.plan.health_interval_s
        timeout = max(interval, _MIN_PROBE_TIMEOUT_S)
        failures = 0
        while True:
            await anyio.sleep(interval)
            if await self._healthy(timeout):
                if failures:
                    on_probe(True)
                failures = 0
                continue
            failures += 1
            on_probe(False)
            _log.warning("health_probe_failed", gpu=self.plan.gpu, engine=self.key,
                         failures=failures, limit=self.plan.health_failures)
            if failures >= self.plan.health_failures:
                raise HealthCheckFailed(f"{self.key}: {failures} failed health probes")

    async def watch_tree(self) -> tuple[int, str]:
        """Until a process of the engine other than its leader exits: (PID, name)."""
        pid = self.pid
        if pid is None:
            return 0, "?"
        return await TreeWatch(pid, self.key, self.plan.health_interval_s).wait_exit()

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

    async def _wait_attached(self, mps: MpsDaemon, progress: _Progress) -> None:
        while not (clients := await self.mps_clients(mps)):
            self._check_alive("before attaching to MPS")
            progress.tick()
            await anyio.sleep(_READY_POLL_S)
        self.mps_pids = frozenset(clients)

    async def _healthy(self, timeout_s: float) -> bool:
        try:
            async with self._session.get(
                f"{self.plan.base_url}{self.plan.health_path}",
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _check_alive(self, when: str) -> None:
        code = self.process.returncode
        if code is not None:
            raise MemberExited(f"{self.key} exited with code {code} {when}")
