// Sequences and the passes that extend them. A Sequence is one text being read or written: its KV
// cache, its length, the most positions it may reach. A Runner runs forward passes that append
// tokens to one or several sequences at once (a batch), with scratch of its own; a batch of
// decode steps reads every weight once for all its sequences.
#pragma once
#include <memory>
#include <vector>

#include "forward.h"
#include "kv_cache.h"
#include "model.h"

namespace gally {

class Sequence {
 public:
  Sequence(std::shared_ptr<const Model> model, std::shared_ptr<KvPool> pool, int max_context);

  int position() const { return pos_; }  // tokens in the cache
  int max_context() const { return max_ctx_; }
  void truncate(int position);  // forgets the cache from `position` on
  // A sequence holding this one's first `position` tokens, sharing their cache blocks.
  std::unique_ptr<Sequence> fork(int position) const;
  const Model& model() const { return *m_; }
  KvCache& cache() { return cache_; }

 private:
  friend class Runner;
  Sequence(std::shared_ptr<const Model> model, KvCache&& cache, int max_context, int position);
  std::shared_ptr<const Model> m_;
  int max_ctx_, pos_ = 0;
  KvCache cache_;
};

class Runner {
 public:
  Runner(std::shared_ptr<const Model> model, int max_tokens);
  int max_tokens() const { return ws_.max_tokens; }
  // Slices of fewer tokens take the row-wise matmuls (forward.h gemm_min_tokens).
  int gemm_min_tokens() const;

  // Appends counts[i] tokens to seqs[i], taken in order from `tokens`, and writes the logits of
  // each sequence's last token to logits [n_seqs, vocab] — or, with all_logits (one sequence),
  // of every token, [n, vocab]. One sequence may bring more than max_tokens (several passes);
  // several must fit in one. Throws (changing no sequence) on a bad id, a sequence past its
  // max_context, or a full KV cache pool. record: one sequence only.
  void forward(Sequence* const* seqs, int n_seqs, const int32_t* tokens, const int* counts, float* logits,
               bool all_logits, const Record& record);

 private:
  std::shared_ptr<const Model> m_;
  Workspace ws_;
  std::vector<int> order_, rows_, last_rows_;
  std::vector<int32_t> batch_tokens_;
  std::vector<SequenceSlice> slices_;
};

}  // namespace gally
