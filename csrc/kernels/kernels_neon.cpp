// ARM NEON (AArch64 Advanced SIMD) kernels: 4 f32 lanes, which every aarch64 CPU has. The
// int8/int4 decode multiplies its int16 activations by the widened weights with smlal (int16 ×
// int16 summed into int32). kernels_neondot.cpp, kernels_neonbf16.cpp and kernels_neoni8mm.cpp add
// the dot-product and matrix-multiply extensions where the CPU has them (isa.cpp).
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace neon {

struct S {
  static constexpr int N = 4;
  static constexpr int REGS = 32;                     // vector registers (v0-v31)
  static constexpr int GEMM_ROWS = 8, GEMM_VECS = 3;  // 24 accumulators + 3 activations + 1 weight of 32 registers
  using V = float32x4_t;
  static V zero() { return vdupq_n_f32(0.0f); }
  static V set1(float f) { return vdupq_n_f32(f); }
  static V load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  static V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V sub(V a, V b) { return vsubq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V div(V a, V b) { return vdivq_f32(a, b); }
  static V min(V a, V b) { return vminq_f32(a, b); }
  static V max(V a, V b) { return vmaxq_f32(a, b); }
  static V round(V a) { return vrndnq_f32(a); }  // to nearest, ties to even
  static V ldexp(V v, V n) {
    const int32x4_t e = vshlq_n_s32(vcvtnq_s32_f32(n), 23);
    return vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(v), e));
  }
  static float sum(V v) { return vaddvq_f32(v); }
  static float hmax(V v) { return vmaxvq_f32(v); }  // the largest lane
  // out = [Σ v[0], …, Σ v[3]]: each (x0 + x1) + (x2 + x3) wherever it stands.
  static V sums(const V v[N]) { return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3])); }
  static V load_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static V load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static V load_i8(const int8_t* p) {
    int32_t w;
    std::memcpy(&w, p, sizeof w);
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w))))));
  }
  static void store_f16(uint16_t* p, V v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }
  // Rounded to nearest even as f32_to_bf16 (dtype.h), NaN kept a quiet NaN.
  static void store_bf16(uint16_t* p, V v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
    const uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffff)), vdupq_n_u32(0x7f800000));
    r = vbslq_u32(nan, vorrq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(0x40)), r);
    vst1_u16(p, vmovn_u32(r));
  }
  // out[c] = column c of the 4 × 4 block at in (rows ld floats apart)
  static void transpose(const float* in, long ld, V out[4]) {
    const V t0 = vtrn1q_f32(load(in), load(in + ld)), t1 = vtrn2q_f32(load(in), load(in + ld));
    const V t2 = vtrn1q_f32(load(in + 2 * ld), load(in + 3 * ld)),
            t3 = vtrn2q_f32(load(in + 2 * ld), load(in + 3 * ld));
    const auto f64 = [](V v) { return vreinterpretq_f64_f32(v); };
    out[0] = vreinterpretq_f32_f64(vtrn1q_f64(f64(t0), f64(t2)));
    out[1] = vreinterpretq_f32_f64(vtrn1q_f64(f64(t1), f64(t3)));
    out[2] = vreinterpretq_f32_f64(vtrn2q_f64(f64(t0), f64(t2)));
    out[3] = vreinterpretq_f32_f64(vtrn2q_f64(f64(t1), f64(t3)));
  }
  // The QGROUP weights of group g of row r of an int8 or int4 matrix as f32 (common.h's dequantize_group).
  static void dequantize_group(const WeightsRef& W, int groups, long r, int g, float* out) {
    const GroupScale gs = group_scale(W, groups, r, g);
    const float s = gs.s;
    const long rg = r * groups + g;
    if (W.dtype == DType::Q8) {
      const int8_t* q = (const int8_t*)W.data + rg * QGROUP;
      for (int i = 0; i < QGROUP; i += 8) {
        const int16x8_t w = vmovl_s8(vld1_s8(q + i));
        store(out + i, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), s));
        store(out + i + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(w)), s));
      }
      return;
    }
    const V m = set1(gs.m);
    const uint8x16_t bytes = vld1q_u8((const uint8_t*)W.data + rg * (QGROUP / 2));
    const uint8x16_t halves[2] = {vandq_u8(bytes, vdupq_n_u8(0x0f)), vshrq_n_u8(bytes, 4)};
    for (int h = 0; h < 2; ++h)  // elements 16h … 16h + 15
      for (int i = 0; i < 16; i += 8) {
        const uint16x8_t w = vmovl_u8(i ? vget_high_u8(halves[h]) : vget_low_u8(halves[h]));
        store(out + 16 * h + i, vfmaq_n_f32(m, vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), s));
        store(out + 16 * h + i + 4, vfmaq_n_f32(m, vcvtq_f32_u32(vmovl_high_u16(w)), s));
      }
  }
};
using V = S::V;

#include "kernels/simd_kernels.inl"

// The int16 activations of quant_neon.inl as they are.
struct Acts {
  const int16_t* x;
};
inline Acts prepare_acts(const int16_t* xq, long) { return {xq}; }

// Σ w·x over 32 int16 × 32 int16 by widening multiply-accumulate, in four int32 lanes.
inline int32x4_t dot_group(const int16x8_t w[4], const int16_t* x) {
  int32x4_t a = vmull_s16(vget_low_s16(w[0]), vld1_s16(x)), b = vmull_high_s16(w[0], vld1q_s16(x));
  for (int i = 1; i < 4; ++i) {
    const int16x8_t xi = vld1q_s16(x + 8 * i);
    a = vmlal_s16(a, vget_low_s16(w[i]), vget_low_s16(xi));
    b = vmlal_high_s16(b, w[i], xi);
  }
  return vaddq_s32(a, b);
}

inline int32x4_t dot_q8(const int8_t* w, const Acts& a, long at) {
  const int8x16_t w0 = vld1q_s8(w), w1 = vld1q_s8(w + 16);
  const int16x8_t wide[4] = {vmovl_s8(vget_low_s8(w0)), vmovl_high_s8(w0), vmovl_s8(vget_low_s8(w1)),
                             vmovl_high_s8(w1)};
  return dot_group(wide, a.x + at);
}

// Byte i of a packed int4 group holds element i (low nibble) and element i + 16 (high nibble).
inline int32x4_t dot_q4(const uint8_t* w, const Acts& a, long at) {
  const uint8x16_t bytes = vld1q_u8(w), lo = vandq_u8(bytes, vdupq_n_u8(0x0f)), hi = vshrq_n_u8(bytes, 4);
  const int16x8_t wide[4] = {vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))), vreinterpretq_s16_u16(vmovl_high_u8(lo)),
                             vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
                             vreinterpretq_s16_u16(vmovl_high_u8(hi))};
  return dot_group(wide, a.x + at);
}

#include "kernels/quant_neon.inl"

}  // namespace neon

const Kernels kernels_neon = {
    .name = "neon",
    .matmul = neon::matmul,
    .gemv = neon::gemv,
    .matmul_many = neon::matmul_many,
    .rmsnorm = neon::rmsnorm,
    .rope = neon::rope,
    .attention_part = neon::attention_part,
    .attention_causal = neon::attention_causal,
    .silu_mul = neon::silu_mul,
    .convert_row = neon::convert_row,
    .quantize_rows = neon::quantize_rows,
    .matmul_q8 = neon::matmul_q8,
    .matmul_q4 = neon::matmul_q4,
    .matmul_q4k = neon::matmul_q4k,
};

}  // namespace gally
