// The kernel tests' KV cache: K, V [g, n, d] copied into blocks of block_rows positions in type t
// (f32, bf16 or f16, rounded to nearest even, or int8), as a KvCache lays out a layer's g KV heads:
// each block [k | v][g][block_rows][row]. The blocks lie in reverse order in memory, so that a
// kernel that assumed one contiguous run would read the wrong rows. Used by the testing bindings
// (bindings_testing.cpp) and tests/kernel_runner.cpp alike.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kernels/kernels.h"

namespace gally {

struct PagedKv {
  std::vector<std::vector<uint8_t>> storage;
  std::vector<const void*> blocks;
  KvHead head;  // the first KV head (KvHead::of the others)

  PagedKv(const float* K, const float* V, long g, long n, long d, int block_rows, DType t) {
    if (block_rows <= 0 || block_rows % KV_BLOCK_ALIGN != 0)
      throw std::invalid_argument("block_rows must be a positive multiple of 16");
    const long nb = (n + block_rows - 1) / block_rows, es = long(kv_element_size(t)),
               row_bytes = kv_row_elements(t, d) * es, run = block_rows * row_bytes;  // a head's rows in a block
    storage.resize(nb);
    for (long b = nb; b-- > 0;) storage[b].assign(size_t(2 * g * run), 0xff);  // NaN where unwritten
    for (long h = 0; h < g; ++h)
      for (long j = 0; j < n; ++j) {
        uint8_t* row = storage[j / block_rows].data() + h * run + (j % block_rows) * row_bytes;
        kernels_generic.convert_row(K + (h * n + j) * d, row, t, int(d));
        kernels_generic.convert_row(V + (h * n + j) * d, row + g * run, t, int(d));
      }
    for (auto& s : storage) blocks.push_back(s.data());
    head = KvHead{blocks.data(), 0, g * run / es, block_rows, row_bytes / es, t, run / es};
  }
  PagedKv(const PagedKv&) = delete;  // head points into blocks
  PagedKv& operator=(const PagedKv&) = delete;
};

}  // namespace gally
