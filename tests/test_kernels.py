"""Each SIMD kernel against its scalar twin (the "generic" set), over sizes 1 … 2×16+3 and odd
shapes, for every instruction set this CPU runs and every aarch64 NEON set under qemu
(kernel_backends.py); and the scalar twins against NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ISAS
from gally import _core
from gally.dtypes import as_float32, bf16_bits, round_bf16
from kernel_backends import AARCH64_SETS, bf16_prefill, each_set

SIZES = list(range(1, 36))  # 1 … 2 × 16 lanes + 3


def effective_x(isa, x, wtype):
    """avx512bf16, neonbf16 and neoni8mm round the activations of a batch (≥ 4 tokens) with bf16, int8 or int4
    weights to bf16 for their bf16 dot products."""
    return round_bf16(x) if bf16_prefill(isa, wtype, x.shape[0]) else x


def weights(rng, rows, cols, wtype):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if wtype == "f32":
        return w, w.astype(np.float64)
    if wtype == "bf16":
        bits = bf16_bits(w)
        return bits, as_float32("BF16", bits).astype(np.float64)
    half = w.astype(np.float16)
    return half.view(np.uint16), half.astype(np.float64)


@each_set()
@pytest.mark.parametrize("wtype", ["f32", "bf16", "f16"])
def test_matmul_shapes(core, isa, wtype):
    rng = np.random.default_rng(0)
    for n_in in SIZES + [64, 100, 576]:
        for n_tok, n_out in ((1, 7), (3, 13), (7, 5), (13, 17)):
            W, Wf = weights(rng, n_out, n_in, wtype)
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            b = rng.standard_normal(n_out).astype(np.float32)
            want = effective_x(isa, x, wtype).astype(np.float64) @ Wf.T + b
            y = np.full((n_tok, n_out), np.nan, np.float32)
            core.kernel_matmul(isa, x, W, wtype, b, y, False, 0, n_out)
            scale = np.abs(x).astype(np.float64) @ np.abs(Wf).T + 1
            assert (np.abs(y - want) <= 1e-5 * scale).all(), (n_in, n_tok, n_out)


@each_set()
def test_matmul_row_range_and_accumulate(core, isa):
    rng = np.random.default_rng(1)
    n_tok, n_in, n_out = 9, 37, 29
    W, Wf = weights(rng, n_out, n_in, "f32")
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    y0 = rng.standard_normal((n_tok, n_out)).astype(np.float32)
    y = y0.copy()
    core.kernel_matmul(isa, x, W, "f32", None, y, True, 5, 22)
    want = y0.astype(np.float64).copy()
    want[:, 5:22] += x.astype(np.float64) @ Wf[5:22].T
    assert np.abs(y - want).max() <= 1e-4
    assert np.array_equal(y[:, :5], y0[:, :5]) and np.array_equal(y[:, 22:], y0[:, 22:])


@each_set(simd_only=True)
@pytest.mark.parametrize("wtype", ["f32", "bf16", "f16"])
def test_matmul_simd_equals_scalar_twin(core, isa, wtype):
    rng = np.random.default_rng(2)
    for n_in in SIZES:
        for n_tok in (1, 2, 5, 6, 7, 13):
            W, _ = weights(rng, 11, n_in, wtype)
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            ys = [core.kernel_matmul(k, effective_x(isa, x, wtype), W, wtype, None,
                                      np.zeros((n_tok, 11), np.float32), False, 0, 11)
                  for k in ("generic", isa)]
            assert np.allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5 * np.sqrt(n_in))


@each_set()
def test_matmul_many_equals_one_by_one(core, isa):
    """Several matrices over one input (q/k/v, gate/up) give what matmul gives for each, in one
    call or one at a time, mixed weight types included."""
    rng = np.random.default_rng(9)
    for n_tok in (1, 3, 4, 50):
        x = rng.standard_normal((n_tok, 40)).astype(np.float32)
        types = ["bf16", "f32", "bf16", "f16"]
        mats = [weights(rng, rows, 40, wtype)[0] for rows, wtype in zip((7, 33, 16, 5), types)]
        ranges = [(0, 7), (3, 30), (8, 16), (0, 5)]
        want = [np.full((n_tok, W.shape[0]), 1.5, np.float32) for W in mats]
        for W, t, (r0, r1), y in zip(mats, types, ranges, want):
            core.kernel_matmul(isa, x, W, t, None, y, True, r0, r1)
        got = [np.full((n_tok, W.shape[0]), 1.5, np.float32) for W in mats]
        outs = [(W, t, y, r0, r1, True) for W, t, (r0, r1), y in zip(mats, types, ranges, got)]
        core.kernel_matmul_many(isa, x, outs)
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


@each_set()
def test_rmsnorm(core, isa):
    rng = np.random.default_rng(3)
    for n in SIZES + [576, 4099]:
        x = rng.standard_normal(n).astype(np.float32) * 3
        w = rng.standard_normal(n).astype(np.float32)
        got = core.kernel_rmsnorm(isa, x, w, 1e-5)
        x64 = x.astype(np.float64)
        want = x64 / np.sqrt(np.mean(x64 * x64) + 1e-5) * w
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6)


@each_set()
def test_rope_pairs_i_with_i_plus_half(core, isa):
    rng = np.random.default_rng(4)
    for d in [2 * h for h in SIZES] + [64, 128]:
        v = rng.standard_normal(d).astype(np.float32)
        theta = rng.uniform(-10, 10, d // 2)
        got = core.kernel_rope(isa, v, np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32))
        a, b = v[: d // 2].astype(np.float64), v[d // 2:].astype(np.float64)
        want = np.concatenate([a * np.cos(theta) - b * np.sin(theta), b * np.cos(theta) + a * np.sin(theta)])
        assert np.allclose(got, want, atol=1e-5)


@each_set()
@pytest.mark.parametrize("block_rows", [16, 48, 1024])
def test_attention(core, isa, block_rows):
    """Keys and values in a paged cache (kernels.h KvHead): blocks of block_rows positions."""
    rng = np.random.default_rng(5)
    for n in SIZES + [100, 1000]:
        for d in (1, 8, 17, 64, 80, 128):
            q = rng.standard_normal(d).astype(np.float32)
            K = rng.standard_normal((n, d)).astype(np.float32)
            V = rng.standard_normal((n, d)).astype(np.float32)
            out, probs = core.kernel_attention(isa, q, K, V, 0.7, block_rows)
            s = 0.7 * K.astype(np.float64) @ q
            p = np.exp(s - s.max())
            p /= p.sum()
            assert np.allclose(probs, p, rtol=1e-5, atol=1e-7)
            assert np.allclose(out, p @ V, atol=1e-5)


@each_set()
@pytest.mark.parametrize("block_rows", [16, 32, 1024])
def test_attention_causal_block(core, isa, block_rows):
    """A block of consecutive positions (queries in the lanes) equals causal attention query by
    query: query i sees keys 0 … ctx0+i−1, and its recorded weights stop there."""
    rng = np.random.default_rng(7)
    for nq in (1, 2, 7, 8, 9, 16, 17, 35):
        for ctx0 in (1, 3, 40):
            for d in (1, 8, 17, 64, 80):
                n = ctx0 + nq - 1
                Q = rng.standard_normal((nq, d)).astype(np.float32)
                K = rng.standard_normal((n, d)).astype(np.float32)
                V = rng.standard_normal((n, d)).astype(np.float32)
                out, probs = core.kernel_attention_causal(isa, Q, K, V, ctx0, 0.3, block_rows=block_rows)
                for i in range(nq):
                    c = ctx0 + i
                    s = 0.3 * K[:c].astype(np.float64) @ Q[i]
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    assert np.allclose(probs[i, :c], p, rtol=1e-5, atol=1e-7), (nq, ctx0, d, i)
                    assert (probs[i, c:] == -1).all()
                    assert np.allclose(out[i], p @ V[:c], atol=1e-5), (nq, ctx0, d, i)


@each_set(simd_only=True)
def test_attention_causal_simd_equals_scalar_twin(core, isa):
    rng = np.random.default_rng(8)
    for nq, ctx0, d in ((16, 1, 64), (5, 100, 64), (33, 7, 128), (3, 2, 24)):
        n = ctx0 + nq - 1
        Q, K, V = (rng.standard_normal((m, d)).astype(np.float32) * 2 for m in (nq, n, n))
        a, b = (core.kernel_attention_causal(k, Q, K, V, ctx0, 0.125) for k in ("generic", isa))
        assert np.allclose(a[0], b[0], rtol=1e-5, atol=5e-5) and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("avx512bf16" not in ISAS, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("block_rows", [16, 1024])
def test_attention_causal_bf16(block_rows):
    """The bf16 models' prompt attention equals causal attention on the bf16-rounded scaled queries,
    keys, values and (unnormalised) weights, summed exactly; its recorded weights are the f32 ones."""
    rng = np.random.default_rng(9)
    for nq, ctx0, d in ((1, 1, 32), (16, 1, 64), (7, 5, 64), (64, 1, 64), (33, 40, 128), (70, 300, 64)):
        n = ctx0 + nq - 1
        Q, K, V = (rng.standard_normal((m, d)).astype(np.float32) * 2 for m in (nq, n, n))
        out, probs = _core.testing.kernel_attention_causal("avx512bf16", Q, K, V, ctx0, 0.125, bf16=True,
                                                           block_rows=block_rows)
        s = round_bf16(np.float32(0.125) * Q).astype(np.float64) @ round_bf16(K).astype(np.float64).T
        for i in range(nq):
            c = ctx0 + i
            e = np.exp(s[i, :c] - s[i, :c].max())
            assert np.allclose(probs[i, :c], e / e.sum(), rtol=1e-5, atol=1e-7), (nq, ctx0, d, i)
            assert (probs[i, c:] == -1).all()
            want = round_bf16(e.astype(np.float32)).astype(np.float64) @ round_bf16(V[:c]).astype(np.float64) / e.sum()
            assert np.allclose(out[i], want, rtol=1e-4, atol=1e-4), (nq, ctx0, d, i)
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.testing.kernel_attention_causal("avx512bf16", Q[:, :24], K[:, :24], V[:, :24], ctx0, 0.125, bf16=True)
    with pytest.raises(ValueError, match="no bf16 attention"):
        _core.testing.kernel_attention_causal("generic", Q, K, V, ctx0, 0.125, bf16=True)


@each_set()
def test_attention_softmax_is_numerically_safe(core, isa):
    d = 16
    q = np.full(d, 100.0, np.float32)
    K = np.stack([np.full(d, 10.0), np.full(d, 9.0), np.full(d, -10.0)]).astype(np.float32)
    V = np.eye(3, d, dtype=np.float32)
    out, probs = core.kernel_attention(isa, q, K, V, 1.0)  # scores 16000, 14400, -16000
    assert np.isfinite(out).all() and np.allclose(probs, [1, 0, 0]) and np.allclose(out[:3], [1, 0, 0])


@each_set()
def test_silu_mul(core, isa):
    rng = np.random.default_rng(6)
    for n in SIZES + [1536]:
        g = (rng.standard_normal(n) * 8).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        got = core.kernel_silu_mul(isa, g, u)
        g64 = g.astype(np.float64)
        want = g64 / (1 + np.exp(-g64)) * u
        assert np.allclose(got, want, rtol=2e-6, atol=1e-6)
    extreme = np.array([-200, -90, -88, 0, 88, 90, 200] + [1.0] * 9, np.float32)
    got = core.kernel_silu_mul(isa, extreme, np.ones_like(extreme))
    assert np.isfinite(got).all() and np.allclose(got[:7], [0, 0, 0, 0, 88, 90, 200], atol=1e-30, rtol=1e-6)


@pytest.mark.parametrize("backend", ["native", "aarch64"])
def test_kernel_sets(core, backend):
    sets = core.available_isas()
    assert sets[0] == "generic" and core.selected_isa() == sets[-1]
    assert sets == (ISAS if backend == "native" else AARCH64_SETS)
    with pytest.raises(ValueError, match="not available"):
        core.select_isa("sse9")


# ---- the bf16 prompt sets (avx512bf16, neonbf16) against their scalar twin, "generic-bf16" ----

BF16_SET = pytest.mark.skipif("avx512bf16" not in ISAS, reason="this CPU has no AVX512-BF16")
BF16_SETS = pytest.mark.parametrize(
    "backend, isa", ([("native", "avx512bf16")] if "avx512bf16" in ISAS else []) + [("aarch64", "neonbf16")])


QUANTIZED = ("int8", "int4", "int4-v1")


def quantized_weights(rng, rows, cols, wtype):
    """(W, scales, mins, codes) in gally's int8/int4 layouts (kernels.h), from test_quant_kernels."""
    from test_quant_kernels import random_weights
    return random_weights(rng, wtype, rows, cols)[:4]


def twin_weights(rng, rows, cols, wtype):
    if wtype in QUANTIZED:
        return quantized_weights(rng, rows, cols, wtype)
    return weights(rng, rows, cols, wtype)[0], None, None, None


@pytest.mark.parametrize("backend", ["native", "aarch64"])
def test_bf16_twin_rounds_as_numpy(core, backend):
    """The twin itself: a batch with bf16 weights is the f64 product of bf16-rounded activations."""
    rng = np.random.default_rng(20)
    x = rng.standard_normal((6, 70)).astype(np.float32)
    W, Wf = weights(rng, 9, 70, "bf16")
    y = core.kernel_matmul("generic-bf16", x, W, "bf16", None, np.zeros((6, 9), np.float32), False, 0, 9)
    assert np.allclose(y, round_bf16(x).astype(np.float64) @ Wf.T, rtol=1e-5, atol=1e-5)
    y1 = core.kernel_matmul("generic-bf16", x[:3], W, "bf16", None, np.zeros((3, 9), np.float32), False, 0, 9)
    assert np.allclose(y1, x[:3].astype(np.float64) @ Wf.T, rtol=1e-5, atol=1e-5)  # a few tokens stay f32


@BF16_SETS
@pytest.mark.parametrize("wtype", ["bf16", "int8", "int4", "int4-v1", "f32"])
def test_bf16_matmul_equals_scalar_twin(core, isa, wtype):
    rng = np.random.default_rng(21)
    for n_in in ((64, 96, 576) if wtype in QUANTIZED else (1, 2, 17, 33, 64, 100)):
        for n_tok in (1, 3, 4, 5, 47, 48, 49, 100):
            W, s, m, c = twin_weights(rng, 19, n_in, wtype)
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            ys = [core.kernel_matmul(k, x, W, wtype, None, np.zeros((n_tok, 19), np.float32), False, 0, 19, s, m, c)
                  for k in ("generic-bf16", isa)]
            assert np.allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5 * np.sqrt(n_in)), (n_in, n_tok)


@BF16_SET
def test_bf16_pack_equals_scalar_twin():
    """The packed layout is data movement: bit for bit the same."""
    rng = np.random.default_rng(22)
    for n_tok, n_in in ((1, 1), (4, 33), (47, 64), (48, 576), (49, 17), (130, 100)):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        assert np.array_equal(_core.testing.kernel_pack("generic-bf16", x), _core.testing.kernel_pack("avx512bf16", x))


@BF16_SET
@pytest.mark.parametrize("wtype", ["bf16", "int8", "int4", "int4-v1", "f32"])
def test_bf16_packed_matmul_equals_scalar_twin(wtype):
    rng = np.random.default_rng(23)
    for n_tok, n_in in ((4, 64), (49, 96), (100, 576)):
        W, s, m, c = twin_weights(rng, 21, n_in, wtype)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        a, b = (_core.testing.kernel_matmul_packed(k, x, W, wtype, s, m, c) for k in ("generic-bf16", "avx512bf16"))
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5 * np.sqrt(n_in)), (n_tok, n_in)


@BF16_SET
@pytest.mark.parametrize("block_rows", [16, 1024])
def test_bf16_attention_equals_scalar_twin(block_rows):
    rng = np.random.default_rng(24)
    for nq, ctx0, d in ((1, 1, 32), (16, 1, 64), (7, 5, 64), (64, 1, 64), (33, 40, 128)):
        n = ctx0 + nq - 1
        Q, K, V = (rng.standard_normal((m, d)).astype(np.float32) * 2 for m in (nq, n, n))
        a, b = (_core.testing.kernel_attention_causal(k, Q, K, V, ctx0, 0.125, bf16=True, block_rows=block_rows)
                for k in ("generic-bf16", "avx512bf16"))
        assert np.allclose(a[0], b[0], rtol=1e-4, atol=1e-4) and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


# ---- compact KV caches: bf16, f16 and int8 keys and values ----

KV_GROUP = 32  # elements per scale of an int8 cache row (kernels.h)


def int8_rows(a):
    """An int8 cache's rows for a [n, d] (kernels.h quantize_kv_row): per group of 32 elements the
    scale max|x| / 127 rounded to bf16, and the codes x / scale rounded to nearest even, in f32.
    Returns codes [n, d] int8 and scales [n, groups] f32."""
    n, d = a.shape
    groups = -(-d // KV_GROUP)
    padded = np.zeros((n, groups * KV_GROUP), np.float32)
    padded[:, :d] = a
    g = padded.reshape(n, groups, KV_GROUP)
    scale = round_bf16(np.abs(g).max(-1) / np.float32(127))
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(scale[..., None] > 0, np.clip(np.rint(g / scale[..., None]), -127, 127), 0)
    return codes.reshape(n, -1)[:, :d].astype(np.int8), scale


def kv_rounded(a, kv_dtype):
    """The values a cache of kv_dtype holds for a."""
    if kv_dtype == "bf16":
        return round_bf16(a)
    if kv_dtype == "f16":
        return a.astype(np.float16).astype(np.float32)
    if kv_dtype == "int8":
        codes, scale = int8_rows(a)
        return codes.astype(np.float32) * np.repeat(scale, KV_GROUP, axis=1)[:, : a.shape[1]]
    return a


@each_set()
@pytest.mark.parametrize("to", ["bf16", "f16", "f32"])
def test_convert_row_rounds_to_nearest_even(core, isa, to):
    rng = np.random.default_rng(30)
    specials = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 65504.0, 65520.0, 1e-8, -3e-6, 6.1e-5, 1.0000001,
                         3.4e38, 1.17e-38, 2.0**-140], np.float32)
    for n in SIZES + [64, 128]:
        x = np.concatenate([specials, (rng.standard_normal(n) * 10 ** rng.uniform(-8, 6, n)).astype(np.float32)])[:n]
        got = core.kernel_convert_row(isa, x, to)
        if to == "bf16":
            want = bf16_bits(x)
        elif to == "f16":
            with np.errstate(over="ignore"):
                want = x.astype(np.float16).view(np.uint16)
        else:
            want = x
        assert np.array_equal(got, want), (n, np.flatnonzero(got != want)[:5])
    nan = core.kernel_convert_row(isa, np.full(20, np.nan, np.float32), to)
    assert np.isnan(nan.view(np.float32) if to == "f32" else
                    (nan.astype(np.uint32) << 16).view(np.float32) if to == "bf16" else nan.view(np.float16)).all()


@each_set()
def test_convert_row_to_int8(core, isa):
    """An int8 cache row: codes, then a bf16 scale per group of 32 (max|x| / 127), the codes x / scale
    rounded to nearest even, ties included; a group of zeros all zero, and a group holding an
    infinity or a NaN zero codes and a NaN scale (it reads back as NaN), the other groups as ever."""
    rng = np.random.default_rng(33)
    for n in SIZES + [64, 80, 128]:
        groups = -(-n // KV_GROUP)
        x = (rng.standard_normal((3, n)) * 10.0 ** rng.uniform(-6, 4, (3, 1))).astype(np.float32)
        s = np.float32(1.5 * 2.0**-3)  # a bf16 value: halves of it are ties of x / scale
        x[1] = rng.integers(-254, 255, n) / 2 * s
        x[1, ::KV_GROUP] = 127 * s  # each group's max|x|: its scale is exactly s
        for row in x:
            got = core.kernel_convert_row(isa, row, "int8")
            codes, scale = int8_rows(row[None])
            assert got.size == n + 2 * groups
            assert np.array_equal(got[:n].view(np.int8), codes[0]), n
            assert np.array_equal(got[n:].view(np.uint16), bf16_bits(scale[0])), n
    zero = core.kernel_convert_row(isa, np.zeros(40, np.float32), "int8")
    assert not zero.any()
    for bad in (np.inf, -np.inf, np.nan):
        row = np.ones(40, np.float32)
        row[7] = bad
        got = core.kernel_convert_row(isa, row, "int8")
        scales = got[40:].view(np.uint16)
        assert not got[:32].any() and np.isnan(as_float32("BF16", scales[:1]))[0]
        assert (got[32:40].view(np.int8) == 127).all() and scales[1] == bf16_bits(np.float32([1 / 127]))[0]


@each_set()
@pytest.mark.parametrize("kv_dtype", ["bf16", "f16", "int8"])
def test_attention_reads_a_compact_cache(core, isa, kv_dtype):
    """Decode and prompt attention over a bf16 / f16 / int8 cache: the f32 math on the values the
    cache holds."""
    rng = np.random.default_rng(31)
    for n, d in ((1, 64), (17, 64), (100, 80), (300, 128), (33, 8)):
        q = rng.standard_normal(d).astype(np.float32)
        K, V = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(2))
        out, probs = core.kernel_attention(isa, q, K, V, 0.3, 16, kv_dtype)
        Kr, Vr = kv_rounded(K, kv_dtype).astype(np.float64), kv_rounded(V, kv_dtype).astype(np.float64)
        s = 0.3 * Kr @ q
        p = np.exp(s - s.max())
        p /= p.sum()
        assert np.allclose(probs, p, rtol=1e-5, atol=1e-7) and np.allclose(out, p @ Vr, atol=1e-5), (n, d)
    for nq, ctx0, d in ((16, 1, 64), (5, 40, 64), (33, 7, 128), (7, 3, 24)):
        n = ctx0 + nq - 1
        Q, K, V = (rng.standard_normal((m, d)).astype(np.float32) for m in (nq, n, n))
        out, probs = core.kernel_attention_causal(isa, Q, K, V, ctx0, 0.25, kv_dtype=kv_dtype)
        Kr, Vr = kv_rounded(K, kv_dtype).astype(np.float64), kv_rounded(V, kv_dtype).astype(np.float64)
        for i in range(nq):
            c = ctx0 + i
            s = 0.25 * Kr[:c] @ Q[i]
            p = np.exp(s - s.max())
            p /= p.sum()
            assert np.allclose(probs[i, :c], p, rtol=1e-5, atol=1e-7) and np.allclose(out[i], p @ Vr[:c], atol=1e-5)
        if isa == "avx512bf16" and d % 32 == 0:  # the bf16 prompt attention reads the compact cache too
            a, b = (_core.testing.kernel_attention_causal(k, Q, K, V, ctx0, 0.25, bf16=True, kv_dtype=kv_dtype)
                    for k in ("generic-bf16", "avx512bf16"))
            assert np.allclose(a[0], b[0], rtol=1e-4, atol=1e-4) and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)


@each_set()
@pytest.mark.parametrize("kv_dtype", ["f32", "f16", "int8"])
def test_decode_attention_for_a_gqa_group_split_over_the_keys(core, isa, kv_dtype):
    """attention_part for 1, 3 or 4 heads sharing a KV head, over the keys whole or in parts merged
    by attention_merge: each head's softmax attention over all keys."""
    rng = np.random.default_rng(32)
    for heads, n, d, parts in ((1, 5, 64, 1), (3, 100, 64, 1), (3, 1100, 64, 3), (4, 517, 128, 4), (2, 40, 24, 2)):
        Q = rng.standard_normal((heads, d)).astype(np.float32)
        K, V = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(2))
        out, probs = core.kernel_attention(isa, Q, K, V, 0.2, 16, kv_dtype, parts)
        Kr, Vr = kv_rounded(K, kv_dtype).astype(np.float64), kv_rounded(V, kv_dtype).astype(np.float64)
        s = 0.2 * Q.astype(np.float64) @ Kr.T
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        assert np.allclose(out, p @ Vr, atol=1e-5), (heads, n, parts)
        if parts == 1:
            assert np.allclose(probs, p, rtol=1e-5, atol=1e-7)
        if isa != "generic":
            twin = core.kernel_attention("generic", Q, K, V, 0.2, 16, kv_dtype, parts)[0]
            assert np.allclose(out, twin, rtol=1e-5, atol=1e-6)


@each_set()
@pytest.mark.parametrize("kv_dtype", ["f32", "bf16", "int8"])
def test_decode_attention_takes_a_layers_kv_heads_at_once(core, isa, kv_dtype):
    """attention_part for several KV heads in one call (a layer's, as a decode unit takes them: a
    block at a time through the heads, each its own softmax), up to 9 (more than a pass takes) with
    groups of 1 to 5 queries, whole and in parts: each head's attention over its own keys, exactly
    what a call per KV head gives."""
    rng = np.random.default_rng(34)
    for g, heads, n, d, parts in ((2, 3, 100, 64, 1), (3, 3, 1100, 64, 3), (9, 1, 70, 64, 2), (4, 5, 260, 32, 1),
                                  (3, 2, 33, 24, 1)):
        Q = rng.standard_normal((g, heads, d)).astype(np.float32)
        K, V = (rng.standard_normal((g, n, d)).astype(np.float32) for _ in range(2))
        out, probs = core.kernel_attention(isa, Q, K, V, 0.3, 16, kv_dtype, parts)
        assert out.shape == Q.shape and probs.shape == (g, heads, n)
        for h in range(g):
            Kr, Vr = kv_rounded(K[h], kv_dtype).astype(np.float64), kv_rounded(V[h], kv_dtype).astype(np.float64)
            s = 0.3 * Q[h].astype(np.float64) @ Kr.T
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            assert np.allclose(out[h], p @ Vr, atol=1e-5), (g, heads, n, parts, h)
            one, one_probs = core.kernel_attention(isa, Q[h], K[h], V[h], 0.3, 16, kv_dtype, parts)
            assert np.array_equal(out[h], one), (g, heads, n, parts, h)
            if parts == 1:
                assert np.allclose(probs[h], p, rtol=1e-5, atol=1e-7) and np.array_equal(probs[h], one_probs)


@each_set()
@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
def test_decode_attention_rescales_as_its_maximum_grows(core, isa, kv_dtype):
    """attention_part keeps a running maximum over the keys (an online softmax): scores that rise
    along the keys, by up to 60 between neighbours, give every tile a new maximum and scale the sums
    before it down to nothing, and a falling run keeps the first maximum. Both, whole and in parts
    (parts that start inside a block), against NumPy."""
    rng = np.random.default_rng(33)
    heads, d = 3, 64
    Q = rng.standard_normal((heads, d)).astype(np.float32)
    for n, parts in ((70, 1), (300, 1), (300, 4), (1000, 3)):
        for rising in (True, False):
            u = Q[0] / np.linalg.norm(Q[0])
            steps = np.linspace(-40, 40, n) if rising else np.linspace(40, -40, n)
            K = (steps[:, None] * u[None, :] / (0.5 * np.linalg.norm(Q[0])) +
                 0.1 * rng.standard_normal((n, d))).astype(np.float32)
            V = rng.standard_normal((n, d)).astype(np.float32)
            out, probs = core.kernel_attention(isa, Q, K, V, 0.5, 16, kv_dtype, parts)
            Kr, Vr = kv_rounded(K, kv_dtype).astype(np.float64), kv_rounded(V, kv_dtype).astype(np.float64)
            s = 0.5 * Q.astype(np.float64) @ Kr.T
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            assert np.isfinite(out).all() and np.allclose(out, p @ Vr, atol=1e-5), (n, parts, rising)
            if parts == 1:
                assert np.allclose(probs, p, rtol=1e-5, atol=1e-7), (n, rising)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", ["f32", "bf16"])
def test_gemm_token_gets_the_same_in_any_tile(isa, wtype):
    """The prefill GEMM's token tiles: a last tile of one vector after a full one is merged with it and
    the two split evenly (AVX-512 64 + 16 tokens → 48 + 32, AVX2 24 + 8 → 16 + 16). A token's outputs are
    bit for bit the same whichever tile it lands in, and right."""
    rng = np.random.default_rng(12)
    for n_tok in (25, 32, 49, 56, 64, 72, 80, 112, 140):
        W, Wf = weights(rng, 37, 96, wtype)
        x = rng.standard_normal((n_tok, 96)).astype(np.float32)
        y = _core.testing.kernel_matmul(isa, x, W, wtype, None, np.zeros((n_tok, 37), np.float32), False, 0, 37)
        rounded = wtype == "bf16" and isa in ("avx512bf16", "generic-bf16", "neonbf16")  # vdpbf16ps, bfdot
        want = (round_bf16(x) if rounded else x).astype(np.float64) @ Wf.T
        assert np.allclose(y, want, rtol=1e-5, atol=1e-4), n_tok
        for t0, t1 in ((0, 16), (0, 24), (n_tok - 16, n_tok), (n_tok - 24, n_tok), (8, n_tok - 8)):
            part = _core.testing.kernel_matmul(isa, x[t0:t1], W, wtype, None, np.zeros((t1 - t0, 37), np.float32),
                                               False, 0, 37)
            assert np.array_equal(y[t0:t1], part), (n_tok, t0, t1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", ["f32", "bf16", "f16"])
def test_rowwise_token_gets_what_it_gets_alone(isa, wtype):
    """The row-by-row kernel of decode steps (Kernels::gemv) takes several tokens per pass over the
    weights: each token's outputs are bit for bit those of a call with that token alone, whatever the
    batch and whatever the row length (whole and partial vectors, a scalar tail). On the 8-lane sets,
    tokens whose rows exceed L1 together go in spans of k and chunks of rows (the last three cases:
    a leftover row in a later chunk, a pass of one token, an odd vector and a scalar tail)."""
    rng = np.random.default_rng(11)
    for n_tok, n_in, rows in ((2, 576, 7), (3, 100, 9), (8, 64, 5), (9, 33, 4), (17, 96, 3), (8, 1547, 100),
                              (5, 2000, 7), (10, 1100, 101)):
        W, _ = weights(rng, rows, n_in, wtype)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        b = rng.standard_normal(rows).astype(np.float32)
        y = _core.testing.kernel_matmul(isa, x, W, wtype, b, np.zeros((n_tok, rows), np.float32), False, 0, rows,
                                        rowwise=True)
        for t in range(n_tok):
            alone = _core.testing.kernel_matmul(isa, x[t:t + 1], W, wtype, b, np.zeros((1, rows), np.float32), False,
                                                0, rows, rowwise=True)
            assert np.array_equal(y[t], alone[0]), (n_tok, n_in, t)
