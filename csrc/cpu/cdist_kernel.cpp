// CPU kernels of softmax_cdist, compiled per instruction set like divergence_kernel.cpp.
//
// Forward: one pass per row for its log-sum-exp, then one task per (batch, tile of kTile
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
constexpr int64_t kVBlock = 256;  // vocabulary elements per block (kTile blocks: 16 KB fp32)

template <typename scalar_t>
const scalar_t* cdist_row(const RowsView& view, int64_t G, int64_t r) {
  return row_ptr<scalar_t>(view, G, r);
}

// log sum_v exp(z_v * inv_t) of one row: blocked online max, then the sum rescaled on max
// updates. NaN anywhere gives NaN; an all -inf row gives -inf.
template <typename scalar_t>
PK_FLATTEN float row_lse(const scalar_t* row, int64_t V, float inv_t, float* buf) {
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
  return math::lse_value(m, hsum(acc) + tail);
}

// dst[0:n] = softmax probabilities of a block of one row, or zeros for a masked row.
template <typename scalar_t>
PK_FLATTEN void block_probs(const scalar_t* src, int64_t n, float inv_t, float lse, bool valid,
                            float* dst) {
  if (!valid) {
    std::fill(dst, dst + n, 0.f);
    return;
  }
  load_block(src, n, inv_t, dst);
  const Vec vl(lse);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) VecOps::exp(Vec::loadu(dst + i) - vl).store(dst + i);
  for (; i < n; ++i) dst[i] = ::expf(dst[i] - lse);
}

inline bool row_is_valid(const bool* row_valid, int64_t r) { return row_valid == nullptr || row_valid[r]; }

template <typename scalar_t>
void lse_rows(const RowsView& view, int64_t rows, int64_t G, int64_t V, float inv_t,
              const bool* row_valid, float* lse) {
  at::parallel_for(0, rows, grain_rows(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      lse[r] = row_is_valid(row_valid, r) ? row_lse(cdist_row<scalar_t>(view, G, r), V, inv_t, buf.data())
                                          : INFINITY;
    }
  });
}

// sum over a block of phi(q - p) and of q phi'(q - p).
template <int64_t Cost>
PK_FLATTEN void pair_block(const float* q, const float* p, int64_t n, float& c, float& a) {
  Vec vc(0.f), va(0.f);
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes) {
    const Vec qv = Vec::loadu(q + v);
    const Vec d = qv - Vec::loadu(p + v);
    vc = vc + math::cost_value<Cost, VecOps, Vec>(d);
    va = va + qv * math::cost_slope<Cost, VecOps, Vec>(d);
  }
  float tc = 0.f, ta = 0.f;
  for (; v < n; ++v) {
    const float d = q[v] - p[v];
    tc += math::cost_value<Cost, ScalarOps, float>(d);
    ta += q[v] * math::cost_slope<Cost, ScalarOps, float>(d);
  }
  c += hsum(vc) + tc;
  a += hsum(va) + ta;
}

// g[0:n] += w * phi'(x - y).
template <int64_t Cost>
PK_FLATTEN void slope_block(const float* x, const float* y, float w, int64_t n, float* g) {
  const Vec vw(w);
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes) {
    const Vec d = Vec::loadu(x + v) - Vec::loadu(y + v);
    (Vec::loadu(g + v) + vw * math::cost_slope<Cost, VecOps, Vec>(d)).store(g + v);
  }
  for (; v < n; ++v) g[v] += w * math::cost_slope<Cost, ScalarOps, float>(x[v] - y[v]);
}

template <typename scalar_t, int64_t Cost>
void cdist_forward(const CdistForwardArgs& a) {
  const int64_t V = a.V, Gs = a.Gs, Gt = a.Gt;
  lse_rows<scalar_t>(a.student, a.Bt * Gs, Gs, V, a.inv_t, a.row_valid, a.lse_s);
  lse_rows<scalar_t>(a.teacher, a.Bt * Gt, Gt, V, a.inv_t, a.row_valid, a.lse_t);
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
          const int64_t r = b * Gs + i0 + ii;
          block_probs(cdist_row<scalar_t>(a.student, Gs, r) + v0, n, a.inv_t, a.lse_s[r],
                      row_is_valid(a.row_valid, r), q.data() + ii * kVBlock);
        }
        for (int64_t j = 0; j < Gt; ++j) {
          const int64_t r = b * Gt + j;
          block_probs(cdist_row<scalar_t>(a.teacher, Gt, r) + v0, n, a.inv_t, a.lse_t[r],
                      row_is_valid(a.row_valid, r), p.data());
          for (int64_t ii = 0; ii < ni; ++ii) {
            pair_block<Cost>(q.data() + ii * kVBlock, p.data(), n, accC[ii * Gt + j], accA[ii * Gt + j]);
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
    std::vector<float> x(kTile * kVBlock), y(kVBlock), g(kTile * kVBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, i0 = (task % tiles) * kTile;
      const int64_t ni = std::min(kTile, Gx - i0);
      for (int64_t v0 = 0; v0 < V; v0 += kVBlock) {
        const int64_t n = std::min(kVBlock, V - v0);
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t r = b * Gx + i0 + ii;
          block_probs(cdist_row<scalar_t>(a.x, Gx, r) + v0, n, a.inv_t, a.lse_x[r],
                      row_is_valid(a.row_valid, r), x.data() + ii * kVBlock);
        }
        std::fill(g.begin(), g.end(), 0.f);
        for (int64_t j = 0; j < Gy; ++j) {
          const int64_t r = b * Gy + j;
          block_probs(cdist_row<scalar_t>(a.y, Gy, r) + v0, n, a.inv_t, a.lse_y[r],
                      row_is_valid(a.row_valid, r), y.data());
          for (int64_t ii = 0; ii < ni; ++ii) {
            const float w = a.weight[(b * Gx + i0 + ii) * Gy + j];
            slope_block<Cost>(x.data() + ii * kVBlock, y.data(), w, n, g.data() + ii * kVBlock);
          }
        }
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t r = b * Gx + i0 + ii;
          float* gi = g.data() + ii * kVBlock;
          const float* xi = x.data() + ii * kVBlock;
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

template <typename scalar_t>
struct ForwardFn {
  static void run(const CdistForwardArgs& a) {
    a.cost == math::kCostL1 ? cdist_forward<scalar_t, math::kCostL1>(a)
                            : cdist_forward<scalar_t, math::kCostSqEuclidean>(a);
  }
};

template <typename scalar_t>
struct BackwardFn {
  static void run(const CdistBackwardArgs& a) {
    a.cost == math::kCostL1 ? cdist_backward<scalar_t, math::kCostL1>(a)
                            : cdist_backward<scalar_t, math::kCostSqEuclidean>(a);
  }
};

}  // namespace

void softmax_cdist_forward_kernel(const CdistForwardArgs& args) { dispatch_dtype<ForwardFn>(args); }
void softmax_cdist_backward_kernel(const CdistBackwardArgs& args) { dispatch_dtype<BackwardFn>(args); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pykernels
