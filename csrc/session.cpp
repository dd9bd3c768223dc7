#include "session.h"

#include <numeric>
#include <stdexcept>
#include <string>

namespace gally {

Session::Session(std::shared_ptr<const Model> model, int max_context)
    : m_(std::move(model)),
      max_ctx_(max_context > 0
                   ? max_context
                   : throw std::invalid_argument("max_context must be positive, got " + std::to_string(max_context))),
      cache_(m_->config.num_hidden_layers, m_->config.num_key_value_heads, m_->config.head_dim, max_context),
      ws_(*m_, std::min(max_context, MAX_BATCH_TOKENS)), rows_(ws_.max_tokens) {
  std::iota(rows_.begin(), rows_.end(), 0);
}

void Session::truncate(int position) {
  if (position < 0 || position > pos_)
    throw std::invalid_argument("truncate: position must be in [0, " + std::to_string(pos_) + "], got " +
                                std::to_string(position));
  pos_ = position;
}

void Session::forward(const int32_t* tokens, int n, float* logits, bool all_logits, const Record& record) {
  const ModelConfig& c = m_->config;
  if (n <= 0) throw std::invalid_argument("token_ids is empty");
  for (int i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  if (pos_ + n > max_ctx_)
    throw std::length_error("sequence of " + std::to_string(pos_ + n) + " tokens (" + std::to_string(pos_) +
                            " in the cache + " + std::to_string(n) + " new) exceeds max_context " +
                            std::to_string(max_ctx_));
  if (c.sliding_window > 0 && pos_ + n > c.sliding_window)
    throw std::length_error("sequence of " + std::to_string(pos_ + n) + " tokens exceeds the model's sliding_window " +
                            std::to_string(c.sliding_window) + ", which gally does not implement");
  Record rec = record;
  rec.n = n, rec.context = pos_ + n;
  for (int done = 0; done < n; done += ws_.max_tokens) {
    const int chunk = std::min(ws_.max_tokens, n - done);
    const bool last = done + chunk == n;
    const SequenceSlice slice{&cache_, pos_, 0, chunk};
    Batch batch{tokens + done, chunk, &slice, 1};
    if (all_logits) {
      batch.logit_rows = rows_.data(), batch.n_logits = chunk, batch.logits = logits + size_t(done) * c.vocab_size;
    } else if (last) {
      batch.logit_rows = rows_.data() + chunk - 1, batch.n_logits = 1, batch.logits = logits;
    }
    rec.offset = done;
    gally::forward(*m_, batch, ws_, rec);
    pos_ += chunk;
  }
}

}  // namespace gally
