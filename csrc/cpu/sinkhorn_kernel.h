// Log-domain Sinkhorn iterations on small G x G matrices (the CPU backend's sinkhorn_loss);
// compiled per instruction set like divergence_kernel.cpp (see setup.py).
#pragma once

#include <cstdint>

namespace pykernels {
namespace cpu {

struct SinkhornForwardArgs {
  int64_t groups, g, n_iters;
  const bool* valid;  // [groups, g] or nullptr (all valid): lines of masked rows / columns
  float* log_k;       // [groups, g, g]: -C / eps (-inf on masked pairs) in, the log plan out
  float* steps;       // [2 n_iters, groups, g, g] or nullptr: every half-step's result
};

struct SinkhornBackwardArgs {
  int64_t groups, g, n_iters;
  const float* steps;  // as saved by the forward
  float* grad;         // [groups, g, g]: d/d(log plan) in, d/d(log_k) out
};

#define PK_DECLARE_SINKHORN_KERNELS(ISA)                            \
  namespace ISA {                                                   \
  void sinkhorn_iterations_forward_kernel(const SinkhornForwardArgs&); \
  void sinkhorn_iterations_backward_kernel(const SinkhornBackwardArgs&); \
  }

PK_DECLARE_SINKHORN_KERNELS(DEFAULT)
#if defined(PYKERNELS_HAVE_AVX_KERNELS)
PK_DECLARE_SINKHORN_KERNELS(AVX2)
PK_DECLARE_SINKHORN_KERNELS(AVX512)
#endif

}  // namespace cpu
}  // namespace pykernels
