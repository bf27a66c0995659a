// CPU implementations of the softmax_cdist ops (contract in ../ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include <optional>
#include <tuple>

#include "../ops_common.h"
#include "cdist_kernel.h"
#include "cpu_alloc.h"
#include "isa.h"

namespace pykernels {
namespace cpu {
namespace {

const bool* valid_ptr(const std::optional<at::Tensor>& row_valid) {
  return row_valid ? row_valid->const_data_ptr<bool>() : nullptr;
}

// Columns per probability slab of the squared distance: both sides' slabs together about 8 MB.
int64_t slab_columns(int64_t rows, int64_t V) {
  const int64_t n = (int64_t{2} << 20) / std::max<int64_t>(rows, 1);
  return std::min(V, std::max<int64_t>(64, n / 64 * 64));
}

// [rows, n] fp32 exp(x inv_t - m) / S of x's rows over the columns [v0, v0 + n), with
// (m, 1 / S) the rows' norm (the probabilities; ProbSlabArgs); each row's sum of their squares,
// and of them, over the slab is added to sq_norm and row_sum when given.
at::Tensor prob_slab(const at::Tensor& x, const bool* valid, const at::Tensor& norm, float inv_t,
                     int64_t v0, int64_t n, at::Tensor* sq_norm = nullptr,
                     at::Tensor* row_sum = nullptr) {
  at::Tensor out = at::empty({x.size(0), x.size(1), n}, x.options().dtype(at::kFloat));
  ProbSlabArgs args{};
  args.dtype = x.scalar_type();
  args.rows = x.size(0) * x.size(1), args.G = x.size(1), args.V = x.size(2);
  args.x = rows_view(x);
  args.row_valid = valid;
  args.norm = norm.const_data_ptr<float>();
  args.inv_t = inv_t;
  args.v0 = v0, args.n = n;
  args.out = out.mutable_data_ptr<float>();
  args.sq_norm = sq_norm ? sq_norm->mutable_data_ptr<float>() : nullptr;
  args.row_sum = row_sum ? row_sum->mutable_data_ptr<float>() : nullptr;
  PK_ISA_PICK(prob_slab_kernel)(args);
  return out;
}

// Completes the rows' norm (max m, 1) into (m, 1 / row_sum) (masked rows keep
// masked_row_norm()) and returns 1 / row_sum, 0 where the sum is 0 (masked rows, whose terms
// are all 0, or V = 0).
at::Tensor finish_norm(at::Tensor& norm, const at::Tensor& row_sum, const bool* valid) {
  at::Tensor inv_sum = at::empty_like(row_sum);
  float* nr = norm.mutable_data_ptr<float>();
  const float* s = row_sum.const_data_ptr<float>();
  float* inv = inv_sum.mutable_data_ptr<float>();
  for (int64_t r = 0; r < row_sum.numel(); ++r) {
    inv[r] = s[r] == 0.f ? 0.f : 1.f / s[r];
    if (valid == nullptr || valid[r]) math::store_norm(nr, r, {math::load_norm(nr, r).m, inv[r]});
  }
  return inv_sum.view(row_sum.sizes());
}

// Squared distance as |q|^2 + |p|^2 - 2 q.p, with the products accumulated by batched matrix
// multiplies over column slabs of on-the-fly terms (BLAS instead of G^2 V elementwise terms;
// never more than a slab at a time). The slabs hold exp(z - max) (norm_s / norm_t hold (max, 1)
// on entry), and the sums are divided by the rows' exp sums at the end: one exp per logit in
// the forward, where a log-sum-exp pass first would take two.
void sqeuclidean_forward(const at::Tensor& student, const at::Tensor& teacher, const bool* valid,
                         at::Tensor& norm_s, at::Tensor& norm_t, float inv_t, at::Tensor& C,
                         at::Tensor& A) {
  const int64_t V = student.size(2);
  const int64_t step = slab_columns(student.size(0) * (student.size(1) + teacher.size(1)), V);
  at::Tensor dots = at::zeros_like(C);
  at::Tensor nq = at::zeros({student.size(0), student.size(1)}, C.options());
  at::Tensor np = at::zeros({teacher.size(0), teacher.size(1)}, C.options());
  at::Tensor sq = at::zeros_like(nq), sp = at::zeros_like(np);
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    const at::Tensor q = prob_slab(student, valid, norm_s, inv_t, v0, n, &nq, &sq);
    const at::Tensor p = prob_slab(teacher, valid, norm_t, inv_t, v0, n, &np, &sp);
    dots.baddbmm_(q, p.transpose(1, 2));
  }
  const at::Tensor inv_q = finish_norm(norm_s, sq, valid), inv_p = finish_norm(norm_t, sp, valid);
  nq.mul_(inv_q * inv_q), np.mul_(inv_p * inv_p);
  dots.mul_(inv_q.unsqueeze(2) * inv_p.unsqueeze(1));
  // rounding can take the difference below 0; clamp_min keeps NaN
  at::clamp_min_out(C, nq.unsqueeze(2) + np.unsqueeze(1) - 2 * dots, 0);
  at::mul_out(A, nq.unsqueeze(2) - dots, 2);
}

// dz_x = inv_t x (2 (x sum_j W_ij - W @ Y) - dot_x), slab by slab: one matrix product per slab
// of y's probabilities, then one kernel pass that recomputes x's and writes the gradient.
void sqeuclidean_backward(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& y,
                          const bool* valid, const at::Tensor& norm_x, const at::Tensor& norm_y,
                          const at::Tensor& dot_x, float inv_t, at::Tensor& grad) {
  const int64_t V = x.size(2);
  const int64_t step = slab_columns(x.size(0) * (x.size(1) + y.size(1)), V);
  const at::Tensor w_total = weight.sum(-1);  // [Bt, Gx], contiguous
  SqEuclideanGradArgs args{};
  args.dtype = x.scalar_type();
  args.rows = x.size(0) * x.size(1), args.G = x.size(1), args.V = V;
  args.x = rows_view(x);
  args.row_valid = valid;
  args.norm = norm_x.const_data_ptr<float>();
  args.w_total = w_total.const_data_ptr<float>();
  args.dot = dot_x.const_data_ptr<float>();  // contiguous: check_cdist_backward
  args.inv_t = inv_t;
  args.grad = grad.mutable_data_ptr();
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    const at::Tensor wy = at::bmm(weight, prob_slab(y, valid, norm_y, inv_t, v0, n));  // sum_j W_ij y_j
    args.wy = wy.const_data_ptr<float>();
    args.v0 = v0, args.n = n;
    PK_ISA_PICK(sqeuclidean_grad_kernel)(args);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cdist_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, int64_t cost, double inv_temperature) {
  check_cdist_pair(student, teacher, row_valid, cost, c10::DeviceType::CPU);
  const int64_t Bt = student.size(0), Gs = student.size(1), Gt = teacher.size(1);
  auto [C, A, norm_s, norm_t] = cdist_outputs(student, teacher);
  CdistForwardArgs args{};
  args.dtype = student.scalar_type();
  args.Bt = Bt, args.Gs = Gs, args.Gt = Gt, args.V = student.size(2);
  args.student = rows_view(student), args.teacher = rows_view(teacher);
  args.row_valid = valid_ptr(row_valid);
  args.cost = cost;
  args.inv_t = static_cast<float>(inv_temperature);
  args.C = C.mutable_data_ptr<float>(), args.A = A.mutable_data_ptr<float>();
  args.norm_s = norm_s.mutable_data_ptr<float>(), args.norm_t = norm_t.mutable_data_ptr<float>();
  if (cost == math::kCostSqEuclidean) {
    PK_ISA_PICK(softmax_cdist_max_kernel)(args);
    sqeuclidean_forward(student, teacher, args.row_valid, norm_s, norm_t, args.inv_t, C, A);
  } else {
    PK_ISA_PICK(softmax_cdist_forward_kernel)(args);
  }
  return {C, A, norm_s, norm_t};
}

at::Tensor softmax_cdist_backward_cpu(const at::Tensor& weight, const at::Tensor& x,
                                      const at::Tensor& y, const at::Tensor& norm_x,
                                      const at::Tensor& norm_y, const at::Tensor& dot_x,
                                      const std::optional<at::Tensor>& row_valid, int64_t cost,
                                      double inv_temperature) {
  check_cdist_backward(weight, x, y, norm_x, norm_y, dot_x, row_valid, cost, c10::DeviceType::CPU);
  at::Tensor grad = empty_grad(x, true);
  if (x.numel() == 0) return grad;
  if (cost == math::kCostSqEuclidean) {
    sqeuclidean_backward(weight, x, y, valid_ptr(row_valid), norm_x, norm_y, dot_x,
                         static_cast<float>(inv_temperature), grad);
    return grad;
  }
  CdistBackwardArgs args{};
  args.dtype = x.scalar_type();
  args.Bt = x.size(0), args.Gx = x.size(1), args.Gy = y.size(1), args.V = x.size(2);
  args.x = rows_view(x), args.y = rows_view(y);
  args.row_valid = valid_ptr(row_valid);
  args.cost = cost;
  args.inv_t = static_cast<float>(inv_temperature);
  args.weight = weight.const_data_ptr<float>();
  args.norm_x = norm_x.const_data_ptr<float>(), args.norm_y = norm_y.const_data_ptr<float>();
  args.dot_x = dot_x.const_data_ptr<float>();
  args.grad_x = grad.mutable_data_ptr();
  PK_ISA_PICK(softmax_cdist_backward_kernel)(args);
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("softmax_cdist_forward", &pykernels::cpu::softmax_cdist_forward_cpu);
  m.impl("softmax_cdist_backward", &pykernels::cpu::softmax_cdist_backward_cpu);
}
