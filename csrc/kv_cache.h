// The keys and values of one sequence: what attention looks back at. Each position's key and value
// vectors, per layer and KV head, are written once when the token passes through that layer and
// read by every later token.
//
// The cache is a list of blocks of `block_rows` positions. A block holds
//     [layers][k | v][kv_heads][block_rows][head_dim] floats,
// so that within a block one head's keys (and values) are contiguous rows: the attention kernels
// stream a block at a time (kernels.h, KvHead).
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

#include "kernels/kernels.h"

namespace gally {

struct KvShape {
  int layers = 0, kv_heads = 0, head_dim = 0;
  int block_rows = 0;  // positions per block, a multiple of KV_BLOCK_ALIGN

  size_t block_floats() const { return size_t(layers) * 2 * kv_heads * block_rows * head_dim; }
  long keys(int layer, int head) const { return (long(layer) * 2 * kv_heads + head) * block_rows * head_dim; }
  long values(int layer, int head) const { return keys(layer, head) + long(kv_heads) * block_rows * head_dim; }
};

class KvCache {
 public:
  // A cache of one block that holds `positions` (rounded up to whole aligned rows). Its pages
  // are left untouched until written, so it costs the memory of the positions used.
  KvCache(int layers, int kv_heads, int head_dim, int positions);

  const KvShape& shape() const { return shape_; }
  int capacity() const { return int(blocks_.size()) * shape_.block_rows; }

  // Head `head` of layer `layer` as the attention kernels read it.
  KvHead head(int layer, int head) const {
    return KvHead{blocks_.data(), shape_.keys(layer, head), shape_.values(layer, head), shape_.block_rows};
  }
  // Where the key (value) vector [head_dim] of `position` goes.
  float* key(int layer, int head, int position) { return row(shape_.keys(layer, head), position); }
  float* value(int layer, int head, int position) { return row(shape_.values(layer, head), position); }

 private:
  float* row(long offset, int position) {
    return blocks_[position / shape_.block_rows] + offset + long(position % shape_.block_rows) * shape_.head_dim;
  }

  KvShape shape_;
  std::vector<float*> blocks_;  // the kernels' view: one pointer per block
  std::vector<std::unique_ptr<float[]>> owned_;
};

}  // namespace gally
