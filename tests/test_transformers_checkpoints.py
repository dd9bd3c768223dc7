"""Checkpoints written by transformers' own save_pretrained, compared with transformers' logits.
Runs where torch and transformers are installed (they are references, not dependencies)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gally  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=211, max_position_embeddings=512, rms_norm_eps=1e-5)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict()),
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_scaled": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_linear_headdim": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=24, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_biases": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def _save(tmp_path, case, dtype=torch.float32):
    config_cls, model_cls, extra = CASES[case]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # larger-than-default weights give logits with real spread
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif p.shape[0] == cfg.hidden_size:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _reference(model, ids):
    with torch.no_grad():
        return model.float()(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("isa", [i for i in gally.info()["isas"] if i in ("generic",)] + [gally.info()["isas"][-1]])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case, isa):
    from gally import _core
    model = _save(tmp_path, case)
    ids = np.random.default_rng(0).integers(0, COMMON["vocab_size"], 40).tolist()
    want = _reference(model, ids)
    before = _core.selected_isa()
    _core.select_isa(isa)
    try:
        g = gally.load(str(tmp_path), threads=2)
        got = g.logits(ids)
        s = g.session()
        s.append(ids[:20])
        steps = [s.append([t]) for t in ids[20:]]
    finally:
        _core.select_isa(before)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(np.stack(steps) - want[20:]).max() <= 1e-3


def test_bf16_checkpoint(tmp_path):
    _save(tmp_path, "llama", torch.bfloat16)
    # The bf16 weights computed in f32 (reloading also recomputes the RoPE buffer in f32).
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = list(range(3, 40))
    want = _reference(model, ids)
    from gally import _core
    before = _core.selected_isa()
    try:
        for isa in _core.available_isas():
            _core.select_isa(isa)
            g = gally.load(str(tmp_path))
            assert g.dtype == "bf16" and g.copied_bytes == 0
            # avx512bf16 rounds a prompt's activations to bf16 (vdpbf16ps); the other sets are exact
            tol = 3e-2 if isa == "avx512bf16" else 1e-3
            assert np.abs(g.logits(ids) - want).max() <= tol, isa
    finally:
        _core.select_isa(before)
