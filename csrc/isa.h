// Which instruction sets this CPU offers, and which kernel set gally runs.
#pragma once
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace gally {

// Kernel sets this CPU can run, best last: "generic", then "avx2", "avx512", "avx512bf16"
// (AVX-512 with bf16 dot products for the prefill of bf16, int8 and int4 weights) where supported.
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
