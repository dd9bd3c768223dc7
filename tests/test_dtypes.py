"""gally.dtypes: float32 → bf16 rounding against bit patterns worked out by hand, f16 overflow, and
stored dtypes back to float32."""

from __future__ import annotations

import numpy as np
import pytest

from gally.dtypes import as_float32, bf16_bits, round_bf16, to_dtype

# float32 bits → the bf16 bits nearest, ties to even
ROUNDING = [
    (0x3F800000, 0x3F80),  # 1.0
    (0x3F808000, 0x3F80),  # 1 + 2^-8: a tie, the even neighbour is below
    (0x3F818000, 0x3F82),  # 1 + 3·2^-8: a tie, the even neighbour is above
    (0x3F808001, 0x3F81),  # just above a tie
    (0x3F807FFF, 0x3F80),  # just below a tie
    (0xC0200000, 0xC020),  # -2.5
    (0x80000000, 0x8000),  # -0.0
    (0x000116C2, 0x0001),  # 1e-40, subnormal
    (0x3F7FFFFF, 0x3F80),  # the carry reaches the exponent: 0.99999994 → 1.0
    (0x7F7FFFFF, 0x7F80),  # float32's largest finite value → +inf
    (0xFF7FFFFF, 0xFF80),  # and its negative → -inf
    (0x7F800000, 0x7F80),  # +inf
    (0xFF800000, 0xFF80),  # -inf
    (0x7F800001, 0x7FC0),  # a NaN with only a low mantissa bit stays NaN
    (0xFFC00000, 0x7FC0),  # -NaN → the quiet NaN
]


def test_bf16_rounding_is_nearest_even():
    f32 = np.array([f for f, _ in ROUNDING], np.uint32).view(np.float32)
    want = np.array([b for _, b in ROUNDING], np.uint16)
    got = bf16_bits(f32)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(to_dtype(f32, "bf16", "x"), want)
    np.testing.assert_array_equal(round_bf16(f32).view(np.uint32), want.astype(np.uint32) << 16)


def test_bf16_bits_takes_any_float_layout():
    w = np.arange(24, dtype=np.float64).reshape(4, 6) / 7
    np.testing.assert_array_equal(bf16_bits(w.T), bf16_bits(np.ascontiguousarray(w.T, np.float32)))


def test_f16_rounds_and_refuses_overflow():
    w = np.array([[1.0, 65504.0, 1e-8, -np.inf]], np.float32)
    np.testing.assert_array_equal(to_dtype(w, "f16", "x"), w.astype(np.float16))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' has values "
                                         r"beyond float16's range"):
        to_dtype(np.array([[1e6]], np.float32), "f16", "model.layers.0.mlp.up_proj.weight")


def test_f32_is_kept_as_is():
    w = np.ones((2, 3), np.float32)
    assert to_dtype(w, "f32", "x") is w


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="dtype must be one of f32, bf16, f16, got 'int8'"):
        to_dtype(np.ones(2, np.float32), "int8", "x")
    with pytest.raises(ValueError, match="dtype I8 is not a floating-point weight dtype"):
        as_float32("I8", np.ones(2, np.int8))


@pytest.mark.parametrize("stored", ["F32", "F16", "BF16"])
def test_as_float32_reads_each_stored_dtype(stored):
    w = np.array([1.5, -2.25, 0.0, 3.0e-3], np.float32)
    raw = {"F32": w, "F16": w.astype(np.float16).view(np.uint16), "BF16": bf16_bits(w)}[stored]
    got = as_float32(stored, raw)
    assert got.dtype == np.float32
    want = {"F32": w, "F16": w.astype(np.float16).astype(np.float32), "BF16": round_bf16(w)}[stored]
    np.testing.assert_array_equal(got, want)
    if stored == "BF16":  # 3e-3 is not a bf16 value; the others are
        np.testing.assert_array_equal(got[:3], w[:3])
        assert got[3] != w[3] and abs(got[3] - w[3]) < 2**-8 * w[3]
