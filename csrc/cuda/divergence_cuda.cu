// CUDA kernels for torch.ops.pykernels.divergence_forward / divergence_backward.
//
// Contract: the op schemas in ../ops.cpp and pykernels/_registry.py (shared with the CPU and
// Triton backends). All per-element and
// per-row math comes from ../pk_math.h (ScalarOps policy); this file only organises the
// memory traffic and the reductions (chunked row I/O and block reductions: row_io.cuh).
//
// Layout: one thread block per row r = b*T + t (row pointer = base + b*stride0 + t*stride1,
// 64-bit offsets). Each thread owns 16-byte "chunks" (4 fp32 or 8 fp16/bf16 values) at
// chunk index tid, tid + nthreads, ...; the few elements before the first 16-byte boundary
// (sliced tensors have misaligned rows) and after the last whole chunk are handled one per
// thread.
//
// Forward: pass 1 = online max / sum-exp of s and t (+ the forward-KL cross sum, so forward
// KL finishes here), block reduction, then (other kinds) pass 2 re-reads the row and sums
// div_accumulate's three accumulators. Pass 2 does not go back to HBM for the whole row:
//   * the first chunks of the row are kept in dynamic shared memory during pass 1 (the
//     whole row when it fits: V <= ~55k for 16-bit inputs on sm_90), and
//   * the rest is walked in reverse order, so the most recently read bytes (still in L2)
//     are consumed first.
// Backward: one pass per row reading s, t and the saved row stats, writing the gradient(s).
//
// Possible sm_90 variant (not implemented): split a row over a thread block cluster of 8
// CTAs (16 with the non-portable cluster size), each keeping its V/cluster slice of both rows in shared memory (128k bf16
// x 2 rows / 8 CTAs = 64 KB), exchange the (m, s, cross) partials and then the three
// accumulators through distributed shared memory (cluster.map_shared_rank + cluster.sync),
// so every row is read from HBM exactly once for any V; TMA bulk loads would additionally
// free the registers used for staging. It needs a cluster launch (cudaLaunchKernelEx with
// cudaLaunchAttributeClusterDimension) and keeps this kernel as the sm_80 fallback.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// Not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE/cuBLAS headers, which a bare CUDA
// toolkit (nvcc only, libraries from pip wheels) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "../ops_common.h"
#include "../pk_math.h"
#include "row_io.cuh"

namespace pykernels {
namespace cuda_div {
namespace {

using math::DivParams;
using math::ScalarOps;

using namespace cuda_rows;

template <typename scalar_t>
struct RowArgs {
  const scalar_t* s;  // student [B, T, V], stride(2) == 1
  const scalar_t* t;  // teacher, same shape
  int64_t T;
  int64_t s_st0, s_st1, t_st0, t_st1;
  int64_t V;
  const bool* row_valid;  // [B*T] or nullptr (all rows valid)
};

// ---------------------------------------------------------------------------------------
// Pass-1 statistics.

struct RowStats {
  float mq, sq;  // student running max / scaled sum-exp
  float mt, st;  // teacher running max / scaled sum-exp
  float cross;   // forward KL only: c of fkl_cross_term against (mt, fkl_student_ref(mq))
};

__device__ __forceinline__ RowStats empty_stats() {
  return RowStats{-INFINITY, 0.f, -INFINITY, 0.f, 0.f};
}

// Online log-sum-exp over a chunk: one rescale per chunk and one exp per element instead
// of lse_push's two exps per element (the exp unit, not HBM, would otherwise bound 16-bit
// inputs). Same value as N lse_push calls up to rounding; like lse_push it keeps a NaN met
// while the running max is still -inf, so NaN logits always reach the normaliser and the loss.
template <int N>
__device__ __forceinline__ void lse_push_chunk(float& m, float& s, const float (&x)[N]) {
  float cm = m;
#pragma unroll
  for (int i = 0; i < N; ++i) cm = x[i] > cm ? x[i] : cm;
  if (cm == -INFINITY) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (x[i] != x[i]) s = x[i];
    return;
  }
  s *= ::expf(m - cm);
#pragma unroll
  for (int i = 0; i < N; ++i) s += ::expf(x[i] - cm);
  m = cm;
}

// Forward KL's pass 1 over a chunk: both sum-exps plus the cross sum c (fkl_cross_term),
// which shares the teacher's exponentials and max and is measured from both sides' maxima, so
// a move of either rebases it (fkl_cross_shift). While every teacher entry so far is -inf,
// p = 0 and c stays 0 whatever the student's reference does.
template <int N>
__device__ __forceinline__ void fkl_stats_push_chunk(RowStats& st, const float (&sv)[N],
                                                     const float (&t)[N]) {
  const float rs_old = math::fkl_student_ref(st.mq);
  lse_push_chunk<N>(st.mq, st.sq, sv);
  const float rs = math::fkl_student_ref(st.mq);
  float cm = st.mt;
#pragma unroll
  for (int i = 0; i < N; ++i) cm = t[i] > cm ? t[i] : cm;
  if (cm == -INFINITY) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (t[i] != t[i]) st.st = t[i];
    return;
  }
  float f;
  const float shift = math::fkl_cross_shift(st.mt, cm, rs_old, rs, f);
  st.cross = math::fkl_cross_rebase<ScalarOps, float>(st.cross, st.st, shift, f);
  st.st *= f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float e = ::expf(t[i] - cm);
    st.st += e;
    st.cross += math::fkl_cross_term<ScalarOps, float>(e, t[i] - cm, sv[i] - rs);
  }
  st.mt = cm;
}

template <int KIND, int N>
__device__ __forceinline__ void stats_push(RowStats& st, const float (&sv)[N], const float (&tv)[N]) {
  if constexpr (KIND == math::kForwardKL) {
    fkl_stats_push_chunk<N>(st, sv, tv);
  } else {
    lse_push_chunk<N>(st.mq, st.sq, sv);
    lse_push_chunk<N>(st.mt, st.st, tv);
  }
}

template <int KIND>
__device__ __forceinline__ void stats_merge(RowStats& a, const RowStats& b) {
  const RowStats a_old = a;
  math::lse_merge(a.mq, a.sq, b.mq, b.sq);
  math::lse_merge(a.mt, a.st, b.mt, b.st);  // a holds the merged maxima now
  if constexpr (KIND == math::kForwardKL) {
    const float rs = math::fkl_student_ref(a.mq);
    float fa, fb;
    const float shift_a =
        math::fkl_cross_shift(a_old.mt, a.mt, math::fkl_student_ref(a_old.mq), rs, fa);
    const float shift_b = math::fkl_cross_shift(b.mt, a.mt, math::fkl_student_ref(b.mq), rs, fb);
    a.cross = math::fkl_cross_rebase<ScalarOps, float>(a_old.cross, a_old.st, shift_a, fa) +
              math::fkl_cross_rebase<ScalarOps, float>(b.cross, b.st, shift_b, fb);
  }
}

// Block-wide merge; every thread gets the same (thread 0's) result, so all threads use
// bit-identical normalisers in pass 2.
template <int KIND>
__device__ __forceinline__ RowStats block_merge_stats(RowStats v, RowStats* sh) {
  return block_allreduce(v, sh, empty_stats(),
                         [](RowStats& a, const RowStats& b) { stats_merge<KIND>(a, b); });
}

// Sum of three floats over the block; the result is valid in thread 0.
__device__ __forceinline__ void block_sum3(float& a0, float& a1, float& a2, float3* sh) {
  const float3 v = block_reduce(make_float3(a0, a1, a2), sh, make_float3(0.f, 0.f, 0.f),
                                [](float3& x, const float3& y) {
                                  x.x += y.x;
                                  x.y += y.y;
                                  x.z += y.z;
                                });
  a0 = v.x;
  a1 = v.y;
  a2 = v.z;
}

template <int KIND, typename scalar_t, int VEC>
__device__ __forceinline__ void stats_chunk(RowStats& st, const Pack<scalar_t, VEC>& ps,
                                            const Pack<scalar_t, VEC>& pt, float inv_t) {
  float sv[VEC], tv[VEC];
  to_float<scalar_t, VEC>(ps, inv_t, sv);
  to_float<scalar_t, VEC>(pt, inv_t, tv);
  stats_push<KIND, VEC>(st, sv, tv);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void accumulate_chunk(const DivParams& P, const Pack<scalar_t, VEC>& ps,
                                                 const Pack<scalar_t, VEC>& pt, float inv_t,
                                                 math::LogNorm nq, math::LogNorm np,
                                                 float (&acc)[3]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float lq = math::log_prob<ScalarOps>(static_cast<float>(ps.v[i]) * inv_t, nq);
    const float lp = math::log_prob<ScalarOps>(static_cast<float>(pt.v[i]) * inv_t, np);
    math::div_accumulate<ScalarOps, float>(P, lq, lp, ::expf(lq), ::expf(lp), acc[0], acc[1], acc[2]);
  }
}

// ---------------------------------------------------------------------------------------
// Forward kernel: one block per row.
//
// cache_chunks: how many leading chunks of each row (student and teacher) pass 1 parks in
// dynamic shared memory for pass 2 (0 for forward KL, which has no pass 2). Dynamic shared
// memory = cache_chunks * 2 * 16 bytes.
template <typename scalar_t, int VEC, int KIND>
__global__ void __launch_bounds__(kMaxThreads)
    divergence_fwd_kernel(const RowArgs<scalar_t> a, DivParams P, const float inv_t,
                          const int64_t cache_chunks, float* __restrict__ row_loss,
                          float* __restrict__ stats) {
  using PackT = Pack<scalar_t, VEC>;
  P.kind = KIND;  // compile-time kind: folds the switches in pk_math.h out of the loops
  __shared__ RowStats sh_stats[kMaxThreads / kWarp];
  __shared__ float3 sh_sums[kMaxThreads / kWarp];
  extern __shared__ uint4 row_cache[];

  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  float* st_out = stats + r * math::kStatsWidth;

  if (a.row_valid != nullptr && !a.row_valid[r]) {
    if (tid == 0) {
      row_loss[r] = 0.f;
#pragma unroll
      for (int k = 0; k < math::kStatsWidth; ++k) st_out[k] = 0.f;
    }
    return;  // whole block leaves before any barrier
  }

  const scalar_t* ps = row_ptr(a.s, r, a.T, a.s_st0, a.s_st1);
  const scalar_t* pt = row_ptr(a.t, r, a.T, a.t_st0, a.t_st1);
  const RowSplit R = split_row<scalar_t, VEC>(ps, pt, a.V);
  const scalar_t* cs = ps + R.head;  // chunk c starts at cs + c * VEC
  const scalar_t* ct = pt + R.head;
  const int64_t cc = cache_chunks < R.nchunks ? cache_chunks : R.nchunks;
  PackT* cache_s = reinterpret_cast<PackT*>(row_cache);
  PackT* cache_t = cache_s + cc;

  // ---- pass 1 ----
  RowStats st = empty_stats();
  if (tid < R.nextra) {
    const int64_t i = extra_index<VEC>(R, tid);
    const float sv[1] = {static_cast<float>(ps[i]) * inv_t};
    const float tv[1] = {static_cast<float>(pt[i]) * inv_t};
    stats_push<KIND, 1>(st, sv, tv);
  }
  {
    int64_t c = tid;
    // Two chunks per iteration: both loads are in flight before the exps.
    for (; c + nt < R.nchunks; c += 2 * nt) {
      const PackT s0 = load_chunk<scalar_t, VEC>(cs + c * VEC, R.vec);
      const PackT t0 = load_chunk<scalar_t, VEC>(ct + c * VEC, R.vec);
      const PackT s1 = load_chunk<scalar_t, VEC>(cs + (c + nt) * VEC, R.vec);
      const PackT t1 = load_chunk<scalar_t, VEC>(ct + (c + nt) * VEC, R.vec);
      if (c < cc) {
        cache_s[c] = s0;
        cache_t[c] = t0;
      }
      if (c + nt < cc) {
        cache_s[c + nt] = s1;
        cache_t[c + nt] = t1;
      }
      stats_chunk<KIND, scalar_t, VEC>(st, s0, t0, inv_t);
      stats_chunk<KIND, scalar_t, VEC>(st, s1, t1, inv_t);
    }
    if (c < R.nchunks) {
      const PackT s0 = load_chunk<scalar_t, VEC>(cs + c * VEC, R.vec);
      const PackT t0 = load_chunk<scalar_t, VEC>(ct + c * VEC, R.vec);
      if (c < cc) {
        cache_s[c] = s0;
        cache_t[c] = t0;
      }
      stats_chunk<KIND, scalar_t, VEC>(st, s0, t0, inv_t);
    }
  }
  st = block_merge_stats<KIND>(st, sh_stats);
  const math::LogNorm nq = math::log_norm(st.mq, st.sq);
  const math::LogNorm np = math::log_norm(st.mt, st.st);

  if constexpr (KIND == math::kForwardKL) {
    if (tid == 0) {
      float loss, r0, r1;
      const float kl = math::fkl_from_cross(st.cross, st.st, st.sq);
      math::div_finalize(P, kl, 0.f, 0.f, loss, r0, r1);
      row_loss[r] = loss;
      math::store_div_stats(st_out, nq, np, r0, r1);
    }
    return;
  } else {
    // ---- pass 2 ----
    // Each thread re-reads only its own chunks (and its own cache slots), so pass 1's
    // cache writes need no extra barrier (block_merge_stats already has two).
    float acc[3] = {0.f, 0.f, 0.f};
    if (tid < R.nextra) {
      const int64_t i = extra_index<VEC>(R, tid);
      const float lq = math::log_prob<ScalarOps>(static_cast<float>(ps[i]) * inv_t, nq);
      const float lp = math::log_prob<ScalarOps>(static_cast<float>(pt[i]) * inv_t, np);
      math::div_accumulate<ScalarOps, float>(P, lq, lp, ::expf(lq), ::expf(lp), acc[0], acc[1], acc[2]);
    }
    // Reverse order: the end of the row was read last in pass 1 and is the part most
    // likely still in L2; the cached head of the row comes last. One chunk per iteration
    // (most of these loads hit shared memory or L2, and two chunks would spill registers
    // in the exp-heavy kinds under the 64-register cap of 1024-thread blocks).
    if (tid < R.nchunks) {
      for (int64_t c = tid + (R.nchunks - 1 - tid) / nt * nt; c >= 0; c -= nt) {
        PackT s0, t0;
        if (c < cc) {
          s0 = cache_s[c];
          t0 = cache_t[c];
        } else {
          s0 = load_chunk<scalar_t, VEC>(cs + c * VEC, R.vec);
          t0 = load_chunk<scalar_t, VEC>(ct + c * VEC, R.vec);
        }
        accumulate_chunk<scalar_t, VEC>(P, s0, t0, inv_t, nq, np, acc);
      }
    }
    block_sum3(acc[0], acc[1], acc[2], sh_sums);
    if (tid == 0) {
      float loss, r0, r1;
      math::div_finalize(P, acc[0], acc[1], acc[2], loss, r0, r1);
      row_loss[r] = loss;
      math::store_div_stats(st_out, nq, np, r0, r1);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward kernel: one block per row, one pass.
//
// gs_out / gt_out: contiguous [N, V] gradients in the input dtype, or nullptr when that side
// is not requested.
template <typename scalar_t, int VEC, int KIND>
__global__ void __launch_bounds__(kMaxThreads)
    divergence_bwd_kernel(const RowArgs<scalar_t> a, DivParams P, const float inv_t,
                          const float* __restrict__ grad_row, const float* __restrict__ stats,
                          scalar_t* __restrict__ gs_out, scalar_t* __restrict__ gt_out) {
  using PackT = Pack<scalar_t, VEC>;
  P.kind = KIND;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int64_t V = a.V;
  scalar_t* gs = gs_out != nullptr ? gs_out + r * V : nullptr;
  scalar_t* gt = gt_out != nullptr ? gt_out + r * V : nullptr;

  if (a.row_valid != nullptr && !a.row_valid[r]) {
    // Masked rows get exact zeros; their logits (possibly garbage) are never read.
    const scalar_t zero = static_cast<scalar_t>(0.f);
    for (int64_t i = tid; i < V; i += nt) {
      if (gs != nullptr) gs[i] = zero;
      if (gt != nullptr) gt[i] = zero;
    }
    return;
  }

  const float grow = grad_row[r];
  const float* st = stats + r * math::kStatsWidth;
  const math::LogNorm nq = math::stats_norm_q(st);
  const math::LogNorm np = math::stats_norm_p(st);
  const float r0 = st[math::kStatR0];
  const float r1 = st[math::kStatR1];

  const scalar_t* ps = row_ptr(a.s, r, a.T, a.s_st0, a.s_st1);
  const scalar_t* pt = row_ptr(a.t, r, a.T, a.t_st0, a.t_st1);
  const RowSplit R = split_row<scalar_t, VEC>(ps, pt, V);
  const scalar_t* cs = ps + R.head;
  const scalar_t* ct = pt + R.head;
  // The output rows are contiguous and may sit at a different 16-byte phase than the
  // (strided) inputs; then the chunks are stored element by element.
  const bool vs = gs != nullptr && R.vec && reinterpret_cast<uintptr_t>(gs + R.head) % kChunkBytes == 0;
  const bool vt = gt != nullptr && R.vec && reinterpret_cast<uintptr_t>(gt + R.head) % kChunkBytes == 0;

  auto grad_elem = [&](scalar_t s_raw, scalar_t t_raw, scalar_t& os, scalar_t& ot) {
    const float lq = math::log_prob<ScalarOps>(static_cast<float>(s_raw) * inv_t, nq);
    const float lp = math::log_prob<ScalarOps>(static_cast<float>(t_raw) * inv_t, np);
    float gq, gp;
    math::div_grad<ScalarOps, float>(P, lq, lp, ::expf(lq), ::expf(lp), r0, r1, gq, gp);
    os = static_cast<scalar_t>(grow * gq * inv_t);
    ot = static_cast<scalar_t>(grow * gp * inv_t);
  };

  if (tid < R.nextra) {
    const int64_t i = extra_index<VEC>(R, tid);
    scalar_t os, ot;
    grad_elem(ps[i], pt[i], os, ot);
    if (gs != nullptr) gs[i] = os;
    if (gt != nullptr) gt[i] = ot;
  }

  auto do_chunk = [&](int64_t c, const PackT& s_in, const PackT& t_in) {
    PackT os, ot;
#pragma unroll
    for (int i = 0; i < VEC; ++i) grad_elem(s_in.v[i], t_in.v[i], os.v[i], ot.v[i]);
    if (gs != nullptr) store_chunk<scalar_t, VEC>(gs + R.head + c * VEC, os, vs);
    if (gt != nullptr) store_chunk<scalar_t, VEC>(gt + R.head + c * VEC, ot, vt);
  };

  int64_t c = tid;
  for (; c + nt < R.nchunks; c += 2 * nt) {
    const PackT s0 = load_chunk<scalar_t, VEC>(cs + c * VEC, R.vec);
    const PackT t0 = load_chunk<scalar_t, VEC>(ct + c * VEC, R.vec);
    const PackT s1 = load_chunk<scalar_t, VEC>(cs + (c + nt) * VEC, R.vec);
    const PackT t1 = load_chunk<scalar_t, VEC>(ct + (c + nt) * VEC, R.vec);
    do_chunk(c, s0, t0);
    do_chunk(c + nt, s1, t1);
  }
  if (c < R.nchunks) {
    const PackT s0 = load_chunk<scalar_t, VEC>(cs + c * VEC, R.vec);
    const PackT t0 = load_chunk<scalar_t, VEC>(ct + c * VEC, R.vec);
    do_chunk(c, s0, t0);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

// Opt-in shared memory per block of the current device (a driver attribute query, no sync).
// The dynamic shared memory a launch of Kernel may ask for on the current device: the opt-in
// limit less the kernel's static shared memory (the 48 KB default counts both, so a request
// just under 48 KB fails without the opt-in). The opt-in is set to this maximum once per
// device and never lowered, so threads launching with other sizes cannot race on it.
template <auto Kernel>
int64_t dynamic_smem_budget() {
  constexpr int kCachedDevices = 64;
  static std::array<std::atomic<int64_t>, kCachedDevices> cached{};  // 0: not set yet
  const int dev = c10::cuda::current_device();
  if (dev < kCachedDevices) {
    const int64_t b = cached[dev].load(std::memory_order_relaxed);
    if (b > 0) return b;
  }
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes fa{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, Kernel));
  const int64_t b = std::max<int64_t>(1, optin - static_cast<int64_t>(fa.sharedSizeBytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(b)));
  if (dev < kCachedDevices) cached[dev].store(b, std::memory_order_relaxed);
  return b;
}

// Set PYKERNELS_CUDA_DIV_SMEM_CACHE=0 to disable the pass-2 row cache (benchmark knob).
bool row_cache_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("PYKERNELS_CUDA_DIV_SMEM_CACHE");
    return env == nullptr || std::string(env) != "0";
  }();
  return enabled;
}

template <typename scalar_t>
RowArgs<scalar_t> make_row_args(const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& row_valid) {
  RowArgs<scalar_t> a;
  a.s = student.data_ptr<scalar_t>();
  a.t = teacher.data_ptr<scalar_t>();
  a.T = student.size(1);
  a.s_st0 = student.stride(0);
  a.s_st1 = student.stride(1);
  a.t_st0 = teacher.stride(0);
  a.t_st1 = teacher.stride(1);
  a.V = student.size(2);
  a.row_valid = row_valid.has_value() ? row_valid->data_ptr<bool>() : nullptr;
  return a;
}

template <int KIND, typename scalar_t>
void launch_forward(const RowArgs<scalar_t>& a, const DivParams& P, float inv_t, int64_t N,
                    float* row_loss, float* stats) {
  constexpr int VEC = kChunkBytes / sizeof(scalar_t);
  constexpr auto kernel = divergence_fwd_kernel<scalar_t, VEC, KIND>;
  const int threads = pick_threads(a.V, VEC);
  int64_t cache_chunks = 0;
  if (KIND != math::kForwardKL && row_cache_enabled()) {
    const int64_t budget = dynamic_smem_budget<kernel>();
    cache_chunks = std::max<int64_t>(0, std::min<int64_t>(a.V / VEC, budget / (2 * kChunkBytes)));
  }
  const size_t smem = static_cast<size_t>(cache_chunks) * 2 * kChunkBytes;
  kernel<<<static_cast<unsigned int>(N), threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      a, P, inv_t, cache_chunks, row_loss, stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int KIND, typename scalar_t>
void launch_backward(const RowArgs<scalar_t>& a, const DivParams& P, float inv_t, int64_t N,
                     const float* grad_row, const float* stats, scalar_t* gs, scalar_t* gt) {
  constexpr int VEC = kChunkBytes / sizeof(scalar_t);
  const int threads = pick_threads(a.V, VEC);
  divergence_bwd_kernel<scalar_t, VEC, KIND>
      <<<static_cast<unsigned int>(N), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          a, P, inv_t, grad_row, stats, gs, gt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runtime kind -> template argument.
template <class F>
void with_kind(int64_t kind, F&& f) {
  switch (kind) {
    case math::kForwardKL:
      f(std::integral_constant<int, math::kForwardKL>{});
      break;
    case math::kJSD:
      f(std::integral_constant<int, math::kJSD>{});
      break;
    case math::kSkewForwardKL:
      f(std::integral_constant<int, math::kSkewForwardKL>{});
      break;
    case math::kTVD:
      f(std::integral_constant<int, math::kTVD>{});
      break;
    case math::kHellinger:
      f(std::integral_constant<int, math::kHellinger>{});
      break;
    default:
      TORCH_CHECK(false, "pykernels divergence (cuda): unknown kernel kind ", kind);
  }
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& row_valid, int64_t kind) {
  check_divergence_inputs(student, teacher, row_valid, kind, c10::DeviceType::CUDA);
  // One block per row on grid.x.
  TORCH_CHECK(student.size(0) * student.size(1) <= std::numeric_limits<int32_t>::max(),
              "pykernels divergence (cuda): too many rows (", student.size(0) * student.size(1), ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> divergence_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, int64_t kind, double w, double inv_temperature) {
  check_inputs(student, teacher, row_valid, kind);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0) * student.size(1);
  const auto fopts = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({N}, fopts);
  at::Tensor stats = at::empty({N, math::kStatsWidth}, fopts);
  if (N == 0) return {row_loss, stats};

  const DivParams P = math::make_div_params(kind, w);
  const float inv_t = static_cast<float>(inv_temperature);
  PK_DISPATCH_LOGIT_TYPES(
      student.scalar_type(), "divergence_forward_cuda", [&] {
        const auto a = make_row_args<scalar_t>(student, teacher, row_valid);
        with_kind(kind, [&](auto k) {
          launch_forward<decltype(k)::value, scalar_t>(a, P, inv_t, N, row_loss.data_ptr<float>(),
                                                       stats.data_ptr<float>());
        });
      });
  return {row_loss, stats};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, const at::Tensor& stats, int64_t kind, double w,
    double inv_temperature, bool student_grad, bool teacher_grad) {
  check_inputs(student, teacher, row_valid, kind);
  const int64_t B = student.size(0), T = student.size(1), V = student.size(2);
  const int64_t N = B * T;
  check_backward_inputs(grad_row, stats, N);
  TORCH_CHECK(grad_row.device() == student.device() && stats.device() == student.device(),
              "pykernels divergence (cuda): grad_row / stats are on a different device");
  const c10::cuda::CUDAGuard guard(student.device());

  at::Tensor gs = student_grad ? at::empty({B, T, V}, student.options())
                               : at::empty({0}, student.options());
  at::Tensor gt = teacher_grad ? at::empty({B, T, V}, teacher.options())
                               : at::empty({0}, teacher.options());
  if (N == 0 || (!student_grad && !teacher_grad)) return {gs, gt};

  const DivParams P = math::make_div_params(kind, w);
  const float inv_t = static_cast<float>(inv_temperature);
  PK_DISPATCH_LOGIT_TYPES(
      student.scalar_type(), "divergence_backward_cuda", [&] {
        const auto a = make_row_args<scalar_t>(student, teacher, row_valid);
        scalar_t* gs_ptr = student_grad ? gs.data_ptr<scalar_t>() : nullptr;
        scalar_t* gt_ptr = teacher_grad ? gt.data_ptr<scalar_t>() : nullptr;
        with_kind(kind, [&](auto k) {
          launch_backward<decltype(k)::value, scalar_t>(a, P, inv_t, N, grad_row.data_ptr<float>(),
                                                        stats.data_ptr<float>(), gs_ptr, gt_ptr);
        });
      });
  return {gs, gt};
}

}  // namespace cuda_div
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  using namespace pykernels;
  m.impl("divergence_forward", &divergence_forward_nd<cuda_div::divergence_forward_cuda>);
  m.impl("divergence_backward", &divergence_backward_nd<cuda_div::divergence_backward_cuda>);
}
