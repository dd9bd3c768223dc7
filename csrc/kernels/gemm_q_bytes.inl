// The int4 prompt GEMMs' activations (gemm_q_avx2.inl, gemm_q_avx512.inl): each token's int16
// groups requantized to int8, in the tiles' layout. Included by those files, inside the kernel
// set's namespace (it is compiled with each set's flags).

constexpr int BYTE_STEPS = QGROUP / 4;  // 32-bit words of int8 quads a group

// Tokens [0, nt) of xq (their scales already transposed into st: st[g · tw + j]), zero up to tw:
// word p of group g of token j to xt[(g · BYTE_STEPS + p) · tw + j]; each value x · 127 /
// ACT_INT16_MAX rounded to even (|x| ≤ ACT_INT16_MAX, so within ±127), each scale widened by
// ACT_INT16_MAX / 127, and mt[g · tw + j] = that scale · Σ q, the sum of the int8 values: int4's
// min term then adds what the requantized activations give, as the code term does. With the exact
// sum the two disagree by the codes' mean (about 7.5) times the rounding (measured: SmolLM2
// int4-v1's perplexity over f32 +1.55%, against +0.39% so).
inline void pack_tile_bytes(const int16_t* xq, int nt, int groups, int tw, int32_t* xt, float* st, float* mt) {
  const __m256 r = _mm256_set1_ps(127.0f / ACT_INT16_MAX);
  for (long g = 0; g < groups; ++g)  // token-minor, as xt, st and mt are
    for (int j = 0; j < tw; ++j) {
      alignas(32) int8_t q[QGROUP] = {};
      if (j < nt)
        for (int h = 0; h < 2; ++h) {  // 16 values: int16 → f32 · r → int32 (rounded to even) → int8
          const __m256i v = _mm256_loadu_si256((const __m256i*)(xq + (j * groups + g) * QGROUP + 16 * h));
          const __m256i a = _mm256_cvtps_epi32(
              _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v))), r));
          const __m256i b = _mm256_cvtps_epi32(
              _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1))), r));
          const __m128i lo = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
          const __m128i hi = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
          _mm_storeu_si128((__m128i*)(q + 16 * h), _mm_packs_epi16(lo, hi));
        }
      int sum = 0;
      for (int k = 0; k < QGROUP; ++k) sum += q[k];
      for (int p = 0; p < BYTE_STEPS; ++p) std::memcpy(&xt[(g * BYTE_STEPS + p) * tw + j], q + 4 * p, 4);
      float& scale = st[g * tw + j];
      scale *= ACT_INT16_MAX / 127.0f;
      mt[g * tw + j] = scale * float(sum);
    }
}
