// Softmax-cdist kernels of the CPU backend (cost matrix between softmax rows and its
// backward); compiled per instruction set like divergence_kernel.cpp (see setup.py).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "divergence_kernel.h"  // RowsView

namespace pykernels {
namespace cpu {

// Rows of a [Bt, G, V] view: row (b, i) starts at base + b*stride_b + i*stride_t.
struct CdistForwardArgs {
  c10::ScalarType dtype;
  int64_t Bt, Gs, Gt, V;
  RowsView student, teacher;
  const bool* row_valid;  // [Bt*G] (Gs == Gt) or nullptr: false rows have zero probabilities
  int64_t cost;           // math::CdistCost
  float inv_t;
  float* C;      // [Bt, Gs, Gt]
  float* A;      // [Bt, Gs, Gt]
  float* norm_s;  // [Bt*Gs, kNormWidth] ProbNorm; softmax_cdist_max_kernel writes (max, 1)
  float* norm_t;  // [Bt*Gt, kNormWidth]
};

struct CdistBackwardArgs {
  c10::ScalarType dtype;
  int64_t Bt, Gx, Gy, V;
  RowsView x, y;
  const bool* row_valid;
  int64_t cost;
  float inv_t;
  const float* weight;  // [Bt, Gx, Gy]
  const float* norm_x;  // [Bt*Gx, kNormWidth] ProbNorm
  const float* norm_y;  // [Bt*Gy, kNormWidth]
  const float* dot_x;   // [Bt*Gx]
  void* grad_x;         // [Bt, Gx, V] contiguous, x's dtype
};

// exp(z inv_t - m) / S of the rows of one side over the columns [v0, v0 + n): out[r, k] for
// every row r of the [Bt, G, V] view (zeros on masked rows), fp32, row stride n, with
// (m, 1 / S) the row's ProbNorm: the probabilities, or with 1 / S = 1 (as
// softmax_cdist_max_kernel leaves it) the forward's unnormalised terms (normalised afterwards,
// so the forward needs no exp pass for the sums). The squared distance on CPU is matrix
// products of such slabs (BLAS), one slab of columns at a time.
struct ProbSlabArgs {
  c10::ScalarType dtype;
  int64_t rows, G, V;
  RowsView x;
  const bool* row_valid;
  const float* norm;  // [rows, kNormWidth] ProbNorm
  float inv_t;
  int64_t v0, n;
  float* out;      // [rows, n]
  float* sq_norm;  // [rows] or nullptr: each row's sum of out^2 over the slab is added to it
  float* row_sum;  // [rows] or nullptr: each row's sum of out over the slab is added to it
};

// The squared distance's gradient over the columns [v0, v0 + n) of x's rows, written into
// grad: inv_t p (2 (p w_total - wy) - dot) with p the softmax of the row (recomputed from the
// logits, not read from a slab) and wy the slab of W @ Y; zeros on masked rows.
struct SqEuclideanGradArgs {
  c10::ScalarType dtype;
  int64_t rows, G, V;
  RowsView x;
  const bool* row_valid;
  const float* norm;     // [rows, kNormWidth] ProbNorm
  const float* w_total;  // [rows]: sum_j W_ij
  const float* dot;      // [rows]
  const float* wy;       // [rows, n]
  float inv_t;
  int64_t v0, n;
  void* grad;  // [rows, V] contiguous, x's dtype
};

#define PK_DECLARE_CDIST_KERNELS(ISA)                          \
  namespace ISA {                                              \
  void softmax_cdist_forward_kernel(const CdistForwardArgs&);  \
  void softmax_cdist_max_kernel(const CdistForwardArgs&);      \
  void softmax_cdist_backward_kernel(const CdistBackwardArgs&); \
  void prob_slab_kernel(const ProbSlabArgs&);                  \
  void sqeuclidean_grad_kernel(const SqEuclideanGradArgs&);    \
  }

PK_DECLARE_CDIST_KERNELS(DEFAULT)
#if defined(PYKERNELS_HAVE_AVX_KERNELS)
PK_DECLARE_CDIST_KERNELS(AVX2)
PK_DECLARE_CDIST_KERNELS(AVX512)
#endif

}  // namespace cpu
}  // namespace pykernels
