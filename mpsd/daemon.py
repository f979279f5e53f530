"""The composition root of ``mpsd run``: signals, ordered start and ordered stop.

Start: facts about the host → plan → reap a previous run's leftovers → proxy listening →
groups (MPS, then engines). Stop (SIGTERM/SIGINT): groups drain and stop their engines, then
their MPS daemons, then the proxy closes. Signals are handled here and nowhere else.
"""

from __future__ import annotations

import os
import signal

import aiohttp
import anyio

from mpsd import logs
from mpsd.errors import ExitCode
from mpsd.group import GroupOptions
from mpsd.host import resolve
from mpsd.pool import BackendPool
from mpsd.process import reap_leftovers
from mpsd.proxy import ProxyServer
from mpsd.supervisor import Supervisor

_log = logs.get("mpsd.daemon")


async def run(file: str) -> ExitCode:
    """``mpsd run``: serve until SIGTERM/SIGINT (exit 0) or until every group FAILED (1)."""
    resolved = await resolve(file)
    config, plan = resolved.config, resolved.plan
    logs.setup(config.daemon.log_format, config.daemon.log_level)
    _log.info("mpsd_starting", config=file, pid=os.getpid(), groups=len(plan.groups),
              engines=sum(len(g.engines) for g in plan.groups))
    _log.info("mps_mode", enabled=plan.mps_enabled, reason=plan.mps_reason)
    for warning in plan.warnings:
        _log.warning("plan_warning", detail=warning)
    registry = config.daemon.state_dir / "pgids"
    reap_leftovers(registry)
    if plan.proxy_cpus:
        os.sched_setaffinity(0, plan.proxy_cpus)
        _log.info("proxy_cpus", cpus=list(plan.proxy_cpus))
    pool = BackendPool(config.proxy.max_inflight_per_engine)
    options = GroupOptions(mps=config.mps, restart=config.restart,
                           drain_timeout_s=config.proxy.drain_timeout_s, registry=registry,
                           environ=dict(os.environ))
    timeout = aiohttp.ClientTimeout(total=None, connect=config.proxy.connect_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        supervisor = Supervisor(plan, options, pool, session)
        proxy = ProxyServer(config.proxy, pool, supervisor.status)
        await proxy.start()
        _log.info("proxy_listening", listen=config.proxy.listen)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_handle_signals, supervisor)
            code = await supervisor.run()
            tg.cancel_scope.cancel()
        await proxy.stop(config.proxy.drain_timeout_s)
    _log.info("mpsd_stopped", exit_code=int(code))
    return code


async def _handle_signals(supervisor: Supervisor) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            _log.info("signal_received", signal=signal.Signals(signum).name)
            supervisor.stop()
