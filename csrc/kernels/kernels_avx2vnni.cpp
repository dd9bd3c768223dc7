// The int8/int4 decode kernels of quant_kernels.inl with AVX-VNNI (VEX-encoded; Alder Lake
// and later, Zen 5):
// vpdpwssd multiplies int16 pairs and adds them to int32 lanes in one instruction, where AVX2
// takes vpmaddwd then vpaddd; vpdpbusd does so for quads of bytes (int4 codes × their int8
// activations), where AVX2 takes vpmaddubsw, vpmaddwd and vpaddd. Compiled with those flags;
// isa.cpp puts these into the "avx2vnni" kernel set only where CPUID reports the flag.
// Measured on a Sapphire Rapids core, int8 weights in cache: 24 → 26 GB/s; SmolLM2 decode, bound
// by memory, unchanged. Also the prompts' GEMM into int8/int4 weights on the same activations (gemm_q_avx2.inl).
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"

namespace gally {
namespace avx2vnni {

inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
inline __m256i dot_quads(__m256i acc, __m256i a, __m256i b) { return _mm256_dpbusd_avx_epi32(acc, a, b); }
constexpr bool QGEMM_VNNI = true;  // gemm_q_avx2.inl: vpdpwssd and vpdpbusd

#include "kernels/quant_kernels.inl"

// after quant_kernels.inl, whose load_q8, q4k_row_scales, requant_group and byte_sums it uses
#include "kernels/gemm_q_avx2.inl"

}  // namespace avx2vnni
}  // namespace gally
