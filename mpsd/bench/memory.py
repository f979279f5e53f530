"""How much GPU memory one engine of a model needs for a workload (pure, no I/O).

Why compute it: engines of one GPU share its memory, and vLLM's own sizing takes a fixed share
of the *whole* GPU per engine (``--gpu-memory-utilization``), which either wastes memory on KV
cache no request uses or, when engines start at the same time, mis-sizes both (vllm #55827).
Tune instead gives every engine a fixed KV cache (``--kv-cache-memory-bytes``) big enough for
the workload sent to *one* engine alone (the baseline arm), and a memory share that covers the
weights, that cache and vLLM's own overhead (CUDA graphs, activations, the CUDA context;
measured on an H200 with vLLM 0.26.0: 2.3-3.0 GiB beyond weights and KV for 0.5B and 3B).

The weights come from the model's ``config.json`` (Qwen2/Llama-shaped decoders: embeddings,
attention with grouped KV heads, a gated MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
#: vLLM's memory beyond weights and KV cache: CUDA graphs, activations, CUDA context.
OVERHEAD_BYTES = 3 * GIB
#: KV cache beyond what the workload's requests hold at once (block rounding, scheduling).
KV_MARGIN = 1.2
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}


@dataclass(frozen=True)
class ModelShape:
    """The parts of a ``config.json`` that decide memory."""

    params: int
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_positions: int

    @property
    def weights_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def shape(config: dict[str, Any]) -> ModelShape:
    """Read a Hugging Face decoder ``config.json``; a missing key raises ValueError naming it."""
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except KeyError as exc:
        raise ValueError(f"config.json has no {exc.args[0]!r}: not a decoder mpsd can size; "
                         "give --gpu-memory-utilization instead") from None
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim", hidden // heads))
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    dtype = str(config.get("torch_dtype", "bfloat16")).removeprefix("torch.")
    return ModelShape(params=embeddings + layers * (attention + mlp), layers=layers,
                      kv_heads=kv_heads, head_dim=head_dim,
                      dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
                      max_positions=int(config.get("max_position_embeddings", 32768)))


@dataclass(frozen=True)
class EngineMemory:
    """One engine's KV cache and memory share, and how many such engines fit the GPU."""

    kv_bytes: int
    share: float  # --gpu-memory-utilization
    fits: int  # engines of this size that fit under the total share cap

    def text(self, model: ModelShape) -> str:
        return (f"weights {model.weights_bytes / GIB:.2f} GiB + KV cache "
                f"{self.kv_bytes / GIB:.2f} GiB + overhead {OVERHEAD_BYTES / GIB:.0f} GiB = "
                f"{self.share:.2f} of the GPU per engine; {self.fits} fit")


def engine_memory(model: ModelShape, gpu_bytes: int, tokens_at_once: int, max_model_len: int,
                  total_cap: float) -> EngineMemory:
    """Size one engine for ``tokens_at_once`` KV tokens (concurrency x (input + output)) and
    at least one sequence of ``max_model_len``; the share rounds up to a hundredth."""
    tokens = max(int(tokens_at_once * KV_MARGIN), max_model_len)
    kv = tokens * model.kv_bytes_per_token
    kv = math.ceil(kv / (64 << 20)) * (64 << 20)  # whole 64 MiB: a readable flag value
    need = model.weights_bytes + kv + OVERHEAD_BYTES
    share = math.ceil(need / gpu_bytes * 100) / 100
    return EngineMemory(kv_bytes=kv, share=share, fits=int(total_cap / share + 1e-9))
