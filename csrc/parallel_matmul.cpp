#include "parallel_matmul.h"

#include <algorithm>

#include "parallel.h"

namespace gally {

void matmul_outs(const Kernels& ops, const MatmulInput& in, int n, int n_in, const MatmulOut* outs, int count) {
  if (in.packed) return ops.matmul_many_packed(in.packed, in.x, n, n_in, outs, count);
  if (!in.xq) return ops.matmul_many(in.x, n, n_in, outs, count);
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (o.W.dtype == DType::Q8)
      ops.matmul_q8(in.xq, in.xq_scale, (const int8_t*)o.W.data, o.W.scales, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1,
                    o.accumulate);
    else if (o.W.dtype == DType::Q4)
      ops.matmul_q4(in.xq, in.xq_scale, in.xq_sum, (const uint8_t*)o.W.data, o.W.scales, o.W.mins, o.b, o.y, n, n_in,
                    o.ldy, o.r0, o.r1, o.accumulate);
    else ops.matmul(in.x, o.W, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

void thread_tiles(int rows, int n, int* r0, int* r1, int* t0, int* t1) {
  const int nt = par::thread_count(), id = par::thread_id();
  const int rb = (rows + ROW_BLOCK_GEMM - 1) / ROW_BLOCK_GEMM, tb = (n + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS;
  int parts = 1;  // token parts; nt / parts row parts
  long best = -1;
  for (int p = 1; p <= nt; ++p)
    if (nt % p == 0) {
      const long cost = long((rb + nt / p - 1) / (nt / p)) * ((tb + p - 1) / p);
      if (best < 0 || cost < best) best = cost, parts = p;
    }
  const int row_parts = nt / parts, ir = id / parts, it = id % parts;
  *r0 = std::min(rows, int(long(rb) * ir / row_parts) * ROW_BLOCK_GEMM);
  *r1 = std::min(rows, int(long(rb) * (ir + 1) / row_parts) * ROW_BLOCK_GEMM);
  // Token part boundaries; one that would leave a last part of fewer than GEMM_MIN_TOKENS moves to
  // n, so that no part takes the few-token kernels, which sum in another order than the GEMM.
  auto boundary = [&](int i) {
    const int b = std::min(n, int(long(tb) * i / parts) * GEMM_SPLIT_TOKENS);
    return n - b < GEMM_MIN_TOKENS ? n : b;
  };
  *t0 = it == 0 ? 0 : boundary(it);
  *t1 = boundary(it + 1);
}

void thread_part(int rows, int n, int gemv_block, int* r0, int* r1, int* t0, int* t1) {
  if (n < GEMM_MIN_TOKENS) {
    par::share(rows, gemv_block, r0, r1);
    *t0 = 0, *t1 = n;
  } else {
    thread_tiles(rows, n, r0, r1, t0, t1);
  }
}

MatmulInput tokens_from(const Kernels& ops, const MatmulInput& in, int t0, int n_in) {
  MatmulInput a = in;
  a.x += size_t(t0) * n_in;
  if (in.packed) a.packed += ops.packed_size(t0, n_in);
  if (in.xq) {  // int16 copies exist for a few tokens only, so t0 is 0 today; kept right regardless
    a.xq += size_t(t0) * n_in;
    a.xq_scale += size_t(t0) * (n_in / QGROUP);
    a.xq_sum += size_t(t0) * (n_in / QGROUP);
  }
  return a;
}

void matmul_parallel(const Kernels& ops, const Matrix& W, const MatmulInput& in, int n, const float* bias, float* y,
                     bool accumulate) {
  int r0, r1, t0, t1;
  thread_part(W.rows, n, ROW_BLOCK_GEMV, &r0, &r1, &t0, &t1);
  const MatmulOut out{weights_ref(W), bias, y + size_t(t0) * W.rows, W.rows, r0, r1, accumulate};
  if (r0 < r1 && t0 < t1) matmul_outs(ops, tokens_from(ops, in, t0, W.cols), t1 - t0, W.cols, &out, 1);
  par::barrier();
}

}  // namespace gally
