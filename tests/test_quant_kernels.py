"""The int8/int4 kernels (int4: version 2's super-blocks, and version 1's Q4_1 layout as "int4-v1"): int16
activation quantization and the integer matmuls against NumPy, and each SIMD set against its scalar twin, for
every instruction set this CPU runs and every aarch64 NEON set under qemu (kernel_backends.py)."""

from __future__ import annotations

import numpy as np
import pytest

from gally.dtypes import round_bf16
from kernel_backends import bf16_prefill, each_set

G = 32


def quantize_acts(x):
    """NumPy statement of the kernels' activation quantization (per group of 32)."""
    g = x.reshape(x.shape[0], -1, G).astype(np.float32)
    amax = np.abs(g).max(-1)
    inv = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(g * inv[..., None]).astype(np.int16)
    return q.reshape(x.shape), (amax / np.float32(32767)).astype(np.float32), g.sum(-1)


def requantize_bytes(xq, xs):
    """NumPy statement of how int4 weights' kernels requantize the int16 activations to int8 (csrc/kernels/common.h):
    each value · 127/32767 rounded to even, each scale · 32767/127, in f32; the sums those of the int8 values."""
    x8 = np.rint(xq.astype(np.float32) * (np.float32(127) / np.float32(32767))).astype(np.int16)
    xs8 = xs * (np.float32(32767) / np.float32(127))
    xsum8 = xs8 * x8.reshape(*xs.shape, G).sum(-1, dtype=np.int32).astype(np.float32)
    assert np.abs(x8).max() <= 127
    return x8, xs8, xsum8


def random_q8(rng, rows, cols):
    q = rng.integers(-127, 128, (rows, cols)).astype(np.int8)
    s = (rng.uniform(0.001, 0.02, (rows, cols // G))).astype(np.float16)
    w = q.reshape(rows, -1, G) * s.astype(np.float64)[..., None]
    return q, s, w.reshape(rows, cols)


def random_q4(rng, rows, cols):
    q = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    s = rng.uniform(0.001, 0.02, (rows, cols // G)).astype(np.float16)
    m = rng.uniform(-0.1, 0.0, (rows, cols // G)).astype(np.float16)
    w = q.reshape(rows, -1, G) * s.astype(np.float64)[..., None] + m.astype(np.float64)[..., None]
    g = q.reshape(rows, -1, 2, G // 2)
    packed = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(rows, cols // 2)
    return packed, s, m, w.reshape(rows, cols)


def random_q4k(rng, rows, cols):
    """Random int4 version 2 weights: nibbles; the super-blocks of 8 consecutive groups of the matrix (row-major,
    so that one may span two rows) with float16 d and dmin [blocks] (dmin of either sign) and 6-bit codes packed
    as csrc/kernels/kernels.h lays them out [blocks, 12]; the per-group mins and the weights they stand for (scales
    d·sc and mins dmin·mc formed in float32, as the kernels form them)."""
    groups = rows * cols // G
    blocks = -(-groups // 8)
    q = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    d = rng.uniform(1e-4, 4e-4, blocks).astype(np.float16)
    dmin = (rng.uniform(0, 2e-3, blocks) * rng.choice([-1, 1], blocks, p=[0.8, 0.2])).astype(np.float16)
    sc, mc = (rng.integers(0, 64, (blocks, 8)) for _ in range(2))
    low = (sc & 15) | (mc & 15) << 4
    high = sum((sc[:, j] >> 4) << (2 * j) | (mc[:, j] >> 4) << (16 + 2 * j) for j in range(8))
    codes = np.concatenate([low.astype(np.uint8), high.astype("<u4")[:, None].view(np.uint8)], axis=-1)
    s = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(-1)[:groups].reshape(rows, -1)
    m = (dmin.astype(np.float32)[:, None] * mc.astype(np.float32)).reshape(-1)[:groups].reshape(rows, -1)
    w = q.reshape(rows, -1, G) * s.astype(np.float64)[..., None] + m.astype(np.float64)[..., None]
    g = q.reshape(rows, -1, 2, G // 2)
    packed = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(rows, cols // 2)
    return packed, d, dmin, codes, m, w.reshape(rows, cols)


def random_weights(rng, kind, rows, cols):
    """(W, scales, mins, codes, per-group mins [rows, groups] or None, the weights in float64) of a random kind."""
    if kind == "int8":
        q, s, w = random_q8(rng, rows, cols)
        return q, s.view(np.uint16), None, None, None, w
    if kind == "int4-v1":
        q, s, m, w = random_q4(rng, rows, cols)
        return q, s.view(np.uint16), m.view(np.uint16), None, m.astype(np.float64), w
    q, d, dmin, codes, m, w = random_q4k(rng, rows, cols)
    return q, d.view(np.uint16), dmin.view(np.uint16), codes, m.astype(np.float64), w


KINDS = ["int8", "int4-v1", "int4"]


@each_set()
def test_quantize_rows(core, isa):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 96)) * rng.uniform(0.1, 10, (7, 1))).astype(np.float32)
    x[2, :32] = 0  # an all-zero group
    q, s, total = core.kernel_quantize_rows(isa, x)
    wq, ws, wsum = quantize_acts(x)
    assert np.array_equal(q, wq) and np.allclose(s, ws, rtol=1e-7) and np.allclose(total, wsum, rtol=1e-5, atol=1e-5)
    assert (s[2, 0] == 0) and (q[2, :32] == 0).all()
    assert np.abs(q.astype(np.float32) * np.repeat(s, G, axis=1) - x).max() <= np.repeat(s, G, axis=1).max() / 2 + 1e-6


@each_set()
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_matmul_against_numpy(core, isa, kind):
    rng = np.random.default_rng(1)
    for n_tok, rows, cols in ((1, 7, 32), (1, 13, 96), (3, 9, 64), (5, 17, 160), (9, 6, 576), (2, 5, 800)):
        x = rng.standard_normal((n_tok, cols)).astype(np.float32)
        xq, xs, xsum = core.kernel_quantize_rows("generic", x)
        q, s, m, codes, group_mins, w = random_weights(rng, kind, rows, cols)
        xv, xsv, xsumv = (xq, xs, xsum) if kind == "int8" else requantize_bytes(xq, xs)  # what int4 weights meet
        xhat = xv.reshape(n_tok, -1, G) * xsv[..., None].astype(np.float64)
        want = xhat.reshape(n_tok, cols) @ w.T
        if group_mins is not None:  # the min term uses the sum of the requantized values of each group
            wq = w - np.repeat(group_mins, G, axis=1)
            want = xhat.reshape(n_tok, cols) @ wq.T + xsumv.astype(np.float64) @ group_mins.T
        y = np.full((n_tok, rows), np.nan, np.float32)
        core.kernel_matmul_quantized(isa, xq, xs, xsum, q, s, m, y, 0, rows, codes=codes)
        assert np.allclose(y, want, rtol=1e-5, atol=1e-5), (kind, n_tok, rows, cols)


@each_set()
@pytest.mark.parametrize("kind", KINDS)
def test_each_token_gets_what_it_gets_alone(core, isa, kind):
    """The row-wise kernels take several tokens per pass over a row (a batch's decode steps), and
    batches of three or more another path: tiles of 16 rows (AVX-512) or 8 rows (AVX2), one per lane, up to
    16 or 8 tokens per pass. Each token's outputs are bit for bit those of a call with
    that token alone, whatever the batch (a pass of 8 or 16 tokens, fewer, and a remainder of 1 or 3), the
    rows (whole and partial tiles, a range that starts inside one) and the groups (blocks of 8 and a tail)."""
    rng = np.random.default_rng(7)
    for n_tok, groups, rows, r0 in ((2, 3, 7, 0), (3, 18, 16, 0), (8, 18, 37, 0), (9, 8, 20, 3), (4, 24, 33, 5),
                                    (17, 19, 18, 1), (5, 1, 17, 0), (16, 18, 20, 0), (19, 9, 17, 2)):
        cols = 32 * groups
        x = (rng.standard_normal((n_tok, cols)) * 3).astype(np.float32)
        xq, xs, xsum = core.kernel_quantize_rows(isa, x)
        q, s, m, codes, _, _ = random_weights(rng, kind, rows, cols)
        y = core.kernel_matmul_quantized(isa, xq, xs, xsum, q, s, m, np.zeros((n_tok, rows), np.float32), r0, rows,
                                         codes=codes)
        for t in range(n_tok):
            alone = core.kernel_matmul_quantized(isa, xq[t:t + 1], xs[t:t + 1], xsum[t:t + 1], q, s, m,
                                                 np.zeros((1, rows), np.float32), r0, rows, codes=codes)
            assert np.array_equal(y[t], alone[0]), (n_tok, groups, rows, t)
            assert not y[t, :r0].any()


@each_set(simd_only=True)
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_simd_equals_scalar_twin(core, isa, kind):
    rng = np.random.default_rng(2)

    def check(n_tok, rows, cols):
        x = (rng.standard_normal((n_tok, cols)) * 3).astype(np.float32)
        xq, xs, xsum = core.kernel_quantize_rows(isa, x)
        q, s, m, codes, _, _ = random_weights(rng, kind, rows, cols)
        ys = [core.kernel_matmul_quantized(k, xq, xs, xsum, q, s, m, np.zeros((n_tok, rows), np.float32), 0, rows,
                                           codes=codes) for k in ("generic", isa)]
        assert np.allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5), (n_tok, rows, cols)

    for n_tok in (1, 2, 4, 5, 8, 13):
        for rows in (1, 3, 4, 5, 9):
            check(n_tok, rows, 32 * int(rng.integers(1, 6)))
    for groups in (15, 16, 17, 18, 19, 33, 48):  # decode rows past the kernels' blocks of 8 groups
        check(1, 5, 32 * groups)
    # a row range leaves the other rows alone
    y = np.full((3, 9), 7.0, np.float32)
    q, s, m, codes, _, _ = random_weights(rng, kind, 9, 64)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    xq = core.kernel_quantize_rows(isa, x)
    core.kernel_matmul_quantized(isa, *xq, q, s, m, y, 2, 5, codes=codes)
    assert (y[:, :2] == 7).all() and (y[:, 5:] == 7).all() and not (y[:, 2:5] == 7).all()


@each_set()
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_weights_with_float_activations(core, isa, kind):
    """The prefill GEMM multiplies f32 activations by the dequantized weights: exactly (to f32
    rounding) except on avx512bf16, neonbf16 and neoni8mm, which round both to bf16 from 4 tokens on."""
    rng = np.random.default_rng(3)
    for n_tok in (1, 3, 4, 5, 16, 49, 50):
        for rows, cols in ((1, 32), (7, 64), (9, 96), (17, 160), (5, 576)):
            x = rng.standard_normal((n_tok, cols)).astype(np.float32)
            b = rng.standard_normal(rows).astype(np.float32)
            q, s, m, codes, _, w = random_weights(rng, kind, rows, cols)
            extra = dict(scales=s, mins=m, codes=codes)
            xw, ww, tol = x.astype(np.float64), w, 1e-5
            if bf16_prefill(isa, kind, n_tok):
                xw, ww, tol = round_bf16(x).astype(np.float64), round_bf16(w.astype(np.float32)), 1e-4
            want = xw @ np.asarray(ww, np.float64).T + b
            y = np.full((n_tok, rows), np.nan, np.float32)
            core.kernel_matmul(isa, x, q, kind, b, y, False, 0, rows, **extra)
            assert np.allclose(y, want, rtol=tol, atol=tol * np.sqrt(cols)), (kind, n_tok, rows, cols)
            # accumulate over a row range, leaving the other rows alone
            y2 = np.full((n_tok, rows), 2.0, np.float32)
            core.kernel_matmul(isa, x, q, kind, None, y2, True, rows // 3, rows, **extra)
            assert (y2[:, : rows // 3] == 2).all()
            assert np.allclose(y2[:, rows // 3:], 2 + want[:, rows // 3:] - b[rows // 3:], rtol=tol,
                               atol=tol * np.sqrt(cols))


@each_set()
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_gemm_on_quantized_activations(core, isa, kind):
    """Kernels::gemm_q, the prompts' GEMM into int8/int4 weights (tokens in the lanes): the row-wise
    kernels' sums within float rounding, for partial token tiles (AVX-512 48 tokens, AVX2 16, neoni8mm 8), row
    chunks (AVX-512 64 rows in blocks of 16, AVX2 48, neoni8mm 64 in pairs, odd counts leaving half a pair),
    k blocks of 8 or 16 groups and a tail, a bias, a row range accumulated into y and a middle one written
    over it, each leaving the other rows alone; and each token's outputs bit for bit those it gets alone.
    int8 weights meet the int16 activations (vpdpwssd; vpmaddwd + vpaddd on AVX2; on neoni8mm their two
    bytes by smmla and usmmla); int4 weights those requantized to int8 (vpdpbusd; vpmaddubsw on AVX2; usmmla
    on neoni8mm): the row-wise sums of those int8 values, scales and sums. A set without one says so."""
    rng = np.random.default_rng(11)
    if not core.kernel_has_gemm_q(isa):
        x = rng.standard_normal((4, 64)).astype(np.float32)
        q, s, m, codes, _, _ = random_weights(rng, kind, 3, 64)
        with pytest.raises(ValueError, match="has no gemm_q"):
            core.kernel_matmul_quantized(isa, *core.kernel_quantize_rows(isa, x), q, s, m,
                                         np.zeros((4, 3), np.float32), 0, 3, codes=codes, gemm=True)
        return
    for n_tok, groups, rows, r0 in ((4, 1, 3, 0), (5, 3, 16, 0), (16, 8, 17, 2), (17, 9, 37, 5), (48, 18, 20, 0),
                                    (49, 20, 33, 16), (100, 17, 5, 1), (33, 2, 64, 31), (20, 5, 150, 7)):
        cols = 32 * groups
        x = (rng.standard_normal((n_tok, cols)) * rng.uniform(0.1, 10, (n_tok, 1))).astype(np.float32)
        xq, xs, xsum = core.kernel_quantize_rows(isa, x)
        q, s, m, codes, _, _ = random_weights(rng, kind, rows, cols)
        b = rng.standard_normal(rows).astype(np.float32)
        # the row-wise kernels requantize for int4 weights as the GEMM does (requantize_bytes)
        rowwise = core.kernel_matmul_quantized("generic", xq, xs, xsum, q, s, m,
                                               np.zeros((n_tok, rows), np.float32), 0, rows, codes=codes, bias=b)
        y = np.full((n_tok, rows), 3.0, np.float32)
        core.kernel_matmul_quantized(isa, xq, xs, xsum, q, s, m, y, r0, rows, codes=codes, gemm=True, bias=b,
                                     accumulate=True)
        assert (y[:, :r0] == 3).all(), (kind, n_tok, groups, rows)
        scale = np.abs(rowwise).max()
        assert np.allclose(y[:, r0:], 3 + rowwise[:, r0:], rtol=1e-5, atol=1e-5 * scale), (kind, n_tok, groups, rows)
        # a middle row range, neither accumulated nor biased: what was in y is overwritten, and only there
        r1 = max(r0 + 1, rows - 3)
        y = core.kernel_matmul_quantized(isa, xq, xs, xsum, q, s, m, np.full((n_tok, rows), np.nan, np.float32), r0,
                                         r1, codes=codes, gemm=True)
        assert np.isnan(y[:, :r0]).all() and np.isnan(y[:, r1:]).all(), (kind, n_tok, groups, rows)
        assert np.allclose(y[:, r0:r1], (rowwise - b)[:, r0:r1], rtol=1e-5, atol=1e-5 * scale), (kind, n_tok, rows)
        y = core.kernel_matmul_quantized(isa, xq, xs, xsum, q, s, m, np.zeros((n_tok, rows), np.float32), 0, rows,
                                         codes=codes, gemm=True)
        for t in (0, n_tok // 2, n_tok - 1):
            alone = core.kernel_matmul_quantized(isa, xq[t:t + 1], xs[t:t + 1], xsum[t:t + 1], q, s, m,
                                                 np.zeros((1, rows), np.float32), 0, rows, codes=codes, gemm=True)
            assert np.array_equal(y[t], alone[0]), (kind, n_tok, groups, rows, t)
