// Row kernels of the CPU backend, compiled once per instruction set (see setup.py): the
// same source built as DEFAULT, AVX2 and AVX512, each in a namespace named after it.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../pk_math.h"

namespace pykernels {
namespace cpu {

// A [B, T, V] view with unit vocabulary stride: row r = b*T + t starts at
// base + b*stride_b + t*stride_t (element offsets, 64-bit).
struct RowsView {
  const void* base;
  int64_t stride_b;
  int64_t stride_t;
};

struct DivForwardArgs {
  c10::ScalarType dtype;
  int64_t B, T, V;
  RowsView student, teacher;
  const bool* row_valid;  // nullptr: every row counts
  math::DivParams params;
  float inv_t;
  float* row_loss;      // [B*T]
  float* stats;         // [B*T, kStatsWidth]
  void* grad_student;   // fused forward: d row_loss[r] / d student, [B*T, V]; or nullptr
  void* grad_teacher;   // likewise for the teacher
  float row_weight;     // the fused gradients are those of row_weight * row_loss[r]
};

struct DivBackwardArgs {
  c10::ScalarType dtype;
  int64_t B, T, V;
  RowsView student, teacher;
  const bool* row_valid;
  math::DivParams params;
  float inv_t;
  const float* grad_row;  // [B*T]
  const float* stats;     // [B*T, kStatsWidth]
  void* grad_student;     // [B*T, V] contiguous, or nullptr when not wanted
  void* grad_teacher;
};

#define PK_DECLARE_CPU_KERNELS(ISA)                               \
  namespace ISA {                                                 \
  void divergence_forward_kernel(const DivForwardArgs& args);     \
  void divergence_backward_kernel(const DivBackwardArgs& args);   \
  int64_t parallel_threads_probe();                               \
  }

PK_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(PYKERNELS_HAVE_AVX_KERNELS)
PK_DECLARE_CPU_KERNELS(AVX2)
PK_DECLARE_CPU_KERNELS(AVX512)
#endif

}  // namespace cpu
}  // namespace pykernels
