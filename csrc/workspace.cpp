// The forward pass's scratch (forward.h): what is allocated once, what grows, and the attention plan.
#include <algorithm>

#include "forward.h"
#include "parallel.h"

namespace gally {

Workspace::Workspace(const Model& m, int max_tokens_) : model(m), max_tokens(max_tokens_) {
  const ModelConfig& c = m.config;
  const size_t B = max_tokens, QD = size_t(c.num_attention_heads) * c.head_dim,
               KVD = size_t(c.num_key_value_heads) * c.head_dim;
  x.reset(B * c.hidden_size);
  xb.reset(B * c.hidden_size);
  q.reset(B * QD);
  k.reset(B * KVD);
  v.reset(B * KVD);
  att.reset(B * QD);
  gate.reset(B * c.intermediate_size);
  up.reset(B * c.intermediate_size);
  rope_cos.reset(B * c.head_dim / 2);
  rope_sin.reset(B * c.head_dim / 2);
  token_seq.reset(B);
  x_norm.reset(size_t(m.threads) * c.hidden_size);
  // bf16 and quantized weights: on AVX512-BF16 their prompts' matmuls round the activations to bf16
  bf16_prompt =
      !m.layers.empty() && (m.layers[0].q_proj.dtype == DType::BF16 || is_quantized(m.layers[0].q_proj.dtype));
  if (m.quantized()) {  // int16 copies of a matmul's input: the widest is the FFN's
    qdim = std::max({c.hidden_size, int(QD), c.intermediate_size});
    xq.reset(B * qdim);
    xq_scale.reset(B * qdim / QGROUP);
    xq_sum.reset(B * qdim / QGROUP);
    xq_thread.reset(size_t(m.threads) * qdim);
    xq_scale_thread.reset(size_t(m.threads) * 2 * (qdim / QGROUP));
  }
}

void Workspace::prepare(const Kernels& ops, const Batch& batch, const Record& record) {
  const ModelConfig& c = model.config;
  const int HD = c.head_dim, NKV = c.num_key_value_heads, group = c.num_attention_heads / NKV;
  use_bf16_attention = bf16_prompt && HD % 32 == 0 && ops.attention_causal_bf16;
  attention_items.clear(), decode_units.clear(), decode_merges.clear();
  token_merges.assign(batch.n, -1);
  long need = 0;  // attention scratch per thread
  int slots = 0;
  for (int s = 0; s < batch.n_seqs; ++s) {
    const SequenceSlice& sl = batch.seqs[s];
    for (int t = 0; t < sl.count; ++t) token_seq.data()[sl.first + t] = s;
    const long context = sl.position + sl.count;  // keys the slice's last query sees
    if (sl.count >= ATTENTION_BLOCK_MIN) {
      const bool converted = use_bf16_attention || sl.cache->shape().dtype != DType::F32;
      const int block = converted ? ATTENTION_BLOCK_CONVERTED : ATTENTION_BLOCK;
      for (int t0 = 0; t0 < sl.count; t0 += block)
        attention_items.push_back({s, sl.first + t0, std::min(block, sl.count - t0)});
      need = std::max(need, use_bf16_attention ? attention_bf16_scratch_floats(context, HD)
                                               : attention_scratch_floats(context, HD));
      continue;
    }
    for (int t = 0; t < sl.count; ++t) {
      const int keys = sl.position + t + 1;
      // recorded weights are normalised over the whole context: one part then
      const int per = record.attention ? keys : KEYS_PER_PART, parts = (keys + per - 1) / per;
      token_merges[sl.first + t] = int(decode_merges.size());
      // KV heads per unit: all, unless fewer parts than threads (the result is the same either way)
      const int runs = std::min(NKV, (model.threads + parts - 1) / parts), per_run = (NKV + runs - 1) / runs;
      for (int h = 0; h < NKV; ++h) decode_merges.push_back({sl.first + t, h, slots + h * parts, parts});
      for (int h = 0; h < NKV; h += per_run)
        for (int p = 0; p < parts; ++p)
          decode_units.push_back({s, sl.first + t, h, std::min(per_run, NKV - h), p * per,
                                  std::min(keys, (p + 1) * per), slots + h * parts + p});
      slots += NKV * parts;
      need = std::max(need, long(NKV) * group * std::min(keys, per));
    }
  }
  // Longest first, so that the dynamic schedule ends with short items.
  auto cost = [&](const AttentionItem& it) {
    return (long(batch.seqs[it.seq].position) + it.first - batch.seqs[it.seq].first + it.count) * it.count;
  };
  std::stable_sort(attention_items.begin(), attention_items.end(),
                   [&](const AttentionItem& a, const AttentionItem& b) { return cost(a) > cost(b); });
  if (need > attention_floats) {  // grown in steps, so that a long conversation reallocates seldom
    attention_floats = 2 * need;
    attention_scratch.reset(size_t(model.threads) * attention_floats);
  }
  part_floats = attention_part_floats(group, HD);
  partials.grow(size_t(slots) * part_floats);
  if (ops.pack && bf16_prompt && batch.n > batch.n_rowwise)
    packed.grow(size_t(
        ops.packed_size(max_tokens, std::max({c.hidden_size, c.num_attention_heads * HD, c.intermediate_size}))));
}

MatmulInput Workspace::matmul_input(const Kernels& ops, const float* in, int n, int n_rowwise, int n_in,
                                    const std::function<void(int)>& make_row) {
  MatmulInput a{in, n_rowwise};
  const int gemm = n - n_rowwise;
  // GEMM tokens into int8/int4 weights take gemm_q where the set has one for them, in int16 as the
  // row-wise tokens; a matrix in another format then lays out its own input (matmul_many).
  bool q_gemm = false;
  for (DType t : {DType::Q8, DType::Q4, DType::Q4K})
    q_gemm = q_gemm || ((model.quant_formats >> int(t) & 1) && ops.takes_gemm_q(t));
  q_gemm = q_gemm && gemm > 0 && n_in % QGROUP == 0;
  const int quantized = !model.quantized() || n_in % QGROUP != 0 ? 0 : q_gemm ? n : n_rowwise;
  const int groups = n_in / QGROUP;
  auto quantize = [&](int t) {
    ops.quantize_rows(in + size_t(t) * n_in, 1, n_in, xq.data() + size_t(t) * n_in,
                      xq_scale.data() + size_t(t) * groups, xq_sum.data() + size_t(t) * groups);
  };
  const bool pack = gemm > 0 && bf16_prompt && ops.pack && !q_gemm;
  if (make_row)  // each row made, then quantized by the same thread: one barrier for both
    par::for_static(n, [&](int t) {
      make_row(t);
      if (t < quantized) quantize(t);
    });
  if (pack) {  // the GEMM tokens laid out once, by all threads
    const int tiles = (gemm + GEMM_SPLIT_TOKENS - 1) / GEMM_SPLIT_TOKENS;
    const float* x = in + size_t(n_rowwise) * n_in;
    par::for_static(tiles, [&](int t) { ops.pack(x, gemm, n_in, t, t + 1, packed.data()); });
    a.packed = packed.data();
  }
  if (quantized == 0) return a;
  // int16 activations, quantized once per step (with make_row, above; by every thread into its own
  // buffer for a lone token; split over the threads otherwise).
  if (!make_row) {
    if (n == 1) {
      const size_t id = par::thread_id();
      int16_t* xq1 = xq_thread.data() + id * qdim;
      float* s = xq_scale_thread.data() + 2 * id * (qdim / QGROUP);
      ops.quantize_rows(in, 1, n_in, xq1, s, s + qdim / QGROUP);
      a.xq = xq1, a.xq_scale = s, a.xq_sum = s + qdim / QGROUP;
      return a;
    }
    par::for_static(quantized, quantize);
  }
  a.xq = xq.data(), a.xq_scale = xq_scale.data(), a.xq_sum = xq_sum.data(), a.xq_gemm = q_gemm;
  return a;
}

}  // namespace gally
