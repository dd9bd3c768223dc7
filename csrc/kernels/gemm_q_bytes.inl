// What the int4 prompt GEMMs (gemm_q_avx2.inl, gemm_q_avx512.inl) share: their weights' 4-bit
// codes widened to bytes, and their activations, each token's int16 groups requantized to int8 in
// the tiles' layout. Included by those files, inside the kernel set's namespace (it is compiled
// with each set's flags; AVX2 instructions only).

constexpr int BYTE_STEPS = QGROUP / 4;  // 32-bit words of int8 quads a group

// A row's int4 groups [rg0, rg0 + groups) as their 4-bit codes in bytes, in order, into out (byte i
// of a packed group holds codes i and i + 16); two groups at a time.
inline void widen_row_codes(const WeightsRef& W, long rg0, int groups, uint8_t* out) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  int g = 0;
  for (; g + 2 <= groups; g += 2) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)((const uint8_t*)W.data + (rg0 + g) * (QGROUP / 2)));
    const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
    _mm256_storeu_si256((__m256i*)(out + g * QGROUP), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256((__m256i*)(out + (g + 1) * QGROUP), _mm256_permute2x128_si256(lo, hi, 0x31));
  }
  for (; g < groups; ++g) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)((const uint8_t*)W.data + (rg0 + g) * (QGROUP / 2)));
    _mm_storeu_si128((__m128i*)(out + g * QGROUP), _mm_and_si128(bytes, _mm256_castsi256_si128(low)));
    _mm_storeu_si128((__m128i*)(out + g * QGROUP + 16),
                     _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm256_castsi256_si128(low)));
  }
}

// Tokens [0, nt) of xq (their scales already transposed into st: st[g · tw + j]), zero up to tw:
// word p of group g of token j to xt[(g · BYTE_STEPS + p) · tw + j]; each value x · 127 /
// ACT_INT16_MAX rounded to even (|x| ≤ ACT_INT16_MAX, so within ±127), each scale widened by
// ACT_INT16_MAX / 127, and mt[g · tw + j] = that scale · Σ q, the sum of the int8 values: int4's
// min term then adds what the requantized activations give, as the code term does. With the exact
// sum the two disagree by the codes' mean (about 7.5) times the rounding (measured: SmolLM2
// int4-v1's perplexity over f32 +1.55%, against +0.39% so).
inline void pack_tile_bytes(const int16_t* xq, int nt, int groups, int tw, int32_t* xt, float* st, float* mt) {
  static_assert(BYTE_STEPS == 8, "a group's words are one register of 8 int32");
  for (long g = 0; g < groups; ++g)
    for (int j0 = 0; j0 < tw; j0 += 8) {  // 8 tokens: a word-by-token 8 × 8 block of xt
      __m256i q[8], sums[8];
      for (int j = 0; j < 8; ++j) {
        if (j0 + j >= nt) {
          q[j] = sums[j] = _mm256_setzero_si256();
          continue;
        }
        q[j] = requant_group(xq + (long(j0 + j) * groups + g) * QGROUP);  // quant_kernels.inl
        sums[j] = byte_sums(q[j]);
      }
      // the 8 tokens' sums in one register: lane j = Σ of token j's 32 values
      const __m256i s01 = _mm256_hadd_epi32(sums[0], sums[1]), s23 = _mm256_hadd_epi32(sums[2], sums[3]);
      const __m256i s45 = _mm256_hadd_epi32(sums[4], sums[5]), s67 = _mm256_hadd_epi32(sums[6], sums[7]);
      const __m256i lo = _mm256_hadd_epi32(s01, s23), hi = _mm256_hadd_epi32(s45, s67);
      const __m256i total =
          _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
      float* sc = st + g * tw + j0;
      const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(sc), _mm256_set1_ps(REQUANT_SCALE));
      _mm256_storeu_ps(sc, scale);
      _mm256_storeu_ps(mt + g * tw + j0, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(total)));
      // transpose: row p of the block = word p of each token
      __m256i t[8], u[8];
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(q[i], q[i + 1]), t[i + 1] = _mm256_unpackhi_epi32(q[i], q[i + 1]);
      }
      for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; ++h) {
          u[i + h] = _mm256_unpacklo_epi64(t[i + h], t[i + 2 + h]);
          u[i + 2 + h] = _mm256_unpackhi_epi64(t[i + h], t[i + 2 + h]);
        }
      // u[0]: words 0 (tokens 0-3) and 4 in the high lane; u[2]: 1 and 5; u[1]: 2 and 6; u[3]: 3 and 7
      const int word_of[4] = {0, 2, 1, 3};
      for (int i = 0; i < 4; ++i) {
        int32_t* row = xt + (g * BYTE_STEPS + word_of[i]) * tw + j0;
        _mm256_storeu_si256((__m256i*)row, _mm256_permute2x128_si256(u[i], u[i + 4], 0x20));
        _mm256_storeu_si256((__m256i*)(row + 4 * tw), _mm256_permute2x128_si256(u[i], u[i + 4], 0x31));
      }
    }
}
