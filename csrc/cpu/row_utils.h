// Row-streaming helpers shared by the CPU kernels (divergence_kernel.cpp, logprob_kernel.cpp).
// Included inside each kernel file's CPU_CAPABILITY namespace build, so every instruction-set
// build gets its own copy (at::vec::Vectorized is ISA-specific).
#pragma once

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "../pk_math.h"
#include "divergence_kernel.h"

namespace pykernels {
namespace cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
using math::ScalarOps;

// at::vec policy for the generic formulas in pk_math.h. Comparisons yield lane masks.
struct VecOps {
  using V = Vec;
  // ATen's inlined polynomial exp (about 3 ulp on [-87, 88]; it returns 0 below about -87.3,
  // where exp is at most a few 1e-38 anyway) instead of Sleef's out-of-line call, which spilled
  // the loop's registers and was the largest cost of pass 1. It turns NaN into inf, so NaN
  // is passed through explicitly.
  static Vec exp(Vec x) { return Vec::blendv(x.exp_u20(), x, x != x); }
  static Vec log(Vec x) { return x.log(); }
  static Vec sqrt(Vec x) { return x.sqrt(); }
  static Vec abs(Vec x) { return x.abs(); }
  static Vec gt(Vec a, Vec b) { return a > b; }
  static Vec lt(Vec a, Vec b) { return a < b; }
  static Vec eq(Vec a, Vec b) { return a == b; }
  static Vec select(Vec m, Vec a, Vec b) { return Vec::blendv(b, a, m); }
  static Vec keep(Vec m, Vec x) { return x & m; }  // m is an all-ones / all-zeros lane mask
  static Vec splat(float x) { return Vec(x); }
};

constexpr int64_t kLanes = Vec::size();

// Hot loops are flattened: GCC otherwise keeps at::vec's exp_u20 and the pk_math.h element
// functions out of line in some of them, and the calls spill every vector register.
#if defined(__GNUC__)
#define PK_FLATTEN __attribute__((flatten))
#else
#define PK_FLATTEN
#endif

inline float hsum(Vec v) {
  float lanes[kLanes];
  v.store(lanes);
  float acc = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) acc += lanes[i];
  return acc;
}

// Max that propagates NaN (a NaN logit must make the row NaN, as in eager).
inline float nan_max(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }

inline float hmax(Vec v) {
  float lanes[kLanes];
  v.store(lanes);
  float acc = -INFINITY;
  for (int64_t i = 0; i < kLanes; ++i) acc = nan_max(acc, lanes[i]);
  return acc;
}

// Rows are streamed in blocks: two fp32 blocks of kBlock elements (16 KB) stay in L1 while
// they are reduced and exponentiated, so each pass reads the input once.
constexpr int64_t kBlock = 2048;

// Converts n <= kBlock logits to fp32 scaled by 1/T (temperature applied once per element).
template <typename scalar_t>
void load_block(const scalar_t* src, int64_t n, float scale, float* dst) {
  const Vec vscale(scale);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + kLanes <= n; i += kLanes) (Vec::loadu(src + i) * vscale).store(dst + i);
  } else {
    using RVec = at::vec::Vectorized<scalar_t>;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + i));
      (lo * vscale).store(dst + i);
      (hi * vscale).store(dst + i + kLanes);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

// The fp32 values of a block: the input itself when it is fp32 and T = 1 (no copy at all),
// else converted and scaled into `buf`.
template <typename scalar_t>
const float* block_values(const scalar_t* src, int64_t n, float inv_t, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (inv_t == 1.f) return src;
  }
  load_block(src, n, inv_t, buf);
  return buf;
}

inline float block_max(const float* x, int64_t n) {
  Vec vmax(-INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
  float m = hmax(vmax);
  for (; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

template <typename scalar_t>
const scalar_t* row_ptr(const RowsView& view, int64_t T, int64_t r) {
  const int64_t b = r / T, t = r - b * T;
  return static_cast<const scalar_t*>(view.base) + b * view.stride_b + t * view.stride_t;
}

// Rows per task: enough that a task holds ~64k elements, at least one row.
inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

inline int64_t num_blocks(int64_t V) { return (V + kBlock - 1) / kBlock; }

// Pulls the next block of both rows towards the core while the current one is computed:
// the block loop alternates bursts of loads with long runs of exps, which leaves the
// hardware prefetchers idle (the first-touch loads were 2/3 of pass 1's time without it).
template <typename scalar_t>
struct Prefetcher {
  const scalar_t* s;
  const scalar_t* t;
  int64_t start, V;
  void operator()(int64_t i) const {
    // One call per kLanes elements: 64 bytes of fp32, 32 of 16-bit types (every other line
    // prefetched twice, which is harmless).
    const int64_t j = start + i;
    if (j < V) {
      __builtin_prefetch(s + j);
      __builtin_prefetch(t + j);
    }
  }
};

template <typename scalar_t>
void store_block(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Runs Fn<scalar_t>::run(args) for the logits dtype of args.
template <template <typename> class Fn, typename Args>
void dispatch_dtype(const Args& args) {
  switch (args.dtype) {
    case c10::ScalarType::Float:
      return Fn<float>::run(args);
    case c10::ScalarType::Half:
      return Fn<c10::Half>::run(args);
    case c10::ScalarType::BFloat16:
      return Fn<c10::BFloat16>::run(args);
    default:
      TORCH_CHECK(false, "pykernels cpu kernel: unsupported dtype ", args.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
