// Op schemas of the pykernels library and the Python module entry point.
//
// Schemas live here once; CPU and CUDA kernels register implementations for them with
// TORCH_LIBRARY_IMPL in their own files, and pykernels/_registry.py adds fake tensors and
// autograd from Python. Importing pykernels._C is what loads these registrations.
#include <Python.h>
#include <torch/library.h>

#include "cpu/divergence_kernel.h"
#include "cpu/isa.h"

namespace pykernels::cpu {
namespace {
// _C.parallel_threads(): threads the CPU kernels' at::parallel_for runs on (build check).
PyObject* parallel_threads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(PK_ISA_PICK(parallel_threads_probe)());
}
PyMethodDef methods[] = {
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "Threads the CPU kernels' parallel loops run on in this process."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace
}  // namespace pykernels::cpu

// Ops are reached through torch.ops.pykernels; the module itself only holds the build check.
// (PyMODINIT_FUNC keeps the symbol visible under -fvisibility=hidden.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pykernels C++ ops", -1,
                                          pykernels::cpu::methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pykernels, m) {
  // Per-row divergence of kernel kind `kind` (pk_math.h DivKind) between softmax(student *
  // inv_temperature) and softmax(teacher * inv_temperature). Inputs are [B, T, V] views with
  // unit vocabulary stride; returns (row_loss [B*T] fp32, stats [B*T, 6] fp32, the layout of
  // pk_math.h kStat*).
  m.def(
      "divergence_forward(Tensor student, Tensor teacher, Tensor? row_valid, int kind, float w, "
      "float inv_temperature) -> (Tensor, Tensor)");
  // divergence_forward plus the gradients of row_weight * row_loss[r] for every row, computed
  // from the same passes, so that the backward has nothing (or only a row scaling) left to do.
  // CPU only, where the exps a separate backward would redo are the main cost. Gradients not
  // asked for are empty tensors.
  m.def(
      "divergence_forward_with_grad(Tensor student, Tensor teacher, Tensor? row_valid, int kind, "
      "float w, float inv_temperature, bool student_grad, bool teacher_grad, float row_weight) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Token log-probability log softmax(logits * inv_temperature)[token] per row and, with
  // with_entropy, the entropy of that softmax; returns (logp [N], entropy [N] or empty,
  // stats [N, 3] = (max, log sum-exp against it, entropy)) in fp32. logits is [..., V], tokens the flattened [N].
  m.def(
      "token_logprob_forward(Tensor logits, Tensor tokens, float inv_temperature, "
      "bool with_entropy) -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. the logits of sum_r grad_logp[r] * logp[r] + grad_entropy[r] * H[r]
  // (grad_entropy may be empty: no entropy term). A token outside [0, V) adds no one-hot
  // term (-inv_T grad_logp q alone): selective_log_softmax's K form scatters its own in.
  m.def(
      "token_logprob_backward(Tensor grad_logp, Tensor grad_entropy, Tensor logits, "
      "Tensor tokens, Tensor stats, float inv_temperature) -> Tensor");
  // Cost matrix between the softmax rows of student [Bt, Gs, V] and teacher [Bt, Gt, V]
  // (unit vocabulary stride), cost 0 = l1, 1 = squared euclidean (pk_math.h CdistCost). Returns
  // (C [Bt, Gs, Gt], A [Bt, Gs, Gt], norm_s [Bt*Gs, 2], norm_t [Bt*Gt, 2]) in fp32, with
  // C_ij = sum_v phi(q_iv - p_jv), A_ij = sum_v q_iv phi'(q_iv - p_jv) and each row's softmax
  // normaliser (m, 1 / S) (pk_math.h ProbNorm). Rows flagged false in row_valid ([Bt*G] bool,
  // only when Gs == Gt) have all-zero probabilities.
  m.def(
      "softmax_cdist_forward(Tensor student, Tensor teacher, Tensor? row_valid, int cost, "
      "float inv_temperature) -> (Tensor, Tensor, Tensor, Tensor)");
  // One side's gradient: dz_x = inv_t * q_x * (sum_j weight_ij phi'(q_x,i - q_y,j) - dot_x,i)
  // for x [Bt, Gx, V], y [Bt, Gy, V], weight [Bt, Gx, Gy], dot_x [Bt*Gx]; contiguous, x's dtype.
  m.def(
      "softmax_cdist_backward(Tensor weight, Tensor x, Tensor y, Tensor norm_x, Tensor norm_y, "
      "Tensor dot_x, Tensor? row_valid, int cost, float inv_temperature) -> Tensor");
  // Log-domain Sinkhorn iterations on log_k [groups, g, g] fp32 (-C / eps, -inf on masked
  // pairs): n_iters times every row, then every column, minus its logsumexp; lines flagged
  // false in valid ([groups, g] bool) are left as they are. Returns (log plan, steps): steps
  // [2 n_iters, groups, g, g] holds every half-step's result when save_steps, else is empty.
  m.def(
      "sinkhorn_iterations_forward(Tensor log_k, Tensor? valid, int n_iters, bool save_steps) "
      "-> (Tensor, Tensor)");
  // d/d(log_k) from d/d(log plan) and the forward's steps.
  m.def("sinkhorn_iterations_backward(Tensor grad_plan, Tensor steps) -> Tensor");
  // Gradients of sum_r grad_row[r] * row_loss[r]; an output not asked for is an empty tensor.
  m.def(
      "divergence_backward(Tensor grad_row, Tensor student, Tensor teacher, Tensor? row_valid, "
      "Tensor stats, int kind, float w, float inv_temperature, bool student_grad, "
      "bool teacher_grad) -> (Tensor, Tensor)");
}
