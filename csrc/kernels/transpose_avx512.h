// A 16 × 16 transpose of 32-bit elements in AVX-512 registers, for the kernel files compiled with
// AVX-512 flags: it builds the prefill GEMMs' activation layouts (tokens in the lanes) and the
// row-wise int8/int4 kernels' weight tiles (rows in the lanes).
#pragma once
#include <immintrin.h>

namespace gally {

// out[c] = column c of the 16 × 16 matrix of 32-bit elements whose row r is rows[r].
static inline void transpose16x16(const __m512i rows[16], __m512i out[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit interleave within 128-bit lanes
    a[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 64-bit: b[i + c] lane L = rows i … i+3 of column 4L + c
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 128-bit lanes: out[4L + c] = lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    out[c] = _mm512_shuffle_i32x4(e0, e2, _MM_SHUFFLE(2, 0, 2, 0));
    out[4 + c] = _mm512_shuffle_i32x4(e0, e2, _MM_SHUFFLE(3, 1, 3, 1));
    out[8 + c] = _mm512_shuffle_i32x4(e1, e3, _MM_SHUFFLE(2, 0, 2, 0));
    out[12 + c] = _mm512_shuffle_i32x4(e1, e3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// out[c] = column c of the 16 × 16 block of 32-bit elements at in, its rows ld elements apart.
static inline void transpose16x16(const void* in, long ld, __m512i out[16]) {
  __m512i rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_si512((const char*)in + i * ld * 4);
  transpose16x16(rows, out);
}

}  // namespace gally
