// Portable scalar kernels: the fallback on every CPU and the oracle the SIMD kernels are tested
// against. Plain C++ (no intrinsics) so that it builds anywhere, aarch64 and clang included.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace {

// Σ_k x[k] · w[k] in 8 independent lanes, which compilers vectorise without reassociating.
template <class WLoad>
float dot(const float* x, int n, WLoad w) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) lane[l] += x[k + l] * w(k + l);
  float s = 0;
  for (; k < n; ++k) s += x[k] * w(k);
  return s + ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void matmul(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
            bool accumulate) {
  static thread_local std::vector<float> row;
  row.resize(n_in);
  const float* w = row.data();
  for (int r = r0; r < r1; ++r) {
    dequantize_row(W, n_in, r, row.data());
    for (int t = 0; t < n_tok; ++t) {
      const float* xt = x + (long)t * n_in;
      float s = dot(xt, n_in, [w](int k) { return w[k]; });
      if (b) s += b[r];
      float& out = y[(long)t * ldy + r];
      out = accumulate ? out + s : s;
    }
  }
}

void matmul_many(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count) {
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    matmul(x, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
  float ss = dot(x, n, [x](int k) { return x[k]; });
  float inv = 1.0f / std::sqrt(ss / n + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

void rope(float* v, const float* cos, const float* sin, int d) {
  int h = d / 2;
  for (int i = 0; i < h; ++i) {
    float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i] + a * sin[i];
  }
}

// KV cache elements as f32 (kernels.h, KvHead::dtype).
struct KvF32 {
  using T = float;
  static float get(const T* p) { return *p; }
};
struct KvBF16 {
  using T = uint16_t;
  static float get(const T* p) { return bf16_to_f32(*p); }
};
struct KvF16 {
  using T = uint16_t;
  static float get(const T* p) { return f16_to_f32(*p); }
};
// The int8 cache (kernels.h): code · its group's scale.
struct KvQ8 {
  using T = int8_t;
};
// Element i of a KV row of d elements, as f32.
template <class E>
float element(const typename E::T* row, int i, int d) {
  if constexpr (std::is_same_v<E, KvQ8>) return row[i] * kv_group_scale(row, i, d);
  else return E::get(row + i);
}

// f(E) with the element reader of the cache's dtype.
template <class F>
auto with_kv_type(DType t, F f) {
  if (t == DType::BF16) return f(KvBF16{});
  if (t == DType::F16) return f(KvF16{});
  if (t == DType::Q8) return f(KvQ8{});
  return f(KvF32{});
}

// The keys (values) of rows [b0, b0 + rows) of a head lie in one block, rows kv.ld apart.
template <class F>
void each_block(const KvHead& kv, int n, F f) {
  for (int b0 = 0; b0 < n; b0 += kv.block_rows) f(b0, n - b0 < kv.block_rows ? n - b0 : kv.block_rows);
}

template <class E>
void attention_t(const float* q, const KvHead& kv, int n, int d, float scale, float* probs, float* out) {
  using T = typename E::T;
  float mx = -INFINITY;
  each_block(kv, n, [&](int b0, int rows) {
    const T* K = kv.key<T>(b0);
    for (int j = 0; j < rows; ++j) {
      const T* k = K + j * kv.ld;
      probs[b0 + j] = scale * dot(q, d, [k, d](int i) { return element<E>(k, i, d); });
      mx = std::fmax(mx, probs[b0 + j]);
    }
  });
  float sum = 0;
  for (int j = 0; j < n; ++j) sum += (probs[j] = std::exp(probs[j] - mx));
  float inv = 1.0f / sum;
  for (int i = 0; i < d; ++i) out[i] = 0;
  for (int j = 0; j < n; ++j) probs[j] *= inv;
  each_block(kv, n, [&](int b0, int rows) {
    const T* V = kv.value<T>(b0);
    for (int j = 0; j < rows; ++j) {
      const T* v = V + j * kv.ld;
      for (int i = 0; i < d; ++i) out[i] += probs[b0 + j] * element<E>(v, i, d);
    }
  });
}

void attention(const float* q, const KvHead& kv, int n, int d, float scale, float* probs, float* out) {
  with_kv_type(kv.dtype, [&](auto e) { attention_t<decltype(e)>(q, kv, n, d, scale, probs, out); });
}

template <class E>
void attention_part_t(const float* q, int ldq, int heads, const KvHead& kv, int k0, int k1, int d, float scale,
                      float* probs, float* out, int ldo, float* m, float* l) {
  using T = typename E::T;
  const int n = k1 - k0;
  static thread_local std::vector<float> own;  // a head's weights, where the caller keeps none
  if (!probs) own.resize(size_t(n));
  for (int h = 0; h < heads; ++h) {
    const float* qh = q + (long)h * ldq;
    float* s = probs ? probs + (long)h * n : own.data();
    float mx = -INFINITY;
    kv.each_run(k0, k1, [&](int j0, int rows) {
      const T* K = kv.key<T>(j0);
      for (int j = 0; j < rows; ++j) {
        const T* k = K + j * kv.ld;
        s[j0 - k0 + j] = scale * dot(qh, d, [k, d](int i) { return element<E>(k, i, d); });
        mx = std::fmax(mx, s[j0 - k0 + j]);
      }
    });
    float sum = 0;
    for (int j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
    m[h] = mx, l[h] = sum;
    float* o = out + (long)h * ldo;
    for (int i = 0; i < d; ++i) o[i] = 0;
    kv.each_run(k0, k1, [&](int j0, int rows) {
      const T* Vr = kv.value<T>(j0);
      for (int j = 0; j < rows; ++j) {
        const T* v = Vr + j * kv.ld;
        for (int i = 0; i < d; ++i) o[i] += s[j0 - k0 + j] * element<E>(v, i, d);
      }
    });
  }
}

void attention_part(const float* q, int ldq, int heads, int kv_heads, const KvHead& kv, int k0, int k1, int d,
                    float scale, float* probs, float* out, int ldo, long kv_stride, float* m, float* l) {
  with_kv_type(kv.dtype, [&](auto e) {
    for (long g = 0; g < kv_heads; ++g)
      attention_part_t<decltype(e)>(q + g * heads * ldq, ldq, heads, kv.of(g), k0, k1, d, scale,
                                    probs ? probs + g * heads * (k1 - k0) : nullptr, out + g * kv_stride, ldo,
                                    m + g * kv_stride, l + g * kv_stride);
  });
}

void attention_causal(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale, float* scratch,
                      float* out, int ldo, float* probs, long ldp) {
  for (int i = 0; i < nq; ++i) {
    attention(Q + (long)i * ldq, kv, ctx0 + i, d, scale, scratch, out + (long)i * ldo);
    if (probs)
      for (int j = 0; j < ctx0 + i; ++j) probs[i * ldp + j] = scratch[j];
  }
}

}  // namespace

void quantize_kv_row(const float* x, int8_t* out, int n) {
  for (int g0 = 0; g0 < n; g0 += KV_GROUP) {
    const int g1 = std::min(g0 + KV_GROUP, n);
    float amax = 0;
    bool finite = true;
    for (int i = g0; i < g1; ++i) {
      finite = finite && std::isfinite(x[i]);
      amax = std::fmax(amax, std::fabs(x[i]));
    }
    const uint16_t scale = f32_to_bf16(finite ? amax / 127.0f : NAN);
    const float s = bf16_to_f32(scale);
    for (int i = g0; i < g1; ++i)  // |x / s| ≤ 127 · (1 + 2^-8), clamped for the rounding of the scale
      out[i] = finite && s > 0 ? int8_t(std::fmax(-127.0f, std::fmin(127.0f, std::nearbyint(x[i] / s)))) : 0;
    std::memcpy(out + n + sizeof scale * (g0 / KV_GROUP), &scale, sizeof scale);
  }
}

namespace {

void convert_row(const float* x, void* out, DType to, int n) {
  if (to == DType::BF16)
    for (int i = 0; i < n; ++i) ((uint16_t*)out)[i] = f32_to_bf16(x[i]);
  else if (to == DType::F16)
    for (int i = 0; i < n; ++i) ((uint16_t*)out)[i] = f32_to_f16(x[i]);
  else if (to == DType::Q8) quantize_kv_row(x, (int8_t*)out, n);
  else std::memcpy(out, x, sizeof(float) * n);
}

void silu_mul(float* g, const float* u, int n) {
  for (int i = 0; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void quantize_rows(const float* x, int n, int n_in, int16_t* xq, float* xs, float* xsum) {
  const int groups = n_in / QGROUP;
  for (long g = 0; g < long(n) * groups; ++g) {
    const float* v = x + g * QGROUP;
    float amax = 0, sum = 0;
    for (int i = 0; i < QGROUP; ++i) amax = std::fmax(amax, std::fabs(v[i]));
    for (int i = 0; i < QGROUP; ++i) sum += v[i];
    const float inv = amax > 0 ? ACT_INT16_MAX / amax : 0.0f;
    for (int i = 0; i < QGROUP; ++i) xq[g * QGROUP + i] = int16_t(std::nearbyint(v[i] * inv));
    xs[g] = amax / ACT_INT16_MAX;
    xsum[g] = sum;
  }
}

// Σ_g s_g·xs[t,g]·(xq[t,g] · q[r,g]) + m_g·xsum[t,g] with the group scales and mins of W's type
// (common.h's group_scale). int4 weights take the activations requantized to int8 (common.h requantized_int8).
template <DType T>
void matmul_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
              int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  const int groups = n_in / QGROUP;
  for (int t = 0; t < n_tok; ++t)
    for (int r = r0; r < r1; ++r) {
      float s = 0;
      for (int g = 0; g < groups; ++g) {
        const int16_t* xg = xq + (long(t) * groups + g) * QGROUP;
        const long tg = long(t) * groups + g, rg = long(r) * groups + g;
        int32_t dot = 0;
        if (T == DType::Q8) {
          const int8_t* wg = (const int8_t*)W.data + rg * QGROUP;
          for (int i = 0; i < QGROUP; ++i) dot += int32_t(xg[i]) * wg[i];
        } else {
          const uint8_t* wg = (const uint8_t*)W.data + rg * (QGROUP / 2);
          for (int i = 0; i < QGROUP; ++i) dot += int32_t(xg[i]) * nibble(wg, i);
        }
        const GroupScale gs = group_scale(W, groups, r, g);
        s += float(dot) * (xs[tg] * gs.s);
        if (T != DType::Q8) s += xsum[tg] * gs.m;
      }
      if (b) s += b[r];
      float& o = y[long(t) * ldy + r];
      o = accumulate ? o + s : s;
    }
}

void matmul_q8(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
               int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  matmul_q<DType::Q8>(xq, xs, nullptr, WeightsRef{Wq, DType::Q8, Ws}, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_q4(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
               const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
               bool accumulate) {
  const ByteActs<int16_t> a = requantized_int8(xq, xs, long(n_tok) * (n_in / QGROUP));
  (void)xsum;
  matmul_q<DType::Q4>(a.q, a.s, a.sum, WeightsRef{Wq, DType::Q4, Ws, Wm}, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_q4k(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  const ByteActs<int16_t> a = requantized_int8(xq, xs, long(n_tok) * (n_in / QGROUP));
  (void)xsum;
  matmul_q<DType::Q4K>(a.q, a.s, a.sum, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

// The scalar twins of the avx512bf16 set's kernels (kernels_avx512bf16.cpp): the same roundings
// to bf16, then the f32 math above. Products of two bf16 values are exact in f32, so these differ
// from vdpbf16ps only in the order of the sums.
namespace bf16 {

float round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

bool takes_gemm(const WeightsRef& W, int n_tok) {
  return n_tok >= GEMM_MIN_TOKENS && (W.dtype == DType::BF16 || is_quantized(W.dtype));
}

// Rows [r0, r1) of y for tokens whose bf16 activations xt(t, k) gives.
template <class X>
void gemm(X xt, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
          bool accumulate) {
  std::vector<float> row(n_in), x(n_in);
  for (int r = r0; r < r1; ++r) {
    dequantize_row(W, n_in, r, row.data());
    for (float& w : row) w = round(w);  // int8/int4 weights meet vdpbf16ps rounded to bf16
    for (int t = 0; t < n_tok; ++t) {
      for (int k = 0; k < n_in; ++k) x[k] = xt(t, k);
      const float* w = row.data();
      float s = dot(x.data(), n_in, [w](int k) { return w[k]; });
      if (b) s += b[r];
      float& out = y[(long)t * ldy + r];
      out = accumulate ? out + s : s;
    }
  }
}

void matmul(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
            bool accumulate) {
  if (!takes_gemm(W, n_tok)) return gally::matmul(x, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
  gemm([x, n_in](int t, int k) { return round(x[(long)t * n_in + k]); }, W, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_many(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count) {
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    matmul(x, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

// The packed layout of kernels.h: tiles of GEMM_SPLIT_TOKENS tokens, each [pairs][tokens] of
// 32-bit words holding the bf16 pair (x[t, 2p] low, x[t, 2p + 1] high), zero past n_tok and n_in.
long packed_size(int n_tok, int n_in) {
  return long((n_tok + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS) * ((n_in + 1) / 2) * GEMM_SPLIT_TOKENS;
}

void pack(const float* x, int n_tok, int n_in, int tile0, int tile1, uint32_t* xt) {
  const int pairs = (n_in + 1) / 2, TW = GEMM_SPLIT_TOKENS;
  auto half = [&](long t, int k) -> uint32_t { return t < n_tok && k < n_in ? f32_to_bf16(x[t * n_in + k]) : 0; };
  for (int tile = tile0; tile < tile1; ++tile)
    for (int p = 0; p < pairs; ++p)
      for (int j = 0; j < TW; ++j) {
        const long t = long(tile) * TW + j;
        xt[(long(tile) * pairs + p) * TW + j] = half(t, 2 * p) | half(t, 2 * p + 1) << 16;
      }
}

void matmul_many_packed(const uint32_t* xt, const float* x, int n_tok, int n_in, const MatmulOut* outs, int count) {
  const int pairs = (n_in + 1) / 2, TW = GEMM_SPLIT_TOKENS;
  auto activation = [&](int t, int k) {
    const uint32_t word = xt[(long(t / TW) * pairs + k / 2) * TW + t % TW];
    return bf16_to_f32(uint16_t(k % 2 ? word >> 16 : word & 0xffff));
  };
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (takes_gemm(o.W, n_tok)) gemm(activation, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
    else gally::matmul(x, o.W, o.b, o.y, n_tok, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

// Causal attention with the scaled queries, the keys, the unnormalised softmax weights and the
// values rounded to bf16; sums, the softmax and its normalisation in f32.
void attention_causal(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale, float* scratch,
                      float* out, int ldo, float* probs, long ldp) {
  std::vector<float> q(d), k(d);
  for (int i = 0; i < nq; ++i) {
    const int n = ctx0 + i;
    for (int c = 0; c < d; ++c) q[c] = round(scale * Q[(long)i * ldq + c]);
    float mx = -INFINITY;
    for (int j = 0; j < n; ++j) {
      with_kv_type(kv.dtype, [&](auto e) {
        const auto* key = kv.key<typename decltype(e)::T>(j);
        for (int c = 0; c < d; ++c) k[c] = round(element<decltype(e)>(key, c, d));
      });
      const float* kr = k.data();
      scratch[j] = dot(q.data(), d, [kr](int c) { return kr[c]; });
      mx = std::fmax(mx, scratch[j]);
    }
    float sum = 0;
    for (int j = 0; j < n; ++j) sum += (scratch[j] = std::exp(scratch[j] - mx));
    const float inv = 1.0f / sum;
    float* o = out + (long)i * ldo;
    for (int c = 0; c < d; ++c) o[c] = 0;
    for (int j = 0; j < n; ++j) {
      const float p = round(scratch[j]);
      with_kv_type(kv.dtype, [&](auto e) {
        const auto* v = kv.value<typename decltype(e)::T>(j);
        for (int c = 0; c < d; ++c) o[c] += p * round(element<decltype(e)>(v, c, d));
      });
      if (probs) probs[i * ldp + j] = scratch[j] * inv;
    }
    for (int c = 0; c < d; ++c) o[c] *= inv;
  }
}

}  // namespace bf16

}  // namespace

void attention_merge(const float* parts, int n_parts, long part_floats, int heads, int d, float* out, int ldo) {
  for (int h = 0; h < heads; ++h) {
    float M = -INFINITY;
    for (int p = 0; p < n_parts; ++p) M = std::fmax(M, parts[p * part_floats + (long)heads * d + h]);
    float* o = out + (long)h * ldo;
    float total = 0;
    for (int i = 0; i < d; ++i) o[i] = 0;
    for (int p = 0; p < n_parts; ++p) {
      const float* part = parts + p * part_floats;
      const float w = std::exp(part[(long)heads * d + h] - M);
      total += w * part[(long)heads * d + heads + h];
      for (int i = 0; i < d; ++i) o[i] += w * part[(long)h * d + i];
    }
    const float inv = 1.0f / total;
    for (int i = 0; i < d; ++i) o[i] *= inv;
  }
}

const Kernels kernels_generic = {
    .name = "generic",
    .matmul = matmul,
    .gemv = matmul,
    .matmul_many = matmul_many,
    .rmsnorm = rmsnorm,
    .rope = rope,
    .attention_part = attention_part,
    .attention_causal = attention_causal,
    .silu_mul = silu_mul,
    .convert_row = convert_row,
    .quantize_rows = quantize_rows,
    .matmul_q8 = matmul_q8,
    .matmul_q4 = matmul_q4,
    .matmul_q4k = matmul_q4k,
};

const Kernels kernels_generic_bf16 = {
    .name = "generic-bf16",
    .matmul = bf16::matmul,
    .gemv = matmul,
    .matmul_many = bf16::matmul_many,
    .rmsnorm = rmsnorm,
    .rope = rope,
    .attention_part = attention_part,
    .attention_causal = attention_causal,
    .silu_mul = silu_mul,
    .convert_row = convert_row,
    .quantize_rows = quantize_rows,
    .matmul_q8 = matmul_q8,
    .matmul_q4 = matmul_q4,
    .matmul_q4k = matmul_q4k,
    .attention_causal_bf16 = bf16::attention_causal,
    .packed_size = bf16::packed_size,
    .pack = bf16::pack,
    .matmul_many_packed = bf16::matmul_many_packed,
};

}  // namespace gally
