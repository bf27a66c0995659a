// CPU row kernels for the divergence ops. This file is compiled three times (setup.py):
// as part of the extension's ordinary sources (CPU_CAPABILITY = DEFAULT, at::vec's scalar
// fallback) and with -mavx2 / -mavx512* plus CPU_CAPABILITY_AVX2 / _AVX512, which turns
// at::vec::Vectorized<float> into real SIMD. isa.h picks one at run time.
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
#include "row_utils.h"

namespace pykernels {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Per-thread buffers: the two L1 blocks and, for kinds with a second pass, the row's shifted
// exponentials with the running max each block was taken against (so pass 2 needs no exp).
// With keep_skew (skew KL's fused forward) also pass 2's per-element p q / M and
// lp - log M + (1 - w) q / M, so the gradient pass needs no log or exp.
struct Scratch {
  std::vector<float> data;
  float *sb, *tb, *es, *et, *blk_ms, *blk_mt, *skew_pq, *skew_base;
  Scratch(int64_t V, bool keep_exps, bool keep_skew = false)
      : data(2 * kBlock + (keep_exps ? 2 * (V + num_blocks(V)) : 0) + (keep_skew ? 2 * V : 0)) {
    sb = data.data();
    tb = sb + kBlock;
    es = keep_exps ? tb + kBlock : nullptr;
    et = keep_exps ? es + V : nullptr;
    blk_ms = keep_exps ? et + V : nullptr;
    blk_mt = keep_exps ? blk_ms + num_blocks(V) : nullptr;
    float* end = keep_exps ? blk_mt + num_blocks(V) : tb + kBlock;
    skew_pq = keep_skew ? end : nullptr;
    skew_base = keep_skew ? end + V : nullptr;
  }
};

// One stream's online softmax normaliser: running max and per-lane sums of exp(x - max).
struct OnlineSum {
  float m = -INFINITY;
  Vec lanes{0.f};
  float tail = 0.f;
  // Moves the reference max to m_new (callers check m_new != m: -inf == -inf means nothing
  // was accumulated yet); scales the scalar tail and returns the factor for the lane sums.
  float rebase(float m_new) {
    const float f = ::expf(m - m_new);  // 0 from -inf, NaN if m_new is NaN
    tail *= f;
    m = m_new;
    return f;
  }
  float total() const { return hsum(lanes) + tail; }
};

struct Pass1 {
  math::LogNorm nq, np;
  float sum_q, sum_p, cross;
};

// Block sums of pass 1, kept in registers across a block: two accumulators per quantity so
// consecutive vectors do not wait on each other's add (one chain was the loop's bottleneck).
struct BlockAcc {
  Vec s0{0.f}, s1{0.f}, t0{0.f}, t1{0.f}, x0{0.f}, x1{0.f};
};

// The vector part of one block of pass 1 against reference maxima (vms, vmt), and the
// student reference vrs of the cross sum (fkl_student_ref). With kTrackMax the block's own
// maxima are taken in the same loop (vmax_s / vmax_t).
template <bool kCross, bool kKeep, bool kTrackMax, typename scalar_t>
PK_FLATTEN int64_t pass1_block_vec(const float* sb, const float* tb, int64_t n, Vec vms, Vec vmt,
                                   Vec vrs, bool s_live, bool t_live, float* es, float* et,
                                   const Prefetcher<scalar_t>& next, BlockAcc& acc,
                                   Vec& vmax_s, Vec& vmax_t) {
  Vec s0 = acc.s0, s1 = acc.s1, t0 = acc.t0, t1 = acc.t1, x0 = acc.x0, x1 = acc.x1;
  Vec ms = vmax_s, mt = vmax_t;
  const Vec zero(0.f);
  const auto step = [&](int64_t i, Vec& as, Vec& at, Vec& ax) {
    const Vec vs = Vec::loadu(sb + i), vt = Vec::loadu(tb + i);
    if constexpr (kTrackMax) {
      ms = at::vec::maximum(ms, vs);
      mt = at::vec::maximum(mt, vt);
    }
    const Vec e_s = s_live ? VecOps::exp(vs - vms) : zero;
    const Vec e_t = t_live ? VecOps::exp(vt - vmt) : zero;
    as = as + e_s;
    at = at + e_t;
    if constexpr (kCross) ax = ax + math::fkl_cross_term<VecOps, Vec>(e_t, vt - vmt, vs - vrs);
    if constexpr (kKeep) {
      e_s.store(es + i);
      e_t.store(et + i);
    }
  };
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    next(i);
    next(i + kLanes);
    step(i, s0, t0, x0);
    step(i + kLanes, s1, t1, x1);
  }
  for (; i + kLanes <= n; i += kLanes) {
    next(i);
    step(i, s0, t0, x0);
  }
  acc = {s0, s1, t0, t1, x0, x1};
  vmax_s = ms;
  vmax_t = mt;
  return i;
}

// How far a block's max may exceed the reference max before its exponentials are redone
// against a new one. Kept exponentials are of x - m with x up to kMaxSlack above m, and fp32
// rounds that difference at its size: at 8 an error of at most 4.8e-7 in log q, eager's order
// (a 60-unit slack cost 2e-6 of forward KL between close rows whose max came 50 above the
// first block). e^8 * V cannot overflow, and a reference below the true max only makes the
// exponentials larger (no extra underflow); a redo costs one block's exps again.
constexpr float kMaxSlack = 8.f;

// Pass 1 over a row: log-sum-exp of s and t in one read of the input, plus the forward-KL
// cross sum c of fkl_cross_term when kCross, and the shifted exponentials when kKeep.
template <bool kCross, bool kKeep, typename scalar_t>
Pass1 row_pass1(const scalar_t* srow, const scalar_t* trow, int64_t V, float inv_t, Scratch& sc) {
  OnlineSum q_sum, p_sum;
  BlockAcc acc;
  float cross_tail = 0.f;
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b0);
    const float* sb = block_values(srow + b0, n, inv_t, sc.sb);
    const float* tb = block_values(trow + b0, n, inv_t, sc.tb);
    float* es = kKeep ? sc.es + b0 : nullptr;
    float* et = kKeep ? sc.et + b0 : nullptr;
    const Prefetcher<scalar_t> next{srow, trow, b0 + kBlock, V};
    // The block's scalar tail from element j on, and the maxima its kept exponentials use.
    const auto finish_block = [&](int64_t j, bool s_live, bool t_live) {
      for (; j < n; ++j) {
        const float e_s = s_live ? ::expf(sb[j] - q_sum.m) : 0.f;
        const float e_t = t_live ? ::expf(tb[j] - p_sum.m) : 0.f;
        q_sum.tail += e_s;
        p_sum.tail += e_t;
        if constexpr (kCross) {
          cross_tail += math::fkl_cross_term<ScalarOps, float>(
              e_t, tb[j] - p_sum.m, sb[j] - math::fkl_student_ref(q_sum.m));
        }
        if constexpr (kKeep) {
          es[j] = e_s;
          et[j] = e_t;
        }
      }
      if constexpr (kKeep) {
        sc.blk_ms[blk] = q_sum.m;
        sc.blk_mt[blk] = p_sum.m;
      }
    };
    if (q_sum.m > -INFINITY && p_sum.m > -INFINITY) {
      // Speculative: exponentials against the running maxima, the block's maxima taken in the
      // same loop; kept unless a block max overshoots by more than kMaxSlack (then redone).
      BlockAcc part;
      Vec vmax_s(-INFINITY), vmax_t(-INFINITY);
      const int64_t nv = pass1_block_vec<kCross, kKeep, true>(
          sb, tb, n, Vec(q_sum.m), Vec(p_sum.m), Vec(q_sum.m), true, true, es, et, next, part,
          vmax_s, vmax_t);
      float bmax_s = hmax(vmax_s), bmax_t = hmax(vmax_t);
      for (int64_t j = nv; j < n; ++j) {
        bmax_s = nan_max(bmax_s, sb[j]);
        bmax_t = nan_max(bmax_t, tb[j]);
      }
      if (bmax_s <= q_sum.m + kMaxSlack && bmax_t <= p_sum.m + kMaxSlack) {  // false on NaN
        acc.s0 = acc.s0 + part.s0;
        acc.s1 = acc.s1 + part.s1;
        acc.t0 = acc.t0 + part.t0;
        acc.t1 = acc.t1 + part.t1;
        acc.x0 = acc.x0 + part.x0;
        acc.x1 = acc.x1 + part.x1;
        finish_block(nv, true, true);
        continue;
      }
    }
    // Exact: block maxima first, running sums rebased onto the new maxima.
    const float m_s = nan_max(q_sum.m, block_max(sb, n));
    const float m_t = nan_max(p_sum.m, block_max(tb, n));
    if constexpr (kCross) {  // before the sums' rebase: the shift uses l_t at the old max
      if (m_s != q_sum.m || m_t != p_sum.m) {
        float f;
        const float shift = math::fkl_cross_shift(p_sum.m, m_t, math::fkl_student_ref(q_sum.m),
                                                  math::fkl_student_ref(m_s), f);
        acc.x0 = math::fkl_cross_rebase<VecOps, Vec>(acc.x0, acc.t0, shift, f);
        acc.x1 = math::fkl_cross_rebase<VecOps, Vec>(acc.x1, acc.t1, shift, f);
        cross_tail = math::fkl_cross_rebase<ScalarOps, float>(cross_tail, p_sum.tail, shift, f);
      }
    }
    if (m_s != q_sum.m) {
      const float f = q_sum.rebase(m_s);
      acc.s0 = acc.s0 * Vec(f);
      acc.s1 = acc.s1 * Vec(f);
    }
    if (m_t != p_sum.m) {
      const float f = p_sum.rebase(m_t);
      acc.t0 = acc.t0 * Vec(f);
      acc.t1 = acc.t1 * Vec(f);
    }
    // While a stream's max is -inf all its entries so far are -inf: they add exactly 0.
    const bool s_live = q_sum.m != -INFINITY, t_live = p_sum.m != -INFINITY;
    Vec unused_s, unused_t;
    int64_t i = pass1_block_vec<kCross, kKeep, false>(
        sb, tb, n, Vec(q_sum.m), Vec(p_sum.m), Vec(math::fkl_student_ref(q_sum.m)), s_live,
        t_live, es, et, next, acc, unused_s, unused_t);
    finish_block(i, s_live, t_live);
  }
  q_sum.lanes = acc.s0 + acc.s1;
  p_sum.lanes = acc.t0 + acc.t1;
  const float sum_q = q_sum.total(), sum_p = p_sum.total();
  return {math::log_norm(q_sum.m, sum_q), math::log_norm(p_sum.m, sum_p), sum_q, sum_p,
          hsum(acc.x0 + acc.x1) + cross_tail};
}

// Dispatches the pass-1 variants: forward KL needs the cross sum, kinds with a pass 2 or a
// fused gradient need the exponentials kept.
template <typename scalar_t>
Pass1 row_pass1(const scalar_t* srow, const scalar_t* trow, int64_t V, float inv_t, bool cross,
                Scratch& sc) {
  const bool keep = sc.es != nullptr;
  if (cross && keep) return row_pass1<true, true>(srow, trow, V, inv_t, sc);
  if (cross) return row_pass1<true, false>(srow, trow, V, inv_t, sc);
  if (keep) return row_pass1<false, true>(srow, trow, V, inv_t, sc);
  return row_pass1<false, false>(srow, trow, V, inv_t, sc);
}

// Factor turning an exponential kept in pass 1 (taken against the block's running max m_blk)
// into a probability: exp(m_blk - m) / S. Blocks seen before any finite entry kept zeros.
// A row that is -inf throughout has no softmax (eager's is NaN, exp(-inf - -inf)): NaN, not
// the zeros its kept exponentials hold.
float prob_factor(float m_blk, const math::LogNorm& n) {
  if (n.m == -INFINITY) return NAN;
  return m_blk == -INFINITY ? 0.f : ::expf((m_blk - n.m) - n.log_s);
}

// Probabilities of a block recomputed from the row's normaliser (backward pass).
struct ProbsFromNorm {
  static constexpr bool kCached = false;
  static constexpr bool kSkewCached = false;
  void block(int64_t /*b0*/, int64_t /*blk*/) {}
  std::pair<Vec, Vec> vec(int64_t /*i*/, Vec lq, Vec lp) const {
    return {VecOps::exp(lq), VecOps::exp(lp)};
  }
  std::pair<float, float> scalar(int64_t /*i*/, float lq, float lp) const {
    return {::expf(lq), ::expf(lp)};
  }
};

// Probabilities of a block from the exponentials pass 1 kept (fused forward): no exp at all.
struct ProbsFromCache {
  static constexpr bool kCached = true;
  static constexpr bool kSkewCached = false;
  const Scratch& sc;
  math::LogNorm nq, np;
  const float *es = nullptr, *et = nullptr;
  float cq = 0.f, cp = 0.f;
  Vec vcq{0.f}, vcp{0.f};
  void block(int64_t b0, int64_t blk) {
    es = sc.es + b0;
    et = sc.et + b0;
    cq = prob_factor(sc.blk_ms[blk], nq);
    cp = prob_factor(sc.blk_mt[blk], np);
    vcq = Vec(cq);
    vcp = Vec(cp);
  }
  std::pair<Vec, Vec> vec(int64_t i, Vec, Vec) const {
    return {Vec::loadu(es + i) * vcq, Vec::loadu(et + i) * vcp};
  }
  std::pair<float, float> scalar(int64_t i, float, float) const { return {es[i] * cq, et[i] * cp}; }
};

// Skew KL's fused forward: probabilities and the two skew terms pass 2 kept (no log, no exp).
struct SkewFromCache : ProbsFromCache {
  static constexpr bool kSkewCached = true;
  const float *pq = nullptr, *base = nullptr;
  void block(int64_t b0, int64_t blk) {
    ProbsFromCache::block(b0, blk);
    pq = sc.skew_pq + b0;
    base = sc.skew_base + b0;
  }
};

// Writes one row's gradient(s) scale * (gq, gp) of div_grad, block by block, straight into the
// fp32 output or through an fp32 staging block for 16-bit outputs.
template <typename scalar_t, bool kStudent, bool kTeacher, class Probs>
PK_FLATTEN void write_grad_row(const math::DivParams& P, const scalar_t* srow, const scalar_t* trow,
                    int64_t V, float inv_t, math::LogNorm nq, math::LogNorm np, float r0, float r1,
                    float scale, scalar_t* gs_row, scalar_t* gt_row, Probs probs, float* sb,
                    float* tb, float* gs_stage, float* gt_stage) {
  constexpr bool kDirect = std::is_same_v<scalar_t, float>;
  // Forward KL's student gradient q - p needs no log-probabilities: with cached probabilities
  // the logits need not be read again at all.
  const bool need_logits =
      !(Probs::kSkewCached || (Probs::kCached && P.kind == math::kForwardKL && !kTeacher));
  const Vec vscale(scale);
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b0);
    const float* sv = need_logits ? block_values(srow + b0, n, inv_t, sb) : sb;
    const float* tv = need_logits ? block_values(trow + b0, n, inv_t, tb) : tb;
    probs.block(b0, blk);
    float* gs = gs_stage;
    float* gt = gt_stage;
    if constexpr (kDirect) {
      gs = kStudent ? reinterpret_cast<float*>(gs_row) + b0 : nullptr;
      gt = kTeacher ? reinterpret_cast<float*>(gt_row) + b0 : nullptr;
    }
    const Prefetcher<scalar_t> next{srow, trow, need_logits ? b0 + kBlock : V, V};
    const auto grads = [&](int64_t i) {
      Vec gq, gp;
      if constexpr (Probs::kSkewCached) {
        const auto [q, p] = probs.vec(i, Vec(0.f), Vec(0.f));
        math::skew_grad<VecOps, Vec>(P, q, p, Vec::loadu(probs.pq + i), Vec::loadu(probs.base + i),
                                     r0, r1, gq, gp);
      } else {
        const Vec lq = math::log_prob<VecOps>(Vec::loadu(sv + i), nq);
        const Vec lp = math::log_prob<VecOps>(Vec::loadu(tv + i), np);
        const auto [q, p] = probs.vec(i, lq, lp);
        math::div_grad<VecOps, Vec>(P, lq, lp, q, p, r0, r1, gq, gp);
      }
      return std::pair<Vec, Vec>{gq * vscale, gp * vscale};
    };
    int64_t i = 0;
    if constexpr (!kDirect) {
      // 16-bit outputs: two fp32 vectors rounded into one 16-bit vector, no staging round trip.
      using RVec = at::vec::Vectorized<scalar_t>;
      for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
        next(i);
        next(i + kLanes);
        const auto [gq0, gp0] = grads(i);
        const auto [gq1, gp1] = grads(i + kLanes);
        if (kStudent) RVec(at::vec::convert_from_float<scalar_t>(gq0, gq1)).store(gs_row + b0 + i);
        if (kTeacher) RVec(at::vec::convert_from_float<scalar_t>(gp0, gp1)).store(gt_row + b0 + i);
      }
    }
    const int64_t staged = i;  // 16-bit: what is left goes through the fp32 staging block
    for (; i + kLanes <= n; i += kLanes) {
      next(i);
      const auto [gq, gp] = grads(i);
      if (kStudent) gq.store(gs + i);
      if (kTeacher) gp.store(gt + i);
    }
    for (; i < n; ++i) {
      float gq, gp;
      if constexpr (Probs::kSkewCached) {
        const auto [q, p] = probs.scalar(i, 0.f, 0.f);
        math::skew_grad<ScalarOps, float>(P, q, p, probs.pq[i], probs.base[i], r0, r1, gq, gp);
      } else {
        const float lq = math::log_prob<ScalarOps>(sv[i], nq);
        const float lp = math::log_prob<ScalarOps>(tv[i], np);
        const auto [q, p] = probs.scalar(i, lq, lp);
        math::div_grad<ScalarOps, float>(P, lq, lp, q, p, r0, r1, gq, gp);
      }
      if (kStudent) gs[i] = gq * scale;
      if (kTeacher) gt[i] = gp * scale;
    }
    if constexpr (!kDirect) {
      if (kStudent) store_block(gs_stage + staged, gs_row + b0 + staged, n - staged);
      if (kTeacher) store_block(gt_stage + staged, gt_row + b0 + staged, n - staged);
    }
  }
}

template <typename scalar_t, bool kStudent, bool kTeacher>
void zero_grad_row(scalar_t* gs_row, scalar_t* gt_row, int64_t V) {
  // Ignored rows get an exact zero gradient, whatever their logits hold.
  if (kStudent) std::fill(gs_row, gs_row + V, scalar_t(0));
  if (kTeacher) std::fill(gt_row, gt_row + V, scalar_t(0));
}

// Pass 2 (kinds other than forward KL): the three accumulators of div_accumulate, with
// log-probabilities from the (cached) input and probabilities from pass 1's exponentials.
template <typename scalar_t>
PK_FLATTEN void row_pass2(const math::DivParams& P, const scalar_t* srow, const scalar_t* trow,
                          int64_t V, float inv_t, const Pass1& p1, Scratch& sc, float& acc0,
                          float& acc1, float& acc2) {
  ProbsFromCache probs{sc, p1.nq, p1.np};
  const bool keep_skew = sc.skew_pq != nullptr;  // only allocated for skew KL's fused forward
  Vec v0(0.f), v1(0.f), v2(0.f);
  acc0 = acc1 = acc2 = 0.f;
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b0);
    const float* sv = block_values(srow + b0, n, inv_t, sc.sb);
    const float* tv = block_values(trow + b0, n, inv_t, sc.tb);
    probs.block(b0, blk);
    const Prefetcher<scalar_t> next{srow, trow, b0 + kBlock, V};
    int64_t i = 0;
    float* pq_out = keep_skew ? sc.skew_pq + b0 : nullptr;
    float* base_out = keep_skew ? sc.skew_base + b0 : nullptr;
    for (; i + kLanes <= n; i += kLanes) {
      next(i);
      const Vec lq = math::log_prob<VecOps>(Vec::loadu(sv + i), p1.nq);
      const Vec lp = math::log_prob<VecOps>(Vec::loadu(tv + i), p1.np);
      const auto [q, p] = probs.vec(i, lq, lp);
      if (keep_skew) {
        Vec pq_m, gp_base;
        math::skew_accumulate<VecOps, Vec>(P, lq, lp, q, p, v0, v1, pq_m, gp_base);
        pq_m.store(pq_out + i);
        gp_base.store(base_out + i);
      } else {
        math::div_accumulate<VecOps, Vec>(P, lq, lp, q, p, v0, v1, v2);
      }
    }
    for (; i < n; ++i) {
      const float lq = math::log_prob<ScalarOps>(sv[i], p1.nq);
      const float lp = math::log_prob<ScalarOps>(tv[i], p1.np);
      const auto [q, p] = probs.scalar(i, lq, lp);
      if (keep_skew) {
        math::skew_accumulate<ScalarOps, float>(P, lq, lp, q, p, acc0, acc1, pq_out[i], base_out[i]);
      } else {
        math::div_accumulate<ScalarOps, float>(P, lq, lp, q, p, acc0, acc1, acc2);
      }
    }
  }
  acc0 += hsum(v0), acc1 += hsum(v1), acc2 += hsum(v2);
}

// Forward, and with kStudent / kTeacher the gradient of each row loss (unit upstream
// gradient) from the same passes: the probabilities pass 1 kept make it exp-free.
template <typename scalar_t, bool kStudent, bool kTeacher>
void forward_rows(const DivForwardArgs& a) {
  const int64_t N = a.B * a.T, V = a.V;
  const math::DivParams P = a.params;
  const bool fkl = P.kind == math::kForwardKL;
  constexpr bool kGrad = kStudent || kTeacher;
  auto* grad_s = static_cast<scalar_t*>(a.grad_student);
  auto* grad_t = static_cast<scalar_t*>(a.grad_teacher);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    const bool skew = P.kind == math::kSkewForwardKL;
    Scratch sc(V, /*keep_exps=*/!fkl || kGrad, /*keep_skew=*/skew && kGrad);
    std::vector<float> stage(kGrad ? 2 * kBlock : 0);
    for (int64_t r = begin; r < end; ++r) {
      float* stats = a.stats + r * math::kStatsWidth;
      scalar_t* gs_row = kStudent ? grad_s + r * V : nullptr;
      scalar_t* gt_row = kTeacher ? grad_t + r * V : nullptr;
      if (a.row_valid != nullptr && !a.row_valid[r]) {
        a.row_loss[r] = 0.f;
        std::fill(stats, stats + math::kStatsWidth, 0.f);
        zero_grad_row<scalar_t, kStudent, kTeacher>(gs_row, gt_row, V);
        continue;
      }
      const scalar_t* srow = row_ptr<scalar_t>(a.student, a.T, r);
      const scalar_t* trow = row_ptr<scalar_t>(a.teacher, a.T, r);
      const Pass1 p1 = row_pass1(srow, trow, V, a.inv_t, fkl, sc);
      float acc0, acc1 = 0.f, acc2 = 0.f;
      if (fkl) {
        acc0 = math::fkl_from_cross(p1.cross, p1.sum_p, p1.sum_q);
      } else {
        row_pass2(P, srow, trow, V, a.inv_t, p1, sc, acc0, acc1, acc2);
      }
      float loss, r0, r1;
      math::div_finalize(P, acc0, acc1, acc2, loss, r0, r1);
      a.row_loss[r] = loss;
      math::store_div_stats(stats, p1.nq, p1.np, r0, r1);
      if constexpr (kGrad) {
        const float scale = a.row_weight * a.inv_t;
        if (skew) {
          write_grad_row<scalar_t, kStudent, kTeacher>(
              P, srow, trow, V, a.inv_t, p1.nq, p1.np, r0, r1, scale, gs_row, gt_row,
              SkewFromCache{{sc, p1.nq, p1.np}}, sc.sb, sc.tb, stage.data(),
              stage.data() + kBlock);
        } else {
          write_grad_row<scalar_t, kStudent, kTeacher>(
              P, srow, trow, V, a.inv_t, p1.nq, p1.np, r0, r1, scale, gs_row, gt_row,
              ProbsFromCache{sc, p1.nq, p1.np}, sc.sb, sc.tb, stage.data(),
              stage.data() + kBlock);
        }
      }
    }
  });
}

template <typename scalar_t, bool kStudent, bool kTeacher>
void backward_rows(const DivBackwardArgs& a) {
  const int64_t N = a.B * a.T, V = a.V;
  const math::DivParams P = a.params;
  auto* grad_s = static_cast<scalar_t*>(a.grad_student);
  auto* grad_t = static_cast<scalar_t*>(a.grad_teacher);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * kBlock);
    float* sb = scratch.data();
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* gs_row = kStudent ? grad_s + r * V : nullptr;
      scalar_t* gt_row = kTeacher ? grad_t + r * V : nullptr;
      if (a.row_valid != nullptr && !a.row_valid[r]) {
        zero_grad_row<scalar_t, kStudent, kTeacher>(gs_row, gt_row, V);
        continue;
      }
      const float* st = a.stats + r * math::kStatsWidth;
      write_grad_row<scalar_t, kStudent, kTeacher>(
          P, row_ptr<scalar_t>(a.student, a.T, r), row_ptr<scalar_t>(a.teacher, a.T, r), V,
          a.inv_t, math::stats_norm_q(st), math::stats_norm_p(st), st[math::kStatR0],
          st[math::kStatR1], a.grad_row[r] * a.inv_t, gs_row, gt_row, ProbsFromNorm{}, sb,
          sb + kBlock, sb + 2 * kBlock, sb + 3 * kBlock);
    }
  });
}

template <typename scalar_t>
struct ForwardFn {
  static void run(const DivForwardArgs& a) {
    if (a.grad_student && a.grad_teacher) return forward_rows<scalar_t, true, true>(a);
    if (a.grad_student) return forward_rows<scalar_t, true, false>(a);
    if (a.grad_teacher) return forward_rows<scalar_t, false, true>(a);
    return forward_rows<scalar_t, false, false>(a);
  }
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

// How many threads at::parallel_for runs on in this build of the kernels: 1 whatever
// torch.get_num_threads() says when the file was compiled without OpenMP (a build-flag
// regression the tests check).
int64_t parallel_threads_probe() {
  std::vector<char> seen(std::max(at::get_num_threads(), 1), 0);
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(seen.size())) seen[id] = 1;
  });
  return std::count(seen.begin(), seen.end(), char{1});
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
