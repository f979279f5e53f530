"""A mixed closed-loop load (streaming and not) on a thread, and what each request got.

For the fault tests: every request records when it was sent and answered, which engine answered
(the fake engines' ``x-fake-engine`` header: their port) and whether it ended well — a 200, and
for a stream its ``[DONE]`` without an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.harness import Event, Mpsd


@dataclass
class Sent:
    """One request of the load: when, to which engine port (from the answer), how it ended."""

    t0: float
    t1: float
    stream: bool
    port: int | None  # x-fake-engine of the answer; None when no engine answered
    ok: bool
    what: str


class MixedLoad:
    """Closed-loop clients on a thread: half streaming, lengths at random."""

    def __init__(self, url: str, clients: int, model: str = "tiny") -> None:
        self.url = url
        self.clients = clients
        self.model = model
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> MixedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    async def _main(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(self._client(session, n) for n in range(self.clients)))

    async def _client(self, session: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(n)
        while not self._stop.is_set():
            stream = n % 2 == 0
            body = {"model": self.model, "prompt": "hi", "max_tokens": rng.randint(10, 60),
                    "stream": stream}
            t0 = time.time()
            port, ok, what = None, False, ""
            try:
                async with session.post(f"{self.url}/v1/completions", json=body) as resp:
                    engine = resp.headers.get("x-fake-engine")
                    port = int(engine) if engine and engine.isdigit() else None
                    data = await resp.read()
                    ok = resp.status == 200 and (not stream or (
                        data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data))
                    what = f"{resp.status} {data[-160:]!r}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                what = repr(exc)
            self.sent.append(Sent(t0, time.time(), stream, port, ok, what))


def engine_core(leader: int) -> int:
    """The ``VLLM::EngineCore`` child of an engine's API server (fake or real vLLM)."""
    for task in Path(f"/proc/{leader}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if "EngineCor" in Path(f"/proc/{child}/comm").read_text():
                    return int(child)
    raise AssertionError(f"no EngineCore under {leader}")


def first_fault(m: Mpsd, gpu: str, t_kill: float) -> Event | None:
    """mpsd's first reaction on ``gpu`` after ``t_kill``: one engine's fault (it is unrouted in
    that tick) or the whole group's, with its ``at`` time."""
    seen = [e for name in ("engine_fault", "fault_detected") for e in m.events(name, gpu=gpu)
            if e.get("at", 0) >= t_kill]
    return min(seen, key=lambda e: float(e["at"]), default=None)
