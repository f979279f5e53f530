"""The composition root of ``mpsd run``: signals, ordered start and ordered stop.

Start: facts about the host → plan → reap a previous run's leftovers → proxy listening →
control socket → groups (MPS, then engines) → ``READY=1`` once every group is RUNNING or
FAILED. Stop (SIGTERM/SIGINT): ``STOPPING=1`` and readiness (``/health``) 503 while requests
are still served for ``proxy.unready_grace_s`` (a load balancer notices meanwhile; a second
signal cuts it short), then groups drain and stop their engines, then their MPS daemons, then
the control socket and the proxy close. SIGHUP (and ``mpsd reload``)
re-plans the file and applies it by diff; a bad file keeps the old config serving. Signals are
handled here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import aiohttp
import anyio

from mpsd import __version__, logs, state_lock
from mpsd.config import Config
from mpsd.control.client import socket_path
from mpsd.control.server import ControlServer
from mpsd.control.text import ready_line
from mpsd.errors import ConfigError, ExitCode
from mpsd.host.facts import resolve
from mpsd.host.nvml import XidWatcher
from mpsd.observe.metrics import Metrics, metrics_handler
from mpsd.observe.status_page import status_page_handler, status_page_redirect
from mpsd.observe.systemd import Notifier
from mpsd.plan.build import Plan
from mpsd.pool import BackendPool
from mpsd.proxy.server import ProxyServer
from mpsd.supervise.contract import GroupOptions
from mpsd.supervise.preflight import CannotStart, preflight, preflight_start
from mpsd.supervise.process import reap_leftovers
from mpsd.supervise.supervisor import Supervisor

_log = logs.get("mpsd.daemon")
_EXTEND_EVERY_S = 20.0


def group_options(config: Config) -> GroupOptions:
    """What every group needs from the config's non-GPU sections."""
    return GroupOptions(mps=config.mps, restart=config.restart,
                        drain_timeout_s=config.proxy.drain_timeout_s,
                        registry=config.daemon.state_dir / "pgids", environ=dict(os.environ))


class Daemon:
    """One ``mpsd run``: owns the pieces for the lifetime of the process."""

    def __init__(self, file: str, config: Config, supervisor: Supervisor, proxy: ProxyServer,
                 notifier: Notifier) -> None:
        self.file = file
        self.config = config
        self.supervisor = supervisor
        self.proxy = proxy
        self.notifier = notifier
        self._reload_lock = anyio.Lock()
        self._stopping = False
        self._unready_at: float | None = None
        self._hurry = anyio.Event()

    async def reload(self) -> dict[str, Any]:
        """Re-read the file, check it, apply it. Whatever goes wrong, mpsd keeps running and
        the answer says why: a config or a plan that cannot start (missing executable, taken
        port, unwritable directory) is refused before anything is touched, and the old one
        keeps serving; an engine that does not come up is reported with its reason."""
        async with self._reload_lock:
            self.notifier.reloading()
            _log.info("reload_started", config=self.file)
            try:
                resolved = await resolve(self.file)
                config = resolved.config
                problems = preflight(resolved.plan, control_binary=config.mps.control_binary,
                                     state_dir=config.daemon.state_dir,
                                     held_ports=self.supervisor.held_ports())
            except ConfigError as exc:
                problems = [str(exc)]
            except Exception as exc:  # reading the host's facts failed: keep what runs
                _log.exception("reload_check_failed")
                problems = [f"could not check the new config: {exc!r}"]
            if problems:
                _log.error("reload_rejected", error="; ".join(problems))
                self.notifier.ready(f"reload failed, old config kept: {problems[0]}")
                return {"ok": False, "kept": True, "error": "; ".join(problems)}
            try:
                result = await self.supervisor.reload(resolved.plan, group_options(config))
            except Exception as exc:  # never let a reload take the daemon down
                _log.exception("reload_failed")
                self.notifier.ready(self.supervisor.status_line())
                return {"ok": False, "kept": False,
                        "error": f"reload failed halfway: {exc!r}; see mpsd status"}
            self.proxy.apply(config.proxy)
            self.config = config
            self.notifier.ready(self.supervisor.status_line())
            _log.info("reload_done", **result)
            failed = result["problems"]
            return {"ok": not failed, "kept": False, **result,
                    **({"error": "applied, but " + "; ".join(failed)} if failed else {})}

    async def handle_signals(self) -> None:
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with anyio.open_signal_receiver(*signals) as received:
            async with anyio.create_task_group() as tg:
                async for signum in received:
                    _log.info("signal_received", signal=signal.Signals(signum).name)
                    if signum == signal.SIGHUP:
                        # a storm coalesces: one reload waiting for its turn reads the
                        # file as it is then, for every SIGHUP that came meanwhile
                        if not self._reload_lock.statistics().tasks_waiting:
                            tg.start_soon(self.reload)
                    elif self._stopping:  # a second SIGTERM/SIGINT: no more grace
                        self._hurry.set()
                    else:
                        self._stopping = True
                        tg.start_soon(self._stop)

    async def _stop(self) -> None:
        """Leave the balancer's rotation, then refuse new requests and stop every group."""
        self.notifier.stopping("stopping")
        self.supervisor.refuse_starts()  # a stop wins: nothing new starts from now on
        await self._leave_rotation("stopping")
        self.notifier.status("stopping: draining engines")
        self.proxy.refuse_new()
        self.supervisor.stop()

    async def _leave_rotation(self, why: str) -> None:
        """Readiness 503 now; keep serving every request until ``unready_grace_s`` has passed
        since it turned 503 (a balancer's health checks need that long to notice), unless no
        engine is routable anyway or a second signal says hurry."""
        grace = self.config.proxy.unready_grace_s
        if self._unready_at is None:
            self._unready_at = anyio.current_time()
            self.proxy.set_ready(False)
            _log.info("readiness_off", reason=why, grace_s=grace, msg=(
                f"{why}: /health answers 503; requests are still served for {grace:g} s so "
                "that a load balancer notices (proxy.unready_grace_s)"
                + ("; Ctrl-C (or SIGTERM) again stops at once" if why == "stopping" else "")))
        if not self.supervisor.pool.routable_count():
            return
        self.notifier.status(f"{why}: not ready, still serving for {grace:g} s")
        with anyio.move_on_after(self._unready_at + grace - anyio.current_time()):
            await self._hurry.wait()

    async def drain_all(self) -> dict[str, Any]:
        """``mpsd drain --all``: leave the rotation (as SIGTERM does), then drain and stop every
        GPU. The daemon keeps running, alive and not ready; ``mpsd restart GPU`` brings a GPU
        back, and readiness follows its engines again."""
        await self._leave_rotation("drain --all")
        gpus = list(self.supervisor.groups)
        async with anyio.create_task_group() as tg:
            for key in gpus:
                tg.start_soon(self.supervisor.drain_group, key)
        if not self._stopping:
            self._unready_at = None
            self.proxy.set_ready(True)  # nothing is routable now: /health stays 503
            self.notifier.status(self.supervisor.status_line())
        _log.info("drained_all", gpus=gpus)
        return {"ok": True, "gpus": gpus}

    def alive(self) -> bool:
        """Liveness (``/livez``): the supervisor's tasks run, or the daemon is stopping on
        purpose. A FAILED GPU leaves it alive (restarting mpsd would not mend the GPU); a
        stuck event loop does not answer at all."""
        return self._stopping or self.supervisor.alive()

    async def announce_ready(self) -> None:
        """``EXTEND_TIMEOUT_USEC`` while engines load, ``READY=1`` once every group settled."""
        while True:
            with anyio.move_on_after(_EXTEND_EVERY_S / 2):
                await self.supervisor.wait_settled()
                break
            self.notifier.extend_timeout(_EXTEND_EVERY_S)
        status = self.supervisor.status_line()
        self.notifier.ready(status)
        engines = self.supervisor.pool.snapshot()
        serving = [b for b in engines if b["routable"]]
        proxy = self.config.proxy
        msg = ready_line(len(serving), len(engines), proxy.listen,
                         serving[0]["model"] if serving else None, bool(proxy.api_keys_file),
                         status)
        _log.log(logs.level_number("info" if serving else "error"), "mpsd_ready",
                 status=status, msg=msg)


async def _watch_xids(plan: Plan, supervisor: Supervisor) -> XidWatcher | None:
    """Xid events of the planned GPUs, delivered on the loop; None without NVML."""
    uuids = [g.uuid for g in plan.groups if g.uuid.startswith("GPU-")]
    if not uuids:
        return None
    loop = asyncio.get_running_loop()

    def deliver(uuid: str, xid: int) -> None:  # on the watcher's thread
        loop.call_soon_threadsafe(supervisor.report_xid, uuid, xid)

    watcher = XidWatcher(uuids, deliver)
    started = await anyio.to_thread.run_sync(watcher.start)
    return watcher if started else None


async def run(file: str) -> ExitCode:
    """``mpsd run``: serve until SIGTERM/SIGINT (exit 0). A FAILED GPU, even every GPU, does
    not end it: readiness and status say so, and ``mpsd restart`` or a reload mends it."""
    resolved = await resolve(file)
    config, plan = resolved.config, resolved.plan
    _owner = state_lock.acquire(config.daemon.state_dir)  # held until run() returns
    logs.setup(config.daemon.log_format, config.daemon.log_level)
    _log.info("mpsd_starting", version=__version__, config=file, pid=os.getpid(),
              groups=len(plan.groups), engines=sum(len(g.engines) for g in plan.groups))
    _log.info("mps_mode", enabled=plan.mps_enabled, reason=plan.mps_reason)
    for warning in plan.warnings:
        _log.warning("plan_warning", detail=warning)
    options = group_options(config)
    reaped = reap_leftovers(options.registry) if options.registry is not None else []
    problems = await preflight_start(plan, config, settle_s=2.0 if reaped else 0.0)
    if problems:  # what check-config and reload say of this file, before anything starts
        raise CannotStart(file, problems)
    if plan.proxy_cpus:
        os.sched_setaffinity(0, plan.proxy_cpus)
        _log.info("proxy_cpus", cpus=list(plan.proxy_cpus))
    notifier = Notifier()
    pool = BackendPool()
    metrics = Metrics(pool)
    timeout = aiohttp.ClientTimeout(total=None, connect=config.proxy.connect_timeout_s)
    # Everything started below is stopped in reverse order by this one stack, on every path
    # out (a normal stop, a start that fails halfway, a cancellation): Xid watcher, control
    # socket, proxy (drained), HTTP session.
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        supervisor = Supervisor(plan, options, pool, session,
                                observers=[metrics], on_status=notifier.status)
        supervisor.diagnose = metrics.diagnosis.of
        proxy = ProxyServer(config.proxy, pool, supervisor.status, observer=metrics,
                            alive=lambda: daemon.alive())  # noqa: PLW0108 - made below
        metrics.watch_readiness(proxy.ready)
        proxy.add_route("GET", "/metrics", metrics_handler(metrics.render))
        proxy.add_route("GET", "/metrics/engines", metrics_handler(metrics.render_engines))
        proxy.add_route("GET", "/mpsd/", status_page_handler)
        proxy.add_route("GET", "/mpsd", status_page_redirect)
        daemon = Daemon(file, config, supervisor, proxy, notifier)
        await proxy.start()
        stack.push_async_callback(lambda: proxy.stop(daemon.config.proxy.drain_timeout_s))
        control = ControlServer(socket_path(config.daemon.state_dir), supervisor, daemon.reload,
                                drain_all=daemon.drain_all)
        await control.start()
        stack.push_async_callback(control.stop)
        xids = await _watch_xids(plan, supervisor)
        if xids is not None:
            stack.push_async_callback(anyio.to_thread.run_sync, xids.stop)
        stack.callback(notifier.stopping, "stopping: closing the proxy")
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.handle_signals)
            tg.start_soon(daemon.announce_ready)
            tg.start_soon(metrics.poll, supervisor, config.daemon.metrics_interval_s)
            tg.start_soon(notifier.watchdog, supervisor.alive)
            code = await supervisor.run()
            tg.cancel_scope.cancel()
    _log.info("mpsd_stopped", exit_code=int(code))
    return code
