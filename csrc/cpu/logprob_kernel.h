// Token log-prob + entropy row kernels of the CPU backend; compiled per instruction set like
// divergence_kernel.cpp (see setup.py).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "divergence_kernel.h"  // RowsView

namespace pykernels {
namespace cpu {

struct LogprobForwardArgs {
  c10::ScalarType dtype;
  int64_t B, T, V;
  RowsView logits;
  const int64_t* tokens64;  // exactly one of the two token pointers is set
  const int32_t* tokens32;
  float inv_t;
  float* logp;     // [B*T]
  float* entropy;  // [B*T] or nullptr
  float* stats;    // [B*T, kLogprobStatsWidth] = (max, log sum, entropy)
};

struct LogprobBackwardArgs {
  c10::ScalarType dtype;
  int64_t B, T, V;
  RowsView logits;
  const int64_t* tokens64;
  const int32_t* tokens32;
  float inv_t;
  const float* grad_logp;     // [B*T]
  const float* grad_entropy;  // [B*T] or nullptr
  const float* stats;
  void* grad_logits;  // [B*T, V] contiguous
};

#define PK_DECLARE_LOGPROB_KERNELS(ISA)                           \
  namespace ISA {                                                 \
  void token_logprob_forward_kernel(const LogprobForwardArgs&);   \
  void token_logprob_backward_kernel(const LogprobBackwardArgs&); \
  }

PK_DECLARE_LOGPROB_KERNELS(DEFAULT)
#if defined(PYKERNELS_HAVE_AVX_KERNELS)
PK_DECLARE_LOGPROB_KERNELS(AVX2)
PK_DECLARE_LOGPROB_KERNELS(AVX512)
#endif

}  // namespace cpu
}  // namespace pykernels
