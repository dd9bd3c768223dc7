#include "parallel_matmul.h"

#include <algorithm>

#include "parallel.h"

namespace gally {

void rowwise_outs(const Kernels& ops, const MatmulInput& in, int n_in, const MatmulOut* outs, int count) {
  const int n = in.n_rowwise;
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (in.xq && o.W.dtype == DType::Q8)
      ops.matmul_q8(in.xq, in.xq_scale, (const int8_t*)o.W.data, o.W.scales, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1,
                    o.accumulate);
    else if (in.xq && o.W.dtype == DType::Q4)
      ops.matmul_q4(in.xq, in.xq_scale, in.xq_sum, (const uint8_t*)o.W.data, o.W.scales, o.W.mins, o.b, o.y, n, n_in,
                    o.ldy, o.r0, o.r1, o.accumulate);
    else if (in.xq && o.W.dtype == DType::Q4K)
      ops.matmul_q4k(in.xq, in.xq_scale, in.xq_sum, o.W, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1, o.accumulate);
    else ops.gemv(in.x, o.W, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

void gemm_outs(const Kernels& ops, const MatmulInput& in, int t0, int t1, int n_in, const MatmulOut* outs, int count) {
  MatmulOut shifted[4];  // the outs with y at token t0 that take matmul_many
  int rest = 0;
  const long tg = long(t0) * (n_in / QGROUP);
  for (int i = 0; i < count; ++i) {
    MatmulOut o = outs[i];
    o.y += size_t(t0) * o.ldy;
    if (in.xq_gemm && ops.takes_gemm_q(o.W.dtype))
      ops.gemm_q(in.xq + size_t(t0) * n_in, in.xq_scale + tg, in.xq_sum + tg, o.W, o.b, o.y, t1 - t0, n_in, o.ldy, o.r0,
                 o.r1, o.accumulate);
    else shifted[rest++] = o;
  }
  if (rest == 0) return;
  const float* x = in.x + size_t(t0) * n_in;
  if (in.packed)
    ops.matmul_many_packed(in.packed + ops.packed_size(t0 - in.n_rowwise, n_in), x, t1 - t0, n_in, shifted, rest);
  else ops.matmul_many(x, t1 - t0, n_in, shifted, rest);
}

void matmul_outs(const Kernels& ops, const MatmulInput& in, int n, int n_in, const MatmulOut* outs, int count) {
  if (in.n_rowwise > 0) rowwise_outs(ops, in, n_in, outs, count);
  if (n > in.n_rowwise) gemm_outs(ops, in, in.n_rowwise, n, n_in, outs, count);
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

void matmul_parallel(const Kernels& ops, const Matrix& W, const MatmulInput& in, int n, const float* bias, float* y,
                     bool accumulate) {
  const MatmulOut all{weights_ref(W), bias, y, W.rows, 0, W.rows, accumulate};
  if (in.n_rowwise > 0) {
    MatmulOut out = all;
    par::share(W.rows, ROW_BLOCK_GEMV, &out.r0, &out.r1);
    if (out.r0 < out.r1) rowwise_outs(ops, in, W.cols, &out, 1);
  }
  if (n > in.n_rowwise) {
    MatmulOut out = all;
    int t0, t1;
    thread_tiles(W.rows, n - in.n_rowwise, &out.r0, &out.r1, &t0, &t1);
    if (out.r0 < out.r1 && t0 < t1) gemm_outs(ops, in, in.n_rowwise + t0, in.n_rowwise + t1, W.cols, &out, 1);
  }
  par::barrier();
}

}  // namespace gally
