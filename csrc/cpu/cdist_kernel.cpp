// CPU kernels of softmax_cdist, compiled per instruction set like divergence_kernel.cpp: the
// elementwise l1 kernels below, and the probability slabs from which cdist_cpu.cpp computes the
// squared distance with matrix multiplies.
//
// Forward: one pass per row for its normaliser (max, 1 / sum-exp), then one task per (batch, tile of kTile
// student rows): the vocabulary is walked in blocks of kVBlock; the tile's probabilities of a
// block are computed once into L1, and each teacher row's block once per tile, then every
// (i, j) pair of the tile reduces phi(q - p) and q phi'(q - p) over the block. Exponentials:
// (Gs + Gs/kTile * Gt) * V, against Gs * Gt * V pair elements. No G x V buffer.
// Backward (one side, see ops.cpp): the same tiling, accumulating
// g_iv = sum_j W_ij phi'(x_iv - y_jv) for the tile's block in L1, then writing the block.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/Parallel.h>

#include <vector>

#include "cdist_kernel.h"
#include "row_utils.h"

namespace pykernels {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kTile = 16;     // rows of one side per task
// Vocabulary elements per block: the forward's kTile rows of probabilities (64 KB fp32) stay
// in L2 and are read once per row of the other side; the backward also keeps kTile rows of
// gradient accumulators it reads and writes for every such row, so its blocks fit L1.
constexpr int64_t kVBlock = 1024;
constexpr int64_t kVBlockBwd = 256;

// The ProbNorm (max m, 1 / sum_v exp(z_v * inv_t - m)) of one row: blocked online max, then
// the sum rescaled on max updates. NaN anywhere gives NaN; an all -inf row gives m = -inf
// (NaN probabilities, as eager's softmax).
template <typename scalar_t>
PK_FLATTEN math::ProbNorm row_norm(const scalar_t* row, int64_t V, float inv_t, float* buf) {
  float m = -INFINITY;
  Vec acc(0.f);
  float tail = 0.f;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    const float* x = block_values(row + b0, n, inv_t, buf);
    const float m_new = nan_max(m, block_max(x, n));
    if (!(m_new == m)) {
      const float f = ::expf(m - m_new);
      acc = acc * Vec(f), tail *= f;
      m = m_new;
    }
    if (m == -INFINITY) continue;
    const Vec vm(m);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) acc = acc + VecOps::exp(Vec::loadu(x + i) - vm);
    for (; i < n; ++i) tail += ::expf(x[i] - m);
  }
  return math::prob_norm(m, hsum(acc) + tail);
}

// (max_v z_v * inv_t, 1) of one row (NaN anywhere gives NaN); no exponentials: with 1 / S = 1
// the probability slabs are the unnormalised exp(z inv_t - m), normalised afterwards.
template <typename scalar_t>
PK_FLATTEN math::ProbNorm row_max(const scalar_t* row, int64_t V, float inv_t, float* buf) {
  float m = -INFINITY;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t n = std::min(kBlock, V - b0);
    m = nan_max(m, block_max(block_values(row + b0, n, inv_t, buf), n));
  }
  return {m, 1.f};
}

inline bool row_is_valid(const bool* row_valid, int64_t r) { return row_valid == nullptr || row_valid[r]; }

// dst[0:n] = exp(z * inv_t - m) / S of row r (b * G + i) of a [Bt, G, V] view over the
// columns [v0, v0 + n), with (m, 1 / S) = norm's row r (the softmax probabilities; see
// ProbSlabArgs for 1 / S = 1), or zeros for a masked row.
template <typename scalar_t>
PK_FLATTEN void row_block_probs(const RowsView& view, int64_t G, int64_t r, int64_t v0, int64_t n,
                                float inv_t, const float* norm, const bool* row_valid, float* dst) {
  if (!row_is_valid(row_valid, r)) {
    std::fill(dst, dst + n, 0.f);
    return;
  }
  load_block(row_ptr<scalar_t>(view, G, r) + v0, n, inv_t, dst);
  const math::ProbNorm nr = math::load_norm(norm, r);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) math::softmax_prob<VecOps>(Vec::loadu(dst + i), nr).store(dst + i);
  for (; i < n; ++i) dst[i] = math::softmax_prob<ScalarOps>(dst[i], nr);
}

// norm's row r = reduce(row r) for the valid rows, masked_row_norm() for the masked ones.
template <typename scalar_t, typename RowReduce>
void reduce_rows(const RowsView& view, int64_t rows, int64_t G, int64_t V, float inv_t,
                 const bool* row_valid, float* norm, RowReduce reduce) {
  at::parallel_for(0, rows, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      math::store_norm(norm, r, row_is_valid(row_valid, r)
                                    ? reduce(row_ptr<scalar_t>(view, G, r), V, inv_t, buf.data())
                                    : math::masked_row_norm());
    }
  });
}

// Pairs are done kRowBlock tile rows at a time against one row of the other side: each vector
// of that row is loaded once for kRowBlock pairs, and the pairs' accumulators are independent
// dependency chains.
constexpr int64_t kRowBlock = 4;

// For rows q[r] (r < nr <= kRowBlock, stride kVBlock) against p over n elements:
// c[r] += sum phi(q_r - p), a[r] += sum q_r phi'(q_r - p).
template <int64_t Cost>
PK_FLATTEN void pair_rows(const float* q, int64_t nr, const float* p, int64_t n, float* c, float* a) {
  int64_t v = 0;
  if (nr == kRowBlock) {
    // Constant trip counts throughout, so the accumulators live in registers.
    Vec vc[kRowBlock], va[kRowBlock];
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRowBlock; ++r) vc[r] = Vec(0.f), va[r] = Vec(0.f);
    for (; v + kLanes <= n; v += kLanes) {
      const Vec pv = Vec::loadu(p + v);
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRowBlock; ++r) {
        const Vec qv = Vec::loadu(q + r * kVBlock + v);
        const Vec d = qv - pv;
        vc[r] = vc[r] + math::cost_value<Cost, VecOps, Vec>(d);
        va[r] = va[r] + math::cost_slope_times<Cost, VecOps, Vec>(d, qv);
      }
    }
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRowBlock; ++r) c[r] += hsum(vc[r]), a[r] += hsum(va[r]);
  }
  for (int64_t r = 0; r < nr; ++r) {
    float tc = 0.f, ta = 0.f;
    for (int64_t k = v; k < n; ++k) {  // the block's tail, or every element of a short group
      const float qk = q[r * kVBlock + k], d = qk - p[k];
      tc += math::cost_value<Cost, ScalarOps, float>(d);
      ta += math::cost_slope_times<Cost, ScalarOps, float>(d, qk);
    }
    c[r] += tc;
    a[r] += ta;
  }
}

// For rows x[r] (stride kVBlockBwd) and weights w[r]: g[r] += w_r phi'(x_r - y) over n elements.
template <int64_t Cost>
PK_FLATTEN void slope_rows(const float* x, int64_t nr, const float* y, const float* w, int64_t n,
                           float* g) {
  int64_t v = 0;
  if (nr == kRowBlock) {
    Vec vw[kRowBlock];
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRowBlock; ++r) vw[r] = Vec(w[r]);
    for (; v + kLanes <= n; v += kLanes) {
      const Vec yv = Vec::loadu(y + v);
#pragma GCC unroll 4
      for (int64_t r = 0; r < kRowBlock; ++r) {
        float* gr = g + r * kVBlockBwd + v;
        const Vec d = Vec::loadu(x + r * kVBlockBwd + v) - yv;
        (Vec::loadu(gr) + math::cost_slope_times<Cost, VecOps, Vec>(d, vw[r])).store(gr);
      }
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t k = v; k < n; ++k) {
      g[r * kVBlockBwd + k] += math::cost_slope_times<Cost, ScalarOps, float>(x[r * kVBlockBwd + k] - y[k], w[r]);
    }
  }
}

// norm_s / norm_t = reduce(row) of both sides' rows (row_norm, or row_max for the squared
// distance's slabs).
template <typename scalar_t, typename RowReduce>
void reduce_both_sides(const CdistForwardArgs& a, RowReduce reduce) {
  reduce_rows<scalar_t>(a.student, a.Bt * a.Gs, a.Gs, a.V, a.inv_t, a.row_valid, a.norm_s, reduce);
  reduce_rows<scalar_t>(a.teacher, a.Bt * a.Gt, a.Gt, a.V, a.inv_t, a.row_valid, a.norm_t, reduce);
}

template <typename scalar_t>
void prob_slab(const ProbSlabArgs& a) {
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(a.n, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* p = a.out + r * a.n;
      row_block_probs<scalar_t>(a.x, a.G, r, a.v0, a.n, a.inv_t, a.norm, a.row_valid, p);
      if (a.sq_norm == nullptr && a.row_sum == nullptr) continue;
      Vec acc_sq(0.f), acc(0.f);  // while the row is in L1: saves a pass and a temporary per slab
      float tail_sq = 0.f, tail = 0.f;
      int64_t k = 0;
      for (; k + kLanes <= a.n; k += kLanes) {
        const Vec pv = Vec::loadu(p + k);
        acc_sq = at::vec::fmadd(pv, pv, acc_sq);
        acc = acc + pv;
      }
      for (; k < a.n; ++k) tail_sq += p[k] * p[k], tail += p[k];
      if (a.sq_norm != nullptr) a.sq_norm[r] += hsum(acc_sq) + tail_sq;
      if (a.row_sum != nullptr) a.row_sum[r] += hsum(acc) + tail;
    }
  });
}

template <typename scalar_t>
void sqeuclidean_grad(const SqEuclideanGradArgs& a) {
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(a.n, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = grad + r * a.V + a.v0;
      if (!row_is_valid(a.row_valid, r)) {  // no gradient, whatever W holds (NaN included)
        std::fill(out, out + a.n, scalar_t(0));
        continue;
      }
      const Vec vt(a.inv_t), vw(a.w_total[r]), vdot(a.dot[r]), two(2.f);
      for (int64_t c0 = 0; c0 < a.n; c0 += kBlock) {
        const int64_t m = std::min(kBlock, a.n - c0);
        float* p = buf.data();
        const float* wy = a.wy + r * a.n + c0;
        row_block_probs<scalar_t>(a.x, a.G, r, a.v0 + c0, m, a.inv_t, a.norm, a.row_valid, p);
        int64_t k = 0;
        for (; k + kLanes <= m; k += kLanes) {
          const Vec pv = Vec::loadu(p + k);
          (vt * pv * (two * (pv * vw - Vec::loadu(wy + k)) - vdot)).store(p + k);
        }
        for (; k < m; ++k) p[k] = a.inv_t * p[k] * (2.f * (p[k] * a.w_total[r] - wy[k]) - a.dot[r]);
        store_block(p, out + c0, m);
      }
    }
  });
}

template <typename scalar_t, int64_t Cost>
void cdist_forward(const CdistForwardArgs& a) {
  const int64_t V = a.V, Gs = a.Gs, Gt = a.Gt;
  reduce_both_sides<scalar_t>(a, row_norm<scalar_t>);
  const int64_t tiles = (Gs + kTile - 1) / kTile;
  at::parallel_for(0, a.Bt * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(kTile * kVBlock), p(kVBlock), accC(kTile * Gt), accA(kTile * Gt);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, i0 = (task % tiles) * kTile;
      const int64_t ni = std::min(kTile, Gs - i0);
      std::fill(accC.begin(), accC.end(), 0.f);
      std::fill(accA.begin(), accA.end(), 0.f);
      for (int64_t v0 = 0; v0 < V; v0 += kVBlock) {
        const int64_t n = std::min(kVBlock, V - v0);
        for (int64_t ii = 0; ii < ni; ++ii) {
          row_block_probs<scalar_t>(a.student, Gs, b * Gs + i0 + ii, v0, n, a.inv_t, a.norm_s,
                                    a.row_valid, q.data() + ii * kVBlock);
        }
        for (int64_t j = 0; j < Gt; ++j) {
          row_block_probs<scalar_t>(a.teacher, Gt, b * Gt + j, v0, n, a.inv_t, a.norm_t,
                                    a.row_valid, p.data());
          for (int64_t ii = 0; ii < ni; ii += kRowBlock) {
            const int64_t nr = std::min(kRowBlock, ni - ii);
            float c[kRowBlock] = {}, am[kRowBlock] = {};
            pair_rows<Cost>(q.data() + ii * kVBlock, nr, p.data(), n, c, am);
            for (int64_t r = 0; r < nr; ++r) accC[(ii + r) * Gt + j] += c[r], accA[(ii + r) * Gt + j] += am[r];
          }
        }
      }
      for (int64_t ii = 0; ii < ni; ++ii) {
        float* c = a.C + (b * Gs + i0 + ii) * Gt;
        float* am = a.A + (b * Gs + i0 + ii) * Gt;
        for (int64_t j = 0; j < Gt; ++j) c[j] = accC[ii * Gt + j], am[j] = accA[ii * Gt + j];
      }
    }
  });
}

template <typename scalar_t, int64_t Cost>
void cdist_backward(const CdistBackwardArgs& a) {
  const int64_t V = a.V, Gx = a.Gx, Gy = a.Gy;
  const int64_t tiles = (Gx + kTile - 1) / kTile;
  scalar_t* grad = static_cast<scalar_t*>(a.grad_x);
  at::parallel_for(0, a.Bt * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(kTile * kVBlockBwd), y(kVBlockBwd), g(kTile * kVBlockBwd);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, i0 = (task % tiles) * kTile;
      const int64_t ni = std::min(kTile, Gx - i0);
      for (int64_t v0 = 0; v0 < V; v0 += kVBlockBwd) {
        const int64_t n = std::min(kVBlockBwd, V - v0);
        for (int64_t ii = 0; ii < ni; ++ii) {
          row_block_probs<scalar_t>(a.x, Gx, b * Gx + i0 + ii, v0, n, a.inv_t, a.norm_x,
                                    a.row_valid, x.data() + ii * kVBlockBwd);
        }
        std::fill(g.begin(), g.end(), 0.f);
        for (int64_t j = 0; j < Gy; ++j) {
          row_block_probs<scalar_t>(a.y, Gy, b * Gy + j, v0, n, a.inv_t, a.norm_y, a.row_valid,
                                    y.data());
          for (int64_t ii = 0; ii < ni; ii += kRowBlock) {
            const int64_t nr = std::min(kRowBlock, ni - ii);
            float w[kRowBlock];
            for (int64_t r = 0; r < nr; ++r) w[r] = a.weight[(b * Gx + i0 + ii + r) * Gy + j];
            slope_rows<Cost>(x.data() + ii * kVBlockBwd, nr, y.data(), w, n, g.data() + ii * kVBlockBwd);
          }
        }
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t r = b * Gx + i0 + ii;
          float* gi = g.data() + ii * kVBlockBwd;
          const float* xi = x.data() + ii * kVBlockBwd;
          if (!row_is_valid(a.row_valid, r)) {
            std::fill(gi, gi + n, 0.f);  // a masked row takes no gradient, whatever W holds
          } else {
            // dz = inv_t * x * (g - dot), in place in the g block
            const Vec vdot(a.dot_x[r]), vt(a.inv_t);
            int64_t v = 0;
            for (; v + kLanes <= n; v += kLanes) {
              (vt * Vec::loadu(xi + v) * (Vec::loadu(gi + v) - vdot)).store(gi + v);
            }
            for (; v < n; ++v) gi[v] = a.inv_t * xi[v] * (gi[v] - a.dot_x[r]);
          }
          store_block(gi, grad + r * V + v0, n);
        }
      }
    }
  });
}

// The elementwise kernels serve l1; the squared distance goes through prob_slab + BLAS +
// sqeuclidean_grad (cdist_cpu.cpp).
template <typename scalar_t>
struct ForwardFn {
  static void run(const CdistForwardArgs& a) {
    TORCH_CHECK(a.cost == math::kCostL1, "pykernels: the elementwise cdist kernel is l1 only");
    cdist_forward<scalar_t, math::kCostL1>(a);
  }
};

template <typename scalar_t>
struct BackwardFn {
  static void run(const CdistBackwardArgs& a) {
    TORCH_CHECK(a.cost == math::kCostL1, "pykernels: the elementwise cdist kernel is l1 only");
    cdist_backward<scalar_t, math::kCostL1>(a);
  }
};

template <typename scalar_t>
struct MaxFn {
  static void run(const CdistForwardArgs& a) { reduce_both_sides<scalar_t>(a, row_max<scalar_t>); }
};

template <typename scalar_t>
struct SlabFn {
  static void run(const ProbSlabArgs& a) { prob_slab<scalar_t>(a); }
};

template <typename scalar_t>
struct SqGradFn {
  static void run(const SqEuclideanGradArgs& a) { sqeuclidean_grad<scalar_t>(a); }
};

}  // namespace

void softmax_cdist_forward_kernel(const CdistForwardArgs& args) { dispatch_dtype<ForwardFn>(args); }
void softmax_cdist_max_kernel(const CdistForwardArgs& args) { dispatch_dtype<MaxFn>(args); }
void prob_slab_kernel(const ProbSlabArgs& args) { dispatch_dtype<SlabFn>(args); }
void sqeuclidean_grad_kernel(const SqEuclideanGradArgs& args) { dispatch_dtype<SqGradFn>(args); }
void softmax_cdist_backward_kernel(const CdistBackwardArgs& args) { dispatch_dtype<BackwardFn>(args); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
