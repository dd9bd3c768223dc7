"""float32 ↔ the 16-bit weight dtypes, in NumPy, as gally stores and reads them.

NumPy has no bfloat16, so bf16 values travel as their uint16 bit patterns: the upper half of the
float32 with the same sign and exponent. Rounding float32 → bf16 is to nearest, ties to even:

    bits16 = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16

the same rounding as the C++ loader's (csrc/dtype.h), so weights converted here hold the values
gally computes with after converting at load. Values past bf16's largest finite value round to ±inf;
NaN becomes the quiet NaN 0x7FC0 (the formula would turn a NaN with only low mantissa bits into inf).
"""

from __future__ import annotations

import numpy as np

BF16_QUIET_NAN = np.uint16(0x7FC0)


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 values → uint16 bf16 bit patterns, rounded to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(w), BF16_QUIET_NAN, rounded)


def round_bf16(w: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16, as float32."""
    return as_float32("BF16", bf16_bits(w))


def to_dtype(w: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """float32 → gally dtype "f32", "bf16" (uint16 bit patterns) or "f16". name: the tensor, for
    the error when a value lies beyond float16's range."""
    if dtype == "f32":
        return w
    if dtype == "f16":
        with np.errstate(over="ignore"):
            out = w.astype(np.float16)
        if np.isinf(out).any() and not np.isinf(w).any():
            raise ValueError(f"tensor {name!r} has values beyond float16's range (±65504); "
                             f"convert with dtype bf16 or f32")
        return out
    if dtype == "bf16":
        return bf16_bits(w)
    raise ValueError(f"dtype must be one of f32, bf16, f16, got {dtype!r}")


def as_float32(dtype: str, array: np.ndarray) -> np.ndarray:
    """A tensor stored in safetensors dtype "F32", "F16" or "BF16" (as uint16 bit patterns) as
    float32 values."""
    if dtype == "F32":
        return np.asarray(array, dtype=np.float32)
    if dtype == "F16":
        return np.asarray(array).view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (np.asarray(array).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"dtype {dtype} is not a floating-point weight dtype (F32, F16, BF16)")
