// The prefill GEMM for int8 (Q8) and int4 (Q4, Q4K) weights: gemm_q_avx512.inl's layout and
// arithmetic in 8 lanes and 16 registers. The tokens are in the lanes; each group's steps (a row's
// weights broadcast) give exact integer dots, scaled into f32 sums as
// acc += (float(dot) · xs_token) · s_row (+ xsum_token · m_row for int4); every lane does the same
// operations, so a token's result does not depend on the rest of the batch.
//
// Two forms of the activations (for the including file's set, QGEMM_VNNI):
// - int8 weights: the int16 activations as they come, 16 steps per group of a row's int16 weight
//   pair; 256-bit vpdpwssd multiplies 16 pairs, twice an FMA's 8 floats. One Sapphire Rapids core
//   (128 tokens, 576 to 8192 inputs): 72-82 GMAC/s, against 40-54 through gemm.inl's f32 tiles.
//   Without VNNI, vpmaddwd + vpaddd (each add kept in its place: GCC would otherwise keep every
//   product and spill them): one core of the same CPU, 128-256 tokens and 576 to 4096 inputs,
//   65-70 GMAC/s against gemm.inl's 48-58.
// - int4 weights: each token's group requantized to int8 (its int16 values · 127 / ACT_INT16_MAX,
//   rounded; the scale · ACT_INT16_MAX / 127), and 8 steps per group of a row's four unsigned 4-bit
//   codes times four int8 values: with AVX-VNNI one vpdpbusd into int32; on AVX2 a vpmaddubsw, 32
//   products into 16 int16 sums that add up without saturating (8 · 2 · 15 · 127 < 2¹⁵), then one
//   vpmaddwd by ones into int32 a group. One core: AVX-VNNI 101-102 GMAC/s (72 on the int16
//   pairs); AVX2 83-94 against gemm.inl's 43-50.
//
// With 16 registers a tile is 6 rows × 2 vectors (12 dots + 2 activations + 1 weight), or 12 rows
// × 1 vector; for int4 4 × 2 or 8 × 1. The sums wait in memory between groups.
//
// The including file defines QGEMM_VNNI, dot_pairs (vpdpwssd where QGEMM_VNNI) and dot_quads
// (vpdpbusd where QGEMM_VNNI); and includes quant_kernels.inl (load_q8, q4k_row_scales,
// requant_group, byte_sums).

namespace qgemm {

#include "kernels/gemm_q_bytes.inl"

// 12 dots + 2 activations + 1 weight of 16 ymm. With bytes, 8 dots (+ each step's product on
// AVX2): 4 rows ran at 83-94 GMAC/s on AVX2 against 6's 75-85, and at 95-104 on AVX-VNNI against
// 6's 58-69.
template <bool INT4>
constexpr int ROWS_OF = INT4 ? 4 : 6;
constexpr int V = 2, TW = V * 8;
constexpr int CHUNK = 48;  // rows widened at a time, a multiple of R and 2R: the activations pass once per chunk
constexpr int KG = 16;     // groups per block: 16 · 16 · TW · 4 bytes = 16 KiB of activations
// Per group: the steps, each a 32-bit word of a row's weights broadcast against a word of each
// token's activations (int16 pairs, or int8 quads), and a weight's type once widened.
template <bool INT4>
constexpr int STEPS_OF = INT4 ? BYTE_STEPS : QGROUP / 2;
template <bool INT4>
using WeightOf = std::conditional_t<INT4, uint8_t, int16_t>;

// The activations of tokens [0, nt) (nt ≤ TW) in the tile layout: word p of group g of token j at
// xt[(g · STEPS + p) · TW + j], its scale and sum at st, mt[g · TW + j]; zero past nt. As bytes,
// requantized to int8 (gemm_q_bytes.inl).
template <bool INT4>
inline void pack_tile(const int16_t* xq, const float* xs, const float* xsum, int nt, int groups, int32_t* xt, float* st,
                      float* mt) {
  transpose_group_values(xs, xsum, nt, groups, TW, st, mt);
  if constexpr (INT4) {
    pack_tile_bytes(xq, nt, groups, TW, xt, st, mt);
  } else {
    const long words = long(groups) * STEPS_OF<false>;  // per token
    for (long k = 0; k < words; ++k)
      for (int j = 0; j < TW; ++j) {
        int32_t pair = 0;
        if (j < nt) std::memcpy(&pair, xq + (j * words + k) * 2, 4);
        xt[k * TW + j] = pair;
      }
  }
}

// out[i][v] (+)= row i's group dots with vector v's tokens over groups [0, ng), scaled. xt, st, mt
// at the block's first group; w at row 0 and the block's first weight (rows ldw apart); s, m the
// rows' scales and mins at the block's first group (rows lds apart).
template <bool Q4, int RR, int VV>
inline void tile(const int32_t* xt, const float* st, const float* mt, const WeightOf<Q4>* w, long ldw, const float* s,
                 const float* m, long lds, int ng, bool first, float* out) {
  constexpr int STEPS = STEPS_OF<Q4>;
  if (first)
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) _mm256_storeu_ps(out + i * TW + v * 8, _mm256_setzero_ps());
  for (int g = 0; g < ng; ++g) {
    __m256i dot[RR][VV];  // int32 sums, or int16 sums of byte products
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) dot[i][v] = _mm256_setzero_si256();
    const int32_t* x = xt + long(g) * STEPS * TW;
#pragma GCC unroll 16
    for (int p = 0; p < STEPS; ++p) {
      __m256i xv[VV];
      for (int v = 0; v < VV; ++v) xv[v] = _mm256_loadu_si256((const __m256i*)(x + p * TW + v * 8));
      for (int i = 0; i < RR; ++i) {
        int32_t word;
        std::memcpy(&word, w + i * ldw + long(g) * QGROUP + (QGROUP / STEPS) * p, 4);
        const __m256i wv = _mm256_set1_epi32(word);
        for (int v = 0; v < VV; ++v)
          if constexpr (!Q4) {
            dot[i][v] = dot_pairs(dot[i][v], wv, xv[v]);
            if constexpr (!QGEMM_VNNI) __asm__("" : "+x"(dot[i][v]));
          } else if constexpr (QGEMM_VNNI) {
            dot[i][v] = dot_quads(dot[i][v], wv, xv[v]);
          } else {
            dot[i][v] = _mm256_add_epi16(dot[i][v], _mm256_maddubs_epi16(wv, xv[v]));
            // in this order: GCC would otherwise reassociate the adds, keep all the products, and spill them
            __asm__("" : "+x"(dot[i][v]));
          }
      }
    }
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) {
        float* o = out + i * TW + v * 8;
        const __m256i d = Q4 && !QGEMM_VNNI ? _mm256_madd_epi16(dot[i][v], _mm256_set1_epi16(1)) : dot[i][v];
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(st + long(g) * TW + v * 8));
        __m256 acc = _mm256_fmadd_ps(scaled, _mm256_set1_ps(s[i * lds + g]), _mm256_loadu_ps(o));
        if (Q4) acc = _mm256_fmadd_ps(_mm256_loadu_ps(mt + long(g) * TW + v * 8), _mm256_set1_ps(m[i * lds + g]), acc);
        _mm256_storeu_ps(o, acc);
      }
  }
}

// tile<Q4, rows, vecs> for rows ≤ rows_for(vecs) and vecs ≤ V known at run time: one vector
// takes twice the rows, so that as many dots are in flight either way.
template <bool INT4>
constexpr int rows_for(int vecs) {
  return vecs == 1 ? 2 * ROWS_OF<INT4> : ROWS_OF<INT4>;
}
template <bool Q4, int RR, int VV>
inline void tile_rows(int rows, const int32_t* xt, const float* st, const float* mt, const WeightOf<Q4>* w, long ldw,
                      const float* s, const float* m, long lds, int ng, bool first, float* out) {
  if constexpr (RR > 1)
    if (rows < RR) return tile_rows<Q4, RR - 1, VV>(rows, xt, st, mt, w, ldw, s, m, lds, ng, first, out);
  tile<Q4, RR, VV>(xt, st, mt, w, ldw, s, m, lds, ng, first, out);
}

// A row's int8 groups [rg0, rg0 + groups) as int16, in order, into out.
inline void widen_row(const WeightsRef& W, long rg0, int groups, int16_t* out) {
  for (int g = 0; g < groups; ++g) {
    const Half16 h = load_q8((const int8_t*)W.data + (rg0 + g) * QGROUP);
    _mm256_storeu_si256((__m256i*)(out + g * QGROUP), h.lo);
    _mm256_storeu_si256((__m256i*)(out + g * QGROUP + 16), h.hi);
  }
}

template <DType T>
void gemm(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
          int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  constexpr bool Q4 = T != DType::Q8;  // int4 weights meet int8 activations
  constexpr int STEPS = STEPS_OF<Q4>, R = ROWS_OF<Q4>;
  using WeightT = WeightOf<Q4>;
  const int groups = n_in / QGROUP, tiles = (n_tok + TW - 1) / TW;
  const long lds = q4k_stride(groups);  // a row's scales, and at lds · CHUNK its mins
  static thread_local std::vector<int32_t> xt;
  static thread_local std::vector<float> fbuf;
  static thread_local std::vector<WeightT> wq;
  xt.resize(size_t(tiles) * groups * STEPS * TW);
  const size_t act = size_t(tiles) * groups * TW;
  fbuf.resize(2 * act + 2 * size_t(CHUNK) * lds + 2 * size_t(lds) + size_t(CHUNK) * TW);
  float *st = fbuf.data(), *mt = st + act, *s = mt + act, *m = s + size_t(CHUNK) * lds, *row_buf = m + CHUNK * lds;
  float* out = row_buf + 2 * lds;  // a chunk's rows × a tile's tokens
  wq.resize(size_t(CHUNK) * n_in);
  for (int tl = 0; tl < tiles; ++tl) {
    const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW;
    const long tg = long(t0) * groups;
    pack_tile<Q4>(xq + tg * QGROUP, xs + tg, Q4 ? xsum + tg : nullptr, nt, groups, xt.data() + tg * STEPS, st + tg,
                  mt + tg);
  }
  for (int c0 = r0; c0 < r1; c0 += CHUNK) {
    const int rows = r1 - c0 < CHUNK ? r1 - c0 : CHUNK;
    for (int i = 0; i < rows; ++i) {  // the chunk's weights widened and its scales (and mins) in f32
      const long r = c0 + i, rg = r * groups;
      if constexpr (Q4) widen_row_codes(W, rg, groups, wq.data() + long(i) * n_in);
      else widen_row(W, rg, groups, wq.data() + long(i) * n_in);
      float *si = s + i * lds, *mi = m + i * lds;
      if (T == DType::Q4K) {
        const float* fs = q4k_row_scales(W, groups, r, row_buf);
        std::memcpy(si, fs, sizeof(float) * groups);
        std::memcpy(mi, fs + q4k_stride(groups), sizeof(float) * groups);
      } else {
        for (int g = 0; g < groups; ++g) {
          si[g] = f16_to_f32(W.scales[rg + g]);
          if (Q4) mi[g] = f16_to_f32(W.mins[rg + g]);
        }
      }
    }
    for (int tl = 0; tl < tiles; ++tl) {
      const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW, vecs = (nt + 7) / 8, step = rows_for<Q4>(vecs);
      const long tg = long(t0) * groups;
      for (int g0 = 0; g0 < groups; g0 += KG) {
        const int ng = groups - g0 < KG ? groups - g0 : KG;
        for (int i = 0; i < rows; i += step) {
          const int n = rows - i < step ? rows - i : step;
          const int32_t* x = xt.data() + tg * STEPS + long(g0) * STEPS * TW;
          const WeightT* wi = wq.data() + long(i) * n_in + long(g0) * QGROUP;
          const float *sg = s + i * lds + g0, *mg = m + i * lds + g0;
          if (vecs == 1)
            tile_rows<Q4, 2 * R, 1>(n, x, st + tg + g0 * TW, mt + tg + g0 * TW, wi, n_in, sg, mg, lds, ng, g0 == 0,
                                    out + i * TW);
          else
            tile_rows<Q4, R, 2>(n, x, st + tg + g0 * TW, mt + tg + g0 * TW, wi, n_in, sg, mg, lds, ng, g0 == 0,
                                out + i * TW);
        }
      }
      store_tile(out, TW, rows, nt, b ? b + c0 : nullptr, y + long(t0) * ldy + c0, ldy, accumulate);
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
