"""What the load generator sends: built-in workloads and the operator's own (pure, no I/O).

The built-ins are the shapes where MPS was measured to pay or not (docs/tuning.md): short
decode-heavy requests, streamed and not, and prefill-heavy ones. Prompts are random token ids, so
every request has exactly ``input_len`` prompt tokens and no prefix-cache hits, and
``ignore_eos`` makes every answer exactly ``output_len`` tokens long: two arms of a benchmark
then do the same work, which a sampled text prompt would not guarantee.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from typing import Any

#: Token ids are drawn from this range: ordinary BPE tokens in every Qwen/Llama-sized vocabulary
#: (and far from the special tokens at either end); smaller vocabularies shrink it.
TOKEN_IDS = (1000, 30000)


def token_range(vocab_size: int) -> tuple[int, int]:
    """Where random prompt token ids come from for a model with ``vocab_size`` tokens (0:
    unknown, the default range)."""
    if vocab_size <= 0:
        return TOKEN_IDS
    high = min(TOKEN_IDS[1], vocab_size - 1)
    return min(TOKEN_IDS[0], high // 4), high


@dataclass(frozen=True)
class Prompt:
    """One request body's varying part: a completion prompt or chat messages, and its length."""

    prompt: list[int] | str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int

    @property
    def chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Workload:
    """A named traffic shape: lengths, concurrency, streaming, and optional prompts of its own."""

    name: str
    input_len: int
    output_len: int
    concurrency: int
    stream: bool
    rate: float = 0.0  # requests/s, Poisson arrivals (open loop); 0 = closed loop
    prompts: tuple[Prompt, ...] = ()

    @property
    def metric(self) -> str:
        """The throughput this workload is judged by: output tokens, or all tokens for prefill."""
        return "total_tok_per_s" if self.output_len <= 4 and not self.prompts else \
            "output_tok_per_s"

    def describe(self) -> str:
        loop = f"{self.rate:g} req/s open loop, cap {self.concurrency}" if self.rate else \
            f"concurrency {self.concurrency}"
        size = f"{len(self.prompts)} prompts from file" if self.prompts else \
            f"{self.input_len} in / {self.output_len} out"
        return f"{self.name}: {size}, {loop}, {'stream' if self.stream else 'no stream'}"

    def prompt(self, number: int, rng: random.Random, vocab_size: int = 0) -> Prompt:
        """The ``number``-th prompt of a run: the workload's own (cycled), else random token
        ids drawn from ``rng`` (never the same twice, so no prefix-cache hits)."""
        if self.prompts:
            return self.prompts[number % len(self.prompts)]
        low, high = token_range(vocab_size)
        return Prompt([rng.randrange(low, high) for _ in range(self.input_len)], None,
                      self.output_len)


BUILTIN: dict[str, Workload] = {w.name: w for w in (
    Workload("decode", 128, 128, 256, stream=True),
    Workload("decode-nostream", 128, 128, 256, stream=False),
    Workload("prefill", 1024, 1, 64, stream=False),
    Workload("chat", 512, 256, 64, stream=True),
)}


def builtin(names: str) -> list[Workload]:
    """Comma-separated built-in names, in order; an unknown name says which exist."""
    found = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in BUILTIN:
            raise ValueError(f"unknown workload {name!r}; built-in: {', '.join(BUILTIN)}")
        found.append(BUILTIN[name])
    return found


def custom(input_len: int, output_len: int, concurrency: int, stream: bool,
           rate: float = 0.0) -> Workload:
    """The operator's own shape from ``--input-len``, ``--output-len``, ... ."""
    for name, value in (("--input-len", input_len), ("--output-len", output_len),
                        ("--concurrency", concurrency)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value})")
    return Workload("custom", input_len, output_len, concurrency, stream, rate)


def parse_jsonl(text: str, source: str, output_len: int) -> tuple[Prompt, ...]:
    """Prompts from JSON lines: ``{"prompt": ...}`` or ``{"messages": [...]}``, optional
    ``max_tokens`` (else ``output_len``). A bad line is named by file and line number."""
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{source}:{number}: not JSON ({exc})") from exc
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise ValueError(f"{source}:{number}: give one of \"prompt\" or \"messages\"")
        max_tokens = item.get("max_tokens", output_len)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"{source}:{number}: max_tokens must be a positive integer")
        messages = item.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise ValueError(f"{source}:{number}: messages must be a list")
        prompts.append(Prompt(item.get("prompt"), messages, max_tokens))
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return tuple(prompts)


def from_file(workload: Workload, prompts: tuple[Prompt, ...]) -> Workload:
    return replace(workload, name="jsonl", prompts=prompts)
