// The forward pass over a batch of tokens from one or more sequences, and the scratch it runs in.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "isa.h"
#include "kv_cache.h"
#include "model.h"
#include "parallel_matmul.h"

namespace gally {

// Longest run of tokens one pass takes; longer inputs go in several passes.
constexpr int MAX_BATCH_TOKENS = 512;

// One sequence's part of a batch: tokens [first, first + count) of the batch, which take positions
// position … position + count − 1 of `cache` (positions before them are already there).
struct SequenceSlice {
  KvCache* cache;
  int position;
  int first, count;
};

// Slices of fewer tokens than this take the row-wise matmuls with kernel set `ops` (kernels.h
// GEMM_MIN_TOKENS, FLOAT_GEMM_MIN_TOKENS).
inline int gemm_min_tokens(const Model& m, const Kernels& ops) {
  return m.quantized() ? GEMM_MIN_TOKENS : ops.float_gemm_min_tokens;
}

// Tokens of a prompt's next pass: `left` to feed, at most `room` in this pass. A pass that would leave
// a last one shorter than min_chunk (row-wise, where a longer one takes the GEMM) stops min_chunk short
// of the end where it can. Runner::forward's passes and the scheduler's chunks (scheduler.py) both cut
// here, so that a prompt goes through the same kernels whichever feeds it.
inline int chunk_tokens(int left, int room, int min_chunk) {
  const int take = left < room ? left : room;
  if (take < left && left - take < min_chunk && left - min_chunk >= min_chunk) return left - min_chunk;
  return take;
}

struct Batch {
  const int32_t* tokens = nullptr;  // [n] ids, checked against the vocabulary
  int n = 0;
  const SequenceSlice* seqs = nullptr;  // [n_seqs], covering tokens 0 … n−1 in order
  int n_seqs = 0;
  int n_rowwise = 0;                // tokens [0, n_rowwise) form slices of < gemm_min_tokens: row-wise matmuls
  const int* logit_rows = nullptr;  // [n_logits] tokens whose next-token logits are wanted
  int n_logits = 0;
  int n_logits_rowwise = 0;  // the first of them take the row-wise lm_head
  float* logits = nullptr;   // [n_logits, vocab]
};

// Caller-provided buffers that a pass over a single sequence fills for inspection (null: not
// recorded). A sequence longer than one pass is recorded `offset` tokens into arrays of `n` tokens
// and `context` positions.
struct Record {
  float* hidden = nullptr;     // [layers + 1, n, hidden]: the embeddings, then each layer's output
  float* attention = nullptr;  // [layers, heads, n, context]: softmax weights, 0 where masked
  float* mlp = nullptr;        // [layers, n, intermediate]: silu(gate) ⊙ up, the feed-forward's expansion
  // [layers, 2 · hidden + heads · head_dim + intermediate]: Σ x² over the tokens, added to, for each
  // column of the four matmul inputs of a layer in turn: RMSNorm(x) into q/k/v, the attention's
  // output into o_proj, RMSNorm(x) into gate/up, silu(gate) ⊙ up into down_proj (the activation
  // statistics `gally quantize` weights int4's errors by).
  double* squares = nullptr;
  int offset = 0, n = 0, context = 0;
  bool any() const { return hidden || attention || mlp || squares; }
  // The width of a layer's row of `squares`.
  static size_t squares_width(const ModelConfig& c) {
    return 2 * size_t(c.hidden_size) + size_t(c.num_attention_heads) * c.head_dim + size_t(c.intermediate_size);
  }
};

// n elements left uninitialised: a large buffer's pages are mapped only when first written.
template <class T>
class Buffer {
 public:
  void reset(size_t n) {
    p_.reset(new T[n]);
    n_ = n;
  }
  void grow(size_t n) {
    if (n > n_) reset(n);
  }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  size_t size() const { return n_; }

 private:
  std::unique_ptr<T[]> p_;
  size_t n_ = 0;
};

// Positions per work item of a batch's attention: a block of a sequence's consecutive queries for
// one head goes to attention_causal, queries in the lanes; fewer than ATTENTION_BLOCK_MIN go one
// query at a time (mostly empty lanes otherwise).
constexpr int ATTENTION_BLOCK = 16;
// attention_causal_bf16 rounds its keys and values to bf16 once per item, attention_causal widens a
// compact cache's to f32 once per item: larger items for both (SmolLM2, f16 cache, 2 threads:
// GALLY_ISA=avx2 bf16 pp2048 +7-12%, avx512vnni int8 pp4096 +31%, pp256 within 3%)
constexpr int ATTENTION_BLOCK_CONVERTED = 64;
// A slice of 4 or more queries fills attention_causal's lanes better than one query at a time does,
// whether its matmuls go row-wise (a float model's slices below gemm_min_tokens) or not.
constexpr int ATTENTION_BLOCK_MIN = 4;
// Keys per unit of a decode step's attention: a context of 8192 splits into 16 units (Workspace).
// The split depends on the context alone, so a token's result does not depend on the threads.
constexpr int KEYS_PER_PART = 512;

// The scratch of forward passes: a batch's activations and the kernels' per-thread buffers,
// allocated once and grown with the batches and contexts seen, so a decode step allocates nothing.
struct Workspace {
  Workspace(const Model& model, int max_tokens);

  // Before a pass, outside its parallel region: grows the buffers it needs and plans its attention.
  void prepare(const Kernels& ops, const Batch& batch, const Record& record);

  // The matmul input for in [n, n_in] whose first n_rowwise tokens go row-wise (MatmulInput),
  // made by every thread of the region. make_row, where given, first writes row t of in, in the
  // same split over the threads as the quantization, which then needs no barrier of its own.
  MatmulInput matmul_input(const Kernels& ops, const float* in, int n, int n_rowwise, int n_in,
                           const std::function<void(int)>& make_row = nullptr);

  const Model& model;
  int max_tokens;
  bool bf16_prompt;                 // bf16 or quantized weights, whose prompts may take the bf16 kernels
  bool use_bf16_attention = false;  // this pass

  // Activations of the batch's tokens, [n, …]:
  Buffer<float> x;                   // [n, hidden] the residual stream
  Buffer<float> xb;                  // [n, hidden] a normalised copy of it, a block's input
  Buffer<float> q;                   // [n, heads · head_dim]
  Buffer<float> k, v;                // [n, kv_heads · head_dim]
  Buffer<float> att;                 // [n, heads · head_dim] attention output
  Buffer<float> gate, up;            // [n, intermediate]
  Buffer<float> rope_cos, rope_sin;  // [n, head_dim/2] each token's RoPE rotation
  Buffer<int> token_seq;             // [n] the slice each token belongs to
  // Per thread:
  Buffer<float> x_norm;             // [threads, hidden] a single token's normalised input
  long attention_floats = 0;        // attention scratch per thread (kernels.h)
  Buffer<float> attention_scratch;  // [threads, attention_floats]
  // Quantized weights take the row-wise tokens' activations in int16 with group scales and sums
  // (kernels.h): [max_tokens, qdim], or [threads, qdim] for a lone token.
  int qdim = 0;
  Buffer<int16_t> xq, xq_thread;
  Buffer<float> xq_scale, xq_sum, xq_scale_thread;
  Buffer<uint32_t> packed;  // a batch's matmul input in Kernels::pack's layout, shared by the threads

  // The pass's attention. A slice of at least ATTENTION_BLOCK_MIN tokens (a prompt chunk) goes in
  // blocks of its consecutive queries, each done for every head by attention_causal, longest first.
  // Each token of a shorter slice (a decode step) goes in units of a part of its keys
  // (KEYS_PER_PART, so that a long context splits over the threads) for a run of its KV heads:
  // all of them, a block at a time (their rows of a block lie together), unless the parts are too
  // few to give each thread a unit. Each KV head's partial softmax (attention_part) is merged per
  // token and group afterwards.
  struct AttentionItem {
    int seq, first, count;  // slice, the block's first token in the batch, queries
  };
  struct DecodeUnit {
    // KV heads [kv_head, kv_head + kv_heads); slot: the first one's partial result in `partials`
    // (each next head's lies its DecodeMerge's `parts` slots further on)
    int seq, token, kv_head, kv_heads, k0, k1, slot;
  };
  struct DecodeMerge {
    int token, kv_head, first_slot, parts;
  };
  std::vector<AttentionItem> attention_items;
  std::vector<DecodeUnit> decode_units;
  std::vector<DecodeMerge> decode_merges;
  std::vector<int> token_merges;  // [n] a decode token's first merge (its KV heads' follow), or -1
  long part_floats = 0;
  Buffer<float> partials;  // [slots, part_floats]: o [group, head_dim], m [group], l [group]
};

// Runs the batch's tokens through the model: appends each token's keys and values to its
// sequence's cache and writes the logits of batch.logit_rows. Each slice's cache must hold its
// positions (KvCache capacity); record only for a batch of one sequence. ops: one kernel set for
// the whole pass, whatever another thread selects meanwhile (the one that chose the row-wise
// tokens, gemm_min_tokens).
void forward(const Model& model, const Kernels& ops, const Batch& batch, Workspace& ws, const Record& record);

// logits [n, vocab] = lm_head(RMSNorm(hidden)) for residual-stream vectors hidden [n, hidden_size]:
// the prediction step alone, as the forward pass makes it (the logit lens of `gally explain`).
void unembed(const Model& model, const float* hidden, int n, float* logits, Workspace& ws);

}  // namespace gally
