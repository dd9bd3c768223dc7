#include "kv_cache.h"

namespace gally {

KvCache::KvCache(int layers, int kv_heads, int head_dim, int positions) {
  const int rows = (positions + KV_BLOCK_ALIGN - 1) / KV_BLOCK_ALIGN * KV_BLOCK_ALIGN;
  shape_ = KvShape{layers, kv_heads, head_dim, rows};
  owned_.emplace_back(new float[shape_.block_floats()]);
  blocks_.push_back(owned_.back().get());
}

}  // namespace gally
