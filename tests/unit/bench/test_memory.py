"""Engine memory from a model's config.json: weights, KV cache per token, share and fit."""

from __future__ import annotations

import pytest

from mpsd.bench.memory import GIB, OVERHEAD_BYTES, engine_memory, shape

QWEN_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "max_position_embeddings": 32768}
QWEN_3B = {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
           "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize(("config", "params", "weights_gib"), [
    (QWEN_05B, 494e6, 0.93),  # vLLM logs 0.93 GiB of weights (vllm.md section 7)
    (QWEN_3B, 3.09e9, 5.79),
])
def test_weights_match_what_vllm_loads(config: dict[str, object], params: float,
                                       weights_gib: float) -> None:
    model = shape(config)
    assert model.params == pytest.approx(params, rel=0.02)
    assert model.weights_bytes / GIB == pytest.approx(weights_gib, rel=0.03)


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer() -> None:
    assert shape(QWEN_05B).kv_bytes_per_token == 2 * 24 * 2 * 64 * 2


def test_an_engine_holds_the_whole_workload_and_one_full_sequence() -> None:
    model = shape(QWEN_05B)
    gpu = 80 * GIB
    sized = engine_memory(model, gpu, tokens_at_once=256 * 256, max_model_len=32768,
                          total_cap=0.95)
    assert sized.kv_bytes >= 256 * 256 * model.kv_bytes_per_token
    assert sized.kv_bytes % (64 << 20) == 0
    need = model.weights_bytes + sized.kv_bytes + OVERHEAD_BYTES
    assert need / gpu <= sized.share < need / gpu + 0.011
    assert sized.fits == int(0.95 / sized.share)
    small = engine_memory(model, gpu, tokens_at_once=10, max_model_len=32768, total_cap=0.95)
    assert small.kv_bytes >= 32768 * model.kv_bytes_per_token


def test_a_config_that_is_not_a_decoder_names_the_missing_key() -> None:
    with pytest.raises(ValueError, match="num_hidden_layers"):
        shape({"hidden_size": 8})
