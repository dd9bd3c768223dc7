"""The engine's logits against the independent NumPy forward pass, on small random checkpoints."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import gally
from conftest import ISAS, make_checkpoint
from gally import _core
from reference_numpy import forward

TOKENS = [5, 17, 3, 88, 42, 0, 96, 11, 23, 64, 7, 7, 31, 50, 2, 77, 19]

VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim_ne_hidden_over_heads": dict(head_dim=24, num_attention_heads=6, num_key_value_heads=3),
    "llama3_rope": dict(rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8)),
    "linear_rope": dict(rope_scaling=dict(type="linear", factor=4.0)),
    "rope_parameters": dict(rope_theta=None, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=5000.0)),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True,
                  sliding_window=4096, use_sliding_window=False),
    "llama_biases": dict(attention_bias=True, mlp_bias=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    "wide_odd": dict(hidden_size=72, intermediate_size=200, vocab_size=301, num_attention_heads=3,
                     num_key_value_heads=3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_reference(tmp_path, isa, variant):
    folder, w = make_checkpoint(tmp_path, **VARIANTS[variant])
    model = gally.load(folder, threads=2)
    got = model.logits(TOKENS)
    want = forward(folder, TOKENS, w)
    assert got.shape == (len(TOKENS), model.config.vocab_size) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-3


@pytest.mark.parametrize("dtype", ["f32", "bf16", "int8"])
def test_short_prompts_take_the_row_wise_kernels(tmp_path, isa, dtype):
    """A float model's prompts of fewer than 16 tokens (17 on the AVX-512 sets) take the row-wise kernels,
    whose token tiles are never mostly empty, a quantized model's fewer than 4 (kernels.h): their logits
    against the NumPy reference, just below and at the boundary."""
    folder, w = make_checkpoint(tmp_path)
    model = gally.load(folder, dtype=dtype, threads=2)
    runner = model.runner()
    want_min = 4 if dtype == "int8" else 17 if isa.startswith("avx512") else 16
    assert runner.gemm_min_tokens == want_min
    tokens = (TOKENS * 2)[:want_min]
    want = forward(folder, tokens, w)
    tol = {"f32": 1e-4, "bf16": 0.05, "int8": 0.1}[dtype]  # measured 1.3e-6, 0.019 (rounded weights), 0.041
    for n in (want_min - 1, want_min):
        got = model.logits(tokens[:n])
        assert np.abs(got - want[:n]).max() <= tol, (n, np.abs(got - want[:n]).max())


@pytest.mark.parametrize("stored", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("dtype", [None, "f32", "bf16", "f16"])
def test_storage_and_compute_dtypes(tmp_path, isa, stored, dtype):
    folder, w = make_checkpoint(tmp_path, dtype=stored)
    model = gally.load(folder, dtype=dtype, threads=2, kv_dtype="f32")  # the weights' error alone (test_batch: KV)
    compute = dtype or {"F32": "f32", "BF16": "bf16", "F16": "f16"}[stored]
    assert model.dtype == compute
    assert (model.copied_bytes == 0) == (dtype is None or compute == stored.lower())
    got = model.logits(TOKENS)
    # avx512bf16 rounds a batch's activations to bf16 for bf16 weights (twice the arithmetic rate):
    # an error of a few 1e-3 on these logits, which span ±5; every other kernel set is exact in f32.
    tol = 3e-2 if (isa == "avx512bf16" and compute == "bf16") else 1e-3
    if compute == stored.lower():  # exact weights: the reference sees the same values
        assert np.abs(got - forward(folder, TOKENS, w)).max() <= tol
    else:  # a conversion rounds the weights: compare with the reference on rounded weights
        from conftest import stored as round_to
        rounded = {k: round_to(v.astype(np.float32), compute.upper()) if not k.endswith("norm.weight") else v
                   for k, v in w.items()}
        assert np.abs(got - forward(folder, TOKENS, rounded)).max() <= tol


def test_prompt_at_once_equals_one_by_one(tmp_path, isa):
    folder, _ = make_checkpoint(tmp_path)
    model = gally.load(folder, threads=2)
    whole = model.session().forward(TOKENS, all_logits=True)
    s = model.session()
    steps = np.stack([s.append([t]) for t in TOKENS])
    assert s.position == len(TOKENS)
    assert np.abs(whole - steps).max() <= 1e-4
    s2 = model.session()  # mixed chunks
    s2.append(TOKENS[:5])
    s2.append(TOKENS[5:6])
    last = s2.append(TOKENS[6:])
    assert np.abs(last - whole[-1]).max() <= 1e-4


def test_truncate_and_continue(tmp_path):
    folder, w = make_checkpoint(tmp_path)
    model = gally.load(folder, threads=2)
    s = model.session()
    s.append(TOKENS)
    s.truncate(6)
    assert s.position == 6
    got = s.append([9, 8, 7])
    want = forward(folder, TOKENS[:6] + [9, 8, 7], w)[-1]
    assert np.abs(got - want).max() <= 1e-3
    s.reset()
    assert s.position == 0
    assert np.abs(s.append(TOKENS[:3]) - forward(folder, TOKENS[:3], w)[-1]).max() <= 1e-3


def test_long_prompt_in_chunks(tmp_path):
    """Prompts longer than a prefill chunk (512 tokens) run in pieces."""
    folder, w = make_checkpoint(tmp_path, max_position_embeddings=1200, vocab_size=64)
    model = gally.load(folder, threads=2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, 1100).tolist()
    got = model.logits(ids)
    want = forward(folder, ids, w)
    assert np.abs(got - want).max() <= 1e-3


@pytest.mark.parametrize("dtype", ["f32", "int8"])
def test_passes_of_a_long_prompt_take_the_gemm_as_the_whole_would(tmp_path, isa, dtype):
    """A prompt longer than the runner's pass splits into passes, the last cut no shorter than
    gemm_min_tokens where it can be (40 tokens, passes of 32: 24 + 16 or 23 + 17, not 32 + 8), so
    that every token takes the GEMM as in one pass: the logits bit for bit those of one pass."""
    folder, _ = make_checkpoint(tmp_path)
    model = gally.load(folder, dtype=dtype, threads=2)
    ids = (TOKENS * 3)[:40]
    whole, parts = model.runner(64), model.runner(32)
    a, b = model.session(), model.session()
    assert np.array_equal(parts.forward([b], [ids]), whole.forward([a], [ids]))
    assert np.array_equal(parts.forward([b], [[9]]), whole.forward([a], [[9]]))


def test_two_sessions_in_two_threads(tmp_path):
    folder, w = make_checkpoint(tmp_path)
    model = gally.load(folder, threads=1)
    prompts = [TOKENS, TOKENS[::-1]]
    want = [forward(folder, p, w)[-1] for p in prompts]
    results = [None, None]

    def run(i):
        s = model.session()
        for _ in range(20):
            s.reset()
            out = s.append(prompts[i][:4])
            for t in prompts[i][4:]:
                out = s.append([t])
        results[i] = out

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, ref in zip(results, want):
        assert np.abs(got - ref).max() <= 1e-3


def test_threads_give_same_logits(tmp_path):
    folder, _ = make_checkpoint(tmp_path, hidden_size=128, intermediate_size=256)
    one = gally.load(folder, threads=1).logits(TOKENS)
    many = gally.load(folder, threads=3).logits(TOKENS)
    assert np.abs(one - many).max() <= 1e-5


@pytest.mark.parametrize("dtype", ["f32", "bf16", "int8", "int4"])
def test_batch_split_over_rows_and_tokens(tmp_path, dtype):
    # Matrices of 64 to 96 rows: on 2, 6 and 8 threads the matmuls split a batch's tokens as well
    # as the rows (forward.cpp, thread_tiles), in parts of 48 tokens; 49 and 97 tokens would leave
    # a last part of one token, which the split must avoid. No logit may change.
    folder, _ = make_checkpoint(tmp_path, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=200)
    for n in (49, 97, 130):
        tokens = np.random.default_rng(n).integers(0, 200, n)
        one = gally.load(folder, dtype=dtype, threads=1).logits(tokens)
        for threads in (2, 6, 8):
            got = gally.load(folder, dtype=dtype, threads=threads).logits(tokens)
            assert np.array_equal(got, one), (n, threads, np.abs(got - one).max())


def test_recorded_hidden_states_and_attention(tmp_path):
    folder, w = make_checkpoint(tmp_path)
    model = gally.load(folder, threads=2)
    c = model.config
    s = model.session()
    s.append(TOKENS[:4])
    n = len(TOKENS) - 4
    hidden = np.zeros((c.num_hidden_layers + 1, n, c.hidden_size), np.float32)
    att = np.zeros((c.num_hidden_layers, c.num_attention_heads, n, len(TOKENS)), np.float32)
    mlp = np.zeros((c.num_hidden_layers, n, c.intermediate_size), np.float32)
    logits = s.forward(TOKENS[4:], hidden_states=hidden, attentions=att, mlp_activations=mlp)
    # Embeddings of the new tokens, and each attention row a distribution over the causal prefix.
    assert np.allclose(hidden[0], w["model.embed_tokens.weight"][TOKENS[4:]], atol=1e-6)
    assert np.allclose(att.sum(-1), 1, atol=1e-5)
    for t in range(n):
        assert (att[:, :, t, 4 + t + 1:] == 0).all() and (att[:, :, t, : 4 + t + 1] > 0).all()
    # Each layer's feed-forward expansion silu(gate(x̂)) ⊙ up(x̂), x̂ the normalised residual stream
    # after that layer's attention: down(expansion) is what the layer adds to it.
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}.mlp."
        x_after = hidden[layer + 1].astype(np.float64)
        x_mid = x_after - mlp[layer].astype(np.float64) @ w[p + "down_proj.weight"].T
        h = x_mid / np.sqrt(np.mean(x_mid * x_mid, -1, keepdims=True) + c.rms_norm_eps)
        h = h * w[f"model.layers.{layer}.post_attention_layernorm.weight"]
        gate, up = h @ w[p + "gate_proj.weight"].T, h @ w[p + "up_proj.weight"].T
        assert np.allclose(mlp[layer], gate / (1 + np.exp(-gate)) * up, atol=1e-4), layer
    # The last layer's output, normalised and projected, gives the logits.
    x = hidden[-1, -1].astype(np.float64)
    x = x / np.sqrt(np.mean(x * x) + c.rms_norm_eps) * w["model.norm.weight"]
    assert np.abs(x @ w["lm_head.weight"].T - logits).max() <= 1e-3
    # The prediction step alone (the logit lens) on that output gives the same logits, bit for bit.
    assert np.array_equal(model.unembed(hidden[-1, -1:])[0], logits)
    with pytest.raises(ValueError, match="shape"):
        model.unembed(np.zeros((2, c.hidden_size + 1), np.float32))
    # Recording changes nothing.
    s2 = model.session()
    s2.append(TOKENS[:4])
    assert np.array_equal(s2.append(TOKENS[4:]), logits)


@pytest.mark.parametrize("dtype", [None, "bf16", "int8"])
def test_unembed_of_a_prompt_is_its_logits(tmp_path, isa, dtype):
    """Model.unembed on a whole prompt's last hidden states (a batch, which bf16 prompts pack for
    their matrix products) gives that prompt's logits bit for bit."""
    folder, _ = make_checkpoint(tmp_path)
    model = gally.load(folder, dtype=dtype, threads=2)
    c, n = model.config, len(TOKENS)
    hidden = np.zeros((c.num_hidden_layers + 1, n, c.hidden_size), np.float32)
    logits = model.session().forward(TOKENS, all_logits=True, hidden_states=hidden)
    assert np.array_equal(model.unembed(hidden[-1]), logits)


def test_tokenizer_loads_on_first_use(tmp_path):
    """gally.load leaves tokenizer.json alone until model.tokenizer is asked for: a model driven by
    token ids never holds it in memory."""
    from tokenizers import Tokenizer as HFTokenizer, models
    folder, _ = make_checkpoint(tmp_path)
    HFTokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(
        os.path.join(folder, "tokenizer.json"))
    model = gally.load(folder)
    assert model._tokenizer is gally.model._NOT_LOADED
    tok = model.tokenizer
    assert tok is not None and model.tokenizer is tok and tok.encode("b", add_special_tokens=False) == [1]
    os.remove(os.path.join(folder, "tokenizer.json"))
    assert gally.load(folder).tokenizer is None


@pytest.mark.parametrize("n", [51, 16])
def test_select_isa_while_another_thread_runs_forward(tmp_path, n):
    """A pass reads the kernel table once: while one thread switches sets, every pass of another
    gives exactly the logits of one whole set (never a mix, never a crash). 16 tokens: row-wise with the
    AVX-512 sets, through the GEMM with the others (Runner.gemm_min_tokens, read with the same table)."""
    folder, _ = make_checkpoint(tmp_path, dtype="BF16")
    model = gally.load(folder, threads=2)
    tokens = (TOKENS * 3)[:n]
    before = _core.selected_isa()
    try:
        per_set = {}
        for isa in ISAS:
            _core.select_isa(isa)
            per_set[isa] = model.logits(tokens)
        stop, results = threading.Event(), []

        def switch():
            while not stop.is_set():
                for isa in ISAS:
                    _core.select_isa(isa)

        switcher = threading.Thread(target=switch)
        switcher.start()
        try:
            for _ in range(200):
                results.append(model.logits(tokens))
        finally:
            stop.set()
            switcher.join()
    finally:
        _core.select_isa(before)
    for got in results:
        assert any(np.array_equal(got, want) for want in per_set.values())
