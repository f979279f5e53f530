"""HTTP surface of the fake vLLM engine: routes, vLLM's JSON/SSE shapes, metrics, request state.

Why its own module: this is what mpsd's proxy and health checks see, so it copies the verbatim
samples of vllm.md section 10/11 (error shapes, SSE framing, ``[DONE]``, the include_usage chunk,
``finish_reason: "abort"`` and the in-stream error event) and must stay fast enough for proxy
benchmarks: SSE chunks are assembled from pre-encoded byte pieces, and with no token delay the
tokens of a stream are written in batches of frames (still one SSE event per token).

With the shared-GPU model on (``FAKE_GPU_DIR``, fake_gpu.py) a running request joins its engine's
step clock (fake_gpu_clock.py) instead: streamed or not, N output tokens take N steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.fakes import fakeutil
from tests.fakes.fake_gpu_clock import Slot, StepClock
from tests.fakes.fake_vllm_api import (
    DONE,
    VERSION,
    VOCAB,
    ApiError,
    Params,
    error_body,
    full_body,
    parse_params,
    render_metrics,
    simple_body,
    stream_pieces,
)

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}
BATCH = 256
ENGINE_DEAD = ("EngineCore encountered an issue. See stack trace (above) for the root cause.")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Req:
    """One in-flight generation; ``end`` is set by shutdown/death before its task is cancelled."""

    __slots__ = ("end", "produced", "rid", "slot", "task")

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.task = asyncio.current_task()
        self.end: str | None = None
        self.produced = 0
        self.slot: Slot | None = None  # its place in the shared-GPU batch (FAKE_GPU_DIR)


@dataclass
class State:
    """Everything the handlers share with the lifecycle code in fake_vllm.py."""

    served: str
    root: str
    max_model_len: int
    max_running: int
    token_delay: float
    ev: fakeutil.EventLog
    engine_name: str
    on_busy: Callable[[bool], None] = lambda busy: None
    gpu: StepClock | None = None  # FAKE_GPU_DIR: tokens come from the shared-GPU step clock
    dead: bool = False
    unhealthy: bool = False
    hang: bool = False
    canary_fail: bool = False
    running: int = 0
    kv_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("stop", "length", "abort", "error"), 0))
    inflight: dict[str, Req] = field(default_factory=dict)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    never: asyncio.Event = field(default_factory=asyncio.Event)
    created: int = field(default_factory=lambda: int(time.time()))
    seq: int = 0

    def __post_init__(self) -> None:
        self.idle.set()
        self.sem = asyncio.Semaphore(self.max_running)
        self.model_json = json.dumps(self.served)
        self.kv_capacity = int(fakeutil.knob_float("FAKE_ENGINE_KV_TOKENS", 262144) or 262144)

    def begin(self, req: Req) -> None:
        if not self.inflight:
            self.idle.clear()
            self.on_busy(True)
        self.inflight[req.rid] = req

    def finish(self, req: Req) -> None:
        self.inflight.pop(req.rid, None)
        if not self.inflight:
            self.idle.set()
            self.on_busy(False)

    def fail_all(self, mode: str) -> int:
        """Shutdown or engine death: every in-flight request ends with ``mode``."""
        for req in list(self.inflight.values()):
            if req.end is None:
                req.end = mode
                if req.task is not None:
                    req.task.cancel()
        return len(self.inflight)

    @property
    def paced(self) -> bool:
        """Whether tokens wait for a clock (else a stream is written in batches of frames)."""
        return self.token_delay > 0 or self.hang or self.gpu is not None

    def next_rid(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}-{os.getpid():x}{self.seq:012x}"


def _json(body: str | bytes, status: int = 200, engine: str = "") -> web.Response:
    data = body.encode() if isinstance(body, str) else body
    return web.Response(body=data, status=status, content_type="application/json",
                        headers={"x-fake-engine": engine})


def _error(st: State, exc: ApiError) -> web.Response:
    return _json(error_body(exc.status, exc.message, exc.type_, exc.param), exc.status,
                 st.engine_name)


async def _body(request: web.Request) -> dict[str, object]:
    """The JSON object of a request, or the validation ApiError vLLM would answer."""
    if request.content_type != "application/json":
        raise ApiError(400, "1 validation error:\n  Unsupported Media Type: Only "
                       "'application/json' is allowed", "Bad Request", None)
    raw = await request.read()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        pos = getattr(exc, "pos", 0)
        msg = getattr(exc, "msg", "JSON decode error")
        raise ApiError(400, "1 validation error:\n  {'type': 'json_invalid', 'loc': "
                       f"'body.{pos}', 'msg': 'JSON decode error', 'input': '<dict of 0 items>',"
                       f" 'ctx': {{'error': '{msg}'}}}}", "Bad Request", f"body.{pos}") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "1 validation error:\n  {'type': 'model_attributes_type', "
                       "'loc': 'body', 'msg': 'Input should be a valid dictionary'}",
                       "Bad Request", "body")
    return data


async def _pace(st: State, last: float, slot: Slot | None = None) -> float:
    """Wait for the next token (forever while hung); returns the token's scheduled time.

    Tokens are scheduled on a fixed grid (``last + delay``) so that write overhead does not
    stretch the advertised rate; after a stall (hang, slow client) the grid restarts at now.
    With the shared-GPU model (``slot``) the engine's step clock makes the tokens instead.
    """
    if st.hang:
        await st.never.wait()
    if slot is not None and st.gpu is not None:
        await st.gpu.token(slot)
        return last
    delay = st.token_delay
    if delay <= 0:
        return last
    now = asyncio.get_running_loop().time()
    target = last + delay
    if target < now - delay:
        target = now
    await asyncio.sleep(target - now)
    return target


def make_app(st: State) -> web.Application:
    """The aiohttp application with vLLM's routes and its 404/405 JSON shapes."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    eng = st.engine_name

    async def gate() -> None:
        if st.hang:
            await st.never.wait()

    async def health(request: web.Request) -> web.StreamResponse:
        await gate()
        status = 503 if st.dead or st.unhealthy else 200
        return web.Response(status=status, headers={"x-fake-engine": eng})

    async def version(request: web.Request) -> web.StreamResponse:
        await gate()
        return _json(json.dumps({"version": VERSION}, separators=(",", ":")), engine=eng)

    async def models(request: web.Request) -> web.StreamResponse:
        await gate()
        perm = {"id": f"modelperm-{os.getpid():016x}", "object": "model_permission",
                "created": st.created, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None,
                "is_blocking": False}
        card = {"id": st.served, "object": "model", "created": st.created, "owned_by": "vllm",
                "root": st.root, "parent": None, "max_model_len": st.max_model_len,
                "permission": [perm]}
        return _json(json.dumps({"object": "list", "data": [card]}, separators=(",", ":")),
                     engine=eng)

    async def metrics(request: web.Request) -> web.StreamResponse:
        await gate()
        return web.Response(text=render_metrics(st), content_type="text/plain",
                            charset="utf-8", headers={"x-fake-engine": eng})

    async def simple(request: web.Request, kind: str) -> web.StreamResponse:
        await gate()
        try:
            params = parse_params(await _body(request), kind, st)
        except ApiError as exc:
            return _error(st, exc)
        return _json(simple_body(kind, params, st), engine=eng)

    async def generate(request: web.Request, chat: bool) -> web.StreamResponse:
        await gate()
        try:
            params = parse_params(await _body(request), "chat" if chat else "completion", st)
        except ApiError as exc:
            return _error(st, exc)
        if st.dead or st.canary_fail:
            return _error(st, ApiError(500, ENGINE_DEAD, "InternalServerError", None))
        req = Req(st.next_rid("chatcmpl" if chat else "cmpl"))
        if st.ev.enabled:
            st.ev.emit("request", rid=req.rid, path=request.path, model=params.model,
                       stream=params.stream, max_tokens=params.max_tokens)
        st.begin(req)
        try:
            if params.stream:
                return await _stream(request, st, req, params, chat)
            return await _full(st, req, params, chat)
        except asyncio.CancelledError:
            st.success["abort"] += 1
            if st.ev.enabled:
                st.ev.emit("abort", rid=req.rid, reason="client_disconnect",
                           tokens=req.produced)
            raise
        finally:
            st.generation_tokens += req.produced
            st.finish(req)

    async def not_found(request: web.Request) -> web.StreamResponse:
        return _json(b'{"detail":"Not Found"}', 404, eng)

    async def not_allowed(request: web.Request) -> web.StreamResponse:
        resp = _json(b'{"detail":"Method Not Allowed"}', 405, eng)
        resp.headers["allow"] = "POST"
        return resp

    def bind(fn: Callable[[web.Request, bool], Awaitable[web.StreamResponse]],
             flag: bool) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await fn(request, flag)
        return handler

    def bind_kind(kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await simple(request, kind)
        return handler

    for path, getter in (("/health", health), ("/ping", health), ("/version", version),
                         ("/v1/models", models), ("/metrics", metrics)):
        app.router.add_get(path, getter)
    posts: list[tuple[str, Handler]] = [
        ("/v1/completions", bind(generate, False)),
        ("/v1/chat/completions", bind(generate, True)),
        ("/v1/embeddings", bind_kind("embedding")),
        ("/tokenize", bind_kind("tokenize")),
        ("/detokenize", bind_kind("detokenize")),
        ("/ping", health),
    ]
    for path, handler in posts:
        resource = app.router.add_resource(path) if path != "/ping" else None
        if resource is None:
            app.router.add_post(path, handler)
            continue
        resource.add_route("POST", handler)
        resource.add_route("*", not_allowed)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def _acquire(st: State, req: Req, params: Params) -> None:
    """Queue for a running slot (counted as waiting until then), then account the KV cache."""
    await st.sem.acquire()
    st.running += 1
    st.kv_tokens += params.prompt_tokens + params.max_tokens
    st.prompt_tokens += params.prompt_tokens
    if st.gpu is not None:
        req.slot = st.gpu.join(params.prompt_tokens, params.max_tokens)


def _release(st: State, req: Req, params: Params) -> None:
    if st.gpu is not None and req.slot is not None:
        st.gpu.leave(req.slot)
    st.running -= 1
    st.kv_tokens -= params.prompt_tokens + params.max_tokens
    st.sem.release()


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        while task.cancelling():
            task.uncancel()


async def _stream(request: web.Request, st: State, req: Req, params: Params,
                  chat: bool) -> web.StreamResponse:
    """An SSE response with vLLM's framing; aborts and engine death end it vLLM's way."""
    pieces = stream_pieces(req.rid, st, params, chat)
    resp = web.StreamResponse(headers={**SSE_HEADERS, "x-fake-engine": st.engine_name})
    acquired = False
    n = params.max_tokens
    seed = params.seed
    try:
        await resp.prepare(request)
        if pieces.first:
            await resp.write(pieces.first)
        await _acquire(st, req, params)
        acquired = True
        prefix, mids, size = pieces.prefix, pieces.mids, len(VOCAB)
        tick = asyncio.get_running_loop().time()
        while req.produced < n - 1:
            if st.paced:
                tick = await _pace(st, tick, req.slot)
                await resp.write(prefix + mids[(seed + req.produced) % size])
                req.produced += 1
            else:
                k = min(BATCH, n - 1 - req.produced)
                base = seed + req.produced
                await resp.write(b"".join([prefix + mids[(base + j) % size] for j in range(k)]))
                req.produced += k
                await asyncio.sleep(0)
        await _pace(st, tick, req.slot)
        tail = prefix + pieces.last[(seed + n - 1) % size]
        req.produced = n
        await resp.write(tail + pieces.usage(n) + DONE)
        _finished(st, req, "length")
    except asyncio.CancelledError:
        if req.end is None:
            raise
        _uncancel()
        if not resp.prepared:
            await resp.prepare(request)
        if req.end == "abort":
            await resp.write(pieces.prefix + pieces.abort + pieces.usage(req.produced) + DONE)
        else:
            body = error_body(500, ENGINE_DEAD, "InternalServerError", None, compact=False)
            await resp.write(b"data: " + body + b"\n\n" + DONE)
        _finished(st, req, req.end)
    finally:
        if acquired:
            _release(st, req, params)
    return resp


async def _full(st: State, req: Req, params: Params, chat: bool) -> web.StreamResponse:
    """A non-stream response: all tokens, or the partial text with ``finish_reason: abort``."""
    acquired = False
    reason = "length"
    try:
        await _acquire(st, req, params)
        acquired = True
        if st.paced:
            tick = asyncio.get_running_loop().time()
            while req.produced < params.max_tokens:
                tick = await _pace(st, tick, req.slot)
                req.produced += 1
        req.produced = params.max_tokens
    except asyncio.CancelledError:
        if req.end is None:
            raise
        _uncancel()
        reason = req.end
    finally:
        if acquired:
            _release(st, req, params)
    _finished(st, req, reason)
    if reason == "error":
        return _error(st, ApiError(500, ENGINE_DEAD, "InternalServerError", None))
    return _json(full_body(req.rid, st, params, chat, req.produced, reason), engine=st.engine_name)


def _finished(st: State, req: Req, reason: str) -> None:
    st.success[reason] = st.success.get(reason, 0) + 1
    if st.ev.enabled:
        st.ev.emit("request_done", rid=req.rid, finish_reason=reason, tokens=req.produced)
