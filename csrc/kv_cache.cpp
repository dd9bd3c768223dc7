#include "kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
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
  for (void* p : data_)
    if (p) ::munmap(p, block_bytes());
}

size_t KvPool::in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}

size_t KvPool::allocated() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (void* p : data_) n += p != nullptr;
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
    id = int(data_.size());
    data_.push_back(nullptr);
    refs_.push_back(0);
  }
  if (!data_[id]) {
    // Anonymous pages, zero-filled on first touch: a block costs memory as positions fill it.
    void* p = ::mmap(nullptr, block_bytes(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      free_.push_back(id);
      throw KvPoolExhausted("the system has no memory for another KV cache block of " +
                            std::to_string(block_bytes() >> 10) + " KiB (" + std::to_string(in_use_) +
                            " blocks in use)");
    }
    data_[id] = p;
  }
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

void KvPool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  for (int id : free_)
    if (data_[id]) {
      ::munmap(data_[id], block_bytes());
      data_[id] = nullptr;
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
