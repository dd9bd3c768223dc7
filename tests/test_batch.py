"""Batched forward passes over several sequences (csrc/sequence.h Runner) and the paged KV cache
they draw from (csrc/kv_cache.h): a sequence's logits in a batch are exactly what it gets alone,
the cache grows and shrinks with the tokens held, prefixes are shared, and a full pool is an
error that changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

import gally
from conftest import ISAS, make_checkpoint
from gally import _core
from reference_numpy import forward

VOCAB = 200


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder, _ = make_checkpoint(tmp_path_factory.mktemp("batch"), hidden_size=64, intermediate_size=96,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return folder


def run_alone(model, prompt, steps):
    """Logits after the prompt, then after each greedy step, for one session."""
    s = model.session()
    out = [s.append(prompt)]
    for _ in range(steps):
        out.append(s.append(int(np.argmax(out[-1]))))
    return out


def run_batched(model, prompts, steps):
    runner = _core.Runner(model._core, 128)
    seqs = [_core.Sequence(model._core, model._pool, 256) for _ in prompts]
    logits = np.empty((len(prompts), VOCAB), np.float32)
    runner.forward_batch(seqs, np.concatenate(prompts).astype(np.int32), np.array([len(p) for p in prompts], np.int32),
                         logits)
    out = [[row.copy()] for row in logits]
    for _ in range(steps):
        tokens = np.array([np.argmax(o[-1]) for o in out], np.int32)
        runner.forward_batch(seqs, tokens, np.ones(len(prompts), np.int32), logits)
        for o, row in zip(out, logits):
            o.append(row.copy())
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [None, "bf16", "int8", "int4"])
def test_batch_equals_each_sequence_alone(folder, isa, dtype):
    """Prompts of 1 to 30 tokens in one pass, then decode steps together: every logit of every
    sequence equals, bit for bit, the same sequence run alone. Decode steps and prompt chunks of
    fewer than Runner.gemm_min_tokens (4; float models 16, or 17 on AVX-512: both sides of each limit
    here) take the row-wise kernels in both; longer chunks the GEMM in both."""
    before = _core.selected_isa()
    _core.select_isa(isa)
    try:
        model = gally.load(folder, dtype=dtype, threads=2)
        rng = np.random.default_rng(1)
        prompts = [rng.integers(0, VOCAB, n) for n in (1, 3, 7, 30, 5, 2, 4, 15, 16, 17)]
        batched = run_batched(model, prompts, 3)
        for prompt, got in zip(prompts, batched):
            want = run_alone(model, prompt, 3)
            assert all(np.array_equal(a, b) for a, b in zip(want, got)), len(prompt)
    finally:
        _core.select_isa(before)


def test_batch_of_unequal_sequences_against_numpy(folder):
    """The independent NumPy forward pass of each sequence, for a batch of unequal sequences."""
    model = gally.load(folder, threads=2)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, VOCAB, n) for n in (9, 1, 4, 17)]
    batched = run_batched(model, prompts, 2)
    for prompt, got in zip(prompts, batched):
        tokens = list(prompt)
        for step, logits in enumerate(got):
            want = forward(folder, tokens)[-1]
            assert np.abs(logits - want).max() <= 1e-4, (len(prompt), step)
            tokens.append(int(np.argmax(logits)))


def test_kv_memory_follows_the_tokens(folder):
    """16 sequences of 256 tokens hold exactly 16 × 256 × (KV bytes per token): blocks of 16
    positions, taken as positions are reached, given back on truncate and when dropped."""
    model = gally.load(folder, threads=2)
    per_token = model.kv_bytes_per_token
    c = model.config
    assert per_token == c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    sessions = [model.session() for _ in range(16)]
    assert model.kv_cache_usage()["in_use"] == 0
    for s in sessions:
        s.append(np.arange(256) % VOCAB)
    assert model.kv_cache_usage()["in_use"] == 16 * 256 * per_token
    sessions[0].truncate(100)  # 7 blocks of 16 hold 100 positions
    assert model.kv_cache_usage()["in_use"] == (15 * 256 + 7 * 16) * per_token
    del sessions[:8]
    assert model.kv_cache_usage()["in_use"] == 8 * 256 * per_token
    allocated = model.kv_cache_usage()["allocated"]
    more = [model.session() for _ in range(8)]
    for s in more:
        s.append(np.arange(256) % VOCAB)
    assert model.kv_cache_usage()["allocated"] == allocated  # freed blocks are reused, not mapped anew


@pytest.mark.parametrize("kv_dtype", ["f32", "int8"])
def test_trim_gives_the_free_blocks_back(folder, kv_dtype):
    """KvPool.trim returns the memory of the blocks no sequence holds (f32: blocks of two whole pages;
    int8: blocks smaller than a page, which keep theirs); the sequences still held keep their cache,
    and blocks taken again afterwards work as new."""
    model = gally.load(folder, threads=2, kv_dtype=kv_dtype)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, VOCAB, 200)) for _ in range(4)]
    sessions = [model.session() for _ in prompts]
    want = [s.append(p) for s, p in zip(sessions, prompts)]
    del sessions[:2]
    usage = model.kv_cache_usage()
    assert usage["allocated"] > usage["in_use"] == 2 * 208 * model.kv_bytes_per_token
    model._pool.trim()
    whole_pages = model._pool.block_bytes >= 2 * 4096
    assert (model.kv_cache_usage()["allocated"] == usage["in_use"]) == whole_pages
    for prompt, s in zip(prompts[2:], sessions):  # the held ones go on
        fresh = model.session()
        fresh.append(prompt)
        assert np.array_equal(s.append([7]), fresh.append([7]))
    for prompt, logits in zip(prompts, want):  # fresh sessions on the trimmed blocks
        assert np.array_equal(model.session().append(prompt), logits)


def test_full_pool_is_an_error_that_changes_nothing(folder):
    model = gally.load(folder, threads=2, kv_cache_bytes=4 * 16 * 2 * 2 * 2 * 16 * 4)  # 4 blocks of 16 positions
    assert model.kv_cache_bytes // model.kv_bytes_per_token == 64
    a, b = model.session(64), model.session(64)
    a.append(np.arange(40) % VOCAB)  # 3 blocks
    with pytest.raises(gally.KvCacheFull, match="KV cache is full"):
        b.append(np.arange(20) % VOCAB)  # 2 more blocks: only 1 left
    assert b.position == 0 and model.kv_cache_usage()["in_use"] == 3 * 16 * model.kv_bytes_per_token
    logits = b.append(np.arange(10) % VOCAB)  # fits in the last block
    a.reset()
    assert np.array_equal(model.session(64).append(np.arange(10) % VOCAB), logits)
    with pytest.raises(ValueError, match="more than the model's whole pool"):
        model.session(65)


def test_fork_shares_the_prefix(folder):
    """A fork shares the full blocks of the prefix and copies the partial one; both sides then go
    on as if each had computed the prefix itself, also after truncating into a shared block."""
    model = gally.load(folder, threads=2)
    per_block = 16 * model.kv_bytes_per_token
    prefix = np.arange(40) % VOCAB  # 2 full blocks and 8 positions
    s = model.session()
    s.append(prefix)
    assert model.kv_cache_usage()["in_use"] == 3 * per_block
    f = s.fork()
    assert f.position == 40 and model.kv_cache_usage()["in_use"] == 4 * per_block  # the partial block copied
    tail_a, tail_b = [5, 6, 7], [8, 9]
    got_a, got_b = s.append(tail_a), f.append(tail_b)
    fresh = model.session()
    fresh.append(prefix)
    assert np.array_equal(fresh.fork().append(tail_a), got_a)
    assert np.array_equal(fresh.append(tail_b), got_b)
    # Truncating into a shared block and writing there copies it first: the other side keeps its keys.
    f.truncate(20)
    f.append([1, 2, 3])
    ref = model.session()
    ref.append(prefix), ref.append(tail_a)
    assert np.array_equal(s.append([11]), ref.append([11]))
    g = s.fork(17)
    assert g.position == 17
    with pytest.raises(ValueError, match="position must be"):
        s.fork(s.position + 1)


def test_bad_batches_are_refused(folder):
    model = gally.load(folder, threads=2)
    runner = _core.Runner(model._core, 16)
    a, b = (_core.Sequence(model._core, model._pool, 32) for _ in range(2))
    out = np.empty((2, VOCAB), np.float32)
    cases = [
        (([a, a], [1, 2], [1, 1]), "appears twice"),
        (([a, b], [1, 2, 3], [1, 1]), "add up"),
        (([a, b], [1, VOCAB], [1, 1]), "sequence 1: token id 200"),
        (([a, b], [1] * 20, [10, 10]), "exceeds the runner's 16"),
        (([a, b], [1] * 40, [5, 35]), "sequence 1: sequence of 35 tokens .* exceeds max_context 32"),
        (([a, b], [1], [1, 0]), "add up|empty"),
    ]
    for (seqs, tokens, counts), message in cases:
        with pytest.raises(ValueError, match=message):
            runner.forward_batch(seqs, np.array(tokens, np.int32), np.array(counts, np.int32), out)
        assert a.position == 0 and b.position == 0
    with pytest.raises(ValueError, match="no sequences"):
        runner.forward_batch([], np.array([], np.int32), np.array([], np.int32), out)
    other = gally.load(folder, threads=1)
    with pytest.raises(ValueError, match="another model"):
        runner.forward_batch([_core.Sequence(other._core, other._pool, 8)], np.array([1], np.int32),
                             np.array([1], np.int32), out[:1])


@pytest.mark.parametrize("kv_dtype", ["bf16", "f16", "int8"])
def test_compact_kv_cache(folder, kv_dtype):
    """A bf16 / f16 KV cache: half the bytes per token; int8: a row of head_dim codes and a bf16 scale
    per 32.
    Logits within the rounding of the keys and values of the f32 cache's, and batches still exactly
    each sequence alone."""
    f32 = gally.load(folder, threads=2)
    model = gally.load(folder, threads=2, kv_dtype=kv_dtype)
    head_dim = f32.config.head_dim
    row = 2 * head_dim if kv_dtype != "int8" else head_dim + 2 * -(-head_dim // 32)  # bytes
    assert model.kv_dtype == kv_dtype and model.kv_bytes_per_token * 4 * head_dim == f32.kv_bytes_per_token * row
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n) for n in (1, 6, 30)]
    batched = run_batched(model, prompts, 4)
    for prompt, got in zip(prompts, batched):
        assert all(np.array_equal(a, b) for a, b in zip(run_alone(model, prompt, 4), got))
        want = run_alone(f32, prompt, 4)
        assert max(np.abs(a - b).max() for a, b in zip(want, got)) < 0.05
    with pytest.raises(ValueError, match="kv_dtype must be one of f32, bf16, f16, int8, got 'int4'"):
        gally.load(folder, kv_dtype="int4")


@pytest.mark.parametrize("kv_dtype", ["bf16", "f16", "int8"])
def test_compact_kv_cache_against_numpy(folder, kv_dtype):
    """Each compact cache's logits, prompt and decode steps, match the independent NumPy forward pass
    whose keys and values are rounded as that cache holds them (test_kernels.kv_rounded, from the f32
    values): far closer than to the f32 cache's."""
    from test_kernels import kv_rounded

    model, exact = gally.load(folder, threads=2, kv_dtype=kv_dtype), gally.load(folder, threads=2)
    ids = list(np.random.default_rng(6).integers(0, VOCAB, 40))
    s, f = model.session(), exact.session()
    got = [s.append(ids[:33]), *(s.append([i]) for i in ids[33:])]
    f32 = [f.append(ids[:33]), *(f.append([i]) for i in ids[33:])]
    def rounded(a):  # [T, kv_heads, head_dim] → per row, from f32
        return kv_rounded(a.astype(np.float32).reshape(-1, a.shape[-1]), kv_dtype).reshape(a.shape)

    want = forward(folder, ids, kv_round=rounded)[32:]
    err = max(np.abs(g - w).max() for g, w in zip(got, want))
    off = max(np.abs(g - w).max() for g, w in zip(got, f32))
    assert err < 1e-4 and err < off / 20, (err, off)


def test_a_long_context_splits_its_decode_attention(folder):
    """Past 512 keys a decode step's attention is computed in parts over the threads and merged:
    the same as the independent NumPy forward pass, and the same at 1 and 3 threads."""
    ids = list(np.random.default_rng(4).integers(0, VOCAB, 1100))
    got = {}
    for threads in (1, 3):
        s = gally.load(folder, threads=threads, max_context=2048, force_context=True).session()
        s.append(ids[:1098])
        got[threads] = [s.append([ids[1098]]), s.append([ids[1099]])]
    assert all(np.array_equal(a, b) for a, b in zip(got[1], got[3]))
    want = forward(folder, ids)
    assert np.abs(got[1][0] - want[1098]).max() <= 1e-4 and np.abs(got[1][1] - want[1099]).max() <= 1e-4


def test_llama3_rope_holds_far_past_the_original_context(tmp_path):
    """A Llama-3-scaled model (original context 256, factor 32) at positions past 4096: a prompt,
    then decode steps, as the independent NumPy forward pass computes them."""
    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256)
    folder, w = make_checkpoint(tmp_path, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB, rope_theta=500000.0, rope_scaling=scaling,
                                max_position_embeddings=8192)
    ids = list(np.random.default_rng(5).integers(0, VOCAB, 4200))
    s = gally.load(folder, threads=2).session()
    s.append(ids[:4198])
    got = [s.append([ids[4198]]), s.append([ids[4199]])]
    want = forward(folder, ids, w)
    assert max(np.abs(g - want[4198 + i]).max() for i, g in enumerate(got)) <= 2e-3
