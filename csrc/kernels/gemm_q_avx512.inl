// The prefill GEMM for int8 and int4 (Q4, Q4K) weights on AVX-512, laid out as gemm.inl lays out
// the f32 GEMM, with the tokens in the lanes: int8 weights on the row-wise kernels' int16
// activations (exact integer group dots, f32 sums; kernels.h), int4 weights on those activations
// requantized to int8.
//
// Why not gemm.inl's way (weights dequantized to f32 or rounded to bf16, then FMAs): a vpdpwssd
// multiplies 32 int16 pairs at the FMA's rate, where an FMA multiplies 16 floats, and a vpdpbusd 64
// byte products; on Sapphire Rapids vdpbf16ps (32 bf16 products) issues at a quarter of that rate
// (measured per core: 1.7 G against 6.8 G FMAs or 6.4 G vpdpwssd a second). One thread, 128 tokens
// × 2048 × 2048 int8: 50 GMAC/s through vdpbf16ps, 110 here; int4 154-173 (95-106 on int16).
//
// - The activations are transposed per call into tiles of TW tokens: words (int16 pairs, or for
//   int4 int8 quads) xt[tile][g][p][TW], scales st[tile][g][TW], sums mt[tile][g][TW]. An int4
//   group's int8 values are its int16 values · 127 / ACT_INT16_MAX rounded to even, its scale
//   · ACT_INT16_MAX / 127, its sum that of the int8 values (gemm_q_bytes.inl says why): perplexity
//   of SmolLM2 (GPL text, ctx 512) int4 18.244 → 18.271; on weights off the 4-bit grid, KLD
//   against f32 +1.3% (bench/quant_quality.py), for 1.3-1.45× the int4 prefill.
// - The weights are widened a chunk of 64 rows at a time (wq[row], in memory order within a
//   group: int8 as int16 (load_group32), int4's codes as bytes (widen_row_codes)), with their
//   scales (and int4 mins) group-major per block of 16 rows from tile_scales (quant_rows_avx512.inl).
// - A register tile of R rows × V vectors of tokens: for each group, 16 vpdpwssd steps (int4: 8
//   vpdpbusd, the codes unsigned, the activations signed) with a row's word broadcast give R·V
//   integer dots in int32 lanes; each is then converted and added to its f32 sum as
//   acc += (float(dot) · xs_token) · s_row (+ xsum_token · m_row for int4). Every lane does the
//   same operations in the same order, so a token's result does not depend on the other tokens of
//   the batch (nor on the tile it lands in).
// - The groups run in blocks of KG, whose activations stay in L1 while the chunk's rows pass over
//   them; the partial sums wait in a chunk × tile buffer (int4's smaller tiles keep them in
//   registers across the block).
//
// The including file defines dot_pairs16 (vpdpwssd) and includes quant_rows_avx512.inl.

namespace qgemm {

constexpr int R = 8, V = 3, TW = V * 16;  // 24 dots + 3 activations + 1 weight of 32 zmm
constexpr int KG = 8;                     // groups per block: 8 · 16 · TW · 4 bytes = 24 KiB of activations
// Blocks of 16 rows widened at a time: the activations (2.4 MB for 128 tokens of 8192 inputs) pass
// once per chunk, so a bigger chunk reads them less often (8192-input rows, 64 rather than 16: +10%).
constexpr int CHUNK_BLOCKS = 4;

#include "kernels/gemm_q_bytes.inl"

// Steps per group: a 32-bit word of a row's weights broadcast against a word of each token's
// activations, int16 pairs (vpdpwssd) or, for int4 weights, int8 quads (vpdpbusd).
template <bool INT4>
constexpr int STEPS = INT4 ? BYTE_STEPS : QGROUP / 2;

// The activations of tokens [t0, t0 + nt) (nt ≤ TW) in the tile layout, zero past nt; for int4,
// requantized to int8 (gemm_q_bytes.inl).
template <bool INT4>
inline void pack_tile(const int16_t* xq, const float* xs, const float* xsum, int nt, int groups, int32_t* xt, float* st,
                      float* mt) {
  transpose_group_values(xs, xsum, nt, groups, TW, st, mt);
  if constexpr (INT4) return pack_tile_bytes(xq, nt, groups, TW, xt, st, mt);
  const long words = long(groups) * (QGROUP / 2);  // int32 pairs per token
  alignas(64) int32_t rows[16 * 16];
  for (int j0 = 0; j0 < TW; j0 += 16)
    for (int g = 0; g < groups; ++g) {
      for (int j = 0; j < 16; ++j) {
        int32_t* row = rows + j * 16;
        if (j0 + j < nt) std::memcpy(row, (const int32_t*)xq + (j0 + j) * words + long(g) * 16, 64);
        else std::memset(row, 0, 64);
      }
      __m512i col[16];
      transpose16x16(rows, 16, col);
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(xt + (long(g) * 16 + p) * TW + j0, col[p]);
    }
}

// acc[i][v] (+)= Σ over groups [0, ng) of row i's group dots with vector v's tokens, scaled.
// xt, st, mt at the block's first group; w at row 0 and the block's first weight (rows ldw bytes
// apart; int8 as int16, int4 as its 4-bit codes in bytes); s, m the rows' scales and mins group-major
// at the block's first group (16 a group).
template <bool Q4, int RR, int VV>
inline void tile(const int32_t* xt, const float* st, const float* mt, const char* w, long ldw, const float* s,
                 const float* m, int ng, bool first, float* out) {
  constexpr int S = STEPS<Q4>;
  constexpr long GROUP_BYTES = 4 * S;
  // int4's tiles are small enough (rows_for) for their sums to stay in registers across the
  // groups; int8's wait in out, as the dots need the registers.
  __m512 sum[RR][VV];
  for (int i = 0; i < RR; ++i)
    for (int v = 0; v < VV; ++v) {
      float* o = out + i * TW + v * 16;
      if constexpr (Q4) sum[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o);
      else if (first) _mm512_storeu_ps(o, _mm512_setzero_ps());
    }
  for (int g = 0; g < ng; ++g) {
    __m512i dot[RR][VV];
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) dot[i][v] = _mm512_setzero_si512();
    const int32_t* x = xt + long(g) * S * TW;
#pragma GCC unroll 16
    for (int p = 0; p < S; ++p) {
      __m512i xv[VV];
      for (int v = 0; v < VV; ++v) xv[v] = _mm512_loadu_si512(x + p * TW + v * 16);
      for (int i = 0; i < RR; ++i) {
        int32_t word;
        std::memcpy(&word, w + i * ldw + g * GROUP_BYTES + 4 * p, 4);
        const __m512i wv = _mm512_set1_epi32(word);
        for (int v = 0; v < VV; ++v)
          dot[i][v] = Q4 ? _mm512_dpbusd_epi32(dot[i][v], wv, xv[v]) : dot_pairs16(dot[i][v], wv, xv[v]);
      }
    }
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) {
        float* o = out + i * TW + v * 16;
        const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][v]), _mm512_loadu_ps(st + long(g) * TW + v * 16));
        const __m512 acc = _mm512_fmadd_ps(scaled, _mm512_set1_ps(s[g * 16 + i]), Q4 ? sum[i][v] : _mm512_loadu_ps(o));
        if constexpr (Q4)
          sum[i][v] = _mm512_fmadd_ps(_mm512_loadu_ps(mt + long(g) * TW + v * 16), _mm512_set1_ps(m[g * 16 + i]), acc);
        else _mm512_storeu_ps(o, acc);
      }
  }
  if constexpr (Q4)
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) _mm512_storeu_ps(out + i * TW + v * 16, sum[i][v]);
}

// tile<Q4, rows, vecs> for rows ≤ rows_for(vecs) and vecs ≤ V known at run time: a tile of fewer
// vectors takes more rows, so that enough dots are in flight (vpdpwssd's latency is 5 cycles): R
// for 2 vectors, 16 for 1. Both divide 16, so that a tile lies in one block of scales and no tile
// of few rows is left over.
template <bool Q4, int RR, int VV>
inline void tile_rows(int rows, const int32_t* xt, const float* st, const float* mt, const char* w, long ldw,
                      const float* s, const float* m, int ng, bool first, float* out) {
  if constexpr (RR > 1)
    if (rows < RR) return tile_rows<Q4, RR - 1, VV>(rows, xt, st, mt, w, ldw, s, m, ng, first, out);
  tile<Q4, RR, VV>(xt, st, mt, w, ldw, s, m, ng, first, out);
}
// int4: 4 rows (8 for one vector), so that dots and sums fit the registers.
constexpr int rows_for(bool int4, int vecs) { return int4 ? (vecs == 1 ? 8 : 4) : vecs == 1 ? 16 : R; }
template <bool Q4, int VV = V>
inline void tile_any(int rows, int vecs, const int32_t* xt, const float* st, const float* mt, const char* w, long ldw,
                     const float* s, const float* m, int ng, bool first, float* out) {
  if constexpr (VV > 1)
    if (vecs < VV) return tile_any<Q4, VV - 1>(rows, vecs, xt, st, mt, w, ldw, s, m, ng, first, out);
  tile_rows<Q4, rows_for(Q4, VV), VV>(rows, xt, st, mt, w, ldw, s, m, ng, first, out);
}

// y[j, r + i] (+)= out[i · TW + j] + b[r + i] for rows i < rows (≤ 16) and tokens j < nt: 16 × 16
// blocks transposed in registers, each token's rows stored as one masked vector (out holds 16 rows:
// those past `rows` are read, and masked off).
inline void store_chunk(const float* out, int rows, int nt, const float* b, float* y, long ldy, bool accumulate) {
  const __mmask16 lanes = __mmask16((1u << rows) - 1);
  const __m512 bias = b ? _mm512_maskz_loadu_ps(lanes, b) : _mm512_setzero_ps();
  for (int j0 = 0; j0 < nt; j0 += 16) {
    __m512i col[16];
    transpose16x16(out + j0, TW, col);
    for (int c = 0; c < 16 && j0 + c < nt; ++c) {
      float* yj = y + long(j0 + c) * ldy;
      __m512 v = _mm512_add_ps(_mm512_castsi512_ps(col[c]), bias);
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, yj));
      _mm512_mask_storeu_ps(yj, lanes, v);
    }
  }
}

// A row's int8 groups [rg0, rg0 + groups) as int16 in memory order (load_group32's), into out.
inline void widen_row(const WeightsRef& W, long rg0, int groups, int16_t* out) {
  for (int g = 0; g < groups; ++g) _mm512_storeu_si512(out + g * QGROUP, load_group32(W, rg0 + g));
}

template <DType T>
void gemm(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
          int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  constexpr bool Q4 = T != DType::Q8;  // int4 weights meet int8 activations
  constexpr int S = STEPS<Q4>;
  constexpr long GROUP_BYTES = 4 * S;
  const int groups = n_in / QGROUP, pad = (groups + 15) / 16 * 16, tiles = (n_tok + TW - 1) / TW;
  const long ldw = groups * GROUP_BYTES;  // a widened row's bytes
  static thread_local std::vector<int32_t> xt;
  static thread_local std::vector<float> fbuf;
  static thread_local std::vector<char> wq;  // the chunk's rows widened: int8 as int16, int4 as bytes
  xt.resize(size_t(tiles) * groups * S * TW);
  const size_t act = size_t(tiles) * groups * TW, scales = size_t(pad) * 16;  // scales: a block of 16 rows'
  fbuf.resize(2 * act + 2 * CHUNK_BLOCKS * scales + size_t(tile_rows_floats(groups)) + CHUNK_BLOCKS * 16 * TW);
  float *st = fbuf.data(), *mt = st + act, *s = mt + act, *m = s + CHUNK_BLOCKS * scales;
  float* row_buf = m + CHUNK_BLOCKS * scales;
  float* out = row_buf + tile_rows_floats(groups);  // a chunk's rows × a tile's tokens
  wq.resize(size_t(CHUNK_BLOCKS) * 16 * ldw);
  char* wb = wq.data();
  for (int tl = 0; tl < tiles; ++tl) {
    const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW;
    const long tg = long(t0) * groups;
    pack_tile<Q4>(xq + tg * QGROUP, xs + tg, Q4 ? xsum + tg : nullptr, nt, groups, xt.data() + tg * S,
                  st + size_t(tl) * groups * TW, mt + size_t(tl) * groups * TW);
  }
  for (int c0 = r0; c0 < r1; c0 += CHUNK_BLOCKS * 16) {
    const int rows = r1 - c0 < CHUNK_BLOCKS * 16 ? r1 - c0 : CHUNK_BLOCKS * 16, blocks = (rows + 15) / 16;
    for (int bl = 0; bl < blocks; ++bl)
      tile_scales<T>(W, groups, c0 + 16 * bl, rows - 16 * bl < 16 ? rows - 16 * bl : 16, s + bl * scales,
                     m + bl * scales, row_buf);
    for (int i = 0; i < rows; ++i)
      if constexpr (Q4) widen_row_codes(W, long(c0 + i) * groups, groups, (uint8_t*)(wb + i * ldw));
      else widen_row(W, long(c0 + i) * groups, groups, (int16_t*)(wb + i * ldw));
    for (int tl = 0; tl < tiles; ++tl) {
      const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW, vecs = (nt + 15) / 16, step = rows_for(Q4, vecs);
      const int32_t* xtile = xt.data() + long(t0) * groups * S;
      const float *stile = st + long(t0) * groups, *mtile = mt + long(t0) * groups;
      for (int g0 = 0; g0 < groups; g0 += KG) {
        const int ng = groups - g0 < KG ? groups - g0 : KG;
        for (int i = 0; i < rows; i += step) {  // a tile's rows lie in one block of 16: step divides 16
          const long sg = (i / 16) * scales + long(g0) * 16 + i % 16;
          tile_any<Q4>(rows - i < step ? rows - i : step, vecs, xtile + long(g0) * S * TW, stile + long(g0) * TW,
                       mtile + long(g0) * TW, wb + i * ldw + g0 * GROUP_BYTES, ldw, s + sg, m + sg, ng, g0 == 0,
                       out + i * TW);
        }
      }
      for (int bl = 0; bl < blocks; ++bl) {
        const int r = 16 * bl;
        store_chunk(out + r * TW, rows - r < 16 ? rows - r : 16, nt, b ? b + c0 + r : nullptr,
                    y + long(t0) * ldy + c0 + r, ldy, accumulate);
      }
    }
  }
}

}  // namespace qgemm

void gemm_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
            int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  switch (W.dtype) {
    case DType::Q8: return qgemm::gemm<DType::Q8>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    case DType::Q4: return qgemm::gemm<DType::Q4>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    case DType::Q4K: return qgemm::gemm<DType::Q4K>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    default: return;
  }
}
