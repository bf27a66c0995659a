// CPU implementations of the token log-prob + entropy ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../ops_common.h"
#include "cpu_alloc.h"
#include "isa.h"
#include "logprob_kernel.h"

namespace pykernels {
namespace cpu {
namespace {

// The fields both argument structs share: logits geometry, tokens, temperature.
template <class Args>
Args row_args(const at::Tensor& logits, const at::Tensor& tokens, double inv_temperature) {
  Args args{};
  args.dtype = logits.scalar_type();
  args.B = logits.size(0), args.T = logits.size(1), args.V = logits.size(2);
  args.logits = rows_view(logits);
  args.tokens64 = tokens.scalar_type() == at::kLong ? tokens.const_data_ptr<int64_t>() : nullptr;
  args.tokens32 = tokens.scalar_type() == at::kInt ? tokens.const_data_ptr<int32_t>() : nullptr;
  args.inv_t = static_cast<float>(inv_temperature);
  return args;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprob_forward_cpu(
    const at::Tensor& logits, const at::Tensor& tokens, double inv_temperature,
    bool with_entropy) {
  check_logprob_inputs(logits, tokens, c10::DeviceType::CPU);
  const int64_t N = logits.size(0) * logits.size(1);
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32);
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, f32);
  at::Tensor stats = at::empty({N, math::kLogprobStatsWidth}, f32);
  if (N == 0) return {logp, entropy, stats};
  auto args = row_args<LogprobForwardArgs>(logits, tokens, inv_temperature);
  args.logp = logp.mutable_data_ptr<float>();
  args.entropy = with_entropy ? entropy.mutable_data_ptr<float>() : nullptr;
  args.stats = stats.mutable_data_ptr<float>();
  PK_ISA_PICK(token_logprob_forward_kernel)(args);
  return {logp, entropy, stats};
}

at::Tensor token_logprob_backward_cpu(const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                                      const at::Tensor& logits, const at::Tensor& tokens,
                                      const at::Tensor& stats, double inv_temperature) {
  check_logprob_inputs(logits, tokens, c10::DeviceType::CPU);
  const int64_t N = logits.size(0) * logits.size(1);
  TORCH_CHECK(grad_logp.scalar_type() == at::kFloat && grad_logp.numel() == N &&
                  grad_logp.is_contiguous(),
              "pykernels: grad_logp must be a contiguous float32 [N] tensor");
  TORCH_CHECK(grad_entropy.numel() == 0 || (grad_entropy.scalar_type() == at::kFloat &&
                                            grad_entropy.numel() == N &&
                                            grad_entropy.is_contiguous()),
              "pykernels: grad_entropy must be empty or a contiguous float32 [N] tensor");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == N &&
                  stats.size(1) == math::kLogprobStatsWidth && stats.is_contiguous(),
              "pykernels: stats must be a contiguous float32 [N, 3] tensor");
  at::Tensor grad = empty_grad(logits, true);
  if (N == 0) return grad;
  auto args = row_args<LogprobBackwardArgs>(logits, tokens, inv_temperature);
  args.grad_logp = grad_logp.const_data_ptr<float>();
  args.grad_entropy = grad_entropy.numel() ? grad_entropy.const_data_ptr<float>() : nullptr;
  args.stats = stats.const_data_ptr<float>();
  args.grad_logits = grad.mutable_data_ptr();
  PK_ISA_PICK(token_logprob_backward_kernel)(args);
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  using namespace pykernels;
  m.impl("token_logprob_forward", &token_logprob_forward_nd<cpu::token_logprob_forward_cpu>);
  m.impl("token_logprob_backward", &token_logprob_backward_nd<cpu::token_logprob_backward_cpu>);
}
