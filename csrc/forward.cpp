// The forward pass, in the order of "How LLMs Work": embed the tokens; in every layer, attention
// (RMSNorm → q/k/v → RoPE → causal attention over the cache → o_proj, added to the residual)
// then the feed-forward network (RMSNorm → SwiGLU, added to the residual); finally RMSNorm and
// the projection onto the vocabulary.
//
// One OpenMP parallel region spans the whole pass; each step splits its rows or heads over the
// threads and ends at a barrier. Kernels come from the table chosen at run time (isa.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "isa.h"
#include "session.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace gally {
namespace {

int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int thread_count() {
#if defined(_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// One matrix product of a fused group: y [n, ldy] = x [n, cols] · Wᵀ (+ b) (+ y).
struct Product {
  const Matrix& W;
  const float* bias;
  float* y;
  bool accumulate;
};

// Runs several products that read the same input as one parallel step: the threads split the
// concatenated output rows (q|k|v, gate|up) in blocks of 48, so no fork/join per matrix.
template <size_t N>
void matmul_group(const Kernels& k, const float* x, int n, const Product (&ps)[N]) {
  int total = 0;
  for (const Product& p : ps) total += p.W.rows;
  const int blocks = (total + 47) / 48, nt = thread_count(), id = thread_id();
  const int r0 = std::min(total, (int)((long)blocks * id / nt) * 48);
  const int r1 = std::min(total, (int)((long)blocks * (id + 1) / nt) * 48);
  int base = 0;
  for (const Product& p : ps) {
    const int a = std::max(r0 - base, 0), b = std::min(r1 - base, p.W.rows);
    if (a < b) k.matmul(x, p.W.data, p.W.dtype, p.bias, p.y, n, p.W.cols, p.W.rows, a, b, p.accumulate);
    base += p.W.rows;
  }
#pragma omp barrier
}

void embed_row(const Matrix& E, int id, float* out) {
  const size_t off = size_t(id) * E.cols;
  switch (E.dtype) {
    case DType::F32: std::memcpy(out, (const float*)E.data + off, size_t(E.cols) * 4); break;
    case DType::BF16:
      for (int i = 0; i < E.cols; ++i) out[i] = bf16_to_f32(((const uint16_t*)E.data)[off + i]);
      break;
    case DType::F16:
      for (int i = 0; i < E.cols; ++i) out[i] = f16_to_f32(((const uint16_t*)E.data)[off + i]);
      break;
  }
}

}  // namespace

Session::Session(std::shared_ptr<const Model> model, int max_context)
    : m_(std::move(model)), max_ctx_(max_context) {
  const ModelConfig& c = m_->config;
  if (max_context <= 0) throw std::invalid_argument("max_context must be positive, got " + std::to_string(max_context));
  nkv_ = c.num_key_value_heads;
  hd_ = c.head_dim;
  max_batch_ = std::min(max_context, 512);
  const size_t B = max_batch_, QD = size_t(c.num_attention_heads) * hd_, KVD = size_t(nkv_) * hd_;
  kv_.assign(size_t(c.num_hidden_layers) * 2 * KVD * max_ctx_, 0.0f);
  x_.resize(B * c.hidden_size);
  xb_.resize(B * c.hidden_size);
  q_.resize(B * QD);
  k_.resize(B * KVD);
  v_.resize(B * KVD);
  att_.resize(B * QD);
  gate_.resize(B * c.intermediate_size);
  up_.resize(B * c.intermediate_size);
  probs_.resize(size_t(m_->threads) * max_ctx_);
  // θ = position · inv_freq in f32, as the reference computes it.
  const int half = hd_ / 2;
  cos_.resize(size_t(max_ctx_) * half);
  sin_.resize(size_t(max_ctx_) * half);
  for (int p = 0; p < max_ctx_; ++p)
    for (int i = 0; i < half; ++i) {
      const float theta = float(p) * c.inv_freq[i];
      cos_[size_t(p) * half + i] = std::cos(theta);
      sin_[size_t(p) * half + i] = std::sin(theta);
    }
}

void Session::truncate(int position) {
  if (position < 0 || position > pos_)
    throw std::invalid_argument("truncate: position must be in [0, " + std::to_string(pos_) + "], got " +
                                std::to_string(position));
  pos_ = position;
}

void Session::forward(const int32_t* tokens, int n, float* logits, bool all_logits, const Record& rec) {
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
  const int rec_ctx = pos_ + n;
  for (int done = 0; done < n; done += max_batch_) {
    const int chunk = std::min(max_batch_, n - done);
    const bool last = done + chunk == n;
    float* out = all_logits ? logits + size_t(done) * c.vocab_size : (last ? logits : nullptr);
    forward_chunk(tokens + done, chunk, out, all_logits, rec, done, n, rec_ctx);
  }
}

void Session::forward_chunk(const int32_t* tokens, int n, float* logits, bool all_logits, const Record& rec,
                            int rec_offset, int rec_n, int rec_ctx) {
  const ModelConfig& c = m_->config;
  const Kernels& k = kernels();
  const int D = c.hidden_size, F = c.intermediate_size, NH = c.num_attention_heads, HD = hd_,
            QD = NH * HD, KVD = nkv_ * HD, group = NH / nkv_, half = HD / 2, p0 = pos_;
  float *x = x_.data(), *xb = xb_.data(), *q = q_.data(), *kb = k_.data(), *vb = v_.data(),
        *att = att_.data(), *gate = gate_.data(), *up = up_.data();
  auto record_hidden = [&](int slot) {  // slot 0: embeddings; l + 1: output of layer l
    if (!rec.hidden) return;
#pragma omp for
    for (int t = 0; t < n; ++t)
      std::memcpy(rec.hidden + (size_t(slot) * rec_n + rec_offset + t) * D, x + size_t(t) * D, size_t(D) * 4);
  };

#pragma omp parallel num_threads(m_->threads)
  {
#pragma omp for
    for (int t = 0; t < n; ++t) embed_row(m_->embed_tokens, tokens[t], x + size_t(t) * D);
    record_hidden(0);

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights& L = m_->layers[l];
      // Attention: each token asks its questions (q) of every earlier token's keys (k) and
      // takes their values (v) in proportion.
#pragma omp for
      for (int t = 0; t < n; ++t) k.rmsnorm(xb + size_t(t) * D, x + size_t(t) * D, L.input_layernorm, D, c.rms_norm_eps);
      matmul_group(k, xb, n, {Product{L.q_proj, L.q_bias, q, false}, Product{L.k_proj, L.k_bias, kb, false},
                              Product{L.v_proj, L.v_bias, vb, false}});
      // Position enters here: RoPE turns q and k by angles that grow with the position.
#pragma omp for
      for (int t = 0; t < n; ++t) {
        const float* cs = cos_.data() + size_t(p0 + t) * half;
        const float* sn = sin_.data() + size_t(p0 + t) * half;
        for (int h = 0; h < NH; ++h) k.rope(q + size_t(t) * QD + h * HD, cs, sn, HD);
        for (int h = 0; h < nkv_; ++h) {
          float* kt = kb + size_t(t) * KVD + h * HD;
          k.rope(kt, cs, sn, HD);
          std::memcpy(k_cache(l, h) + size_t(p0 + t) * HD, kt, size_t(HD) * 4);
          std::memcpy(v_cache(l, h) + size_t(p0 + t) * HD, vb + size_t(t) * KVD + h * HD, size_t(HD) * 4);
        }
      }
      float* probs = probs_.data() + size_t(thread_id()) * max_ctx_;
#pragma omp for schedule(dynamic, 4)
      for (int i = 0; i < n * NH; ++i) {
        const int t = i / NH, h = i % NH, ctx = p0 + t + 1;  // causal: keys 0 … p0+t
        k.attention(q + size_t(t) * QD + h * HD, k_cache(l, h / group), v_cache(l, h / group), ctx, HD, HD,
                    c.attention_scale, probs, att + size_t(t) * QD + h * HD);
        if (rec.attention) {
          float* dst = rec.attention + ((size_t(l) * NH + h) * rec_n + rec_offset + t) * rec_ctx;
          std::memcpy(dst, probs, size_t(ctx) * 4);
        }
      }
      matmul_group(k, att, n, {Product{L.o_proj, L.o_bias, x, true}});  // x += o_proj(att)

      // Feed-forward: x += down(silu(gate(x̂)) ⊙ up(x̂)).
#pragma omp for
      for (int t = 0; t < n; ++t)
        k.rmsnorm(xb + size_t(t) * D, x + size_t(t) * D, L.post_attention_layernorm, D, c.rms_norm_eps);
      matmul_group(k, xb, n, {Product{L.gate_proj, L.gate_bias, gate, false}, Product{L.up_proj, L.up_bias, up, false}});
#pragma omp for
      for (int t = 0; t < n; ++t) k.silu_mul(gate + size_t(t) * F, up + size_t(t) * F, F);
      matmul_group(k, gate, n, {Product{L.down_proj, L.down_bias, x, true}});
      record_hidden(l + 1);
    }

    // Prediction: the final norm, then one score per vocabulary entry.
    if (logits) {
      const int first = all_logits ? 0 : n - 1, count = n - first;
#pragma omp for
      for (int t = first; t < n; ++t) k.rmsnorm(xb + size_t(t) * D, x + size_t(t) * D, m_->norm, D, c.rms_norm_eps);
      matmul_group(k, xb + size_t(first) * D, count, {Product{m_->lm_head, nullptr, logits, false}});
    }
  }
  pos_ += n;
}

}  // namespace gally
