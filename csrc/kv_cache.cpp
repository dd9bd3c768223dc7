#include "kv_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace gally {

DType parse_kv_dtype(const std::string& name) {
  if (name == "f32") return DType::F32;
  if (name == "bf16") return DType::BF16;
  if (name == "f16") return DType::F16;
  if (name == "int8") return DType::Q8;
  throw std::invalid_argument("the KV cache's dtype must be one of 'f32', 'bf16', 'f16', 'int8', got '" + name + "'");
}

KvPool::KvPool(const KvShape& shape, size_t max_blocks) : shape_(shape), max_blocks_(max_blocks) {
  if (shape.dtype != DType::F32 && shape.dtype != DType::BF16 && shape.dtype != DType::F16 && shape.dtype != DType::Q8)
    throw std::invalid_argument("the KV cache holds f32, bf16, f16 or int8, not " +
                                std::string(dtype_name(shape.dtype)));
  if (shape.block_rows <= 0 || shape.block_rows % KV_BLOCK_ALIGN != 0)
    throw std::invalid_argument("KV block rows must be a positive multiple of " + std::to_string(KV_BLOCK_ALIGN));
  if (max_blocks == 0) throw std::invalid_argument("the KV cache pool must hold at least one block");
}

KvPool::~KvPool() {
  for (auto [p, bytes] : arenas_) ::munmap(p, bytes);
}

size_t KvPool::in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}

size_t KvPool::allocated() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (bool b : backed_) n += b;
  return n;
}

int KvPool::acquire() {
  std::lock_guard<std::mutex> lock(mu_);
  if (in_use_ >= max_blocks_)
    throw KvPoolExhausted("the KV cache is full: all " + std::to_string(max_blocks_) + " blocks of " +
                          std::to_string(shape_.block_rows) + " positions (" +
                          std::to_string(max_blocks_ * block_bytes() >> 20) +
                          " MiB) are in use; give the model a larger KV cache (kv_cache_bytes) or end other sequences");
  int id;
  if (!free_.empty()) {
    id = free_.back();
    free_.pop_back();
  } else {
    if (arena_left_ == 0) map_arena();
    id = int(data_.size());
    data_.push_back(arena_next_);
    refs_.push_back(0);
    backed_.push_back(false);
    arena_next_ += block_bytes(), --arena_left_;
  }
  backed_[id] = true;
  refs_[id] = 1;
  ++in_use_;
  return id;
}

void KvPool::retain(int id) {
  std::lock_guard<std::mutex> lock(mu_);
  ++refs_[id];
}

void KvPool::release(int id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (--refs_[id] == 0) {
    free_.push_back(id);
    --in_use_;
  }
}

int KvPool::refs(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return refs_[id];
}

// Blocks come from arenas of about ARENA_BYTES, each aligned to and advised into 2 MiB pages
// (where the kernel grants them; a mapping per block, smaller than a huge page, never got one). A
// decode step at depth 8160 reads a few KB of each of 510 blocks per layer and KV head, in 4 KiB
// pages a page apiece for the TLB: SmolLM2 bf16 at that depth decodes 2-7% faster.
void KvPool::map_arena() {
  constexpr size_t HUGE_PAGE = size_t(2) << 20;
  const size_t blocks = std::min(max_blocks_ - data_.size(), std::max<size_t>(1, ARENA_BYTES / block_bytes()));
  const size_t bytes = (blocks * block_bytes() + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  // Anonymous pages, zero-filled on first touch: the arena costs memory as blocks fill it, a huge
  // page at a time. One huge page more than needed, so that it can start at a huge page's boundary.
  void* p = ::mmap(nullptr, bytes + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw KvPoolExhausted("the system has no memory for more KV cache blocks of " +
                          std::to_string(block_bytes() >> 10) + " KiB (" + std::to_string(in_use_) + " blocks in use)");
  char* start = (char*)(((uintptr_t)p + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE);
  if (start > (char*)p) ::munmap(p, start - (char*)p);
  ::munmap(start + bytes, (char*)p + HUGE_PAGE - start);
  const char* huge = std::getenv("GALLY_HUGEPAGES");  // "0": small pages, as for the weights (README)
  if (!huge || std::string(huge) != "0") ::madvise(start, bytes, MADV_HUGEPAGE);  // a hint: without THP, small pages
  arenas_.emplace_back(start, bytes);
  arena_next_ = start, arena_left_ = blocks;
}

void KvPool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  const uintptr_t page = uintptr_t(::sysconf(_SC_PAGESIZE));
  for (int id : free_)
    if (backed_[id]) {  // the whole pages within the block go back to the system, read as zeros again
      const uintptr_t a = ((uintptr_t)data_[id] + page - 1) / page * page,
                      b = ((uintptr_t)data_[id] + block_bytes()) / page * page;
      if (a < b && ::madvise((void*)a, b - a, MADV_DONTNEED) == 0) backed_[id] = false;
    }
}

KvCache::KvCache(std::shared_ptr<KvPool> pool) : pool_(std::move(pool)) {}

KvCache::~KvCache() {
  if (pool_) truncate(0);
}

KvCache::KvCache(KvCache&& other) noexcept
    : pool_(std::move(other.pool_)), ids_(std::move(other.ids_)), ptrs_(std::move(other.ptrs_)) {
  other.ids_.clear(), other.ptrs_.clear();
}

void KvCache::prepare(int begin, int end) {
  const int rows = shape().block_rows, last = (end + rows - 1) / rows;
  std::vector<std::pair<int, int>> taken;  // (block index, new id), given back if the pool runs out midway
  try {
    for (int b = std::min(begin / rows, blocks()); b < last; ++b) {
      if (b < blocks() && pool_->refs(ids_[b]) == 1) continue;
      taken.emplace_back(b, pool_->acquire());
      if (b < blocks()) std::memcpy(pool_->data(taken.back().second), ptrs_[b], pool_->block_bytes());  // on write
    }
  } catch (const KvPoolExhausted&) {
    for (auto [b, id] : taken) pool_->release(id);
    throw;
  }
  for (auto [b, id] : taken) {
    if (b < blocks()) {
      pool_->release(ids_[b]);
      ids_[b] = id, ptrs_[b] = pool_->data(id);
    } else {
      ids_.push_back(id), ptrs_.push_back(pool_->data(id));
    }
  }
}

void KvCache::truncate(int positions) {
  const int rows = shape().block_rows, keep = (positions + rows - 1) / rows;
  while (blocks() > keep) {
    pool_->release(ids_.back());
    ids_.pop_back(), ptrs_.pop_back();
  }
}

KvCache KvCache::fork(int positions) const {
  KvCache copy(pool_);
  const int rows = shape().block_rows, full = std::min(positions / rows, blocks());
  for (int b = 0; b < full; ++b) {
    pool_->retain(ids_[b]);
    copy.ids_.push_back(ids_[b]), copy.ptrs_.push_back(ptrs_[b]);
  }
  if (positions % rows && full < blocks()) {
    copy.prepare(full * rows, positions);  // a block of its own for the partial rows
    std::memcpy(const_cast<void*>(copy.ptrs_[full]), ptrs_[full], pool_->block_bytes());
  }
  return copy;
}

}  // namespace gally
