// Plain C++ shared by the kernel files (and the embedding lookup): weight rows as f32 (int8 s·q
// and int4 s·q + m, exact in f32 given the group's s and m, which Q4K forms as d·sc and dmin·m;
// bf16 and f16 widened), which the scalar kernels use and the prefill GEMMs use for int8/int4 a
// chunk of rows at a time; and the GEMMs' tile store.
#pragma once
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/kernels.h"

namespace gally {

// The int4 value i (0 … 31) of a packed group: byte i holds i (low nibble) and i + 16 (high).
inline int nibble(const uint8_t* group, int i) { return i < QGROUP / 2 ? group[i] & 0xf : group[i - QGROUP / 2] >> 4; }

// The 6-bit sub-scale (part 0) or sub-min (part 1) of group j of a Q4K super-block's codes (kernels.h).
inline int q4k_code(const uint8_t* codes, int j, int part) {
  uint32_t high;
  std::memcpy(&high, codes + QK_GROUPS, 4);
  return ((codes[j] >> (4 * part)) & 0xf) | ((high >> (16 * part + 2 * j)) & 3) << 4;
}

// Int4 weights meet int8 activations: `groups` groups of int16 activations (kernels.h) requantized,
// each value x · 127 / ACT_INT16_MAX rounded to even (|x| ≤ ACT_INT16_MAX, so within ±127), each
// scale widened by ACT_INT16_MAX / 127, and sum = that scale · Σ q, the sum of the int8 values
// (gemm_q_bytes.inl says why not the exact Σx). The x86 sets form the same values in vectors
// (quant_kernels.inl requant_group, requantized_bytes); the generic and NEON sets take them from here, held in int16
// for their int16 kernels. static: each kernel set's file compiles its own copy with its own
// instructions, which the linker must not merge into one.
static inline void requantize_int8(const int16_t* xq, const float* xs, long groups, int16_t* q, float* s, float* sum) {
  for (long g = 0; g < groups; ++g) {
    int32_t total = 0;
    for (int i = 0; i < QGROUP; ++i) {
      const int v = int(std::nearbyint(float(xq[g * QGROUP + i]) * REQUANT));
      q[g * QGROUP + i] = int16_t(v);
      total += v;
    }
    s[g] = xs[g] * REQUANT_SCALE;
    sum[g] = s[g] * float(total);
  }
}

// Requantized activations in this thread's buffers, valid until its next call: the values (int8, or
// int8 values held in int16), the group scales and sums.
template <class Q>
struct ByteActs {
  const Q* q;
  const float *s, *sum;
};
static inline ByteActs<int16_t> requantized_int8(const int16_t* xq, const float* xs, long groups) {
  static thread_local std::vector<int16_t> q;
  static thread_local std::vector<float> f;
  q.resize(size_t(groups) * QGROUP);
  f.resize(2 * size_t(groups));
  requantize_int8(xq, xs, groups, q.data(), f.data(), f.data() + groups);
  return {q.data(), f.data(), f.data() + groups};
}

// Group g of row r of an int8 / int4 matrix of `groups` groups a row: w = s·q + m (int8: m = 0).
struct GroupScale {
  float s, m;
};
inline GroupScale group_scale(const WeightsRef& W, int groups, long r, int g) {
  if (W.dtype == DType::Q4K) {
    const long f = r * groups + g, sb = f / QK_GROUPS;
    const uint8_t* codes = W.codes + sb * QK_CODE_BYTES;
    return {f16_to_f32(W.scales[sb]) * float(q4k_code(codes, int(f % QK_GROUPS), 0)),
            f16_to_f32(W.mins[sb]) * float(q4k_code(codes, int(f % QK_GROUPS), 1))};
  }
  const long rg = r * groups + g;
  return {f16_to_f32(W.scales[rg]), W.dtype == DType::Q4 ? f16_to_f32(W.mins[rg]) : 0.0f};
}

// The QGROUP weights of group g of row r of an int8 or int4 matrix of `groups` groups a row.
inline void dequantize_group(const WeightsRef& W, int groups, long r, int g, float* out) {
  const GroupScale gs = group_scale(W, groups, r, g);
  const long rg = r * groups + g;
  if (W.dtype == DType::Q8) {
    const int8_t* q = (const int8_t*)W.data + rg * QGROUP;
    for (int i = 0; i < QGROUP; ++i) out[i] = q[i] * gs.s;
    return;
  }
  const uint8_t* q = (const uint8_t*)W.data + rg * (QGROUP / 2);
  for (int i = 0; i < QGROUP / 2; ++i) {
    out[i] = (q[i] & 0xf) * gs.s + gs.m;
    out[i + QGROUP / 2] = (q[i] >> 4) * gs.s + gs.m;
  }
}

// Row r of W [rows, n_in] as f32.
inline void dequantize_row(const WeightsRef& W, int n_in, long r, float* out) {
  const long at = r * n_in;
  switch (W.dtype) {
    case DType::F32: std::memcpy(out, (const float*)W.data + at, sizeof(float) * n_in); break;
    case DType::BF16:
      for (int k = 0; k < n_in; ++k) out[k] = bf16_to_f32(((const uint16_t*)W.data)[at + k]);
      break;
    case DType::F16:
      for (int k = 0; k < n_in; ++k) out[k] = f16_to_f32(((const uint16_t*)W.data)[at + k]);
      break;
    case DType::Q8:
    case DType::Q4:
    case DType::Q4K:
      for (int g = 0; g < n_in / QGROUP; ++g) dequantize_group(W, n_in / QGROUP, r, g, out + g * QGROUP);
      break;
  }
}

// The int16 GEMMs' (gemm_q) per-group activation scales and sums of nt ≤ tw tokens with the tokens
// in the lanes: st[g · tw + j] = xs[j · groups + g], mt likewise from xsum (zero where null), zero
// for the tokens past nt.
inline void transpose_group_values(const float* xs, const float* xsum, int nt, int groups, int tw, float* st,
                                   float* mt) {
  for (int g = 0; g < groups; ++g)
    for (int j = 0; j < tw; ++j) {
      st[long(g) * tw + j] = j < nt ? xs[long(j) * groups + g] : 0.0f;
      mt[long(g) * tw + j] = j < nt && xsum ? xsum[long(j) * groups + g] : 0.0f;
    }
}

// y[j, i] (+)= out[i · tw + j] + b[i] for a GEMM tile's rows i and tokens j, token by token so
// that each token's rows land in one cache line.
inline void store_tile(const float* out, int tw, int rows, int nt, const float* b, float* y, long ldy,
                       bool accumulate) {
  for (int j = 0; j < nt; ++j) {
    float* yj = y + j * ldy;
    for (int i = 0; i < rows; ++i) {
      const float s = out[i * tw + j] + (b ? b[i] : 0.0f);
      yj[i] = accumulate ? yj[i] + s : s;
    }
  }
}

}  // namespace gally
