// A session: one sequence's KV cache and the scratch of its forward passes. forward() runs new
// tokens through the model and appends their keys and values to the cache.
#pragma once
#include <memory>
#include <vector>

#include "forward.h"
#include "kv_cache.h"
#include "model.h"

namespace gally {

class Session {
 public:
  Session(std::shared_ptr<const Model> model, int max_context);

  // Runs tokens [n] at positions position() … position()+n-1 and appends their keys and values.
  // logits: [vocab] for the last token, or [n, vocab] when all_logits. Throws (leaving the session
  // unchanged) on an out-of-vocabulary id or a sequence past max_context.
  void forward(const int32_t* tokens, int n, float* logits, bool all_logits, const Record& record);

  int position() const { return pos_; }
  int max_context() const { return max_ctx_; }
  void truncate(int position);  // forget the cache beyond `position`
  const Model& model() const { return *m_; }

 private:
  std::shared_ptr<const Model> m_;
  int max_ctx_, pos_ = 0;
  KvCache cache_;
  Workspace ws_;
  std::vector<int> rows_;  // 0, 1, 2, …: the batch rows whose logits a pass returns
};

}  // namespace gally
