"""How a group takes engines down: all at once after a fault, one the safe way on purpose.

After a fault the shared MPS context is already poisoned, so every engine gets SIGKILL at once
and the MPS server is given ``recover_timeout_s`` to return to ACTIVE (mps.md §1.3), else the
daemon is replaced. A stop on purpose is the opposite: drain, SIGTERM, and ``terminate_client``
before any SIGKILL, because SIGKILL of a busy MPS client faults its siblings (mps.md §1.2).
"""

from __future__ import annotations

from mpsd import logs
from mpsd.errors import MpsCommandError
from mpsd.pool import BackendPool
from mpsd.supervise.engine import Engine
from mpsd.supervise.faults import Fault
from mpsd.supervise.mps import MpsDaemon

_log = logs.get("mpsd.recovery")


async def recover_mps(mps: MpsDaemon, timeout_s: float, fault: Fault) -> bool:
    """After the engines are gone: True once the daemon's server is ACTIVE with no clients;
    False after stopping (or killing) a daemon that did not recover — it must be replaced."""
    if mps.pid is not None and await mps.wait_recovered(timeout_s):
        return True
    _log.warning("mps_daemon_replace", gpu=mps.group, reason=fault.reason)
    if mps.pid is not None:
        await mps.stop(1.0)
    else:
        await mps.kill()
    return False


async def stop_engine(engine: Engine, pool: BackendPool, mps: MpsDaemon | None,
                      drain_timeout_s: float) -> None:
    """On purpose: drain → SIGTERM → at the deadline ``terminate_client`` → SIGKILL."""
    engine.stopping = True
    if engine.pid is None:
        await engine.process.kill()  # reaped, and whatever it left in its group killed
        return
    if pool.get(engine.key) is not None:
        await pool.drain(engine.key, drain_timeout_s)

    async def terminate_clients() -> None:
        if mps is None or mps.pid is None:
            return
        try:
            for pid in await engine.mps_clients(mps):
                await mps.terminate_client(pid)
        except MpsCommandError as exc:
            _log.warning("terminate_client_failed", gpu=engine.plan.gpu, engine=engine.key,
                         error=str(exc))

    code = await engine.process.terminate(engine.plan.stop_timeout_s, terminate_clients)
    _log.info("engine_stopped", gpu=engine.plan.gpu, engine=engine.key, code=code)
