"""The load generator: OpenAI requests from worker processes pinned to cores of their own.

Why processes: one asyncio loop relays only tens of thousands of SSE events a second, less than
two small engines emit, so one client process would measure itself. Why pinned: a load generator
on the engines' cores slows the one-engine arm more than the many-engine arm (measured: up to
40 % swing), which overstates the gain of MPS. :func:`run` starts ``procs`` workers (spawned, so
no inherited threads or loops), waits until every one has imported everything, then gives them one
common start time: their clocks agree and import time is never measured.

Two loops:

- closed: ``concurrency`` users, each sending its next request when the last one ended;
- open: Poisson arrivals at ``rate`` requests/s, at most ``concurrency`` in flight (the rest wait,
  as in ``vllm bench serve --request-rate R --max-concurrency C``).

Two extents: a time window (``warmup_s`` then ``duration_s``; the tokens generated inside the
window count, so a run measures a steady state; requests in flight at its end finish before the
run returns), or ``num_requests`` sent in all (measured from the first send to the last end, as
``vllm bench serve`` does).

Each request records when it was sent, its first token (streams), its end, the gaps between
tokens, and prompt and output tokens from the answer's ``usage`` (streams ask for it with
``stream_options.include_usage``). Several ``urls`` make the generator balance by itself (fewest
requests in flight, per worker): the "client" arm, the ceiling a proxy can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from mpsd.bench.workloads import Prompt, Workload

#: Gaps between tokens kept per request: enough for p99, bounded memory on long answers.
MAX_GAPS = 512
#: After a time window, requests still in flight get this long to finish.
DRAIN_S = 60.0


@dataclass(frozen=True)
class LoadSpec:
    """One run: where to send, what, how long, and from which cores."""

    urls: tuple[str, ...]
    model: str
    workload: Workload
    warmup_s: float = 2.0
    duration_s: float = 10.0
    num_requests: int = 0  # > 0: send exactly this many instead of a time window
    procs: int = 1
    cpus: tuple[int, ...] = ()
    seed: int = 0
    api_key: str = ""
    timeout_s: float = 600.0
    vocab_size: int = 0  # the model's, so that random prompt token ids exist (0: unknown)


@dataclass
class Outcome:
    """One request as the client saw it (times are ``time.time()`` seconds)."""

    sent: float
    first: float  # first token (streams) or the whole answer (non-streams)
    end: float
    prompt_tokens: int
    output_tokens: int
    ok: bool
    target: int  # index into LoadSpec.urls
    error: str = ""
    gaps: list[float] = field(default_factory=list)
    streamed: bool = False  # token times known from the first token on


@dataclass(frozen=True)
class RunResult:
    """Every request of a run, the measured window, and the first few errors."""

    outcomes: list[Outcome]
    window: tuple[float, float]
    counted: list[Outcome]  # the requests the window counts


def run(spec: LoadSpec) -> RunResult:
    """Run the load in worker processes and gather what every request got."""
    procs = max(1, min(spec.procs, spec.workload.concurrency))
    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []
    workers = []
    try:
        for index in range(procs):
            parent, child = ctx.Pipe()
            worker = ctx.Process(target=_worker, args=(spec, index, procs, child), daemon=True)
            worker.start()
            child.close()
            pipes.append(parent)
            workers.append(worker)
        for pipe in pipes:
            _expect(pipe.recv(), "ready")
        t_start = time.time() + 0.2
        for pipe in pipes:
            pipe.send(t_start)
        outcomes: list[Outcome] = []
        for pipe in pipes:
            outcomes += pipe.recv()
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    return _windowed(spec, outcomes, t_start)


def _expect(got: object, want: str) -> None:
    if got != want:
        raise RuntimeError(f"load generator worker failed: {got}")


def _windowed(spec: LoadSpec, outcomes: list[Outcome], t_start: float) -> RunResult:
    if spec.num_requests:
        window = (min((o.sent for o in outcomes), default=t_start),
                  max((o.end for o in outcomes), default=t_start))
        return RunResult(outcomes, window, list(outcomes))
    w0 = t_start + spec.warmup_s
    w1 = w0 + spec.duration_s
    return RunResult(outcomes, (w0, w1), [o for o in outcomes if w0 <= o.end < w1])


def _worker(spec: LoadSpec, index: int, procs: int, pipe: Connection) -> None:
    """One worker process: pin, import, report ready, wait for the common start, run."""
    try:
        if spec.cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, spec.cpus)
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: PLC0415 - optional speed-up of the worker's loop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        import aiohttp  # noqa: F401, PLC0415 - imported before "ready", never inside a run

        pipe.send("ready")
        t_start = pipe.recv()
        pipe.send(asyncio.run(_Client(spec, index, procs, t_start).main()))
    except Exception as exc:  # the parent reports it; a worker has nobody else to tell
        with contextlib.suppress(OSError):
            pipe.send(f"{type(exc).__name__}: {exc}")
    finally:
        pipe.close()


def _share(total: int, index: int, parts: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


class _Client:
    """One worker's users (closed loop) or arrivals (open loop)."""

    def __init__(self, spec: LoadSpec, index: int, procs: int, t_start: float) -> None:
        self.spec = spec
        self.workload = spec.workload
        self.users = max(1, _share(self.workload.concurrency, index, procs))
        self.budget = _share(spec.num_requests, index, procs) if spec.num_requests else -1
        self.rate = self.workload.rate / procs
        self.rng = random.Random(spec.seed * 1000 + index)
        self.t_start = t_start
        self.t_end = t_start + spec.warmup_s + spec.duration_s if not spec.num_requests \
            else float("inf")
        self.inflight = [0] * len(spec.urls)
        self.turn = 0
        self.outcomes: list[Outcome] = []
        self.next_prompt = 0
        headers = {"Content-Type": "application/json"}
        if spec.api_key:
            headers["Authorization"] = f"Bearer {spec.api_key}"
        self.headers = headers

    async def main(self) -> list[Outcome]:
        import aiohttp  # noqa: PLC0415 - only the workers need it

        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.sleep(max(0.0, self.t_start - time.time()))
            loop = self._open(session) if self.rate > 0 else self._closed(session)
            # after the window no request is sent; those in flight finish (within DRAIN_S),
            # so that the tokens they generated inside the window are known
            limit = None if self.spec.num_requests else self.t_end - time.time() + DRAIN_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loop, limit)
        return self.outcomes

    def _take(self) -> Prompt | None:
        """The next prompt, or None when the run is over (time or request budget)."""
        if self.budget == 0 or time.time() >= self.t_end:
            return None
        if self.budget > 0:
            self.budget -= 1
        # a fresh random prompt every time: a repeated one would hit the prefix cache and skip
        # its prefill (the operator's own prompts are cycled, as given)
        prompt = self.workload.prompt(self.next_prompt, self.rng, self.spec.vocab_size)
        self.next_prompt += 1
        return prompt

    async def _closed(self, session: Any) -> None:
        async def user() -> None:
            while (prompt := self._take()) is not None:
                await self._send(session, prompt)

        await asyncio.gather(*(user() for _ in range(self.users)))

    async def _open(self, session: Any) -> None:
        gate = asyncio.Semaphore(self.users)
        tasks: set[asyncio.Task[None]] = set()

        async def one(prompt: Prompt) -> None:
            async with gate:
                await self._send(session, prompt)

        next_at = time.time()
        try:
            while (prompt := self._take()) is not None:
                task = asyncio.ensure_future(one(prompt))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += self.rng.expovariate(self.rate)
                await asyncio.sleep(max(0.0, next_at - time.time()))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    def _pick(self) -> int:
        low = min(self.inflight)
        candidates = [i for i, n in enumerate(self.inflight) if n == low]
        self.turn += 1
        return candidates[self.turn % len(candidates)]

    def _body(self, prompt: Prompt) -> tuple[str, bytes]:
        body: dict[str, Any] = {"model": self.spec.model, "max_tokens": prompt.max_tokens,
                                "ignore_eos": True, "stream": self.workload.stream}
        if self.workload.stream:
            body["stream_options"] = {"include_usage": True}
        if prompt.chat:
            body["messages"] = prompt.messages
            return "/v1/chat/completions", json.dumps(body).encode()
        body["prompt"] = prompt.prompt
        return "/v1/completions", json.dumps(body).encode()

    async def _send(self, session: Any, prompt: Prompt) -> None:
        import aiohttp  # noqa: PLC0415

        target = self._pick()
        path, data = self._body(prompt)
        self.inflight[target] += 1
        sent = time.time()
        outcome = Outcome(sent, sent, sent, 0, 0, False, target)
        try:
            async with session.post(self.spec.urls[target] + path, data=data,
                                    headers=self.headers) as resp:
                if resp.status != 200:
                    outcome.error = f"{resp.status}: {(await resp.read())[:200]!r}"
                elif self.workload.stream:
                    await _read_stream(resp, outcome)
                else:
                    _read_full(await resp.read(), outcome)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            self.inflight[target] -= 1
        outcome.end = time.time()
        if not outcome.ok:
            await asyncio.sleep(0.05)  # a failing target must not turn the loop into a spin
        self.outcomes.append(outcome)


def _usage(outcome: Outcome, usage: object) -> None:
    if isinstance(usage, dict):
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        outcome.output_tokens = int(usage.get("completion_tokens") or 0)


def _read_full(data: bytes, outcome: Outcome) -> None:
    outcome.first = time.time()
    _usage(outcome, json.loads(data).get("usage"))
    outcome.ok = True


async def _read_stream(resp: Any, outcome: Outcome) -> None:
    """SSE events: the first content event is the first token; ``usage`` gives the counts."""
    last = 0.0
    events = 0
    outcome.streamed = True
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            outcome.ok = not outcome.error
            break
        event = json.loads(payload)
        if "error" in event:
            outcome.error = str(event["error"])[:200]
            continue
        if event.get("usage"):
            _usage(outcome, event["usage"])
        if not event.get("choices"):
            continue
        now = time.time()
        if events == 0:
            outcome.first = now
        elif len(outcome.gaps) < MAX_GAPS:
            outcome.gaps.append(now - last)
        last = now
        events += 1
    if outcome.ok and not outcome.output_tokens:
        outcome.output_tokens = events  # a server without usage: one event, one token


def balance(outcomes: Sequence[Outcome], targets: int) -> list[int]:
    """Requests each target answered (the client arm's spread over the engines)."""
    counts = [0] * targets
    for outcome in outcomes:
        counts[outcome.target] += 1
    return counts
