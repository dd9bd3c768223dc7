"""Shared test helpers: small random checkpoints written the way Hugging Face lays them out."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import gally
from gally import _core
from gally.dtypes import bf16_bits, round_bf16

ISAS = list(_core.available_isas())
# The SIMD kernel sets this CPU runs, for the tests that hold each against its scalar twin; where
# there is none (not x86-64, or no AVX2) one skipped case says so, instead of comparing the
# scalar kernels with themselves.
SIMD_ISAS = [isa for isa in ISAS if isa != "generic"] or [
    pytest.param("none", marks=pytest.mark.skip(reason="this CPU runs no SIMD kernel set: nothing to hold "
                                                       "against the scalar twins"))]

# the kernel tests' backends: this CPU's extension, and the NEON kernels under qemu-aarch64
from kernel_backends import aarch64_core, aarch64_runner, core  # noqa: E402, F401  (fixtures)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Writes a .safetensors file by hand (the library's NumPy API has no bf16)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        if dtype == "F32":
            data = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        elif dtype == "F16":
            data = np.ascontiguousarray(a, dtype=np.float16).tobytes()
        elif dtype == "BF16":
            data = bf16_bits(a).tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def stored(a: np.ndarray, dtype: str) -> np.ndarray:
    """The values a tensor has once stored in `dtype`, as float64."""
    if dtype == "BF16":
        return round_bf16(a).astype(np.float64)
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float64)
    return a.astype(np.float32).astype(np.float64)


DEFAULT_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    qwen2 = cfg["architectures"][0] == "Qwen2ForCausalLM"

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(n, center=0.0, scale=0.1):
        return (center + scale * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = vec(D, 1.0)
        w[p + "post_attention_layernorm.weight"] = vec(D, 1.0)
        for name, rows, cols in (("q", H * hd, D), ("k", KV * hd, D), ("v", KV * hd, D), ("o", D, H * hd)):
            w[p + f"self_attn.{name}_proj.weight"] = mat(rows, cols)
            if (qwen2 and name != "o") or cfg.get("attention_bias"):
                w[p + f"self_attn.{name}_proj.bias"] = vec(rows)
        for name, rows, cols in (("gate", F, D), ("up", F, D), ("down", D, F)):
            w[p + f"mlp.{name}_proj.weight"] = mat(rows, cols)
            if cfg.get("mlp_bias"):
                w[p + f"mlp.{name}_proj.bias"] = vec(rows)
    w["model.norm.weight"] = vec(D, 1.0)
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = mat(V, D)
    return w


def word_tokenizer_json(vocab_size: int = DEFAULT_CONFIG["vocab_size"]) -> str:
    """A tokenizer.json for the random checkpoints: words w0 … w{vocab_size − 1}, split at spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def make_checkpoint(folder, dtype: str = "F32", seed: int = 0, **overrides):
    """Writes config.json + model.safetensors with random weights into `folder`.
    Returns (folder, weights as stored, float64) for the NumPy reference."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    cfg = {**DEFAULT_CONFIG, **overrides}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    w = random_weights(cfg, seed)
    write_safetensors(os.path.join(folder, "model.safetensors"), w, dtype)
    return folder, {k: stored(v, dtype) for k, v in w.items()}


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs a test once per kernel set this CPU supports."""
    before = _core.selected_isa()
    _core.select_isa(request.param)
    yield request.param
    _core.select_isa(before)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (real_model_helpers), fetched and converted once per machine."""
    return gally.load()


@pytest.fixture(scope="session")
def smollm_bf16():
    return gally.load(dtype="bf16")
