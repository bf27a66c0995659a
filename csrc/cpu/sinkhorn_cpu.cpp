// CPU implementations of the Sinkhorn iteration ops (contract in ../ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "isa.h"
#include "sinkhorn_kernel.h"

namespace pykernels {
namespace cpu {
namespace {

void check_plan(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(1) == t.size(2) && t.scalar_type() == at::kFloat && t.is_cpu(),
              "pykernels: ", name, " must be a float32 [groups, g, g] CPU tensor, got ", t.scalar_type(),
              " ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_iterations_forward_cpu(
    const at::Tensor& log_k, const std::optional<at::Tensor>& valid, int64_t n_iters, bool save_steps) {
  check_plan(log_k, "log_k");
  TORCH_CHECK(n_iters >= 0, "pykernels: n_iters must be >= 0, got ", n_iters);
  const int64_t groups = log_k.size(0), g = log_k.size(1);
  if (valid) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->is_contiguous() && valid->is_cpu() &&
                    valid->sizes() == at::IntArrayRef({groups, g}),
                "pykernels: valid must be a contiguous bool [", groups, ", ", g, "] CPU tensor, got ",
                valid->sizes());
  }
  at::Tensor plan = log_k.clone(at::MemoryFormat::Contiguous);
  at::Tensor steps = at::empty({save_steps ? 2 * n_iters : 0, groups, g, g}, plan.options());
  if (plan.numel() == 0) return {plan, steps};
  SinkhornForwardArgs args{};
  args.groups = groups, args.g = g, args.n_iters = n_iters;
  args.valid = valid ? valid->const_data_ptr<bool>() : nullptr;
  args.log_k = plan.mutable_data_ptr<float>();
  args.steps = save_steps ? steps.mutable_data_ptr<float>() : nullptr;
  PK_ISA_PICK(sinkhorn_iterations_forward_kernel)(args);
  return {plan, steps};
}

at::Tensor sinkhorn_iterations_backward_cpu(const at::Tensor& grad_plan, const at::Tensor& steps) {
  check_plan(grad_plan, "grad_plan");
  const int64_t groups = grad_plan.size(0), g = grad_plan.size(1);
  TORCH_CHECK(steps.dim() == 4 && steps.size(0) % 2 == 0 && steps.size(1) == groups && steps.size(2) == g &&
                  steps.size(3) == g && steps.scalar_type() == at::kFloat && steps.is_contiguous(),
              "pykernels: steps must be the forward's contiguous float32 [2 n_iters, ", groups, ", ", g, ", ", g,
              "] tensor, got ", steps.sizes());
  at::Tensor grad = grad_plan.clone(at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad;
  SinkhornBackwardArgs args{};
  args.groups = groups, args.g = g, args.n_iters = steps.size(0) / 2;
  args.steps = steps.const_data_ptr<float>();
  args.grad = grad.mutable_data_ptr<float>();
  PK_ISA_PICK(sinkhorn_iterations_backward_kernel)(args);
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("sinkhorn_iterations_forward", &pykernels::cpu::sinkhorn_iterations_forward_cpu);
  m.impl("sinkhorn_iterations_backward", &pykernels::cpu::sinkhorn_iterations_backward_cpu);
}
