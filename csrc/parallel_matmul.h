// Matrix products split over the threads of a forward pass (parallel.h), for the model code.
//
// y [n, rows] = x [n, cols] · Wᵀ. The kernels (kernels.h) compute a range of W's rows for a range
// of tokens; this file decides which thread takes which:
// - a few tokens (decode steps, n < GEMM_MIN_TOKENS) split W's rows only, in blocks of
//   ROW_BLOCK_GEMV rows: each thread streams its own contiguous part of the weights once, which
//   is all a bandwidth-bound step needs;
// - a batch splits rows in blocks of ROW_BLOCK_GEMM and tokens in tiles of GEMM_SPLIT_TOKENS,
//   into the grid of row parts × token parts whose busiest thread has the least work, since rows
//   alone split unevenly on many threads (576 rows are 18 blocks: 16 threads get 1 or 2).
//
// The activations reach the kernels in the form their weights' format asks for (MatmulInput):
// f32 rows; for a few tokens into int8/int4 weights also int16-quantized per group (kernels.h);
// for a batch on AVX512-BF16 also laid out once, by all threads, in the bf16 GEMM's tiles.
#pragma once
#include "kernels/kernels.h"
#include "model.h"

namespace gally {

constexpr int ROW_BLOCK_GEMV = 48;  // rows per block when only rows are split (a few tokens)
constexpr int ROW_BLOCK_GEMM = 32;  // rows per block of a batch's grid

// A matmul's input [n, n_in] and the forms of it the kernels may take instead.
struct MatmulInput {
  const float* x;               // f32 [n, n_in]
  const int16_t* xq = nullptr;  // int16 [n, n_in], with per-group scales and sums [n, n_in/QGROUP]
  const float* xq_scale = nullptr;
  const float* xq_sum = nullptr;
  const uint32_t* packed = nullptr;  // x in Kernels::pack's layout
};

inline WeightsRef weights_ref(const Matrix& W) { return WeightsRef{W.data, W.dtype, W.scales, W.mins}; }

// Products of one input [n, n_in], each with the kernel for its weights' format.
void matmul_outs(const Kernels& ops, const MatmulInput& in, int n, int n_in, const MatmulOut* outs, int count);

// This thread's rows [r0, r1) and tokens [t0, t1) of a batch's product with `rows` rows.
void thread_tiles(int rows, int n, int* r0, int* r1, int* t0, int* t1);

// This thread's part of a product with `rows` rows, for n tokens: rows only for a few tokens (in
// blocks of `gemv_block`), the grid above for a batch.
void thread_part(int rows, int n, int gemv_block, int* r0, int* r1, int* t0, int* t1);

// The input from token t0 on (t0 a multiple of GEMM_SPLIT_TOKENS when packed).
MatmulInput tokens_from(const Kernels& ops, const MatmulInput& in, int t0, int n_in);

// y [n, W.rows] (+)= in [n, W.cols] · Wᵀ (+ bias), split over the threads; ends at a barrier.
void matmul_parallel(const Kernels& ops, const Matrix& W, const MatmulInput& in, int n, const float* bias, float* y,
                     bool accumulate);

}  // namespace gally
