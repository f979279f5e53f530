"""A stand-in for ``mpsd run`` that speaks sd_notify through :class:`mpsd.observe.systemd.Notifier`.

``packaging/systemd-smoke`` runs it as the unit's ExecStart= under a real systemd, to check the
unit file and the Notifier against systemd itself, independently of the rest of the daemon:
READY=1 with STATUS=, RELOADING=1 + MONOTONIC_USEC= then READY=1 on SIGHUP, STOPPING=1 on
SIGTERM, WATCHDOG=1 from the event loop. With ``MPSD_STUB_EXIT=N`` it exits N at once (78 checks
RestartPreventExitStatus=). With ``MPSD_STUB_STARVE=1`` it never pings the watchdog.
"""

from __future__ import annotations

import os
import signal
import sys

import anyio

from mpsd.observe.systemd import Notifier


async def main() -> int:
    """Serve until SIGTERM; returns the exit code."""
    code = os.environ.get("MPSD_STUB_EXIT", "")
    if code:
        print(f"stub: exiting {code} as asked", file=sys.stderr)
        return int(code)
    notifier = Notifier()
    starve = os.environ.get("MPSD_STUB_STARVE") == "1"
    reloads = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(notifier.watchdog, lambda: not starve)
        notifier.extend_timeout(30)
        notifier.ready("stub: 1/1 GPUs running, 1/1 engines ready")
        print(f"stub: ready, watchdog every {notifier.watchdog_interval()} s", file=sys.stderr)
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reloads += 1
                    notifier.reloading()
                    print(f"stub: reload {reloads}", file=sys.stderr)
                    await anyio.sleep(0.5)
                    notifier.ready(f"stub: reloaded {reloads} times")
                    continue
                notifier.stopping("stub: stopping")
                print("stub: stopping", file=sys.stderr)
                tg.cancel_scope.cancel()
                break
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
