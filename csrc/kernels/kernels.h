// The kernel table: one instance per instruction set, chosen once at run time (isa.cpp).
// Kernels know nothing of models: they see matrices, vectors and row ranges. Each SIMD set
// has a scalar twin in kernels_generic.cpp, the portable fallback and the oracle of the tests.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace gally {

struct Kernels {
  const char* name;

  // y[t, r] = b[r] + Σ_k x[t, k] · W[r, k]    (+ y[t, r] when accumulate)
  // for rows r in [r0, r1) and tokens t in [0, n_tok).
  // x [n_tok, n_in] f32 row-major; W [n_out, n_in] in `wtype`, row-major; b [n_out] f32 or null;
  // y [n_tok, ldy] f32 (ldy ≥ r1).
  void (*matmul)(const float* x, const void* W, DType wtype, const float* b, float* y, int n_tok,
                 int n_in, int ldy, int r0, int r1, bool accumulate);

  // out[i] = x[i] / sqrt(mean(x²) + eps) · w[i]    x, w, out [n]; out may alias x.
  void (*rmsnorm)(float* out, const float* x, const float* w, int n, float eps);

  // Rotate-half RoPE on one head vector: pairs (i, i + d/2) turn by angle θ_i, given cos/sin [d/2].
  void (*rope)(float* v, const float* cos, const float* sin, int d);

  // One query against n keys, causal masking done by the caller choosing n:
  // p = softmax(scale · K q) written to probs [n]; out [d] = Σ_j p_j · V[j].
  // q [d]; K, V [n, d] with rows `stride` floats apart.
  void (*attention)(const float* q, const float* K, const float* V, int n, int d, int stride,
                    float scale, float* probs, float* out);

  // g[i] = silu(g[i]) · u[i] = g / (1 + e^-g) · u    g, u [n]
  void (*silu_mul)(float* g, const float* u, int n);
};

extern const Kernels kernels_generic;
#if defined(GALLY_X86)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
// Kernels::matmul with vdpbf16ps for bf16 weights and batches of ≥ 4 tokens (activations rounded
// to bf16); everything else goes to kernels_avx512.matmul. The "avx512bf16" set is kernels_avx512
// with this matmul.
void matmul_avx512bf16(const float* x, const void* W, DType wtype, const float* b, float* y, int n_tok,
                       int n_in, int ldy, int r0, int r1, bool accumulate);
#endif

}  // namespace gally
