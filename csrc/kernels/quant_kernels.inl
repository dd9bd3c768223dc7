// Kernels for int8 and int4 (Q4 and Q4K) weights times the activations (kernels.h), over 256-bit
// integer registers. int8 weights: their int16 activations, a group of 32 as two halves of 16 int16,
// multiplied and summed in pairs by vpmaddwd, exact in int32. int4 weights: those activations
// requantized to int8 (requantized_bytes, as the prompt GEMMs requantize them), a group one register
// of 32 codes in bytes against 32 int8 values, multiplied and summed in quads by vpdpbusd
// (vpmaddubsw and vpmaddwd without VNNI), exact in int32. Compiled per instruction set. The math
// matches the scalar twins in kernels_generic.cpp.
//
// The including file defines dot_pairs(acc, a, b) = acc + vpmaddwd(a, b) and dot_quads(acc, u, s)
// = acc + the sums of four u8 · s8 products, in 8 int32 lanes: a vpaddd after the vpmaddwd (after
// vpmaddubsw and a vpmaddwd by ones) on AVX2, one vpdpwssd (vpdpbusd) where the CPU has VNNI
// (kernels_*vnni.cpp), and includes <cmath>, <cstring>, <type_traits>, <vector> and kernels/common.h. The AVX-512
// sets define GALLY_QUANT_ROWS_AVX512 and take quant_rows_avx512.inl's matmul_q, the AVX2 sets
// quant_rows_avx2.inl's: each adds a path for batches of several tokens to matmul_q_rows here.

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void quantize_rows(const float* x, int n, int n_in, int16_t* xq, float* xs, float* xsum) {
  const int groups = n_in / QGROUP;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (long g = 0; g < long(n) * groups; ++g) {
    const float* v = x + g * QGROUP;
    __m256 a[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(v + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, a[i]));
      sum = _mm256_add_ps(sum, a[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float mx = _mm_cvtss_f32(m);
    const __m256 inv = _mm256_set1_ps(mx > 0 ? ACT_INT16_MAX / mx : 0.0f);
    for (int h = 0; h < 2; ++h) {  // int32 → int16: packs interleave 128-bit lanes, the permute restores order
      __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a[2 * h], inv)),
                                     _mm256_cvtps_epi32(_mm256_mul_ps(a[2 * h + 1], inv)));
      _mm256_storeu_si256((__m256i*)(xq + g * QGROUP + 16 * h), _mm256_permute4x64_epi64(p, 0xd8));
    }
    xs[g] = mx / ACT_INT16_MAX;
    xsum[g] = sum8(sum);
  }
}

// d·sc and dmin·mc of the QK_GROUPS groups of Q4K super-block sb, its 6-bit codes widened to
// eight int32 lanes, stored to s[0 … 7] and m[0 … 7].
inline void super_block8(const WeightsRef& W, long sb, float* s, float* m) {
  const uint8_t* c = W.codes + sb * QK_CODE_BYTES;
  uint32_t high;
  std::memcpy(&high, c + QK_GROUPS, 4);
  const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)c));
  const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), three = _mm256_set1_epi32(3);
  const __m256i h = _mm256_set1_epi32(int(high));
  const __m256i hs = _mm256_and_si256(_mm256_srlv_epi32(h, shift), three);
  const __m256i hm = _mm256_and_si256(_mm256_srlv_epi32(h, _mm256_add_epi32(shift, _mm256_set1_epi32(16))), three);
  const __m256i sc = _mm256_or_si256(_mm256_and_si256(low, _mm256_set1_epi32(0xf)), _mm256_slli_epi32(hs, 4));
  const __m256i mc = _mm256_or_si256(_mm256_srli_epi32(low, 4), _mm256_slli_epi32(hm, 4));
  _mm256_storeu_ps(s, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(W.scales[sb])), _mm256_cvtepi32_ps(sc)));
  _mm256_storeu_ps(m, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(W.mins[sb])), _mm256_cvtepi32_ps(mc)));
}

// The scales and mins of row r's groups [0, groups) of a Q4K matrix as f32 (common.h's
// group_scale), decoded once per row for all its tokens: the super-blocks that hold them, whole,
// into buf (2 · (groups + 2 · QK_GROUPS) floats). Returns the row's scales; its mins follow at
// + stride, stride = q4k_stride(groups).
inline int q4k_stride(int groups) { return groups + 2 * QK_GROUPS; }
inline const float* q4k_row_scales(const WeightsRef& W, int groups, long r, float* buf) {
  const long f0 = r * groups, sb0 = f0 / QK_GROUPS;
  const int off = int(f0 % QK_GROUPS), stride = q4k_stride(groups);
  for (int i = 0; i * QK_GROUPS < off + groups; ++i)
    super_block8(W, sb0 + i, buf + i * QK_GROUPS, buf + stride + i * QK_GROUPS);
  return buf + off;
}

constexpr int ROW_TOKENS = 8;   // tokens a row-wise product takes per pass over its rows
constexpr int PREFETCH = 4096;  // bytes ahead in a row of weights that a decode step fetches

// A weight group as two halves of 16 int16: elements 0-15 and 16-31.
struct Half16 {
  __m256i lo, hi;
};

inline Half16 load_q8(const int8_t* p) {
  return {_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)),
          _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(p + 16)))};
}

// A packed int4 group's 32 codes in bytes, in order: the low nibbles (codes 0-15), then the high.
inline __m256i load_codes(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128((const __m128i*)p), low = _mm_set1_epi8(0x0f);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(bytes, low)),
                                 _mm_and_si128(_mm_srli_epi16(bytes, 4), low), 1);
}

// The activations' element type: int16 against int8 weights, int8 (requantized) against int4.
template <DType T>
using Act = std::conditional_t<T == DType::Q8, int16_t, int8_t>;

// The exact integer dot product of one weight group with one activation group, in 8 int32 lanes.
inline __m256i group_dot(const Half16& w, const int16_t* x) {
  return dot_pairs(_mm256_madd_epi16(w.lo, _mm256_loadu_si256((const __m256i*)x)), w.hi,
                   _mm256_loadu_si256((const __m256i*)(x + 16)));
}
inline __m256i group_dot(__m256i codes, const int8_t* x) {
  return dot_quads(_mm256_setzero_si256(), codes, _mm256_loadu_si256((const __m256i*)x));
}

// Group rg (row · groups + group) of W as group_dot takes it: int8 as two halves of int16, int4 as
// its codes in bytes.
template <DType T>
inline auto load_weights(const WeightsRef& W, long rg) {
  if constexpr (T == DType::Q8) return load_q8((const int8_t*)W.data + rg * QGROUP);
  else return load_codes((const uint8_t*)W.data + rg * (QGROUP / 2));
}

// [Σ d0, Σ d1, …, Σ d7]: eight groups' lane sums in one register, so that their scales apply
// as one vector multiply instead of eight broadcasts.
inline __m256i sum_lanes8(const __m256i d[8]) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// The sum of eight int32 lanes.
inline int32_t hsum_epi32(__m256i v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_hadd_epi32(h, h);
  h = _mm_hadd_epi32(h, h);
  return _mm_cvtsi128_si32(h);
}

// A group of 32 int16 activations requantized to int8 as common.h's requantize_int8 does (the same
// f32 products, rounded to even by vcvtps2dq as nearbyint rounds), the bytes in order.
inline __m256i requant_group(const int16_t* x) {
  const __m256 r = _mm256_set1_ps(REQUANT);
  auto requant = [&](__m128i v) {  // 8 int16 → f32 · r → int32
    return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v)), r));
  };
  const __m256i v0 = _mm256_loadu_si256((const __m256i*)x), v1 = _mm256_loadu_si256((const __m256i*)(x + 16));
  // packs interleave 128-bit lanes; the permutes restore the values' order
  const __m256i a = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(requant(_mm256_castsi256_si128(v0)), requant(_mm256_extracti128_si256(v0, 1))), 0xd8);
  const __m256i b = _mm256_permute4x64_epi64(
      _mm256_packs_epi32(requant(_mm256_castsi256_si128(v1)), requant(_mm256_extracti128_si256(v1, 1))), 0xd8);
  return _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xd8);
}

// n groups of int16 activations reordered as the int8 tiles pair the weights (quant_rows_avx2.inl,
// quant_rows_avx512.inl: pairs_transposed): words 4k … 4k + 3 of a group become x_4k, x_4k+2, x_4k+1,
// x_4k+3. In this thread's buffer, valid until its next call.
inline const int16_t* pairs_interleaved(const int16_t* x, long n) {
  static thread_local std::vector<int16_t> out;
  out.resize(size_t(n) * QGROUP);
  for (long i = 0; i < 2 * n; ++i) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(x + i * 16));
    const __m256i lo = _mm256_shufflelo_epi16(v, _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256((__m256i*)(out.data() + i * 16), _mm256_shufflehi_epi16(lo, _MM_SHUFFLE(3, 1, 2, 0)));
  }
  return out.data();
}

// Eight int32 partial sums of a group's 32 int8 values (exact).
inline __m256i byte_sums(__m256i bytes) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), _mm256_set1_epi16(1));
}

// common.h's requantized_int8 in vectors, the values in int8: int4 weights' activations, in this
// thread's buffers, valid until its next call.
inline ByteActs<int8_t> requantized_bytes(const int16_t* xq, const float* xs, long groups) {
  static thread_local std::vector<int8_t> q;
  static thread_local std::vector<float> f;
  q.resize(size_t(groups) * QGROUP);
  f.resize(2 * size_t(groups));
  for (long g = 0; g < groups; ++g) {
    const __m256i bytes = requant_group(xq + g * QGROUP), sums = byte_sums(bytes);
    _mm256_storeu_si256((__m256i*)(q.data() + g * QGROUP), bytes);
    f[g] = xs[g] * REQUANT_SCALE;
    f[groups + g] = f[g] * float(hsum_epi32(sums));
  }
  return {q.data(), f.data(), f.data() + groups};
}

// One row against one token's activations: its groups eight at a time, the scales and int4 mins
// as vectors (Q8/Q4: float16 from W; Q4K: f32 from fs and fm, the row's q4k_row_scales).
template <DType T>
inline float q_row(const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, int groups, int r,
                   const float* fs, const float* fm) {
  constexpr bool Q4 = T != DType::Q8;
  const long rg0 = long(r) * groups;
  auto load = [&](long rg) { return load_weights<T>(W, rg); };
  __m256 acc = _mm256_setzero_ps();
  int g = 0;
  for (; g + 8 <= groups; g += 8) {
    {  // the next weights PREFETCH bytes ahead: int4 128 bytes per 8 groups, int8 256 (measured on SmolLM2,
       // one thread, AVX2 and AVX-512: int8 decode +45%, int4 +20%; the hardware prefetchers alone
       // leave this loop waiting on memory)
      const long bytes = Q4 ? QGROUP / 2 : QGROUP;
      const char* ahead = (const char*)W.data + (rg0 + g) * bytes + PREFETCH;
      for (int b = 0; b < 8 * bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    __m256i d[8];
    for (int u = 0; u < 8; ++u) d[u] = group_dot(load(rg0 + g + u), xq + long(g + u) * QGROUP);
    __m256 ws, wm = _mm256_setzero_ps();
    if (T == DType::Q4K) {
      ws = _mm256_loadu_ps(fs + g), wm = _mm256_loadu_ps(fm + g);
    } else {
      ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(W.scales + rg0 + g)));
      if (Q4) wm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(W.mins + rg0 + g)));
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_lanes8(d)), _mm256_mul_ps(ws, _mm256_loadu_ps(xs + g)), acc);
    if (Q4) acc = _mm256_fmadd_ps(wm, _mm256_loadu_ps(xsum + g), acc);
  }
  float s = sum8(acc);
  for (; g < groups; ++g) {
    const int32_t d = hsum_epi32(group_dot(load(rg0 + g), xq + long(g) * QGROUP));
    const float gs = T == DType::Q4K ? fs[g] : _cvtsh_ss(W.scales[rg0 + g]);
    s = std::fma(float(d), xs[g] * gs, s);  // fused, as quant_rows_avx512.inl's lanes
    if (Q4) s = std::fma(xsum[g], T == DType::Q4K ? fm[g] : _cvtsh_ss(W.mins[rg0 + g]), s);
  }
  return s;
}

// q_row for nt ≤ ROW_TOKENS tokens (activations `groups` groups apart) into s[0 … nt): each block
// of eight groups is widened and its scales read once for all of them. Every token's sums are
// q_row's, in the same order (the integer dot products are exact), so a token's result does not
// depend on the others (a batch's decode steps get what each gets alone).
template <DType T>
inline void q_row_tokens(const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, int groups, int r,
                         const float* fs, const float* fm, int nt, float* s) {
  constexpr bool Q4 = T != DType::Q8;
  const long rg0 = long(r) * groups, tg = groups;
  auto load = [&](long rg) { return load_weights<T>(W, rg); };
  __m256 acc[ROW_TOKENS];
  for (int t = 0; t < nt; ++t) acc[t] = _mm256_setzero_ps();
  int g = 0;
  for (; g + 8 <= groups; g += 8) {
    {
      const long bytes = Q4 ? QGROUP / 2 : QGROUP;
      const char* ahead = (const char*)W.data + (rg0 + g) * bytes + PREFETCH;
      for (int b = 0; b < 8 * bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    // the eight groups' weights loaded once, then each token's dots summed at once (what a token
    // keeps between groups is its accumulator, not eight dots: registers for int4's eight codes)
    decltype(load(0)) w[8];
    for (int u = 0; u < 8; ++u) w[u] = load(rg0 + g + u);
    __m256 ws, wm = _mm256_setzero_ps();
    if (T == DType::Q4K) {
      ws = _mm256_loadu_ps(fs + g), wm = _mm256_loadu_ps(fm + g);
    } else {
      ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(W.scales + rg0 + g)));
      if (Q4) wm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(W.mins + rg0 + g)));
    }
    for (int t = 0; t < nt; ++t) {
      __m256i d[8];
      for (int u = 0; u < 8; ++u) d[u] = group_dot(w[u], xq + (t * tg + g + u) * QGROUP);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_lanes8(d)), _mm256_mul_ps(ws, _mm256_loadu_ps(xs + t * tg + g)),
                               acc[t]);
      if (Q4) acc[t] = _mm256_fmadd_ps(wm, _mm256_loadu_ps(xsum + t * tg + g), acc[t]);
    }
  }
  for (int t = 0; t < nt; ++t) s[t] = sum8(acc[t]);
  for (; g < groups; ++g) {
    const auto w = load(rg0 + g);
    const float gs = T == DType::Q4K ? fs[g] : _cvtsh_ss(W.scales[rg0 + g]);
    const float gm = !Q4 ? 0.0f : T == DType::Q4K ? fm[g] : _cvtsh_ss(W.mins[rg0 + g]);
    for (int t = 0; t < nt; ++t) {
      const int32_t d = hsum_epi32(group_dot(w, xq + (t * tg + g) * QGROUP));
      s[t] = std::fma(float(d), xs[t * tg + g] * gs, s[t]);
      if (Q4) s[t] = std::fma(xsum[t * tg + g], gm, s[t]);
    }
  }
}

// A few tokens (decode steps; batches of GEMM_MIN_TOKENS or more take the GEMM): row by row, each
// row multiplied by every token while it is in L1, up to ROW_TOKENS tokens per pass over it.
template <DType T>
void matmul_q_rows(const Act<T>* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                   int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  const int groups = n_in / QGROUP;
  static thread_local std::vector<float> buf;  // Q4K: a row's scales and mins
  if (T == DType::Q4K) buf.resize(2 * size_t(q4k_stride(groups)));
  for (int r = r0; r < r1; ++r) {
    const float* fs = T == DType::Q4K ? q4k_row_scales(W, groups, r, buf.data()) : nullptr;
    const float* fm = T == DType::Q4K ? fs + q4k_stride(groups) : nullptr;
    for (int t0 = 0; t0 < n_tok; t0 += ROW_TOKENS) {
      const int nt = n_tok - t0 < ROW_TOKENS ? n_tok - t0 : ROW_TOKENS;
      const long tg = long(t0) * groups;
      const float* xsum_t = T != DType::Q8 ? xsum + tg : nullptr;
      float s[ROW_TOKENS];
      if (nt == 1) s[0] = q_row<T>(xq + tg * QGROUP, xs + tg, xsum_t, W, groups, r, fs, fm);
      else q_row_tokens<T>(xq + tg * QGROUP, xs + tg, xsum_t, W, groups, r, fs, fm, nt, s);
      for (int t = 0; t < nt; ++t) {
        float& o = y[long(t0 + t) * ldy + r];
        const float v = s[t] + (b ? b[r] : 0.0f);
        o = accumulate ? o + v : v;
      }
    }
  }
}

#if defined(GALLY_QUANT_ROWS_AVX512)
#include "kernels/quant_rows_avx512.inl"
#else
#include "kernels/quant_rows_avx2.inl"
#endif

void matmul_q8(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
               int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  matmul_q<DType::Q8>(xq, xs, nullptr, WeightsRef{Wq, DType::Q8, Ws}, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_q4(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
               const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
               bool accumulate) {
  const ByteActs<int8_t> a = requantized_bytes(xq, xs, long(n_tok) * (n_in / QGROUP));
  (void)xsum;
  matmul_q<DType::Q4>(a.q, a.s, a.sum, WeightsRef{Wq, DType::Q4, Ws, Wm}, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_q4k(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  const ByteActs<int8_t> a = requantized_bytes(xq, xs, long(n_tok) * (n_in / QGROUP));
  (void)xsum;
  matmul_q<DType::Q4K>(a.q, a.s, a.sum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}
