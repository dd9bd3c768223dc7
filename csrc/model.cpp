#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "kernels/kernels.h"
#include "parallel.h"

namespace gally {
namespace {

bool as_compute_dtype(const std::string& st, DType* out) {
  if (st == "F32") *out = DType::F32;
  else if (st == "BF16") *out = DType::BF16;
  else if (st == "F16") *out = DType::F16;
  else return false;
  return true;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

float element(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return ((const float*)p)[i];
    case DType::BF16: return bf16_to_f32(((const uint16_t*)p)[i]);
    case DType::F16: return f16_to_f32(((const uint16_t*)p)[i]);
    default: return 0;  // quantized matrices are never converted
  }
}

size_t matrix_bytes(const Matrix& w) {
  const size_t n = size_t(w.rows) * w.cols, groups = n / QGROUP;
  switch (w.dtype) {
    case DType::Q8: return n + groups * 2;
    case DType::Q4: return n / 2 + groups * 4;
    case DType::Q4K: return n / 2 + size_t(super_blocks(long(groups))) * (QK_CODE_BYTES + 4);
    default: return n * dtype_size(w.dtype);
  }
}

class Builder {
 public:
  Builder(Model& m, const std::map<std::string, Tensor>& tensors, const std::string& dtype)
      : m_(m), tensors_(tensors), keep_dtype_(dtype.empty()) {
    if (!keep_dtype_) want_ = parse_dtype(dtype);
  }

  bool has(const std::string& name) const { return tensors_.count(name) > 0; }

  const Tensor& find(const std::string& name, const std::vector<int64_t>& shape) {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) throw std::invalid_argument("missing tensor '" + name + "'");
    const Tensor& t = it->second;
    if (t.shape != shape)
      throw std::invalid_argument("tensor '" + name + "' has shape " + shape_str(t.shape) + " but the config implies " +
                                  shape_str(shape));
    DType d;
    if (!as_compute_dtype(t.dtype, &d))
      throw std::invalid_argument("tensor '" + name + "' has dtype " + t.dtype +
                                  "; supported weight dtypes are F32, BF16 and F16");
    return t;
  }

  // A matrix in the compute dtype: a view when the stored dtype matches and is aligned, else a copy.
  // `name` ends in ".weight"; a quantized checkpoint stores ".qweight", ".scales" (and ".mins").
  Matrix matrix(const std::string& name, int rows, int cols) {
    const std::string base = name.substr(0, name.size() - 7);
    if (!has(name) && has(base + ".qweight")) return quantized(base, rows, cols);
    const Tensor& t = find(name, {rows, cols});
    DType from = DType::F32;  // set by as_compute_dtype, which find() has checked
    as_compute_dtype(t.dtype, &from);
    DType to = keep_dtype_ ? from : want_;
    Matrix mat{t.data, to, rows, cols};
    if (to != from || uintptr_t(t.data) % dtype_size(from) != 0) mat.data = convert(t, from, to);
    else keep(t);
    m_.weight_bytes += matrix_bytes(mat);
    return mat;
  }

  // Norm weights and biases are small and always kept in f32.
  const float* vector(const std::string& name, int n) {
    const Tensor& t = find(name, {n});
    DType from = DType::F32;  // set by as_compute_dtype, which find() has checked
    as_compute_dtype(t.dtype, &from);
    m_.weight_bytes += size_t(n) * 4;
    if (from == DType::F32 && uintptr_t(t.data) % 4 == 0) {
      m_.storage.push_back(t);
      return (const float*)t.data;
    }
    return (const float*)convert(t, from, DType::F32, /*count=*/false);
  }

  // int8 (.qweight I8, .scales), int4 v1 (.qweight U8, .scales, .mins per group) or int4 v2
  // (.qweight U8, .scales, .mins per super-block and their .subscales codes), kernels.h.
  Matrix quantized(const std::string& base, int rows, int cols) {
    const Tensor& q = tensors_.at(base + ".qweight");
    if (cols % QGROUP != 0)
      throw std::invalid_argument("tensor '" + base + ".qweight': " + std::to_string(cols) +
                                  " columns is not a multiple of the group size " + std::to_string(QGROUP));
    const bool q4 = q.dtype == "U8", q4k = q4 && has(base + ".subscales");
    if (!q4 && q.dtype != "I8")
      throw std::invalid_argument("tensor '" + base + ".qweight' has dtype " + q.dtype +
                                  "; quantized weights are I8 (int8) or U8 (packed int4)");
    const int64_t blocks = super_blocks(int64_t(rows) * (cols / QGROUP));
    const std::vector<int64_t> qshape = {rows, q4 ? cols / 2 : cols};
    const std::vector<int64_t> sshape = q4k ? std::vector<int64_t>{blocks} : std::vector<int64_t>{rows, cols / QGROUP};
    if (q.shape != qshape)
      throw std::invalid_argument("tensor '" + base + ".qweight' has shape " + shape_str(q.shape) +
                                  " but the config implies " + shape_str(qshape));
    Matrix mat{q.data, q4k ? DType::Q4K : q4 ? DType::Q4 : DType::Q8, rows, cols};
    const std::string unit =
        q4k ? "super-blocks of " + std::to_string(QK_GROUPS) + " groups of " + std::to_string(QGROUP) + " weights"
            : "groups of " + std::to_string(QGROUP);
    auto part = [&](const std::string& name, const char* dtype, const std::vector<int64_t>& shape) {
      auto it = tensors_.find(name);
      if (it == tensors_.end())
        throw std::invalid_argument("missing tensor '" + name + "' for the quantized weight '" + base + ".qweight'");
      const Tensor& t = it->second;
      if (t.dtype != dtype || t.shape != shape)
        throw std::invalid_argument("tensor '" + name + "' must be " + dtype + " " + shape_str(shape) + " (" + unit +
                                    "), got " + t.dtype + " " + shape_str(t.shape));
      if (std::string(dtype) == "F16" && uintptr_t(t.data) % 2)
        throw std::invalid_argument("tensor '" + name + "' is not 2-byte aligned");
      keep(t);
      return t.data;
    };
    mat.scales = (const uint16_t*)part(base + ".scales", "F16", sshape);
    if (q4) mat.mins = (const uint16_t*)part(base + ".mins", "F16", sshape);
    if (q4k) mat.codes = (const uint8_t*)part(base + ".subscales", "U8", {blocks, QK_CODE_BYTES});
    keep(q);
    m_.weight_bytes += matrix_bytes(mat);
    m_.quant_formats |= 1u << int(mat.dtype);
    return mat;
  }

  const float* optional_vector(const std::string& name, int n, bool expected) {
    if (!expected && !has(name)) return nullptr;
    return vector(name, n);
  }

 private:
  // Keeps a matrix the model uses as it is; one made in memory at load (quantized from a float
  // checkpoint) counts as copied.
  void keep(const Tensor& t) {
    m_.storage.push_back(t);
    if (t.owned) m_.copied_bytes += t.owned->size();
  }

  const void* convert(const Tensor& t, DType from, DType to, bool count = true) {
    const int64_t n = t.numel();
    auto buf = std::make_shared<std::vector<uint8_t>>(size_t(n) * dtype_size(to));
    void* dst = buf->data();
    // Copy first: the source may be unaligned for its element type.
    std::vector<uint8_t> src((const uint8_t*)t.data, (const uint8_t*)t.data + n * dtype_size(from));
    const void* s = src.data();
    // the model's threads for a large tensor; elements in runs of 4096 (n ≤ 2^31 · 4096)
    const int64_t runs = (n + 4095) / 4096;
    par::region(n > (1 << 20) ? m_.threads : 1, [&] {
      par::for_static(int(runs), [&](int r) {
        for (int64_t i = int64_t(r) * 4096; i < std::min(n, int64_t(r + 1) * 4096); ++i) {
          float f = element(s, from, i);
          switch (to) {
            case DType::F32: ((float*)dst)[i] = f; break;
            case DType::BF16:
              ((uint16_t*)dst)[i] = from == DType::BF16 ? ((const uint16_t*)s)[i] : f32_to_bf16(f);
              break;
            case DType::F16: ((uint16_t*)dst)[i] = from == DType::F16 ? ((const uint16_t*)s)[i] : f32_to_f16(f); break;
            default: break;
          }
        }
      });
    });
    Tensor owned;
    owned.name = t.name;
    owned.shape = t.shape;
    owned.data = dst;
    owned.owned = buf;
    m_.storage.push_back(owned);
    if (count) m_.copied_bytes += buf->size();
    return dst;
  }

  Model& m_;
  const std::map<std::string, Tensor>& tensors_;
  bool keep_dtype_;
  DType want_ = DType::F32;
};

}  // namespace

void check_config(const ModelConfig& c) {
  using L = ConfigLimits;
  auto bad = [](const std::string& what) { return std::invalid_argument("config: " + what); };
  auto in_range = [&](int v, int most, const char* name) {
    if (v <= 0 || v > most)
      throw bad(std::string(name) + " must be in [1, " + std::to_string(most) + "], got " + std::to_string(v));
  };
  in_range(c.hidden_size, L::hidden_size, "hidden_size");
  in_range(c.intermediate_size, L::intermediate_size, "intermediate_size");
  in_range(c.num_hidden_layers, L::num_hidden_layers, "num_hidden_layers");
  in_range(c.num_attention_heads, L::num_attention_heads, "num_attention_heads");
  in_range(c.num_key_value_heads, c.num_attention_heads, "num_key_value_heads");
  in_range(c.head_dim, L::head_dim, "head_dim");
  in_range(c.vocab_size, L::vocab_size, "vocab_size");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw bad("num_attention_heads (" + std::to_string(c.num_attention_heads) +
              ") is not a multiple of num_key_value_heads (" + std::to_string(c.num_key_value_heads) + ")");
  if (c.head_dim % 2 != 0) throw bad("head_dim must be even for RoPE, got " + std::to_string(c.head_dim));
  const int64_t width = int64_t(c.num_attention_heads) * c.head_dim;
  if (width > L::attention_width)
    throw bad("num_attention_heads x head_dim = " + std::to_string(width) + " exceeds " +
              std::to_string(L::attention_width));
  const int64_t widest = std::max<int64_t>({width, c.intermediate_size, c.vocab_size});
  if (widest * c.hidden_size > L::matrix_elements)
    throw bad("a weight matrix of " + std::to_string(widest) + " x hidden_size " + std::to_string(c.hidden_size) +
              " elements exceeds " + std::to_string(L::matrix_elements));
  if (int(c.inv_freq.size()) != c.head_dim / 2)
    throw bad("inv_freq must hold head_dim/2 = " + std::to_string(c.head_dim / 2) + " values");
  for (float f : c.inv_freq)
    if (!std::isfinite(f) || f < 0) throw bad("the RoPE frequencies must be finite and non-negative");
  if (!(c.rms_norm_eps >= 0 && c.rms_norm_eps < 1))
    throw bad("rms_norm_eps must be in [0, 1), got " + std::to_string(c.rms_norm_eps));
  if (!std::isfinite(c.attention_scale)) throw bad("attention_scale must be finite");
  if (c.sliding_window < 0) throw bad("sliding_window must be non-negative, got " + std::to_string(c.sliding_window));
}

void check_session_size(const ModelConfig& c, int max_context) {
  using L = ConfigLimits;
  if (max_context <= 0 || max_context > L::max_context)
    throw std::invalid_argument("max_context must be in [1, " + std::to_string(L::max_context) + "], got " +
                                std::to_string(max_context));
  const int64_t kv = int64_t(c.num_hidden_layers) * 2 * c.num_key_value_heads * c.head_dim * max_context * 4;
  if (kv > L::kv_cache_bytes)
    throw std::invalid_argument("max_context " + std::to_string(max_context) + " needs a KV cache of " +
                                std::to_string(kv) + " bytes, more than the " + std::to_string(L::kv_cache_bytes) +
                                " a session may have");
}

DType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32") return DType::F32;
  if (name == "bf16" || name == "bfloat16") return DType::BF16;
  if (name == "f16" || name == "float16") return DType::F16;
  throw std::invalid_argument("dtype must be one of 'f32', 'bf16', 'f16', got '" + name + "'");
}

std::shared_ptr<Model> build_model(const ModelConfig& c, const std::map<std::string, Tensor>& tensors,
                                   const std::string& dtype, int threads) {
  check_config(c);
  if (threads <= 0 || threads > MAX_THREADS)
    throw std::invalid_argument("threads must be in [1, " + std::to_string(MAX_THREADS) + "], got " +
                                std::to_string(threads));
  auto m = std::make_shared<Model>();
  m->config = c;
  m->threads = threads;
  Builder b(*m, tensors, dtype);
  const int D = c.hidden_size, F = c.intermediate_size, QD = c.num_attention_heads * c.head_dim,
            KVD = c.num_key_value_heads * c.head_dim;
  m->embed_tokens = b.matrix("model.embed_tokens.weight", c.vocab_size, D);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights L;
    L.input_layernorm = b.vector(p + "input_layernorm.weight", D);
    L.q_proj = b.matrix(p + "self_attn.q_proj.weight", QD, D);
    L.k_proj = b.matrix(p + "self_attn.k_proj.weight", KVD, D);
    L.v_proj = b.matrix(p + "self_attn.v_proj.weight", KVD, D);
    L.o_proj = b.matrix(p + "self_attn.o_proj.weight", D, QD);
    L.q_bias = b.optional_vector(p + "self_attn.q_proj.bias", QD, c.qkv_bias);
    L.k_bias = b.optional_vector(p + "self_attn.k_proj.bias", KVD, c.qkv_bias);
    L.v_bias = b.optional_vector(p + "self_attn.v_proj.bias", KVD, c.qkv_bias);
    L.o_bias = b.optional_vector(p + "self_attn.o_proj.bias", D, c.o_bias);
    L.post_attention_layernorm = b.vector(p + "post_attention_layernorm.weight", D);
    L.gate_proj = b.matrix(p + "mlp.gate_proj.weight", F, D);
    L.up_proj = b.matrix(p + "mlp.up_proj.weight", F, D);
    L.down_proj = b.matrix(p + "mlp.down_proj.weight", D, F);
    L.gate_bias = b.optional_vector(p + "mlp.gate_proj.bias", F, c.mlp_bias);
    L.up_bias = b.optional_vector(p + "mlp.up_proj.bias", F, c.mlp_bias);
    L.down_bias = b.optional_vector(p + "mlp.down_proj.bias", D, c.mlp_bias);
    m->layers.push_back(L);
  }
  m->norm = b.vector("model.norm.weight", D);
  if (c.tie_word_embeddings) m->lm_head = m->embed_tokens;
  else m->lm_head = b.matrix("lm_head.weight", c.vocab_size, D);
  // A token reads one row of the embedding but all of lm_head (the same matrix when tied).
  if (!c.tie_word_embeddings) m->weight_bytes -= matrix_bytes(m->embed_tokens);
  return m;
}

}  // namespace gally
