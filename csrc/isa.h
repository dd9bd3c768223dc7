// Which instruction sets this CPU offers, and which kernel set gally runs.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace gally {

// The CPU features the kernel sets need, by name, as the CPU and OS report them: on x86-64
// "os_ymm", "os_zmm" (XGETBV: the OS saves the wider registers), "avx2", "fma", "f16c",
// "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx_vnni", "avx512_vnni", "avx512_bf16"
// (CPUID) and "intel" (the vendor, which orders the bf16 sets); on aarch64 "asimd", "asimddp",
// "bf16", "i8mm" (getauxval on Linux, sysctl on macOS).
using CpuFlags = std::map<std::string, bool>;
CpuFlags cpu_flags();

// The kernel sets a CPU with these flags can run, best last: "generic", then on x86-64 "avx2",
// "avx2vnni" (+ AVX-VNNI for the int8/int4 decode and prompts), "avx512", "avx512vnni" (+
// AVX512-VNNI), then with AVX512-BF16 "avx512bf16fma" (a prompt's attention in bf16) and
// "avx512bf16" (+ vdpbf16ps for the prompts of bf16 weights), in this order except on Intel; on
// aarch64 "neon", "neondot" (+ sdot for the int8/int4 decode), "neonbf16" (+ bfdot for the
// prefill), "neoni8mm" (+ smmla/usmmla for the int8/int4 prompts). A flag missing from `flags` counts as absent; an
// unknown name throws.
std::vector<std::string> kernel_sets_for(const CpuFlags& flags);

// kernel_sets_for(cpu_flags()).
std::vector<std::string> available_isas();

// True when the CPU (and OS) support AVX512-BF16 dot products.
bool cpu_has_avx512bf16();

// The kernel set of that name, or null when this CPU cannot run it.
const Kernels* kernels_for(const std::string& name);

// The kernels in use: the best available, or the one forced by GALLY_ISA (read once).
const Kernels& kernels();
std::string selected_isa();

// Switches the kernel set (for tests); throws std::invalid_argument if the CPU lacks it.
void select_isa(const std::string& name);

}  // namespace gally
