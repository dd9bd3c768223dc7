// AVX2 + FMA + F16C kernels: 8 f32 lanes. Compiled with those flags, run only where isa.cpp
// found the CPU and OS support them.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace avx2 {

struct S {
  static constexpr int N = 8;
  static constexpr int REGS = 16;                     // vector registers (ymm0-15)
  static constexpr int GEMM_ROWS = 4, GEMM_VECS = 3;  // 12 accumulators + 3 activations + 1 weight of 16 ymm
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V ldexp(V v, V n) {
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(v), e));
  }
  // Σ v by sums' tree, so that one register's sum equals its lane of sums.
  static float sum(V v) {
    v = _mm256_add_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));  // x0 + x2, x1 + x3 in each half
    v = _mm256_add_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
  }
  static float hmax(V v) {  // the largest lane
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  // out = [Σ v[0], …, Σ v[N − 1]]: N registers' lane sums at once, each by the same tree (within a
  // 128-bit lane (x0 + x2) + (x1 + x3), then the two lanes) wherever it stands.
  static V sums(const V v[N]) {
    V a[4], b[2];
    for (int i = 0; i < 4; ++i)
      a[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m256d x = _mm256_castps_pd(a[2 * i]), y = _mm256_castps_pd(a[2 * i + 1]);
      b[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
  }
  static V load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static V load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
  static void store_f16(uint16_t* p, V v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Rounded to nearest even as f32_to_bf16 (dtype.h), NaN kept a quiet NaN.
  static void store_bf16(uint16_t* p, V v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan =
        _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 8 × u16 in the low half
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
  }
  // The QGROUP weights of group g of row r of an int8 or int4 matrix as f32 (common.h's dequantize_group).
  static void dequantize_group(const WeightsRef& W, int groups, long r, int g, float* out) {
    const GroupScale gs = group_scale(W, groups, r, g);
    const V s = set1(gs.s);
    const long rg = r * groups + g;
    if (W.dtype == DType::Q8) {
      const int8_t* q = (const int8_t*)W.data + rg * QGROUP;
      for (int i = 0; i < QGROUP; i += 8) {
        const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + i)));
        store(out + i, mul(_mm256_cvtepi32_ps(qi), s));
      }
      return;
    }
    const V m = set1(gs.m);
    const __m128i bytes = _mm_loadu_si128((const __m128i*)((const uint8_t*)W.data + rg * (QGROUP / 2)));
    const __m128i nib = _mm_set1_epi8(0x0f);
    const __m128i halves[2] = {_mm_and_si128(bytes, nib), _mm_and_si128(_mm_srli_epi16(bytes, 4), nib)};
    for (int h = 0; h < 2; ++h) {  // elements 16h … 16h + 7, then 16h + 8 … 16h + 15 (the byte shift
                                   // an immediate, which an unoptimised build does not fold from a loop)
      const __m256i lo = _mm256_cvtepu8_epi32(halves[h]), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8));
      store(out + 16 * h, fma(_mm256_cvtepi32_ps(lo), s, m));
      store(out + 16 * h + 8, fma(_mm256_cvtepi32_ps(hi), s, m));
    }
  }
  // out[c] = column c of the 8 × 8 block at in (rows ld floats apart)
  static void transpose(const float* in, long ld, V out[8]) {
    V t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(_mm256_loadu_ps(in + i * ld), _mm256_loadu_ps(in + (i + 1) * ld));
      t[i + 1] = _mm256_unpackhi_ps(_mm256_loadu_ps(in + i * ld), _mm256_loadu_ps(in + (i + 1) * ld));
    }
    for (int i = 0; i < 8; i += 4) {  // u[i + c]: rows i … i+3 of columns c (low half) and c + 4 (high)
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; ++c) {
      out[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
      out[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
  }
};
using V = S::V;

// acc + vpmaddwd(a, b), and acc + the quads of u8 · s8 products (quant_kernels.inl)
inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline __m256i dot_quads(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

#include "kernels/simd_kernels.inl"

#include "kernels/quant_kernels.inl"

// after quant_kernels.inl: the int8 prompts' GEMM on the int16 activations (vpmaddwd + vpaddd), the int4
// prompts' on them requantized to int8 (vpmaddubsw)
constexpr bool QGEMM_VNNI = false;
#include "kernels/gemm_q_avx2.inl"

}  // namespace avx2

const Kernels kernels_avx2 = {
    .name = "avx2",
    .matmul = avx2::matmul,
    .gemv = avx2::gemv,
    .matmul_many = avx2::matmul_many,
    .rmsnorm = avx2::rmsnorm,
    .rope = avx2::rope,
    .attention_part = avx2::attention_part,
    .attention_causal = avx2::attention_causal,
    .silu_mul = avx2::silu_mul,
    .convert_row = avx2::convert_row,
    .quantize_rows = avx2::quantize_rows,
    .matmul_q8 = avx2::matmul_q8,
    .matmul_q4 = avx2::matmul_q4,
    .matmul_q4k = avx2::matmul_q4k,
    .gemm_q = avx2::gemm_q,
};

}  // namespace gally
