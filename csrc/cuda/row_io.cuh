// Row-streaming machinery shared by the CUDA kernels (divergence_cuda.cu, logprob_cuda.cu):
// 16-byte chunked row access with a scalar fallback for misaligned rows, strided row
// addressing, block reductions and the launch helpers.
//
// Row layout: one thread block per row. Each thread owns 16-byte "chunks" (4 fp32 or 8
// fp16/bf16 values) at chunk index tid, tid + nthreads, ...; the few elements before the
// first 16-byte boundary (sliced tensors have misaligned rows) and after the last whole chunk
// are handled one per thread.
#pragma once

#include <ATen/Dispatch.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace pykernels {
namespace cuda_rows {

constexpr int kMaxThreads = 1024;
constexpr int kMinThreads = 64;
constexpr int kWarp = 32;
constexpr int kChunkBytes = 16;

// 16 bytes of logits, viewed either as one 128-bit word (for the load/store) or as values.
template <typename scalar_t, int VEC>
union alignas(16) Pack {
  uint4 u;
  scalar_t v[VEC];
};

struct RowSplit {
  int64_t head;     // elements before the first 16-byte boundary (scalar path)
  int64_t nchunks;  // whole VEC-element chunks after the head
  int nextra;       // head + tail elements, one per thread (< 2 * VEC <= blockDim)
  bool vec;         // chunks may use 128-bit loads
};

// 128-bit loads need the rows ps and pt at the same offset within 16 bytes (the chunk grid
// is shared by both); otherwise every chunk is loaded element by element. A single row
// passes itself twice.
template <typename scalar_t, int VEC>
__device__ __forceinline__ RowSplit split_row(const scalar_t* ps, const scalar_t* pt,
                                              int64_t V) {
  const auto as = reinterpret_cast<uintptr_t>(ps) % kChunkBytes;
  const auto at_ = reinterpret_cast<uintptr_t>(pt) % kChunkBytes;
  RowSplit R;
  R.vec = (as == at_) && (as % sizeof(scalar_t) == 0);
  int64_t head =
      R.vec ? static_cast<int64_t>(((kChunkBytes - as) % kChunkBytes) / sizeof(scalar_t)) : 0;
  if (head > V) head = V;
  R.head = head;
  R.nchunks = (V - head) / VEC;
  R.nextra = static_cast<int>(V - R.nchunks * VEC);
  return R;
}

// Element index of the e-th head/tail element.
template <int VEC>
__device__ __forceinline__ int64_t extra_index(const RowSplit& R, int e) {
  return e < R.head ? e : R.head + R.nchunks * VEC + (e - R.head);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_chunk(const scalar_t* p, bool vec) {
  Pack<scalar_t, VEC> pk;
  if (vec) {
    pk.u = *reinterpret_cast<const uint4*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = p[i];
  }
  return pk;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_chunk(scalar_t* p, const Pack<scalar_t, VEC>& pk, bool vec) {
  if (vec) {
    *reinterpret_cast<uint4*>(p) = pk.u;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = pk.v[i];
  }
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_ptr(const scalar_t* base, int64_t r, int64_t T,
                                                   int64_t st0, int64_t st1) {
  const int64_t b = r / T;
  const int64_t t = r - b * T;
  return base + b * st0 + t * st1;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void to_float(const Pack<scalar_t, VEC>& pk, float inv_t,
                                         float (&x)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = static_cast<float>(pk.v[i]) * inv_t;
}

// ---------------------------------------------------------------------------------------
// Reductions over any trivially copyable value made of 32-bit words (float, float3, small
// structs of floats), with an associative merge(T& acc, const T& other).

template <class T>
__device__ __forceinline__ T shfl_down_words(const T& v, int off) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) % 4 == 0,
                "shfl_down_words: T must be trivially copyable 32-bit words");
  constexpr int kWords = sizeof(T) / 4;
  unsigned w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_down_sync(0xffffffffu, w[i], off);
  T o;
  memcpy(&o, w, sizeof(T));
  return o;
}

// Tree over the warp; the result is valid in lane 0.
template <class T, class Merge>
__device__ __forceinline__ T warp_reduce(T v, Merge merge) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) merge(v, shfl_down_words(v, off));
  return v;
}

// Block-wide reduction (blockDim.x a multiple of 32, at most kMaxThreads); the result is
// valid in thread 0. sh: at least blockDim.x / 32 slots. Every thread must call it.
template <class T, class Merge>
__device__ __forceinline__ T block_reduce(T v, T* sh, const T& identity, Merge merge) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_reduce(v, merge);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? sh[lane] : identity;
    v = warp_reduce(v, merge);
  }
  return v;
}

// As block_reduce, but every thread gets thread 0's result (bit-identical across the block).
template <class T, class Merge>
__device__ __forceinline__ T block_allreduce(T v, T* sh, const T& identity, Merge merge) {
  v = block_reduce(v, sh, identity, merge);
  // Warp 0's reads of sh[] all precede its last shuffle, so lane 0 may overwrite sh[0].
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  return sh[0];
}

// ---------------------------------------------------------------------------------------
// Host side.

// Threads per row: about 4+ chunks per thread, 64..1024 (power of two).
inline int pick_threads(int64_t V, int vec) {
  const int64_t chunks = (V + vec - 1) / vec;
  const int64_t want = (chunks + 3) / 4;
  int t = kMinThreads;
  while (t < want && t < kMaxThreads) t *= 2;
  return t;
}

}  // namespace cuda_rows
}  // namespace pykernels

// float / half / bfloat16 only (AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate every
// kernel for double, which the contract excludes).
#define PK_DISPATCH_LOGIT_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
