// matmul_q of the AVX2 sets (quant_kernels.inl): the row-wise products of a few tokens, as on
// AVX-512 (quant_rows_avx512.inl) but in 8 lanes. Passes of fewer than LANE8_TOKENS tokens take
// matmul_q_rows, one row at a time; more tokens a tile of 8 rows with one row in each lane: a
// group's 8 rows of bytes are loaded two rows to a register and transposed as dwords. int8 weights'
// quads are then widened in place into int16 pairs, (q_4k, q_4k+2) and (q_4k+1, q_4k+3), which the
// reordered activations meet in 16 vpmaddwd (vpdpwssd on avx2vnni). int4 weights' quads are split
// into nibbles, so that register k holds codes 4k … 4k + 3 of every row, and a token's group dot for
// all 8 rows is 8 vpmaddubsw with its quad k of int8 activations broadcast (in the avx2vnni set too: 8 vpdpbusd
// measured no faster): no lane sums, where row by row each token's eight groups need them (sum_lanes8), and the
// weights' nibbles split once for every token. vpmaddubsw's int16 pair sums
// (|q·x + q'·x'| ≤ 2 · 15 · 127) add up over the 8 quads within int16 (≤ 30480), then vpmaddwd by
// ones makes them the group's exact int32 dot.
//
// A token's result must not depend on the batch it is in, so the tile sums in q_row's order, as the
// AVX-512 tile does: eight accumulators a_u (groups u, u + 8, …) with rows in the lanes, added as
// sum8 adds its lanes, then the tail groups, each fused as q_row's. tile8_scales and tile8_dots
// follow tile_scales and tile_dots there, in 8 lanes.

constexpr int TILE8_ROWS = 8;    // rows per tile, one per lane
constexpr int TILE8_TOKENS = 8;  // tokens per pass over a tile
constexpr int LANE8_TOKENS = 3;  // passes of at least this many tokens take the tile

// out[c] = column c of the 8 × 8 floats in rows.
inline void transpose8x8(const __m256 rows[8], __m256 out[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(rows[i], rows[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    out[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    out[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// Floats of tile8_scales' buffer: two planes (scales, mins) of a tile's 8 rows of groups, each with up
// room for up to 7 groups of Q4K's first super-block before them and what the whole super-blocks or
// 8-float stores of the last groups write past the end.
inline long tile8_plane_floats(int groups) { return 8L * groups + 16; }

// The scales (and int4 mins) of a tile's rows as f32, group-major: s[g · 8 + i] for row i. Rows past
// `rows` repeat the last. The rows are consecutive, so their groups are one run of the matrix's:
// widened (Q8, Q4) or decoded (Q4K, super_block8) in one pass into buf. 8 groups at a time are then
// transposed, Q4K's from buf, the others' from the float16s in the weights (loads of buf straddling
// two of its stores would stall); the groups past a multiple of 8 are gathered from buf one by one.
template <DType T>
void tile8_scales(const WeightsRef& W, int groups, int r, int rows, float* s, float* m, float* buf) {
  constexpr bool Q4 = T != DType::Q8;
  const long f0 = long(r) * groups, n = long(rows) * groups;
  float *S = buf, *M = buf + tile8_plane_floats(groups);
  int off = 0;  // Q4K: the tile's first group within its super-block
  if constexpr (T == DType::Q4K) {
    const long sb0 = f0 / QK_GROUPS;
    off = int(f0 - sb0 * QK_GROUPS);
    for (long i = 0; i * QK_GROUPS < off + n; ++i) super_block8(W, sb0 + i, S + i * QK_GROUPS, M + i * QK_GROUPS);
  } else {
    long i = 0;
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(S + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(W.scales + f0 + i))));
      if (Q4) _mm256_storeu_ps(M + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(W.mins + f0 + i))));
    }
    for (; i < n; ++i) S[i] = _cvtsh_ss(W.scales[f0 + i]), M[i] = Q4 ? _cvtsh_ss(W.mins[f0 + i]) : 0.0f;
  }
  const __m256i row_at = _mm256_mullo_epi32(  // row i's first group, rows past `rows` at the last
      _mm256_min_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(rows - 1)),
      _mm256_set1_epi32(groups));
  const int full = groups / 8 * 8;
  for (int plane = 0; plane < (Q4 ? 2 : 1); ++plane) {
    float* P = (plane ? M : S) + off;
    float* out = plane ? m : s;
    for (int g = 0; g < full; g += 8) {
      __m256 row[8], col[8];
      for (int i = 0; i < TILE8_ROWS; ++i) {
        const long at = long(i < rows ? i : rows - 1) * groups + g;
        if constexpr (T == DType::Q4K) {
          row[i] = _mm256_loadu_ps(P + at);
        } else {
          const uint16_t* src = plane ? W.mins : W.scales;
          row[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + f0 + at)));
        }
      }
      transpose8x8(row, col);
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + long(g + c) * 8, col[c]);
    }
    // the last groups (SmolLM2's 18 a row leave 2) a gather each: a whole transpose would be mostly waste
    for (int g = full; g < groups; ++g) _mm256_storeu_ps(out + long(g) * 8, _mm256_i32gather_ps(P + g, row_at, 4));
  }
}

// Bytes [at, at + 16) of group g (group_bytes long) of each of a tile's 8 rows (rg0: row · groups),
// transposed as dwords: p[k] lane i holds bytes at + 4k … at + 4k + 3 of row i. Row 4l + i lies in
// 128-bit lane l of register i, so that after the in-lane dword transposes lane 4l + i is row 4l + i.
inline void dwords_transposed8(const uint8_t* data, long group_bytes, const long* rg0, int g, int at, __m256i p[4]) {
  auto chunk = [&](int i) { return _mm_loadu_si128((const __m128i*)(data + (rg0[i] + g) * group_bytes + at)); };
  __m256i z[4];
  for (int i = 0; i < 4; ++i) z[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(chunk(i)), chunk(4 + i), 1);
  const __m256i t0 = _mm256_unpacklo_epi32(z[0], z[1]), t1 = _mm256_unpackhi_epi32(z[0], z[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(z[2], z[3]), t3 = _mm256_unpackhi_epi32(z[2], z[3]);
  p[0] = _mm256_unpacklo_epi64(t0, t2), p[1] = _mm256_unpackhi_epi64(t0, t2);
  p[2] = _mm256_unpacklo_epi64(t1, t3), p[3] = _mm256_unpackhi_epi64(t1, t3);
}

// Group g of the 8 rows at rg0 of an int4 matrix: w[k] (k < 8) holds quad k of each row's codes in
// its lane (k < 4 the low nibbles of packed dword k, codes 4k …; k ≥ 4 the high, codes 16 + …).
inline void codes_transposed8(const WeightsRef& W, const long* rg0, int g, __m256i w[8]) {
  __m256i p[4];
  dwords_transposed8((const uint8_t*)W.data, QGROUP / 2, rg0, g, 0, p);
  const __m256i low = _mm256_set1_epi8(0x0f);
  for (int k = 0; k < 4; ++k) {
    w[k] = _mm256_and_si256(p[k], low);
    w[4 + k] = _mm256_and_si256(_mm256_srli_epi16(p[k], 4), low);
  }
}

// Group g of the 8 rows at rg0 of an int8 matrix as int16 pairs, as quant_rows_avx512.inl's
// pairs_transposed: lane i of w[2k] holds (q_4k, q_4k+2) of row i and of w[2k + 1] (q_4k+1, q_4k+3).
inline void pairs_transposed8(const WeightsRef& W, const long* rg0, int g, __m256i w[16]) {
  for (int half = 0; half < 2; ++half) {
    __m256i p[4];
    dwords_transposed8((const uint8_t*)W.data, QGROUP, rg0, g, 16 * half, p);
    for (int k = 0; k < 4; ++k) {
      w[8 * half + 2 * k] = _mm256_srai_epi16(_mm256_slli_epi16(p[k], 8), 8);  // the even bytes, sign-extended
      w[8 * half + 2 * k + 1] = _mm256_srai_epi16(p[k], 8);                    // the odd
    }
  }
}

// out[t] (lane i: row i of the tile) for nt ≤ TILE8_TOKENS tokens: q_row's sums. s, m: tile8_scales;
// lane_acc: scratch of 8 · TILE8_TOKENS registers. The next tile's next_bytes at `next` are fetched
// meanwhile, a groups-th of them per group.
template <DType T>
inline void tile8_dots(int nt, const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, int groups,
                       const long* rg0, const float* s, const float* m, const char* next, long next_bytes,
                       __m256* lane_acc, __m256* out) {
  const int groups8 = groups / 8 * 8;
  const __m256i ones = _mm256_set1_epi16(1);
  int done = 0;                                          // groups added so far
  const long step = (next_bytes + groups - 1) / groups;  // bytes of the next tile fetched per group
  auto add = [&](__m256* acc, int g) {
    const long end = step * (done + 1) < next_bytes ? step * (done + 1) : next_bytes;
    for (long p = step * done & ~63L; p < end; p += 64) _mm_prefetch(next + p, _MM_HINT_T0);
    ++done;
    const __m256 sg = _mm256_loadu_ps(s + long(g) * 8);
    if constexpr (T == DType::Q8) {
      // The 16 pairs fill AVX2's registers, so most wait in memory: two tokens a pass share their
      // loads, two dot chains each (a chain's step is one vpaddd, whatever vpmaddwd's latency). The
      // asm keeps each step in order: unheld, GCC hoists the vpmaddwds and spills their results
      // (measured, one core, 8 tokens: 34 GMAC/s against 39.5 held, 1536 × 576).
      __m256i pairs[16];
      pairs_transposed8(W, rg0, g, pairs);
      const long next_token = long(groups) * QGROUP / 2;  // int32 pairs from a token's group to the next's
      auto add_dot = [&](int t, __m256i d0, __m256i d1) {
        const long tg = long(t) * groups + g;
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(d0, d1));
        acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sg, _mm256_set1_ps(xs[tg])), acc[t]);
      };
      int t = 0;
      for (; t + 2 <= nt; t += 2) {
        const int32_t* xa = (const int32_t*)(xq + (long(t) * groups + g) * QGROUP);
        const int32_t* xb = xa + next_token;
        __m256i a0 = _mm256_madd_epi16(pairs[0], _mm256_set1_epi32(xa[0]));
        __m256i b0 = _mm256_madd_epi16(pairs[0], _mm256_set1_epi32(xb[0]));
        __m256i a1 = _mm256_madd_epi16(pairs[1], _mm256_set1_epi32(xa[1]));
        __m256i b1 = _mm256_madd_epi16(pairs[1], _mm256_set1_epi32(xb[1]));
        for (int k = 2; k < 16; k += 2) {
          a0 = dot_pairs(a0, pairs[k], _mm256_set1_epi32(xa[k]));
          b0 = dot_pairs(b0, pairs[k], _mm256_set1_epi32(xb[k]));
          a1 = dot_pairs(a1, pairs[k + 1], _mm256_set1_epi32(xa[k + 1]));
          b1 = dot_pairs(b1, pairs[k + 1], _mm256_set1_epi32(xb[k + 1]));
          __asm__("" : "+x"(a0), "+x"(b0), "+x"(a1), "+x"(b1));
        }
        add_dot(t, a0, a1);
        add_dot(t + 1, b0, b1);
      }
      if (t < nt) {
        const int32_t* x = (const int32_t*)(xq + (long(t) * groups + g) * QGROUP);
        __m256i d0 = _mm256_madd_epi16(pairs[0], _mm256_set1_epi32(x[0]));
        __m256i d1 = _mm256_madd_epi16(pairs[1], _mm256_set1_epi32(x[1]));
        for (int k = 2; k < 16; k += 2) {
          d0 = dot_pairs(d0, pairs[k], _mm256_set1_epi32(x[k]));
          d1 = dot_pairs(d1, pairs[k + 1], _mm256_set1_epi32(x[k + 1]));
        }
        add_dot(t, d0, d1);
      }
    } else {
      __m256i w[8];
      codes_transposed8(W, rg0, g, w);
      const __m256 mg = _mm256_loadu_ps(m + long(g) * 8);
      for (int t = 0; t < nt; ++t) {
        const int32_t* x = (const int32_t*)(xq + (long(t) * groups + g) * QGROUP);
        __m256i d16 = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(x[0]));
        for (int k = 1; k < 8; ++k) d16 = _mm256_add_epi16(d16, _mm256_maddubs_epi16(w[k], _mm256_set1_epi32(x[k])));
        const long tg = long(t) * groups + g;
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(d16, ones));
        acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sg, _mm256_set1_ps(xs[tg])), acc[t]);
        acc[t] = _mm256_fmadd_ps(mg, _mm256_set1_ps(xsum[tg]), acc[t]);
      }
    }
  };
  for (int u = 0; u < 8; ++u) {  // accumulator u: groups u, u + 8, …
    __m256 acc[TILE8_TOKENS];    // whole: loops of nt iterations here became rep stos / rep movs
    for (int t = 0; t < TILE8_TOKENS; ++t) acc[t] = _mm256_setzero_ps();
    for (int g = u; g < groups8; g += 8) add(acc, g);
    for (int t = 0; t < TILE8_TOKENS; ++t) lane_acc[u * TILE8_TOKENS + t] = acc[t];
  }
  for (int t = 0; t < nt; ++t) {  // sum8: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    const __m256* a = lane_acc + t;
    constexpr int L = TILE8_TOKENS;
    const __m256 even = _mm256_add_ps(_mm256_add_ps(a[0], a[4 * L]), _mm256_add_ps(a[2 * L], a[6 * L]));
    const __m256 odd = _mm256_add_ps(_mm256_add_ps(a[L], a[5 * L]), _mm256_add_ps(a[3 * L], a[7 * L]));
    out[t] = _mm256_add_ps(even, odd);
  }
  for (int g = groups8; g < groups; ++g) add(out, g);
}

// Rows [r0, r1) in tiles of 8 (the last may hold fewer: its missing lanes repeat its last row and
// are not stored), TILE8_TOKENS tokens per pass; passes of fewer than LANE8_TOKENS tokens row by row.
template <DType T>
void matmul_q(const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
              int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  if (n_tok < LANE8_TOKENS) return matmul_q_rows<T>(xq, xs, xsum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
  constexpr bool Q4 = T != DType::Q8;
  const int groups = n_in / QGROUP, pad = (groups + 7) / 8 * 8;
  static thread_local std::vector<float> buf;  // the tile's scales and mins group-major; tile8_scales' buffer
  buf.resize(size_t(pad) * 8 * 2 + 2 * size_t(tile8_plane_floats(groups)));
  float *s = buf.data(), *m = s + size_t(pad) * 8, *scratch = m + size_t(pad) * 8;
  const Act<T>* xt = xq;  // the tiles' activations: int8 weights' reordered
  if constexpr (!Q4) xt = pairs_interleaved(xq, long(n_tok) * groups);
  const long row_bytes = long(groups) * (Q4 ? QGROUP / 2 : QGROUP);
  for (int r = r0; r < r1; r += TILE8_ROWS) {
    const int rows = r1 - r < TILE8_ROWS ? r1 - r : TILE8_ROWS;
    long rg0[TILE8_ROWS];
    for (int i = 0; i < TILE8_ROWS; ++i) rg0[i] = long(r + (i < rows ? i : rows - 1)) * groups;
    tile8_scales<T>(W, groups, r, rows, s, m, scratch);
    const char* next = (const char*)W.data + long(r + rows) * row_bytes;  // the next tile's weights
    const long next_bytes = (r1 - r - rows < TILE8_ROWS ? r1 - r - rows : TILE8_ROWS) * row_bytes;
    for (int t0 = 0; t0 < n_tok; t0 += TILE8_TOKENS) {
      const int nt = n_tok - t0 < TILE8_TOKENS ? n_tok - t0 : TILE8_TOKENS;
      const long tg = long(t0) * groups;
      if (nt < LANE8_TOKENS) {
        matmul_q_rows<T>(xq + tg * QGROUP, xs + tg, Q4 ? xsum + tg : nullptr, W, b, y + long(t0) * ldy, nt, n_in, ldy,
                         r, r + rows, accumulate);
        continue;
      }
      __m256 lane_acc[8 * TILE8_TOKENS], acc[TILE8_TOKENS];
      tile8_dots<T>(nt, xt + tg * QGROUP, xs + tg, Q4 ? xsum + tg : nullptr, W, groups, rg0, s, m, next,
                    t0 == 0 ? next_bytes : 0, lane_acc, acc);
      for (int t = 0; t < nt; ++t) {
        alignas(32) float v[TILE8_ROWS];
        _mm256_store_ps(v, acc[t]);
        float* o = y + long(t0 + t) * ldy + r;
        for (int i = 0; i < rows; ++i) {
          const float e = v[i] + (b ? b[r + i] : 0.0f);
          o[i] = accumulate ? o[i] + e : e;
        }
      }
    }
  }
}
