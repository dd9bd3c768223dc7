// AVX-512 (F/BW/DQ/VL) kernels: 16 f32 lanes. Compiled with AVX-512 flags, run only where
// isa.cpp found the CPU and OS support them.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"
#include "kernels/transpose_avx512.h"

namespace gally {
namespace avx512 {

struct S {
  static constexpr int N = 16;
  // The prefill GEMM's register tile (gemm.inl): 6 rows × 64 tokens, 24 accumulators + 4 activations + 1 weight
  // of 32 zmm. It loads 10 vectors per 24 FMAs where 8 rows × 48 tokens load 11, and a prompt of 64 is one
  // tile rather than 32 + 32. One core, bf16, 64 tokens: Llama-3.2-3B's 3072 × 8192 48-50 → 55 GMAC/s,
  // 8192 × 3072 54-56 → 60-62, Llama-3.2-1B's 2048 × 8192 48 → 55; 128 and 256 tokens 0-4% faster, 24 and
  // 40 within the noise. 3B bf16 pp64, 2 threads: 35.7-36.6 → 37.8-37.9 tok/s.
  static constexpr int REGS = 32;  // vector registers (zmm0-31)
  static constexpr int GEMM_ROWS = 6, GEMM_VECS = 4;
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V ldexp(V v, V n) {
    __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(v), e));
  }
  // Σ v by sums' tree, so that one register's sum equals its lane of sums.
  static float sum(V v) {
    v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));  // x0 + x2, x1 + x3 in each lane
    v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));  // L0 + L1, L2 + L3
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_cvtss_f32(v);
  }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }  // the largest lane
  // out = [Σ v[0], …, Σ v[N − 1]]: N registers' lane sums at once, each by the same tree (within a
  // 128-bit lane (x0 + x2) + (x1 + x3), then the lanes (L0 + L1) + (L2 + L3)) wherever it stands.
  static V sums(const V v[N]) {
    V a[8], b[4];
    for (int i = 0; i < 8; ++i)
      a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
      const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
      b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const V c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const V c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  static V load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static V load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static V load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
  static void store_f16(uint16_t* p, V v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Rounded to nearest even as f32_to_bf16 (dtype.h), NaN kept a quiet NaN.
  static void store_bf16(uint16_t* p, V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan =
        _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
  }
  // The QGROUP weights of group g of row r of an int8 or int4 matrix as f32 (common.h's dequantize_group).
  static void dequantize_group(const WeightsRef& W, int groups, long r, int g, float* out) {
    const GroupScale gs = group_scale(W, groups, r, g);
    const V s = set1(gs.s);
    const long rg = r * groups + g;
    if (W.dtype == DType::Q8) {
      const int8_t* q = (const int8_t*)W.data + rg * QGROUP;
      for (int i = 0; i < QGROUP; i += 16)
        store(out + i, mul(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + i)))), s));
      return;
    }
    const V m = set1(gs.m);
    const __m128i bytes = _mm_loadu_si128((const __m128i*)((const uint8_t*)W.data + rg * (QGROUP / 2)));
    const __m128i nib = _mm_set1_epi8(0x0f);
    store(out, fma(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, nib))), s, m));
    store(out + 16, fma(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nib))), s, m));
  }
  // out[c] = column c of the 16 × 16 block at in (rows ld floats apart)
  static void transpose(const float* in, long ld, V out[16]) {
    __m512i t[16];
    transpose16x16(in, ld, t);
    for (int c = 0; c < 16; ++c) out[c] = _mm512_castsi512_ps(t[c]);
  }
};
using V = S::V;

// acc + vpmaddwd(a, b), and acc + the quads of u8 · s8 products (vpmaddubsw, then vpmaddwd by ones),
// in 8 and in 16 int32 lanes (quant_kernels.inl, quant_rows_avx512.inl)
inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline __m512i dot_pairs16(__m512i acc, __m512i a, __m512i b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
inline __m256i dot_quads(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m512i dot_quads16(__m512i acc, __m512i u, __m512i s) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}

#include "kernels/simd_kernels.inl"

#define GALLY_QUANT_ROWS_AVX512
#include "kernels/quant_kernels.inl"

void softmax_lanes16(float* st, int n, int first, int lanes, float* probs, long ldp, float* inv) {
  _mm512_storeu_ps(inv, att::softmax_lanes(st, n, first, lanes, probs, ldp));
}

}  // namespace avx512

const Kernels kernels_avx512 = {
    .name = "avx512",
    .matmul = avx512::matmul,
    .gemv = avx512::gemv,
    .matmul_many = avx512::matmul_many,
    .rmsnorm = avx512::rmsnorm,
    .rope = avx512::rope,
    .attention_part = avx512::attention_part,
    .attention_causal = avx512::attention_causal,
    .silu_mul = avx512::silu_mul,
    .convert_row = avx512::convert_row,
    .quantize_rows = avx512::quantize_rows,
    .matmul_q8 = avx512::matmul_q8,
    .matmul_q4 = avx512::matmul_q4,
    .matmul_q4k = avx512::matmul_q4k,
    .float_gemm_min_tokens = FLOAT_GEMM_MIN_TOKENS + 1,  // 16 tokens row-wise too (kernels.h)
};

}  // namespace gally
