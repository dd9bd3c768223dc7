"""gally.gguf_names: the one HF ↔ GGUF tensor-name table, read both ways, and llama.cpp's q/k row
order, checked against the tests' own statement of llama.cpp's layout (gguf_helpers)."""

from __future__ import annotations

import numpy as np
import pytest

import gguf_helpers
from conftest import DEFAULT_CONFIG, random_weights
from gally import gguf_names

# Every tensor gally runs: biases on attention and MLP, an untied lm_head.
ALL_TENSORS = sorted(random_weights({**DEFAULT_CONFIG, "attention_bias": True, "mlp_bias": True,
                                     "num_hidden_layers": 12}))


def test_every_hf_name_maps_to_llama_cpps_name_and_back():
    assert len(ALL_TENSORS) == 3 + 12 * 16
    for hf in ALL_TENSORS:
        gguf = gguf_names.gguf_name(hf)
        assert gguf == gguf_helpers.gguf_name(hf), hf
        assert gguf_names.hf_name(gguf) == hf


def test_every_table_entry_round_trips():
    for t in gguf_names.GLOBAL:
        assert gguf_names.hf_name(t.gguf) == t.hf and gguf_names.gguf_name(t.hf) == t.gguf
    for t in gguf_names.LAYER:
        assert gguf_names.hf_name(f"blk.7.{t.gguf}") == f"model.layers.7.{t.hf}"
        assert gguf_names.gguf_name(f"model.layers.7.{t.hf}") == f"blk.7.{t.gguf}"
    assert len({t.hf for t in gguf_names.LAYER}) == len({t.gguf for t in gguf_names.LAYER}) == len(gguf_names.LAYER)


@pytest.mark.parametrize("name", ["model.vision_tower.weight", "model.layers.x.mlp.up_proj.weight",
                                  "model.layers.0.mlp.experts.0.up_proj.weight", "blk.0.ffn_up_exps.weight",
                                  "rope_freqs.weight", "token_embd.weight.extra", "layers.0.mlp.up_proj.weight", ""])
def test_names_outside_the_table_have_no_counterpart(name):
    assert gguf_names.gguf_name(name) is None
    assert gguf_names.hf_name(name) is None


def test_required_layer_tensors_are_the_weights():
    assert set(gguf_names.REQUIRED_LAYER) == {"attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight",
                                              "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                                              "ffn_up.weight", "ffn_down.weight"}


@pytest.mark.parametrize("n_head, head_dim, cols", [(1, 2, 3), (4, 16, 5), (3, 64, 1), (9, 64, 0), (2, 8, None)])
def test_permute_matches_llama_cpp_and_unpermute_inverts_it(n_head, head_dim, cols):
    shape = (n_head * head_dim,) if cols is None else (n_head * head_dim, cols)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = gguf_names.permute_rows(w, n_head)
    np.testing.assert_array_equal(permuted, gguf_helpers.permute(w, n_head))
    np.testing.assert_array_equal(gguf_names.unpermute_rows(permuted, n_head), w)
    np.testing.assert_array_equal(gguf_names.permute_rows(gguf_names.unpermute_rows(w, n_head), n_head), w)
    if head_dim > 2 and w.size:  # a head of 2 rows is its own permutation
        assert not np.array_equal(permuted, w)


def test_permute_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(ValueError, match="6 rows do not split into 2 heads of an even size"):
        gguf_names.permute_rows(np.zeros((6, 4)), 2)
    with pytest.raises(ValueError, match="8 rows do not split into 0 heads"):
        gguf_names.unpermute_rows(np.zeros((8, 4)), 0)


def test_permuted_heads():
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 2}
    for name, heads in (("self_attn.q_proj.weight", 8), ("self_attn.q_proj.bias", 8), ("self_attn.k_proj.weight", 2),
                        ("self_attn.k_proj.bias", 2), ("self_attn.v_proj.weight", None),
                        ("self_attn.o_proj.weight", None), ("mlp.up_proj.weight", None)):
        assert gguf_names.permuted_heads("llama", f"model.layers.3.{name}", cfg) == heads, name
        assert gguf_names.permuted_heads("qwen2", f"model.layers.3.{name}", cfg) is None, name
    assert gguf_names.permuted_heads("llama", "model.embed_tokens.weight", cfg) is None
    # a config without num_key_value_heads has as many k heads as q heads
    assert gguf_names.permuted_heads("llama", "model.layers.0.self_attn.k_proj.weight", {"num_attention_heads": 8}) == 8
