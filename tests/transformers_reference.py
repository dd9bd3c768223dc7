"""Small random checkpoints whose logits transformers computed once and tests/data/
transformers_reference/ stores, so that every test run compares gally with transformers, torch
installed or not. The weights come from a counter-based generator (splitmix64) in integer
arithmetic: the same bits on every machine and NumPy version, which the stored SHA-256 of each
checkpoint file confirms before a comparison.

Regenerate (needs torch and transformers): python tests/transformers_reference.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "transformers_reference")
sys.path.insert(0, HERE)

from conftest import write_safetensors  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=211, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)
CASES = {
    "llama_gqa_untied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "llama3_rope_tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True,
                             rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                    high_freq_factor=4.0,
                                                                    original_max_position_embeddings=16)),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", tie_word_embeddings=False,
                    sliding_window=None, head_dim=24),
    "qwen2_biases": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False,
                         use_sliding_window=False, num_key_value_heads=1),
}
DTYPES = ("F32", "BF16", "F16")
IDS = [1, 17, 200, 5, 5, 42, 99, 3, 150, 77, 0, 210, 63, 8, 120, 33, 2, 91, 180, 14]


def uniform(n: int, stream: int) -> np.ndarray:
    """n values in [-1, 1), float64 with 24 significant bits: splitmix64 of (stream, index)."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(stream * 0x9E3779B97F4A7C15 % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0


def config(case: str) -> dict:
    return {**COMMON, **CASES[case]}


def weights(case: str) -> dict[str, np.ndarray]:
    """HF-named float32 weights: matrices with standard deviation ~0.08, norms in [0.5, 1.5),
    biases within ±0.17, so that the logits have real spread."""
    c = config(case)
    D, F, V, H = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_attention_heads"]
    KV, hd = c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
                       p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
        if c["model_type"] == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (H * hd,), p + "self_attn.k_proj.bias": (KV * hd,),
                           p + "self_attn.v_proj.bias": (KV * hd,)})
    out = {}
    for stream, (name, shape) in enumerate(sorted(shapes.items())):
        u = uniform(int(np.prod(shape)), stream + 1).reshape(shape)
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.5 * u
        elif name.endswith(".bias"):
            out[name] = 0.17 * u
        else:
            out[name] = 0.14 * u
    return {k: v.astype(np.float32) for k, v in out.items()}


def write_checkpoint(folder: str, case: str, dtype: str) -> str:
    """config.json + model.safetensors of `case` in `dtype`; returns the file's SHA-256."""
    os.makedirs(folder, exist_ok=True)
    torch_dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config(case), "torch_dtype": torch_dtype}, f)
    write_safetensors(os.path.join(folder, "model.safetensors"), weights(case), dtype)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def reference_logits(folder: str) -> np.ndarray:
    """transformers' logits [len(IDS), vocab] for the checkpoint in `folder`: weights widened to
    float32, eager attention, float32 arithmetic."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy().astype(np.float32)


def main() -> None:
    import tempfile

    import torch
    import transformers

    manifest = {"torch": torch.__version__, "transformers": transformers.__version__, "ids": IDS, "files": {}}
    os.makedirs(DATA, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            for dtype in DTYPES:
                folder = os.path.join(tmp, f"{case}-{dtype}")
                digest = write_checkpoint(folder, case, dtype)
                name = f"{case}-{dtype.lower()}.npy"
                np.save(os.path.join(DATA, name), reference_logits(folder))
                manifest["files"][name] = {"case": case, "dtype": dtype, "checkpoint_sha256": digest}
                print(name)
    with open(os.path.join(DATA, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
