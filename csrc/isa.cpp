// Run-time choice of the kernel set. On x86-64, CPUID says what the processor implements and
// XGETBV (XCR0) whether the OS saves the wider registers; on aarch64, the kernel's hardware
// capabilities (getauxval on Linux) or sysctl (macOS). GALLY_ISA=<set> forces one.
#include "isa.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(GALLY_X86)
#include <cpuid.h>
#elif defined(GALLY_AARCH64) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(GALLY_AARCH64) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace gally {
namespace {

#if defined(GALLY_X86)
const std::vector<std::string> FLAG_NAMES = {"os_ymm",      "os_zmm",      "avx2",     "fma",      "f16c",
                                             "avx512f",     "avx512dq",    "avx512bw", "avx512vl", "avx_vnni",
                                             "avx512_vnni", "avx512_bf16", "intel"};

uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

CpuFlags detect() {
  CpuFlags f;
  for (const auto& name : FLAG_NAMES) f[name] = false;
  unsigned a, b, c, d;
  if (__get_cpuid(0, &a, &b, &c, &d)) {  // the vendor string, in EBX, EDX, ECX: "GenuineIntel"
    char vendor[13] = {};
    std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
    f["intel"] = std::string(vendor) == "GenuineIntel";
  }
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f["fma"] = c & (1u << 12);
  f["f16c"] = c & (1u << 29);
  if (c & (1u << 27)) {  // OSXSAVE: XGETBV may be executed
    const uint64_t x = xcr0();
    f["os_ymm"] = (x & 0x6) == 0x6;    // SSE + AVX state
    f["os_zmm"] = (x & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  }
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f["avx2"] = b & (1u << 5);
  f["avx512f"] = b & (1u << 16);
  f["avx512dq"] = b & (1u << 17);
  f["avx512bw"] = b & (1u << 30);
  f["avx512vl"] = b & (1u << 31);
  f["avx512_vnni"] = c & (1u << 11);
  const unsigned max_subleaf = a;
  if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) {
    f["avx_vnni"] = a & (1u << 4);
    f["avx512_bf16"] = a & (1u << 5);
  }
  return f;
}
#elif defined(GALLY_AARCH64)
const std::vector<std::string> FLAG_NAMES = {"asimd", "asimddp", "bf16", "i8mm"};

#if defined(__linux__)
CpuFlags detect() {
  const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
  // Linux's arch/arm64 hwcap bits: HWCAP_ASIMD 1 << 1, HWCAP_ASIMDDP 1 << 20, HWCAP2_I8MM 1 << 13,
  // HWCAP2_BF16 1 << 14
  return {{"asimd", ((hw >> 1) & 1) != 0},
          {"asimddp", ((hw >> 20) & 1) != 0},
          {"bf16", ((hw2 >> 14) & 1) != 0},
          {"i8mm", ((hw2 >> 13) & 1) != 0}};
}
#elif defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int value = 0;
  size_t size = sizeof(value);
  return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
}

CpuFlags detect() {
  return {{"asimd", true},  // every Apple arm64 CPU
          {"asimddp", sysctl_flag("hw.optional.arm.FEAT_DotProd")},
          {"bf16", sysctl_flag("hw.optional.arm.FEAT_BF16")},
          {"i8mm", sysctl_flag("hw.optional.arm.FEAT_I8MM")}};
}
#else
CpuFlags detect() { return {{"asimd", true}, {"asimddp", false}, {"bf16", false}, {"i8mm", false}}; }
#endif
#else
const std::vector<std::string> FLAG_NAMES = {};
CpuFlags detect() { return {}; }
#endif

const CpuFlags& cpu() {
  static const CpuFlags f = detect();
  return f;
}

// A kernel set that is `base` with other kernels for the int8/int4 decode.
[[maybe_unused]] Kernels with_quant(const Kernels& base, const char* name, decltype(Kernels::matmul_q8) q8,
                                    decltype(Kernels::matmul_q4) q4, decltype(Kernels::matmul_q4k) q4k) {
  Kernels k = base;
  k.name = name;
  k.matmul_q8 = q8;
  k.matmul_q4 = q4;
  k.matmul_q4k = q4k;
  return k;
}

#if defined(GALLY_X86)
const Kernels& avx2vnni() {
  static const Kernels k = [] {
    Kernels k = with_quant(kernels_avx2, "avx2vnni", avx2vnni::matmul_q8, avx2vnni::matmul_q4, avx2vnni::matmul_q4k);
    k.gemm_q = avx2vnni::gemm_q;
    return k;
  }();
  return k;
}

const Kernels& avx512vnni() {
  static const Kernels k = [] {
    Kernels k =
        with_quant(kernels_avx512, "avx512vnni", avx512vnni::matmul_q8, avx512vnni::matmul_q4, avx512vnni::matmul_q4k);
    k.gemm_q = avx512vnni::gemm_q;
    return k;
  }();
  return k;
}

const Kernels& avx512bf16fma() {
  static const Kernels k = [] {
    Kernels k = avx512vnni();
    k.name = "avx512bf16fma";
    k.attention_causal_bf16 = attention_causal_bf16;
    return k;
  }();
  return k;
}
const Kernels& avx512bf16() {
  static const Kernels k = [] {
    Kernels k = avx512bf16fma();
    k.name = "avx512bf16";
    k.matmul = matmul_avx512bf16;
    k.matmul_many = matmul_many_avx512bf16;
    k.packed_size = bf16_packed_size;
    k.pack = pack_bf16;
    k.matmul_many_packed = matmul_many_packed_bf16;
    return k;
  }();
  return k;
}
#elif defined(GALLY_AARCH64)
const Kernels& neondot() {
  static const Kernels k =
      with_quant(kernels_neon, "neondot", neondot::matmul_q8, neondot::matmul_q4, neondot::matmul_q4k);
  return k;
}

const Kernels& neonbf16() {
  static const Kernels k = [] {
    Kernels k = neondot();
    k.name = "neonbf16";
    k.matmul = neonbf16::matmul;
    k.matmul_many = neonbf16::matmul_many;
    return k;
  }();
  return k;
}

const Kernels& neoni8mm() {
  static const Kernels k = [] {
    Kernels k = neonbf16();
    k.name = "neoni8mm";
    k.gemm_q = neoni8mm::gemm_q;
    return k;
  }();
  return k;
}
#endif

// The table of a set by name (null for an unknown name), whether or not this CPU can run it.
const Kernels* table(const std::string& name) {
  if (name == "generic") return &kernels_generic;
#if defined(GALLY_X86)
  if (name == "avx2") return &kernels_avx2;
  if (name == "avx2vnni") return &avx2vnni();
  if (name == "avx512") return &kernels_avx512;
  if (name == "avx512vnni") return &avx512vnni();
  if (name == "avx512bf16fma") return &avx512bf16fma();
  if (name == "avx512bf16") return &avx512bf16();
#elif defined(GALLY_AARCH64)
  if (name == "neon") return &kernels_neon;
  if (name == "neondot") return &neondot();
  if (name == "neonbf16") return &neonbf16();
  if (name == "neoni8mm") return &neoni8mm();
#endif
  return nullptr;
}

}  // namespace

CpuFlags cpu_flags() { return cpu(); }

std::vector<std::string> kernel_sets_for(const CpuFlags& flags) {
  for (const auto& [name, on] : flags)
    if (std::find(FLAG_NAMES.begin(), FLAG_NAMES.end(), name) == FLAG_NAMES.end()) {
      std::string known;
      for (const auto& n : FLAG_NAMES) known += (known.empty() ? "" : ", ") + n;
      throw std::invalid_argument("unknown CPU flag '" + name + "' (known here: " + known + ")");
    }
  [[maybe_unused]] auto has = [&](const char* name) {
    const auto it = flags.find(name);
    return it != flags.end() && it->second;
  };
  std::vector<std::string> sets = {"generic"};
#if defined(GALLY_X86)
  const bool avx2 = has("os_ymm") && has("avx2") && has("fma") && has("f16c");
  const bool avx512 = avx2 && has("os_zmm") && has("avx512f") && has("avx512dq") && has("avx512bw") && has("avx512vl");
  const bool avx512vnni = avx512 && has("avx512_vnni");
  if (avx2) sets.push_back("avx2");
  if (avx2 && has("avx_vnni")) sets.push_back("avx2vnni");
  if (avx512) sets.push_back("avx512");
  if (avx512vnni) sets.push_back("avx512vnni");
  // Every CPU with AVX512-BF16 has AVX512-VNNI too; both bf16 sets take its decode kernels. Intel's
  // cores issue vdpbf16ps at a quarter of the FMA's rate (Sapphire Rapids: 1.7 G against 6.8 G a
  // second), so that a bf16 prompt's GEMM is faster through FMAs there (avx512bf16fma, best on
  // Intel); AMD's Zen 4 and 5 keep vdpbf16ps (avx512bf16).
  if (avx512vnni && has("avx512_bf16")) {
    if (has("intel")) sets.insert(sets.end(), {"avx512bf16", "avx512bf16fma"});
    else sets.insert(sets.end(), {"avx512bf16fma", "avx512bf16"});
  }
#elif defined(GALLY_AARCH64)
  const bool neon = has("asimd"), dot = neon && has("asimddp");
  if (neon) sets.push_back("neon");
  if (dot) sets.push_back("neondot");
  if (dot && has("bf16")) sets.push_back("neonbf16");  // every CPU with bf16 has dotprod too
  // Armv8.6 makes I8MM and BF16 mandatory together: every CPU known with one has the other
  if (dot && has("bf16") && has("i8mm")) sets.push_back("neoni8mm");
#endif
  return sets;
}

std::vector<std::string> available_isas() {
  static const std::vector<std::string> sets = kernel_sets_for(cpu());
  return sets;
}

bool cpu_has_avx512bf16() {
  const auto sets = available_isas();
  return std::find(sets.begin(), sets.end(), "avx512bf16") != sets.end();
}

const Kernels* kernels_for(const std::string& name) {
  const auto sets = available_isas();
  return std::find(sets.begin(), sets.end(), name) != sets.end() ? table(name) : nullptr;
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

const Kernels& kernels() { return *selection().load(std::memory_order_acquire); }
std::string selected_isa() { return kernels().name; }

void select_isa(const std::string& name) {
  const Kernels* k = kernels_for(name);
  if (!k) throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU");
  selection().store(k, std::memory_order_release);
}

}  // namespace gally
