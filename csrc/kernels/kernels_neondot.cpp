// The int8/int4 decode kernels of quant_neon.inl with the dot-product extension (+dotprod, Armv8.2:
// Cortex-A76 and later, Apple M1 and later): sdot sums four int8 × int8 products into each int32
// lane. gally's activations are int16, so each is split once per call into a high and a low
// signed byte, x = 256·h + (l + 128) with h = x >> 8 and l = (x & 255) − 128, and a group's
// Σ w·x = 256·Σ w·h + Σ w·l + 128·Σ w: three sdot pairs, exact in int32 (|Σ w·x| ≤ 32·127·32767).
// Compiled with +dotprod; isa.cpp puts these into the "neondot" set only where the CPU reports it.
#include <arm_neon.h>

#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace neondot {

// The activations split into their high and low bytes (quant_neon.inl's Acts), this thread's
// buffers, valid until its next call.
struct Acts {
  const int8_t* h;
  const int8_t* l;
};

inline Acts prepare_acts(const int16_t* xq, long n) {
  static thread_local std::vector<int8_t> h, l;
  h.resize(n);
  l.resize(n);
  long i = 0;
  for (; i + 8 <= n; i += 8) {
    const int16x8_t x = vld1q_s16(xq + i);
    vst1_s8(h.data() + i, vmovn_s16(vshrq_n_s16(x, 8)));
    vst1_s8(l.data() + i, vmovn_s16(vsubq_s16(vandq_s16(x, vdupq_n_s16(255)), vdupq_n_s16(128))));
  }
  for (; i < n; ++i) {
    h[i] = int8_t(xq[i] >> 8);
    l[i] = int8_t((xq[i] & 255) - 128);
  }
  return {h.data(), l.data()};
}

// Σ w·x of a group whose 32 weights are w0 (elements 0-15) and w1 (16-31), in four int32 lanes.
inline int32x4_t dot_group(int8x16_t w0, int8x16_t w1, const Acts& a, long at) {
  const int32x4_t zero = vdupq_n_s32(0);
  const int32x4_t hi = vdotq_s32(vdotq_s32(zero, w0, vld1q_s8(a.h + at)), w1, vld1q_s8(a.h + at + 16));
  const int32x4_t lo = vdotq_s32(vdotq_s32(zero, w0, vld1q_s8(a.l + at)), w1, vld1q_s8(a.l + at + 16));
  const int8x16_t ones = vdupq_n_s8(1);
  const int32x4_t wsum = vdotq_s32(vdotq_s32(zero, w0, ones), w1, ones);
  return vaddq_s32(vshlq_n_s32(hi, 8), vaddq_s32(lo, vshlq_n_s32(wsum, 7)));
}

inline int32x4_t dot_q8(const int8_t* w, const Acts& a, long at) {
  return dot_group(vld1q_s8(w), vld1q_s8(w + 16), a, at);
}

// Byte i of a packed int4 group holds element i (low nibble) and element i + 16 (high nibble).
inline int32x4_t dot_q4(const uint8_t* w, const Acts& a, long at) {
  const uint8x16_t bytes = vld1q_u8(w);
  return dot_group(vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0f))), vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4)), a,
                   at);
}

#include "kernels/quant_neon.inl"

}  // namespace neondot
}  // namespace gally
