// CPU row kernels for the divergence ops. This file is compiled three times (setup.py):
// as part of the extension's ordinary sources (CPU_CAPABILITY = DEFAULT, at::vec's scalar
// fallback) and with -mavx2 / -mavx512* plus CPU_CAPABILITY_AVX2 / _AVX512, which turns
// at::vec::Vectorized<float> into real SIMD. divergence_cpu.cpp picks one at run time.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "divergence_kernel.h"

namespace pykernels {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
using math::ScalarOps;

// at::vec policy for the generic formulas in pk_math.h. Comparisons yield lane masks.
struct VecOps {
  using V = Vec;
  static Vec exp(Vec x) { return x.exp(); }
  static Vec log(Vec x) { return x.log(); }
  static Vec sqrt(Vec x) { return x.sqrt(); }
  static Vec abs(Vec x) { return x.abs(); }
  static Vec gt(Vec a, Vec b) { return a > b; }
  static Vec lt(Vec a, Vec b) { return a < b; }
  static Vec eq(Vec a, Vec b) { return a == b; }
  static Vec select(Vec m, Vec a, Vec b) { return Vec::blendv(b, a, m); }
  static Vec splat(float x) { return Vec(x); }
};

constexpr int64_t kLanes = Vec::size();

float hsum(Vec v) {
  float lanes[kLanes];
  v.store(lanes);
  float acc = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) acc += lanes[i];
  return acc;
}

// Max that propagates NaN (a NaN logit must make the row NaN, as in eager).
float nan_max(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }

float hmax(Vec v) {
  float lanes[kLanes];
  v.store(lanes);
  float acc = -INFINITY;
  for (int64_t i = 0; i < kLanes; ++i) acc = nan_max(acc, lanes[i]);
  return acc;
}

// Copies one row into an fp32 scratch row scaled by 1/T: every later pass then reads fp32
// from cache instead of re-converting, and the temperature is applied once.
template <typename scalar_t>
void load_scaled(const scalar_t* src, float* dst, int64_t n, float scale) {
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

template <typename scalar_t>
void store_row(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename scalar_t>
const scalar_t* row_ptr(const RowsView& view, int64_t T, int64_t r) {
  const int64_t b = r / T, t = r - b * T;
  return static_cast<const scalar_t*>(view.base) + b * view.stride_b + t * view.stride_t;
}

// Rows per task: enough that a task holds ~64k elements, at least one row.
int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

// log-sum-exp of s and t over a row, plus the forward-KL cross sum when asked. With
// es/et given, the shifted exponentials are kept there so that pass 2 needs no exp.
struct RowLse {
  float lse_q, lse_p, sum_q, sum_p, cross;
};

RowLse row_lse(const float* s, const float* t, int64_t V, bool want_cross, float* es, float* et) {
  Vec vmax_s(-INFINITY), vmax_t(-INFINITY);
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    vmax_s = at::vec::maximum(vmax_s, Vec::loadu(s + i));
    vmax_t = at::vec::maximum(vmax_t, Vec::loadu(t + i));
  }
  float max_s = hmax(vmax_s), max_t = hmax(vmax_t);
  for (int64_t j = i; j < V; ++j) {
    max_s = nan_max(max_s, s[j]);
    max_t = nan_max(max_t, t[j]);
  }
  // A row that is all -inf has max -inf: x - max is then NaN, and so is the lse, as in eager.
  const Vec vms(max_s), vmt(max_t);
  Vec acc_s(0.f), acc_t(0.f), acc_x(0.f);
  i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    const Vec vs = Vec::loadu(s + i), vt = Vec::loadu(t + i);
    const Vec e_s = (vs - vms).exp(), e_t = (vt - vmt).exp();
    acc_s = acc_s + e_s;
    acc_t = acc_t + e_t;
    if (want_cross) acc_x = acc_x + math::fkl_cross_term<VecOps, Vec>(e_t, vt, vs);
    if (es) {
      e_s.store(es + i);
      e_t.store(et + i);
    }
  }
  float sum_s = hsum(acc_s), sum_t = hsum(acc_t), cross = hsum(acc_x);
  for (int64_t j = i; j < V; ++j) {
    const float e_s = ::expf(s[j] - max_s), e_t = ::expf(t[j] - max_t);
    sum_s += e_s;
    sum_t += e_t;
    if (want_cross) cross += math::fkl_cross_term<ScalarOps, float>(e_t, t[j], s[j]);
    if (es) {
      es[j] = e_s;
      et[j] = e_t;
    }
  }
  return {math::lse_value(max_s, sum_s), math::lse_value(max_t, sum_t), sum_s, sum_t, cross};
}

template <typename scalar_t>
void forward_rows(const DivForwardArgs& a) {
  const int64_t N = a.B * a.T, V = a.V;
  const math::DivParams P = a.params;
  const bool fkl = P.kind == math::kForwardKL;
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    // Per-thread fp32 rows: scaled logits s, t and (pass 2 kinds) their shifted exponentials.
    std::vector<float> scratch((fkl ? 2 : 4) * V);
    float* s = scratch.data();
    float* t = s + V;
    float* es = fkl ? nullptr : t + V;
    float* et = fkl ? nullptr : t + 2 * V;
    for (int64_t r = begin; r < end; ++r) {
      float* stats = a.stats + r * math::kStatsWidth;
      if (a.row_valid != nullptr && !a.row_valid[r]) {
        a.row_loss[r] = 0.f;
        std::fill(stats, stats + math::kStatsWidth, 0.f);
        continue;
      }
      load_scaled(row_ptr<scalar_t>(a.student, a.T, r), s, V, a.inv_t);
      load_scaled(row_ptr<scalar_t>(a.teacher, a.T, r), t, V, a.inv_t);
      const RowLse lse = row_lse(s, t, V, fkl, es, et);
      float acc0, acc1 = 0.f, acc2 = 0.f;
      if (fkl) {
        acc0 = math::fkl_from_cross(lse.cross, lse.sum_p, lse.lse_p, lse.lse_q);
      } else {
        const float inv_sq = 1.f / lse.sum_q, inv_sp = 1.f / lse.sum_p;
        const Vec vlq(lse.lse_q), vlp(lse.lse_p), vinv_sq(inv_sq), vinv_sp(inv_sp);
        Vec v0(0.f), v1(0.f), v2(0.f);
        int64_t i = 0;
        for (; i + kLanes <= V; i += kLanes) {
          math::div_accumulate<VecOps, Vec>(P, Vec::loadu(s + i) - vlq, Vec::loadu(t + i) - vlp,
                                            Vec::loadu(es + i) * vinv_sq,
                                            Vec::loadu(et + i) * vinv_sp, v0, v1, v2);
        }
        acc0 = hsum(v0), acc1 = hsum(v1), acc2 = hsum(v2);
        for (; i < V; ++i) {
          math::div_accumulate<ScalarOps, float>(P, s[i] - lse.lse_q, t[i] - lse.lse_p,
                                                 es[i] * inv_sq, et[i] * inv_sp, acc0, acc1, acc2);
        }
      }
      float loss, r0, r1;
      math::div_finalize(P, acc0, acc1, acc2, loss, r0, r1);
      a.row_loss[r] = loss;
      stats[math::kStatLseQ] = lse.lse_q;
      stats[math::kStatLseP] = lse.lse_p;
      stats[math::kStatR0] = r0;
      stats[math::kStatR1] = r1;
    }
  });
}

// Writes n fp32 gradient values into the output row: straight for fp32, converted otherwise.
template <typename scalar_t>
struct GradRow {
  scalar_t* out;
  float* staging;  // fp32 row for reduced-precision outputs
  float* values() { return std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out) : staging; }
  void commit(int64_t n) {
    if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(staging, out, n);
  }
};

template <typename scalar_t, bool kStudent, bool kTeacher>
void backward_rows(const DivBackwardArgs& a) {
  const int64_t N = a.B * a.T, V = a.V;
  const math::DivParams P = a.params;
  auto* grad_s = static_cast<scalar_t*>(a.grad_student);
  auto* grad_t = static_cast<scalar_t*>(a.grad_teacher);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * V);
    float* s = scratch.data();
    float* t = s + V;
    for (int64_t r = begin; r < end; ++r) {
      GradRow<scalar_t> gs_row{kStudent ? grad_s + r * V : nullptr, t + V};
      GradRow<scalar_t> gt_row{kTeacher ? grad_t + r * V : nullptr, t + 2 * V};
      if (a.row_valid != nullptr && !a.row_valid[r]) {
        // Ignored rows get an exact zero gradient, whatever their logits hold.
        if (kStudent) std::fill(gs_row.out, gs_row.out + V, scalar_t(0));
        if (kTeacher) std::fill(gt_row.out, gt_row.out + V, scalar_t(0));
        continue;
      }
      const float* st = a.stats + r * math::kStatsWidth;
      const float lse_q = st[math::kStatLseQ], lse_p = st[math::kStatLseP];
      const float r0 = st[math::kStatR0], r1 = st[math::kStatR1];
      const float scale = a.grad_row[r] * a.inv_t;
      load_scaled(row_ptr<scalar_t>(a.student, a.T, r), s, V, a.inv_t);
      load_scaled(row_ptr<scalar_t>(a.teacher, a.T, r), t, V, a.inv_t);
      float* gs = kStudent ? gs_row.values() : nullptr;
      float* gt = kTeacher ? gt_row.values() : nullptr;
      const Vec vlq(lse_q), vlp(lse_p), vscale(scale);
      int64_t i = 0;
      for (; i + kLanes <= V; i += kLanes) {
        const Vec lq = Vec::loadu(s + i) - vlq, lp = Vec::loadu(t + i) - vlp;
        Vec gq, gp;
        math::div_grad<VecOps, Vec>(P, lq, lp, lq.exp(), lp.exp(), r0, r1, gq, gp);
        if (kStudent) (gq * vscale).store(gs + i);
        if (kTeacher) (gp * vscale).store(gt + i);
      }
      for (; i < V; ++i) {
        const float lq = s[i] - lse_q, lp = t[i] - lse_p;
        float gq, gp;
        math::div_grad<ScalarOps, float>(P, lq, lp, ::expf(lq), ::expf(lp), r0, r1, gq, gp);
        if (kStudent) gs[i] = gq * scale;
        if (kTeacher) gt[i] = gp * scale;
      }
      if (kStudent) gs_row.commit(V);
      if (kTeacher) gt_row.commit(V);
    }
  });
}

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

template <typename scalar_t>
struct ForwardFn {
  static void run(const DivForwardArgs& a) { forward_rows<scalar_t>(a); }
};
template <typename scalar_t>
struct BackwardFn {
  static void run(const DivBackwardArgs& a) {
    if (a.grad_student && a.grad_teacher) return backward_rows<scalar_t, true, true>(a);
    if (a.grad_student) return backward_rows<scalar_t, true, false>(a);
    return backward_rows<scalar_t, false, true>(a);
  }
};

}  // namespace

void divergence_forward_kernel(const DivForwardArgs& args) { dispatch_dtype<ForwardFn>(args); }
void divergence_backward_kernel(const DivBackwardArgs& args) {
  dispatch_dtype<BackwardFn>(args);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
