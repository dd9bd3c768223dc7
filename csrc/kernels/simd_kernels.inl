// The SIMD kernels, written once over a vector type S and compiled once per instruction set:
// kernels_avx2.cpp and kernels_avx512.cpp each define S for their registers, then include this
// file inside their own namespace. The math matches the scalar twins in kernels_generic.cpp.
//
// S provides: N (lanes), V (register), zero(), set1(f), load(p), store(p, v), fma(a, b, c) = a·b + c,
// add, sub, mul, div, min, max, round, ldexp(v, n) = v·2^n, sum(v), sums(v[N]), hmax(v) (the largest lane),
// load_bf16(p), load_f16(p) (N halves → f32), load_i8(p) (N int8 → f32), store_bf16(p, v), store_f16(p, v) (f32 → N
// halves, rounded to nearest even); gemm.inl adds its own (GEMM_ROWS, GEMM_VECS, transpose).

// e^x = 2^n · e^r with n = round(x / ln 2), |r| ≤ ln2 / 2, e^r by its Taylor series to r^7
// (relative error below 2e-7 over the range); inputs clamped to where f32 e^x is finite.
inline V exp_impl(V x) {
  x = S::min(S::max(x, S::set1(-87.33654f)), S::set1(88.72283f));
  V n = S::round(S::mul(x, S::set1(1.44269504088896341f)));
  V r = S::fma(n, S::set1(-0.693145751953125f), x);
  r = S::fma(n, S::set1(-1.428606765330187045e-06f), r);
  V p = S::set1(1.0f / 5040);
  p = S::fma(p, r, S::set1(1.0f / 720));
  p = S::fma(p, r, S::set1(1.0f / 120));
  p = S::fma(p, r, S::set1(1.0f / 24));
  p = S::fma(p, r, S::set1(1.0f / 6));
  p = S::fma(p, r, S::set1(0.5f));
  p = S::fma(p, r, S::set1(1.0f));
  p = S::fma(p, r, S::set1(1.0f));
  return S::ldexp(p, n);
}

// Weight element loaders, so one matmul template serves f32, bf16 and f16 weights.
struct WeightF32 {
  using T = float;
  static V load(const T* p) { return S::load(p); }
  static float scalar(const T* p) { return *p; }
};
struct WeightBF16 {
  using T = uint16_t;
  static V load(const T* p) { return S::load_bf16(p); }
  static float scalar(const T* p) { return bf16_to_f32(*p); }
};
struct WeightF16 {
  using T = uint16_t;
  static V load(const T* p) { return S::load_f16(p); }
  static float scalar(const T* p) { return f16_to_f32(*p); }
};

// Decode steps fetch their weights this many elements ahead of use (f32 8 KB, bf16 and f16 4 KB),
// into L2: a fetch into L1 holds one of its few fill buffers until the line arrives, which caps
// the lines in flight per core. Measured on 2 threads (decode tok/s, medians of runs alternated
// with the last setting, 512 elements into L1): SmolLM2 bf16 AVX-512 63.5 → 75.5, AVX2 67.1 → 76.7,
// f32 46.2 → 48.2; Llama-3.2-1B's shapes bf16 8.0 → 9.7; SmolLM2 bf16 at depth 8160 39.9 → 41.5.
// 4096 elements ahead measured as 2048, 1024 between 512 and 2048.
constexpr int WEIGHT_PREFETCH = 2048;

// A row-wise product of several tokens (the decode steps of a batch, a float model's short prompt)
// takes ROW_BLOCK rows and up to ROW_PASS_TOKENS tokens per pass: two accumulators for each row
// and token, which leaves room for the rows' vectors and a token's (AVX-512 and NEON: 24 + 3 + 1
// of 32 registers; AVX2: 12 + 2 + 1 of 16), and loads ROW_BLOCK + ROW_PASS_TOKENS vectors per
// ROW_BLOCK · ROW_PASS_TOKENS FMAs.
constexpr int ROW_BLOCK = S::N == 8 ? 2 : 3;
constexpr int ROW_PASS_TOKENS = S::N == 8 ? 3 : 4;

// Keeps the compiler from folding a load into each of its uses (one load per FMA instead of one
// for all of them).
inline void keep_in_register(V& v) {
#if defined(__x86_64__)
  __asm__("" : "+v"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#endif
}

// out[i] = the lane sum of register vec(i) for i < ALL: S::sums N registers at a time, each sum by
// the same tree as one S::sum.
template <int ALL, class F>
inline void lane_sums(F vec, float* out) {
  constexpr int PASSES = (ALL + S::N - 1) / S::N;
  alignas(64) float sum[PASSES * S::N];
  for (int p = 0; p < PASSES; ++p) {
    V v[S::N];
    for (int c = 0; c < S::N; ++c) v[c] = p * S::N + c < ALL ? vec(p * S::N + c) : S::zero();
    S::store(sum + p * S::N, S::sums(v));
  }
  for (int i = 0; i < ALL; ++i) out[i] = sum[i];
}

// The part k ∈ [k0, k1) of row_dots<…, SPANS = true>'s sums: a part that starts past 0 takes its
// accumulators from carry, one that ends before n leaves them there (matmul_rows_spans).
struct RowSpan {
  int k0 = 0, k1 = 0;
  float* carry = nullptr;  // 2 · R · NT vectors
};

// s[r · NT + t] = Σ_k x[t, k] · w[r, k] for R rows (ldw apart) and NT tokens (ldx apart): each
// vector of the rows is loaded (and widened) once for all the tokens, each token's once for all
// the rows. A decode step of one sequence (R = 1) streams the weights one row after another, which
// the hardware prefetchers follow best (measured: 2× the bandwidth of four rows at a time). Each
// row and token sums in two accumulators, even and odd vectors, then sum(a0 + a1) and the scalar
// tail: the same operations whatever R and NT, so a decode step in a batch gets exactly what it
// gets alone.
template <class WL, int R, int NT, bool SPANS = false>
inline void row_dots(const float* x, long ldx, const typename WL::T* w, long ldw, int n, float* s,
                     const RowSpan& span = {}) {
  const int k0 = SPANS ? span.k0 : 0, k1 = SPANS ? span.k1 : n;
  V a0[R][NT], a1[R][NT];
  auto carried = [&](int r, int t) { return span.carry + 2 * (r * NT + t) * S::N; };  // a0, then a1
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t)
      if (!SPANS || k0 == 0) {
        a0[r][t] = a1[r][t] = S::zero();
      } else {
        a0[r][t] = S::load(carried(r, t));
        a1[r][t] = S::load(carried(r, t) + S::N);
      }
  auto step = [&](V(&a)[R][NT], int k) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = WL::load(w + r * ldw + k);
    for (int t = 0; t < NT; ++t) {
      V xv = S::load(x + t * ldx + k);
      if constexpr (R > 1) keep_in_register(xv);
      for (int r = 0; r < R; ++r) a[r][t] = S::fma(wv[r], xv, a[r][t]);
    }
  };
  // A block of rows fetches the next block into L2 only: its first pass over the tokens fetches all
  // of it, which into L1 stalls on the fill buffers (8 f32 decode steps, AVX-512: +17% in L2). Its
  // own rows it fetches into L1, OWN_ROWS_AHEAD bytes ahead of use.
  constexpr int OWN_ROWS_AHEAD = 512;
  const long ahead = R == 1 ? WEIGHT_PREFETCH : R * ldw;
  int k = k0;
  for (; k + 2 * S::N <= k1; k += 2 * S::N) {
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < int(2 * S::N * sizeof(*w)); b += 64) {
        __builtin_prefetch((const char*)(w + r * ldw + k + ahead) + b, 0, 2);
        if constexpr (R > 1) __builtin_prefetch((const char*)(w + r * ldw + k) + OWN_ROWS_AHEAD + b, 0, 3);
      }
    step(a0, k);
    step(a1, k + S::N);
  }
  if (SPANS && k1 < n) {  // a span ends at a multiple of 2N: the next one goes on with the same accumulators
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) {
        S::store(carried(r, t), a0[r][t]);
        S::store(carried(r, t) + S::N, a1[r][t]);
      }
    return;
  }
  if (k + S::N <= n) {
    step(a0, k);
    k += S::N;
  }
  // sum(a0 + a1) of every row and token: one by S::sum, more by lane_sums (the same tree)
  if constexpr (R * NT == 1) s[0] = S::sum(S::add(a0[0][0], a1[0][0]));
  else lane_sums<R * NT>([&](int i) { return S::add(a0[i / NT][i % NT], a1[i / NT][i % NT]); }, s);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) {
      float& o = s[r * NT + t];
      for (int j = k; j < n; ++j) o = std::fma(x[t * ldx + j], WL::scalar(w + r * ldw + j), o);  // fused alike always
    }
}

// row_dots for nt ≤ NT tokens, nt known only at run time.
template <class WL, int R, int NT = ROW_PASS_TOKENS, bool SPANS = false>
inline void row_dots_n(int nt, const float* x, long ldx, const typename WL::T* w, long ldw, int n, float* s,
                       const RowSpan& span = {}) {
  if constexpr (NT > 1)
    if (nt < NT) return row_dots_n<WL, R, NT - 1, SPANS>(nt, x, ldx, w, ldw, n, s, span);
  row_dots<WL, R, NT, SPANS>(x, ldx, w, ldw, n, s, span);
}

// y[t, r + i] (+)= s[i · nt + t] + b[r + i]: a pass's sums stored.
inline void store_pass(const float* s, int rows, int nt, const float* b, float* y, int ldy, int r, bool accumulate) {
  for (int i = 0; i < rows; ++i)
    for (int t = 0; t < nt; ++t) {
      float& o = y[long(t) * ldy + r + i];
      const float v = s[i * nt + t] + (b ? b[r + i] : 0.0f);
      o = accumulate ? o + v : v;
    }
}

// Rows [r, r + R) for every token, each pass's rows multiplied by ROW_PASS_TOKENS tokens while
// they are in L1.
template <class WL, int R>
inline void row_block(const float* x, const typename WL::T* W, const float* b, float* y, int n_tok, int n_in, int ldy,
                      int r, bool accumulate) {
  for (int t0 = 0; t0 < n_tok; t0 += ROW_PASS_TOKENS) {
    const int nt = std::min(ROW_PASS_TOKENS, n_tok - t0);
    float s[R * ROW_PASS_TOKENS];
    row_dots_n<WL, R>(nt, x + long(t0) * n_in, n_in, W + long(r) * n_in, n_in, n_in, s);
    store_pass(s, R, nt, b, y + long(t0) * ldy, ldy, r, accumulate);
  }
}

// Where the tokens' rows do not fit in L1 together (8 tokens of 1536 f32 are 48 KiB), every block
// of rows reads them all from L2 again. On the 8-lane sets the rows [r0, r1) then go ROW_CHUNK at a
// time, and a chunk's k in spans of ROW_SPAN_BYTES of the tokens' rows (ROW_SPAN_MIN k at least):
// each span's activations stay in L1 while all the chunk's rows pass over them, and each row block
// and pass carries its accumulators from one span to the next in `carry`. A span starts at a
// multiple of 2N, so every accumulator adds the same vectors in the same order as without spans:
// the same bits. Measured, one core, AVX2: 8 tokens of SmolLM2's 1536 f32 22 → 27 GMAC/s, 16 tokens
// 20 → 29; 8 tokens of Llama-3.2-1B's 2048 and 8192 bf16 22.5 → 25.5 and 27. Spans of fewer k lose
// to the carries (8 tokens of 576 in 512 + 64: 28 → 24; 16 tokens in 256s: −5%), so there are at
// least two of ROW_SPAN_MIN. Kept out of line: inlined into matmul_rows, it slowed the unspanned
// path (16 tokens of 576: 31.5 → 26). AVX-512 gains nothing at 8 tokens and loses at 16 (1B bf16
// 43 → 35): its passes take 3 rows and 4 tokens, and it keeps one span.
constexpr bool ROW_SPANS = S::N == 8;
constexpr int ROW_CHUNK = 96;              // rows, a multiple of ROW_BLOCK
constexpr long ROW_SPAN_BYTES = 16 << 10;  // of the tokens' activations per span
constexpr long ROW_SPAN_MIN = 512;         // k per span at least

template <class WL>
[[gnu::noinline]] void matmul_rows_spans(const float* x, const typename WL::T* W, const float* b, float* y, int n_tok,
                                         int n_in, int ldy, int r0, int r1, bool accumulate, int span) {
  const int passes = (n_tok + ROW_PASS_TOKENS - 1) / ROW_PASS_TOKENS;
  constexpr int PASS_CARRY = 2 * ROW_BLOCK * ROW_PASS_TOKENS * S::N;  // floats a row block's pass carries
  static thread_local std::vector<float> carry;  // for a chunk's blocks and single rows, every pass
  carry.resize(size_t(ROW_CHUNK / ROW_BLOCK + ROW_BLOCK - 1) * passes * PASS_CARRY);
  auto block = [&](auto rows, int r, int k0, int k1, float* at) {  // a block of rows, every pass
    constexpr int R = decltype(rows)::value;
    for (int t0 = 0; t0 < n_tok; t0 += ROW_PASS_TOKENS, at += PASS_CARRY) {
      const int nt = std::min(ROW_PASS_TOKENS, n_tok - t0);
      float s[R * ROW_PASS_TOKENS];
      row_dots_n<WL, R, ROW_PASS_TOKENS, true>(nt, x + long(t0) * n_in, n_in, W + long(r) * n_in, n_in, n_in, s,
                                               {k0, k1, at});
      if (k1 == n_in) store_pass(s, R, nt, b, y + long(t0) * ldy, ldy, r, accumulate);
    }
  };
  for (int c0 = r0; c0 < r1; c0 += ROW_CHUNK) {
    const int c1 = std::min(r1, c0 + ROW_CHUNK);
    for (int k0 = 0; k0 < n_in; k0 += span) {
      const int k1 = n_in - k0 > span ? k0 + span : n_in;
      float* at = carry.data();
      int r = c0;
      for (; r + ROW_BLOCK <= c1; r += ROW_BLOCK, at += passes * PASS_CARRY)
        block(std::integral_constant<int, ROW_BLOCK>{}, r, k0, k1, at);
      for (; r < c1; ++r, at += passes * PASS_CARRY) block(std::integral_constant<int, 1>{}, r, k0, k1, at);
    }
  }
}

// A few tokens (decode steps, a float model's short prompts; Kernels::matmul sends batches of
// GEMM_MIN_TOKENS or more to the GEMM): one token row by row, more ROW_BLOCK rows at a time.
template <class WL>
void matmul_rows(const float* x, const typename WL::T* W, const float* b, float* y, int n_tok, int n_in, int ldy,
                 int r0, int r1, bool accumulate) {
  if constexpr (ROW_SPANS)
    if (n_tok > 1 && long(n_tok) * n_in * long(sizeof(float)) > 2 * ROW_SPAN_BYTES) {
      long span = ROW_SPAN_BYTES / (long(n_tok) * sizeof(float));
      span = (span > ROW_SPAN_MIN ? span : ROW_SPAN_MIN) / (2 * S::N) * (2 * S::N);
      if (n_in >= 2 * span) return matmul_rows_spans<WL>(x, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate, int(span));
    }
  int r = r0;
  if (n_tok > 1)
    for (; r + ROW_BLOCK <= r1; r += ROW_BLOCK) row_block<WL, ROW_BLOCK>(x, W, b, y, n_tok, n_in, ldy, r, accumulate);
  for (; r < r1; ++r) row_block<WL, 1>(x, W, b, y, n_tok, n_in, ldy, r, accumulate);
}

#include "kernels/gemm.inl"

// Batches take the GEMM; int8/int4 weights with f32 activations do too (a few tokens of a
// quantized model come with int16 activations, to matmul_q8/q4, instead).
inline bool takes_gemm(const WeightsRef& W, int n_tok) { return n_tok >= GEMM_MIN_TOKENS || is_quantized(W.dtype); }

void gemv(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
          bool accumulate) {
  switch (W.dtype) {
    case DType::F32: return matmul_rows<WeightF32>(x, (const float*)W.data, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    case DType::BF16:
      return matmul_rows<WeightBF16>(x, (const uint16_t*)W.data, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    case DType::F16:
      return matmul_rows<WeightF16>(x, (const uint16_t*)W.data, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
    default: {  // int8/int4 with f32 activations (the model gives them int16 ones): a row at a time in f32
      static thread_local std::vector<float> row;
      row.resize(n_in);
      for (int r = r0; r < r1; ++r) {
        dequantize_row(W, n_in, r, row.data());
        matmul_rows<WeightF32>(x, row.data(), b ? b + r : nullptr, y + r, n_tok, n_in, ldy, 0, 1, accumulate);
      }
    }
  }
}

void matmul(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
            bool accumulate) {
  if (takes_gemm(W, n_tok))
    return gemm_packed(gemm_pack(x, n_tok, n_in), W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
  gemv(x, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_many(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count) {
  const float* xt = nullptr;  // laid out on the first matrix that takes the GEMM
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (takes_gemm(o.W, n_tok)) {
      if (!xt) xt = gemm_pack(x, n_tok, n_in);
      gemm_packed(xt, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
    } else {
      matmul(x, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
    }
  }
}

// Σ a[k] · b[k], b in the element type E (WeightF32, WeightBF16, WeightF16): two accumulators.
template <class E = WeightF32>
inline float dot(const float* a, const typename E::T* b, int n) {
  V acc0 = S::zero(), acc1 = S::zero();
  int k = 0;
  for (; k + 2 * S::N <= n; k += 2 * S::N) {
    acc0 = S::fma(S::load(a + k), E::load(b + k), acc0);
    acc1 = S::fma(S::load(a + k + S::N), E::load(b + k + S::N), acc1);
  }
  for (; k + S::N <= n; k += S::N) acc0 = S::fma(S::load(a + k), E::load(b + k), acc0);
  float s = S::sum(S::add(acc0, acc1));
  for (; k < n; ++k) s += a[k] * E::scalar(b + k);
  return s;
}

void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
  const float inv = 1.0f / std::sqrt(dot(x, x, n) / n + eps);
  const V vinv = S::set1(inv);
  int i = 0;
  for (; i + S::N <= n; i += S::N) S::store(out + i, S::mul(S::mul(S::load(x + i), vinv), S::load(w + i)));
  for (; i < n; ++i) out[i] = x[i] * inv * w[i];
}

void rope(float* v, const float* cos, const float* sin, int d) {
  const int h = d / 2;
  int i = 0;
  for (; i + S::N <= h; i += S::N) {
    V a = S::load(v + i), b = S::load(v + h + i), c = S::load(cos + i), s = S::load(sin + i);
    S::store(v + i, S::sub(S::mul(a, c), S::mul(b, s)));
    S::store(v + h + i, S::fma(a, s, S::mul(b, c)));
  }
  for (; i < h; ++i) {
    float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i] + a * sin[i];
  }
}

// The int8 KV cache's rows (kernels.h): code · its group's scale.
struct KvQ8 {
  using T = int8_t;
};
// Elements [i, i + N) (or element i) of a KV row of d elements of a cache of element type E, as f32.
// A vector lies within one group of an int8 row (N divides KV_GROUP). kv_scale is the scale of the
// group element i lies in, broadcast (int8 rows; other types have none), and kv_load_at the vector
// times it: a loop over a group's vectors derives the scale once. kv_load does both.
template <class E>
inline V kv_scale(const typename E::T* row, int i, int d) {
  if constexpr (std::is_same_v<E, KvQ8>) return S::set1(kv_group_scale(row, i, d));
  else return S::zero();
}
template <class E>
inline V kv_load_at(const typename E::T* row, int i, V scale) {
  if constexpr (std::is_same_v<E, KvQ8>) return S::mul(S::load_i8(row + i), scale);
  else return E::load(row + i);
}
template <class E>
inline V kv_load(const typename E::T* row, int i, int d) {
  return kv_load_at<E>(row, i, kv_scale<E>(row, i, d));
}
template <class E>
inline float kv_scalar(const typename E::T* row, int i, int d) {
  if constexpr (std::is_same_v<E, KvQ8>) return row[i] * kv_group_scale(row, i, d);
  else return E::scalar(row + i);
}
// Σ q[i] · row[i] over a KV row of d elements: dot<E>'s two accumulators, read through kv_load.
template <class E>
inline float kv_dot(const float* q, const typename E::T* row, int d) {
  V acc0 = S::zero(), acc1 = S::zero();
  int i = 0;
  for (; i + 2 * S::N <= d; i += 2 * S::N) {
    acc0 = S::fma(S::load(q + i), kv_load<E>(row, i, d), acc0);
    acc1 = S::fma(S::load(q + i + S::N), kv_load<E>(row, i + S::N, d), acc1);
  }
  for (; i + S::N <= d; i += S::N) acc0 = S::fma(S::load(q + i), kv_load<E>(row, i, d), acc0);
  float s = S::sum(S::add(acc0, acc1));
  for (; i < d; ++i) s += q[i] * kv_scalar<E>(row, i, d);
  return s;
}

// The cache's element type as a loader (WeightF32, WeightBF16, WeightF16, KvQ8), for f(E{}).
template <class F>
inline auto with_kv_type(DType t, F f) {
  if (t == DType::BF16) return f(WeightBF16{});
  if (t == DType::F16) return f(WeightF16{});
  if (t == DType::Q8) return f(KvQ8{});
  return f(WeightF32{});
}

// A decode step's attention (attention_part) in one pass over the keys, a tile of S::N keys at a
// time, for a GQA group's heads up to ATT_HEADS at a time: each tile's scores, the softmax's
// running maximum and sum (the sums so far rescaled when the maximum grows, as flash attention's
// online softmax does), then the tile's values weighted into the outputs. Each key and value vector
// is loaded (and widened from a compact cache) once for all the heads, and a tile's N scores per
// head come out in one register (S::sums), with no work per key outside the vectors. Scores in
// sub-tiles of ATT_KEYS keys, values ATT_VECS vectors of the output wide: up to ATT_HEADS · ATT_KEYS
// (or ATT_VECS) accumulators, in a loop order that fits the registers (att_fits). On AVX2 4 heads'
// 16 accumulators spill either way; 2 keys and 2 vectors there measured slower than 4 (SmolLM2's
// shapes at depth 8160, one thread over a part in L2: 3 heads 12.3 → 14.6 GB/s, 4 heads 10.5 →
// 11.3; 2 threads from memory, 3 heads 15.8 → 17.2).
//
// A tile's keys and values are fetched ATT_FETCH_BYTES ahead of where the kernel reads, in the
// order it works through the runs (a KV head's rows of a block): each tile fetches the same rows of
// the run that far on into L2, and the keys of its own head's next block from there into L1, a row
// at a time as it weights its values, so that the fetches never queue up in a burst ahead of the
// loads; its own values go into L1 as its scores are worked out. A head's rows of a block are a few
// KB, its blocks anywhere in the pool: too short a run for the hardware prefetchers alone.
//
// A call takes up to ATT_KV_HEADS KV heads (a layer's, usually) a block at a time: head after head
// through a block, whose rows of all the heads lie together (KvCache: 12 KB of SmolLM2's f16 cache
// in two runs), rather than one head through all its blocks (2 KB runs 6 KB apart).
//
// Measured on SmolLM2's shapes at depth 8160 (30 layers, 9 heads, 3 KV heads, d 64, an f16 cache),
// the layers' attention alone, 2 threads from memory, variants alternated in one process:
// - one pass (online softmax) against two (scores stored, then values): AVX-512 15.2 → 19.5 GB/s,
//   AVX2 13.6 → 15.1; the next block's keys into L1 as well: 19.9 → 21.5, 14.9 → 15.5.
// - a block at a time through the KV heads against a head at a time (Zen 3): 7.6 → 10.7 GB/s
//   median; then each tile's own values into L1 rather than the next block's: 9.4 → 12.8.
// - the far fetch 12 KB ahead against 2 blocks of the same head (24 KB here, 64 KB for
//   Llama-3.2-1B's 8 KV heads: Zen 1-3 take PREFETCHT1 into their 32 KB L1 too, only Zen 4 keeps it
//   in L2): Zen 3 9.9 → 11.0, Llama-3.2-1B's shapes 8.7 → 9.3; on a Xeon 8-16 KB ahead were alike.
//   6 and 24 KB measured as 12, PREFETCHT2 and PREFETCHNTA as PREFETCHT1; no fetches 12-17% slower.
// Zen 3, 2 threads: the kernel reads at 70-78% of a plain read of the same bytes alternated with it.
constexpr int ATT_HEADS = 4;
constexpr int ATT_KEYS = 4;
constexpr int ATT_VECS = 4;
constexpr long ATT_FETCH_BYTES = 12 << 10;  // how far ahead a tile fetches (into L2)
constexpr int ATT_KV_HEADS = 8;             // KV heads a pass takes a block at a time
// Whether HN · W accumulators, W rows' vectors and a query vector (or weight) fit in the registers
// at once; where not (AVX2's 16, 3 heads: 17), the loops hold the HN heads' vectors and load a row's
// vector at a time (16). AVX2, 3 heads, one thread over a part in L2 ~1.2x, 2 threads from memory
// ~1.05x (Zen 3).
constexpr bool att_fits(int hn, int w) { return hn * w + w + 1 <= S::REGS; }

// f(std::integral_constant<int, hn>) for hn in 1 … ATT_HEADS: the head count as a constant.
template <class F>
inline void with_heads(int hn, F f) {
  if (hn == 1) f(std::integral_constant<int, 1>{});
  else if (hn == 2) f(std::integral_constant<int, 2>{});
  else if (hn == 3) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 4>{});
}

// s[h][u] = scale · K_u · q_h for the keys u < count ≤ N of a tile (rows ld elements apart, d a
// multiple of N) and HN heads (q rows ldq apart). Each score is one accumulator over the dimensions
// in order, its lanes then added by S::sums' tree: the same whatever the tile. FULL: count = N. A
// partial tile reads no row past its count and leaves s[h][count …] unset.
template <class E, int HN, bool FULL>
inline void score_tile(const float* q, int ldq, const typename E::T* K, long ld, int d, int count, V scale,
                       float (*s)[S::N]) {
  V a[HN][S::N];
  for (int u0 = 0; u0 < S::N; u0 += ATT_KEYS) {
    V acc[ATT_KEYS][HN];
    for (int u = 0; u < ATT_KEYS; ++u)
      for (int h = 0; h < HN; ++h) acc[u][h] = S::zero();
    V sc[ATT_KEYS] = {};  // int8 rows: each key's scale of the group i lies in
    if (FULL || u0 < count)
      for (int i = 0; i < d; i += S::N) {
        if constexpr (std::is_same_v<E, KvQ8>)
          if (i % KV_GROUP == 0)
            for (int u = 0; u < ATT_KEYS; ++u)
              if (FULL || u0 + u < count) sc[u] = kv_scale<E>(K + (u0 + u) * ld, i, d);
        auto key = [&](int u) {
          return FULL || u0 + u < count ? kv_load_at<E>(K + (u0 + u) * ld, i, sc[u]) : S::zero();
        };
        if constexpr (att_fits(HN, ATT_KEYS)) {  // the keys' vectors loaded once, a query vector at a time
          V k[ATT_KEYS];
          for (int u = 0; u < ATT_KEYS; ++u) k[u] = key(u);
          for (int h = 0; h < HN; ++h) {
            const V qv = S::load(q + (long)h * ldq + i);
            for (int u = 0; u < ATT_KEYS; ++u) acc[u][h] = S::fma(qv, k[u], acc[u][h]);
          }
        } else {  // the heads' query vectors held, a key vector at a time
          V qv[HN];
          for (int h = 0; h < HN; ++h) qv[h] = S::load(q + (long)h * ldq + i);
          for (int u = 0; u < ATT_KEYS; ++u) {
            const V k = key(u);
            for (int h = 0; h < HN; ++h) acc[u][h] = S::fma(qv[h], k, acc[u][h]);
          }
        }
      }
    for (int u = 0; u < ATT_KEYS; ++u)
      for (int h = 0; h < HN; ++h) a[h][u0 + u] = acc[u][h];
  }
  for (int h = 0; h < HN; ++h) S::store(s[h], S::mul(S::sums(a[h]), scale));
}

// The rows a tile fetches as it goes (attend_run): far ATT_FETCH_BYTES on (attention_heads), keys
// and values into L2; near in its head's next block, keys into L1 (a tile's values go into L1 as
// its scores are worked out). Each at the tile's own rows; null where they lie past the keys.
template <class T>
struct AttFetch {
  const T *far_k = nullptr, *far_v = nullptr, *near_k = nullptr;
  AttFetch at(long offset) const {
    auto off = [&](const T* p) { return p ? p + offset : nullptr; };
    return {off(far_k), off(far_v), off(near_k)};
  }
};

// o[h][i, i + NV·N) += Σ_u p[h][u] · V_u over the count value rows u of a tile (ld elements apart) for
// HN heads: each value vector loaded once for all the heads. Row u of each of fetch's rows is
// fetched as row u's values are used.
template <class E, int HN, int NV>
inline void tile_values(const float (*p)[S::N], float* const* o, const typename E::T* Vr, long ld, int count, int d,
                        int i, const AttFetch<typename E::T>& fetch) {
  V acc[HN][NV];
  for (int h = 0; h < HN; ++h)
    for (int c = 0; c < NV; ++c) acc[h][c] = S::load(o[h] + i + c * S::N);
  const long bytes = ld * (long)sizeof *Vr;  // of a row
  for (int u = 0; u < count; ++u) {
    if (fetch.far_k)
      for (long b = 0; b < bytes; b += 64) {
        __builtin_prefetch((const char*)(fetch.far_k + u * ld) + b, 0, 2);
        __builtin_prefetch((const char*)(fetch.far_v + u * ld) + b, 0, 2);
      }
    if (fetch.near_k)
      for (long b = 0; b < bytes; b += 64) __builtin_prefetch((const char*)(fetch.near_k + u * ld) + b, 0, 3);
    V sc[NV] = {};  // int8 rows: the scale of the group each vector lies in, derived once per group
    if constexpr (std::is_same_v<E, KvQ8>)
      for (int c = 0; c < NV; ++c)
        sc[c] = c > 0 && (i + c * S::N) % KV_GROUP != 0 ? sc[c - 1] : kv_scale<E>(Vr + u * ld, i + c * S::N, d);
    if constexpr (att_fits(HN, NV)) {  // the row's vectors loaded once, a head's weight at a time
      V v[NV];
      for (int c = 0; c < NV; ++c) v[c] = kv_load_at<E>(Vr + u * ld, i + c * S::N, sc[c]);
      for (int h = 0; h < HN; ++h) {
        const V w = S::set1(p[h][u]);
        for (int c = 0; c < NV; ++c) acc[h][c] = S::fma(w, v[c], acc[h][c]);
      }
    } else {  // the heads' weights held, a value vector at a time
      V w[HN];
      for (int h = 0; h < HN; ++h) w[h] = S::set1(p[h][u]);
      for (int c = 0; c < NV; ++c) {
        const V v = kv_load_at<E>(Vr + u * ld, i + c * S::N, sc[c]);
        for (int h = 0; h < HN; ++h) acc[h][c] = S::fma(w[h], v, acc[h][c]);
      }
    }
  }
  for (int h = 0; h < HN; ++h)
    for (int c = 0; c < NV; ++c) S::store(o[h] + i + c * S::N, acc[h][c]);
}

// The running softmax of HN heads of one KV head over the keys so far (attention_heads): each
// head's maximum score, its sum of e^(s − max) in the lanes of a vector, and its output row.
template <class T, int HN>
struct AttRun {
  const float* q;
  KvHead kv;
  float* probs;  // [HN][k1 − k0], or null
  float* o[HN];
  float mx[HN];
  V sum[HN];
};

// Run r's keys and values (rows positions from key j0, within one block) into a head group's
// running softmax r (AttRun), fetching fetch's rows as it goes.
template <class E, int HN>
inline void attend_run(AttRun<typename E::T, HN>& r, int ldq, int j0, int rows, int k0, int k1, int d, V vscale,
                       float scale, const AttFetch<typename E::T>& fetch) {
  using T = typename E::T;
  const KvHead& kv = r.kv;
  const T* K = kv.key<T>(j0);
  const T* Vr = kv.value<T>(j0);
  for (int j = 0; j < rows; j += S::N) {
    const int count = std::min(rows - j, S::N);
    alignas(64) float s[HN][S::N];   // the scores, then the softmax's numerators
    for (int u = 0; u < count; ++u)  // the tile's value rows into L1 while its scores are worked out
      for (long b = 0; b < kv.ld * (long)sizeof(T); b += 64)
        __builtin_prefetch((const char*)(Vr + (j + u) * kv.ld) + b, 0, 3);
    if (d % S::N != 0) {
      for (int h = 0; h < HN; ++h)
        for (int u = 0; u < count; ++u) s[h][u] = scale * kv_dot<E>(r.q + (long)h * ldq, K + (j + u) * kv.ld, d);
    } else if (count == S::N) {
      score_tile<E, HN, true>(r.q, ldq, K + j * kv.ld, kv.ld, d, count, vscale, s);
    } else {
      score_tile<E, HN, false>(r.q, ldq, K + j * kv.ld, kv.ld, d, count, vscale, s);
    }
    for (int h = 0; h < HN; ++h) {
      if (r.probs) std::memcpy(r.probs + (long)h * (k1 - k0) + (j0 - k0) + j, s[h], count * sizeof(float));
      for (int u = count; u < S::N; ++u) s[h][u] = -INFINITY;
      const float top = S::hmax(S::load(s[h]));
      if (top > r.mx[h]) {  // a new maximum: the sums so far scaled to it
        const float f = std::exp(r.mx[h] - top);
        r.sum[h] = S::mul(r.sum[h], S::set1(f));
        for (int i = 0; i < d; ++i) r.o[h][i] *= f;
        r.mx[h] = top;
      }
      V e = exp_impl(S::sub(S::load(s[h]), S::set1(r.mx[h])));
      S::store(s[h], e);
      if (count < S::N) {  // past the keys: weight 0 (exp_impl's floor is not)
        for (int u = count; u < S::N; ++u) s[h][u] = 0;
        e = S::load(s[h]);
      }
      r.sum[h] = S::add(r.sum[h], e);
    }
    AttFetch<T> f = fetch.at(j * kv.ld);  // with the first pass over the values only
    int i = 0;
    for (; i + ATT_VECS * S::N <= d; i += ATT_VECS * S::N, f = {})
      tile_values<E, HN, ATT_VECS>(s, r.o, Vr + j * kv.ld, kv.ld, count, d, i, f);
    for (; i + S::N <= d; i += S::N, f = {}) tile_values<E, HN, 1>(s, r.o, Vr + j * kv.ld, kv.ld, count, d, i, f);
    for (; i < d; ++i)  // the dimensions past the last vector
      for (int h = 0; h < HN; ++h)
        for (int u = 0; u < count; ++u) r.o[h][i] += s[h][u] * kv_scalar<E>(Vr + (j + u) * kv.ld, i, d);
  }
}

// attention_part (kernels.h) for HN heads of each of kv_heads ≤ ATT_KV_HEADS KV heads (heads h0 …
// h0 + HN of each group): a block at a time through the KV heads, each with its own running softmax.
template <class E, int HN>
void attention_heads(const float* q, int ldq, int heads, int kv_heads, const KvHead& kv, int k0, int k1, int d,
                     float scale, float* probs, float* out, int ldo, long kv_stride, float* m, float* l) {
  using T = typename E::T;
  const int n = k1 - k0;
  const V vscale = S::set1(scale);
  AttRun<T, HN> run[ATT_KV_HEADS];
  for (int g = 0; g < kv_heads; ++g) {
    AttRun<T, HN>& r = run[g];
    r.q = q + (long)g * heads * ldq, r.kv = kv.of(g), r.probs = probs ? probs + (long)g * heads * n : nullptr;
    for (int h = 0; h < HN; ++h) {
      r.mx[h] = -INFINITY, r.sum[h] = S::zero(), r.o[h] = out + g * kv_stride + (long)h * ldo;
      for (int i = 0; i < d; ++i) r.o[h][i] = 0;
    }
  }
  // A run (a KV head's keys and values in a block) fetches the run far_runs on in the order they
  // are worked (block by block, KV head by KV head): ATT_FETCH_BYTES ahead.
  const long run_bytes = 2L * kv.block_rows * kv.ld * (long)sizeof(T);
  const int far_runs = (int)std::max(1L, ATT_FETCH_BYTES / run_bytes);
  kv.each_run(k0, k1, [&](int j0, int rows) {
    for (int g = 0; g < kv_heads; ++g) {
      AttFetch<T> fetch;  // at the same rows of their blocks as this run
      const int ahead = g + far_runs, far = j0 + ahead / kv_heads * kv.block_rows;
      if (far < k1) {
        const KvHead& f = run[ahead % kv_heads].kv;
        fetch.far_k = f.key<T>(far), fetch.far_v = f.value<T>(far);
      }
      if (const int near = j0 + kv.block_rows; near < k1) {
        const KvHead& h = run[g].kv;
        fetch.near_k = h.key<T>(near);
      }
      attend_run<E, HN>(run[g], ldq, j0, rows, k0, k1, d, vscale, scale, fetch);
    }
  });
  for (int g = 0; g < kv_heads; ++g)
    for (int h = 0; h < HN; ++h) {
      const AttRun<T, HN>& r = run[g];
      m[g * kv_stride + h] = r.mx[h], l[g * kv_stride + h] = S::sum(r.sum[h]);
      if (!r.probs) continue;
      float* pr = r.probs + (long)h * n;  // the scores → e^(s − m)
      const V vm = S::set1(r.mx[h]);
      int j = 0;
      for (; j + S::N <= n; j += S::N) S::store(pr + j, exp_impl(S::sub(S::load(pr + j), vm)));
      for (; j < n; ++j) pr[j] = std::exp(pr[j] - r.mx[h]);
    }
}

void attention_part(const float* q, int ldq, int heads, int kv_heads, const KvHead& kv, int k0, int k1, int d,
                    float scale, float* probs, float* out, int ldo, long kv_stride, float* m, float* l) {
  with_kv_type(kv.dtype, [&](auto e) {
    for (int g0 = 0; g0 < kv_heads; g0 += ATT_KV_HEADS)
      for (int h0 = 0; h0 < heads; h0 += ATT_HEADS)
        with_heads(std::min(heads - h0, ATT_HEADS), [&](auto hn) {
          const long g = g0, n = k1 - k0;
          attention_heads<decltype(e), decltype(hn)::value>(
              q + (g * heads + h0) * ldq, ldq, heads, std::min(kv_heads - g0, ATT_KV_HEADS), kv.of(g0), k0, k1, d,
              scale, probs ? probs + (g * heads + h0) * n : nullptr, out + g * kv_stride + (long)h0 * ldo, ldo,
              kv_stride, m + g * kv_stride + h0, l + g * kv_stride + h0);
        });
  });
}

// Causal attention with the queries in the lanes: scoresᵀ[j] = K[j] · Qᵀ (a key row broadcast
// against QW queries at once), a softmax down each lane, then outᵀ[i] = Σ_j V[j, i] · pᵀ[j]. A pass
// takes 16 queries (an attention work item's worth) as QV vectors, so that each broadcast feeds QV
// FMAs: on AVX2, 6 rows × 2 vectors = 12 accumulators where 8 rows × 1 vector load as often as they
// multiply (SmolLM2 prompt attention, one thread: 1.4× faster).
namespace att {

constexpr int QV = 16 / S::N;  // query vectors per pass
constexpr int QW = QV * S::N;  // queries per pass: the floats of a row of scores
// rows (keys or output dims) per register tile, for AR · QV accumulators: as many as the GEMM's
// tile where a pass takes several vectors (12 of AVX2's 16 registers, 24 of NEON's 32), 16 on AVX-512
constexpr int AR = QV == 1 ? 16 : S::GEMM_ROWS * S::GEMM_VECS / QV;

// acc[r][v] += Σ_k A[r·lda + k·ka] · B[k·QW + v·N] for R rows: A's elements broadcast against QV
// vectors of B's rows.
template <int R>
inline void rows_tile(const float* A, long lda, long ka, const float* B, int kn, V (*acc)[QV]) {
  V a[R][QV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < QV; ++v) a[r][v] = acc[r][v];
  for (int k = 0; k < kn; ++k) {
    V b[QV];
    for (int v = 0; v < QV; ++v) b[v] = S::load(B + (long)k * QW + v * S::N);
    for (int r = 0; r < R; ++r) {
      const V x = S::set1(A[r * lda + k * ka]);
      for (int v = 0; v < QV; ++v) a[r][v] = S::fma(x, b[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < QV; ++v) acc[r][v] = a[r][v];
}

template <int R = AR>
inline void rows_any(int rows, const float* A, long lda, long ka, const float* B, int kn, V (*acc)[QV]) {
  if constexpr (R > 1)
    if (rows < R) return rows_any<R - 1>(rows, A, lda, ka, B, kn, acc);
  rows_tile<R>(A, lda, ka, B, kn, acc);
}

// The scores st [n][N] (rows ld floats apart) of N queries in the lanes, lane l seeing keys
// [0, first + l) → their softmax weights, not yet normalised (the later keys of each lane exactly
// 0); returns each lane's 1 / Σ weights. probs, when not null, receives lane l's normalised weights
// in row l (ldp apart), for the first `lanes` lanes.
inline V softmax_lanes(float* st, int n, int first, int lanes, float* probs, long ldp, long ld = S::N) {
  for (int j = first; j < n; ++j)  // the keys past each lane
    for (int l = 0; l < j - first + 1 && l < S::N; ++l) st[j * ld + l] = -INFINITY;
  V mx = S::set1(-INFINITY), sum = S::zero();
  for (int j = 0; j < n; ++j) mx = S::max(mx, S::load(st + j * ld));
  for (int j = 0; j < n; ++j) {
    const V e = exp_impl(S::sub(S::load(st + j * ld), mx));
    S::store(st + j * ld, e);
  }
  for (int j = first; j < n; ++j)  // exp_impl clamps: make the masked weights exactly 0
    for (int l = 0; l < j - first + 1 && l < S::N; ++l) st[j * ld + l] = 0.0f;
  for (int j = 0; j < n; ++j) sum = S::add(sum, S::load(st + j * ld));
  const V inv = S::div(S::set1(1.0f), sum);
  if (probs) {
    alignas(64) float w[S::N];
    for (int j = 0; j < n; ++j) {
      S::store(w, S::mul(S::load(st + j * ld), inv));
      for (int l = 0; l < lanes; ++l)
        if (j < first + l) probs[l * ldp + j] = w[l];
    }
  }
  return inv;
}

}  // namespace att

// attention_causal over keys and values in f32 (kv.dtype F32).
void attention_causal_f32(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale,
                          float* scratch, float* out, int ldo, float* probs, long ldp) {
  using namespace att;
  static_assert(QW <= 16, "attention_scratch_floats holds 16 lanes");
  for (int q0 = 0; q0 < nq; q0 += QW) {
    const int lanes = nq - q0 < QW ? nq - q0 : QW, first = ctx0 + q0, n = first + lanes - 1;
    float* st = scratch;                 // [n][QW] scores, then probabilities
    float* qt = scratch + (long)n * QW;  // [d][QW] the queries, scaled, transposed
    for (int i = 0; i < d; ++i)
      for (int l = 0; l < QW; ++l) qt[i * QW + l] = l < lanes ? scale * Q[(long)(q0 + l) * ldq + i] : 0.0f;
    V acc[AR][QV];
    for (int b0 = 0; b0 < n; b0 += kv.block_rows) {  // register tiles of keys within a cache block
      const int b1 = n - b0 < kv.block_rows ? n : b0 + kv.block_rows;
      for (int j = b0; j < b1; j += AR) {
        const int rows = b1 - j < AR ? b1 - j : AR;
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v < QV; ++v) acc[r][v] = S::zero();
        rows_any(rows, kv.key<float>(j), d, 1, qt, d, acc);
        for (int r = 0; r < rows; ++r)
          for (int v = 0; v < QV; ++v) S::store(st + (long)(j + r) * QW + v * S::N, acc[r][v]);
      }
    }
    V inv[QV];
    for (int v = 0; v < QV; ++v) {  // each vector's lanes: queries q0 + v·N …
      const int vl = lanes - v * S::N;
      inv[v] = vl > 0 ? softmax_lanes(st + v * S::N, n, first + v * S::N, vl < S::N ? vl : S::N,
                                      probs ? probs + (long)(q0 + v * S::N) * ldp : nullptr, ldp, QW)
                      : S::zero();
    }
    alignas(64) float o[AR * QW];
    for (int i = 0; i < d; i += AR) {
      const int rows = d - i < AR ? d - i : AR;
      for (int r = 0; r < rows; ++r)
        for (int v = 0; v < QV; ++v) acc[r][v] = S::zero();
      for (int b0 = 0; b0 < n; b0 += kv.block_rows) {
        const int nb = n - b0 < kv.block_rows ? n - b0 : kv.block_rows;
        rows_any(rows, kv.value<float>(b0) + i, 1, d, st + (long)b0 * QW, nb, acc);
      }
      for (int r = 0; r < rows; ++r)
        for (int v = 0; v < QV; ++v) S::store(o + r * QW + v * S::N, S::mul(acc[r][v], inv[v]));
      for (int l = 0; l < lanes; ++l)
        for (int r = 0; r < rows; ++r) out[(long)(q0 + l) * ldo + i + r] = o[r * QW + l];
    }
  }
}

// A compact cache's keys and values are widened to f32 once per call, a vector at a time, into the
// scratch past what attention_causal_f32 uses: its tiles broadcast single elements, which widened one
// by one cost more than the products (AVX2, SmolLM2 bf16 pp256 with an f16 cache: 695 tok/s, with
// an f32 one 775). The values are exact in f32, so the sums are those of the compact cache.
void attention_causal(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale, float* scratch,
                      float* out, int ldo, float* probs, long ldp) {
  if (kv.dtype == DType::F32)
    return attention_causal_f32(Q, ldq, nq, ctx0, kv, d, scale, scratch, out, ldo, probs, ldp);
  const long n = ctx0 + nq - 1, rows = kv_rows_aligned(n);
  float* keys = scratch + attention_tile_floats(n, d);
  float* values = keys + rows * d;
  with_kv_type(kv.dtype, [&](auto e) {
    using E = decltype(e);
    using T = typename E::T;
    for (long j = 0; j < n; ++j) {
      const T *k = kv.key<T>(j), *v = kv.value<T>(j);
      float *kf = keys + j * d, *vf = values + j * d;
      int i = 0;
      for (; i + S::N <= d; i += S::N) S::store(kf + i, kv_load<E>(k, i, d)), S::store(vf + i, kv_load<E>(v, i, d));
      for (; i < d; ++i) kf[i] = kv_scalar<E>(k, i, d), vf[i] = kv_scalar<E>(v, i, d);
    }
  });
  const void* block = keys;
  const KvHead widened{&block, 0, rows * d, int(rows), d, DType::F32};
  attention_causal_f32(Q, ldq, nq, ctx0, widened, d, scale, scratch, out, ldo, probs, ldp);
}

void convert_row(const float* x, void* out, DType to, int n) {
  int i = 0;
  if (to == DType::BF16) {
    uint16_t* o = (uint16_t*)out;
    for (; i + S::N <= n; i += S::N) S::store_bf16(o + i, S::load(x + i));
    for (; i < n; ++i) o[i] = f32_to_bf16(x[i]);
  } else if (to == DType::F16) {
    uint16_t* o = (uint16_t*)out;
    for (; i + S::N <= n; i += S::N) S::store_f16(o + i, S::load(x + i));
    for (; i < n; ++i) o[i] = f32_to_f16(x[i]);
  } else if (to == DType::Q8) {
    quantize_kv_row(x, (int8_t*)out, n);  // a few rows per token and layer: scalar
  } else {
    std::memcpy(out, x, sizeof(float) * n);
  }
}

void silu_mul(float* g, const float* u, int n) {
  const V one = S::set1(1.0f), zero = S::zero();
  int i = 0;
  for (; i + S::N <= n; i += S::N) {
    V x = S::load(g + i);
    V e = exp_impl(S::sub(zero, x));
    S::store(g + i, S::mul(S::div(x, S::add(one, e)), S::load(u + i)));
  }
  for (; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}
