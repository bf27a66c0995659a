// CPU implementations of the softmax_cdist ops (contract in ../ops.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cdist_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& row_valid, int64_t cost, double inv_temperature) {
  check_cdist_pair(student, teacher, row_valid, cost, c10::DeviceType::CPU);
  const int64_t Bt = student.size(0), Gs = student.size(1), Gt = teacher.size(1);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor C = at::empty({Bt, Gs, Gt}, f32), A = at::empty({Bt, Gs, Gt}, f32);
  at::Tensor lse_s = at::empty({Bt * Gs}, f32), lse_t = at::empty({Bt * Gt}, f32);
  CdistForwardArgs args{};
  args.dtype = student.scalar_type();
  args.Bt = Bt, args.Gs = Gs, args.Gt = Gt, args.V = student.size(2);
  args.student = rows_view(student), args.teacher = rows_view(teacher);
  args.row_valid = valid_ptr(row_valid);
  args.cost = cost;
  args.inv_t = static_cast<float>(inv_temperature);
  args.C = C.mutable_data_ptr<float>(), args.A = A.mutable_data_ptr<float>();
  args.lse_s = lse_s.mutable_data_ptr<float>(), args.lse_t = lse_t.mutable_data_ptr<float>();
  PK_ISA_PICK(softmax_cdist_forward_kernel)(args);
  return {C, A, lse_s, lse_t};
}

at::Tensor softmax_cdist_backward_cpu(const at::Tensor& weight, const at::Tensor& x,
                                      const at::Tensor& y, const at::Tensor& lse_x,
                                      const at::Tensor& lse_y, const at::Tensor& dot_x,
                                      const std::optional<at::Tensor>& row_valid, int64_t cost,
                                      double inv_temperature) {
  check_cdist_backward(weight, x, y, lse_x, lse_y, dot_x, row_valid, cost, c10::DeviceType::CPU);
  at::Tensor grad = empty_grad(x, true);
  if (x.numel() == 0) return grad;
  CdistBackwardArgs args{};
  args.dtype = x.scalar_type();
  args.Bt = x.size(0), args.Gx = x.size(1), args.Gy = y.size(1), args.V = x.size(2);
  args.x = rows_view(x), args.y = rows_view(y);
  args.row_valid = valid_ptr(row_valid);
  args.cost = cost;
  args.inv_t = static_cast<float>(inv_temperature);
  args.weight = weight.const_data_ptr<float>();
  args.lse_x = lse_x.const_data_ptr<float>(), args.lse_y = lse_y.const_data_ptr<float>();
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
