// The int8/int4 decode kernels of quant_kernels.inl with AVX512-VNNI and AVX512-VL
// (EVEX-encoded, on 256-bit registers; Cascade Lake and later, Zen 4):
// vpdpwssd multiplies int16 pairs and adds them to int32 lanes in one instruction, where AVX2
// takes vpmaddwd then vpaddd; vpdpbusd does so for quads of bytes (int4 codes × their int8
// activations), where AVX2 takes vpmaddubsw, vpmaddwd and vpaddd. Compiled with those flags;
// isa.cpp puts these into the "avx512vnni" kernel set only where CPUID reports the flag.
// Measured on a Sapphire Rapids core, int8 weights in cache: 24 → 26 GB/s; SmolLM2 decode, bound
// by memory, unchanged. Also the prompts' GEMM into int8/int4 weights on the same activations (gemm_q_avx512.inl),
// where vpdpwssd's 32 products an instruction count most.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/common.h"
#include "kernels/kernels.h"
#include "kernels/transpose_avx512.h"

namespace gally {
namespace avx512vnni {

inline __m256i dot_pairs(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
inline __m512i dot_pairs16(__m512i acc, __m512i a, __m512i b) { return _mm512_dpwssd_epi32(acc, a, b); }
inline __m256i dot_quads(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
inline __m512i dot_quads16(__m512i acc, __m512i u, __m512i s) { return _mm512_dpbusd_epi32(acc, u, s); }

#define GALLY_QUANT_ROWS_AVX512
#include "kernels/quant_kernels.inl"

// after quant_kernels.inl, whose tile_scales and load_group32 it uses
#include "kernels/gemm_q_avx512.inl"

}  // namespace avx512vnni
}  // namespace gally
