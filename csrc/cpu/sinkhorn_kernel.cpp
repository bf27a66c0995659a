// Log-domain Sinkhorn iterations, one task per group, the group's G x G matrix in cache:
//   rows:    L_ij -= lse_j L_ij    (a masked row keeps its -inf, it is not shifted)
//   columns: L_ij -= lse_i L_ij    (likewise a masked column)
// Backward of one half-step L' = L - lse_d(L): dL = dL' - exp(L') * sum_d dL' (exp(L') is the
// softmax along d; 0 on masked entries, so no mask is needed). The torch twin of these loops
// is in pykernels/_torch_backend.py: the other backends run it.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "row_utils.h"
#include "sinkhorn_kernel.h"

namespace pykernels {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Each row of L [g, g] minus its logsumexp (rows flagged false in valid are left as they are).
PK_FLATTEN void normalize_rows(float* L, int64_t g, const bool* valid) {
  for (int64_t i = 0; i < g; ++i) {
    if (valid != nullptr && !valid[i]) continue;
    float* row = L + i * g;
    const float m = block_max(row, g);
    const Vec vm(m);
    Vec acc(0.f);
    float tail = 0.f;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) acc = acc + VecOps::exp(Vec::loadu(row + j) - vm);
    for (; j < g; ++j) tail += std::exp(row[j] - m);
    const float shift = math::lse_value(m, hsum(acc) + tail);
    const Vec vshift(shift);
    j = 0;
    for (; j + kLanes <= g; j += kLanes) (Vec::loadu(row + j) - vshift).store(row + j);
    for (; j < g; ++j) row[j] -= shift;
  }
}

// Each column of L minus its logsumexp, walking rows so that every access is contiguous.
// col_max / col_sum: scratch of g floats each.
PK_FLATTEN void normalize_columns(float* L, int64_t g, const bool* valid, float* col_max, float* col_sum) {
  std::memcpy(col_max, L, sizeof(float) * g);
  for (int64_t i = 1; i < g; ++i) {
    const float* row = L + i * g;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) {  // at::vec::maximum propagates NaN, as nan_max
      at::vec::maximum(Vec::loadu(col_max + j), Vec::loadu(row + j)).store(col_max + j);
    }
    for (; j < g; ++j) col_max[j] = nan_max(col_max[j], row[j]);
  }
  std::fill(col_sum, col_sum + g, 0.f);
  for (int64_t i = 0; i < g; ++i) {
    const float* row = L + i * g;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) {
      const Vec e = VecOps::exp(Vec::loadu(row + j) - Vec::loadu(col_max + j));
      (Vec::loadu(col_sum + j) + e).store(col_sum + j);
    }
    for (; j < g; ++j) col_sum[j] += std::exp(row[j] - col_max[j]);
  }
  for (int64_t j = 0; j < g; ++j) {  // the shift, in col_max
    col_max[j] = (valid != nullptr && !valid[j]) ? 0.f : math::lse_value(col_max[j], col_sum[j]);
  }
  for (int64_t i = 0; i < g; ++i) {
    float* row = L + i * g;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) (Vec::loadu(row + j) - Vec::loadu(col_max + j)).store(row + j);
    for (; j < g; ++j) row[j] -= col_max[j];
  }
}

// grad -= exp(step) * (row sums of grad)
PK_FLATTEN void rows_backward(float* grad, const float* step, int64_t g) {
  for (int64_t i = 0; i < g; ++i) {
    float* gr = grad + i * g;
    const float* sr = step + i * g;
    Vec acc(0.f);
    float tail = 0.f;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) acc = acc + Vec::loadu(gr + j);
    for (; j < g; ++j) tail += gr[j];
    const float s = hsum(acc) + tail;
    const Vec vs(s);
    j = 0;
    for (; j + kLanes <= g; j += kLanes) {
      (Vec::loadu(gr + j) - VecOps::exp(Vec::loadu(sr + j)) * vs).store(gr + j);
    }
    for (; j < g; ++j) gr[j] -= std::exp(sr[j]) * s;
  }
}

// grad -= exp(step) * (column sums of grad); col_sum: scratch of g floats
PK_FLATTEN void columns_backward(float* grad, const float* step, int64_t g, float* col_sum) {
  std::fill(col_sum, col_sum + g, 0.f);
  for (int64_t i = 0; i < g; ++i) {
    const float* gr = grad + i * g;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) (Vec::loadu(col_sum + j) + Vec::loadu(gr + j)).store(col_sum + j);
    for (; j < g; ++j) col_sum[j] += gr[j];
  }
  for (int64_t i = 0; i < g; ++i) {
    float* gr = grad + i * g;
    const float* sr = step + i * g;
    int64_t j = 0;
    for (; j + kLanes <= g; j += kLanes) {
      (Vec::loadu(gr + j) - VecOps::exp(Vec::loadu(sr + j)) * Vec::loadu(col_sum + j)).store(gr + j);
    }
    for (; j < g; ++j) gr[j] -= std::exp(sr[j]) * col_sum[j];
  }
}

void forward(const SinkhornForwardArgs& a) {
  const int64_t gg = a.g * a.g;
  at::parallel_for(0, a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * a.g);
    for (int64_t b = begin; b < end; ++b) {
      float* L = a.log_k + b * gg;
      const bool* valid = a.valid ? a.valid + b * a.g : nullptr;
      for (int64_t k = 0; k < 2 * a.n_iters; ++k) {
        if (k % 2 == 0) {
          normalize_rows(L, a.g, valid);
        } else {
          normalize_columns(L, a.g, valid, scratch.data(), scratch.data() + a.g);
        }
        if (a.steps) std::memcpy(a.steps + (k * a.groups + b) * gg, L, sizeof(float) * gg);
      }
    }
  });
}

void backward(const SinkhornBackwardArgs& a) {
  const int64_t gg = a.g * a.g;
  at::parallel_for(0, a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> col_sum(a.g);
    for (int64_t b = begin; b < end; ++b) {
      float* grad = a.grad + b * gg;
      for (int64_t k = 2 * a.n_iters - 1; k >= 0; --k) {
        const float* step = a.steps + (k * a.groups + b) * gg;
        if (k % 2 == 0) {
          rows_backward(grad, step, a.g);
        } else {
          columns_backward(grad, step, a.g, col_sum.data());
        }
      }
    }
  });
}

}  // namespace

void sinkhorn_iterations_forward_kernel(const SinkhornForwardArgs& args) { forward(args); }
void sinkhorn_iterations_backward_kernel(const SinkhornBackwardArgs& args) { backward(args); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
