"""int8 and int4 weights: the format, NumPy quantize/dequantize, the reader and the writer of a
quantized folder (`gally quantize SRC OUT --to int8|int4|int4-v1`, cli/quantize.py).

Format "gally-quant", version 2 (version 1 is read too)
-------------------------------------------------------
A quantized model is a Hugging Face folder: the source's config.json (unchanged), tokenizer and
generation files, and ONE model.safetensors whose __metadata__ (all values strings) is

    {"format": "gally-quant", "gally.quant.version": "2", "gally.quant.type": "int8" | "int4",
     "gally.quant.int8.group_size": "32", "gally.quant.int4.group_size": "32",
     "gally.quant.int4.super_block_groups": "8"}

A weight matrix NAME.weight [rows, cols] (HF layout [out, in]) that is quantized is absent; in its
place, row-major and contiguous, groups of G = 32 consecutive columns of one row:

    int8   NAME.qweight  I8   [rows, cols]      q in [-127, 127] (never -128)
           NAME.scales   F16  [rows, cols/32]
           w[r, c] = scales[r, c/32] · qweight[r, c]                          (symmetric, llama.cpp Q8_0)

    int4   NAME.qweight    U8   [rows, cols/2]    two 4-bit q in [0, 15] per byte
           NAME.scales     F16  [B]               d, one per super-block
           NAME.mins       F16  [B]               dmin, one per super-block (either sign)
           NAME.subscales  U8   [B, 12]           the super-block's 6-bit codes sc_j, mc_j ∈ [0, 63]
           group g of row r (columns 32g … 32g+31) is bytes qweight[r, 16g … 16g+15]; byte i holds
           column 32g+i in its low nibble and column 32g+16+i in its high nibble (llama.cpp's order).
           The matrix's groups, numbered f = r · cols/32 + g, form super-blocks of 8: group f is
           slot j = f % 8 of super-block b = f // 8 (a super-block may span two rows; only the last,
           b = B - 1, B = ceil(rows · cols / 256), may hold fewer than 8 groups). subscales[b]: byte
           j < 8 = (sc_j & 15) | (mc_j & 15) << 4; bytes 8-11 a little-endian uint32 holding sc_j >> 4
           at bits 2j, 2j+1 and mc_j >> 4 at bits 16+2j, 17+2j. With s = float32(d[b]) · sc_j and
           m = float32(dmin[b]) · mc_j (one float32 rounding each):
           w[r, 32g + i] = s · q_i + m          (4.5 bits per weight: 128 + 4 + 12 bytes per 256 weights)

Version 1 (still read; written by `--to int4-v1`) has "gally.quant.version": "1", no super-block key,
and its type "int4" (here called int4-v1) is llama.cpp's Q4_1 layout, 5.0 bits per weight:

    int4-v1 NAME.qweight U8  [rows, cols/2]   as above
            NAME.scales  F16 [rows, cols/32]
            NAME.mins    F16 [rows, cols/32]
            w[r, 32g + i] = scales[r, g] · q_i + mins[r, g]                (mins = group minimum)

The int4 quantizer (quantize_int4) fits each group's scale and min to its weights by least
squares over several candidate scales (llama.cpp's make_qkx2_quants), then each super-block's d
and dmin to its groups' scales and mins (several candidates, each refitted by weighted least
squares; the weights: Σ q² per scale, 32 per min), then rounds q against the stored values. On
Gaussian weights its squared error is ~18% below version 1's min/max (tests/test_quantize.py);
bench/quant_quality.py measures models. Every one of those squared errors is weighted by the input
column's importance: the RMS of the activations that column meets (Calibration), recorded by
running the model's int8 quantization over 4 sequences of 256 tokens it samples itself (no data
needed; `gally quantize --calibration-text FILE` uses a text instead, `--no-calibration` weighs
every column alike). The metadata key "gally.quant.int4.calibration" says which; readers ignore it.

Which tensors (decided by perplexity and KL divergence, see below):
- --to int8: the seven matrices of every layer (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)
  and model.embed_tokens (and lm_head when untied) in int8;
- --to int4: the layer matrices in int4, except self_attn.v_proj of every layer and mlp.down_proj
  of the first two and the last two layers (more_bits()), which stay int8; model.embed_tokens and
  lm_head in int8. On dithered SmolLM2 (bench/quant_quality.py, the article at ctx 512, before
  calibration) the v_proj exception cut KLD from 0.200 to 0.125 for 1.8% more bytes (int8 k_proj
  as well: 0.116, for as much again). Calibrated, KLD article | GPL (dither 0.1): all int4 0.074 |
  0.223 (4.50 bits per layer weight); int8 v_proj 0.057 | 0.185 (4.62); and down_proj in the
  first and last layer 0.052 | 0.170 (4.69), first and last two 0.050 | 0.168 (4.76, kept), or
  llama.cpp's Q4_K_M choice of 14 of 30 layers 0.048 | 0.160 (5.09, gally before). The ends
  matter most: the kept mix is Q4_K_M's quality (0.059 | 0.185 here) with the bytes of Q4_K_M at
  the 8B shapes, where every down_proj in int8 is a matter of 60 MB a token;
- --to int4-v1: the seven layer matrices in int4-v1; model.embed_tokens and lm_head in int8;
- everything else keeps its HF name, dtype and bytes: norms, biases, and any matrix whose cols is
  not a multiple of 32. With tie_word_embeddings, model.embed_tokens.{qweight,scales} serve both
  the lookup (one row dequantized) and the output projection.

For kernels: with activations quantized per group of 32 to int8 (sx, xq), one group's share of a
dot product is s·sx·Σ q·xq (int8) or s·sx·Σ q·xq + m·sx·Σ xq (int4, with the group's s and m;
Σ xq is per activation group, shared by every row). Σ q·xq fits int32 exactly; int4 q is a valid
unsigned operand of vpdpbusd and maddubs as is; int8 q never being -128 lets a kernel move the
activation's sign onto it; maddubs pairs stay below 2^15 (2·127·127 = 32258, 2·15·127 = 3810).
Tensor offsets are whatever the safetensors writer chose: use unaligned loads.

Why (SmolLM2-135M-Instruct, `gally perplexity --ctx 512`; gpl-3.0 / how-llms-work / an unseen
README, relative to bf16 weights): int8 groups of 32 -0.06 / +0.31 / -0.25% (groups of 64 +0.12 /
-0.26 / +0.41%, KLD 14% higher; one scale per row +0.54 / -0.17 / +1.27%; groups of 128 do not
divide hidden 576). The GGUF this model comes from stores its layers as Q4_1 and its embeddings
as Q8_0, so int4-v1 layers + int8 embeddings reproduce every weight exactly (ppl = f32's); int4
embeddings would cost +6%, symmetric int4 (Q4_0-like) +24%, int4 groups of 64 +34%. On weights
not already on a 4-bit grid, see bench/quant_quality.py for int4 against int4-v1.

Scales and mins are float16, rounded to nearest; q is computed from the stored (rounded) scale and
min, so rounding is to the nearest representable value. Groups whose scale falls below float16's
normal range (max|w| < 7.8e-3 for int8) get subnormal scales with fewer significant bits.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from .dtypes import as_float32

FORMAT = "gally-quant"
VERSION = "2"
VERSIONS = ("1", "2")
# What `gally quantize --to` writes: int8 and int4 (version 2), and "int4-v1", version 1's int4.
KINDS = ("int8", "int4", "int4-v1")
# Group sizes gally reads and writes: one kernel per kind, no run-time group size. Metadata keys
# name "int8" and "int4" (which is int4-v1 in a version 1 file).
GROUP_SIZE = {"int8": 32, "int4": 32, "int4-v1": 32}
INT8_MAX = 127   # int8 values lie in [-127, 127]: -128 never occurs, so kernels may negate either operand
INT4_MAX = 15    # int4 values lie in [0, 15]

METADATA_FORMAT = "format"
METADATA_VERSION = "gally.quant.version"
METADATA_TYPE = "gally.quant.type"


METADATA_SUPER = "gally.quant.int4.super_block_groups"


def metadata_group_key(kind: str) -> str:
    return f"gally.quant.{kind.removesuffix('-v1')}.group_size"


# ---- NumPy quantize / dequantize (one matrix [rows, cols], groups along cols) ----

def _groups(w: np.ndarray, group_size: int, name: str) -> np.ndarray:
    """w [rows, cols] as float32 [rows, cols/G, G]; checks shape and finiteness."""
    if w.ndim != 2:
        raise ValueError(f"tensor {name!r}: only matrices are quantized, got shape {list(w.shape)}")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"tensor {name!r}: {cols} columns is not a multiple of the group size {group_size}")
    g = np.asarray(w, dtype=np.float32).reshape(rows, cols // group_size, group_size)
    if not np.isfinite(g).all():
        raise ValueError(f"tensor {name!r} holds NaN or infinite values; it cannot be quantized")
    return g


def _to_f16(x: np.ndarray, name: str, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(f"tensor {name!r}: a group's {what} exceeds float16's range (±65504)")
    return out


def _safe_divide(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """x / scale per group, 0 where the scale is 0 (an all-equal group)."""
    return np.divide(x, scale[..., None], out=np.zeros_like(x), where=scale[..., None] != 0)


def quantize_int8(w: np.ndarray, group_size: int = GROUP_SIZE["int8"], name: str = "weight"):
    """Symmetric int8 per group of `group_size` consecutive inputs of each row:
    w ≈ scale · q, scale = max|w| / 127 (float16), q = round(w / scale) ∈ [-127, 127].
    Returns qweight int8 [rows, cols], scales float16 [rows, cols/G]."""
    g = _groups(w, group_size, name)
    scales = _to_f16(np.abs(g).max(axis=2) / INT8_MAX, name, "scale")
    q = np.rint(_safe_divide(g, scales.astype(np.float32)))  # divide by the stored scale, so rounding sees it
    q = np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)
    return q.reshape(w.shape), scales


def dequantize_int8(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] = scale · q per group."""
    rows, cols = qweight.shape
    g = qweight.reshape(rows, scales.shape[1], -1).astype(np.float32)
    return (g * scales.astype(np.float32)[..., None]).reshape(rows, cols)


def quantize_int4_v1(w: np.ndarray, group_size: int = GROUP_SIZE["int4"], name: str = "weight"):
    """int4 version 1, asymmetric per group (llama.cpp's Q4_1): w ≈ scale · q + min, min = the group's
    minimum, scale = (max - min) / 15, both float16, q = round((w - min) / scale) ∈ [0, 15].
    Returns qweight uint8 [rows, cols/2] (pack_int4), scales and mins float16 [rows, cols/G]."""
    g = _groups(w, group_size, name)
    lo, hi = g.min(axis=2), g.max(axis=2)
    mins = _to_f16(lo, name, "minimum")
    scales = _to_f16((hi - lo) / INT4_MAX, name, "scale")
    q = np.rint(_safe_divide(g - mins.astype(np.float32)[..., None], scales.astype(np.float32)))
    q = np.clip(q, 0, INT4_MAX).astype(np.uint8)
    return pack_int4(q.reshape(w.shape), group_size), scales, mins


def dequantize_int4_v1(qweight: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] = scale · q + min per group (int4 version 1)."""
    rows = qweight.shape[0]
    group_size = 2 * qweight.shape[1] // scales.shape[1]
    q = unpack_int4(qweight, group_size).reshape(rows, scales.shape[1], group_size).astype(np.float32)
    w = q * scales.astype(np.float32)[..., None] + mins.astype(np.float32)[..., None]
    return w.reshape(rows, -1)


def pack_int4(q: np.ndarray, group_size: int) -> np.ndarray:
    """q uint8 [rows, cols] in [0, 15] → uint8 [rows, cols/2]. Within each group of G values,
    byte i holds value i in its low nibble and value i + G/2 in its high nibble (llama.cpp's
    order: one AND and one shift of G/2 bytes give the group's two halves in order)."""
    rows, cols = q.shape
    g = q.reshape(rows, cols // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(rows, cols // 2)


def unpack_int4(packed: np.ndarray, group_size: int) -> np.ndarray:
    """uint8 [rows, cols/2] → q uint8 [rows, cols] in [0, 15] (inverse of pack_int4)."""
    rows, half_cols = packed.shape
    g = packed.reshape(rows, 2 * half_cols // group_size, 1, group_size // 2)
    return np.concatenate([g & 0x0F, g >> 4], axis=2).reshape(rows, 2 * half_cols)


# ---- int4 version 2: super-blocks of 8 groups, 6-bit sub-scales and sub-mins (4.5 bits per weight) ----

SUPER_GROUPS = 8         # groups of 32 per super-block (the last of a row may hold fewer)
CODE_BYTES = 12          # the 6-bit sub-scales and sub-mins of one super-block
CODE_MAX = 63
_FIT_STEPS = np.arange(-1.0, 1.01, 0.1, dtype=np.float32)   # candidate 1/scale = (15 + step) / (max - min)
_SUPER_STEPS = np.arange(-2.0, 2.01, 0.25, dtype=np.float32)  # candidate 1/d = (63 + step) / max sub-scale
_CHUNK = 1 << 20         # weights fitted at a time: bounds the quantizer's scratch memory
# Weighting each weight's error by its own size as well (llama.cpp's Q4_K without an imatrix: a =
# rms(group) + |w|) was measured worse on dithered SmolLM2 (bench/quant_quality.py, the article,
# ctx 512): KLD 0.264 against 0.200 unweighted. Weighting by the input column's activations
# (Calibration) is what helps.


def super_blocks(groups: int) -> int:
    return -(-groups // SUPER_GROUPS)


def _fit_groups(g: np.ndarray, zero_min: bool = False,
                a: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scale s and min m per group of g [n, 32] minimising Σ a·(s·q + m − w)², q = round((w − m)/s)
    clipped to [0, 15], with weights a [n, 32] (default 1: llama.cpp's make_qkx2_quants): for each
    candidate scale around (max − min)/15, round, then refit s and m to the rounded q by weighted
    least squares; keep the best. zero_min: m = 0 (and the candidates around max(w, 0)/15,
    refitting s alone). Returns s, m, Σ a·q² and Σ a (the weights of s's and m's errors in the
    weights' error) of the best, float64 [n]."""
    lo, hi = g.min(axis=1), g.max(axis=1)
    if zero_min:
        lo, hi = np.zeros_like(lo), np.maximum(hi, 0)
    if a is None:
        a = np.ones_like(g)
    ag = a * g
    span = (hi - lo).astype(np.float64)
    sa = a.sum(axis=1, dtype=np.float64)
    sw = ag.sum(axis=1, dtype=np.float64)
    sww = np.einsum("ij,ij->i", ag, g, dtype=np.float64)
    best_s, best_m = span / INT4_MAX, lo.astype(np.float64)
    best_err = np.full(len(g), np.inf)
    best_sqq = np.zeros(len(g))
    inv_span = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0).astype(np.float32)
    shifted = g - lo[:, None]
    for step in _FIT_STEPS:
        q = np.clip(np.rint(shifted * ((INT4_MAX + step) * inv_span)[:, None]), 0, INT4_MAX)
        aq = a * q
        sq = aq.sum(axis=1, dtype=np.float64)
        sqq = np.einsum("ij,ij->i", aq, q, dtype=np.float64)
        sqw = np.einsum("ij,ij->i", aq, g, dtype=np.float64)
        if zero_min:
            s = np.divide(sqw, sqq, out=np.zeros_like(sqw), where=sqq > 0)
            m = np.zeros_like(s)
        else:
            det = sa * sqq - sq * sq
            ok = det > 0
            safe = np.where(ok, det, 1.0)
            s = np.where(ok, (sa * sqw - sq * sw) / safe, 0.0)
            m = np.where(ok, (sqq * sw - sq * sqw) / safe, sw / sa)
        err = s * s * sqq + 2 * s * m * sq + sa * m * m - 2 * s * sqw - 2 * m * sw + sww
        better = (err < best_err) & (s >= 0)
        best_s, best_m = np.where(better, s, best_s), np.where(better, m, best_m)
        best_err, best_sqq = np.where(better, err, best_err), np.where(better, sqq, best_sqq)
    return best_s, best_m, best_sqq, sa


def _fit_super(v: np.ndarray, weight: np.ndarray, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """d (float16) and codes c ∈ [0, 63] per super-block for values v ≥ 0 [n, 8], minimising
    Σ weight·(v − d·c)²: candidate d around max(v)/63, each followed by a least-squares refit of d to
    its codes, d rounded to float16 before the codes are chosen. weight 0 marks a missing group."""
    vmax = v.max(axis=1)
    best_d = np.zeros(len(v), np.float16)
    best_c = np.zeros(v.shape, np.uint8)
    best_err = np.full(len(v), np.inf)

    def consider(d):
        d16 = _to_f16(d, name, what)
        d32 = d16.astype(np.float64)[:, None]
        c = np.clip(np.rint(np.divide(v, d32, out=np.zeros_like(v), where=d32 > 0)), 0, CODE_MAX)
        err = (weight * (v - d32 * c) ** 2).sum(axis=1)
        better = err < best_err
        best_d[better], best_c[better], best_err[better] = d16[better], c[better], err[better]
        return c

    for step in _SUPER_STEPS:
        c = consider(vmax / (CODE_MAX + step))
        den = (weight * c * c).sum(axis=1)
        consider(np.divide((weight * c * v).sum(axis=1), den, out=vmax / CODE_MAX, where=den > 0))
    return best_d, best_c


def pack_codes(sc: np.ndarray, mc: np.ndarray) -> np.ndarray:
    """6-bit sub-scales and sub-mins [blocks, 8] → uint8 [blocks, 12] (csrc/kernels/kernels.h): byte j =
    (sc_j & 15) | (mc_j & 15) << 4; bytes 8-11 a little-endian uint32 with sc_j >> 4 at bits 2j and
    mc_j >> 4 at bits 16 + 2j."""
    sc, mc = sc.astype(np.uint32), mc.astype(np.uint32)
    low = ((sc & 15) | (mc & 15) << 4).astype(np.uint8)
    shifts = 2 * np.arange(SUPER_GROUPS, dtype=np.uint32)
    high = ((sc >> 4) << shifts | (mc >> 4) << (shifts + 16)).sum(axis=-1, dtype=np.uint32)  # disjoint bits
    return np.concatenate([low, high.astype("<u4")[..., None].view(np.uint8)], axis=-1)


def unpack_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [blocks, 12] → sub-scales, sub-mins uint8 [blocks, 8] (inverse of pack_codes)."""
    c = np.asarray(codes, np.uint8).reshape(-1, CODE_BYTES)
    high = np.ascontiguousarray(c[:, SUPER_GROUPS:]).view("<u4").astype(np.uint32)
    shifts = 2 * np.arange(SUPER_GROUPS, dtype=np.uint32)
    sc = (c[:, :SUPER_GROUPS] & 15) | (((high >> shifts) & 3) << 4).astype(np.uint8)
    mc = (c[:, :SUPER_GROUPS] >> 4) | (((high >> (shifts + 16)) & 3) << 4).astype(np.uint8)
    return sc, mc


def _group_scales_v2(d, dmin, codes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The scale d·sc and min dmin·mc of the matrix's first n groups (row-major), float32 [n], formed
    as the kernels form them."""
    sc, mc = unpack_codes(codes)
    s = np.asarray(d).view(np.float16).astype(np.float32)[:, None] * sc.astype(np.float32)
    m = np.asarray(dmin).view(np.float16).astype(np.float32)[:, None] * mc.astype(np.float32)
    return s.reshape(-1)[:n], m.reshape(-1)[:n]


IMPORTANCE_FLOOR = 1e-3  # the least weight a column gets, relative to the mean: a column never seen active still counts


def _column_weights(importance, cols: int, name: str) -> Optional[np.ndarray]:
    """importance [cols] (≥ 0, finite) scaled to mean 1, floored at IMPORTANCE_FLOOR; None when all 0."""
    a = np.asarray(importance, np.float64)
    if a.shape != (cols,):
        raise ValueError(f"tensor {name!r}: importance must have shape [{cols}] (one per input column), "
                         f"got {list(a.shape)}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"tensor {name!r}: importance must be finite and non-negative")
    mean = a.mean()
    if mean == 0:
        return None
    return np.maximum(a / mean, IMPORTANCE_FLOOR).astype(np.float32)


def quantize_int4(w: np.ndarray, name: str = "weight", importance: Optional[np.ndarray] = None):
    """int4 version 2 (csrc/kernels/kernels.h, DType::Q4K): per group of 32 w ≈ s·q + m with
    q ∈ [0, 15], s and m fitted to minimise the squared error (_fit_groups); per super-block of 8
    consecutive groups of the matrix (row-major, so that one may span two rows), s = d·sc and
    m = dmin·mc with float16 d, dmin and 6-bit codes sc, mc (_fit_super); q is then rounded against
    the stored s and m. The sign of dmin is that of the super-block's largest |m|; a group whose m
    has the other sign gets mc = 0.
    importance: float [cols], how much an error in each input column costs (Calibration.importance:
    the RMS of the column's activations): every fit above minimises Σ importance·error² instead.
    Returns qweight uint8 [rows, cols/2] (pack_int4's order), d and dmin float16 [blocks], codes
    uint8 [blocks, 12] (pack_codes), blocks = ceil(rows · cols / 256)."""
    g = _groups(w, GROUP_SIZE["int4"], name)
    size = g.shape[2]
    flat = g.reshape(-1, size)
    n = len(flat)
    blocks = super_blocks(n)
    s, m, sqq, sa = (np.zeros(blocks * SUPER_GROUPS) for _ in range(4))
    imp = None if importance is None else _column_weights(importance, w.shape[1], name)
    if imp is not None:
        imp = imp.reshape(-1, size)  # [cols / 32, 32]: group f of the matrix is columns of group f % (cols / 32)

    def weights(groups: np.ndarray) -> Optional[np.ndarray]:  # the importance of flat[groups], [len, 32]
        return None if imp is None else imp[groups % len(imp)]

    for i in range(0, n, _CHUNK // size):
        j = min(n, i + _CHUNK // size)
        s[i:j], m[i:j], sqq[i:j], sa[i:j] = _fit_groups(flat[i:j], a=weights(np.arange(i, j)))
    s, m, sqq, sa = (a.reshape(blocks, SUPER_GROUPS) for a in (s, m, sqq, sa))
    present = (np.arange(blocks * SUPER_GROUPS) < n).reshape(blocks, SUPER_GROUPS)
    extreme = np.take_along_axis(m, np.abs(m).argmax(axis=1)[:, None], axis=1)[:, 0]
    sign = np.where(extreme > 0, 1.0, -1.0)
    other = ((m * sign[:, None] < 0) & present).reshape(-1)  # groups whose min dmin's sign cannot hold: refit with 0
    if other.any():
        s, m, sqq, sa = (a.reshape(-1) for a in (s, m, sqq, sa))
        s[other], m[other], sqq[other], sa[other] = _fit_groups(flat[other[:n]], zero_min=True,
                                                              a=weights(np.flatnonzero(other[:n])))
        s, m, sqq, sa = (a.reshape(blocks, SUPER_GROUPS) for a in (s, m, sqq, sa))
    d, sc = _fit_super(s, np.maximum(sqq, 1e-30) * present, name, "scale")
    dmin_abs, mc = _fit_super(np.maximum(m * sign[:, None], 0.0), np.maximum(sa, 1e-30) * present, name, "minimum")
    dmin = (dmin_abs.astype(np.float32) * sign).astype(np.float16)
    codes = pack_codes(sc, mc)
    gs, gm = _group_scales_v2(d, dmin, codes, n)
    q = np.rint(_safe_divide(flat - gm[:, None], gs))
    q = np.clip(q, 0, INT4_MAX).astype(np.uint8)
    return pack_int4(q.reshape(w.shape), GROUP_SIZE["int4"]), d, dmin, codes


def dequantize_int4(qweight: np.ndarray, d: np.ndarray, dmin: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] = (d·sc)·q + dmin·mc per group (int4 version 2)."""
    rows = qweight.shape[0]
    n = rows * 2 * qweight.shape[1] // GROUP_SIZE["int4"]
    s, m = _group_scales_v2(d, dmin, codes, n)
    q = unpack_int4(qweight, GROUP_SIZE["int4"]).reshape(n, -1).astype(np.float32)
    return (q * s[:, None] + m[:, None]).reshape(rows, -1)


# ---- calibration: which input columns matter ----

CALIBRATION_SAMPLES = 4    # sequences a model samples itself for calibrate()
CALIBRATION_LENGTH = 256   # tokens in each (and the windows a calibration text is cut into)
METADATA_CALIBRATION = "gally.quant.int4.calibration"


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Activation statistics of a model, which quantize_int4 weighs its errors by. An error δ_j in
    a weight of input column j moves that row's output by δ_j·x_j, so the squared output error is
    Σ_j δ_j² · E[x_j²] where errors in different columns are uncorrelated. squares: {weight name: the
    mean of x² per input column, float64 [cols]} for every layer matrix; source: what was run, for
    the checkpoint's metadata.

    The importance is the root of that mean, the column's RMS activation, not the mean itself:
    fitted to the calibration's own statistics, int4 overshoots on other text. Measured on
    dithered SmolLM2 (bench/quant_quality.py, KLD on the article | the GPL, ctx 512) with the
    int8 down_proj of llama.cpp's Q4_K_M choice and statistics of the f32 model: the mean 0.039 |
    0.221 against the root 0.044 | 0.168 (4 self-sampled sequences of 256 tokens; 8 of 512: 0.046
    | 0.165 with the root); no calibration 0.082 | 0.229."""
    squares: dict
    source: str

    def importance(self, name: str) -> Optional[np.ndarray]:
        squares = self.squares.get(name)
        return None if squares is None else np.sqrt(squares)


def calibrate(model, text: Optional[str] = None, samples: int = CALIBRATION_SAMPLES,
              length: int = CALIBRATION_LENGTH, seed: int = 0) -> Calibration:
    """Runs `model` (a gally.Model: calibration_model() of the checkpoint to be quantized to int4)
    over calibration tokens and records, for each layer, the mean x² of every column of its four
    matmul inputs (Session.forward's input_squares): `text`'s tokens in windows of `length`, each
    after the BOS token where the model has one, or, with no text, `samples` sequences of
    `length` tokens that the model samples itself from its BOS token (temperature 1, no filters,
    `seed` + i for sequence i), so that no data is needed.
    On dithered SmolLM2 (bench/quant_quality.py) the self-sampled statistics cut int4's KL
    divergence as much as a text's do (the README's Precision section)."""
    for value, what in ((samples, "samples"), (length, "length")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"calibration {what} must be a positive integer, got {value!r}")
    c = model.config
    if text is not None:
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: the model has no tokenizer.json to read a calibration text with")
        ids = list(model.tokenizer.encode(text))
        if not ids:
            raise ValueError("the calibration text holds no tokens")
        bos = [] if c.bos_token_id is None else [c.bos_token_id]
        step = max(1, length - len(bos))
        windows = [bos + ids[i:i + step] for i in range(0, len(ids), step)]
        source = f"text, {len(ids)} tokens in windows of {length}"
    else:
        windows = _self_samples(model, samples, length, seed)
        source = f"self-sampled, {samples} x {length} tokens, seed {seed}"
    columns, width = input_columns(c)
    squares = np.zeros((c.num_hidden_layers, width))
    session = model.session(max(len(w) for w in windows))  # one cache for every window
    for w in windows:
        session.reset()
        session.forward(w, input_squares=squares)
    squares /= sum(len(w) for w in windows)
    if not np.isfinite(squares).all():
        raise ValueError(f"{model.path}: the calibration run's activations overflowed (an infinity or NaN); "
                         f"quantize without calibration")
    return Calibration({f"model.layers.{layer}.{matrix}.weight": squares[layer, a:b].copy()
                        for layer in range(c.num_hidden_layers) for matrix, (a, b) in columns.items()}, source)


def input_columns(config) -> tuple[dict[str, tuple[int, int]], int]:
    """Where each layer matrix's input lies in a row of Session.forward's input_squares, and the
    row's width: RMSNorm(x) into q/k/v, the attention's output into o_proj, RMSNorm(x) into
    gate/up, silu(gate) ⊙ up into down_proj (csrc/forward.h, Record::squares)."""
    d, qd, f = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    attn, out, mlp, down = (0, d), (d, d + qd), (d + qd, 2 * d + qd), (2 * d + qd, 2 * d + qd + f)
    return ({"self_attn.q_proj": attn, "self_attn.k_proj": attn, "self_attn.v_proj": attn, "self_attn.o_proj": out,
             "mlp.gate_proj": mlp, "mlp.up_proj": mlp, "mlp.down_proj": down}, 2 * d + qd + f)


def _self_samples(model, samples: int, length: int, seed: int) -> list[list[int]]:
    """`samples` sequences of `length` tokens: BOS (config.json's; else the first end-of-sequence
    id, which also separates documents; else 0), then what the model samples, decoded together."""
    from .generate import resolve_options
    from .scheduler import Scheduler

    c = model.config
    start = c.bos_token_id if c.bos_token_id is not None else c.eos_token_id[0] if c.eos_token_id else 0
    scheduler = Scheduler(model, max_sequences=samples)
    requests = [scheduler.add([start], resolve_options(
        model, max_new_tokens=length - 1, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0, seed=seed + i, ignore_eos=True)) for i in range(samples)]
    while not scheduler.idle:
        scheduler.step()
    return [r.context for r in requests]


# ---- which tensors are quantized ----

_LAYER_MATRIX = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


MORE_BITS_ENDS = 2  # layers at each end whose down_proj --to int4 keeps in int8 (see the module doc)


def more_bits(layer: int, layers: int) -> bool:
    """The layers whose down_proj --to int4 keeps in int8: the first and the last MORE_BITS_ENDS."""
    return layer < MORE_BITS_ENDS or layer >= layers - MORE_BITS_ENDS


def kind_for(name: str, shape, to: str, layers: int = 0, pure: bool = False) -> Optional[str]:
    """The kind tensor `name` of `shape` is stored in when quantizing `--to` int8, int4 or int4-v1, or
    None when it stays as it is: norms and biases, and matrices whose columns do not fill whole
    groups. Layer matrices take `to`, except that --to int4 keeps every self_attn.v_proj and the
    mlp.down_proj of the more_bits() layers of `layers` in int8; the embeddings (and lm_head) take
    int8 in all (see the module doc). pure: no such exceptions."""
    if len(shape) != 2:
        return None
    matrix = _LAYER_MATRIX.fullmatch(name)
    if matrix:
        kind = to
        if to == "int4" and not pure and (matrix.group(2) == "self_attn.v_proj" or
                             (matrix.group(2) == "mlp.down_proj" and more_bits(int(matrix.group(1)), layers))):
            kind = "int8"
    elif name in _EMBEDDINGS:
        kind = "int8"
    else:
        return None
    return kind if shape[1] % GROUP_SIZE[kind] == 0 else None


def module_name(weight_name: str) -> str:
    """"model.layers.0.mlp.up_proj.weight" → "model.layers.0.mlp.up_proj", the prefix of its
    .qweight/.scales/.mins."""
    return weight_name[: -len(".weight")]


def layer_count(names) -> int:
    """The layers of a checkpoint, from its tensor names (model.layers.N.…)."""
    return 1 + max((int(m.group(1)) for m in map(_LAYER_MATRIX.fullmatch, names) if m), default=-1)


def quantize_tensors(tensors: dict, to: str, pure: bool = False, layers: Optional[int] = None,
                     calibration: Optional[Calibration] = None
                     ) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """Quantizes a checkpoint held as {name: (safetensors dtype, array)} (bf16 as uint16 bits);
    pure: every layer matrix in `to` (kind_for); layers: the model's layer count, which the choice
    of int8 layers depends on (default: counted from `tensors`, which then must be all of them);
    calibration: the int4 matrices' importance (quantize_int4), recorded in the metadata.
    Returns the tensors of the quantized file in the same form (kept tensors pass through as the
    same (dtype, array) objects, not copies), and its __metadata__: version 2, or version 1 for
    to="int4-v1"."""
    if to not in KINDS:
        raise ValueError(f"to must be one of {', '.join(KINDS)}, got {to!r}")
    out: dict[str, tuple[str, np.ndarray]] = {}
    layers = layer_count(tensors) if layers is None else layers
    for name, (dtype, array) in tensors.items():
        kind = kind_for(name, array.shape, to, layers, pure) if name.endswith(".weight") else None
        if kind is None:
            out[name] = (dtype, array)
            continue
        w = as_float32(dtype, array)
        base = module_name(name)
        if kind == "int8":
            q, s = quantize_int8(w, GROUP_SIZE["int8"], name)
            out[base + ".qweight"], out[base + ".scales"] = ("I8", q), ("F16", s)
        elif kind == "int4-v1":
            q, s, m = quantize_int4_v1(w, GROUP_SIZE["int4"], name)
            out[base + ".qweight"], out[base + ".scales"], out[base + ".mins"] = ("U8", q), ("F16", s), ("F16", m)
        else:
            q, d, dmin, codes = quantize_int4(w, name, calibration.importance(name) if calibration else None)
            out[base + ".qweight"], out[base + ".scales"], out[base + ".mins"] = ("U8", q), ("F16", d), ("F16", dmin)
            out[base + ".subscales"] = ("U8", codes)
    if to == "int4-v1":
        metadata = {METADATA_FORMAT: FORMAT, METADATA_VERSION: "1", METADATA_TYPE: "int4"}
    else:
        metadata = {METADATA_FORMAT: FORMAT, METADATA_VERSION: VERSION, METADATA_TYPE: to,
                    METADATA_SUPER: str(SUPER_GROUPS)}
        if to == "int4":
            metadata[METADATA_CALIBRATION] = calibration.source if calibration else "none"
    metadata.update({metadata_group_key(k): str(GROUP_SIZE[k]) for k in ("int8", "int4")})
    return out, metadata


# ---- reading a quantized file ----

@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """A weight matrix stored quantized, and the tensors of the file that hold it."""
    name: str                  # the HF weight it stands for: "model.layers.0.mlp.up_proj.weight"
    kind: str                  # "int8", "int4" (version 2) or "int4-v1"
    shape: tuple[int, int]     # [rows, cols] of the weight
    group_size: int
    qweight: str               # "model.layers.0.mlp.up_proj.qweight"
    scales: str                # int8, int4-v1: per group; int4: the super-blocks' d
    mins: Optional[str]        # int4 and int4-v1 only (int4: the super-blocks' dmin)
    subscales: Optional[str] = None  # int4 only: the super-blocks' 6-bit codes


@dataclasses.dataclass(frozen=True)
class QuantizedCheckpoint:
    path: str                                   # the .safetensors file
    quant_type: str                             # "int8", "int4" or "int4-v1", as `gally quantize --to` made it
    metadata: dict[str, str]
    matrices: dict[str, QuantizedMatrix]        # by HF weight name
    plain: dict[str, tuple[str, tuple]]         # tensors stored as they are: name → (dtype, shape)
    version: str = VERSION


_QUANT_SUFFIXES = (".qweight", ".scales", ".mins", ".subscales")


def read_header(path: str) -> tuple[dict, dict]:
    """(tensor entries, __metadata__) of a .safetensors file; reads only the header."""
    from . import safetensors_file

    header, metadata = safetensors_file.read_header(path)
    for name, info in header.items():
        if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
                or not isinstance(info.get("shape"), list)):
            raise ValueError(f"{path}: tensor {name!r}: header entry needs a dtype and a shape")
    return header, metadata


def _group_size(path: str, metadata: dict, kind: str) -> int:
    key = metadata_group_key(kind)
    value = metadata.get(key)
    if value is None:
        raise ValueError(f"{path}: holds {kind} tensors but __metadata__ has no {key!r}")
    if str(value) != str(GROUP_SIZE[kind]):
        raise ValueError(f"{path}: __metadata__ {key!r} is {value!r}; gally reads {kind} groups of "
                         f"{GROUP_SIZE[kind]} only")
    return GROUP_SIZE[kind]


def read_file(path: str) -> Optional[QuantizedCheckpoint]:
    """The layout of a quantized .safetensors file, checked against the spec; None for a plain
    checkpoint (no gally-quant tag and no quantized tensors). Raises ValueError naming the file
    and the tensor or key that is wrong."""
    header, metadata = read_header(path)
    quant_names = sorted(n for n in header if n.endswith(_QUANT_SUFFIXES))
    tag = metadata.get(METADATA_FORMAT)
    if tag != FORMAT:
        if not quant_names:
            return None
        if tag is None:
            raise ValueError(f"{path}: tensor {quant_names[0]!r} looks quantized but __metadata__ has no format "
                             f"tag; gally reads files tagged {{{METADATA_FORMAT!r}: {FORMAT!r}}}")
        raise ValueError(f"{path}: unknown quantization format {tag!r} (tensor {quant_names[0]!r}); gally reads "
                         f"files tagged {{{METADATA_FORMAT!r}: {FORMAT!r}}}")
    version = metadata.get(METADATA_VERSION)
    if version not in VERSIONS:
        raise ValueError(f"{path}: {FORMAT} version {version!r}; this gally reads versions "
                         f"{', '.join(map(repr, VERSIONS))}")
    quant_type = metadata.get(METADATA_TYPE)
    if quant_type not in ("int8", "int4"):
        raise ValueError(f"{path}: __metadata__ {METADATA_TYPE!r} is {quant_type!r}, expected 'int8' or 'int4'")
    int4 = "int4-v1" if version == "1" else "int4"  # what a U8 qweight holds
    if quant_type == "int4":
        quant_type = int4

    matrices: dict[str, QuantizedMatrix] = {}
    used: set[str] = set()
    for qname in (n for n in quant_names if n.endswith(".qweight")):
        base = qname[: -len(".qweight")]
        entry = header[qname]
        kind = {"I8": "int8", "U8": int4}.get(entry["dtype"])
        if kind is None:
            raise ValueError(f"{path}: tensor {qname!r} has dtype {entry['dtype']}; expected I8 (int8) or U8 (int4)")
        shape = entry["shape"]
        if len(shape) != 2:
            raise ValueError(f"{path}: tensor {qname!r} has shape {shape}; expected a matrix")
        group = _group_size(path, metadata, kind)
        rows, cols = shape[0], shape[1] * (1 if kind == "int8" else 2)
        if cols % group:
            raise ValueError(f"{path}: tensor {qname!r}: {cols} columns is not a multiple of the {kind} "
                             f"group size {group}")
        if kind == "int4" and metadata.get(METADATA_SUPER) != str(SUPER_GROUPS):
            raise ValueError(f"{path}: __metadata__ {METADATA_SUPER!r} is {metadata.get(METADATA_SUPER)!r}; gally "
                             f"reads int4 super-blocks of {SUPER_GROUPS} groups only")
        blocks = super_blocks(rows * cols // group)
        what = f"super-blocks of {SUPER_GROUPS} groups of {group}" if kind == "int4" else f"groups of {group}"
        per = [blocks] if kind == "int4" else [rows, cols // group]
        parts = {"scales": (base + ".scales", "F16", per),
                 "mins": (base + ".mins", "F16", per) if kind != "int8" else None,
                 "subscales": (base + ".subscales", "U8", [blocks, CODE_BYTES]) if kind == "int4" else None}
        for part, spec in parts.items():
            if spec is None:
                if base + "." + part in header:
                    raise ValueError(f"{path}: tensor {base + '.' + part!r} belongs to no weight that has {part} "
                                     f"({qname!r} is {kind})")
                continue
            pname, dtype, expected = spec
            if pname not in header:
                raise ValueError(f"{path}: tensor {pname!r} is missing ({kind} weight {qname!r} needs its {part})")
            if header[pname]["dtype"] != dtype:
                raise ValueError(f"{path}: tensor {pname!r} has dtype {header[pname]['dtype']}; expected {dtype}")
            if header[pname]["shape"] != expected:
                raise ValueError(f"{path}: tensor {pname!r} has shape {header[pname]['shape']}; expected {expected} "
                                 f"for {kind} {what} over a [{rows}, {cols}] weight")
            used.add(pname)
        weight = base + ".weight"
        if weight in header:
            raise ValueError(f"{path}: tensor {weight!r} is stored both plain and quantized ({qname!r})")
        used.add(qname)
        names = {part: spec[0] if spec else None for part, spec in parts.items()}
        matrices[weight] = QuantizedMatrix(weight, kind, (rows, cols), group, qname, names["scales"], names["mins"],
                                           names["subscales"])
    orphans = [n for n in quant_names if n not in used]
    if orphans:
        raise ValueError(f"{path}: tensor {orphans[0]!r} belongs to no quantized weight (no "
                         f"{orphans[0].rsplit('.', 1)[0] + '.qweight'!r})")
    plain = {n: (e["dtype"], tuple(e["shape"])) for n, e in header.items() if n not in used}
    return QuantizedCheckpoint(path, quant_type, {str(k): str(v) for k, v in metadata.items()}, matrices, plain,
                               version)


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}


def bits_per_weight(layout: QuantizedCheckpoint) -> dict[str, float]:
    """Average bits per weight (values, scales, mins and codes): "layers", of the layer matrices;
    "model", of the whole checkpoint (every tensor's bytes over every weight, embeddings and norms
    included); and per kind of layer matrix ("int4", "int8", …)."""
    header, _ = read_header(layout.path)

    def nbytes(name):
        return _DTYPE_BYTES.get(header[name]["dtype"], 4) * int(np.prod(header[name]["shape"], dtype=np.int64))

    sums: dict[str, list[int]] = {}  # "layers" or a kind → [bits, weights]
    for m in layout.matrices.values():
        if _LAYER_MATRIX.fullmatch(m.name):
            bits = 8 * sum(nbytes(n) for n in (m.qweight, m.scales, m.mins, m.subscales) if n)
            for key in ("layers", m.kind):
                total = sums.setdefault(key, [0, 0])
                total[0] += bits
                total[1] += m.shape[0] * m.shape[1]
    weights = sum(m.shape[0] * m.shape[1] for m in layout.matrices.values())
    weights += sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout.plain.values())
    sums["model"] = [8 * sum(nbytes(n) for n in header), weights]
    return {key: bits / max(n, 1) for key, (bits, n) in sums.items()}


def read_checkpoint(folder: str) -> Optional[QuantizedCheckpoint]:
    """read_file() of a model folder's model.safetensors; None for a plain checkpoint (sharded
    ones included: a quantized checkpoint is always one file)."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return read_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        for shard in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
            if read_file(os.path.join(folder, shard)) is not None:
                raise ValueError(f"{os.path.join(folder, shard)}: a {FORMAT} checkpoint must be one "
                                 f"model.safetensors, not shards")
        return None
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_arrays(folder: str) -> tuple[QuantizedCheckpoint, dict[str, np.ndarray]]:
    """The checked layout and every tensor of a quantized folder as a zero-copy NumPy view."""
    from . import safetensors_file

    layout = read_checkpoint(folder)
    if layout is None:
        raise ValueError(f"{folder}: not a {FORMAT} checkpoint (no {METADATA_FORMAT!r}: {FORMAT!r} tag)")
    return layout, {name: t.numpy() for name, t in safetensors_file.open_file(layout.path).items()}


def dequantize_checkpoint(folder: str) -> dict[str, np.ndarray]:
    """Every weight of a quantized folder under its HF name, dequantized to float32."""
    layout, arrays = load_arrays(folder)
    out = {name: as_float32(dtype, arrays[name]) for name, (dtype, _) in layout.plain.items()}
    for name, m in layout.matrices.items():
        if m.kind == "int8":
            out[name] = dequantize_int8(arrays[m.qweight], arrays[m.scales].view(np.float16))
        elif m.kind == "int4-v1":
            out[name] = dequantize_int4_v1(arrays[m.qweight], arrays[m.scales].view(np.float16),
                                           arrays[m.mins].view(np.float16))
        else:
            out[name] = dequantize_int4(arrays[m.qweight], arrays[m.scales].view(np.float16),
                                        arrays[m.mins].view(np.float16), arrays[m.subscales])
    return out


# ---- writing a quantized model folder ----

# Files copied from the source folder beside the weights: config, tokenizer, chat template.
_COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
QUANTIZE_THREADS = 4  # the most tensors quantize_folder quantizes at once (up to the physical cores)


def announce_calibration(text: bool = False) -> None:
    """One line on stderr: int4 is being calibrated (which takes minutes at 8B), and on what."""
    what = "the text" if text else (f"{CALIBRATION_SAMPLES} sequences of {CALIBRATION_LENGTH} tokens that the "
                                    f"model samples itself")
    print(f"gally: calibrating int4 on {what} (--no-calibration skips it)", file=sys.stderr, flush=True)


def calibration_model(source: str, threads: Optional[int] = None):
    """The model calibrate() runs for quantizing `source` to int4: its int8 quantization (KLD 0.004
    from f32 on dithered SmolLM2, and half bf16's bytes a token to read), made in memory from a
    float folder, or a GGUF file's cached int8 conversion (which stays in the cache). Every way to
    int4 calibrates on the same int8 weights, so they all write the same int4."""
    from .model import load

    return load(source, dtype="int8", threads=threads)


def calibrate_source(source: str, text: Optional[str] = None, threads: Optional[int] = None,
                     announce: Optional[bool] = None) -> Calibration:
    """calibrate(calibration_model(source), text): what every way to int4 runs, saying so on stderr
    first (announce_calibration; default: when stderr is a terminal)."""
    if announce or (announce is None and sys.stderr.isatty()):
        announce_calibration(text is not None)
    return calibrate(calibration_model(source, threads), text)


def quantize_folder(source: str, out_dir: str, to: str, pure: bool = False, progress: Optional[bool] = None,
                    calibration="self", calibration_text: Optional[str] = None) -> QuantizedCheckpoint:
    """Writes the model folder `out_dir` (which must not exist, or be empty): `source`'s config and
    tokenizer files, and model.safetensors quantized to `to` ("int8", "int4" or "int4-v1"; pure: see
    kind_for). source: a model folder, a .gguf file or an alias, as gally.load takes. calibration
    (int4 only): "self", statistics of calibration_text's tokens, or without one of sequences the
    model samples itself (calibrate()); a Calibration; or None, every column alike. Calibrating a .gguf source
    runs its int8 conversion, which stays in the cache (calibration_model). The folder appears
    whole or not at all. progress: a bar on stderr once it has taken a second (default: when
    stderr is a terminal)."""
    from . import cache, gguf_import, safetensors_file, sources
    from .model import physical_cores
    from .progress import progress_bar

    if to not in KINDS:
        raise ValueError(f"to must be one of {', '.join(KINDS)}, got {to!r}")
    if not (calibration is None or calibration == "self" or isinstance(calibration, Calibration)):
        raise ValueError(f"calibration must be 'self', a Calibration or None, got {calibration!r}")
    if calibration_text is not None and (calibration != "self" or to != "int4"):
        raise ValueError(f"a calibration text applies to int4 with calibration='self' only, not {to} "
                         f"with {calibration!r}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: already exists; choose a new output folder")
    gguf = sources.gguf_file(source)
    if gguf is None:
        folder = sources.resolve(source)
        if read_checkpoint(folder) is not None:
            raise ValueError(f"{folder}: already quantized; quantize from an f32, bf16 or f16 checkpoint")
    if to != "int4":
        calibration = None
    elif calibration == "self":  # it takes minutes at 8B: said as the progress bar is shown
        calibration = calibrate_source(source, calibration_text, announce=progress)
    if gguf is not None:  # straight from the GGUF file: no float32 conversion is written on the way
        gguf_import.convert(gguf, out_dir, to, progress, calibration=calibration)
        return read_checkpoint(out_dir)
    views = safetensors_file.open_checkpoint(folder)
    arrays = {n: (t.dtype, t.numpy()) for n, t in views.items()}  # views into the mapped file
    layers = layer_count(arrays)
    tensors, metadata = {}, {}
    def one(item):  # NumPy lets go of the GIL in its loops: one tensor per thread
        name, (dtype, a) = item
        return quantize_tensors({name: (dtype, a)}, to, pure, layers, calibration)

    # Llama-3.2-1B's shapes to int4 on 2 cores: 170 s on one thread, 93 on two. At most 4: each
    # holds a float32 copy of its matrix and the fit's scratch (~1 GB at 8B)
    with progress_bar(sum(a.nbytes for _, a in arrays.values()), f"quantizing to {to}", progress) as bar, \
            ThreadPoolExecutor(min(QUANTIZE_THREADS, physical_cores())) as pool:
        for (_, (_, a)), (out, meta) in zip(arrays.items(), pool.map(one, arrays.items())):  # in order
            tensors.update(out)
            metadata = meta
            bar.update(a.nbytes)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    cache.check_free_space(parent, sum(a.nbytes for _, a in tensors.values()) + (16 << 20), f"writing {out_dir}")
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    with cache.building(out_dir) as tmp:
        for f in sorted(os.listdir(folder)):
            copied = f.endswith(_COPIED_SUFFIXES) and f != "model.safetensors.index.json"
            if copied and os.path.isfile(os.path.join(folder, f)):
                shutil.copyfile(os.path.join(folder, f), os.path.join(tmp, f))
        safetensors_file.write_file(os.path.join(tmp, "model.safetensors"), tensors, metadata)
    return read_checkpoint(out_dir)
