"""Hugging Face folders with random weights in real models' shapes, for timing where the weights
cannot be had or would not fit: gally's kernels (and llama.cpp's) do the same work whatever the
values, so the speed is the real model's. Not for quality.

    SHAPES["llama-3.1-8b"]      the config.json fields gally reads, as in the real model's config
    write(folder, shape, dtype)  stored as F32, or as BF16 rounded to nearest even

Sizes: smollm2-135m 0.5 GB at f32; llama-3.2-1b 2.5 GB at bf16 (5 GB f32); llama-3.2-3b 6.4 GB
(13 GB); llama-3.1-8b 16 GB at bf16 (32 GB f32: more than a 24 GB machine holds).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..dtypes import to_dtype

_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
           "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}

SHAPES = {
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama-3.2-3b": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}


def shapes(c: dict) -> list:
    """(name, shape) of every tensor, in Hugging Face naming."""
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    out.append(("model.norm.weight", (d,)))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], d)))
    return out


def file_bytes(shape: str, dtype: str) -> int:
    width = 4 if dtype == "f32" else 2
    return sum(width * int(np.prod(s)) for _, s in shapes(SHAPES[shape]))


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        out += bytes([low | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def sentencepiece_model() -> bytes:
    """A tokenizer.model (SentencePiece's ModelProto, encoded by hand): <unk>, <s>, </s> and the
    letters, unigram, no normalisation. llama.cpp's convert_hf_to_gguf.py needs a tokenizer to
    make a GGUF and fills the rest of the vocabulary with [PAD] tokens; the benchmarks feed token
    ids, so what the tokenizer says does not matter."""
    pieces = [("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [("\u2581" + c, 1) for c in "abcdefghijklmnopqrstuvwxyz"]
    proto = b""
    for i, (text, kind) in enumerate(pieces):  # SentencePiece: piece = 1, score = 2 (float), type = 3
        score = 0.0 if kind != 1 else -float(i)
        proto += _field(1, _field(1, text.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", score)
                        + _varint(3 << 3) + _varint(kind))
    trainer = _varint(3 << 3) + _varint(1) + _varint(4 << 3) + _varint(len(pieces))  # model_type UNIGRAM, vocab
    normalizer = _field(1, b"identity") + _varint(3 << 3) + _varint(0)  # no dummy prefix
    return proto + _field(2, trainer) + _field(3, normalizer)


def write(folder: str, shape: str = "smollm2-135m", dtype: str = "f32", seed: int = 0) -> None:
    """config.json, tokenizer.model (sentencepiece_model) and model.safetensors, one tensor in
    memory at a time."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    if dtype not in ("f32", "bf16"):
        raise ValueError(f"dtype must be f32 or bf16, not {dtype!r}")
    config = SHAPES[shape]
    width, stored = (4, "F32") if dtype == "f32" else (2, "BF16")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, torch_dtype="float32" if dtype == "f32" else "bfloat16"), f, indent=1)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(sentencepiece_model())
    header, offset = {}, 0
    for name, s in shapes(config):
        size = width * int(np.prod(s))
        header[name] = {"dtype": stored, "shape": list(s), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, s in shapes(config):
            if len(s) == 1:  # norm weights near 1, as trained ones are
                a = 1 + 0.1 * rng.standard_normal(s, dtype=np.float32)
            else:  # variance 1/fan_in keeps activations finite through the layers
                a = rng.standard_normal(s, dtype=np.float32) / np.float32(np.sqrt(s[1]))
            f.write(to_dtype(a, dtype, name).tobytes())
