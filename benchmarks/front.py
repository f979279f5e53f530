"""The proxy's client side alone: CPU per request through a fake transport, no sockets.

``FrontConnection.data_received`` -> parse the head -> admit -> read the body -> a handler that
finds the body's ``model`` and answers from memory. What this leaves out (system calls, the
event loop, the engine side) is what ``benchmarks/proxy.py`` measures; what it keeps is the part
of a request that the front door's strictness costs, measured to a tenth of a microsecond where
the end-to-end benchmark moves by several.

    .venv/bin/python benchmarks/front.py                      # this tree, 5 rounds
    .venv/bin/python benchmarks/front.py --baseline DIR       # and the mpsd package in DIR

With ``--baseline``, each round runs both trees, in turn, each in its own process, pinned to the
same CPU (``--cpu``); times are the process's thread CPU time, so what other processes take
from a shared machine does not count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"bench","prompt":"Hello","max_tokens":16}'
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))


class _Transport:
    """What FrontConnection asks of a transport; writes go nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Handler:
    """The server's side of the protocol, for any version of it: admit all, answer at once."""

    max_body_bytes = 32 * 1024 * 1024  # (the code before issue #11 asked for this)

    def __init__(self, limits: Any, model_of: Any) -> None:
        self.limits = limits
        self._model_of = model_of

    def wants(self, request: Any) -> bool:
        return True

    def admit(self, request: Any) -> None:
        return None

    def track(self, conn: Any) -> bool:
        return True

    def rejected(self, status: int) -> None:
        pass

    def request_finished(self, conn: Any) -> None:
        pass

    def forget(self, conn: Any) -> None:
        pass

    def handle(self, conn: Any, request: Any) -> None:
        self._model_of(request.body)
        conn.respond(200, b'{"ok":true}', keep_alive=request.keep_alive)


def _arm(root: str, requests: int, batches: int) -> float:
    """Microseconds of CPU per request in this process: the median of ``batches``."""
    sys.path.insert(0, root)
    from mpsd.proxy import front  # noqa: PLC0415 (the tree under test, from sys.path)
    from mpsd.proxy.request import model_of  # noqa: PLC0415
    limits: Any = None  # the code before issue #11 had no Limits
    for home in ("mpsd.proxy.http_rules", "mpsd.proxy.framing"):  # where each version keeps it
        with contextlib.suppress(ImportError, AttributeError):
            limits = importlib.import_module(home).Limits()
            break
    assert front.__file__ is not None and front.__file__.startswith(root), front.__file__
    loop = asyncio.new_event_loop()
    handler: Any = _Handler(limits, model_of)  # the protocol of either version of the code
    transport: Any = _Transport()
    conn = front.FrontConnection(handler, loop)
    conn.connection_made(transport)
    feed = conn.data_received
    for _ in range(requests // 10):  # warm up (caches of names, branch predictors)
        feed(REQUEST)
    times = []
    for _ in range(batches):
        started = time.thread_time()
        for _ in range(requests):
            feed(REQUEST)
        times.append((time.thread_time() - started) / requests * 1e6)
    loop.close()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="", help="a source tree of mpsd to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=50_000, help="per batch")
    parser.add_argument("--batches", type=int, default=5, help="per round and arm")
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.root:  # one arm, in this process
        os.sched_setaffinity(0, {args.cpu})
        print(f"{_arm(args.root, args.requests, args.batches):.3f}")
        return 0
    arms = {"mpsd": str(ROOT)}
    if args.baseline:
        arms["mpsd-baseline"] = str(Path(args.baseline).resolve())
    results: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(args.rounds):
        order = list(arms)[round_ % len(arms):] + list(arms)[:round_ % len(arms)]
        for name in order:
            out = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--root", arms[name],
                 "--cpu", str(args.cpu), "--requests", str(args.requests),
                 "--batches", str(args.batches)],
                check=True, capture_output=True, text=True, cwd="/")
            results[name].append(float(out.stdout))
    print(f"client side, µs of CPU per request (fake transport, cpu {args.cpu}; median of "
          f"{args.batches} batches of {args.requests} per round)")
    for name, values in results.items():
        print(f"{name:14} median {statistics.median(values):6.2f}   rounds "
              + ", ".join(f"{v:.2f}" for v in values))
    if args.baseline:
        ratio = statistics.median(results["mpsd"]) / statistics.median(results["mpsd-baseline"])
        print(f"mpsd / mpsd-baseline = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
