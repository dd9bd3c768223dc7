// Matrix products split over the threads of a forward pass (parallel.h), for the model code.
//
// y [n, rows] = x [n, cols] · Wᵀ. A batch's tokens come in two groups (MatmulInput):
// - the row-wise tokens [0, n_rowwise): decode steps and other slices of fewer than
//   gemm_min_tokens (forward.h; a float model's limit is higher). They take the row-by-row kernels
//   (Kernels::gemv, matmul_q8/q4), which read each weight row once for all of them and give each token exactly what it
//   would get alone. The threads split W's rows, in blocks of ROW_BLOCK_GEMV: each streams its own contiguous part of
//   the weights, which is all a bandwidth-bound step needs.
// - the GEMM tokens [n_rowwise, n): prompt chunks, multiplied with the tokens in the vector lanes.
//   The threads split rows in blocks of ROW_BLOCK_GEMM and tokens in tiles of GEMM_SPLIT_TOKENS,
//   into the grid of row parts × token parts whose busiest thread has the least work, since rows
//   alone split unevenly on many threads (576 rows are 18 blocks: 16 threads get 1 or 2).
//
// The activations reach the kernels in the form their weights' format asks for: f32 rows; for
// row-wise tokens into int8/int4 weights, int16-quantized per group (kernels.h), and so are GEMM
// tokens where the set has a gemm_q; for other GEMM tokens on AVX512-BF16, laid out once, by all
// threads, in the bf16 GEMM's tiles.
#pragma once
#include "kernels/kernels.h"
#include "model.h"

namespace gally {

constexpr int ROW_BLOCK_GEMV = 48;  // rows per block of a row-wise product
constexpr int ROW_BLOCK_GEMM = 32;  // rows per block of a GEMM's grid

// A matmul's input [n, n_in] and the forms of it the kernels take.
struct MatmulInput {
  const float* x;                   // f32 [n, n_in]
  int n_rowwise = 0;                // tokens [0, n_rowwise) go row-wise, the rest to the GEMM
  const int16_t* xq = nullptr;      // row-wise tokens in int16 [n_rowwise, n_in], with per-group
  const float* xq_scale = nullptr;  // scales and sums [n_rowwise, n_in/QGROUP] (quantized weights)
  const float* xq_sum = nullptr;
  bool xq_gemm = false;              // xq holds the GEMM tokens too, for Kernels::gemm_q: [n, n_in]
  const uint32_t* packed = nullptr;  // the GEMM tokens in Kernels::pack's layout
};

inline WeightsRef weights_ref(const Matrix& W) { return WeightsRef{W.data, W.dtype, W.scales, W.mins, W.codes}; }

// Products of the row-wise tokens [0, in.n_rowwise), each with the kernel for its weights' format.
void rowwise_outs(const Kernels& ops, const MatmulInput& in, int n_in, const MatmulOut* outs, int count);

// Products of GEMM tokens [t0, t1) (absolute indices, t0 − n_rowwise a multiple of
// GEMM_SPLIT_TOKENS when packed); each out's y points at row 0 of the batch.
void gemm_outs(const Kernels& ops, const MatmulInput& in, int t0, int t1, int n_in, const MatmulOut* outs, int count);

// Both groups of tokens [0, n) for the outs' rows: what one thread does for its own rows.
void matmul_outs(const Kernels& ops, const MatmulInput& in, int n, int n_in, const MatmulOut* outs, int count);

// This thread's rows [r0, r1) and tokens [t0, t1) of a GEMM over n tokens with `rows` rows.
void thread_tiles(int rows, int n, int* r0, int* r1, int* t0, int* t1);

// y [n, W.rows] (+)= in [n, W.cols] · Wᵀ (+ bias), split over the threads; ends at a barrier.
void matmul_parallel(const Kernels& ops, const Matrix& W, const MatmulInput& in, int n, const float* bias, float* y,
                     bool accumulate);

}  // namespace gally
