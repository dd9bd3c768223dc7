#include "sequence.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace gally {

Sequence::Sequence(std::shared_ptr<const Model> model, std::shared_ptr<KvPool> pool, int max_context)
    : m_(std::move(model)), max_ctx_(max_context), cache_(std::move(pool)) {
  if (max_context <= 0) throw std::invalid_argument("max_context must be positive, got " + std::to_string(max_context));
}

Sequence::Sequence(std::shared_ptr<const Model> model, KvCache&& cache, int max_context, int position)
    : m_(std::move(model)), max_ctx_(max_context), pos_(position), cache_(std::move(cache)) {}

void Sequence::truncate(int position) {
  if (position < 0 || position > pos_)
    throw std::invalid_argument("truncate: position must be in [0, " + std::to_string(pos_) + "], got " +
                                std::to_string(position));
  pos_ = position;
  cache_.truncate(position);
}

std::unique_ptr<Sequence> Sequence::fork(int position) const {
  if (position < 0 || position > pos_)
    throw std::invalid_argument("fork: position must be in [0, " + std::to_string(pos_) + "], got " +
                                std::to_string(position));
  return std::unique_ptr<Sequence>(new Sequence(m_, cache_.fork(position), max_ctx_, position));
}

Runner::Runner(std::shared_ptr<const Model> model, int max_tokens) : m_(std::move(model)), ws_(*m_, max_tokens) {
  if (max_tokens <= 0) throw std::invalid_argument("max_tokens must be positive, got " + std::to_string(max_tokens));
  rows_.resize(max_tokens);
  std::iota(rows_.begin(), rows_.end(), 0);
}

int Runner::gemm_min_tokens() const { return gally::gemm_min_tokens(*m_, kernels()); }

namespace {

void check(const ModelConfig& c, const Sequence& s, int index, const int32_t* tokens, int n) {
  const std::string which = "sequence " + std::to_string(index) + ": ";
  if (n <= 0) throw std::invalid_argument(which + "token_ids is empty");
  for (int i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw std::invalid_argument(which + "token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  const int p = s.position();
  if (p + n > s.max_context())
    throw std::length_error(which + "sequence of " + std::to_string(p + n) + " tokens (" + std::to_string(p) +
                            " in the cache + " + std::to_string(n) + " new) exceeds max_context " +
                            std::to_string(s.max_context()));
  if (c.sliding_window > 0 && p + n > c.sliding_window)
    throw std::length_error(which + "sequence of " + std::to_string(p + n) +
                            " tokens exceeds the model's sliding_window " + std::to_string(c.sliding_window) +
                            ", which gally does not implement");
}

}  // namespace

void Runner::forward(Sequence* const* seqs, int n_seqs, const int32_t* tokens, const int* counts, float* logits,
                     bool all_logits, const Record& record) {
  const ModelConfig& c = m_->config;
  if (n_seqs <= 0) throw std::invalid_argument("no sequences to run");
  if (n_seqs > 1 && (all_logits || record.any()))
    throw std::invalid_argument("all_logits and recording take a single sequence");
  long total = 0;
  for (int i = 0; i < n_seqs; ++i) {
    if (&seqs[i]->model() != m_.get()) throw std::invalid_argument("a sequence belongs to another model");
    for (int j = 0; j < i; ++j)
      if (seqs[j] == seqs[i]) throw std::invalid_argument("a sequence appears twice in one batch");
    check(c, *seqs[i], i, tokens + total, counts[i]);
    total += counts[i];
  }
  if (n_seqs > 1 && total > ws_.max_tokens)
    throw std::invalid_argument("a batch of " + std::to_string(total) + " tokens exceeds the runner's " +
                                std::to_string(ws_.max_tokens));
  for (int i = 0; i < n_seqs; ++i) {  // cache blocks first, so that a full pool changes nothing
    Sequence& s = *seqs[i];
    try {
      s.cache_.prepare(s.pos_, s.pos_ + counts[i]);
    } catch (...) {
      for (int j = 0; j < i; ++j) seqs[j]->cache_.truncate(seqs[j]->pos_);
      throw;
    }
  }
  // one kernel set for the whole call (its passes' kernels and which tokens go row-wise), whatever
  // another thread selects meanwhile
  const Kernels& ops = kernels();
  const int gemm_min = gally::gemm_min_tokens(*m_, ops);
  if (n_seqs == 1) {  // one sequence: passes of up to max_tokens tokens
    Sequence& s = *seqs[0];
    Record rec = record;
    const int n = counts[0];
    rec.n = n, rec.context = s.pos_ + n;
    for (int done = 0, chunk = 0; done < n; done += chunk) {
      chunk = chunk_tokens(n - done, ws_.max_tokens, gemm_min);
      const SequenceSlice slice{&s.cache_, s.pos_, 0, chunk};
      Batch batch{tokens + done, chunk, &slice, 1};
      batch.n_rowwise = chunk < gemm_min ? chunk : 0;
      if (all_logits) {
        batch.logit_rows = rows_.data(), batch.n_logits = chunk;
        batch.logits = logits + size_t(done) * c.vocab_size;
      } else if (done + chunk == n) {
        batch.logit_rows = rows_.data() + chunk - 1, batch.n_logits = 1, batch.logits = logits;
      }
      batch.n_logits_rowwise = batch.n_logits < gemm_min ? batch.n_logits : 0;
      rec.offset = done;
      gally::forward(*m_, ops, batch, ws_, rec);
      s.pos_ += chunk;
    }
    return;
  }
  // Several sequences in one pass: the slices of a few tokens (decode steps) first, row-wise; the
  // prompt chunks after them, through the GEMM. Logits stay in the caller's order.
  order_.resize(n_seqs);
  std::iota(order_.begin(), order_.end(), 0);
  std::stable_partition(order_.begin(), order_.end(), [&](int i) { return counts[i] < gemm_min; });
  std::vector<long> offset(n_seqs + 1, 0);  // where each sequence's tokens start in `tokens`
  for (int i = 0; i < n_seqs; ++i) offset[i + 1] = offset[i] + counts[i];
  batch_tokens_.resize(total);
  slices_.resize(n_seqs);
  last_rows_.resize(n_seqs);
  int first = 0, rowwise = 0;
  for (int k = 0; k < n_seqs; ++k) {
    const int i = order_[k];
    std::copy(tokens + offset[i], tokens + offset[i + 1], batch_tokens_.begin() + first);
    slices_[k] = SequenceSlice{&seqs[i]->cache_, seqs[i]->pos_, first, counts[i]};
    last_rows_[i] = first + counts[i] - 1;
    if (counts[i] < gemm_min) rowwise = first + counts[i];
    first += counts[i];
  }
  Batch batch{batch_tokens_.data(), int(total), slices_.data(), n_seqs};
  batch.n_rowwise = rowwise;
  batch.logit_rows = last_rows_.data(), batch.n_logits = n_seqs, batch.n_logits_rowwise = n_seqs;
  batch.logits = logits;
  gally::forward(*m_, ops, batch, ws_, Record{});
  for (int i = 0; i < n_seqs; ++i) seqs[i]->pos_ += counts[i];
}

}  // namespace gally
