// CUDA kernels for torch.ops.pykernels.softmax_cdist_forward / softmax_cdist_backward.
//
// Contract: the op schemas in ../ops.cpp (shared with the CPU and Triton backends); the cost
// per element (phi, phi') comes from ../pk_math.h. Inputs are [Bt, G, V] views, vocab stride 1.
// A portable kernel (any sm_80+ GPU, plain FP32 FMA; the Triton backend is the one that puts
// the squared distance on tensor cores):
//
//  1. normalisers: one block per row, strided online max / sum-exp, merged over the block,
//     kept as (m, 1 / S) (pk_math.h ProbNorm, kNormWidth floats per row).
//  2. forward: one block per (batch, 32 x 32 tile of (i, j) pairs), 16 x 16 threads each with
//     2 x 2 pairs. Per 32-wide vocabulary step the tile's 32 + 32 rows of probabilities are
//     computed once into shared memory (exps: 1/16 of the pair work), then every thread
//     accumulates phi(q - p) and q phi'(q - p) for its pairs.
//  3. backward (one side): one block per (batch, 32 rows of x, 64 columns); each thread owns
//     one column of 8 rows in registers and walks the other side's rows 32 at a time through
//     shared memory (probabilities and weights), accumulating sum_j W_ij phi'(x - y).
// Offsets are 64-bit throughout.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../ops_common.h"
#include "../pk_math.h"
#include "row_io.cuh"

namespace pykernels {
namespace cuda_cdist {
namespace {

using math::ScalarOps;

template <typename scalar_t>
struct Rows {
  const scalar_t* base;
  int64_t stride_b, stride_g, G;
  __device__ __forceinline__ const scalar_t* row(int64_t b, int64_t i) const {
    return base + b * stride_b + i * stride_g;
  }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& x) {
  return {x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.size(1)};
}

__device__ __forceinline__ bool row_ok(const bool* valid, int64_t r) { return valid == nullptr || valid[r]; }

// ---------------------------------------------------------------------------- normalisers
struct LseAcc {
  float m, s;
};

constexpr int kNormThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads) norm_kernel(Rows<scalar_t> x, int64_t V, float inv_t,
                                                           const bool* valid, float* norm) {
  __shared__ LseAcc sh[kNormThreads / cuda_rows::kWarp];
  const int64_t r = blockIdx.x;
  const int64_t b = r / x.G;
  const scalar_t* row = x.row(b, r - b * x.G);
  LseAcc acc{-INFINITY, 0.f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    math::lse_push(acc.m, acc.s, static_cast<float>(row[v]) * inv_t);
  }
  acc = cuda_rows::block_reduce(acc, sh, LseAcc{-INFINITY, 0.f}, [](LseAcc& a, const LseAcc& o) {
    math::lse_merge(a.m, a.s, o.m, o.s);
  });
  if (threadIdx.x == 0) {
    math::store_norm(norm, r, row_ok(valid, r) ? math::prob_norm(acc.m, acc.s) : math::masked_row_norm());
  }
}

// Probability of element v of row i (b fixed), 0 outside the rows / vocabulary and on masked rows.
template <typename scalar_t>
__device__ __forceinline__ float prob_at(const Rows<scalar_t>& x, int64_t b, int64_t i, int64_t v,
                                         int64_t V, float inv_t, const float* norm,
                                         const bool* valid) {
  if (i >= x.G || v >= V) return 0.f;
  const int64_t r = b * x.G + i;
  if (!row_ok(valid, r)) return 0.f;
  return math::softmax_prob<ScalarOps>(static_cast<float>(x.row(b, i)[v]) * inv_t,
                                       math::load_norm(norm, r));
}

// ---------------------------------------------------------------------------------- forward
constexpr int kTile = 32;   // rows per side of a pair tile
constexpr int kVStep = 32;  // vocabulary elements per shared-memory step

template <typename scalar_t, int64_t Cost>
__global__ void __launch_bounds__(256) cdist_fwd_kernel(Rows<scalar_t> s, Rows<scalar_t> t, int64_t V,
                                                        float inv_t, const bool* valid,
                                                        const float* norm_s, const float* norm_t,
                                                        int64_t tiles_i, int64_t tiles_j, float* C,
                                                        float* A) {
  __shared__ float qs[kTile][kVStep + 1];
  __shared__ float ps[kTile][kVStep + 1];
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / (tiles_i * tiles_j);
  const int64_t rem = blk - b * tiles_i * tiles_j;
  const int64_t i0 = (rem / tiles_j) * kTile, j0 = (rem % tiles_j) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float c[2][2] = {{0.f, 0.f}, {0.f, 0.f}}, a[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  for (int64_t v0 = 0; v0 < V; v0 += kVStep) {
    for (int e = threadIdx.x; e < kTile * kVStep; e += blockDim.x) {
      const int row = e / kVStep, col = e % kVStep;
      qs[row][col] = prob_at(s, b, i0 + row, v0 + col, V, inv_t, norm_s, valid);
      ps[row][col] = prob_at(t, b, j0 + row, v0 + col, V, inv_t, norm_t, valid);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kVStep; ++k) {
      const float q[2] = {qs[ty][k], qs[ty + 16][k]};
      const float p[2] = {ps[tx][k], ps[tx + 16][k]};
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
          const float d = q[u] - p[w];
          c[u][w] += math::cost_value<Cost, ScalarOps, float>(d);
          a[u][w] += math::cost_slope_times<Cost, ScalarOps, float>(d, q[u]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const int64_t i = i0 + ty + 16 * u, j = j0 + tx + 16 * w;
      if (i < s.G && j < t.G) {
        const int64_t o = (b * s.G + i) * t.G + j;
        C[o] = c[u][w];
        A[o] = a[u][w];
      }
    }
  }
}

// ---------------------------------------------------------------------------------- backward
constexpr int kBwdRows = 32;  // rows of x per block
constexpr int kBwdCols = 64;  // vocabulary columns per block
constexpr int kRowsPerThread = kBwdRows / (256 / kBwdCols);  // 8

template <typename scalar_t, int64_t Cost>
__global__ void __launch_bounds__(256) cdist_bwd_kernel(Rows<scalar_t> x, Rows<scalar_t> y, int64_t V,
                                                        float inv_t, const bool* valid,
                                                        const float* norm_x, const float* norm_y,
                                                        const float* weight, const float* dot_x,
                                                        int64_t tiles_i, int64_t tiles_v,
                                                        scalar_t* grad) {
  __shared__ float ys[kTile][kBwdCols];
  __shared__ float ws[kBwdRows][kTile + 1];
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / (tiles_i * tiles_v);
  const int64_t rem = blk - b * tiles_i * tiles_v;
  const int64_t i0 = (rem / tiles_v) * kBwdRows, v0 = (rem % tiles_v) * kBwdCols;
  const int col = threadIdx.x % kBwdCols, row0 = threadIdx.x / kBwdCols;  // rows row0 + 4k
  const int64_t v = v0 + col;
  float xv[kRowsPerThread], g[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    xv[k] = prob_at(x, b, i0 + row0 + 4 * k, v, V, inv_t, norm_x, valid);
    g[k] = 0.f;
  }
  for (int64_t j0 = 0; j0 < y.G; j0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kBwdCols; e += blockDim.x) {
      const int row = e / kBwdCols, c = e % kBwdCols;
      ys[row][c] = prob_at(y, b, j0 + row, v0 + c, V, inv_t, norm_y, valid);
    }
    for (int e = threadIdx.x; e < kBwdRows * kTile; e += blockDim.x) {
      const int row = e / kTile, c = e % kTile;
      const int64_t i = i0 + row, j = j0 + c;
      ws[row][c] = (i < x.G && j < y.G) ? weight[(b * x.G + i) * y.G + j] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < kTile; ++jj) {
      const float yv = ys[jj][col];
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        g[k] += math::cost_slope_times<Cost, ScalarOps, float>(xv[k] - yv, ws[row0 + 4 * k][jj]);
      }
    }
    __syncthreads();
  }
  if (v >= V) return;
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t i = i0 + row0 + 4 * k;
    if (i >= x.G) continue;
    const int64_t r = b * x.G + i;
    const float dz = row_ok(valid, r) ? inv_t * xv[k] * (g[k] - dot_x[r]) : 0.f;
    grad[r * V + v] = static_cast<scalar_t>(dz);
  }
}

const bool* valid_ptr(const std::optional<at::Tensor>& row_valid) {
  return row_valid ? row_valid->const_data_ptr<bool>() : nullptr;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// grid.x for n blocks: at most 2^31 - 1, where a wrapped count would leave outputs unwritten.
unsigned int grid_blocks(int64_t n, const char* what) {
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "pykernels softmax_cdist (cuda): ", what,
              " needs ", n, " blocks, more than a grid holds");
  return static_cast<unsigned int>(n);
}

template <typename scalar_t>
void launch_norm(const at::Tensor& x, float inv_t, const bool* valid, at::Tensor& norm) {
  const int64_t rows = x.size(0) * x.size(1);
  if (rows == 0) return;
  norm_kernel<scalar_t><<<grid_blocks(rows, "the rows' normalisers"), kNormThreads, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(rows_of<scalar_t>(x), x.size(2), inv_t,
                                                               valid, norm.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cdist_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, int64_t cost, double inv_temperature) {
  check_cdist_pair(student, teacher, row_valid, cost, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t Bt = student.size(0), Gs = student.size(1), Gt = teacher.size(1), V = student.size(2);
  at::Tensor C, A, norm_s, norm_t;  // named, not structured bindings: the launch lambda captures them
  std::tie(C, A, norm_s, norm_t) = cdist_outputs(student, teacher);
  const float inv_t = static_cast<float>(inv_temperature);
  const bool* valid = valid_ptr(row_valid);
  PK_DISPATCH_LOGIT_TYPES(student.scalar_type(), "softmax_cdist_forward_cuda", [&] {
    launch_norm<scalar_t>(student, inv_t, valid, norm_s);
    launch_norm<scalar_t>(teacher, inv_t, valid, norm_t);
    if (C.numel() == 0) return;
    const int64_t ti = ceil_div(Gs, kTile), tj = ceil_div(Gt, kTile);
    const auto blocks = grid_blocks(Bt * ti * tj, "the cost matrix");
    auto kernel = cost == math::kCostL1 ? cdist_fwd_kernel<scalar_t, math::kCostL1>
                                        : cdist_fwd_kernel<scalar_t, math::kCostSqEuclidean>;
    kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(student), rows_of<scalar_t>(teacher), V, inv_t, valid,
        norm_s.const_data_ptr<float>(), norm_t.const_data_ptr<float>(), ti, tj,
        C.data_ptr<float>(), A.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {C, A, norm_s, norm_t};
}

at::Tensor softmax_cdist_backward_cuda(const at::Tensor& weight, const at::Tensor& x,
                                       const at::Tensor& y, const at::Tensor& norm_x,
                                       const at::Tensor& norm_y, const at::Tensor& dot_x,
                                       const std::optional<at::Tensor>& row_valid, int64_t cost,
                                       double inv_temperature) {
  check_cdist_backward(weight, x, y, norm_x, norm_y, dot_x, row_valid, cost, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t Bt = x.size(0), Gx = x.size(1), V = x.size(2);
  at::Tensor grad = at::empty({Bt, Gx, V}, x.options());
  if (grad.numel() == 0) return grad;
  const float inv_t = static_cast<float>(inv_temperature);
  PK_DISPATCH_LOGIT_TYPES(x.scalar_type(), "softmax_cdist_backward_cuda", [&] {
    const int64_t ti = ceil_div(Gx, kBwdRows), tv = ceil_div(V, kBwdCols);
    const auto blocks = grid_blocks(Bt * ti * tv, "the gradient");
    auto kernel = cost == math::kCostL1 ? cdist_bwd_kernel<scalar_t, math::kCostL1>
                                        : cdist_bwd_kernel<scalar_t, math::kCostSqEuclidean>;
    kernel<<<blocks, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows_of<scalar_t>(x), rows_of<scalar_t>(y), V, inv_t, valid_ptr(row_valid),
        norm_x.const_data_ptr<float>(), norm_y.const_data_ptr<float>(),
        weight.const_data_ptr<float>(), dot_x.const_data_ptr<float>(), ti, tv,
        grad.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace cuda_cdist
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("softmax_cdist_forward", &pykernels::cuda_cdist::softmax_cdist_forward_cuda);
  m.impl("softmax_cdist_backward", &pykernels::cuda_cdist::softmax_cdist_backward_cuda);
}
