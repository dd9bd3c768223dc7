// Prefill GEMM with the BF16 extension's bfdot (+bf16, Armv8.6: Apple M2 and later, Graviton 3,
// Neoverse V1/N2): each instruction multiplies 4 lanes of bf16 pairs (two consecutive k) into f32
// sums, twice the work of an f32 FMA. As kernels_avx512bf16.cpp on x86: it serves bf16 weights and
// int8/int4 weights (dequantized a chunk of rows at a time and rounded to bf16) for batches of
// GEMM_MIN_TOKENS or more, with the activations rounded to bf16 too; sums stay f32. Decode steps,
// f32 and f16 weights take kernels_neon's exact path. Compiled with +bf16 (and +dotprod: the
// "neonbf16" set builds on "neondot", isa.cpp).
//
// Layout: gemm.inl's, tokens in the lanes, with a pair of k per 32-bit lane. Each weight row is
// read 4 pairs (8 bf16) at a time, and bfdot's lane form applies one pair of that register to a
// vector of activation pairs: xt[tile][pair][TW] against W[row][pair], pairs padded to a multiple
// of 4 with zeros.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace neonbf16 {
namespace {

constexpr int RB = 8, TV = 2, TW = TV * 4;  // 16 accumulators + 8 activation vectors + 1 weight vector
constexpr int CHUNK = 64;                   // weight rows rounded to bf16 at a time

int padded_pairs(int n_in) { return ((n_in + 1) / 2 + 3) / 4 * 4; }

// x [n] f32 → bf16, rounding to nearest even.
void to_bf16(const float* x, uint16_t* out, long n) {
  long i = 0;
  for (; i + 8 <= n; i += 8) {
    const bfloat16x8_t v = vcvtq_high_bf16_f32(vcvtq_low_bf16_f32(vld1q_f32(x + i)), vld1q_f32(x + i + 4));
    vst1q_u16(out + i, vreinterpretq_u16_bf16(v));
  }
  for (; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}

// xt[(tile · pp + p) · TW + j] = the bf16 pair (x[t, 2p], x[t, 2p+1]) of token t = tile·TW + j,
// zero past n_tok and past n_in.
void pack_tokens(const float* x, int n_tok, int n_in, uint32_t* xt) {
  const int pp = padded_pairs(n_in), tiles = (n_tok + TW - 1) / TW;
  std::vector<uint32_t> rows(size_t(TW) * pp);
  for (int tile = 0; tile < tiles; ++tile) {
    const int t0 = tile * TW, nt = std::min(TW, n_tok - t0);
    std::fill(rows.begin(), rows.end(), 0u);
    for (int j = 0; j < nt; ++j) to_bf16(x + long(t0 + j) * n_in, (uint16_t*)(rows.data() + long(j) * pp), n_in);
    uint32_t* dst = xt + long(tile) * pp * TW;
    for (int p = 0; p < pp; ++p)
      for (int j = 0; j < TW; ++j) dst[long(p) * TW + j] = rows[long(j) * pp + p];
  }
}

// Rows [r0, r1) of a bf16, int8 or int4 matrix as bf16 rows of 2·pp elements, zero-padded.
void rows_to_bf16(const WeightsRef& W, int n_in, int r0, int r1, int pp, uint16_t* out) {
  const long groups = n_in / QGROUP;
  for (long r = r0; r < r1; ++r, out += 2L * pp) {
    std::fill(out + n_in, out + 2L * pp, uint16_t(0));
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

// out[i][j] = Σ_p W[i, 2p..2p+1] · xt[p][j] for R rows (ldw bf16 apart) and V vectors of a tile.
template <int R, int V>
inline void tile(const uint32_t* xt, const uint16_t* W, long ldw, int pp, float* out) {
  float32x4_t acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = vdupq_n_f32(0.0f);
  for (int p = 0; p < pp; p += 4) {
    bfloat16x8_t xv[4][V];
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < V; ++v) xv[q][v] = vreinterpretq_bf16_u32(vld1q_u32(xt + long(p + q) * TW + 4 * v));
    for (int i = 0; i < R; ++i) {
      const bfloat16x8_t w = vreinterpretq_bf16_u16(vld1q_u16(W + i * ldw + 2 * p));  // pairs p … p + 3
      for (int v = 0; v < V; ++v) {
        acc[i][v] = vbfdotq_laneq_f32(acc[i][v], xv[0][v], w, 0);
        acc[i][v] = vbfdotq_laneq_f32(acc[i][v], xv[1][v], w, 1);
        acc[i][v] = vbfdotq_laneq_f32(acc[i][v], xv[2][v], w, 2);
        acc[i][v] = vbfdotq_laneq_f32(acc[i][v], xv[3][v], w, 3);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) vst1q_f32(out + i * TW + 4 * v, acc[i][v]);
}

template <int R = RB, int V = TV>
inline void tile_any(int rows, int vecs, const uint32_t* xt, const uint16_t* W, long ldw, int pp, float* out) {
  if constexpr (R > 1)
    if (rows < R) return tile_any<R - 1, V>(rows, vecs, xt, W, ldw, pp, out);
  if constexpr (V > 1)
    if (vecs < V) return tile_any<R, V - 1>(rows, vecs, xt, W, ldw, pp, out);
  tile<R, V>(xt, W, ldw, pp, out);
}

void gemm_packed(const uint32_t* xt, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy,
                 int r0, int r1, bool accumulate) {
  static thread_local std::vector<uint16_t> wbuf;
  const int pp = padded_pairs(n_in), tiles = (n_tok + TW - 1) / TW;
  const long ldw = 2L * pp;
  wbuf.resize(size_t(CHUNK) * ldw);
  float out[RB * TW];
  for (int c0 = r0; c0 < r1; c0 += CHUNK) {
    const int c1 = std::min(c0 + CHUNK, r1);
    rows_to_bf16(W, n_in, c0, c1, pp, wbuf.data());
    for (int tl = 0; tl < tiles; ++tl) {
      const int t0 = tl * TW, nt = std::min(TW, n_tok - t0), vecs = (nt + 3) / 4;
      for (int r = c0; r < c1; r += RB) {
        const int rows = std::min(RB, c1 - r);
        tile_any(rows, vecs, xt + long(tl) * pp * TW, wbuf.data() + (r - c0) * ldw, ldw, pp, out);
        store_tile(out, TW, rows, nt, b ? b + r : nullptr, y + long(t0) * ldy + r, ldy, accumulate);
      }
    }
  }
}

bool takes_bf16_gemm(const WeightsRef& W, int n_tok) {
  return n_tok >= GEMM_MIN_TOKENS && (W.dtype == DType::BF16 || is_quantized(W.dtype));
}

}  // namespace

void matmul_many(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count) {
  static thread_local std::vector<uint32_t> xt;
  bool packed = false;  // the input laid out on the first matrix that takes bfdot
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (!takes_bf16_gemm(o.W, n_tok)) {
      kernels_neon.matmul(x, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
      continue;
    }
    if (!packed) {
      xt.resize(size_t((n_tok + TW - 1) / TW) * padded_pairs(n_in) * TW);
      pack_tokens(x, n_tok, n_in, xt.data());
      packed = true;
    }
    gemm_packed(xt.data(), o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

void matmul(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
            bool accumulate) {
  const MatmulOut out{W, b, y, ldy, r0, r1, accumulate};
  matmul_many(x, n_tok, n_in, &out, 1);
}

}  // namespace neonbf16
}  // namespace gally
