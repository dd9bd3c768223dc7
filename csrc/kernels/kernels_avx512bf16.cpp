// Prefill GEMM with AVX512-BF16's vdpbf16ps: each instruction multiplies 16 lanes of bf16 pairs
// (two consecutive k) into f32 sums, twice the work of an f32 FMA. It serves bf16 weights, read
// in place, and int8/int4 weights, dequantized a chunk of rows at a time and rounded to bf16.
// The activations are rounded to bf16 too (as llama.cpp does for BF16 weights); sums stay f32.
// The layout is gemm.inl's, tokens in the lanes, with a pair of k per 32-bit lane. Decode steps,
// f32 and f16 weights take the exact AVX-512 path; the forward pass sends int8/int4 prompts to
// gemm_q instead. Twice an FMA's products per instruction pays where vdpbf16ps issues at the FMA's
// rate (AMD); Intel's cores issue it at a quarter of that rate (Sapphire Rapids: 1.7 G against
// 6.8 G a second), so isa.cpp prefers "avx512bf16fma" there, which keeps only this file's attention.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"
#include "kernels/transpose_avx512.h"

namespace gally {
namespace {

constexpr int RB = 8, TV = 3, TW = TV * 16;  // 24 accumulators + 3 activations + 1 weight of 32 zmm
constexpr int CHUNK = 64;                    // rows dequantized at a time
static_assert(TW == GEMM_SPLIT_TOKENS, "forward.cpp splits packed batches at tile boundaries");

// x [n] f32 → bf16, rounding to nearest even.
void to_bf16(const float* x, uint16_t* out, long n) {
  long i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(out + i, (__m512i)v);
  }
  for (; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}

// xt[(tile · pairs + p) · TW + j] = the bf16 pair (x[t, 2p], x[t, 2p+1]) of token t = tile·TW + j,
// zero past n_tok and past n_in, for tiles [tile0, tile1): a tile's rows in bf16, then transposed
// 16 × 16 at a time.
void pack_tokens(const float* x, int n_tok, int n_in, int pairs, uint32_t* xt, int tile0, int tile1) {
  const int padded = (pairs + 15) / 16 * 16;
  static thread_local std::vector<uint32_t> rows;
  rows.resize(size_t(TW) * padded);
  for (int tile = tile0; tile < tile1; ++tile) {
    const int t0 = tile * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW;
    for (int j = 0; j < nt; ++j) {  // a token's row in bf16, zero from element n_in to the padded end
      uint16_t* row = (uint16_t*)(rows.data() + (long)j * padded);
      to_bf16(x + (long)(t0 + j) * n_in, row, n_in);
      std::fill(row + n_in, row + 2L * padded, uint16_t(0));
    }
    std::fill(rows.begin() + (long)nt * padded, rows.end(), 0u);  // the tokens past n_tok
    uint32_t* dst = xt + (long)tile * pairs * TW;
    __m512i col[16];
    for (int p0 = 0; p0 < pairs; p0 += 16)
      for (int j0 = 0; j0 < TW; j0 += 16) {
        transpose16x16(rows.data() + (long)j0 * padded + p0, padded, col);
        for (int i = 0; i < 16 && p0 + i < pairs; ++i) _mm512_storeu_si512(dst + (long)(p0 + i) * TW + j0, col[i]);
      }
  }
}

// out[i][j] = Σ_p W[i, 2p..2p+1] · xt[p][j] for R rows (ldw bf16 apart) and V vectors of a tile.
template <int R, int V>
inline void tile(const uint32_t* xt, const uint16_t* W, long ldw, int pairs, float* out) {
  __m512 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    __m512bh xv[V];
    for (int v = 0; v < V; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xt + (long)p * TW + v * 16);
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      std::memcpy(&pair, W + i * ldw + 2 * p, 4);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], w, xv[v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + i * TW + v * 16, acc[i][v]);
}

template <int R = RB, int V = TV>
inline void tile_any(int rows, int vecs, const uint32_t* xt, const uint16_t* W, long ldw, int pairs, float* out) {
  if constexpr (R > 1)
    if (rows < R) return tile_any<R - 1, V>(rows, vecs, xt, W, ldw, pairs, out);
  if constexpr (V > 1)
    if (vecs < V) return tile_any<R, V - 1>(rows, vecs, xt, W, ldw, pairs, out);
  tile<R, V>(xt, W, ldw, pairs, out);
}

// Rows [r0, r1) of a bf16, int8 or int4 matrix as bf16 rows of ldw (even, ≥ n_in) elements.
void rows_to_bf16(const WeightsRef& W, int n_in, int r0, int r1, long ldw, uint16_t* out) {
  const long groups = n_in / QGROUP;
  for (long r = r0; r < r1; ++r, out += ldw) {
    out[ldw - 1] = 0;
    if (W.dtype == DType::BF16) {
      std::memcpy(out, (const uint16_t*)W.data + r * n_in, size_t(n_in) * 2);
      continue;
    }
    float group[QGROUP];
    for (long g = 0; g < groups; ++g) {
      dequantize_group(W, int(groups), r, int(g), group);
      to_bf16(group, out + g * QGROUP, QGROUP);
    }
  }
}

bool takes_bf16_gemm(const WeightsRef& W, int n_tok) {
  return n_tok >= GEMM_MIN_TOKENS && (W.dtype == DType::BF16 || is_quantized(W.dtype));
}

// This thread's activations laid out in bf16 pairs, valid until its next call.
const uint32_t* pack_for_this_thread(const float* x, int n_tok, int n_in) {
  static thread_local std::vector<uint32_t> xt;
  const int pairs = (n_in + 1) / 2;
  xt.resize(size_t((n_tok + TW - 1) / TW) * pairs * TW);
  pack_tokens(x, n_tok, n_in, pairs, xt.data(), 0, (n_tok + TW - 1) / TW);
  return xt.data();
}

void gemm_packed(const uint32_t* xt, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy,
                 int r0, int r1, bool accumulate) {
  static thread_local std::vector<uint16_t> wbuf;
  const int pairs = (n_in + 1) / 2, tiles = (n_tok + TW - 1) / TW;
  const bool in_place = W.dtype == DType::BF16 && n_in % 2 == 0;
  const long ldw = 2L * pairs;
  float out[RB * TW];
  for (int c0 = r0; c0 < r1; c0 += CHUNK) {
    const int c1 = c0 + CHUNK < r1 ? c0 + CHUNK : r1;
    const uint16_t* Wc;
    if (in_place) {
      Wc = (const uint16_t*)W.data + (long)c0 * n_in;
    } else {
      wbuf.resize(size_t(CHUNK) * ldw);
      rows_to_bf16(W, n_in, c0, c1, ldw, wbuf.data());
      Wc = wbuf.data();
    }
    for (int tl = 0; tl < tiles; ++tl) {
      const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW, vecs = (nt + 15) / 16;
      for (int r = c0; r < c1; r += RB) {
        const int rows = c1 - r < RB ? c1 - r : RB;
        tile_any(rows, vecs, xt + (long)tl * pairs * TW, Wc + (r - c0) * ldw, ldw, pairs, out);
        store_tile(out, TW, rows, nt, b ? b + r : nullptr, y + (long)t0 * ldy + r, ldy, accumulate);
      }
    }
  }
}

}  // namespace

long bf16_packed_size(int n_tok, int n_in) { return long((n_tok + TW - 1) / TW) * ((n_in + 1) / 2) * TW; }

void pack_bf16(const float* x, int n_tok, int n_in, int tile0, int tile1, uint32_t* xt) {
  pack_tokens(x, n_tok, n_in, (n_in + 1) / 2, xt, tile0, tile1);
}

void matmul_many_packed_bf16(const uint32_t* xt, const float* x, int n_tok, int n_in, const MatmulOut* outs,
                             int count) {
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (takes_bf16_gemm(o.W, n_tok)) gemm_packed(xt, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
    else kernels_avx512.matmul(x, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

void matmul_many_avx512bf16(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count) {
  bool any = false;  // lay the input out only when some matrix takes vdpbf16ps
  for (int i = 0; i < count; ++i) any = any || takes_bf16_gemm(outs[i].W, n_tok);
  matmul_many_packed_bf16(any ? pack_for_this_thread(x, n_tok, n_in) : nullptr, x, n_tok, n_in, outs, count);
}

void matmul_avx512bf16(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy,
                       int r0, int r1, bool accumulate) {
  const MatmulOut out{W, b, y, ldy, r0, r1, accumulate};
  matmul_many_avx512bf16(x, n_tok, n_in, &out, 1);
}

// Causal attention for the prompts of bf16, int8 and int4 models: the scores and the weighted sum
// of the values by vdpbf16ps, with queries, keys, probabilities and values rounded to bf16 and
// every sum in f32 (such a model's prompt activations already pass through bf16 in its matmuls). The layout is
// attention_causal's (kernels.h): queries in the lanes, 16 per tile. The keys and values are
// rounded once per call: keys as bf16 rows, whose consecutive pairs a broadcast feeds to a dot;
// values as pairs of consecutive positions per dimension, as the probabilities are.
namespace {

constexpr int AR = 16;  // keys, or output dimensions, per register tile

// acc[r] = Σ_p A[r·lda + p·ka] (a bf16 pair, broadcast) · B[p] (16 lanes of pairs) for R rows.
template <int R>
inline void dot_rows(const uint32_t* A, long lda, long ka, const uint32_t* B, int pairs, __m512* acc) {
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int p = 0; p < pairs; ++p) {
    const __m512bh b = (__m512bh)_mm512_loadu_si512(B + (long)p * 16);
    for (int r = 0; r < R; ++r) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(int(A[r * lda + p * ka])), b);
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

template <int R = AR>
inline void dot_rows_any(int rows, const uint32_t* A, long lda, long ka, const uint32_t* B, int pairs, __m512* acc) {
  if constexpr (R > 1)
    if (rows < R) return dot_rows_any<R - 1>(rows, A, lda, ka, B, pairs, acc);
  dot_rows<R>(A, lda, ka, B, pairs, acc);
}

// 16 pairs (lo[i], hi[i]) of two rows of 16 floats, rounded to bf16: lo in the low half of each lane.
inline __m512i pair_rows(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// Elements [i, i + 16) of key (or value) row j of a head, as f32, whatever the cache's dtype.
inline __m512 load16(const KvHead& kv, long j, int d, int i, bool key) {
  switch (kv.dtype) {
    case DType::BF16: {
      const uint16_t* p = (key ? kv.key<uint16_t>(j) : kv.value<uint16_t>(j)) + i;
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    }
    case DType::F16: {
      const uint16_t* p = (key ? kv.key<uint16_t>(j) : kv.value<uint16_t>(j)) + i;
      return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    }
    case DType::Q8: {  // code · its group's scale
      const int8_t* row = key ? kv.key<int8_t>(j) : kv.value<int8_t>(j);
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + i)))),
                           _mm512_set1_ps(kv_group_scale(row, i, d)));
    }
    default: return _mm512_loadu_ps((key ? kv.key<float>(j) : kv.value<float>(j)) + i);
  }
}

}  // namespace

void attention_causal_bf16(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale,
                           float* scratch, float* out, int ldo, float* probs, long ldp) {
  const int n_all = ctx0 + nq - 1, dp = d / 2;  // keys of the last query; d is a multiple of 32
  // Scratch: kb [n_all][d] bf16 | vp [n_all/2 + 1][d] pairs | st [n][16] | qp [d/2][16] | pt [n/2 + 1][16]
  uint32_t* kb = (uint32_t*)scratch;
  uint32_t* vp = kb + (long)n_all * dp;
  float* st = (float*)(vp + (long)(n_all / 2 + 1) * d);
  uint32_t* qp = (uint32_t*)(st + 16L * (n_all + 2));
  uint32_t* pt = qp + 8L * d;
  for (long j = 0; j < n_all; ++j) {  // keys as bf16 rows (a bf16 cache's as they are)
    if (kv.dtype == DType::BF16) {
      std::memcpy(kb + j * dp, kv.key<uint16_t>(j), sizeof(uint16_t) * d);
      continue;
    }
    for (int i = 0; i < d; i += 32)  // d multiple of 32: whole pairs of vectors
      _mm512_storeu_si512(kb + j * dp + i / 2,
                          (__m512i)_mm512_cvtne2ps_pbh(load16(kv, j, d, i + 16, true), load16(kv, j, d, i, true)));
  }
  for (long jp = 0; jp < (n_all + 1) / 2; ++jp) {
    const bool odd = 2 * jp + 1 < n_all;
    for (int i = 0; i < d; i += 16) {
      const __m512 hi = odd ? load16(kv, 2 * jp + 1, d, i, false) : _mm512_setzero_ps();
      _mm512_storeu_si512(vp + jp * d + i, pair_rows(load16(kv, 2 * jp, d, i, false), hi));
    }
  }
  for (int q0 = 0; q0 < nq; q0 += 16) {
    const int lanes = nq - q0 < 16 ? nq - q0 : 16, first = ctx0 + q0, n = first + lanes - 1;
    // qp [pair][lane]: the tile's queries, scaled, as bf16 rows [lane][pair], then transposed
    uint32_t* qrows = pt;  // free until the probabilities are paired
    const __m512 sv = _mm512_set1_ps(scale);
    for (int l = 0; l < 16; ++l)
      for (int i = 0; i < d; i += 32) {
        const float* q = Q + (long)(q0 + l) * ldq + i;
        const __m512i v = l < lanes ? (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + 16), sv),
                                                                   _mm512_mul_ps(_mm512_loadu_ps(q), sv))
                                    : _mm512_setzero_si512();
        _mm512_storeu_si512(qrows + (long)l * dp + i / 2, v);
      }
    for (int p0 = 0; p0 < dp; p0 += 16) {
      __m512i col[16];
      transpose16x16(qrows + p0, dp, col);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(qp + (long)(p0 + i) * 16, col[i]);
    }
    __m512 acc[AR];
    for (int j = 0; j < n; j += AR) {
      const int rows = n - j < AR ? n - j : AR;
      dot_rows_any(rows, kb + (long)j * dp, dp, 1, qp, dp, acc);
      for (int r = 0; r < rows; ++r) _mm512_storeu_ps(st + (long)(j + r) * 16, acc[r]);
    }
    alignas(64) float inv_lanes[16];
    avx512::softmax_lanes16(st, n, first, lanes, probs ? probs + (long)q0 * ldp : nullptr, ldp, inv_lanes);
    const __m512 inv = _mm512_load_ps(inv_lanes);
    const int np = (n + 1) / 2;
    for (int jp = 0; jp < np; ++jp) {
      const __m512 hi = 2 * jp + 1 < n ? _mm512_loadu_ps(st + (2L * jp + 1) * 16) : _mm512_setzero_ps();
      _mm512_storeu_si512(pt + (long)jp * 16, pair_rows(_mm512_loadu_ps(st + 2L * jp * 16), hi));
    }
    alignas(64) float o[AR * 16];
    for (int i = 0; i < d; i += AR) {
      const int rows = d - i < AR ? d - i : AR;
      // out[l][i + r] = Σ_jp vp[jp][i + r] · pt[jp][l]
      dot_rows_any(rows, vp + i, 1, d, pt, np, acc);
      for (int r = 0; r < rows; ++r) _mm512_store_ps(o + r * 16, _mm512_mul_ps(acc[r], inv));
      for (int l = 0; l < lanes; ++l)
        for (int r = 0; r < rows; ++r) out[(long)(q0 + l) * ldo + i + r] = o[r * 16 + l];
    }
  }
}

}  // namespace gally
