"""Hugging Face ↔ llama.cpp (GGUF) tensor names and q/k row order: one table read both ways, by
gally's GGUF importer (GGUF → HF, gguf_import) and by the benchmark's check of the GGUF files
llama.cpp's converter writes (HF → GGUF, bench/peer_gguf).

Row order: for the architectures in PERMUTED_QK, llama.cpp's converter reorders the rows of each
head of q_proj and k_proj (weights and biases) so that its RoPE rotates adjacent pairs
(x[2i], x[2i+1]), where HF rotates (x[i], x[i + d/2]). Within each head of d rows:

    GGUF row 2j + s  =  HF row s·d/2 + j        (s ∈ {0, 1}, j < d/2)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np

# GGUF general.architecture values whose q/k rows llama.cpp permuted (those it runs with
# interleaved "normal" RoPE; Mistral is written as "llama").
PERMUTED_QK = ("llama",)


@dataclasses.dataclass(frozen=True)
class TensorName:
    hf: str    # "self_attn.q_proj.weight" (inside model.layers.N. for a layer's tensor)
    gguf: str  # "attn_q.weight" (inside blk.N.)
    rope_heads: Optional[str] = None  # config field counting the heads whose rows llama.cpp permutes


GLOBAL = (
    TensorName("model.embed_tokens.weight", "token_embd.weight"),
    TensorName("model.norm.weight", "output_norm.weight"),
    TensorName("lm_head.weight", "output.weight"),
)
LAYER = (
    TensorName("input_layernorm.weight", "attn_norm.weight"),
    TensorName("post_attention_layernorm.weight", "ffn_norm.weight"),
    TensorName("self_attn.q_proj.weight", "attn_q.weight", "num_attention_heads"),
    TensorName("self_attn.q_proj.bias", "attn_q.bias", "num_attention_heads"),
    TensorName("self_attn.k_proj.weight", "attn_k.weight", "num_key_value_heads"),
    TensorName("self_attn.k_proj.bias", "attn_k.bias", "num_key_value_heads"),
    TensorName("self_attn.v_proj.weight", "attn_v.weight"),
    TensorName("self_attn.v_proj.bias", "attn_v.bias"),
    TensorName("self_attn.o_proj.weight", "attn_output.weight"),
    TensorName("self_attn.o_proj.bias", "attn_output.bias"),
    TensorName("mlp.gate_proj.weight", "ffn_gate.weight"),
    TensorName("mlp.gate_proj.bias", "ffn_gate.bias"),
    TensorName("mlp.up_proj.weight", "ffn_up.weight"),
    TensorName("mlp.up_proj.bias", "ffn_up.bias"),
    TensorName("mlp.down_proj.weight", "ffn_down.weight"),
    TensorName("mlp.down_proj.bias", "ffn_down.bias"),
)
# What every layer of a GGUF file must hold (biases are optional).
REQUIRED_LAYER = tuple(t.gguf for t in LAYER if t.gguf.endswith(".weight"))

# A layer's tensor: its layer number, then its name within the layer.
_LAYER_PREFIX = {"hf": "model.layers.{}.", "gguf": "blk.{}."}
_LAYER_PATTERN = {"hf": re.compile(r"model\.layers\.(\d+)\.(.+)"), "gguf": re.compile(r"blk\.(\d+)\.(.+)")}


def _lookup(name: str, spelling: str) -> Optional[tuple[Optional[str], TensorName]]:
    """(layer number, None outside the layers; the table's entry) of tensor `name` spelled the
    `spelling` way ("hf" or "gguf"), or None when the table has no such tensor."""
    for t in GLOBAL:
        if getattr(t, spelling) == name:
            return None, t
    m = _LAYER_PATTERN[spelling].fullmatch(name)
    for t in LAYER if m else ():
        if getattr(t, spelling) == m.group(2):
            return m.group(1), t
    return None


def _rename(name: str, source: str, target: str) -> Optional[str]:
    found = _lookup(name, source)
    if found is None:
        return None
    layer, t = found
    return getattr(t, target) if layer is None else _LAYER_PREFIX[target].format(layer) + getattr(t, target)


def hf_name(gguf_name: str) -> Optional[str]:
    """"blk.3.attn_q.weight" → "model.layers.3.self_attn.q_proj.weight"; None for a tensor gally
    has no place for."""
    return _rename(gguf_name, "gguf", "hf")


def gguf_name(hf_name: str) -> Optional[str]:
    """"model.layers.3.self_attn.q_proj.weight" → "blk.3.attn_q.weight"; None for a tensor llama.cpp's
    Llama layout has no place for."""
    return _rename(hf_name, "hf", "gguf")


def permuted_heads(architecture: str, hf_name: str, config: dict) -> Optional[int]:
    """The number of heads whose rows llama.cpp's converter permuted in tensor `hf_name` of a GGUF
    file of `architecture` (general.architecture), or None when its rows are in HF order. config:
    the model's config.json fields."""
    if architecture not in PERMUTED_QK:
        return None
    found = _lookup(hf_name, "hf")
    if found is None or found[1].rope_heads is None:
        return None
    return config.get(found[1].rope_heads) or config["num_attention_heads"]  # no num_key_value_heads: MHA


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp row order: within each head of d rows, HF row s·d/2 + j moves to 2j + s.
    w [n_head·d, ...] → [n_head, 2, d/2, ...] → swap the two middle axes → [n_head·d, ...]."""
    return w.reshape(n_head, 2, _half_head(w, n_head), *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp → HF row order, the inverse of permute_rows: GGUF row 2j + s moves back to s·d/2 + j.
    w [n_head·d, ...] → [n_head, d/2, 2, ...] → swap the two middle axes → [n_head·d, ...]."""
    return w.reshape(n_head, _half_head(w, n_head), 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _half_head(w: np.ndarray, n_head: int) -> int:
    rows = w.shape[0]
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")
    return rows // n_head // 2
