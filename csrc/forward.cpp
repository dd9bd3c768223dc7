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
#include "kernels/common.h"
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

// This thread's share [r0, r1) of n rows, split in blocks of `block` rows.
void thread_rows(int n, int block, int* r0, int* r1) {
  const int blocks = (n + block - 1) / block, nt = thread_count(), id = thread_id();
  *r0 = std::min(n, int(long(blocks) * id / nt) * block);
  *r1 = std::min(n, int(long(blocks) * (id + 1) / nt) * block);
}

// A matmul's input [n, cols]: f32, and for a few tokens (< GEMM_MIN_TOKENS) into a model with
// quantized weights also int16-quantized (kernels.h), for the integer GEMV kernels.
struct Input {
  const float* x;
  const int16_t* q = nullptr;
  const float* scale = nullptr;
  const float* sum = nullptr;
  const uint32_t* packed = nullptr;  // x in Kernels::pack's layout
};

// Products of one input [n, n_in], each with the kernel for its weights' format: the integer GEMV
// for int16-quantized input, else matmul_many (one layout of the input for all).
void matmul_outs(const Kernels& k, const Input& in, int n, int n_in, const MatmulOut* outs, int count) {
  if (in.packed) return k.matmul_many_packed(in.packed, in.x, n, n_in, outs, count);
  if (!in.q) return k.matmul_many(in.x, n, n_in, outs, count);
  for (int i = 0; i < count; ++i) {
    const MatmulOut& o = outs[i];
    if (o.W.dtype == DType::Q8)
      k.matmul_q8(in.q, in.scale, (const int8_t*)o.W.data, o.W.scales, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1,
                  o.accumulate);
    else if (o.W.dtype == DType::Q4)
      k.matmul_q4(in.q, in.scale, in.sum, (const uint8_t*)o.W.data, o.W.scales, o.W.mins, o.b, o.y, n, n_in, o.ldy,
                  o.r0, o.r1, o.accumulate);
    else
      k.matmul(in.x, o.W, o.b, o.y, n, n_in, o.ldy, o.r0, o.r1, o.accumulate);
  }
}

WeightsRef ref(const Matrix& W) { return WeightsRef{W.data, W.dtype, W.scales, W.mins}; }

// This thread's share of a batch's matmul, rows [r0, r1) × tokens [t0, t1): the threads form a
// grid of row parts × token parts, rows in blocks of 32 and tokens in GEMM_SPLIT_TOKENS, the grid
// whose busiest thread has the least work (on many threads, rows alone split unevenly: 18 blocks
// of 576 rows over 16 threads).
void thread_tiles(int rows, int n, int* r0, int* r1, int* t0, int* t1) {
  const int nt = thread_count(), id = thread_id();
  const int rb = (rows + 31) / 32, tb = (n + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS;
  int pt = 1;
  long best = -1;
  for (int p = 1; p <= nt; ++p)
    if (nt % p == 0) {
      const long cost = long((rb + nt / p - 1) / (nt / p)) * ((tb + p - 1) / p);
      if (best < 0 || cost < best) best = cost, pt = p;
    }
  const int pr = nt / pt, ir = id / pt, it = id % pt;
  *r0 = std::min(rows, int(long(rb) * ir / pr) * 32);
  *r1 = std::min(rows, int(long(rb) * (ir + 1) / pr) * 32);
  // Token part boundaries; one that would leave a last part of fewer than GEMM_MIN_TOKENS moves to
  // n, so that no part takes the few-token kernels, which sum in another order than the GEMM.
  auto boundary = [&](int i) {
    const int b = std::min(n, int(long(tb) * i / pt) * GEMM_SPLIT_TOKENS);
    return n - b < GEMM_MIN_TOKENS ? n : b;
  };
  *t0 = it == 0 ? 0 : boundary(it);
  *t1 = boundary(it + 1);
}

// Tokens [t0, …) of a batch's input (t0 a multiple of GEMM_SPLIT_TOKENS when packed).
Input tokens_from(const Kernels& k, const Input& in, int t0, int n_in) {
  Input a = in;
  a.x += size_t(t0) * n_in;
  if (in.packed) a.packed += k.packed_size(t0, n_in);
  if (in.q) {  // int16 copies: a few tokens only, so t0 is 0 today; kept right regardless
    a.q += size_t(t0) * n_in;
    a.scale += size_t(t0) * (n_in / QGROUP);
    a.sum += size_t(t0) * (n_in / QGROUP);
  }
  return a;
}

// y [n, W.rows] (+)= in [n, W.cols] · Wᵀ (+ b), split over the threads; ends at a barrier.
void matmul_parallel(const Kernels& k, const Matrix& W, const Input& in, int n, const float* bias, float* y,
                     bool accumulate) {
  int r0, r1, t0 = 0, t1 = n;
  if (n < GEMM_MIN_TOKENS)
    thread_rows(W.rows, 48, &r0, &r1);
  else
    thread_tiles(W.rows, n, &r0, &r1, &t0, &t1);
  const MatmulOut out{ref(W), bias, y + size_t(t0) * W.rows, W.rows, r0, r1, accumulate};
  if (r0 < r1 && t0 < t1) matmul_outs(k, tokens_from(k, in, t0, W.cols), t1 - t0, W.cols, &out, 1);
#pragma omp barrier
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
  kv_.reset(size_t(c.num_hidden_layers) * 2 * KVD * max_ctx_);
  x_.reset(B * c.hidden_size);
  xb_.reset(B * c.hidden_size);
  q_.reset(B * QD);
  k_.reset(B * KVD);
  v_.reset(B * KVD);
  att_.reset(B * QD);
  gate_.reset(B * c.intermediate_size);
  up_.reset(B * c.intermediate_size);
  scratch_ = attention_scratch_floats(max_ctx_, hd_);  // also ≥ max_ctx_, the per-query kernel's probs
  // bf16 and quantized weights: on AVX512-BF16 their prompts' matmuls round the activations to bf16
  bf16_prompt_ = !m_->layers.empty() &&
                 (m_->layers[0].q_proj.dtype == DType::BF16 || is_quantized(m_->layers[0].q_proj.dtype));
  probs_.reset(size_t(m_->threads) * scratch_);
  xb_local_.reset(size_t(m_->threads) * c.hidden_size);
  if (m_->quantized) {  // int16 copies of a matmul's input: the widest is the FFN's
    qdim_ = std::max({c.hidden_size, int(QD), c.intermediate_size});
    const size_t few = GEMM_MIN_TOKENS - 1;  // batches of more take the GEMM with f32 activations
    xq_.reset(few * qdim_);
    xs_.reset(few * qdim_ / QGROUP);
    xsum_.reset(few * qdim_ / QGROUP);
    xq_local_.reset(size_t(m_->threads) * qdim_);
    xs_local_.reset(size_t(m_->threads) * 2 * (qdim_ / QGROUP));
  }
  cos_.reset(size_t(max_ctx_) * hd_ / 2);
  sin_.reset(size_t(max_ctx_) * hd_ / 2);
}

// The RoPE rotations of positions [0, end), computed as positions are first reached:
// θ = position · inv_freq in f32, as the reference computes it.
void Session::extend_rope(int end) {
  const int half = hd_ / 2;
  for (int p = rope_end_; p < end; ++p)
    for (int i = 0; i < half; ++i) {
      const float theta = float(p) * m_->config.inv_freq[i];
      cos_.data()[size_t(p) * half + i] = std::cos(theta);
      sin_.data()[size_t(p) * half + i] = std::sin(theta);
    }
  rope_end_ = std::max(rope_end_, end);
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
  extend_rope(pos_ + n);
  const Kernels& k = kernels();  // one set for the whole call, whatever another thread selects meanwhile
  if (bf16_attention(k) && n >= ATTENTION_BLOCK_MIN) {
    const long need = attention_bf16_scratch_floats(pos_ + n, hd_);
    if (need > bf16_scratch_) {  // grown with the context, in steps, so a long chat reallocates seldom
      bf16_scratch_ = std::max(need, attention_bf16_scratch_floats(std::min(max_ctx_, 2 * (pos_ + n)), hd_));
      bf16_att_.reset(size_t(m_->threads) * bf16_scratch_);
    }
  }
  if (k.pack && (bf16_prompt_ || m_->quantized) && n >= GEMM_MIN_TOKENS) {
    const ModelConfig& c = m_->config;
    const long need = k.packed_size(max_batch_, std::max({c.hidden_size, c.num_attention_heads * hd_, c.intermediate_size}));
    if (size_t(need) > packed_.size()) packed_.reset(size_t(need));
  }
  const int rec_ctx = pos_ + n;
  for (int done = 0; done < n; done += max_batch_) {
    const int chunk = std::min(max_batch_, n - done);
    const bool last = done + chunk == n;
    float* out = all_logits ? logits + size_t(done) * c.vocab_size : (last ? logits : nullptr);
    forward_chunk(k, tokens + done, chunk, out, all_logits, rec, done, n, rec_ctx);
  }
}

void Session::forward_chunk(const Kernels& k, const int32_t* tokens, int n, float* logits, bool all_logits,
                            const Record& rec, int rec_offset, int rec_n, int rec_ctx) {
  const ModelConfig& c = m_->config;
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

  // RMSNorm of the residual stream. A single token is normalised by every thread into its own
  // buffer, which saves a barrier; a batch is split over the threads.
  auto normalize = [&](const float* w) -> const float* {
    if (n == 1) {
      float* own = xb_local_.data() + size_t(thread_id()) * D;
      k.rmsnorm(own, x, w, D, c.rms_norm_eps);
      return own;
    }
#pragma omp for
    for (int t = 0; t < n; ++t) k.rmsnorm(xb + size_t(t) * D, x + size_t(t) * D, w, D, c.rms_norm_eps);
    return xb;
  };

  // Quantized weights multiply int16 activations in steps of a few tokens: an input is quantized
  // once per step, by every thread into its own buffer for a single token, split over the
  // threads otherwise. Larger batches take the GEMM, which multiplies f32 activations.
  auto prepare = [&](const float* in, int rows, int n_in) -> Input {
    Input a{in};
    if (rows >= GEMM_MIN_TOKENS && packed_.size() > 0 && k.pack) {  // laid out once, by all threads
      const int tiles = (rows + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS;
#pragma omp for
      for (int t = 0; t < tiles; ++t) k.pack(in, rows, n_in, t, t + 1, packed_.data());
      a.packed = packed_.data();
      return a;
    }
    if (!m_->quantized || n_in % QGROUP != 0 || rows >= GEMM_MIN_TOKENS) return a;
    const int groups = n_in / QGROUP;
    if (rows == 1) {
      const size_t id = thread_id();
      int16_t* q = xq_local_.data() + id * qdim_;
      float* s = xs_local_.data() + 2 * id * (qdim_ / QGROUP);
      k.quantize_rows(in, 1, n_in, q, s, s + qdim_ / QGROUP);
      return Input{in, q, s, s + qdim_ / QGROUP};
    }
#pragma omp for
    for (int t = 0; t < rows; ++t)
      k.quantize_rows(in + size_t(t) * n_in, 1, n_in, xq_.data() + size_t(t) * n_in, xs_.data() + size_t(t) * groups,
                      xsum_.data() + size_t(t) * groups);
    return Input{in, xq_.data(), xs_.data(), xsum_.data()};
  };

#pragma omp parallel num_threads(m_->threads)
  {
#pragma omp for
    for (int t = 0; t < n; ++t) dequantize_row(ref(m_->embed_tokens), D, tokens[t], x + size_t(t) * D);
    record_hidden(0);

    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights& L = m_->layers[l];
      // Attention: each token asks its questions (q) of every earlier token's keys (k) and
      // takes their values (v) in proportion.
      const Input h = prepare(normalize(L.input_layernorm), n, D);
      {  // A thread takes a run of heads of q|k|v (one matmul_many over its matrices), turns its q and k heads
         // by RoPE (the position enters here) and files its k and v heads in the cache, with no
         // barrier in between.
        int h0, h1;
        thread_rows(NH + 2 * nkv_, 1, &h0, &h1);
        const int first[3] = {0, NH, NH + nkv_}, count[3] = {NH, nkv_, nkv_};
        const Matrix* W[3] = {&L.q_proj, &L.k_proj, &L.v_proj};
        const float* bias[3] = {L.q_bias, L.k_bias, L.v_bias};
        float* out[3] = {q, kb, vb};
        int a[3], b[3], ld[3];  // this thread's heads [a, b) of q, k and v
        MatmulOut outs[3];
        int count_outs = 0;
        for (int m = 0; m < 3; ++m) {
          a[m] = std::max(h0 - first[m], 0), b[m] = std::min(h1 - first[m], count[m]), ld[m] = m == 0 ? QD : KVD;
          if (a[m] < b[m]) outs[count_outs++] = {ref(*W[m]), bias[m], out[m], ld[m], a[m] * HD, b[m] * HD, false};
        }
        matmul_outs(k, h, n, D, outs, count_outs);
        for (int m = 0; m < 3; ++m) {
          for (int j = a[m]; j < b[m]; ++j)
            for (int t = 0; t < n; ++t) {
              float* yt = out[m] + size_t(t) * ld[m] + j * HD;
              if (m < 2) k.rope(yt, cos_.data() + size_t(p0 + t) * half, sin_.data() + size_t(p0 + t) * half, HD);
              if (m > 0) std::memcpy((m == 1 ? k_cache(l, j) : v_cache(l, j)) + size_t(p0 + t) * HD, yt, size_t(HD) * 4);
            }
        }
#pragma omp barrier
      }
      float* probs = probs_.data() + size_t(thread_id()) * scratch_;
      if (n >= ATTENTION_BLOCK_MIN) {  // blocks of positions, queries in the lanes
        // bf16 models on CPUs with vdpbf16ps: larger blocks, whose keys and values are rounded once
        const bool bf16 = bf16_attention(k);
        const int B = bf16 ? ATTENTION_BLOCK_BF16 : ATTENTION_BLOCK, blocks = (n + B - 1) / B;
        float* scratch = bf16 ? bf16_att_.data() + size_t(thread_id()) * bf16_scratch_ : probs;
        const auto attend = bf16 ? k.attention_causal_bf16 : k.attention_causal;
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < blocks * NH; ++i) {
          const int t0 = (blocks - 1 - i / NH) * B, head = i % NH;  // longest first
          const int nq = std::min(B, n - t0);
          float* rec_probs =
              rec.attention ? rec.attention + ((size_t(l) * NH + head) * rec_n + rec_offset + t0) * rec_ctx : nullptr;
          attend(q + size_t(t0) * QD + head * HD, QD, nq, p0 + t0 + 1, k_cache(l, head / group), v_cache(l, head / group),
                 HD, HD, c.attention_scale, scratch, att + size_t(t0) * QD + head * HD, QD, rec_probs, rec_ctx);
        }
      } else {  // a few positions, one query at a time
#pragma omp for schedule(dynamic, 2)
        for (int i = 0; i < n * NH; ++i) {
          const int t = i / NH, head = i % NH, ctx = p0 + t + 1;  // causal: keys 0 … p0+t
          k.attention(q + size_t(t) * QD + head * HD, k_cache(l, head / group), v_cache(l, head / group), ctx, HD,
                      HD, c.attention_scale, probs, att + size_t(t) * QD + head * HD);
          if (rec.attention) {
            float* dst = rec.attention + ((size_t(l) * NH + head) * rec_n + rec_offset + t) * rec_ctx;
            std::memcpy(dst, probs, size_t(ctx) * 4);
          }
        }
      }
      matmul_parallel(k, L.o_proj, prepare(att, n, QD), n, L.o_bias, x, true);  // x += o_proj(att)

      // Feed-forward: x += down(silu(gate(x̂)) ⊙ up(x̂)); a thread owns the same rows of gate and
      // up, so it applies the SwiGLU to them at once.
      const Input h2 = prepare(normalize(L.post_attention_layernorm), n, D);
      {
        int r0, r1, t0 = 0, t1 = n;
        if (n < GEMM_MIN_TOKENS)
          thread_rows(F, 16, &r0, &r1);
        else
          thread_tiles(F, n, &r0, &r1, &t0, &t1);
        if (r0 < r1 && t0 < t1) {
          float *g = gate + size_t(t0) * F, *u = up + size_t(t0) * F;
          const MatmulOut outs[2] = {{ref(L.gate_proj), L.gate_bias, g, F, r0, r1, false},
                                     {ref(L.up_proj), L.up_bias, u, F, r0, r1, false}};
          matmul_outs(k, tokens_from(k, h2, t0, D), t1 - t0, D, outs, 2);
          for (int t = 0; t < t1 - t0; ++t) k.silu_mul(g + size_t(t) * F + r0, u + size_t(t) * F + r0, r1 - r0);
        }
#pragma omp barrier
      }
      matmul_parallel(k, L.down_proj, prepare(gate, n, F), n, L.down_bias, x, true);
      record_hidden(l + 1);
    }

    // Prediction: the final norm, then one score per vocabulary entry.
    if (logits) {
      const int first = all_logits ? 0 : n - 1, count = n - first;
#pragma omp for
      for (int t = first; t < n; ++t) k.rmsnorm(xb + size_t(t) * D, x + size_t(t) * D, m_->norm, D, c.rms_norm_eps);
      matmul_parallel(k, m_->lm_head, prepare(xb + size_t(first) * D, count, D), count, nullptr, logits, false);
    }
  }
  pos_ += n;
}

}  // namespace gally
