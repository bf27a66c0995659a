// CPU row kernels for the token log-prob + entropy ops; compiled per instruction set like
// divergence_kernel.cpp. Forward: one read of the row (blocked online max, sum of exp and of
// exp * s); backward: one read and one write.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>

#include <vector>

#include "logprob_kernel.h"
#include "row_utils.h"

namespace pykernels {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// The row's token, or -1 when it is out of [0, V) (the caller validated user input already;
// the kernels never read out of bounds whatever they are given).
template <class Args>
int64_t token_of(const Args& a, int64_t r) {
  const int64_t y = a.tokens64 ? a.tokens64[r] : static_cast<int64_t>(a.tokens32[r]);
  return (y >= 0 && y < a.V) ? y : -1;
}

struct RowLogprob {
  math::LogNorm norm;
  float entropy;
};

template <typename scalar_t>
PK_FLATTEN RowLogprob row_lse_entropy(const scalar_t* row, int64_t V, float inv_t, float* buf) {
  float m = -INFINITY;
  Vec e0(0.f), e1(0.f), c0(0.f), c1(0.f);
  float e_tail = 0.f, c_tail = 0.f;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const float* x = block_values(row + b0, n, inv_t, buf);
    const float m_new = nan_max(m, block_max(x, n));
    if (!(m_new == m)) {  // move the sums to the new max (a NaN max makes everything NaN)
      const float f = ::expf(m - m_new);
      c0 = math::entropy_rebase<VecOps, Vec>(c0, e0, f, m, m_new);
      c1 = math::entropy_rebase<VecOps, Vec>(c1, e1, f, m, m_new);
      c_tail = math::entropy_rebase<ScalarOps, float>(c_tail, e_tail, f, m, m_new);
      e0 = e0 * Vec(f), e1 = e1 * Vec(f), e_tail *= f;
      m = m_new;
    }
    if (m == -INFINITY) continue;  // all -inf so far: they add exactly 0
    const Vec vm(m);
    int64_t i = 0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const Vec a = Vec::loadu(x + i) - vm, b = Vec::loadu(x + i + kLanes) - vm;
      const Vec ea = VecOps::exp(a), eb = VecOps::exp(b);
      e0 = e0 + ea, e1 = e1 + eb;
      c0 = c0 + math::entropy_cross_term<VecOps, Vec>(ea, a);
      c1 = c1 + math::entropy_cross_term<VecOps, Vec>(eb, b);
    }
    for (; i + kLanes <= n; i += kLanes) {
      const Vec a = Vec::loadu(x + i) - vm;
      const Vec ea = VecOps::exp(a);
      e0 = e0 + ea;
      c0 = c0 + math::entropy_cross_term<VecOps, Vec>(ea, a);
    }
    for (; i < n; ++i) {
      const float a = x[i] - m, e = ::expf(a);
      e_tail += e;
      c_tail += math::entropy_cross_term<ScalarOps, float>(e, a);
    }
  }
  const float l = hsum(e0 + e1) + e_tail, c = hsum(c0 + c1) + c_tail;
  return {math::log_norm(m, l), math::entropy_from_sums(c, l)};
}

template <typename scalar_t>
void forward_rows(const LogprobForwardArgs& a) {
  const int64_t N = a.B * a.T, V = a.V;
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = row_ptr<scalar_t>(a.logits, a.T, r);
      const RowLogprob rl = row_lse_entropy(row, V, a.inv_t, buf.data());
      const int64_t y = token_of(a, r);
      a.logp[r] =
          y < 0 ? NAN : math::log_prob<ScalarOps>(static_cast<float>(row[y]) * a.inv_t, rl.norm);
      if (a.entropy) a.entropy[r] = rl.entropy;
      math::store_logprob_stats(a.stats + r * math::kLogprobStatsWidth, rl.norm, rl.entropy);
    }
  });
}

template <typename scalar_t>
PK_FLATTEN void grad_row(const scalar_t* row, int64_t V, float inv_t, math::LogNorm norm, float H,
                         float g_lp, float g_h, int64_t y, scalar_t* out, float* buf,
                         float* stage) {
  constexpr bool kDirect = std::is_same_v<scalar_t, float>;
  const Vec vscale(inv_t);
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const float* x = block_values(row + b0, n, inv_t, buf);
    float* g = kDirect ? reinterpret_cast<float*>(out) + b0 : stage;
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const Vec lq = math::log_prob<VecOps>(Vec::loadu(x + i), norm);
      (math::logprob_entropy_grad<VecOps, Vec>(lq, VecOps::exp(lq), g_lp, g_h, H) * vscale)
          .store(g + i);
    }
    for (; i < n; ++i) {
      const float lq = math::log_prob<ScalarOps>(x[i], norm);
      g[i] = math::logprob_entropy_grad<ScalarOps, float>(lq, ::expf(lq), g_lp, g_h, H) * inv_t;
    }
    if (y >= b0 && y < b0 + n) g[y - b0] += g_lp * inv_t;  // the one-hot term, before rounding
    if constexpr (!kDirect) store_block(stage, out + b0, n);
  }
}

template <typename scalar_t>
void backward_rows(const LogprobBackwardArgs& a) {
  const int64_t N = a.B * a.T, V = a.V;
  auto* out = static_cast<scalar_t*>(a.grad_logits);
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const float g_h = a.grad_entropy ? a.grad_entropy[r] : 0.f;
      const float* st = a.stats + r * math::kLogprobStatsWidth;
      grad_row(row_ptr<scalar_t>(a.logits, a.T, r), V, a.inv_t, math::logprob_stats_norm(st),
               st[math::kLogprobStatEntropy], a.grad_logp[r], g_h, token_of(a, r), out + r * V,
               buf.data(), buf.data() + kBlock);
    }
  });
}

template <typename scalar_t>
struct ForwardFn {
  static void run(const LogprobForwardArgs& a) { forward_rows<scalar_t>(a); }
};
template <typename scalar_t>
struct BackwardFn {
  static void run(const LogprobBackwardArgs& a) { backward_rows<scalar_t>(a); }
};

}  // namespace

void token_logprob_forward_kernel(const LogprobForwardArgs& args) {
  dispatch_dtype<ForwardFn>(args);
}
void token_logprob_backward_kernel(const LogprobBackwardArgs& args) {
  dispatch_dtype<BackwardFn>(args);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
