// Per-element and per-row math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// Everything is written once, generic over a value type V and an `Ops` policy that
// supplies exp/log/sqrt/select/comparisons: ScalarOps (float) serves CUDA threads and CPU
// row tails, the CPU kernel supplies an at::vec policy. Formulas follow DESIGN.md
// ("Math conventions"); the frame is canonical: q = softmax(s) is the student side,
// p = softmax(t) the teacher side, lq = log q, lp = log p. reverse_kl and
// skew_reverse_kl are the forward kinds with the two sides swapped (done by the
// Python dispatch layer), so they have no kernel code of their own.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

namespace pykernels {
namespace math {

// Kernel-level divergence kinds (must match pykernels/_dispatch.py KERNEL_KIND).
enum DivKind : int64_t {
  kForwardKL = 0,      // KL(p || q)
  kJSD = 1,            // beta*KL(p||M) + (1-beta)*KL(q||M), M = beta p + (1-beta) q, 0<beta<1
  kSkewForwardKL = 2,  // KL(p || alpha p + (1-alpha) q)
  kTVD = 3,            // 1/2 sum |p - q|
  kHellinger = 4,      // 1/2 sum (sqrt p - sqrt q)^2
  kNumDivKinds = 5,
};

// A softmax row's normaliser, split into a reference max m and log S with S = sum exp(x - m),
// rather than lse = m + log S: log q_i = (x_i - m) - log S then rounds only numbers the size
// of x_i - m and log S, where x_i - lse inherits half an ulp of lse (|x| * 6e-8), an error
// eager's max-shifted log_softmax does not make. m is the row max or, in the CPU divergence
// kernel, a running reference at most kMaxSlack (8) below it; m = -inf (and log S = -inf) for
// a row with no entry above -inf.
struct LogNorm {
  float m;
  float log_s;
};

PK_HD LogNorm log_norm(float m, float s) { return {m, ::logf(s)}; }

template <class Ops, class V>
PK_HD V log_prob(V x, const LogNorm& n) {
  return (x - Ops::splat(n.m)) - Ops::splat(n.log_s);
}

// Layout of the per-row stats tensor [N, kStatsWidth] saved for backward.
constexpr int kStatMaxQ = 0;     // LogNorm of s (student, after temperature): m ...
constexpr int kStatLogSumQ = 1;  // ... and log S
constexpr int kStatMaxP = 2;     // LogNorm of t (teacher, after temperature)
constexpr int kStatLogSumP = 3;
constexpr int kStatR0 = 4;       // kind-specific row scalar used by the student gradient
constexpr int kStatR1 = 5;       // kind-specific row scalar used by the teacher gradient
constexpr int kStatsWidth = 6;

// One stats row [kStatsWidth], written by the forward kernels and read by the backward ones.
PK_HD void store_div_stats(float* st, const LogNorm& nq, const LogNorm& np, float r0, float r1) {
  st[kStatMaxQ] = nq.m;
  st[kStatLogSumQ] = nq.log_s;
  st[kStatMaxP] = np.m;
  st[kStatLogSumP] = np.log_s;
  st[kStatR0] = r0;
  st[kStatR1] = r1;
}
PK_HD LogNorm stats_norm_q(const float* st) { return {st[kStatMaxQ], st[kStatLogSumQ]}; }
PK_HD LogNorm stats_norm_p(const float* st) { return {st[kStatMaxP], st[kStatLogSumP]}; }

struct DivParams {
  int64_t kind;
  float w;        // beta (jsd) or alpha (skew); unused otherwise
  float w_c;      // 1 - w from the double: 1.f - w rounds w first (1.3 % off at w = 1 - 1e-6)
  float log_w;    // log(w), -inf at w = 0
  float log_1mw;  // log(1 - w), -inf at w = 1
};

inline DivParams make_div_params(int64_t kind, double w) {
  DivParams p;
  p.kind = kind;
  p.w = static_cast<float>(w);
  p.w_c = static_cast<float>(1.0 - w);
  p.log_w = static_cast<float>(std::log(w));
  p.log_1mw = static_cast<float>(std::log1p(-w));
  return p;
}

// Scalar policy (float). Comparisons return bool; select(c, a, b) = c ? a : b.
struct ScalarOps {
  using V = float;
  static PK_HD float exp(float x) { return ::expf(x); }
  static PK_HD float log(float x) { return ::logf(x); }
  static PK_HD float sqrt(float x) { return ::sqrtf(x); }
  static PK_HD float abs(float x) { return ::fabsf(x); }
  static PK_HD bool gt(float a, float b) { return a > b; }
  static PK_HD bool lt(float a, float b) { return a < b; }
  static PK_HD bool eq(float a, float b) { return a == b; }
  static PK_HD float select(bool c, float a, float b) { return c ? a : b; }
  static PK_HD float keep(bool c, float x) { return c ? x : 0.f; }  // x where c, else 0
  static PK_HD float splat(float x) { return x; }
};

// x * d with the convention 0 * anything = 0 (0 log 0 = 0, and the -inf - -inf of two
// zero probabilities); NaN in x still propagates because NaN == 0 is false.
template <class Ops, class V>
PK_HD V xmul0(V x, V d) {
  return Ops::select(Ops::eq(x, Ops::splat(0.f)), Ops::splat(0.f), x * d);
}

// log M for the mixture M = w p + (1 - w) q. M is formed from the probabilities (one log, not
// a logaddexp's exp + log1p), then floored by its exact log-domain lower bounds log(w p) and
// log((1 - w) q): those keep log M finite where M underflows while p or q is still a
// denormal > 0 (the term p (log p - log M) would otherwise be inf). Both -inf gives -inf;
// NaN propagates (a comparison with NaN keeps the NaN candidate).
template <class Ops, class V>
PK_HD V log_mixture(const DivParams& P, V lq, V lp, V q, V p) {
  const V lm = Ops::log(Ops::splat(P.w) * p + Ops::splat(P.w_c) * q);
  const V bp = lp + Ops::splat(P.log_w), bq = lq + Ops::splat(P.log_1mw);
  const V bound = Ops::select(Ops::gt(bp, bq), bp, bq);
  return Ops::select(Ops::gt(bound, lm), bound, lm);
}

// ---- online log-sum-exp (scalar; the CPU kernel does max then sum over a cached row) ----

// Adds x to the running (max m, scaled sum s). NaN x makes s NaN; -inf leaves both as is.
PK_HD void lse_push(float& m, float& s, float x) {
  if (x != x) {  // NaN: poison the sum even while the running max is still -inf
    s = x;
    return;
  }
  const float m_new = x > m ? x : m;
  if (m_new == -INFINITY) return;
  s = s * ::expf(m - m_new) + ::expf(x - m_new);
  m = m_new;
}

// Merges a second running (m2, s2) into (m, s) (associative: tree/warp reductions, vocab shards).
PK_HD void lse_merge(float& m, float& s, float m2, float s2) {
  const float m_new = m2 > m ? m2 : m;
  if (m_new == -INFINITY) {
    s = s + s2;  // both empty (0) unless a NaN is being carried
    return;
  }
  s = s * ::expf(m - m_new) + s2 * ::expf(m2 - m_new);
  m = m_new;
}

PK_HD float lse_value(float m, float s) { return m + ::logf(s); }

// Skew KL's mixture terms: log M, p q / M and (1 - w) q / M, formed in the log domain so that
// they stay right where p or q underflows in fp32 while its log is finite (at w = 0, p q / M = p
// even where q = 0.0f). p q / M <= min(p/w, q/(1-w)) and (1 - w) q / M <= 1, so neither
// overflows (p / M alone can: it is p / q at w = 0). Where M is exactly 0 both are 0.
template <class Ops, class V>
PK_HD void skew_ratios(const DivParams& P, V lq, V lp, V q, V p, V& lm, V& pq_m, V& cq_m) {
  lm = log_mixture<Ops, V>(P, lq, lp, q, p);
  const auto m_zero = Ops::eq(lm, Ops::splat(-INFINITY));
  pq_m = Ops::select(m_zero, Ops::splat(0.f), Ops::exp(lp + lq - lm));
  cq_m = Ops::select(m_zero, Ops::splat(0.f), Ops::exp(lq + Ops::splat(P.log_1mw) - lm));
}

// Skew KL split into what the row sums need and what the gradient needs besides q and p:
// p q / M and gp_base = lp - log M + (1 - w) q / M. d KL(p||M) / dp_i = lp - log M + 1 - w p / M,
// and w p / M = 1 - (1 - w) q / M: written with the latter, the constant 1s, which cancel
// against the row sum of p (1) in the softmax's centring, are never added, and the teacher
// gradient p (gp_base - r1), r1 = KL(p||M) + (1 - w) sum p q / M, is no longer a difference of
// terms near 1 (as w -> 1 the gradient shrinks like 1 - w while they do not: 14-77 times eager's
// error at w = 0.9-0.999). The CPU fused forward keeps pq_m and gp_base per element in pass 2,
// so that its gradient pass has no log or exp left (div_grad recomputes them).
template <class Ops, class V>
PK_HD void skew_accumulate(const DivParams& P, V lq, V lp, V q, V p, V& a0, V& a1, V& pq_m,
                           V& gp_base) {
  V lm, cq_m;
  skew_ratios<Ops, V>(P, lq, lp, q, p, lm, pq_m, cq_m);
  a0 = a0 + xmul0<Ops, V>(p, lp - lm);  // KL(p||M)
  a1 = a1 + pq_m;                       // sum p q / M
  gp_base = lp - lm + cq_m;
}

template <class Ops, class V>
PK_HD void skew_grad(const DivParams& P, V q, V p, V pq_m, V gp_base, float r0, float r1, V& gq,
                     V& gp) {
  gq = Ops::splat(P.w_c) * (q * Ops::splat(r0) - pq_m);
  gp = xmul0<Ops, V>(p, gp_base - Ops::splat(r1));
}

// Forward KL straight from the statistics pass (no second pass): with e = exp(t - m_t),
// c = sum e ((t - m_t) - (s - r_s)) and r_s the student's reference (fkl_student_ref),
// KL(p||q) = c / S_t + log(S_s / S_t). Each element is measured from its own side's max, as
// eager's log_softmax does, never as t - s: when the two models' logits sit at different
// levels, t - s is the size of that gap, and its rounding, of the gap's size (300 * 6e-8),
// would not cancel against the normalisers' difference (2-5 % of a KL of 1e-3 at a gap of 300).
// `fkl_cross_term` is one element of c, 0 where e = 0, so a -inf teacher entry adds nothing.
template <class Ops, class V>
PK_HD V fkl_cross_term(V e_t, V t_minus_mt, V s_minus_rs) {
  return xmul0<Ops, V>(e_t, t_minus_mt - s_minus_rs);
}
// The student logits' reference in c: their running max, or 0 while it is -inf (every student
// entry so far is -inf; their terms are +inf or 0 whatever the reference, and s - m_s would be
// -inf - -inf = NaN).
PK_HD float fkl_student_ref(float m_s) { return m_s == -INFINITY ? 0.f : m_s; }
// Moving c's references from (m_t, r_s) to (m_t', r_s'): e scales by f = exp(m_t - m_t') and
// each term's difference changes by (r_s' - r_s) - (m_t' - m_t), so c' = f (c + shift l_t)
// with l_t = sum e at the old max. Returns the shift and sets f; an unchanged reference
// (including -inf == -inf, where c and l_t are still 0) contributes exactly 0 and 1.
PK_HD float fkl_cross_shift(float mt_old, float mt_new, float rs_old, float rs_new, float& f) {
  const bool t_same = mt_old == mt_new;
  f = t_same ? 1.f : ::expf(mt_old - mt_new);
  return (rs_old == rs_new ? 0.f : rs_new - rs_old) - (t_same ? 0.f : mt_new - mt_old);
}
// c' = f (c + shift l_t); xmul0 keeps an empty sum at 0 (l_t = 0 with an infinite shift) and
// drops a +inf c (q = 0 < p) whose factor underflowed to 0 (those p are 0).
template <class Ops, class V>
PK_HD V fkl_cross_rebase(V c, V l_t, float shift, float f) {
  return xmul0<Ops, V>(Ops::splat(f), c + xmul0<Ops, V>(l_t, Ops::splat(shift)));
}
PK_HD float fkl_from_cross(float cross, float sum_t, float sum_s) {
  return cross / sum_t + ::logf(sum_s / sum_t);
}

// ---- forward: per-element accumulators, then per-row finalisation ----

// Adds one element's contributions to the three row accumulators of `P.kind`.
// lq, lp are the log-probabilities and q = exp(lq), p = exp(lp) (callers often have them).
template <class Ops, class V>
PK_HD void div_accumulate(const DivParams& P, V lq, V lp, V q, V p, V& a0, V& a1, V& a2) {
  const V half = Ops::splat(0.5f);
  switch (P.kind) {
    case kForwardKL:
      a0 = a0 + xmul0<Ops, V>(p, lp - lq);  // KL(p||q)
      break;
    case kJSD: {
      const V lm = log_mixture<Ops, V>(P, lq, lp, q, p);
      a0 = a0 + xmul0<Ops, V>(q, lq - lm);  // KL(q||M)
      a1 = a1 + xmul0<Ops, V>(p, lp - lm);  // KL(p||M)
      break;
    }
    case kSkewForwardKL: {
      V pq_m, gp_base;
      skew_accumulate<Ops, V>(P, lq, lp, q, p, a0, a1, pq_m, gp_base);
      break;
    }
    case kTVD: {
      const V d = q - p;
      const V sgn = Ops::select(Ops::gt(d, Ops::splat(0.f)), half,
                                Ops::select(Ops::lt(d, Ops::splat(0.f)), -half, Ops::splat(0.f)));
      a0 = a0 + half * Ops::abs(d);
      a1 = a1 + q * sgn;  // sum q g, g = sign(q - p) / 2
      a2 = a2 + p * sgn;  // sum p g
      break;
    }
    case kHellinger: {
      const V sp = Ops::sqrt(p), sq = Ops::sqrt(q);
      const V d = sp - sq;
      a0 = a0 + half * d * d;
      a1 = a1 + sp * sq;  // Bhattacharyya coefficient
      break;
    }
    default:
      break;
  }
}

// Row loss and the two backward row scalars from the summed accumulators.
PK_HD void div_finalize(const DivParams& P, float a0, float a1, float a2, float& loss, float& r0,
                        float& r1) {
  switch (P.kind) {
    case kForwardKL:
      loss = a0;
      r0 = 0.f;
      r1 = a0;
      break;
    case kJSD:
      loss = P.w * a1 + P.w_c * a0;
      r0 = a0;
      r1 = a1;
      break;
    case kSkewForwardKL:
      loss = a0;
      r0 = a1;
      r1 = a0 + P.w_c * a1;
      break;
    case kTVD:
      loss = a0;
      r0 = a1;
      r1 = a2;
      break;
    case kHellinger:
      loss = a0;
      r0 = a1;
      r1 = a1;
      break;
    default:
      loss = r0 = r1 = NAN;
  }
}

// ---- backward: d loss / d s_i (gq) and d loss / d t_i (gp), per unit upstream gradient ----
// (the caller multiplies by grad_row / T). Same inputs as div_accumulate.
template <class Ops, class V>
PK_HD void div_grad(const DivParams& P, V lq, V lp, V q, V p, float r0, float r1, V& gq, V& gp) {
  const V half = Ops::splat(0.5f);
  const V vr0 = Ops::splat(r0), vr1 = Ops::splat(r1);
  switch (P.kind) {
    case kForwardKL:
      gq = q - p;
      gp = xmul0<Ops, V>(p, lp - lq - vr1);
      break;
    case kJSD: {
      const V lm = log_mixture<Ops, V>(P, lq, lp, q, p);
      gq = Ops::splat(P.w_c) * xmul0<Ops, V>(q, lq - lm - vr0);
      gp = Ops::splat(P.w) * xmul0<Ops, V>(p, lp - lm - vr1);
      break;
    }
    case kSkewForwardKL: {
      V lm, pq_m, cq_m;
      skew_ratios<Ops, V>(P, lq, lp, q, p, lm, pq_m, cq_m);
      skew_grad<Ops, V>(P, q, p, pq_m, lp - lm + cq_m, r0, r1, gq, gp);
      break;
    }
    case kTVD: {
      const V d = q - p;
      const V sgn = Ops::select(Ops::gt(d, Ops::splat(0.f)), half,
                                Ops::select(Ops::lt(d, Ops::splat(0.f)), -half, Ops::splat(0.f)));
      gq = q * (sgn - vr0);
      gp = -(p * (sgn - vr1));
      break;
    }
    case kHellinger: {
      const V bc = Ops::sqrt(p) * Ops::sqrt(q);
      gq = -half * (bc - q * vr0);
      gp = -half * (bc - p * vr1);
      break;
    }
    default:
      gq = gp = Ops::splat(NAN);
  }
}

// ---- token log-probability + entropy (RL) ----
// Per row, s = z / T: logp = (s_y - m) - log l and H = -sum q log q = log l - c / l, with,
// against the running max m, l = sum e, e = exp(s - m), and c = sum e (s - m) (0 where e = 0,
// so -inf entries add nothing). Measuring c from m (not sum e s) avoids subtracting two numbers of the
// logits' magnitude; all from one read.

template <class Ops, class V>
PK_HD V entropy_cross_term(V e, V s_minus_m) {
  return xmul0<Ops, V>(e, s_minus_m);
}

// c for a new running max: e' = e f with f = exp(m_old - m_new), so
// c' = f (c + (m_old - m_new) l). xmul0 keeps an empty sum (l = 0, m_old = -inf) at 0.
template <class Ops, class V>
PK_HD V entropy_rebase(V c, V l, float f, float m_old, float m_new) {
  return Ops::splat(f) * (c + xmul0<Ops, V>(l, Ops::splat(m_old - m_new)));
}

PK_HD float entropy_from_sums(float c, float l) { return ::logf(l) - c / l; }

// Layout of the token log-prob ops' per-row stats [N, kLogprobStatsWidth] saved for backward:
// the row's LogNorm (m, log S) and its entropy H.
constexpr int kLogprobStatMax = 0;
constexpr int kLogprobStatLogSum = 1;
constexpr int kLogprobStatEntropy = 2;
constexpr int kLogprobStatsWidth = 3;

PK_HD void store_logprob_stats(float* st, const LogNorm& n, float H) {
  st[kLogprobStatMax] = n.m;
  st[kLogprobStatLogSum] = n.log_s;
  st[kLogprobStatEntropy] = H;
}
PK_HD LogNorm logprob_stats_norm(const float* st) {
  return {st[kLogprobStatMax], st[kLogprobStatLogSum]};
}

// d(g_lp * logp + g_h * H) / d s_i without the one-hot part g_lp * 1[i == y], which the caller
// adds at the token: -g_lp q_i - g_h q_i (log q_i + H), with q log q = 0 where q = 0.
template <class Ops, class V>
PK_HD V logprob_entropy_grad(V lq, V q, float g_lp, float g_h, float H) {
  return -(Ops::splat(g_lp) * q) - Ops::splat(g_h) * (xmul0<Ops, V>(q, lq) + q * Ops::splat(H));
}

// ---- softmax cdist (Sinkhorn costs between softmax rows) ----

// Cost per vocabulary element between two probabilities, d = q - p (must match
// pykernels/_sinkhorn.py COSTS): phi(d) = |d| or d^2, summed over the vocabulary.
enum CdistCost : int64_t {
  kCostL1 = 0,
  kCostSqEuclidean = 1,
  kNumCdistCosts = 2,
};

// Each softmax row's normaliser as the cdist ops keep it, a [rows, kNormWidth] fp32 tensor of
// (m, 1 / S), S = sum exp(x - m): q = exp(x - m) * (1 / S), eager softmax's order. The costs
// need probabilities, not their logs, and exp((x - m) - log S) would round its argument at the
// size of log q: a relative error of |log q| * 6e-8 in q, enough to flip sign(q - p) between
// close rows in the l1 cost. m is the row max (or a row_valid-false row's +inf, which with
// 1 / S = 0 gives it zero probabilities wherever a kernel does not test row_valid itself).
struct ProbNorm {
  float m;
  float inv_s;
};
constexpr int kNormWidth = 2;

PK_HD ProbNorm prob_norm(float m, float s) { return {m, 1.f / s}; }
PK_HD ProbNorm masked_row_norm() { return {INFINITY, 0.f}; }
PK_HD void store_norm(float* norm, int64_t row, const ProbNorm& n) {
  norm[row * kNormWidth] = n.m;
  norm[row * kNormWidth + 1] = n.inv_s;
}
PK_HD ProbNorm load_norm(const float* norm, int64_t row) {
  return {norm[row * kNormWidth], norm[row * kNormWidth + 1]};
}
template <class Ops, class V>
PK_HD V softmax_prob(V x, const ProbNorm& n) {
  return Ops::exp(x - Ops::splat(n.m)) * Ops::splat(n.inv_s);
}

template <int64_t Cost, class Ops, class V>
PK_HD V cost_value(V d) {
  if constexpr (Cost == kCostL1) {
    return Ops::abs(d);
  } else {
    return d * d;
  }
}

// w * phi'(d), with phi'(d) = sign(d) (sign(0) = 0, as torch's abs backward) or 2 d. phi' is
// odd in d, which is what lets the teacher gradient reuse the student kernel with the sides
// swapped. The l1 form is two masked copies of w (Ops::keep), no multiply; a NaN d selects
// neither (its row's C is NaN already, and its own gradient is NaN through q).
template <int64_t Cost, class Ops, class V>
PK_HD V cost_slope_times(V d, V w) {
  if constexpr (Cost == kCostL1) {
    const V zero = Ops::splat(0.f);
    return Ops::keep(Ops::gt(d, zero), w) - Ops::keep(Ops::lt(d, zero), w);
  } else {
    return Ops::splat(2.f) * d * w;
  }
}

}  // namespace math
}  // namespace pykernels
