// Internal argument checks shared by the CPU and CUDA op implementations. User-facing
// validation (names of public arguments, clear messages) happens in pykernels/_validate.py;
// these guard the op contract for direct torch.ops callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "pk_math.h"

namespace pykernels {

inline void check_divergence_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& row_valid, int64_t kind,
                                    c10::DeviceType device_type) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3,
              "pykernels: student and teacher must be [B, T, V] views, got ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "pykernels: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "pykernels: student and teacher dtypes differ");
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "pykernels: logits must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(student.device().type() == device_type && teacher.device() == student.device(),
              "pykernels: student and teacher must be on the same ", device_type, " device");
  TORCH_CHECK(student.size(2) >= 1, "pykernels: the vocabulary dimension is empty");
  TORCH_CHECK(student.size(2) == 1 || (student.stride(2) == 1 && teacher.stride(2) == 1),
              "pykernels: the vocabulary dimension must have unit stride");
  TORCH_CHECK(kind >= 0 && kind < math::kNumDivKinds, "pykernels: unknown kernel kind ", kind);
  if (row_valid) {
    TORCH_CHECK(row_valid->scalar_type() == at::kBool && row_valid->dim() == 1 &&
                    row_valid->numel() == student.size(0) * student.size(1) &&
                    row_valid->is_contiguous() && row_valid->device() == student.device(),
                "pykernels: row_valid must be a contiguous bool [B*T] tensor on the logits' device");
  }
}

inline void check_backward_inputs(const at::Tensor& grad_row, const at::Tensor& stats, int64_t N) {
  TORCH_CHECK(grad_row.scalar_type() == at::kFloat && grad_row.dim() == 1 &&
                  grad_row.numel() == N && grad_row.is_contiguous(),
              "pykernels: grad_row must be a contiguous float32 [B*T] tensor");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == N &&
                  stats.size(1) == math::kStatsWidth && stats.is_contiguous(),
              "pykernels: stats must be a contiguous float32 [B*T, 6] tensor");
}

// Views x and y (same shape [..., V]) as [B, T, V] with unit vocabulary stride, without a
// copy whenever the leading dims of BOTH tensors merge into at most two strided dims (e.g. a
// sliced logits[:, :-1]); otherwise (rare) falls back to contiguous copies. Row r of the 3-D
// view is leading index r in row-major order, so a contiguous [N, V] result has the layout of
// a contiguous tensor of the original shape.
inline std::pair<at::Tensor, at::Tensor> as_rows3d(at::Tensor x, at::Tensor y) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == y.sizes(), "pykernels: student ", x.sizes(),
              " and teacher ", y.sizes(), " must have the same shape [..., V]");
  const int64_t V = x.size(-1);
  if (V > 1 && x.stride(-1) != 1) x = x.contiguous();
  if (V > 1 && y.stride(-1) != 1) y = y.contiguous();
  struct Group {
    int64_t size, sx, sy;  // strides of the innermost dim of the group
  };
  std::vector<Group> groups;  // innermost group first
  for (int64_t d = x.dim() - 2; d >= 0; --d) {
    const int64_t n = x.size(d);
    if (n == 1) continue;
    if (!groups.empty()) {
      Group& g = groups.back();
      if (x.stride(d) == g.sx * g.size && y.stride(d) == g.sy * g.size) {
        g.size *= n;
        continue;
      }
    }
    groups.push_back({n, x.stride(d), y.stride(d)});
  }
  if (groups.size() > 2) {
    TORCH_WARN_ONCE(
        "pykernels: the logits' leading dims do not merge into two strided dims; copying them "
        "to contiguous memory (slice or permute before flattening to avoid the copy)");
    return as_rows3d(x.contiguous(), y.contiguous());
  }
  const Group inner = groups.empty() ? Group{1, V, V} : groups[0];
  const Group outer = groups.size() < 2 ? Group{1, inner.sx * inner.size, inner.sy * inner.size}
                                        : groups[1];
  const std::vector<int64_t> size{outer.size, inner.size, V};
  return {x.as_strided(size, {outer.sx, inner.sx, 1}),
          y.as_strided(size, {outer.sy, inner.sy, 1})};
}

using DivForwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                            const std::optional<at::Tensor>&,
                                                            int64_t, double, double);
using DivBackwardFn = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const at::Tensor&, int64_t, double, double, bool, bool);

// Registered entry points: [..., V] in, kernels on [B, T, V] views, gradients back in the
// input's shape (contiguous). One wrapper for every device's kernels.
template <DivForwardFn Kernel3d>
std::tuple<at::Tensor, at::Tensor> divergence_forward_nd(const at::Tensor& student,
                                                         const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& row_valid,
                                                         int64_t kind, double w,
                                                         double inv_temperature) {
  auto [s3, t3] = as_rows3d(student, teacher);
  return Kernel3d(s3, t3, row_valid, kind, w, inv_temperature);
}

using DivForwardWithGradFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double,
    double, bool, bool, double);

// Gradients come back in the input's shape: the kernels write [B, T, V] contiguous, which is
// the contiguous layout of [..., V].
inline at::Tensor grad_in_shape(const at::Tensor& grad, const at::Tensor& input, bool wanted) {
  return wanted ? grad.view(input.sizes()) : grad;
}

template <DivForwardWithGradFn Kernel3d>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward_with_grad_nd(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, int64_t kind, double w, double inv_temperature,
    bool student_grad, bool teacher_grad, double row_weight) {
  auto [s3, t3] = as_rows3d(student, teacher);
  auto [loss, stats, gs, gt] = Kernel3d(s3, t3, row_valid, kind, w, inv_temperature,
                                        student_grad, teacher_grad, row_weight);
  return {loss, stats, grad_in_shape(gs, student, student_grad),
          grad_in_shape(gt, teacher, teacher_grad)};
}

template <DivBackwardFn Kernel3d>
std::tuple<at::Tensor, at::Tensor> divergence_backward_nd(
    const at::Tensor& grad_row, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, const at::Tensor& stats, int64_t kind, double w,
    double inv_temperature, bool student_grad, bool teacher_grad) {
  auto [s3, t3] = as_rows3d(student, teacher);
  auto [gs, gt] = Kernel3d(grad_row, s3, t3, row_valid, stats, kind, w, inv_temperature,
                           student_grad, teacher_grad);
  return {grad_in_shape(gs, student, student_grad), grad_in_shape(gt, teacher, teacher_grad)};
}

// ---- token log-probs + entropy ----

inline void check_logprob_inputs(const at::Tensor& logits3d, const at::Tensor& tokens,
                                 c10::DeviceType device_type) {
  check_divergence_inputs(logits3d, logits3d, std::nullopt, 0, device_type);
  const int64_t N = logits3d.size(0) * logits3d.size(1);
  TORCH_CHECK((tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt) &&
                  tokens.dim() == 1 && tokens.numel() == N && tokens.is_contiguous() &&
                  tokens.device() == logits3d.device(),
              "pykernels: tokens must be a contiguous int64/int32 [N] tensor on the logits' device");
}

using LogprobForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor&,
                                                                          const at::Tensor&,
                                                                          double, bool);
using LogprobBackwardFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, double);

template <LogprobForwardFn Kernel3d>
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprob_forward_nd(const at::Tensor& logits,
                                                                        const at::Tensor& tokens,
                                                                        double inv_temperature,
                                                                        bool with_entropy) {
  auto x3 = as_rows3d(logits, logits).first;
  return Kernel3d(x3, tokens, inv_temperature, with_entropy);
}

template <LogprobBackwardFn Kernel3d>
at::Tensor token_logprob_backward_nd(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                     const at::Tensor& logits, const at::Tensor& tokens,
                                     const at::Tensor& stats, double inv_temperature) {
  auto x3 = as_rows3d(logits, logits).first;
  return grad_in_shape(Kernel3d(grad_logp, grad_entropy, x3, tokens, stats, inv_temperature),
                       logits, true);
}

// ---- softmax cdist ----

// x [Bt, G, V] logits with unit vocabulary stride (the op contract; pykernels/_sinkhorn.py
// builds these views), on the given device.
inline void check_cdist_rows(const at::Tensor& x, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 3, "pykernels: ", name, " must be a [Bt, G, V] view, got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "pykernels: ", name, " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.device().type() == device_type, "pykernels: ", name, " must be a ", device_type,
              " tensor");
  TORCH_CHECK(x.size(2) >= 1, "pykernels: the vocabulary dimension of ", name, " is empty");
  TORCH_CHECK(x.size(2) == 1 || x.stride(2) == 1,
              "pykernels: the vocabulary dimension of ", name, " must have unit stride");
}

inline void check_cdist_pair(const at::Tensor& x, const at::Tensor& y,
                             const std::optional<at::Tensor>& row_valid, int64_t cost,
                             c10::DeviceType device_type, const char* x_name = "student",
                             const char* y_name = "teacher") {
  check_cdist_rows(x, x_name, device_type);
  check_cdist_rows(y, y_name, device_type);
  TORCH_CHECK(x.size(0) == y.size(0) && x.size(2) == y.size(2), "pykernels: ", x.sizes(), " and ",
              y.sizes(), " must agree in batch and vocabulary size");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.device() == y.device(),
              "pykernels: both sides must have the same dtype and device");
  TORCH_CHECK(cost >= 0 && cost < math::kNumCdistCosts, "pykernels: unknown cdist cost ", cost);
  if (row_valid) {
    TORCH_CHECK(x.size(1) == y.size(1), "pykernels: row_valid needs as many rows on both sides");
    TORCH_CHECK(row_valid->scalar_type() == at::kBool && row_valid->dim() == 1 &&
                    row_valid->numel() == x.size(0) * x.size(1) && row_valid->is_contiguous() &&
                    row_valid->device() == x.device(),
                "pykernels: row_valid must be a contiguous bool [Bt*G] tensor on the logits' device");
  }
}

inline void check_f32(const at::Tensor& t, at::IntArrayRef sizes, const char* name,
                      const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == sizes && t.is_contiguous() &&
                  t.device() == like.device(),
              "pykernels: ", name, " must be a contiguous float32 ", sizes, " tensor on the logits' device, got ",
              t.sizes());
}

// The forward op's outputs (C, A, norm_s, norm_t), fp32 on the logits' device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cdist_outputs(
    const at::Tensor& student, const at::Tensor& teacher) {
  const int64_t Bt = student.size(0), Gs = student.size(1), Gt = teacher.size(1);
  const auto f32 = student.options().dtype(at::kFloat);
  return {at::empty({Bt, Gs, Gt}, f32), at::empty({Bt, Gs, Gt}, f32),
          at::empty({Bt * Gs, math::kNormWidth}, f32), at::empty({Bt * Gt, math::kNormWidth}, f32)};
}

// The backward op's contract, checked once for every device's kernel.
inline void check_cdist_backward(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& y,
                                 const at::Tensor& norm_x, const at::Tensor& norm_y,
                                 const at::Tensor& dot_x,
                                 const std::optional<at::Tensor>& row_valid, int64_t cost,
                                 c10::DeviceType device_type) {
  check_cdist_pair(x, y, row_valid, cost, device_type, "x", "y");
  const int64_t Bt = x.size(0), Gx = x.size(1), Gy = y.size(1);
  check_f32(weight, {Bt, Gx, Gy}, "weight", x);
  check_f32(norm_x, {Bt * Gx, math::kNormWidth}, "norm_x", x);
  check_f32(norm_y, {Bt * Gy, math::kNormWidth}, "norm_y", x);
  check_f32(dot_x, {Bt * Gx}, "dot_x", x);
}

}  // namespace pykernels
