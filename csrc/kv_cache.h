// The keys and values of the sequences: what attention looks back at. Each position's key and
// value vectors, per layer and KV head, are written once when the token passes through that layer
// and read by every later token of its sequence.
//
// Memory follows the tokens held: a sequence's cache is a list of blocks of KV_BLOCK_ROWS
// positions, taken from its model's pool as the sequence reaches them and given back when it is
// truncated or dropped. A block holds
//     [layers][k | v][kv_heads][block_rows][row] elements of the pool's dtype
// (a row of head_dim f32, or bf16 / f16 for a compact cache: half the bytes per token; or int8
// codes and a bf16 scale per 32, kernels.h kv_row_elements: about a quarter),
// so that within a block one head's keys (and values) are contiguous rows: the attention kernels
// stream a block at a time (kernels.h, KvHead). Sequences with a common prefix share its full
// blocks (fork); a shared block is copied before it is written (prepare).
#pragma once
#include <cstddef>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"

namespace gally {

constexpr int KV_BLOCK_ROWS = 16;  // positions per block: vLLM's size; a multiple of KV_BLOCK_ALIGN

struct KvShape {
  int layers = 0, kv_heads = 0, head_dim = 0;
  int block_rows = KV_BLOCK_ROWS;
  DType dtype = DType::F32;  // F32, BF16, F16 or Q8

  long row_elements() const { return kv_row_elements(dtype, head_dim); }
  size_t block_elements() const { return size_t(layers) * 2 * kv_heads * block_rows * row_elements(); }
  size_t element_size() const { return kv_element_size(dtype); }
  size_t block_bytes() const { return block_elements() * element_size(); }
  long keys(int layer, int head) const { return (long(layer) * 2 * kv_heads + head) * block_rows * row_elements(); }
  long values(int layer, int head) const { return keys(layer, head) + long(kv_heads) * block_rows * row_elements(); }
};

// "f32" | "bf16" | "f16" | "int8" (DType::Q8, kernels.h kv_row_elements)
DType parse_kv_dtype(const std::string& name);

// The pool ran out of blocks (its cap, or the system's memory).
class KvPoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The blocks of one model's sequences, up to max_blocks in use at once. A block's memory is
// mapped (in an arena of blocks) when first acquired and kept for reuse when released (trim()
// gives it back). Thread-safe: sessions in several threads share it.
class KvPool {
 public:
  KvPool(const KvShape& shape, size_t max_blocks);
  ~KvPool();
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  const KvShape& shape() const { return shape_; }
  size_t block_bytes() const { return shape_.block_bytes(); }
  size_t max_blocks() const { return max_blocks_; }
  size_t in_use() const;     // blocks held by some sequence
  size_t allocated() const;  // blocks with memory: in use, or free and kept for reuse

  // A block with a reference count of 1; throws KvPoolExhausted when max_blocks are in use.
  int acquire();
  void retain(int id);
  void release(int id);
  int refs(int id) const;
  // The block's memory, stable while the block is held; under the lock, since acquire() in another
  // thread may grow (reallocate) the table meanwhile (ThreadSanitizer saw it).
  void* data(int id) const {
    std::lock_guard<std::mutex> lock(mu_);
    return data_[id];
  }
  // Gives the free blocks' memory back, best effort: the whole pages within each (a block smaller
  // than a page keeps its memory), and where they lay in a huge page, when the kernel splits it.
  void trim();

 private:
  static constexpr size_t ARENA_BYTES = size_t(32) << 20;
  void map_arena();  // under the lock

  KvShape shape_;
  size_t max_blocks_;
  mutable std::mutex mu_;
  std::vector<void*> data_;   // by id
  std::vector<bool> backed_;  // by id: false once trimmed, until acquired again
  std::vector<int> refs_;     // by id
  std::vector<int> free_;     // released ids (with or without memory)
  size_t in_use_ = 0;
  std::vector<std::pair<void*, size_t>> arenas_;  // mapped: start, bytes
  char* arena_next_ = nullptr;                    // the next block of the last arena
  size_t arena_left_ = 0;                         // blocks left in it
};

// One sequence's cache: blocks from a pool covering positions [0, blocks · block_rows).
class KvCache {
 public:
  explicit KvCache(std::shared_ptr<KvPool> pool);
  ~KvCache();
  KvCache(KvCache&& other) noexcept;
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvShape& shape() const { return pool_->shape(); }
  KvPool& pool() const { return *pool_; }
  int blocks() const { return int(ids_.size()); }
  int capacity() const { return blocks() * shape().block_rows; }

  // Makes positions [begin, end) writable: takes the blocks up to `end`, and copies first any
  // block in the range that another cache shares. On KvPoolExhausted the cache keeps what it had.
  void prepare(int begin, int end);
  // Gives back the blocks past the first `positions`.
  void truncate(int positions);
  // A cache holding this one's first `positions` positions: the full blocks shared, the partial
  // last one copied.
  KvCache fork(int positions) const;

  // Head `head` of layer `layer` as the attention kernels read it (and the layer's next KV heads, KvHead::of).
  KvHead head(int layer, int head) const {
    return KvHead{ptrs_.data(),
                  shape().keys(layer, head),
                  shape().values(layer, head),
                  shape().block_rows,
                  shape().row_elements(),
                  shape().dtype,
                  shape().keys(layer, 1) - shape().keys(layer, 0)};
  }
  // Where the key (value) row of `position` goes (Kernels::convert_row writes it).
  void* key(int layer, int head, int position) { return row(shape().keys(layer, head), position); }
  void* value(int layer, int head, int position) { return row(shape().values(layer, head), position); }

 private:
  void* row(long offset, int position) {
    const KvShape& s = shape();
    return (uint8_t*)ptrs_[position / s.block_rows] +
           (offset + long(position % s.block_rows) * s.row_elements()) * s.element_size();
  }

  std::shared_ptr<KvPool> pool_;
  std::vector<int> ids_;
  std::vector<const void*> ptrs_;  // the kernels' view: one pointer per block
};

}  // namespace gally
