// Kernels for int8 and int4 (Q4, Q4K) weights times int16 activations (kernels.h; int4 weights those
// activations requantized to int8, common.h's requantized_int8) on NEON, compiled per
// instruction set like quant_kernels.inl (its AVX2 counterpart); the math matches the scalar
// twins in kernels_generic.cpp.
//
// The including file defines how a group's exact integer dot product is taken: a type Acts (the
// activations in the form its dot products read), prepare_acts(xq, n) making it from n int16
// activations, and dot_q8(w, acts, at) / dot_q4(w, acts, at), the products of one weight group
// with the group of activations starting at element `at`, as four int32 lanes whose sum is the dot
// product.

// x [n, n_in] f32 → xq int16, xs and xsum per group of 32 (kernels.h), 4 lanes at a time.
void quantize_rows(const float* x, int n, int n_in, int16_t* xq, float* xs, float* xsum) {
  const int groups = n_in / QGROUP;
  for (long g = 0; g < long(n) * groups; ++g) {
    const float* v = x + g * QGROUP;
    float32x4_t a[8], amax = vdupq_n_f32(0.0f), sum = vdupq_n_f32(0.0f);
    for (int i = 0; i < 8; ++i) {
      a[i] = vld1q_f32(v + 4 * i);
      amax = vmaxq_f32(amax, vabsq_f32(a[i]));
      sum = vaddq_f32(sum, a[i]);
    }
    const float mx = vmaxvq_f32(amax);
    const float32x4_t inv = vdupq_n_f32(mx > 0 ? 32767.0f / mx : 0.0f);
    for (int i = 0; i < 8; ++i)  // |v · inv| ≤ 32767: the narrowing cannot saturate
      vst1_s16(xq + g * QGROUP + 4 * i, vmovn_s32(vcvtnq_s32_f32(vmulq_f32(a[i], inv))));
    xs[g] = mx / 32767.0f;
    xsum[g] = vaddvq_f32(sum);
  }
}

// The group totals [Σ d0, Σ d1, Σ d2, Σ d3] of four groups' lanes, exact in int32.
inline int32x4_t group_totals(int32x4_t d0, int32x4_t d1, int32x4_t d2, int32x4_t d3) {
  return vpaddq_s32(vpaddq_s32(d0, d1), vpaddq_s32(d2, d3));
}

inline float32x4_t load_f16x4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

constexpr int PREFETCH = 4096;  // bytes of weights fetched ahead, as in quant_kernels.inl

// One row against one token's activations (starting at group tg): four groups at a time, their
// scales (and int4 mins) as vectors (Q8/Q4: float16 from W; Q4K: f32 from fs and fm, the row's
// scales and mins decoded once for all its tokens).
template <DType T>
inline float q_row(const Acts& acts, long tg, const float* xs, const float* xsum, const WeightsRef& W, int groups,
                   int r, const float* fs, const float* fm) {
  constexpr bool Q4 = T != DType::Q8;
  const long rg0 = long(r) * groups, bytes = Q4 ? QGROUP / 2 : QGROUP;
  auto dot = [&](int g) {
    const long rg = rg0 + g, at = (tg + g) * QGROUP;
    return Q4 ? dot_q4((const uint8_t*)W.data + rg * bytes, acts, at)
              : dot_q8((const int8_t*)W.data + rg * bytes, acts, at);
  };
  float32x4_t acc = vdupq_n_f32(0.0f);
  int g = 0;
  for (; g + 4 <= groups; g += 4) {
    for (int b = 0; b < 4 * bytes; b += 64) __builtin_prefetch((const char*)W.data + (rg0 + g) * bytes + PREFETCH + b);
    const int32x4_t d = group_totals(dot(g), dot(g + 1), dot(g + 2), dot(g + 3));
    const float32x4_t ws = T == DType::Q4K ? vld1q_f32(fs + g) : load_f16x4(W.scales + rg0 + g);
    acc = vfmaq_f32(acc, vcvtq_f32_s32(d), vmulq_f32(ws, vld1q_f32(xs + tg + g)));
    if (Q4)
      acc =
          vfmaq_f32(acc, T == DType::Q4K ? vld1q_f32(fm + g) : load_f16x4(W.mins + rg0 + g), vld1q_f32(xsum + tg + g));
  }
  float s = vaddvq_f32(acc);
  for (; g < groups; ++g) {
    const float gs = T == DType::Q4K ? fs[g] : f16_to_f32(W.scales[rg0 + g]);
    s += float(vaddvq_s32(dot(g))) * (xs[tg + g] * gs);
    if (Q4) s += xsum[tg + g] * (T == DType::Q4K ? fm[g] : f16_to_f32(W.mins[rg0 + g]));
  }
  return s;
}

// A few tokens (decode steps): row by row, each row multiplied by every token while it is in L1.
template <DType T>
void matmul_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
              int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  const int groups = n_in / QGROUP;
  const Acts acts = prepare_acts(xq, long(n_tok) * n_in);
  static thread_local std::vector<float> buf;  // Q4K: a row's scales [groups], then its mins [groups]
  if (T == DType::Q4K) buf.resize(2 * size_t(groups));
  for (int r = r0; r < r1; ++r) {
    if (T == DType::Q4K)
      for (int g = 0; g < groups; ++g) {
        const GroupScale gs = group_scale(W, groups, r, g);
        buf[g] = gs.s, buf[groups + g] = gs.m;
      }
    for (int t = 0; t < n_tok; ++t) {
      const long tg = long(t) * groups;
      const float s = q_row<T>(acts, tg, xs, xsum, W, groups, r, buf.data(), buf.data() + groups) + (b ? b[r] : 0.0f);
      float& o = y[long(t) * ldy + r];
      o = accumulate ? o + s : s;
    }
  }
}

void matmul_q8(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
               int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) {
  matmul_q<DType::Q8>(xq, xs, nullptr, WeightsRef{Wq, DType::Q8, Ws}, b, y, n_tok, n_in, ldy, r0, r1, accumulate);
}

void matmul_q4(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
               const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
               bool accumulate) {
  // int4 weights meet the activations requantized to int8, here held in int16 (common.h)
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
