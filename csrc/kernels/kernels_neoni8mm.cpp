// The prompts' GEMM for int8 and int4 weights (Kernels::gemm_q) with the Int8 matrix-multiply
// extension (+i8mm, Armv8.6: Apple M2 and later, Graviton 3, Neoverse V1/N2): one smmla or usmmla
// multiplies a 2 × 8 matrix of bytes by the transpose of another into a 2 × 2 block of int32
// sums, 32 products an instruction. The same integer sums as the x86 GEMMs (gemm_q_avx512.inl):
// - int8 weights meet the int16 activations exactly, each split into a signed high and an
//   unsigned low byte, x = 256·h + l: a group's Σ w·x = 256·Σ w·h (smmla) + Σ l·w (usmmla), exact in
//   int32 (|Σ w·x| ≤ 32·128·32768).
// - int4 weights meet the activations requantized to int8 (common.h requantize_int8): usmmla of
//   the unsigned 4-bit codes and the int8 values, the group's minimum term summing those values.
// Each 2 × 2 block is two rows by two tokens; every lane does the same operations, so a token's
// result does not depend on the rest of the batch. acc += (float(dot) · xs_token) · s_row
// (+ xsum_token · m_row for int4), in f32, as on x86.
//
// Layout: a tile of 8 tokens (4 pairs) against a chunk of rows widened to bytes a pair at a time;
// a register tile is up to 4 row pairs × 4 token pairs, 16 int32 blocks in registers for a
// group's 4 steps of 8 elements (+ 4 weight and 4 activation vectors). The f32 sums wait in
// memory between groups. A block's lane order is lane_row/lane_token's; the per-lane scales are
// laid out to match, and the store reads each lane back to its row and token.
//
// Compiled with +i8mm (and +dotprod +bf16: the "neoni8mm" set builds on "neonbf16", isa.cpp).
#include <arm_neon.h>

#include <cstring>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace neoni8mm {
namespace {

constexpr int TOKEN_PAIRS = 4, TILE_TOKENS = 2 * TOKEN_PAIRS;  // a tile's token pairs and tokens
constexpr int ROW_PAIRS = 4;                                   // row pairs of a register tile
constexpr int CHUNK = 64;                                      // rows widened at a time (a multiple of 2 · ROW_PAIRS)
constexpr int GROUPS_PER_BLOCK = 16;                           // the tile's activations of 16 groups stay in L1
constexpr int STEPS = QGROUP / 8;                              // 8 elements of a row (or token) per step
constexpr int PAIR_BYTES = 16;  // a pair's step: 8 bytes of each member, one mmla operand

// Lane l of a block: (row, token) within its pair of rows and pair of tokens. usmmla's first,
// unsigned operand gives the block's rows: int4's codes, [r0t0, r0t1, r1t0, r1t1]; for int8 the
// activations' low bytes, [t0r0, t0r1, t1r0, t1r1].
template <bool Q4>
constexpr int lane_row(int l) {
  return Q4 ? l >> 1 : l & 1;
}
template <bool Q4>
constexpr int lane_token(int l) {
  return Q4 ? l & 1 : l >> 1;
}

// The 32 elements of two groups a and b as pairs' steps: out[s · 16 …] = a[8s … 8s + 8), b[8s … 8s + 8).
inline void zip_group(const int8_t* a, const int8_t* b, int8_t* out) {
  for (int s = 0; s < STEPS; s += 2) {
    const int64x2_t va = vreinterpretq_s64_s8(vld1q_s8(a + 8 * s)), vb = vreinterpretq_s64_s8(vld1q_s8(b + 8 * s));
    vst1q_s8(out + s * PAIR_BYTES, vreinterpretq_s8_s64(vzip1q_s64(va, vb)));
    vst1q_s8(out + (s + 1) * PAIR_BYTES, vreinterpretq_s8_s64(vzip2q_s64(va, vb)));
  }
}

// A packed int4 group (byte i: element i low, i + 16 high) as 32 code bytes.
inline void widen_codes(const uint8_t* q, int8_t* out) {
  const uint8x16_t bytes = vld1q_u8(q);
  vst1q_u8((uint8_t*)out, vandq_u8(bytes, vdupq_n_u8(0x0f)));
  vst1q_u8((uint8_t*)out + 16, vshrq_n_u8(bytes, 4));
}

// The activations of one tile, tokens [t0, t0 + nt), as pairs' steps (zero past nt): for int8 two
// planes, the high bytes then the low bytes of the int16 values; for int4 the requantized values.
// Plane p of group g, step s, token pair q at xt[(((p · groups + g) · STEPS + s) · TOKEN_PAIRS + q) · 16]; the
// per-lane scales and sums of group g, pair q at st, mt[(g · TOKEN_PAIRS + q) · 4].
template <bool Q4>
void pack_tile(const int16_t* xq, const float* xs, const float* xsum, int nt, int groups, int8_t* xt, float* st,
               float* mt) {
  const long n_in = long(groups) * QGROUP;
  int8_t lo[2][QGROUP], hi[2][QGROUP];
  for (int g = 0; g < groups; ++g)
    for (int q = 0; q < TOKEN_PAIRS; ++q) {
      for (int m = 0; m < 2; ++m) {
        const int j = 2 * q + m;
        for (int i = 0; i < QGROUP; ++i) {
          const int v = j < nt ? xq[long(j) * n_in + long(g) * QGROUP + i] : 0;
          hi[m][i] = Q4 ? int8_t(v) : int8_t(v >> 8);  // int4: values already within ±127
          if (!Q4) lo[m][i] = int8_t(uint8_t(v & 255));
        }
      }
      const long at = (long(g) * STEPS * TOKEN_PAIRS + q) * PAIR_BYTES;
      int8_t pairs[STEPS * PAIR_BYTES];
      zip_group(hi[0], hi[1], pairs);
      for (int s = 0; s < STEPS; ++s)
        std::memcpy(xt + at + long(s) * TOKEN_PAIRS * PAIR_BYTES, pairs + s * PAIR_BYTES, PAIR_BYTES);
      if (!Q4) {
        zip_group(lo[0], lo[1], pairs);
        const long plane = long(groups) * STEPS * TOKEN_PAIRS * PAIR_BYTES;
        for (int s = 0; s < STEPS; ++s)
          std::memcpy(xt + plane + at + long(s) * TOKEN_PAIRS * PAIR_BYTES, pairs + s * PAIR_BYTES, PAIR_BYTES);
      }
      for (int l = 0; l < 4; ++l) {
        const int j = 2 * q + lane_token<Q4>(l);
        st[(g * TOKEN_PAIRS + q) * 4 + l] = j < nt ? xs[long(j) * groups + g] : 0.0f;
        mt[(g * TOKEN_PAIRS + q) * 4 + l] = j < nt && Q4 ? xsum[long(j) * groups + g] : 0.0f;
      }
    }
}

// Rows [c0, c0 + rows) of W as pairs' steps (a missing last row zero): pair p, group g, step s at
// wt[((p · groups + g) · STEPS + s) · 16]; per-lane scales and mins of pair p, group g at
// sv, mv[(p · groups + g) · 4].
template <DType T>
void widen_chunk(const WeightsRef& W, int groups, long c0, int rows, int8_t* wt, float* sv, float* mv) {
  constexpr bool Q4 = T != DType::Q8;
  int8_t a[2][QGROUP];
  for (int p = 0; p < (rows + 1) / 2; ++p)
    for (int g = 0; g < groups; ++g) {
      GroupScale gs[2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
      for (int m = 0; m < 2; ++m) {
        const int i = 2 * p + m;
        if (i >= rows) {
          std::memset(a[m], 0, QGROUP);
          continue;
        }
        const long r = c0 + i, rg = r * groups + g;
        if (Q4) widen_codes((const uint8_t*)W.data + rg * (QGROUP / 2), a[m]);
        else std::memcpy(a[m], (const int8_t*)W.data + rg * QGROUP, QGROUP);
        gs[m] = group_scale(W, groups, r, g);
      }
      const long pg = long(p) * groups + g;
      zip_group(a[0], a[1], wt + pg * STEPS * PAIR_BYTES);
      for (int l = 0; l < 4; ++l) {
        sv[pg * 4 + l] = gs[lane_row<Q4>(l)].s;
        mv[pg * 4 + l] = gs[lane_row<Q4>(l)].m;
      }
    }
}

// out[(p · TOKEN_PAIRS + q) · 4 + lane] (+)= the blocks of row pairs [0, RR) and the tile's token pairs over
// groups [0, ng), zeroed first where `first`: xt, st, mt at the block's first group; wt, sv, mv at
// row pair 0 and that group, row pairs wstride bytes (wt) and sstride floats (sv, mv) apart; plane
// the offset of the int8 weights' activations' low-byte plane from xt.
template <bool Q4, int RR>
inline void tile(const int8_t* xt, long plane, const float* st, const float* mt, const int8_t* wt, long wstride,
                 const float* sv, const float* mv, long sstride, int ng, bool first, float* out) {
  if (first)
    for (int i = 0; i < RR * TOKEN_PAIRS; ++i) vst1q_f32(out + 4 * i, vdupq_n_f32(0.0f));
  for (int g = 0; g < ng; ++g) {
    int32x4_t dot[RR][TOKEN_PAIRS];
    for (int p = 0; p < RR; ++p)
      for (int q = 0; q < TOKEN_PAIRS; ++q) dot[p][q] = vdupq_n_s32(0);
    const int8_t* x = xt + long(g) * STEPS * TOKEN_PAIRS * PAIR_BYTES;
    const int8_t* w = wt + long(g) * STEPS * PAIR_BYTES;
    for (int s = 0; s < STEPS; ++s) {
      int8x16_t xv[TOKEN_PAIRS], wv[RR];
      for (int q = 0; q < TOKEN_PAIRS; ++q) xv[q] = vld1q_s8(x + (s * TOKEN_PAIRS + q) * PAIR_BYTES);
      for (int p = 0; p < RR; ++p) wv[p] = vld1q_s8(w + p * wstride + s * PAIR_BYTES);
      for (int p = 0; p < RR; ++p)
        for (int q = 0; q < TOKEN_PAIRS; ++q)
          dot[p][q] = Q4 ? vusmmlaq_s32(dot[p][q], vreinterpretq_u8_s8(wv[p]), xv[q])  // codes · x
                         : vmmlaq_s32(dot[p][q], xv[q], wv[p]);                        // h · w
    }
    if constexpr (!Q4) {  // 256 · Σ w·h + Σ l·w
      for (int p = 0; p < RR; ++p)
        for (int q = 0; q < TOKEN_PAIRS; ++q) dot[p][q] = vshlq_n_s32(dot[p][q], 8);
      for (int s = 0; s < STEPS; ++s) {
        uint8x16_t lv[TOKEN_PAIRS];
        int8x16_t wv[RR];
        for (int q = 0; q < TOKEN_PAIRS; ++q)
          lv[q] = vld1q_u8((const uint8_t*)x + plane + (s * TOKEN_PAIRS + q) * PAIR_BYTES);
        for (int p = 0; p < RR; ++p) wv[p] = vld1q_s8(w + p * wstride + s * PAIR_BYTES);
        for (int p = 0; p < RR; ++p)
          for (int q = 0; q < TOKEN_PAIRS; ++q) dot[p][q] = vusmmlaq_s32(dot[p][q], lv[q], wv[p]);
      }
    }
    for (int p = 0; p < RR; ++p) {
      const float32x4_t s = vld1q_f32(sv + p * sstride + g * 4);
      const float32x4_t m = vld1q_f32(mv + p * sstride + g * 4);
      for (int q = 0; q < TOKEN_PAIRS; ++q) {
        float* o = out + (p * TOKEN_PAIRS + q) * 4;
        const float32x4_t scaled = vmulq_f32(vcvtq_f32_s32(dot[p][q]), vld1q_f32(st + (g * TOKEN_PAIRS + q) * 4));
        float32x4_t acc = vfmaq_f32(vld1q_f32(o), scaled, s);
        if (Q4) acc = vfmaq_f32(acc, vld1q_f32(mt + (g * TOKEN_PAIRS + q) * 4), m);
        vst1q_f32(o, acc);
      }
    }
  }
}

template <bool Q4, int RR>
inline void tile_pairs(int pairs, const int8_t* xt, long plane, const float* st, const float* mt, const int8_t* wt,
                       long wstride, const float* sv, const float* mv, long sstride, int ng, bool first, float* out) {
  if constexpr (RR > 1)
    if (pairs < RR)
      return tile_pairs<Q4, RR - 1>(pairs, xt, plane, st, mt, wt, wstride, sv, mv, sstride, ng, first, out);
  tile<Q4, RR>(xt, plane, st, mt, wt, wstride, sv, mv, sstride, ng, first, out);
}

template <DType T>
void gemm(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
          int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  constexpr bool Q4 = T != DType::Q8;
  const int groups = n_in / QGROUP, tiles = (n_tok + TILE_TOKENS - 1) / TILE_TOKENS;
  if (Q4) {  // int4 weights meet the activations requantized to int8 (common.h), as in every set
    const ByteActs<int16_t> a = requantized_int8(xq, xs, long(n_tok) * groups);
    xq = a.q, xs = a.s, xsum = a.sum;
  }
  const long plane = long(groups) * STEPS * TOKEN_PAIRS * PAIR_BYTES;  // bytes of one plane of a tile's activations
  const long tile_bytes = (Q4 ? 1 : 2) * plane, tile_floats = long(groups) * TOKEN_PAIRS * 4;
  static thread_local std::vector<int8_t> xt, wt;
  static thread_local std::vector<float> fbuf;
  xt.resize(size_t(tiles) * tile_bytes);
  wt.resize(size_t(CHUNK / 2) * groups * STEPS * PAIR_BYTES);
  fbuf.resize(2 * size_t(tiles) * tile_floats + 2 * size_t(CHUNK / 2) * groups * 4 +
              size_t(CHUNK / 2) * TOKEN_PAIRS * 4);
  float *st = fbuf.data(), *mt = st + tiles * tile_floats, *sv = mt + tiles * tile_floats;
  float *mv = sv + (CHUNK / 2) * groups * 4, *out = mv + (CHUNK / 2) * groups * 4;
  for (int tl = 0; tl < tiles; ++tl) {
    const int t0 = tl * TILE_TOKENS, nt = n_tok - t0 < TILE_TOKENS ? n_tok - t0 : TILE_TOKENS;
    const long tg = long(t0) * groups;
    pack_tile<Q4>(xq + tg * QGROUP, xs + tg, Q4 ? xsum + tg : nullptr, nt, groups, xt.data() + tl * tile_bytes,
                  st + tl * tile_floats, mt + tl * tile_floats);
  }
  const long wstride = long(groups) * STEPS * PAIR_BYTES, sstride = long(groups) * 4;
  for (int c0 = r0; c0 < r1; c0 += CHUNK) {
    const int rows = r1 - c0 < CHUNK ? r1 - c0 : CHUNK, pairs = (rows + 1) / 2;
    widen_chunk<T>(W, groups, c0, rows, wt.data(), sv, mv);
    for (int tl = 0; tl < tiles; ++tl) {
      const int t0 = tl * TILE_TOKENS, nt = n_tok - t0 < TILE_TOKENS ? n_tok - t0 : TILE_TOKENS;
      const int8_t* xtile = xt.data() + tl * tile_bytes;
      const float *stile = st + tl * tile_floats, *mtile = mt + tl * tile_floats;
      for (int g0 = 0; g0 < groups; g0 += GROUPS_PER_BLOCK) {
        const int ng = groups - g0 < GROUPS_PER_BLOCK ? groups - g0 : GROUPS_PER_BLOCK;
        for (int p = 0; p < pairs; p += ROW_PAIRS)
          tile_pairs<Q4, ROW_PAIRS>(
              pairs - p < ROW_PAIRS ? pairs - p : ROW_PAIRS, xtile + long(g0) * STEPS * TOKEN_PAIRS * PAIR_BYTES, plane,
              stile + g0 * TOKEN_PAIRS * 4, mtile + g0 * TOKEN_PAIRS * 4,
              wt.data() + p * wstride + long(g0) * STEPS * PAIR_BYTES, wstride, sv + p * sstride + g0 * 4,
              mv + p * sstride + g0 * 4, sstride, ng, g0 == 0, out + p * TOKEN_PAIRS * 4);
      }
      for (int p = 0; p < pairs; ++p)  // each lane back to its row and token
        for (int q = 0; q < TOKEN_PAIRS; ++q)
          for (int l = 0; l < 4; ++l) {
            const int i = 2 * p + lane_row<Q4>(l), j = 2 * q + lane_token<Q4>(l);
            if (i >= rows || j >= nt) continue;
            const float v = out[(p * TOKEN_PAIRS + q) * 4 + l] + (b ? b[c0 + i] : 0.0f);
            float& o = y[long(t0 + j) * ldy + c0 + i];
            o = accumulate ? o + v : v;
          }
    }
  }
}

}  // namespace

void gemm_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
            int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  switch (W.dtype) {
    case DType::Q8: return gemm<DType::Q8>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    case DType::Q4: return gemm<DType::Q4>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    case DType::Q4K: return gemm<DType::Q4K>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    default: return;
  }
}

}  // namespace neoni8mm
}  // namespace gally
