// Which instruction-set build of the CPU kernels this process runs: ATen's own detection,
// which also honours ATEN_CPU_CAPABILITY (the tests force each build through it).
#pragma once

#include <ATen/Version.h>

#include <string>

namespace pykernels {
namespace cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa runtime_isa() {
  static const Isa isa = [] {
#if defined(PYKERNELS_HAVE_AVX_KERNELS)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::kAvx512;
    if (cap == "AVX2") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

// The build of a kernel for this process: PK_ISA_PICK(divergence_forward_kernel).
#if defined(PYKERNELS_HAVE_AVX_KERNELS)
#define PK_ISA_PICK(fn)                                 \
  (::pykernels::cpu::runtime_isa() == ::pykernels::cpu::Isa::kAvx512 ? &AVX512::fn \
   : ::pykernels::cpu::runtime_isa() == ::pykernels::cpu::Isa::kAvx2 ? &AVX2::fn   \
                                                                       : &DEFAULT::fn)
#else
#define PK_ISA_PICK(fn) (&DEFAULT::fn)
#endif

}  // namespace cpu
}  // namespace pykernels
