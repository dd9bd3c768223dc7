// The prefill GEMM, written once over the vector type S like simd_kernels.inl: y = x · Wᵀ for a
// batch of tokens, with the tokens in the lanes.
//
// The activations are transposed once per call into tiles of TW = GEMM_VECS·N tokens,
// xt[tile][k][TW] (padded with zeros). A register tile then holds GEMM_ROWS rows × TW tokens:
// for each k it loads GEMM_VECS activation vectors and broadcasts one weight per row, so every
// load feeds several FMAs and no horizontal sum is ever needed. f32 weights are read in place;
// other formats are dequantized (exactly, to f32) one chunk of rows at a time into a buffer that
// stays in cache while every token tile passes over it. A tile's k runs in blocks whose
// activations stay in L1 while all the chunk's rows pass over them (partial sums kept in a
// chunk × tile buffer), and the finished chunk × tile is transposed N × N in registers on its way
// to y, whose rows are tokens. Measured on SmolLM2's 512 × 576 × 1536 (AVX2, one thread): 79 →
// 98 GFLOP/s for f32, 60 → 98 for int8; AVX-512 129 → 148.
//
// S provides GEMM_ROWS, GEMM_VECS, transpose and dequantize_group besides the members
// simd_kernels.inl uses; the
// including file includes <algorithm>, <cstring>, <vector> and kernels/common.h.

namespace gemm {

constexpr int RB = S::GEMM_ROWS, TV = S::GEMM_VECS, TW = TV * S::N;
constexpr int CHUNK = 64;      // rows dequantized at a time: 64 × n_in floats stay in L2
constexpr int KB = 6144 / TW;  // k per block at most: its KB × TW activations (24 KiB) stay in L1

// Tile `tile` of n_tok tokens: [t0, t0 + nt). Tiles of TW tokens, but where the last would hold
// one vector after a full tile, those two split their tokens into two tiles of about equal
// vectors (AVX-512: 64 + 16 → 48 + 32, AVX2: 24 + 8 → 16 + 16): a tile of one vector ran at half
// the rate (bf16 2048 × 8192, one thread, 64 tokens as 48 + 16: 37 GMAC/s against 46 for 48
// tokens). A token's sums do not depend on its tile.
inline void tile_span(int tile, int n_tok, int* t0, int* nt) {
  const int tiles = (n_tok + TW - 1) / TW, last = n_tok - (tiles - 1) * TW;
  *t0 = tile * TW;
  *nt = n_tok - *t0 < TW ? n_tok - *t0 : TW;
  if (TV < 2 || tiles < 2 || last > S::N || tile < tiles - 2) return;
  const int both = TW + last, first = (both / 2 + S::N - 1) / S::N * S::N;
  if (tile == tiles - 2) *nt = first;
  else *t0 -= TW - first, *nt = both - first;
}

// xt[(tile · n_in + k) · TW + j] = x[t0 + j, k] for tile_span's tiles, zero past each tile's nt: a
// tile's rows copied into a zero-padded block, then transposed N × N at a time.
inline void pack_tokens(const float* x, int n_tok, int n_in, float* xt) {
  const int tiles = (n_tok + TW - 1) / TW, padded = (n_in + S::N - 1) / S::N * S::N;
  static thread_local std::vector<float> rows;
  rows.assign(size_t(TW) * padded, 0.0f);
  for (int tile = 0; tile < tiles; ++tile) {
    int t0, nt;
    tile_span(tile, n_tok, &t0, &nt);
    for (int j = 0; j < nt; ++j)
      std::memcpy(rows.data() + (long)j * padded, x + (long)(t0 + j) * n_in, sizeof(float) * n_in);
    if (nt < TW) std::fill(rows.begin() + (long)nt * padded, rows.end(), 0.0f);
    float* dst = xt + (long)tile * n_in * TW;
    V col[S::N];
    for (int k0 = 0; k0 < n_in; k0 += S::N)
      for (int j0 = 0; j0 < TW; j0 += S::N) {
        S::transpose(rows.data() + (long)j0 * padded + k0, padded, col);
        for (int c = 0; c < S::N && k0 + c < n_in; ++c) S::store(dst + (long)(k0 + c) * TW + j0, col[c]);
      }
  }
}

// out[i][j] (+)= Σ_k W[i, k] · xt[k][j] for k in [0, kn), R rows (ldw apart) and the first V
// vectors of a tile; `first`: start from zero rather than from out.
template <int R, int V_>
inline void tile(const float* xt, const float* W, long ldw, int kn, bool first, float* out) {
  V acc[R][V_];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V_; ++v) acc[i][v] = first ? S::zero() : S::load(out + i * TW + v * S::N);
  for (int k = 0; k < kn; ++k) {
    V xv[V_];
    for (int v = 0; v < V_; ++v) xv[v] = S::load(xt + (long)k * TW + v * S::N);
    for (int i = 0; i < R; ++i) {
      const V w = S::set1(W[i * ldw + k]);
      for (int v = 0; v < V_; ++v) acc[i][v] = S::fma(w, xv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V_; ++v) S::store(out + i * TW + v * S::N, acc[i][v]);
}

// Rows per register tile for a tile of `vecs` vectors: RB · TV accumulators whatever the width,
// so that a batch's last, narrower tile keeps as many FMAs per load as the others.
constexpr int rows_for(int vecs) { return RB * TV / vecs; }

// tile<rows, V> for rows ≤ R, chosen at run time for a chunk's last rows.
template <int R, int V_>
inline void tile_rows(int rows, const float* xt, const float* W, long ldw, int kn, bool first, float* out) {
  if constexpr (R > 1)
    if (rows < R) return tile_rows<R - 1, V_>(rows, xt, W, ldw, kn, first, out);
  tile<R, V_>(xt, W, ldw, kn, first, out);
}

// tile<rows, vecs> for vecs ≤ TV and rows ≤ rows_for(vecs).
template <int V_ = TV>
inline void tile_any(int rows, int vecs, const float* xt, const float* W, long ldw, int kn, bool first, float* out) {
  if constexpr (V_ > 1)
    if (vecs < V_) return tile_any<V_ - 1>(rows, vecs, xt, W, ldw, kn, first, out);
  tile_rows<rows_for(V_), V_>(rows, xt, W, ldw, kn, first, out);
}

// Rows [r0, r1) of a bf16, f16, int8 or int4 matrix as f32, row-major into out, a vector at a time.
inline void dequantize_rows(const WeightsRef& W, int n_in, int r0, int r1, float* out) {
  const int groups = n_in / QGROUP;
  for (long r = r0; r < r1; ++r, out += n_in) {
    if (W.dtype == DType::BF16 || W.dtype == DType::F16) {
      const uint16_t* w = (const uint16_t*)W.data + r * n_in;
      const bool bf16 = W.dtype == DType::BF16;
      int k = 0;
      for (; k + S::N <= n_in; k += S::N) S::store(out + k, bf16 ? S::load_bf16(w + k) : S::load_f16(w + k));
      for (; k < n_in; ++k) out[k] = bf16 ? bf16_to_f32(w[k]) : f16_to_f32(w[k]);
    } else {
      for (int g = 0; g < groups; ++g) S::dequantize_group(W, groups, r, g, out + g * QGROUP);
    }
  }
}

// y[j, i] (+)= out[i · TW + j] + b[i] for a chunk's rows i < rows and a tile's tokens j < nt: N × N
// blocks transposed in registers, so that each token's rows are stored as whole vectors; the
// edges as scalars (store_tile).
inline void store_chunk(const float* out, int rows, int nt, const float* b, float* y, long ldy, bool accumulate) {
  const int rv = rows / S::N * S::N, tv = nt / S::N * S::N;
  V col[S::N];
  for (int i = 0; i < rv; i += S::N) {
    const V bias = b ? S::load(b + i) : S::zero();
    for (int j = 0; j < tv; j += S::N) {
      S::transpose(out + (long)i * TW + j, TW, col);
      for (int c = 0; c < S::N; ++c) {
        float* yc = y + (long)(j + c) * ldy + i;
        S::store(yc, S::add(S::add(col[c], bias), accumulate ? S::load(yc) : S::zero()));
      }
    }
    if (tv < nt)
      store_tile(out + (long)i * TW + tv, TW, S::N, nt - tv, b ? b + i : nullptr, y + (long)tv * ldy + i, ldy,
                 accumulate);
  }
  if (rv < rows) store_tile(out + (long)rv * TW, TW, rows - rv, nt, b ? b + rv : nullptr, y + rv, ldy, accumulate);
}

}  // namespace gemm

// The activations laid out for gemm_packed: this thread's buffer, valid until its next call.
const float* gemm_pack(const float* x, int n_tok, int n_in) {
  using namespace gemm;
  static thread_local std::vector<float> xt;
  xt.resize(size_t((n_tok + TW - 1) / TW) * n_in * TW);
  pack_tokens(x, n_tok, n_in, xt.data());
  return xt.data();
}

void gemm_packed(const float* xt, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0,
                 int r1, bool accumulate) {
  using namespace gemm;
  static thread_local std::vector<float> wbuf;
  const int tiles = (n_tok + TW - 1) / TW, blocks = (n_in + KB - 1) / KB, kb = (n_in + blocks - 1) / blocks;
  alignas(64) float out[CHUNK * TW];  // the chunk's rows × a tile's tokens, summed over the k blocks
  for (int c0 = r0; c0 < r1; c0 += CHUNK) {
    const int c1 = c0 + CHUNK < r1 ? c0 + CHUNK : r1;
    const float* Wc;
    if (W.dtype == DType::F32) {
      Wc = (const float*)W.data + (long)c0 * n_in;
    } else {
      wbuf.resize(size_t(CHUNK) * n_in);
      dequantize_rows(W, n_in, c0, c1, wbuf.data());
      Wc = wbuf.data();
    }
    for (int tl = 0; tl < tiles; ++tl) {
      int t0, nt;
      tile_span(tl, n_tok, &t0, &nt);
      const int vecs = (nt + S::N - 1) / S::N;
      const float* xtile = xt + (long)tl * n_in * TW;
      const int step = rows_for(vecs);
      for (int k0 = 0; k0 < n_in; k0 += kb) {  // a k block's activations stay in L1 across the chunk's rows
        const int kn = n_in - k0 < kb ? n_in - k0 : kb;
        for (int r = c0; r < c1; r += step)
          tile_any(c1 - r < step ? c1 - r : step, vecs, xtile + (long)k0 * TW, Wc + (long)(r - c0) * n_in + k0, n_in,
                   kn, k0 == 0, out + (r - c0) * TW);
      }
      store_chunk(out, c1 - c0, nt, b ? b + c0 : nullptr, y + (long)t0 * ldy + c0, ldy, accumulate);
    }
  }
}
