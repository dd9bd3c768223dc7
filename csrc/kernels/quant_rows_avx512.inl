// matmul_q of the AVX-512 sets: the row-wise int8 and int4 (Q4, Q4K) products of a few tokens,
// the decode steps of one or more sequences, on int16 activations (int4 weights: requantized to
// int8; kernels.h).
//
// Fewer than LANE_TOKENS tokens take matmul_q_rows (quant_kernels.inl), one row at a time:
// the weights stream through in memory order, which a decode step bound by memory needs. More
// tokens take a tile of 16 rows with one row in each lane: a group's 16 rows of bytes are loaded
// four rows to a register and transposed as dwords, so that register k holds bytes 4k … 4k + 3 of
// every row; the transpose serves every token, and no sum is reduced across lanes.
// - int8 weights: each quad widened in place by word shifts into two registers of int16 pairs,
//   (q_4k, q_4k+2) and (q_4k+1, q_4k+3) (pairs_transposed), which the token's activations, reordered
//   to match (pairs_interleaved), meet broadcast a pair at a time: a group dot for all 16 rows is
//   16 vpmaddwd/vpdpwssd.
// - int4 weights meet int8 activations (quant_kernels.inl): the quads of packed codes split into
//   nibbles, codes 4k … 4k + 3 of every row (k < 4 the low nibbles, codes 16 + … the high), and a
//   group dot is 8 vpdpbusd with the token's quad k broadcast.
//
// A token's result must not depend on the batch it is in, so the tile sums in q_row's order: the
// integer dots are exact, and q_row's float sums, lane u of its accumulator taking groups u, u + 8,
// …, then sum8 and the tail groups, are here eight accumulators a_u with rows in the lanes, added
// as sum8 adds its lanes, then the tail groups, each fused as q_row's.
//
// The including file (kernels_avx512.cpp, kernels_avx512vnni.cpp) defines
// dot_pairs16(acc, a, b) = acc + vpmaddwd(a, b) and dot_quads16(acc, u, s) (quant_kernels.inl's
// dot_quads) in 16 int32 lanes, and includes transpose_avx512.h.

constexpr int TILE_ROWS = 16;    // rows per tile, one per lane
constexpr int LANE_TOKENS = 3;   // batches of at least this many tokens transpose the tile's weights
constexpr int TILE_TOKENS = 16;  // tokens per pass over a tile: each group's transpose serves them all

// Group rg (row · groups + group) of an int8 W widened to 32 int16 in natural order: dword k holds
// weights 2k and 2k + 1.
inline __m512i load_group32(const WeightsRef& W, long rg) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)((const int8_t*)W.data + rg * QGROUP)));
}

// super_block8 (quant_kernels.inl) for super-blocks sb and sb + 1 at once, in 16 lanes.
inline void super_blocks16(const WeightsRef& W, long sb, float* s, float* m) {
  const uint8_t* c = W.codes + sb * QK_CODE_BYTES;
  uint32_t high[2];
  std::memcpy(&high[0], c + QK_GROUPS, 4);
  std::memcpy(&high[1], c + QK_CODE_BYTES + QK_GROUPS, 4);
  const __m128i bytes =
      _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)c), _mm_loadl_epi64((const __m128i*)(c + QK_CODE_BYTES)));
  const __m512i low = _mm512_cvtepu8_epi32(bytes);
  const __m512i h = _mm512_inserti64x4(_mm512_set1_epi32(int(high[0])), _mm256_set1_epi32(int(high[1])), 1);
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i three = _mm512_set1_epi32(3), fifteen = _mm512_set1_epi32(0xf);
  const __m512i hs = _mm512_and_si512(_mm512_srlv_epi32(h, shift), three);
  const __m512i hm = _mm512_and_si512(_mm512_srlv_epi32(h, _mm512_add_epi32(shift, _mm512_set1_epi32(16))), three);
  const __m512i sc = _mm512_or_si512(_mm512_and_si512(low, fifteen), _mm512_slli_epi32(hs, 4));
  const __m512i mc = _mm512_or_si512(_mm512_srli_epi32(low, 4), _mm512_slli_epi32(hm, 4));
  // d and dmin of both: lanes 0-7 the first super-block's, 8-15 the second's
  const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  uint32_t dd, mm;
  std::memcpy(&dd, W.scales + sb, 4);
  std::memcpy(&mm, W.mins + sb, 4);
  const __m512 d = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(int(dd)))));
  const __m512 dmin = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(int(mm)))));
  _mm512_storeu_ps(s, _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc)));
  _mm512_storeu_ps(m, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mc)));
}

// Floats of tile_scales' row_buf: two planes (scales, mins) of a tile's 16 rows of groups, each
// with room for up to 7 groups of Q4K's first super-block before them and what the whole
// super-blocks or 16-float stores of the last groups write past the end.
inline long tile_plane_floats(int groups) { return 16L * groups + 32; }
inline long tile_rows_floats(int groups) { return 2 * tile_plane_floats(groups); }

// The scales (and int4 mins) of a tile's rows as f32, group-major: s[g · 16 + i] for row i of the
// tile. Rows past the tile's `rows` repeat its last row. The tile's rows are consecutive, so their
// groups are one run of the matrix's: decoded into row_buf (tile_rows_floats) at once (Q4K: each
// super-block once, also the one a row boundary splits), then transposed with the rows `groups`
// floats apart, 16 groups at a time; the groups past a multiple of 16 are gathered one by one.
template <DType T>
void tile_scales(const WeightsRef& W, int groups, int r, int rows, float* s, float* m, float* row_buf) {
  constexpr bool Q4 = T != DType::Q8;
  const long f0 = long(r) * groups, n = long(rows) * groups;
  float *S = row_buf, *M = row_buf + tile_plane_floats(groups);
  int off = 0;  // Q4K: the tile's first group within its super-block
  if constexpr (T == DType::Q4K) {
    const long sb0 = f0 / QK_GROUPS;
    off = int(f0 - sb0 * QK_GROUPS);
    const long count = (off + n + QK_GROUPS - 1) / QK_GROUPS;
    long i = 0;
    for (; i + 2 <= count; i += 2) super_blocks16(W, sb0 + i, S + i * QK_GROUPS, M + i * QK_GROUPS);
    if (i < count) super_block8(W, sb0 + i, S + i * QK_GROUPS, M + i * QK_GROUPS);
  } else {
    for (long i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? 0xffff : __mmask16((1u << (n - i)) - 1);
      _mm512_storeu_ps(S + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, W.scales + f0 + i)));
      if (Q4) _mm512_storeu_ps(M + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, W.mins + f0 + i)));
    }
  }
  S += off, M += off;
  const __m512i row_at = _mm512_mullo_epi32(  // row i's first group, rows past `rows` at the last
      _mm512_min_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_epi32(rows - 1)),
      _mm512_set1_epi32(groups));
  const int full = groups / 16 * 16;
  for (int plane = 0; plane < (Q4 ? 2 : 1); ++plane) {
    float* P = plane ? M : S;
    float* out = plane ? m : s;
    if (T == DType::Q4K)
      for (int i = rows; i < TILE_ROWS; ++i) std::memcpy(P + long(i) * groups, P + long(rows - 1) * groups, 4L * full);
    for (int g = 0; g < full; g += 16) {
      __m512i col[16];
      if constexpr (T == DType::Q4K) {
        transpose16x16(P + g, groups, col);
      } else {  // from the float16s themselves: loads of what was just stored across two stores stall
        const uint16_t* src = plane ? W.mins : W.scales;
        __m512i row[16];
        for (int i = 0; i < TILE_ROWS; ++i)
          row[i] = _mm512_castps_si512(_mm512_cvtph_ps(
              _mm256_loadu_si256((const __m256i*)(src + f0 + long(i < rows ? i : rows - 1) * groups + g))));
        transpose16x16(row, col);
      }
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(out + long(g + c) * 16, col[c]);
    }
    // the last groups (SmolLM2's 18 a row leave 2) a gather each: a whole transpose would be mostly waste
    for (int g = full; g < groups; ++g) _mm512_storeu_ps(out + long(g) * 16, _mm512_i32gather_ps(row_at, P + g, 4));
  }
}

// Group g's part of a token's sums: acc = fma(float(dot), s_g · xs, acc), then for int4
// acc = fma(m_g, xsum, acc); dot [16] its rows' integer dots.
template <bool Q4>
inline __m512 add_group(__m512 acc, __m512i dot, __m512 sg, __m512 mg, float xs, float xsum) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sg, _mm512_set1_ps(xs)), acc);
  return Q4 ? _mm512_fmadd_ps(mg, _mm512_set1_ps(xsum), acc) : acc;
}

// Bytes [at, at + 16) of group g (group_bytes long) of each of a tile's 16 rows (rg0: row · groups),
// transposed as dwords: p[k] lane i holds bytes at + 4k … at + 4k + 3 of row i. Row 4l + m is loaded
// into 128-bit lane l of register m, so that after the in-lane dword transposes lane 4l + m is row
// 4l + m.
inline void dwords_transposed(const uint8_t* data, long group_bytes, const long* rg0, int g, int at, __m512i p[4]) {
  auto chunk = [&](int i) { return _mm_loadu_si128((const __m128i*)(data + (rg0[i] + g) * group_bytes + at)); };
  __m512i z[4];
  for (int m = 0; m < 4; ++m) {
    const __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(chunk(m)), chunk(4 + m), 1);
    const __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(chunk(8 + m)), chunk(12 + m), 1);
    z[m] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  p[0] = _mm512_unpacklo_epi64(t0, t2), p[1] = _mm512_unpackhi_epi64(t0, t2);
  p[2] = _mm512_unpacklo_epi64(t1, t3), p[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Group g of the 16 rows at rg0 of an int4 matrix: w[k] (k < 8) holds quad k of each row's codes in
// its lane (k < 4 the low nibbles of packed dword k, codes 4k …; k ≥ 4 the high, codes 16 + …).
inline void codes_transposed(const WeightsRef& W, const long* rg0, int g, __m512i w[8]) {
  __m512i p[4];
  dwords_transposed((const uint8_t*)W.data, QGROUP / 2, rg0, g, 0, p);
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int k = 0; k < 4; ++k) {
    w[k] = _mm512_and_si512(p[k], low);
    w[4 + k] = _mm512_and_si512(_mm512_srli_epi16(p[k], 4), low);
  }
}

// Group g of the 16 rows at rg0 of an int8 matrix as int16 pairs: row i's weights q_4k … q_4k+3 in
// lane i of w[2k] as (q_4k, q_4k+2) and of w[2k + 1] as (q_4k+1, q_4k+3), each quad widened by two
// word shifts in place: a dword transpose of the bytes and 24 shifts, where widening first and
// transposing int16 pairs took 80 shuffles. The activations meet them in that order
// (quant_kernels.inl's pairs_interleaved).
inline void pairs_transposed(const WeightsRef& W, const long* rg0, int g, __m512i w[16]) {
  for (int half = 0; half < 2; ++half) {
    __m512i p[4];
    dwords_transposed((const uint8_t*)W.data, QGROUP, rg0, g, 16 * half, p);
    for (int k = 0; k < 4; ++k) {
      w[8 * half + 2 * k] = _mm512_srai_epi16(_mm512_slli_epi16(p[k], 8), 8);  // the even bytes, sign-extended
      w[8 * half + 2 * k + 1] = _mm512_srai_epi16(p[k], 8);                    // the odd
    }
  }
}

// out[t] (lane i: row i of the tile) for nt ≤ L tokens: q_row's sums. s, m: tile_scales; lane_acc:
// scratch of 8 · L registers for the eight accumulators. The next tile's next_bytes at `next` are
// fetched meanwhile, a groups-th of them per group (the walk over the tile's rows is too scattered
// for the hardware prefetchers: SmolLM2's int8 lm_head, 8 tokens, one thread: 1.9× the speed).
template <DType T, int L, bool FULL>
inline void tile_dots(int n_tok, const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, int groups,
                      const long* rg0, const float* s, const float* m, const char* next, long next_bytes,
                      __m512* lane_acc, __m512* out) {
  const int nt = FULL ? L : n_tok;  // a compile-time count for a full pass
  constexpr bool Q4 = T != DType::Q8;
  const int groups8 = groups / 8 * 8;
  int done = 0;                                          // groups added so far
  const long step = (next_bytes + groups - 1) / groups;  // bytes of the next tile fetched per group
  auto group_scales = [&](int g) { return _mm512_loadu_ps(s + long(g) * 16); };
  auto group_mins = [&](int g) { return Q4 ? _mm512_loadu_ps(m + long(g) * 16) : _mm512_setzero_ps(); };
  // group g of every token into acc: the tile's 16 rows of it transposed (codes_transposed,
  // pairs_transposed), each register meeting the token's matching quad or pair broadcast
  auto add = [&](__m512* acc, int g) {
    const long end = step * (done + 1) < next_bytes ? step * (done + 1) : next_bytes;
    for (long p = step * done & ~63L; p < end; p += 64) _mm_prefetch(next + p, _MM_HINT_T0);
    ++done;
    const __m512 sg = group_scales(g), mg = group_mins(g);
    if constexpr (Q4) {
      __m512i w[8];
      codes_transposed(W, rg0, g, w);
      for (int t = 0; t < nt; ++t) {
        const int32_t* x = (const int32_t*)(xq + (long(t) * groups + g) * QGROUP);
        __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
        for (int k = 0; k < 8; k += 2) {
          d0 = dot_quads16(d0, w[k], _mm512_set1_epi32(x[k]));
          d1 = dot_quads16(d1, w[k + 1], _mm512_set1_epi32(x[k + 1]));
        }
        const long tg = long(t) * groups + g;
        acc[t] = add_group<true>(acc[t], _mm512_add_epi32(d0, d1), sg, mg, xs[tg], xsum[tg]);
      }
    } else {
      __m512i pairs[16];
      pairs_transposed(W, rg0, g, pairs);
      for (int t = 0; t < nt; ++t) {
        const int32_t* x = (const int32_t*)(xq + (long(t) * groups + g) * QGROUP);
        __m512i d[4];
        for (int c = 0; c < 4; ++c) d[c] = dot_pairs16(_mm512_setzero_si512(), pairs[c], _mm512_set1_epi32(x[c]));
        for (int k = 4; k < 16; k += 4)
          for (int c = 0; c < 4; ++c) d[c] = dot_pairs16(d[c], pairs[k + c], _mm512_set1_epi32(x[k + c]));
        const long tg = long(t) * groups + g;
        const __m512i dot = _mm512_add_epi32(_mm512_add_epi32(d[0], d[1]), _mm512_add_epi32(d[2], d[3]));
        acc[t] = add_group<false>(acc[t], dot, sg, mg, xs[tg], 0.0f);
      }
    }
  };
  for (int u = 0; u < 8; ++u) {  // accumulator u: groups u, u + 8, … (the tile is in L1 or L2 after u = 0)
    __m512 acc[L];
    for (int t = 0; t < L; ++t) acc[t] = _mm512_setzero_ps();
    for (int g = u; g < groups8; g += 8) add(acc, g);
    for (int t = 0; t < nt; ++t) lane_acc[u * L + t] = acc[t];
  }
  for (int t = 0; t < nt; ++t) {  // sum8: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    const __m512* a = lane_acc + t;
    const __m512 even = _mm512_add_ps(_mm512_add_ps(a[0], a[4 * L]), _mm512_add_ps(a[2 * L], a[6 * L]));
    const __m512 odd = _mm512_add_ps(_mm512_add_ps(a[L], a[5 * L]), _mm512_add_ps(a[3 * L], a[7 * L]));
    out[t] = _mm512_add_ps(even, odd);
  }
  for (int g = groups8; g < groups; ++g) add(out, g);
}

// Rows [r0, r1) in tiles of 16 (the last may hold fewer: its missing lanes repeat its last row and
// are not stored), TILE_TOKENS tokens per pass over a tile; passes of fewer than LANE_TOKENS tokens
// row by row.
template <DType T>
void matmul_q(const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
              int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  if (n_tok < LANE_TOKENS) return matmul_q_rows<T>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
  const int groups = n_in / QGROUP, pad = (groups + 15) / 16 * 16;
  // a tile's scales and mins group-major; tile_scales' row buffer
  static thread_local std::vector<float> buf;
  buf.resize(size_t(pad) * 16 * 2 + size_t(tile_rows_floats(groups)));
  float *s = buf.data(), *m = s + size_t(pad) * 16, *row_buf = m + size_t(pad) * 16;
  const Act<T>* xt = xq;  // the tiles' activations: int8 weights' reordered
  if constexpr (T == DType::Q8) xt = pairs_interleaved(xq, long(n_tok) * groups);
  for (int r = r0; r < r1; r += TILE_ROWS) {
    const int rows = r1 - r < TILE_ROWS ? r1 - r : TILE_ROWS;
    const __mmask16 lanes = __mmask16((1u << rows) - 1);
    long rg0[TILE_ROWS];
    for (int i = 0; i < TILE_ROWS; ++i) rg0[i] = long(r + (i < rows ? i : rows - 1)) * groups;
    tile_scales<T>(W, groups, r, rows, s, m, row_buf);
    const __m512 bias = b ? _mm512_maskz_loadu_ps(lanes, b + r) : _mm512_setzero_ps();
    const long row_bytes = long(groups) * (T == DType::Q8 ? QGROUP : QGROUP / 2);
    const char* next = (const char*)W.data + long(r + rows) * row_bytes;  // the next tile's weights
    const long next_bytes = (r1 - r - rows < TILE_ROWS ? r1 - r - rows : TILE_ROWS) * row_bytes;
    for (int t0 = 0; t0 < n_tok; t0 += TILE_TOKENS) {
      const int nt = n_tok - t0 < TILE_TOKENS ? n_tok - t0 : TILE_TOKENS;
      const long tg = long(t0) * groups;
      if (nt < LANE_TOKENS) {
        matmul_q_rows<T>(xq + tg * QGROUP, xs + tg, T != DType::Q8 ? xsum + tg : nullptr, W, b, y + long(t0) * ldy, nt,
                         n_in, ldy, r, r + rows, accumulate);
        continue;
      }
      __m512 lane_acc[8 * TILE_TOKENS], acc[TILE_TOKENS];
      constexpr int H = TILE_TOKENS / 2;
      const auto dots = nt == H  ? tile_dots<T, H, true>
                        : nt < H ? tile_dots<T, H, false>
                                 : tile_dots<T, TILE_TOKENS, false>;
      dots(nt, xt + tg * QGROUP, xs + tg, T != DType::Q8 ? xsum + tg : nullptr, W, groups, rg0, s, m, next,
           t0 == 0 ? next_bytes : 0, lane_acc, acc);
      for (int t = 0; t < nt; ++t) {
        float* o = y + long(t0 + t) * ldy + r;
        __m512 v = _mm512_add_ps(acc[t], bias);
        if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, o), v);
        _mm512_mask_storeu_ps(o, lanes, v);
      }
    }
  }
}
