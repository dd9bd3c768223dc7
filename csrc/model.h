// A Llama-family model: its hyper-parameters (HF config names) and its weights, which are views
// into the mapped safetensors files or, where the compute dtype differs, converted copies.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dtype.h"
#include "safetensors.h"

namespace gally {

// Upper bounds on a config, checked at load (check_config here, and python/gally/config.py, which
// reads this table). Each is 4-16x what the largest Llama-family models use (Llama 3.1 405B: hidden
// 16384, intermediate 53248, 126 layers, 128 heads of 128, vocabulary 128256). With them every size
// product of two dimensions fits in an int: the dimensions alone are below 2^24, a weight matrix
// holds fewer than 2^31 elements (so an element index fits in an int), and q or o_proj's width,
// heads x head_dim, stays below 2^17.
struct ConfigLimits {
  static constexpr int hidden_size = 1 << 16;
  static constexpr int intermediate_size = 1 << 18;
  static constexpr int num_hidden_layers = 1 << 10;
  static constexpr int num_attention_heads = 1 << 10;
  static constexpr int head_dim = 1 << 10;
  static constexpr int vocab_size = 1 << 22;
  static constexpr int attention_width = 1 << 17;                     // num_attention_heads x head_dim
  static constexpr int64_t matrix_elements = (int64_t(1) << 31) - 1;  // rows x cols of any weight matrix
  static constexpr int max_context = 1 << 20;                         // tokens one session holds (x head_dim < 2^31)
  static constexpr int64_t kv_cache_bytes = int64_t(1) << 40;         // one session's f32 KV cache
};

struct ModelConfig {
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  float rms_norm_eps = 1e-5f;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;        // q/k/v projections carry biases (Qwen2; Llama with attention_bias)
  bool o_bias = false;          // o_proj carries a bias (Llama with attention_bias)
  bool mlp_bias = false;        // gate/up/down carry biases (Llama with mlp_bias)
  std::vector<float> inv_freq;  // [head_dim/2] RoPE frequencies θ_i, scaling already applied
  float attention_scale = 0;    // applied to q·k (head_dim^-0.5 for these models)
  int sliding_window = 0;       // 0: full attention
};

// W [rows, cols] row-major in `dtype`. For int8/int4, data holds the quantized values (int8
// [rows, cols], or two int4 per byte [rows, cols/2]) and scales/mins their float16 groups
// [rows, cols/32]; for Q4K scales/mins are the super-blocks' d/dmin and codes their 6-bit codes
// (kernels.h).
struct Matrix {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int rows = 0, cols = 0;
  const uint16_t* scales = nullptr;
  const uint16_t* mins = nullptr;
  const uint8_t* codes = nullptr;
};

struct LayerWeights {
  const float* input_layernorm;                    // [hidden]
  Matrix q_proj;                                   // [heads·head_dim, hidden]
  Matrix k_proj, v_proj;                           // [kv_heads·head_dim, hidden]
  Matrix o_proj;                                   // [hidden, heads·head_dim]
  const float *q_bias, *k_bias, *v_bias, *o_bias;  // [rows] or null
  const float* post_attention_layernorm;           // [hidden]
  Matrix gate_proj, up_proj;                       // [intermediate, hidden]
  Matrix down_proj;                                // [hidden, intermediate]
  const float *gate_bias, *up_bias, *down_bias;    // [rows] or null
};

struct Model {
  ModelConfig config;
  int threads = 1;
  Matrix embed_tokens;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  const float* norm = nullptr;  // [hidden]
  Matrix lm_head;               // [vocab, hidden]; the embedding matrix when tied
  std::vector<Tensor> storage;  // keeps mapped files and converted copies alive
  size_t weight_bytes = 0;      // bytes of weights one token's forward pass reads
  unsigned quant_formats = 0;   // bit 1 << DType of each quantized format a matrix is in
  // some matrix multiplies int16-quantized activations
  bool quantized() const { return quant_formats != 0; }
  size_t copied_bytes = 0;  // matrix bytes converted or copied at load (0: all zero-copy;
                            // 16-bit norm and bias vectors, kilobytes, are always widened)
};

// Threads one model may use: far more than any CPU has cores, and few enough that starting them
// does not exhaust a process's memory for stacks (8 MiB each by default).
constexpr int MAX_THREADS = 1024;

// Checks the config, looks up every tensor under its HF name, checks its shape, and converts it
// when `dtype` ("f32", "bf16", "f16"; "" keeps the stored dtype) differs from the stored one.
std::shared_ptr<Model> build_model(const ModelConfig& config, const std::map<std::string, Tensor>& tensors,
                                   const std::string& dtype, int threads);

DType parse_dtype(const std::string& name);  // "f32" | "bf16" | "f16"

// Throws std::invalid_argument naming the field when a config breaks a bound of ConfigLimits or
// holds a non-finite number.
void check_config(const ModelConfig& config);

// Throws std::invalid_argument naming max_context when a session of `max_context` tokens breaks
// ConfigLimits (its length, or its KV cache's bytes).
void check_session_size(const ModelConfig& config, int max_context);

}  // namespace gally
