// A session: one sequence's KV cache and the scratch buffers of the forward pass, all allocated
// once at creation. forward() runs a batch of tokens through the model and appends to the cache.
#pragma once
#include <memory>
#include <vector>

#include "model.h"

namespace gally {

constexpr int ATTENTION_BLOCK = 16;     // positions per attention work item in a batch
constexpr int ATTENTION_BLOCK_BF16 = 64;  // attention_causal_bf16 rounds its keys and values once per item
constexpr int ATTENTION_BLOCK_MIN = 4;  // fewer positions go query by query (mostly empty lanes)

// Optional caller-provided buffers that a forward pass fills for inspection (null: not recorded).
struct Record {
  float* hidden = nullptr;     // [layers + 1, n, hidden]: the embeddings, then each layer's output
  float* attention = nullptr;  // [layers, heads, n, position + n]: softmax weights, 0 where masked
};

// n elements left uninitialised: a large buffer's pages are mapped only when first written, so
// a session costs the memory of the context it uses, not of max_context.
template <class T>
class Buffer {
 public:
  void reset(size_t n) {
    p_.reset(new T[n]);
    n_ = n;
  }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  size_t size() const { return n_; }

 private:
  std::unique_ptr<T[]> p_;
  size_t n_ = 0;
};

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
  void forward_chunk(const Kernels& k, const int32_t* tokens, int n, float* logits, bool all_logits, const Record& rec,
                     int rec_offset, int rec_n, int rec_ctx);
  void extend_rope(int end);  // fills cos_/sin_ up to position end
  float* k_cache(int layer, int kv_head) { return kv_.data() + ((size_t(layer) * 2 * nkv_ + kv_head) * max_ctx_) * hd_; }
  float* v_cache(int layer, int kv_head) { return k_cache(layer, kv_head) + size_t(nkv_) * max_ctx_ * hd_; }

  std::shared_ptr<const Model> m_;
  int max_ctx_, max_batch_, pos_ = 0;
  int nkv_, hd_;
  // The KV cache [layers][k|v][kv_heads][max_context][head_dim]: a head's keys are contiguous.
  Buffer<float> kv_;
  Buffer<float> cos_, sin_;  // [max_context, head_dim/2] RoPE rotations per position, [0, rope_end_) filled
  int rope_end_ = 0;
  // Activations for a chunk of up to max_batch tokens:
  Buffer<float> x_;      // [B, hidden]   the residual stream
  Buffer<float> xb_;     // [B, hidden]   normalised input of a block
  Buffer<float> q_;      // [B, heads·head_dim]
  Buffer<float> k_, v_;  // [B, kv_heads·head_dim]
  Buffer<float> att_;    // [B, heads·head_dim] attention output
  Buffer<float> gate_, up_;  // [B, intermediate]
  long scratch_ = 0;          // attention scratch per thread (kernels.h)
  Buffer<float> probs_;  // [threads, scratch_] softmax scratch
  bool bf16_prompt_ = false;  // bf16 or quantized weights, whose prompts may take the bf16 kernels
  bool bf16_attention(const Kernels& k) const { return bf16_prompt_ && hd_ % 32 == 0 && k.attention_causal_bf16; }
  long bf16_scratch_ = 0;      // its scratch per thread, grown to the context reached
  Buffer<float> bf16_att_;     // [threads, bf16_scratch_]
  Buffer<uint32_t> packed_;    // a batch's matmul input in Kernels::pack's layout, shared by the threads
  Buffer<float> xb_local_;  // [threads, hidden] a single token's normalised input, per thread
  // Quantized models: a matmul input in int16 with its group scales and sums (kernels.h), for a
  // batch [B, qdim] and, for a single token, per thread.
  int qdim_ = 0;
  Buffer<int16_t> xq_, xq_local_;
  Buffer<float> xs_, xsum_, xs_local_;
};

}  // namespace gally
