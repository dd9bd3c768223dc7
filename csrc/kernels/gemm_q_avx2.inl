// The prefill GEMM for int8 and int4 (Q4, Q4K) weights with AVX-VNNI: gemm_q_avx512.inl's
// layout and arithmetic in 8 lanes and 16 registers. The tokens are in the lanes; each group's 16
// vpdpwssd steps (a row's int16 weight pair broadcast) give exact integer dots, scaled into f32
// sums as acc += (float(dot) · xs_token) · s_row (+ xsum_token · m_row for int4); every lane does
// the same operations, so a token's result does not depend on the rest of the batch.
//
// With 16 registers a tile is 6 rows × 2 vectors (12 dots + 2 activations + 1 weight), or 12 rows
// × 1 vector; the sums wait in memory between groups. vpdpwssd on 256 bits multiplies 16 pairs,
// twice an FMA's 8 floats. Measured on one Sapphire Rapids core (128 tokens, int8 and int4 weights
// of 576 to 8192 inputs): 72-82 GMAC/s, against 40-54 through gemm.inl's f32 tiles. AVX2 without
// VNNI (vpmaddwd + vpaddd) only matches the FMA's rate, and this kernel then ran at 40 GMAC/s
// against gemm.inl's 45-54: the "avx2" set keeps gemm.inl.
//
// The including file (kernels_avx2vnni.cpp) defines dot_pairs (vpdpwssd) and includes
// quant_kernels.inl (load_q8, load_q4, q4k_row_scales).

namespace qgemm {

constexpr int R = 6, V = 2, TW = V * 8;  // 12 dots + 2 activations + 1 weight of 16 ymm
constexpr int CHUNK = 48;  // rows widened at a time, a multiple of R and 2R: the activations pass once per chunk
constexpr int KG = 16;     // groups per block: 16 · 16 · TW · 4 bytes = 16 KiB of activations

// The activations of tokens [0, nt) (nt ≤ TW) in the tile layout: pair p of group g of token j at
// xt[(g · 16 + p) · TW + j], its scale and sum at st, mt[g · TW + j]; zero past nt.
inline void pack_tile(const int16_t* xq, const float* xs, const float* xsum, int nt, int groups, int32_t* xt, float* st,
                      float* mt) {
  const long words = long(groups) * (QGROUP / 2);  // int32 pairs per token
  for (long k = 0; k < words; ++k)
    for (int j = 0; j < TW; ++j) {
      int32_t pair = 0;
      if (j < nt) std::memcpy(&pair, xq + (j * words + k) * 2, 4);
      xt[k * TW + j] = pair;
    }
  transpose_group_values(xs, xsum, nt, groups, TW, st, mt);
}

// out[i][v] (+)= row i's group dots with vector v's tokens over groups [0, ng), scaled. xt, st, mt
// at the block's first group; w at row 0 and the block's first weight (rows ldw apart); s, m the
// rows' scales and mins at the block's first group (rows lds apart).
template <bool Q4, int RR, int VV>
inline void tile(const int32_t* xt, const float* st, const float* mt, const int16_t* w, long ldw, const float* s,
                 const float* m, long lds, int ng, bool first, float* out) {
  if (first)
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) _mm256_storeu_ps(out + i * TW + v * 8, _mm256_setzero_ps());
  for (int g = 0; g < ng; ++g) {
    __m256i dot[RR][VV];
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) dot[i][v] = _mm256_setzero_si256();
    const int32_t* x = xt + long(g) * 16 * TW;
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      __m256i xv[VV];
      for (int v = 0; v < VV; ++v) xv[v] = _mm256_loadu_si256((const __m256i*)(x + p * TW + v * 8));
      for (int i = 0; i < RR; ++i) {
        int32_t pair;
        std::memcpy(&pair, w + i * ldw + long(g) * QGROUP + 2 * p, 4);
        const __m256i wv = _mm256_set1_epi32(pair);
        for (int v = 0; v < VV; ++v) dot[i][v] = dot_pairs(dot[i][v], wv, xv[v]);
      }
    }
    for (int i = 0; i < RR; ++i)
      for (int v = 0; v < VV; ++v) {
        float* o = out + i * TW + v * 8;
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot[i][v]), _mm256_loadu_ps(st + long(g) * TW + v * 8));
        __m256 acc = _mm256_fmadd_ps(scaled, _mm256_set1_ps(s[i * lds + g]), _mm256_loadu_ps(o));
        if (Q4) acc = _mm256_fmadd_ps(_mm256_loadu_ps(mt + long(g) * TW + v * 8), _mm256_set1_ps(m[i * lds + g]), acc);
        _mm256_storeu_ps(o, acc);
      }
  }
}

// tile<Q4, rows, vecs> for rows ≤ rows_for(vecs) and vecs ≤ V known at run time: one vector takes
// twice the rows, so that 12 dots are in flight either way.
constexpr int rows_for(int vecs) { return vecs == 1 ? 2 * R : R; }
template <bool Q4, int RR, int VV>
inline void tile_rows(int rows, const int32_t* xt, const float* st, const float* mt, const int16_t* w, long ldw,
                      const float* s, const float* m, long lds, int ng, bool first, float* out) {
  if constexpr (RR > 1)
    if (rows < RR) return tile_rows<Q4, RR - 1, VV>(rows, xt, st, mt, w, ldw, s, m, lds, ng, first, out);
  tile<Q4, RR, VV>(xt, st, mt, w, ldw, s, m, lds, ng, first, out);
}

template <DType T>
void gemm(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
          int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  constexpr bool Q4 = T != DType::Q8;
  const int groups = n_in / QGROUP, tiles = (n_tok + TW - 1) / TW;
  const long lds = q4k_stride(groups);  // a row's scales, and at lds · CHUNK its mins
  static thread_local std::vector<int32_t> xt;
  static thread_local std::vector<float> fbuf;
  static thread_local std::vector<int16_t> wq;
  xt.resize(size_t(tiles) * groups * 16 * TW);
  const size_t act = size_t(tiles) * groups * TW;
  fbuf.resize(2 * act + 2 * size_t(CHUNK) * lds + 2 * size_t(lds) + size_t(CHUNK) * TW);
  float *st = fbuf.data(), *mt = st + act, *s = mt + act, *m = s + size_t(CHUNK) * lds, *row_buf = m + CHUNK * lds;
  float* out = row_buf + 2 * lds;  // a chunk's rows × a tile's tokens
  wq.resize(size_t(CHUNK) * n_in);
  for (int tl = 0; tl < tiles; ++tl) {
    const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW;
    const long tg = long(t0) * groups;
    pack_tile(xq + tg * QGROUP, xs + tg, Q4 ? xsum + tg : nullptr, nt, groups, xt.data() + tg * 16, st + tg, mt + tg);
  }
  for (int c0 = r0; c0 < r1; c0 += CHUNK) {
    const int rows = r1 - c0 < CHUNK ? r1 - c0 : CHUNK;
    for (int i = 0; i < rows; ++i) {  // the chunk's weights in int16 and its scales (and mins) in f32
      const long r = c0 + i, rg = r * groups;
      int16_t* wr = wq.data() + long(i) * n_in;
      for (int g = 0; g < groups; ++g) {
        const Half16 h = Q4 ? load_q4((const uint8_t*)W.data + (rg + g) * (QGROUP / 2))
                            : load_q8((const int8_t*)W.data + (rg + g) * QGROUP);
        _mm256_storeu_si256((__m256i*)(wr + g * QGROUP), h.lo);
        _mm256_storeu_si256((__m256i*)(wr + g * QGROUP + 16), h.hi);
      }
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
      const int t0 = tl * TW, nt = n_tok - t0 < TW ? n_tok - t0 : TW, vecs = (nt + 7) / 8, step = rows_for(vecs);
      const long tg = long(t0) * groups;
      for (int g0 = 0; g0 < groups; g0 += KG) {
        const int ng = groups - g0 < KG ? groups - g0 : KG;
        for (int i = 0; i < rows; i += step) {
          const int n = rows - i < step ? rows - i : step;
          const int32_t* x = xt.data() + tg * 16 + long(g0) * 16 * TW;
          const int16_t* wi = wq.data() + long(i) * n_in + long(g0) * QGROUP;
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
