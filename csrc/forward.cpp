// The forward pass, in the order of "How LLMs Work":
//
//   x = embed(tokens)                                   each token's row of the embedding matrix
//   for each layer:
//     x += attention(RMSNorm(x))                        q, k, v; RoPE; softmax(q·kᵀ/√d)·v; o_proj
//     x += feed_forward(RMSNorm(x))                     down(silu(gate(x̂)) ⊙ up(x̂))
//   logits = lm_head(RMSNorm(x))                        one score per vocabulary entry
//
// The batch holds tokens of one or more sequences; only attention tells them apart (each token
// attends to its own sequence's cache). Every step runs inside one parallel region (parallel.h):
// each splits its rows, tokens or heads over the threads and ends at a barrier. The kernels come
// from the table chosen at run time (isa.cpp); parallel_matmul.h splits the matrix products.
#include "forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "isa.h"
#include "kernels/common.h"
#include "parallel.h"

namespace gally {
namespace {

// One pass: the model, the kernels, the batch and its scratch, and a function per step.
struct Pass {
  const Model& m;
  const ModelConfig& c;
  const Kernels& ops;
  const Batch& batch;
  Workspace& ws;
  const Record& rec;
  const int n, D, F, NH, NKV, HD, QD, KVD;
  // A matmul input's rows made by the threads that quantize them (Workspace::matmul_input's
  // make_row), one barrier for both; not for one token, nor where the squares are recorded, which
  // needs every row made first.
  const bool rows_fused;

  Pass(const Model& model, const Kernels& kernels, const Batch& b, Workspace& w, const Record& r)
      : m(model), c(model.config), ops(kernels), batch(b), ws(w), rec(r), n(b.n), D(c.hidden_size),
        F(c.intermediate_size), NH(c.num_attention_heads), NKV(c.num_key_value_heads), HD(c.head_dim), QD(NH * HD),
        KVD(NKV * HD), rows_fused(n > 1 && !r.squares) {}

  // Each token's row of the embedding matrix, and its RoPE rotation: θ_i = position · inv_freq_i
  // in f32, as the reference computes it.
  void embed() {
    par::for_static(n, [&](int t) {
      dequantize_row(weights_ref(m.embed_tokens), D, batch.tokens[t], ws.x.data() + size_t(t) * D);
      const SequenceSlice& s = batch.seqs[ws.token_seq.data()[t]];
      const float p = float(s.position + t - s.first);
      for (int i = 0; i < HD / 2; ++i) {
        const float theta = p * c.inv_freq[i];
        ws.rope_cos.data()[size_t(t) * HD / 2 + i] = std::cos(theta);
        ws.rope_sin.data()[size_t(t) * HD / 2 + i] = std::sin(theta);
      }
    });
  }

  // RMSNorm of the residual stream with weights w: a single token is normalised by every thread
  // into its own buffer, which saves a barrier; a batch is split over the threads.
  const float* normalized(const float* w) {
    if (n == 1) {
      float* own = ws.x_norm.data() + size_t(par::thread_id()) * D;
      ops.rmsnorm(own, ws.x.data(), w, D, c.rms_norm_eps);
      return own;
    }
    par::for_static(n, [&](int t) {
      ops.rmsnorm(ws.xb.data() + size_t(t) * D, ws.x.data() + size_t(t) * D, w, D, c.rms_norm_eps);
    });
    return ws.xb.data();
  }

  // RMSNorm(x) with weights w as a block's matmul input (its squares recorded at `at`).
  MatmulInput block_input(int l, int at, const float* w) {
    if (!rows_fused) {
      const float* xn = normalized(w);
      record_squares(l, at, xn, D);
      return ws.matmul_input(ops, xn, n, batch.n_rowwise, D);
    }
    return ws.matmul_input(ops, ws.xb.data(), n, batch.n_rowwise, D, [&](int t) {
      ops.rmsnorm(ws.xb.data() + size_t(t) * D, ws.x.data() + size_t(t) * D, w, D, c.rms_norm_eps);
    });
  }

  // x += attention(RMSNorm(x)): each token asks its questions (q) of every earlier token's keys (k)
  // in its sequence and takes their values (v) in proportion.
  void attention(int l) {
    const LayerWeights& L = m.layers[l];
    project_qkv(l, block_input(l, 0, L.input_layernorm));
    attend(l);
    MatmulInput h;
    if (!rows_fused) {
      par::for_static(int(ws.decode_merges.size()), [&](int i) { merge(ws.decode_merges[i]); });
      record_squares(l, D, ws.att.data(), QD);
      h = ws.matmul_input(ops, ws.att.data(), n, batch.n_rowwise, QD);
    } else {  // each decode token's heads merged by the thread that quantizes it
      h = ws.matmul_input(ops, ws.att.data(), n, batch.n_rowwise, QD, [&](int t) {
        if (ws.token_merges[t] >= 0)
          for (int i = 0; i < NKV; ++i) merge(ws.decode_merges[ws.token_merges[t] + i]);
      });
    }
    matmul_parallel(ops, L.o_proj, h, n, L.o_bias, ws.x.data(), true);
  }

  // q, k, v = x̂ · W_qᵀ, W_kᵀ, W_vᵀ; q and k turned by RoPE (the position enters here); k and v
  // filed in the cache. A thread takes a run of heads of q|k|v (one matmul_outs over its
  // matrices) and finishes them with no barrier in between.
  void project_qkv(int l, const MatmulInput& h) {
    const LayerWeights& L = m.layers[l];
    int h0, h1;
    par::share(NH + 2 * NKV, 1, &h0, &h1);
    const int first[3] = {0, NH, NH + NKV}, count[3] = {NH, NKV, NKV}, ld[3] = {QD, KVD, KVD};
    const Matrix* W[3] = {&L.q_proj, &L.k_proj, &L.v_proj};
    const float* bias[3] = {L.q_bias, L.k_bias, L.v_bias};
    float* out[3] = {ws.q.data(), ws.k.data(), ws.v.data()};
    int a[3], b[3];  // this thread's heads [a, b) of q, k and v
    MatmulOut outs[3];
    int n_outs = 0;
    for (int i = 0; i < 3; ++i) {
      a[i] = std::max(h0 - first[i], 0), b[i] = std::min(h1 - first[i], count[i]);
      if (a[i] < b[i]) outs[n_outs++] = {weights_ref(*W[i]), bias[i], out[i], ld[i], a[i] * HD, b[i] * HD, false};
    }
    matmul_outs(ops, h, n, D, outs, n_outs);
    for (int i = 0; i < 3; ++i)
      for (int head = a[i]; head < b[i]; ++head)
        for (int t = 0; t < n; ++t) {
          float* y = out[i] + size_t(t) * ld[i] + size_t(head) * HD;
          if (i < 2) ops.rope(y, ws.rope_cos.data() + size_t(t) * HD / 2, ws.rope_sin.data() + size_t(t) * HD / 2, HD);
          if (i > 0) {
            const SequenceSlice& s = batch.seqs[ws.token_seq.data()[t]];
            const int p = s.position + t - s.first;
            ops.convert_row(y, i == 1 ? s.cache->key(l, head, p) : s.cache->value(l, head, p), s.cache->shape().dtype,
                            HD);
          }
        }
    par::barrier();
  }

  // att = softmax(q · kᵀ / √d) · v per sequence and head, each query over its sequence's keys up to
  // its own position (causal). Heads share a KV head in groups of NH / NKV (GQA). Prompt blocks
  // first (one unit per block and head), then decode steps (one unit per group and part of the
  // keys), all in one dynamic schedule; each decode step's parts are merged afterwards (merge).
  void attend(int l) {
    const int blocked = int(ws.attention_items.size()) * NH, group = NH / NKV;
    float* scratch = ws.attention_scratch.data() + size_t(par::thread_id()) * ws.attention_floats;
    const auto causal = ws.use_bf16_attention ? ops.attention_causal_bf16 : ops.attention_causal;
    par::for_dynamic(blocked + int(ws.decode_units.size()), [&](int i) {
      if (i < blocked) {
        const Workspace::AttentionItem& it = ws.attention_items[i / NH];
        const int head = i % NH;
        const SequenceSlice& s = batch.seqs[it.seq];
        const int ctx0 = s.position + it.first - s.first + 1;  // keys the block's first query sees
        float* probs = rec.attention ? recorded(l, head, it.first) : nullptr;
        causal(ws.q.data() + size_t(it.first) * QD + size_t(head) * HD, QD, it.count, ctx0,
               s.cache->head(l, head / group), HD, c.attention_scale, scratch,
               ws.att.data() + size_t(it.first) * QD + size_t(head) * HD, QD, probs, rec.context);
        return;
      }
      const Workspace::DecodeUnit& u = ws.decode_units[i - blocked];
      float* part = ws.partials.data() + size_t(u.slot) * ws.part_floats;
      float *m = part + size_t(group) * HD, *sum = m + group;
      // a KV head's parts lie together (Workspace::prepare): the next head's are its parts on
      const long kv_stride = long(ws.decode_merges[ws.token_merges[u.token]].parts) * ws.part_floats;
      ops.attention_part(ws.q.data() + size_t(u.token) * QD + size_t(u.kv_head) * group * HD, HD, group, u.kv_heads,
                         batch.seqs[u.seq].cache->head(l, u.kv_head), u.k0, u.k1, HD, c.attention_scale,
                         rec.attention ? scratch : nullptr, part, HD, kv_stride, m, sum);
      if (rec.attention)  // one part: the whole context's weights, normalised
        for (int h = 0; h < u.kv_heads * group; ++h) {
          float* row = recorded(l, u.kv_head * group + h, u.token);
          const float total = sum[(h / group) * kv_stride + h % group];
          for (int j = 0; j < u.k1; ++j) row[j] = scratch[size_t(h) * u.k1 + j] / total;
        }
    });
  }

  // A decode token's attention output for one GQA group: its parts merged (attend).
  void merge(const Workspace::DecodeMerge& g) {
    attention_merge(ws.partials.data() + size_t(g.first_slot) * ws.part_floats, g.parts, ws.part_floats, NH / NKV, HD,
                    ws.att.data() + size_t(g.token) * QD + size_t(g.kv_head) * (NH / NKV) * HD, HD);
  }

  // Row `token` of head `head`'s recorded attention weights in layer l.
  float* recorded(int l, int head, int token) {
    return rec.attention + ((size_t(l) * NH + head) * rec.n + rec.offset + token) * rec.context;
  }

  // x += feed_forward(RMSNorm(x)) = down(silu(x̂ · W_gateᵀ) ⊙ (x̂ · W_upᵀ)): each token's vector
  // widened to `intermediate`, gated, and projected back. A thread owns the same rows of gate and
  // up, so it applies the SwiGLU to them at once.
  void feed_forward(int l) {
    const LayerWeights& L = m.layers[l];
    const MatmulInput h = block_input(l, D + QD, L.post_attention_layernorm);
    const int nr = batch.n_rowwise;
    auto gate_up = [&](int r0, int r1, int t0, int t1) {  // rows [r0, r1) of tokens [t0, t1)
      if (r0 >= r1 || t0 >= t1) return;
      float *g = ws.gate.data(), *u = ws.up.data();
      const MatmulOut outs[2] = {{weights_ref(L.gate_proj), L.gate_bias, g, F, r0, r1, false},
                                 {weights_ref(L.up_proj), L.up_bias, u, F, r0, r1, false}};
      if (t0 < nr) rowwise_outs(ops, h, D, outs, 2);
      else gemm_outs(ops, h, t0, t1, D, outs, 2);
      for (int t = t0; t < t1; ++t) ops.silu_mul(g + size_t(t) * F + r0, u + size_t(t) * F + r0, r1 - r0);
    };
    if (nr > 0) {
      int r0, r1;
      par::share(F, ROW_BLOCK_SWIGLU, &r0, &r1);
      gate_up(r0, r1, 0, nr);
    }
    if (n > nr) {
      int r0, r1, t0, t1;
      thread_tiles(F, n - nr, &r0, &r1, &t0, &t1);
      gate_up(r0, r1, nr + t0, nr + t1);
    }
    par::barrier();
    if (rec.mlp) record_rows(rec.mlp + (size_t(l) * rec.n + rec.offset) * F, ws.gate.data(), F);
    record_squares(l, 2 * D + QD, ws.gate.data(), F);
    matmul_parallel(ops, L.down_proj, ws.matmul_input(ops, ws.gate.data(), n, nr, F), n, L.down_bias, ws.x.data(),
                    true);
  }

  // logits = lm_head(RMSNorm(x)) for the tokens that want them.
  void predict() {
    if (batch.n_logits == 0) return;
    auto norm = [&](int i) {
      const size_t t = batch.logit_rows[i];
      ops.rmsnorm(ws.xb.data() + size_t(i) * D, ws.x.data() + t * D, m.norm, D, c.rms_norm_eps);
    };
    const MatmulInput h = ws.matmul_input(ops, ws.xb.data(), batch.n_logits, batch.n_logits_rowwise, D, norm);
    matmul_parallel(ops, m.lm_head, h, batch.n_logits, nullptr, batch.logits, false);
  }

  // The residual stream after layer `slot` − 1 (slot 0: the embeddings).
  void record_hidden(int slot) {
    if (rec.hidden) record_rows(rec.hidden + (size_t(slot) * rec.n + rec.offset) * D, ws.x.data(), D);
  }

  void record_rows(float* dst, const float* src, int width) {
    par::for_static(
        n, [&](int t) { std::memcpy(dst + size_t(t) * width, src + size_t(t) * width, sizeof(float) * width); });
  }

  // rec.squares[l][at + j] += Σ_t in[t, j]², for the n rows of in [n, width] (see Record). A
  // thread owns a run of columns; the barrier first lets every thread's writes to `in` land.
  void record_squares(int l, int at, const float* in, int width) {
    if (!rec.squares) return;
    par::barrier();
    double* dst = rec.squares + size_t(l) * Record::squares_width(c) + at;
    const int blocks = (width + SQUARES_BLOCK - 1) / SQUARES_BLOCK;
    par::for_static(blocks, [&](int b) {
      const int j0 = b * SQUARES_BLOCK, j1 = std::min(width, j0 + SQUARES_BLOCK);
      for (int t = 0; t < n; ++t)
        for (int j = j0; j < j1; ++j) {
          const double v = in[size_t(t) * width + j];
          dst[j] += v * v;
        }
    });
  }

  static constexpr int SQUARES_BLOCK = 64;     // columns per unit of record_squares
  static constexpr int ROW_BLOCK_SWIGLU = 16;  // gate/up rows per block for a few tokens
};

}  // namespace

void forward(const Model& model, const Kernels& ops, const Batch& batch, Workspace& ws, const Record& record) {
  ws.prepare(ops, batch, record);
  par::region(model.threads, [&] {
    Pass pass(model, ops, batch, ws, record);
    pass.embed();
    pass.record_hidden(0);
    for (int l = 0; l < model.config.num_hidden_layers; ++l) {
      pass.attention(l);
      pass.feed_forward(l);
      pass.record_hidden(l + 1);
    }
    pass.predict();
  });
}

void unembed(const Model& model, const float* hidden, int n, float* logits, Workspace& ws) {
  const Kernels& ops = kernels();
  const int D = model.config.hidden_size;
  std::vector<int> rows(ws.max_tokens);
  for (int i = 0; i < ws.max_tokens; ++i) rows[i] = i;
  for (int done = 0; done < n; done += ws.max_tokens) {
    const int count = std::min(ws.max_tokens, n - done);
    std::memcpy(ws.x.data(), hidden + size_t(done) * D, sizeof(float) * count * D);
    Batch batch;
    batch.n = count, batch.logit_rows = rows.data(), batch.n_logits = count;
    batch.n_logits_rowwise = count < gemm_min_tokens(model, ops) ? count : 0;
    batch.logits = logits + size_t(done) * model.config.vocab_size;
    const Record none;
    ws.prepare(ops, batch, none);  // sizes the buffer a bf16 prompt's activations are packed into
    par::region(model.threads, [&] { Pass(model, ops, batch, ws, none).predict(); });
  }
}

}  // namespace gally
