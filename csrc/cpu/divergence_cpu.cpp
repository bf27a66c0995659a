// CPU implementations of the divergence ops: tensor checks, output allocation, and the
// choice of the instruction-set build of the row kernels (divergence_kernel.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../ops_common.h"
#include "divergence_kernel.h"
#include "cpu_alloc.h"
#include "isa.h"

namespace pykernels {
namespace cpu {
namespace {



std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_forward_with_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, int64_t kind, double w, double inv_temperature,
    bool student_grad, bool teacher_grad, double row_weight) {
  check_divergence_inputs(student, teacher, row_valid, kind, c10::DeviceType::CPU);
  const int64_t B = student.size(0), T = student.size(1), V = student.size(2), N = B * T;
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({N}, f32);
  at::Tensor stats = at::empty({N, math::kStatsWidth}, f32);
  at::Tensor grad_s = empty_grad(student, student_grad);
  at::Tensor grad_t = empty_grad(teacher, teacher_grad);
  if (N == 0) return {row_loss, stats, grad_s, grad_t};
  DivForwardArgs args{student.scalar_type(),
                      B,
                      T,
                      V,
                      rows_view(student),
                      rows_view(teacher),
                      row_valid ? row_valid->const_data_ptr<bool>() : nullptr,
                      math::make_div_params(kind, w),
                      static_cast<float>(inv_temperature),
                      row_loss.mutable_data_ptr<float>(),
                      stats.mutable_data_ptr<float>(),
                      student_grad ? grad_s.mutable_data_ptr() : nullptr,
                      teacher_grad ? grad_t.mutable_data_ptr() : nullptr,
                      static_cast<float>(row_weight)};
  PK_ISA_PICK(divergence_forward_kernel)(args);
  return {row_loss, stats, grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor> divergence_forward_cpu(const at::Tensor& student,
                                                          const at::Tensor& teacher,
                                                          const std::optional<at::Tensor>& row_valid,
                                                          int64_t kind, double w,
                                                          double inv_temperature) {
  auto [row_loss, stats, gs, gt] = divergence_forward_with_grad_cpu(
      student, teacher, row_valid, kind, w, inv_temperature, false, false, 1.0);
  return {row_loss, stats};
}

std::tuple<at::Tensor, at::Tensor> divergence_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, const at::Tensor& stats, int64_t kind, double w,
    double inv_temperature, bool student_grad, bool teacher_grad) {
  check_divergence_inputs(student, teacher, row_valid, kind, c10::DeviceType::CPU);
  const int64_t B = student.size(0), T = student.size(1), V = student.size(2), N = B * T;
  check_backward_inputs(grad_row, stats, N);
  at::Tensor grad_s = empty_grad(student, student_grad);
  at::Tensor grad_t = empty_grad(teacher, teacher_grad);
  if (N == 0 || (!student_grad && !teacher_grad)) return {grad_s, grad_t};
  DivBackwardArgs args{student.scalar_type(),
                       B,
                       T,
                       V,
                       rows_view(student),
                       rows_view(teacher),
                       row_valid ? row_valid->const_data_ptr<bool>() : nullptr,
                       math::make_div_params(kind, w),
                       static_cast<float>(inv_temperature),
                       grad_row.const_data_ptr<float>(),
                       stats.const_data_ptr<float>(),
                       student_grad ? grad_s.mutable_data_ptr() : nullptr,
                       teacher_grad ? grad_t.mutable_data_ptr() : nullptr};
  PK_ISA_PICK(divergence_backward_kernel)(args);
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  using namespace pykernels;
  m.impl("divergence_forward", &divergence_forward_nd<cpu::divergence_forward_cpu>);
  m.impl("divergence_forward_with_grad",
         &divergence_forward_with_grad_nd<cpu::divergence_forward_with_grad_cpu>);
  m.impl("divergence_backward", &divergence_backward_nd<cpu::divergence_backward_cpu>);
}
