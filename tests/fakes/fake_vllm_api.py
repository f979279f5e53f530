"""vLLM's OpenAI wire formats for the fake engine: validation, bodies, SSE pieces, metrics text.

Why apart from the handlers: these are pure functions over the verbatim samples of vllm.md
sections 10 and 11 (field order, ``null`` extras, compact JSON in bodies, spaced JSON in the
in-stream error event, the ``"Bad Request"`` validation type, 404 for an unknown model), so they
are easy to compare with the samples and to reuse from tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.fakes.fake_vllm_http import State

VERSION = "0.32.0"
FINGERPRINT = "vllm-0.32.0-8745c95a"
DONE = b"data: [DONE]\n\n"
VOCAB = (" lost", "rzen", " tavo", "str", " still", " lo", "quaph", " 120", " ingru", " zen",
         "voru", " tion", "qua", "896", " lone", " erta", " loing", "ka", "694", " ph")
_CHAT_TAIL = '"}},"logprobs":null,"finish_reason":{fr},"stop_reason":null,"token_ids":null}}]'
_CMPL_TAIL = ('","logprobs":null,"finish_reason":{fr},"stop_reason":null,'
              '"prompt_token_ids":null,"token_ids":null}}]')
_CHAT_MIDS = [(t + '"},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n').encode()
              for t in VOCAB]
_CMPL_MIDS = [(t + _CMPL_TAIL.format(fr="null") + "}\n\n").encode() for t in VOCAB]


class ApiError(Exception):
    """An error response in vLLM's ``{"error": {message, type, param, code}}`` shape."""

    def __init__(self, status: int, message: str, type_: str, param: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type_ = type_
        self.param = param


def error_body(status: int, message: str, type_: str, param: str | None,
               compact: bool = True) -> bytes:
    """Compact JSON for HTTP bodies; ``compact=False`` gives the SSE error event's spacing."""
    obj = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return json.dumps(obj, separators=(",", ":") if compact else None).encode()


@dataclass
class Params:
    """The validated fields the fake needs from a request body."""

    model: str
    stream: bool
    max_tokens: int
    prompt_tokens: int
    include_usage: bool
    seed: int
    data: dict[str, object]


def _count(text: str) -> int:
    """Rough token count (4 characters a token); only usage numbers depend on it."""
    return max(1, (len(text) + 3) // 4)


def _missing(name: str, data: dict[str, object]) -> ApiError:
    return ApiError(400, "1 validation error:\n  {'type': 'missing', 'loc': "
                    f"'body.{name}', 'msg': 'Field required', 'input': "
                    f"'<dict of {len(data)} items>'}}", "Bad Request", f"body.{name}")


def _prompt_tokens(data: dict[str, object], kind: str) -> int:
    if kind == "chat" or (kind == "tokenize" and "messages" in data):
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise _missing("messages", data)
        text = "".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return 10 + _count(text)
    if kind == "detokenize":
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise _missing("tokens", data)
        return len(tokens)
    key = "input" if kind == "embedding" else "prompt"
    prompt = data.get(key)
    if prompt is None or prompt in ("", []):
        if kind == "embedding":
            raise _missing("input", data)
        raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty. "
                       "(parameter=prompt)", "BadRequestError", "prompt")
    if isinstance(prompt, list):
        if all(_is_token_ids(p) for p in prompt):
            return len(prompt)  # token ids, as vLLM accepts them: exact
        if all(isinstance(p, list) and p and all(_is_token_ids(t) for t in p) for p in prompt):
            return sum(len(p) for p in prompt)  # a batch of token-id prompts
        return sum(_count(str(p)) for p in prompt)
    return _count(str(prompt))


def _is_token_ids(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def parse_params(data: dict[str, object], kind: str, st: State) -> Params:
    """Validate like vLLM (the cases of vllm.md section 10); raise ApiError otherwise."""
    for name in ("temperature", "top_p"):
        value = data.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ApiError(400, "1 validation error:\n  {'type': 'float_parsing', 'loc': "
                           f"'body.{name}', 'msg': 'Input should be a valid number, unable to "
                           f"parse string as a number', 'input': {value!r}}}", "Bad Request",
                           f"body.{name}")
    model = data.get("model")
    if model is not None and model != st.served:
        raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {st.served}.",
                       "NotFoundError", "model")
    prompt_tokens = _prompt_tokens(data, kind)
    raw_max = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = 16 if raw_max is None else raw_max
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}. "
                       f"(parameter=max_tokens, value={max_tokens})", "BadRequestError",
                       "max_tokens")
    if max_tokens > st.max_model_len:
        raise ApiError(400, f"max_tokens={max_tokens} cannot be greater than max_model_len="
                       f"{st.max_model_len}. Please request fewer output tokens. "
                       f"(parameter=max_tokens, value={max_tokens})", "BadRequestError",
                       "max_tokens")
    if prompt_tokens > st.max_model_len:
        raise ApiError(400, f"This model's maximum context length is {st.max_model_len} "
                       f"tokens. However, your prompt contains at least {prompt_tokens} input "
                       "tokens, which exceeds this limit even without any output tokens. "
                       "Please reduce the length of the input prompt. (parameter=input_tokens, "
                       f"value={prompt_tokens})", "BadRequestError", "input_tokens")
    options = data.get("stream_options")
    usage = isinstance(options, dict) and bool(options.get("include_usage"))
    seed = data.get("seed")
    return Params(st.served, data.get("stream") is True, max_tokens, prompt_tokens, usage,
                  seed if isinstance(seed, int) else prompt_tokens, data)


@dataclass
class StreamPieces:
    """Pre-encoded byte pieces of one SSE response (frame = prefix + mids[token])."""

    first: bytes
    prefix: bytes
    mids: list[bytes]
    last: list[bytes]
    abort: bytes
    usage: Callable[[int], bytes]


def stream_pieces(rid: str, st: State, params: Params, chat: bool) -> StreamPieces:
    """Build the per-request prefix once; token frames reuse the module-level pieces."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = f'data: {{"id":"{rid}","object":"{obj}","created":{st.created},"model":{st.model_json}'
    tail = _CHAT_TAIL if chat else _CMPL_TAIL
    fp = f',"system_fingerprint":"{FINGERPRINT}"}}\n\n'
    length_tail = tail.format(fr='"length"') + fp
    first = b""
    if chat:
        first = (head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                 '"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,'
                 '"prompt_text":null}\n\n').encode()
    prefix = head + (',"choices":[{"index":0,"delta":{"content":"' if chat
                     else ',"choices":[{"index":0,"text":"')

    def usage(produced: int) -> bytes:
        if not params.include_usage:
            return b""
        p = params.prompt_tokens
        return (head + f',"choices":[],"usage":{{"prompt_tokens":{p},"total_tokens":'
                f'{p + produced},"completion_tokens":{produced}}}' + fp).encode()

    return StreamPieces(first, prefix.encode(), _CHAT_MIDS if chat else _CMPL_MIDS,
                        [(t + length_tail).encode() for t in VOCAB],
                        (tail.format(fr='"abort"') + fp).encode(), usage)


def text_of(seed: int, count: int) -> str:
    """The generated text: deterministic vocabulary tokens."""
    return "".join(VOCAB[(seed + i) % len(VOCAB)] for i in range(count))


def full_body(rid: str, st: State, params: Params, chat: bool, produced: int,
              reason: str) -> str:
    """A non-stream completion or chat completion body, field for field like vLLM 0.32."""
    text = json.dumps(text_of(params.seed, produced))
    p = params.prompt_tokens
    usage = (f'"usage":{{"prompt_tokens":{p},"total_tokens":{p + produced},"completion_tokens":'
             f'{produced},"prompt_tokens_details":null,"completion_tokens_details":null}}')
    head = f'{{"id":"{rid}","object":"{"chat.completion" if chat else "text_completion"}",' \
           f'"created":{st.created},"model":{st.model_json},"choices":[{{"index":0,'
    common = f'"service_tier":null,"system_fingerprint":"{FINGERPRINT}",{usage},'
    if chat:
        return (head + f'"message":{{"role":"assistant","content":{text},"refusal":null,'
                '"annotations":null,"audio":null,"function_call":null,"reasoning":null},'
                f'"logprobs":null,"finish_reason":"{reason}","stop_reason":null,'
                '"token_ids":null,"routed_experts":null}],' + common +
                '"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,'
                '"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}')
    return (head + f'"text":{text},"logprobs":null,"finish_reason":"{reason}",'
            '"stop_reason":null,"token_ids":null,"prompt_logprobs":null,'
            '"prompt_token_ids":null,"routed_experts":null}],' + common +
            '"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}')


def simple_body(kind: str, params: Params, st: State) -> str:
    """Bodies of /v1/embeddings, /tokenize and /detokenize."""
    data = params.data
    if kind == "tokenize":
        tokens = [(params.seed + i) % 151000 for i in range(params.prompt_tokens)]
        obj: dict[str, object] = {"count": len(tokens), "max_model_len": st.max_model_len,
                                  "tokens": tokens, "token_strs": None}
    elif kind == "detokenize":
        raw = data.get("tokens")
        count = len(raw) if isinstance(raw, list) else 0
        obj = {"prompt": text_of(params.seed, count)}
    else:
        inputs = data.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        vectors = [{"index": i, "object": "embedding",
                    "embedding": [round(((i + 1) * (j + 3) % 17) / 17 - 0.5, 6) for j in range(8)]}
                   for i in range(len(items))]
        obj = {"id": f"embd-{params.seed:016x}", "object": "list", "created": st.created,
               "model": st.served, "data": vectors,
               "usage": {"prompt_tokens": params.prompt_tokens,
                         "total_tokens": params.prompt_tokens, "completion_tokens": 0,
                         "prompt_tokens_details": None}}
    return json.dumps(obj, separators=(",", ":"))


def render_metrics(st: State) -> str:
    """Prometheus text with the families mpsd reads (vllm.md section 11)."""
    lab = f'engine="0",model_name={st.model_json}'
    waiting = len(st.inflight) - st.running
    kv = min(1.0, st.kv_tokens / st.kv_capacity) if st.kv_capacity else 0.0
    out: list[str] = []

    def family(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
        out.append(f"# HELP vllm:{name} {help_}\n# TYPE vllm:{name} {kind}\n")
        out.extend(f"vllm:{name}{{{labels}}} {value!r}\n" for labels, value in rows)

    def counter(name: str, help_: str, rows: list[tuple[str, float]]) -> None:
        family(f"{name}_total", "counter", help_, rows)
        family(f"{name}_created", "gauge", help_, [(lb, float(st.created)) for lb, _ in rows])

    family("num_requests_running", "gauge", "Number of requests in model execution batches.",
           [(lab, float(st.running))])
    family("num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [(lab, float(waiting))])
    family("num_requests_waiting_by_reason", "gauge", "Number of waiting requests by reason.",
           [(lab + ',reason="capacity"', float(waiting)), (lab + ',reason="deferred"', 0.0)])
    family("engine_sleep_state", "gauge", "Engine sleep state.",
           [(lab + f',sleep_state="{s}"', 1.0 if s == "awake" else 0.0)
            for s in ("awake", "weights_offloaded", "discard_all")])
    family("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
           [(lab, kv)])
    counter("num_preemptions", "Cumulative number of preemption from the engine.", [(lab, 0.0)])
    counter("prompt_tokens", "Number of prefill tokens processed.",
            [(lab, float(st.prompt_tokens))])
    counter("generation_tokens", "Number of generation tokens processed.",
            [(lab, float(st.generation_tokens))])
    counter("request_success", "Count of successfully processed requests.",
            [(f'engine="0",finished_reason="{r}",model_name={st.model_json}', float(c))
             for r, c in st.success.items()])
    return "".join(out)
