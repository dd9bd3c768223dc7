// Prefill matmul for bf16 weights with AVX512-BF16's vdpbf16ps: each instruction multiplies 32
// bf16 pairs into 16 f32 sums, twice the work of an f32 FMA. The activations are rounded to bf16
// for it (as llama.cpp does for BF16 weights); accumulation stays f32. Decode steps and other
// weight types take the exact AVX-512 path: with one token the product is bound by memory, not
// arithmetic, and rounding would only cost accuracy.
#include <immintrin.h>

#include <vector>

#include "kernels/kernels.h"

namespace gally {
namespace {

constexpr int ROWS = 4, TOKENS = 6;  // 24 accumulators + 4 weight registers of 32 zmm

// out[i][j] = Σ_k W[i, k] · x[j, k] with bf16 W and x; k < n32 in vdpbf16ps, the tail exactly.
template <int RB, int TB>
inline void dot_tile(const uint16_t* xb, const float* xf, const uint16_t* W, int n_in, float out[RB][TB]) {
  __m512 acc[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) acc[i][j] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 32 <= n_in; k += 32) {
    __m512bh w[RB];
    for (int i = 0; i < RB; ++i) w[i] = (__m512bh)_mm512_loadu_si512(W + (long)i * n_in + k);
    for (int j = 0; j < TB; ++j) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (long)j * n_in + k);
      for (int i = 0; i < RB; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[i], xv);
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < TB; ++j) {
      float s = 0;
      for (int kk = k; kk < n_in; ++kk) s += xf[(long)j * n_in + kk] * bf16_to_f32(W[(long)i * n_in + kk]);
      out[i][j] = _mm512_reduce_add_ps(acc[i][j]) + s;
    }
}

template <int RB, int TB>
inline void tile(const uint16_t* xb, const float* x, const uint16_t* W, const float* b, float* y, int n_in, int ldy,
                 int r, int t, int t_first, bool accumulate) {
  float out[RB][TB];
  dot_tile<RB, TB>(xb + (long)(t - t_first) * n_in, x + (long)t * n_in, W + (long)r * n_in, n_in, out);
  for (int j = 0; j < TB; ++j)
    for (int i = 0; i < RB; ++i) {
      const float s = out[i][j] + (b ? b[r + i] : 0.0f);
      float& o = y[(long)(t + j) * ldy + r + i];
      o = accumulate ? o + s : s;
    }
}

// x [n, n_in] f32 → bf16, rounding to nearest even.
void to_bf16(const float* x, uint16_t* out, long n) {
  long i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, (__m512i)v);
  }
  for (; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}

}  // namespace

void matmul_avx512bf16(const float* x, const void* Wv, DType wtype, const float* b, float* y, int n_tok, int n_in, int ldy,
            int r0, int r1, bool accumulate) {
  if (wtype != DType::BF16 || n_tok < 4)
    return kernels_avx512.matmul(x, Wv, wtype, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
  const uint16_t* W = (const uint16_t*)Wv;
  const int t_block = TOKENS * (n_in > 2048 ? 4 : 8);
  static thread_local std::vector<uint16_t> xb;  // the block's activations in bf16, grown once
  if (xb.size() < size_t(t_block) * n_in) xb.resize(size_t(t_block) * n_in);
  for (int t0 = 0; t0 < n_tok; t0 += t_block) {
    const int t1 = t0 + t_block < n_tok ? t0 + t_block : n_tok;
    to_bf16(x + (long)t0 * n_in, xb.data(), long(t1 - t0) * n_in);
    int r = r0;
    for (; r + ROWS <= r1; r += ROWS) {
      int t = t0;
      for (; t + TOKENS <= t1; t += TOKENS) tile<ROWS, TOKENS>(xb.data(), x, W, b, y, n_in, ldy, r, t, t0, accumulate);
      for (; t < t1; ++t) tile<ROWS, 1>(xb.data(), x, W, b, y, n_in, ldy, r, t, t0, accumulate);
    }
    for (; r < r1; ++r) {
      int t = t0;
      for (; t + TOKENS <= t1; t += TOKENS) tile<1, TOKENS>(xb.data(), x, W, b, y, n_in, ldy, r, t, t0, accumulate);
      for (; t < t1; ++t) tile<1, 1>(xb.data(), x, W, b, y, n_in, ldy, r, t, t0, accumulate);
    }
  }
}

}  // namespace gally
