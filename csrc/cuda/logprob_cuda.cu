// CUDA kernels for torch.ops.pykernels.token_logprob_forward / token_logprob_backward.
//
// Contract: the op schemas in ../ops.cpp (shared with the CPU and Triton backends). The
// per-element math comes from ../pk_math.h (ScalarOps policy); row I/O and block reductions
// from row_io.cuh. One thread block per row r = b*T + t of the [B, T, V] logits view.
//
// Forward, one read of the row: per thread an online (max m, l = sum e, c = sum e (s - m))
// with e = exp(s - m), merged over the block; logp = (s_y - m) - log l, H = log l - c / l
// (pk_math.h LogNorm, entropy_from_sums).
// The token's logit is picked out of the same stream by the thread whose chunk holds it (an
// out-of-range token matches no element: logp = NaN, nothing is read for it).
// Backward, one pass: reads the row and the saved (m, log l, H), writes the gradient; the one-hot
// term of the token is added by the thread that owns that element, before rounding.
//
// Per-element exponentials are ex2.approx.ftz with log2(e) folded into the argument (FMUL +
// MUFU.EX2) rather than expf (~8 instructions with its range reduction): with expf the
// 16-bit forward would need more instruction issue than an H200 has at HBM speed. The rare
// rescales and the block merge keep expf.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// Not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE/cuBLAS headers, which a bare CUDA
// toolkit (nvcc only, libraries from pip wheels) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../ops_common.h"
#include "../pk_math.h"
#include "row_io.cuh"

namespace pykernels {
namespace cuda_logprob {
namespace {

using namespace cuda_rows;
using math::ScalarOps;

// Chunks in flight per thread and loop iteration: one input stream (the divergence kernels
// keep 2 chunks x 2 streams), so 4 keeps a similar number of loads outstanding.
constexpr int kUnroll = 4;

template <typename scalar_t>
struct LpArgs {
  const scalar_t* z;  // logits [B, T, V], stride(2) == 1
  int64_t T, st0, st1, V;
  const int64_t* tok64;  // exactly one of the two is set
  const int32_t* tok32;
};

// The row's token, or -1 when it is outside [0, V) (never used as an address then).
template <typename scalar_t>
__device__ __forceinline__ int64_t token_of(const LpArgs<scalar_t>& a, int64_t r) {
  const int64_t y = a.tok64 != nullptr ? a.tok64[r] : static_cast<int64_t>(a.tok32[r]);
  return (y >= 0 && y < a.V) ? y : -1;
}

constexpr float kLog2e = 1.4426950408889634f;

// 2^x with denormal results flushed to 0 (below 2^-126 of the row's largest term: nothing any
// sum or fp16/bf16 gradient here can see); exp2f would add three instructions per element to
// produce them. -inf gives 0, NaN stays NaN.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// e^a for an argument measured against the running max or a log-prob (a <= 0 up to rounding).
__device__ __forceinline__ float exp_nonpos(float a) { return ex2_ftz(a * kLog2e); }

// Online row statistics against the running max m.
struct EntStats {
  float m;  // running max of s
  float l;  // sum exp(s - m)
  float c;  // sum exp(s - m) (s - m) (entropy_cross_term: 0 where the exponential is 0)
};

__device__ __forceinline__ EntStats empty_ent_stats() { return EntStats{-INFINITY, 0.f, 0.f}; }

// One rescale per chunk (only when the max grows) and one exp per element. A NaN met while
// the max is still -inf is kept in l and c so it reaches logp and H.
template <int N>
__device__ __forceinline__ void ent_push_chunk(EntStats& st, const float (&x)[N]) {
  float cm = st.m;
#pragma unroll
  for (int i = 0; i < N; ++i) cm = ::fmaxf(cm, x[i]);  // skips NaN; m itself is never NaN
  if (cm == -INFINITY) {  // all -inf so far: they add exactly 0
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (x[i] != x[i]) st.l = st.c = x[i];
    return;
  }
  if (cm != st.m) {  // the max rarely grows after the first chunks: skip the rescale
    const float f = ::expf(st.m - cm);
    st.c = math::entropy_rebase<ScalarOps, float>(st.c, st.l, f, st.m, cm);
    st.l *= f;
    st.m = cm;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = x[i] - cm;
    const float e = exp_nonpos(d);
    st.l += e;
    st.c += math::entropy_cross_term<ScalarOps, float>(e, d);
  }
}

// Associative merge for the block reduction (same rescaling rules as ent_push_chunk).
__device__ __forceinline__ void ent_merge(EntStats& a, const EntStats& b) {
  const float ma = a.m, la = a.l;
  math::lse_merge(a.m, a.l, b.m, b.l);  // a.m is now the merged max
  if (a.m == -INFINITY) {
    a.c += b.c;  // both empty: 0 unless a NaN is being carried
  } else {
    a.c = math::entropy_rebase<ScalarOps, float>(a.c, la, ::expf(ma - a.m), ma, a.m) +
          math::entropy_rebase<ScalarOps, float>(b.c, b.l, ::expf(b.m - a.m), b.m, a.m);
  }
}

// ---------------------------------------------------------------------------------------
// Forward kernel: one block per row. entropy may be nullptr (not requested).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    logprob_fwd_kernel(const LpArgs<scalar_t> a, const float inv_t, float* __restrict__ logp,
                       float* __restrict__ entropy, float* __restrict__ stats) {
  using PackT = Pack<scalar_t, VEC>;
  __shared__ EntStats sh[kMaxThreads / kWarp];
  __shared__ float sh_sy;  // s_y, written by the thread that reads the token's element

  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const scalar_t* pz = row_ptr(a.z, r, a.T, a.st0, a.st1);
  const int64_t y = token_of(a, r);

  const RowSplit R = split_row<scalar_t, VEC>(pz, pz, a.V);
  const scalar_t* cz = pz + R.head;  // chunk c starts at cz + c * VEC
  EntStats st = empty_ent_stats();
  if (tid < R.nextra) {
    const int64_t i = extra_index<VEC>(R, tid);
    const float x[1] = {static_cast<float>(pz[i]) * inv_t};
    if (i == y) sh_sy = x[0];
    ent_push_chunk<1>(st, x);
  }
  auto push = [&](int64_t c, const PackT& pk) {
    float x[VEC];
    to_float<scalar_t, VEC>(pk, inv_t, x);
    const int64_t dy = y - (R.head + c * VEC);  // in [0, VEC) only in the token's chunk (rare)
    if (static_cast<uint64_t>(dy) < static_cast<uint64_t>(VEC)) {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (dy == i) sh_sy = x[i];
    }
    ent_push_chunk<VEC>(st, x);
  };
  int64_t c = tid;
  for (; c + (kUnroll - 1) * nt < R.nchunks; c += kUnroll * nt) {
    PackT p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      p[k] = load_chunk<scalar_t, VEC>(cz + (c + k * nt) * VEC, R.vec);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) push(c + k * nt, p[k]);
  }
  for (; c < R.nchunks; c += nt) push(c, load_chunk<scalar_t, VEC>(cz + c * VEC, R.vec));

  // block_reduce's barrier also publishes sh_sy to thread 0.
  st = block_reduce(st, sh, empty_ent_stats(),
                    [](EntStats& x, const EntStats& o) { ent_merge(x, o); });
  if (tid == 0) {
    const math::LogNorm norm = math::log_norm(st.m, st.l);
    const float H = math::entropy_from_sums(st.c, st.l);
    logp[r] = y >= 0 ? math::log_prob<ScalarOps>(sh_sy, norm) : NAN;
    if (entropy != nullptr) entropy[r] = H;
    math::store_logprob_stats(stats + r * math::kLogprobStatsWidth, norm, H);
  }
}

// ---------------------------------------------------------------------------------------
// Backward kernel: one block per row, one pass. grad_ent may be nullptr (no entropy term);
// out is the contiguous [N, V] gradient in the logits' dtype.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    logprob_bwd_kernel(const LpArgs<scalar_t> a, const float inv_t,
                       const float* __restrict__ grad_logp, const float* __restrict__ grad_ent,
                       const float* __restrict__ stats, scalar_t* __restrict__ out) {
  using PackT = Pack<scalar_t, VEC>;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int64_t V = a.V;

  const float g_lp = grad_logp[r];
  const float g_h = grad_ent != nullptr ? grad_ent[r] : 0.f;
  const float* st = stats + r * math::kLogprobStatsWidth;
  const math::LogNorm norm = math::logprob_stats_norm(st);
  const float H = st[math::kLogprobStatEntropy];
  const float onehot = g_lp * inv_t;
  const int64_t y = token_of(a, r);  // -1 matches no element: the one-hot term is skipped

  const scalar_t* pz = row_ptr(a.z, r, a.T, a.st0, a.st1);
  scalar_t* po = out + r * V;
  const RowSplit R = split_row<scalar_t, VEC>(pz, pz, V);
  const scalar_t* cz = pz + R.head;
  scalar_t* co = po + R.head;
  // The output row is contiguous and may sit at a different 16-byte phase than the
  // (strided) input row; then chunks are stored element by element.
  const bool vo = R.vec && reinterpret_cast<uintptr_t>(co) % kChunkBytes == 0;

  auto grad = [&](scalar_t raw) {
    const float lq = math::log_prob<ScalarOps>(static_cast<float>(raw) * inv_t, norm);
    const float q = exp_nonpos(lq);
    return math::logprob_entropy_grad<ScalarOps, float>(lq, q, g_lp, g_h, H) * inv_t;
  };

  if (tid < R.nextra) {
    const int64_t i = extra_index<VEC>(R, tid);
    float g = grad(pz[i]);
    if (i == y) g += onehot;
    po[i] = static_cast<scalar_t>(g);
  }

  auto do_chunk = [&](int64_t c, const PackT& in) {
    float g[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = grad(in.v[i]);
    const int64_t dy = y - (R.head + c * VEC);  // in [0, VEC) only in the token's chunk (rare)
    if (static_cast<uint64_t>(dy) < static_cast<uint64_t>(VEC)) {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (dy == i) g[i] += onehot;
    }
    PackT o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(g[i]);
    store_chunk<scalar_t, VEC>(co + c * VEC, o, vo);
  };

  int64_t c = tid;
  for (; c + (kUnroll - 1) * nt < R.nchunks; c += kUnroll * nt) {
    PackT p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      p[k] = load_chunk<scalar_t, VEC>(cz + (c + k * nt) * VEC, R.vec);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) do_chunk(c + k * nt, p[k]);
  }
  for (; c < R.nchunks; c += nt) do_chunk(c, load_chunk<scalar_t, VEC>(cz + c * VEC, R.vec));
}

// ---------------------------------------------------------------------------------------
// Host side.

template <typename scalar_t>
LpArgs<scalar_t> make_args(const at::Tensor& logits3d, const at::Tensor& tokens) {
  LpArgs<scalar_t> a;
  a.z = logits3d.const_data_ptr<scalar_t>();
  a.T = logits3d.size(1);
  a.st0 = logits3d.stride(0);
  a.st1 = logits3d.stride(1);
  a.V = logits3d.size(2);
  a.tok64 = tokens.scalar_type() == at::kLong ? tokens.const_data_ptr<int64_t>() : nullptr;
  a.tok32 = tokens.scalar_type() == at::kInt ? tokens.const_data_ptr<int32_t>() : nullptr;
  return a;
}

void check_inputs(const at::Tensor& logits3d, const at::Tensor& tokens) {
  check_logprob_inputs(logits3d, tokens, c10::DeviceType::CUDA);
  // One block per row on grid.x.
  TORCH_CHECK(logits3d.size(0) * logits3d.size(1) <= std::numeric_limits<int32_t>::max(),
              "pykernels token_logprob (cuda): too many rows (",
              logits3d.size(0) * logits3d.size(1), ")");
}

void check_row_floats(const at::Tensor& x, int64_t N, const at::Tensor& logits3d,
                      const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.numel() == N &&
                  x.is_contiguous() && x.device() == logits3d.device(),
              "pykernels token_logprob (cuda): ", name,
              " must be a contiguous float32 [N] tensor on the logits' device");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprob_forward_cuda(
    const at::Tensor& logits3d, const at::Tensor& tokens, double inv_temperature,
    bool with_entropy) {
  check_inputs(logits3d, tokens);
  const c10::cuda::CUDAGuard guard(logits3d.device());
  const int64_t N = logits3d.size(0) * logits3d.size(1);
  const auto fopts = logits3d.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, fopts);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, fopts);
  at::Tensor stats = at::empty({N, math::kLogprobStatsWidth}, fopts);
  if (N == 0) return {logp, entropy, stats};

  const float inv_t = static_cast<float>(inv_temperature);
  PK_DISPATCH_LOGIT_TYPES(logits3d.scalar_type(), "token_logprob_forward_cuda", [&] {
    constexpr int VEC = kChunkBytes / sizeof(scalar_t);
    const auto a = make_args<scalar_t>(logits3d, tokens);
    const int threads = pick_threads(a.V, VEC);
    logprob_fwd_kernel<scalar_t, VEC>
        <<<static_cast<unsigned int>(N), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            a, inv_t, logp.data_ptr<float>(),
            with_entropy ? entropy.data_ptr<float>() : nullptr, stats.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, entropy, stats};
}

at::Tensor token_logprob_backward_cuda(const at::Tensor& grad_logp,
                                       const at::Tensor& grad_entropy,
                                       const at::Tensor& logits3d, const at::Tensor& tokens,
                                       const at::Tensor& stats, double inv_temperature) {
  check_inputs(logits3d, tokens);
  const int64_t B = logits3d.size(0), T = logits3d.size(1), V = logits3d.size(2);
  const int64_t N = B * T;
  check_row_floats(grad_logp, N, logits3d, "grad_logp");
  const bool has_grad_entropy = grad_entropy.numel() != 0;
  if (has_grad_entropy) check_row_floats(grad_entropy, N, logits3d, "grad_entropy");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == N &&
                  stats.size(1) == math::kLogprobStatsWidth && stats.is_contiguous() &&
                  stats.device() == logits3d.device(),
              "pykernels token_logprob (cuda): stats must be a contiguous float32 [N, 3] tensor "
              "on the logits' device");
  const c10::cuda::CUDAGuard guard(logits3d.device());
  at::Tensor grad = at::empty({B, T, V}, logits3d.options());
  if (N == 0) return grad;

  const float inv_t = static_cast<float>(inv_temperature);
  PK_DISPATCH_LOGIT_TYPES(logits3d.scalar_type(), "token_logprob_backward_cuda", [&] {
    constexpr int VEC = kChunkBytes / sizeof(scalar_t);
    const auto a = make_args<scalar_t>(logits3d, tokens);
    const int threads = pick_threads(a.V, VEC);
    logprob_bwd_kernel<scalar_t, VEC>
        <<<static_cast<unsigned int>(N), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            a, inv_t, grad_logp.const_data_ptr<float>(),
            has_grad_entropy ? grad_entropy.const_data_ptr<float>() : nullptr,
            stats.const_data_ptr<float>(), grad.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace cuda_logprob
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  using namespace pykernels;
  m.impl("token_logprob_forward",
         &token_logprob_forward_nd<cuda_logprob::token_logprob_forward_cuda>);
  m.impl("token_logprob_backward",
         &token_logprob_backward_nd<cuda_logprob::token_logprob_backward_cuda>);
}
