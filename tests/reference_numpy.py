"""An independent NumPy forward pass of a Llama-family checkpoint, written for clarity, in float64:
the oracle the engine is compared with. It reads config.json and the safetensors itself and
shares no code with gally."""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file


def _f64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64)


def load_weights(folder: str) -> dict[str, np.ndarray]:
    """F32/F16 checkpoints; tests that store BF16 pass the rounded weights themselves."""
    return {name: _f64(a) for name, a in load_file(os.path.join(folder, "model.safetensors")).items()}


def rope_frequencies(cfg: dict, head_dim: int) -> np.ndarray:
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / factor)
            else:
                s = (old / wavelen - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        return np.array(out)
    raise ValueError(kind)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF rotate-half RoPE: x [T, heads, d]; element i pairs with i + d/2."""
    angles = positions[:, None] * inv_freq[None, :]  # [T, d/2]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def forward(folder: str, tokens: list[int], weights: dict | None = None, kv_round=None, inputs=None) -> np.ndarray:
    """Logits [T, vocab] for the whole sequence, computed from scratch. kv_round: the values a KV
    cache holds for the keys and values [T, kv_heads, head_dim] (default: them, exactly).
    inputs(name, x): called with every linear layer's name and input x [T, in]."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    w = weights or load_weights(folder)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    inv_freq = rope_frequencies(cfg, hd)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)

    def linear(x, name):
        if inputs:
            inputs(name, x)
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][tokens]
    causal = np.triu(np.full((T, T), -np.inf), k=1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(h, p + "self_attn.q_proj").reshape(T, H, hd)
        k = linear(h, p + "self_attn.k_proj").reshape(T, KV, hd)
        v = linear(h, p + "self_attn.v_proj").reshape(T, KV, hd)
        q, k = rotate(q, pos, inv_freq), rotate(k, pos, inv_freq)
        if kv_round:
            k, v = kv_round(k), kv_round(v)
        out = np.empty((T, H, hd))
        for head in range(H):
            kvh = head // (H // KV)
            scores = q[:, head] @ k[:, kvh].T / math.sqrt(hd) + causal
            p_ = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p_ /= p_.sum(axis=-1, keepdims=True)
            out[:, head] = p_ @ v[:, kvh]
        x = x + linear(out.reshape(T, H * hd), p + "self_attn.o_proj")
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    x = rmsnorm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return x @ head.T
