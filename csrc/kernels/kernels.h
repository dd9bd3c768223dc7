// The kernel table: one instance per instruction set, chosen once at run time (isa.cpp).
// Kernels know nothing of models: they see matrices, vectors and row ranges. Each SIMD set
// has a scalar twin in kernels_generic.cpp, the portable fallback and the oracle of the tests.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"

namespace gally {

// Quantized weights. Groups of QGROUP consecutive inputs of a row share a float16 scale (int4
// also a float16 min): int8 w = scale·q with q ∈ [-127, 127]; int4 w = scale·q + min with
// q ∈ [0, 15], two per byte: byte i of a group holds q_i (low nibble) and q_{i+16} (high).
// Activations are quantized per group to int16 (xq = round(x·32767/max|x|), xs = max|x|/32767,
// and xsum = Σx), so that a group's dot product with int8 weights is exact in integers (int8
// activations cost int8 weights their near-exactness). int4 weights meet those activations
// requantized to int8 (common.h requantize_int8): q = round(xq·127/32767) to even, scale
// xs·32767/127, sum = scale·Σq for the min term (xsum goes unused), four byte products to an
// instruction; in prompts and decode steps alike.
constexpr int QGROUP = 32;
constexpr float ACT_INT16_MAX = 32767.0f;                // int16 activations lie in [-32767, 32767]
constexpr float REQUANT = 127.0f / ACT_INT16_MAX;        // int16 value → int8 value (rounded to even)
constexpr float REQUANT_SCALE = ACT_INT16_MAX / 127.0f;  // int16 scale → int8 scale

// Q4K (int4, gally-quant v2, 4.5 bits per weight): the nibbles exactly as Q4's, but the matrix's
// groups, numbered row-major (f = row · n_in/QGROUP + group), form super-blocks of QK_GROUPS
// consecutive groups (f / QK_GROUPS; a super-block may span two rows, and only the matrix's last
// may hold fewer), each with a float16 super-scale d and super-min dmin and 6-bit codes sc_j, m_j
// ∈ [0, 63] for its groups j = f % QK_GROUPS:
//   w = (d·sc_j)·q + dmin·m_j
// The codes of a super-block are QK_CODE_BYTES bytes: byte j (< 8) = (sc_j & 15) | (m_j & 15) << 4,
// and bytes 8-11 a little-endian uint32 whose bits 2j, 2j+1 hold sc_j >> 4 and bits 16+2j, 17+2j
// hold m_j >> 4. Per 256 weights: 128 bytes of nibbles + 12 + 4 = 144 bytes, whatever the row
// length (SmolLM2's 576 inputs are 18 groups a row).
constexpr int QK_GROUPS = 8;
constexpr int QK_CODE_BYTES = 12;
inline long super_blocks(long groups) { return (groups + QK_GROUPS - 1) / QK_GROUPS; }

// A weight matrix [n_out, n_in] as the kernels see it: row-major `data` in `dtype`; for Q8 and Q4
// the float16 group scales [n_out, n_in/QGROUP], and for Q4 the group minimums, alike. For Q4K,
// scales and mins are the super-blocks' d and dmin [super_blocks(n_out · n_in/QGROUP)] and codes
// their 6-bit codes [super_blocks(n_out · n_in/QGROUP) · QK_CODE_BYTES].
struct WeightsRef {
  const void* data;
  DType dtype;
  const uint16_t* scales = nullptr;
  const uint16_t* mins = nullptr;
  const uint8_t* codes = nullptr;
};

// One product of matmul_many: y[t, r] (+)= b[r] + Σ_k x[t, k] · W[r, k] for rows [r0, r1).
struct MatmulOut {
  WeightsRef W;
  const float* b;
  float* y;
  int ldy, r0, r1;
  bool accumulate;
};

// Kernels::matmul takes the prefill GEMM for batches of at least this many tokens (gemm.inl, which
// dequantizes quantized weights and multiplies the f32 activations, or Kernels::gemm_q); smaller
// ones multiply row by row. The forward pass sends a float model's slices of fewer than
// Kernels::float_gemm_min_tokens tokens row by row before that.
constexpr int GEMM_MIN_TOKENS = 4;
// A model whose matmul weights are all f32, bf16 or f16 sends slices of fewer than
// Kernels::float_gemm_min_tokens tokens (short prompts, short chunks) row-wise too (Runner,
// forward.h gemm_min_tokens): there the GEMM's token tiles run mostly empty, and the row-wise
// kernel, which reads each weight once for all the tokens, is faster. One core, bf16 weights,
// SmolLM2's and the Llama 3B and 8B shapes, row-wise against GEMM: 8 tokens AVX-512 35-48 GMAC/s
// against 11-16, AVX2 31-35 against 18-33; 16 tokens AVX-512 36-46 against 22-31, AVX2 29-38
// against 29-46. SmolLM2 pp16, 2 threads: AVX-512 bf16 +37%, f32 +24% row-wise; AVX2 bf16 -7%, f32
// +4%: so 17 for the AVX-512 sets, 16 elsewhere. Quantized models keep GEMM_MIN_TOKENS: their
// prompts take gemm_q.
constexpr int FLOAT_GEMM_MIN_TOKENS = 16;
// A batch split between threads is split at multiples of GEMM_SPLIT_TOKENS tokens: Kernels::pack's
// tile, a multiple of gemm_q's tiles (16 or 48 tokens) and of AVX2's float GEMM tile (24), and 3 of
// the 4 vectors of AVX-512's (64), as fast as its full tiles.
constexpr int GEMM_SPLIT_TOKENS = 48;

constexpr int KV_BLOCK_ALIGN = 16;  // rows of a cache block are a multiple of this (KvHead)

// One KV head of a sequence's cache as the attention kernels read it. The cache is a list of
// blocks of `block_rows` positions; within a block a head's keys are contiguous rows of `ld`
// elements of `dtype`, and so are its values: key j is at blocks[j / block_rows] + keys +
// (j % block_rows) · ld elements. A row of f32, or bf16 / f16 for a compact cache, is the head's
// d elements (ld = d); an int8 row (Q8) is d codes and their scales (kv_row_elements).
// block_rows is a multiple of KV_BLOCK_ALIGN, so that no register tile of keys crosses a block.
struct KvHead {
  const void* const* blocks;
  long keys, values;  // this head's offsets within a block, in elements
  int block_rows;
  long ld;  // elements from one row to the next
  DType dtype = DType::F32;
  long head_stride = 0;  // elements from this head's rows in a block to the next KV head's
  // The KV head g heads on (its rows head_stride · g further within each block).
  KvHead of(long g) const {
    KvHead h = *this;
    h.keys += g * head_stride, h.values += g * head_stride;
    return h;
  }
  template <class T>
  const T* key(long j) const {
    return (const T*)blocks[j / block_rows] + keys + (j % block_rows) * ld;
  }
  template <class T>
  const T* value(long j) const {
    return (const T*)blocks[j / block_rows] + values + (j % block_rows) * ld;
  }
  // f(j0, rows) for each run of the keys [k0, k1) that lie in one block: rows consecutive rows.
  template <class F>
  void each_run(int k0, int k1, F f) const {
    for (int j0 = k0; j0 < k1;) {
      const int end = (j0 / block_rows + 1) * block_rows < k1 ? (j0 / block_rows + 1) * block_rows : k1;
      f(j0, end - j0);
      j0 = end;
    }
  }
};

// The 8-bit KV cache (DType::Q8): a row of d elements is stored as d int8 codes, then a bf16
// scale for each group of KV_GROUP elements (the last group may be shorter): element i is
// code_i · scale_(i / KV_GROUP), with scale = max|x| / 127 over the group, rounded to bf16. 8.5 bits
// per element, as llama.cpp's q8_0 cache (an f16 scale per 32); a group's own scale keeps a few
// large dimensions of the keys from flattening the rest of the row.
constexpr int KV_GROUP = 32;
inline long kv_groups(long d) { return (d + KV_GROUP - 1) / KV_GROUP; }
inline long kv_row_elements(DType t, long d) { return t == DType::Q8 ? d + long(sizeof(uint16_t)) * kv_groups(d) : d; }
inline size_t kv_element_size(DType t) { return t == DType::F32 ? 4 : t == DType::Q8 ? 1 : 2; }
// The scale of element i's group in an int8 row of d elements. static: each kernel set's file
// compiles its own copy with its own instructions, which the linker must not merge into one.
static inline float kv_group_scale(const int8_t* row, int i, int d) {
  uint16_t s;
  std::memcpy(&s, row + d + sizeof s * (i / KV_GROUP), sizeof s);
  return bf16_to_f32(s);
}
// x [n] → an int8 row: codes x / (the group's bf16 scale), rounded to nearest even, as every
// kernel set writes it (kernels_generic.cpp). A group holding an infinity or a NaN gets a NaN scale
// and zero codes, so that it reads back as NaN (as a float cache's would).
void quantize_kv_row(const float* x, int8_t* out, int n);

// Merges the parts of attention_part over a split of the keys and normalises: for each of `heads`
// queries, out = Σ_p e^(m_p − M) · o_p / Σ_p e^(m_p − M) · l_p with M = max_p m_p. parts [n_parts]
// of (o [heads, d], m [heads], l [heads]) laid out one after another, stride part_floats.
void attention_merge(const float* parts, int n_parts, long part_floats, int heads, int d, float* out, int ldo);
inline long attention_part_floats(int heads, int d) { return long(heads) * (d + 2); }

// Floats of scratch attention_causal needs for n keys of dimension d: its tiles' scores [n] and
// queries [d] for each of up to 16 lanes (the widest vector set), then the keys and values of a
// compact cache widened to f32, kv_rows_aligned(n) rows of each.
inline long kv_rows_aligned(long n) { return (n + KV_BLOCK_ALIGN - 1) / KV_BLOCK_ALIGN * KV_BLOCK_ALIGN; }
inline long attention_tile_floats(long n, long d) { return 16 * (n + d); }
inline long attention_scratch_floats(long n, long d) {
  return attention_tile_floats(n, d) + 2 * kv_rows_aligned(n) * d;
}

// Floats of scratch attention_causal_bf16 (below) needs for n keys of dimension d: its keys, value
// pairs, scores, queries and paired weights, the last at least the 16 × d/2 of the queries' rows.
// Declared for every architecture, since the forward pass sizes the scratch of whichever set runs.
inline long attention_bf16_scratch_floats(long n, long d) {
  return n * (d / 2) + (n / 2 + 1) * d + 16 * (n + 2) + 8 * d + (16 * (n / 2 + 1) > 8 * d ? 16 * (n / 2 + 1) : 8 * d);
}

struct Kernels {
  const char* name;

  // y[t, r] = b[r] + Σ_k x[t, k] · W[r, k]    (+ y[t, r] when accumulate)
  // for rows r in [r0, r1) and tokens t in [0, n_tok).
  // x [n_tok, n_in] f32 row-major; W [n_out, n_in] in any DType (Q8/Q4 dequantized, exact in f32);
  // b [n_out] f32 or null; y [n_tok, ldy] f32 (ldy ≥ r1).
  void (*matmul)(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0,
                 int r1, bool accumulate);

  // matmul row by row, whatever n_tok: each row of W meets every token while it is in L1, and a
  // token's result does not depend on the other tokens (the decode steps of a batch of sequences
  // get exactly what each gets alone). matmul takes the GEMM from GEMM_MIN_TOKENS tokens on.
  void (*gemv)(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0,
               int r1, bool accumulate);

  // matmul for several matrices over one input x [n_tok, n_in] (q/k/v, gate/up): the prefill GEMM
  // lays the input out once for all of them.
  void (*matmul_many)(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count);

  // out[i] = x[i] / sqrt(mean(x²) + eps) · w[i]    x, w, out [n]; out may alias x.
  void (*rmsnorm)(float* out, const float* x, const float* w, int n, float eps);

  // Rotate-half RoPE on one head vector: pairs (i, i + d/2) turn by angle θ_i, given cos/sin [d/2].
  void (*rope)(float* v, const float* cos, const float* sin, int d);

  // A decode step's attention for the queries of kv_heads GQA groups over their keys [k0, k1): group
  // g's `heads` query rows (ldq apart, group g's from q + g · heads · ldq) share KV head kv.of(g).
  // Each key and value row is read once for up to 4 of them (the SIMD sets; a larger group reads
  // the part's rows again, by then in L2), and the SIMD sets go a block at a time through the KV
  // heads, whose rows of a block lie together (KvCache), rather than a head at a time through
  // its blocks. For query h of group g, with s_j = scale · K_j · q_h:
  //   m[h] = max_j s_j,   l[h] = Σ_j e^(s_j − m[h]),   out row h = Σ_j e^(s_j − m[h]) · V_j
  // the unnormalised parts of a softmax, group g's at out, m and l + g · kv_stride; attention over
  // [0, n) is out / l, and parts over a split of the keys merge exactly (attention_merge). probs,
  // when not null: kv_heads · heads · (k1 − k0) floats, which receive e^(s_j − m[h]) in row
  // g · heads + h (the weights before normalisation).
  void (*attention_part)(const float* q, int ldq, int heads, int kv_heads, const KvHead& kv, int k0, int k1, int d,
                         float scale, float* probs, float* out, int ldo, long kv_stride, float* m, float* l);

  // Causal attention for nq consecutive positions of one head: query i (row i of Q, ldq apart)
  // sees keys 0 … ctx0+i−1 of kv and its output goes to row i of out (ldo apart).
  // scratch: attention_scratch_floats(ctx0 + nq − 1, d), for the keys of the last query. The same
  // sums as `attention` query by query, with the queries in the vector lanes, so that each key and
  // value row serves a lane-full.
  // probs, when not null, receives query i's softmax weights in row i (ldp apart, ctx0+i each).
  void (*attention_causal)(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale,
                           float* scratch, float* out, int ldo, float* probs, long ldp);

  // g[i] = silu(g[i]) · u[i] = g / (1 + e^-g) · u    g, u [n]
  void (*silu_mul)(float* g, const float* u, int n);

  // out = x [n] in `to` (F32, BF16 or F16, rounded to nearest even; or Q8, quantize_kv_row: out
  // holds kv_row_elements(Q8, n) bytes): a key or value vector on its way into a KV cache.
  void (*convert_row)(const float* x, void* out, DType to, int n);

  // x [n, n_in] f32 → xq [n, n_in] int16, xs and xsum [n, n_in/32]    (n_in a multiple of 32)
  void (*quantize_rows)(const float* x, int n, int n_in, int16_t* xq, float* xs, float* xsum);

  // y[t, r] = b[r] + Σ_g xs[t,g]·ws[r,g]·(xq[t,g] · q[r,g]) (+ y[t, r] when accumulate), r in [r0, r1)
  // Wq int8 [n_out, n_in], Ws float16 [n_out, n_in/32]
  void (*matmul_q8)(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
                    int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);

  // As matmul_q8 on the activations requantized to int8 (above), plus the min term Σ_g sum[t,g]·wm[r,g]
  // of their sums (xsum is not read); Wq uint8 [n_out, n_in/2] (packed), Ws, Wm float16 [n_out, n_in/32]
  void (*matmul_q4)(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
                    const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
                    bool accumulate);

  // As matmul_q4 for Q4K weights W [n_out, n_in] (super-blocks, see QK_GROUPS).
  void (*matmul_q4k)(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b,
                     float* y, int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);

  // attention_causal in bf16 for the prompts of bf16 and quantized models (attention_causal_bf16
  // below), or null where the set has no bf16 dot product.
  void (*attention_causal_bf16)(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale,
                                float* scratch, float* out, int ldo, float* probs, long ldp) = nullptr;

  // Where matmul_many lays a batch's activations out before multiplying (avx512bf16, for bf16 and
  // quantized weights), the layout made once and shared by all threads instead: packed_size(n_tok,
  // n_in) 32-bit words in tiles of GEMM_SPLIT_TOKENS tokens, any range of which pack fills; then
  // matmul_many_packed multiplies (x itself for the matrices that take the f32 path). Else null.
  long (*packed_size)(int n_tok, int n_in) = nullptr;
  void (*pack)(const float* x, int n_tok, int n_in, int tile0, int tile1, uint32_t* xt) = nullptr;
  void (*matmul_many_packed)(const uint32_t* xt, const float* x, int n_tok, int n_in, const MatmulOut* outs,
                             int count) = nullptr;

  // The prompts' GEMM for int8/int4 weights (W.dtype Q8, Q4 or Q4K) with int16 activations: for
  // int8 what matmul_q8 computes, the float sums in another order; for int4 what matmul_q4/q4k
  // compute on the activations requantized to int8 first (gemm_q_avx512.inl); the tokens in the
  // vector lanes (so a token's result still depends on nothing else in the batch). Where it is not
  // null, the forward pass sends prompts into quantized weights here rather than to matmul, which
  // widens the weights.
  void (*gemm_q)(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                 int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate) = nullptr;
  bool takes_gemm_q(DType t) const { return gemm_q && (t == DType::Q8 || t == DType::Q4 || t == DType::Q4K); }

  // Slices of fewer tokens than this take the row-wise matmuls in a model of f32, bf16 or f16
  // weights (FLOAT_GEMM_MIN_TOKENS).
  int float_gemm_min_tokens = FLOAT_GEMM_MIN_TOKENS;
};

extern const Kernels kernels_generic;
// The scalar twin of the "avx512bf16" set: kernels_generic with the bf16 prompt kernels
// (activations, and int8/int4 weights, rounded to bf16; then f32 math). The tests' oracle.
extern const Kernels kernels_generic_bf16;
#if defined(GALLY_X86)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
// The "avx2vnni" and "avx512vnni" sets are kernels_avx2 and kernels_avx512 with these matmul_q8,
// matmul_q4 and matmul_q4k (Kernels' signatures): vpdpwssd, as AVX-VNNI (kernels_avx2vnni.cpp) and as
// AVX512-VNNI (kernels_avx512vnni.cpp).
namespace avx2vnni {
void matmul_q8(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
               int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
void matmul_q4(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
               const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
               bool accumulate);
void matmul_q4k(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
// Kernels::gemm_q with VEX vpdpwssd and vpdpbusd (gemm_q_avx2.inl; kernels_avx2 has one for int4
// weights with vpmaddubsw)
void gemm_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
            int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
}  // namespace avx2vnni
namespace avx512vnni {
void matmul_q8(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
               int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
void matmul_q4(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
               const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
               bool accumulate);
void matmul_q4k(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
// Kernels::gemm_q with vpdpwssd and vpdpbusd (gemm_q_avx512.inl)
void gemm_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
            int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
}  // namespace avx512vnni
// The "avx512bf16" set is "avx512bf16fma" (avx512vnni with attention_causal_bf16, isa.cpp) with
// this matmul: vdpbf16ps for bf16, int8 and int4 weights and batches of ≥ GEMM_MIN_TOKENS (weights
// and activations rounded to bf16; the forward pass sends int8/int4 prompts to gemm_q instead); all
// else goes to kernels_avx512.matmul.
void matmul_avx512bf16(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy,
                       int r0, int r1, bool accumulate);
void matmul_many_avx512bf16(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count);
// attention_causal for the prompts of bf16 and quantized models: vdpbf16ps for the scores and the
// weighted sum of the values (queries, keys, probabilities and values rounded to bf16, sums in f32); d a multiple
// of 32. scratch: attention_bf16_scratch_floats(ctx0 + nq − 1, d).
void attention_causal_bf16(const float* Q, int ldq, int nq, int ctx0, const KvHead& kv, int d, float scale,
                           float* scratch, float* out, int ldo, float* probs, long ldp);
long bf16_packed_size(int n_tok, int n_in);
void pack_bf16(const float* x, int n_tok, int n_in, int tile0, int tile1, uint32_t* xt);
void matmul_many_packed_bf16(const uint32_t* xt, const float* x, int n_tok, int n_in, const MatmulOut* outs, int count);
namespace avx512 {
// The AVX-512 attention's softmax down 16 lanes of scores st [n][16] (simd_kernels.inl, att::softmax_lanes);
// inv [16] receives each lane's 1 / Σ weights.
void softmax_lanes16(float* st, int n, int first, int lanes, float* probs, long ldp, float* inv);
}  // namespace avx512
#elif defined(GALLY_AARCH64)
extern const Kernels kernels_neon;
// The "neondot" set is kernels_neon with these matmul_q8, matmul_q4 and matmul_q4k: sdot (kernels_neondot.cpp).
namespace neondot {
void matmul_q8(const int16_t* xq, const float* xs, const int8_t* Wq, const uint16_t* Ws, const float* b, float* y,
               int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
void matmul_q4(const int16_t* xq, const float* xs, const float* xsum, const uint8_t* Wq, const uint16_t* Ws,
               const uint16_t* Wm, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
               bool accumulate);
void matmul_q4k(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
                int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
}  // namespace neondot
// The "neonbf16" set is "neondot" with this matmul and matmul_many: bfdot for bf16, int8 and int4
// weights and batches of ≥ GEMM_MIN_TOKENS (weights and activations rounded to bf16); all else goes
// to kernels_neon.matmul (kernels_neonbf16.cpp).
namespace neonbf16 {
void matmul(const float* x, const WeightsRef& W, const float* b, float* y, int n_tok, int n_in, int ldy, int r0, int r1,
            bool accumulate);
void matmul_many(const float* x, int n_tok, int n_in, const MatmulOut* outs, int count);
}  // namespace neonbf16
// The "neoni8mm" set is "neonbf16" with this gemm_q: smmla and usmmla (kernels_neoni8mm.cpp).
namespace neoni8mm {
void gemm_q(const int16_t* xq, const float* xs, const float* xsum, const WeightsRef& W, const float* b, float* y,
            int n_tok, int n_in, int ldy, int r0, int r1, bool accumulate);
}  // namespace neoni8mm
#endif

}  // namespace gally
