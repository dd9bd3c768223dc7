// Run-time choice of the kernel set: CPUID says what the processor implements, XGETBV (XCR0)
// whether the OS saves the wider registers. GALLY_ISA=generic|avx2|avx512|avx512bf16 forces one.
#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(GALLY_X86)
#include <cpuid.h>
#endif

namespace gally {
namespace {

struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512bf16 = false;
};

#if defined(GALLY_X86)
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return f;
  const uint64_t x = xcr0();
  const bool os_ymm = (x & 0x6) == 0x6;    // SSE + AVX state
  const bool os_zmm = (x & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = a & (1u << 5);
  return f;
}
#else
CpuFeatures detect() { return {}; }
#endif

const CpuFeatures& cpu() {
  static const CpuFeatures f = detect();
  return f;
}

#if defined(GALLY_X86)
Kernels with_bf16_dot() {
  Kernels k = kernels_avx512;
  k.name = "avx512bf16";
  k.matmul = matmul_avx512bf16;
  k.matmul_many = matmul_many_avx512bf16;
  k.attention_causal_bf16 = attention_causal_bf16;
  k.packed_size = bf16_packed_size;
  k.pack = pack_bf16;
  k.matmul_many_packed = matmul_many_packed_bf16;
  return k;
}
#endif

}  // namespace

const Kernels* kernels_for(const std::string& name) {
  if (name == "generic") return &kernels_generic;
#if defined(GALLY_X86)
  static const Kernels avx512bf16 = with_bf16_dot();
  if (name == "avx2" && cpu().avx2) return &kernels_avx2;
  if (name == "avx512" && cpu().avx512) return &kernels_avx512;
  if (name == "avx512bf16" && cpu().avx512bf16) return &avx512bf16;
#endif
  return nullptr;
}

namespace {

const Kernels* initial() {
  const char* env = std::getenv("GALLY_ISA");
  const std::string want = env && *env ? env : available_isas().back();
  const Kernels* k = kernels_for(want);
  if (!k) {
    std::string have;
    for (auto& s : available_isas()) have += (have.empty() ? "" : ", ") + s;
    throw std::invalid_argument("GALLY_ISA=" + want + " is not available on this CPU (available: " + have + ")");
  }
  return k;
}

// The kernel set in use. A forward pass reads it once, while another thread may select another
// set (tests do): an atomic pointer to a table that lives for the whole program.
std::atomic<const Kernels*>& selection() {
  static std::atomic<const Kernels*> s{initial()};
  return s;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> v = {"generic"};
  if (cpu().avx2) v.push_back("avx2");
  if (cpu().avx512) v.push_back("avx512");
  if (cpu().avx512bf16) v.push_back("avx512bf16");
  return v;
}

bool cpu_has_avx512bf16() { return cpu().avx512bf16; }

const Kernels& kernels() { return *selection().load(std::memory_order_acquire); }
std::string selected_isa() { return kernels().name; }

void select_isa(const std::string& name) {
  const Kernels* k = kernels_for(name);
  if (!k) throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU");
  selection().store(k, std::memory_order_release);
}

}  // namespace gally
