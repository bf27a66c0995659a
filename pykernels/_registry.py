"""Op registration in one place: fake tensors and autograd for the C++ ops, the Triton ops
(torch.library.triton_op), and the per-backend entries (`divergence_rows`,
`token_logprob_rows`, `softmax_cdist_3d`).

Every kernel backend exposes the same pair of ops (schemas in csrc/ops.cpp):
  *_divergence_forward(student, teacher, row_valid, kind, w, inv_temperature)
      -> (row_loss [N] fp32, stats [N, STATS_WIDTH] fp32)
  *_divergence_backward(grad_row, student, teacher, row_valid, stats, kind, w,
                        inv_temperature, student_grad, teacher_grad) -> (grad_student, grad_teacher)
with student/teacher of shape [..., V]. Autograd saves only the inputs (no copies) and the
O(N) stats; backward is a single pass over the logits.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from . import _backend, _torch_backend

_LIB = "pykernels"

# Per-row floats the forward ops save for backward (csrc/pk_math.h kStatsWidth and
# kLogprobStatsWidth; the Triton kernels use the same layouts): each softmax's normaliser as
# (max, log sum-exp against it), then the divergence's two row scalars or the entropy.
STATS_WIDTH = 6
LOGPROB_STATS_WIDTH = 3
NORM_WIDTH = 2  # a cdist row's softmax normaliser (max, 1 / sum-exp): pk_math.h ProbNorm


def _rows(student: torch.Tensor) -> int:
    return math.prod(student.shape[:-1])


def _fake_forward(student, teacher, row_valid, kind, w, inv_temperature):
    n = _rows(student)
    return (
        student.new_empty((n,), dtype=torch.float32),
        student.new_empty((n, STATS_WIDTH), dtype=torch.float32),
    )


def _fake_backward(grad_row, student, teacher, row_valid, stats, kind, w, inv_temperature,
                   student_grad, teacher_grad):
    def grad_like(x, wanted):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if wanted else x.new_empty((0,))

    return grad_like(student, student_grad), grad_like(teacher, teacher_grad)


def _fake_forward_with_grad(student, teacher, row_valid, kind, w, inv_temperature,
                            student_grad, teacher_grad, row_weight):
    row_loss, stats = _fake_forward(student, teacher, row_valid, kind, w, inv_temperature)
    grad_s, grad_t = _fake_backward(None, student, teacher, row_valid, stats, kind, w,
                                    inv_temperature, student_grad, teacher_grad)
    return row_loss, stats, grad_s, grad_t


def _setup_context(ctx, inputs, output):
    student, teacher, row_valid, kind, w, inv_temperature = inputs
    _, stats = output
    ctx.save_for_backward(student, teacher, row_valid, stats)
    ctx.params = (kind, w, inv_temperature)
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _autograd_backward(backward_op):
    def backward(ctx, grad_row, _grad_stats):
        student, teacher, row_valid, stats = ctx.saved_tensors
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_row is None:  # the row losses did not reach the output
            return (None,) * 6
        grad_s, grad_t = backward_op(
            grad_row.to(torch.float32).contiguous(), student, teacher, row_valid, stats,
            *ctx.params, want_s, want_t,
        )
        return (grad_s if want_s else None, grad_t if want_t else None, None, None, None, None)

    return backward


def _setup_fused_context(ctx, inputs, output):
    student, teacher, row_valid, kind, w, inv_temperature, _, _, row_weight = inputs
    _, stats, grad_s, grad_t = output
    ctx.save_for_backward(student, teacher, row_valid, stats)
    ctx.params = (kind, w, inv_temperature)
    ctx.row_weight = row_weight
    # Not saved tensors: backward scales them in place, which a saved tensor's version check
    # would reject on a second backward. They are non-differentiable outputs, so no cycle.
    ctx.unit_grads = (grad_s, grad_t)
    ctx.mark_non_differentiable(stats, grad_s, grad_t)
    # Otherwise autograd hands backward a zero-filled N x V tensor for each of these outputs.
    ctx.set_materialize_grads(False)


def _uniform_scale(grad_row: torch.Tensor, row_weight: float) -> float | None:
    """grad_row / row_weight when grad_row is one value broadcast over the rows (what the
    batchmean / sum / mean reductions send back), else None. CPU tensors: no device sync."""
    if grad_row.dim() != 1 or grad_row.numel() == 0 or grad_row.stride(0) != 0:
        return None
    return grad_row[0].item() / row_weight


def _exact_scale(scale: float | None) -> bool:
    """1 or a power of two: scaling by it cannot round a 16-bit gradient a second time."""
    return scale is not None and math.isfinite(scale) and scale != 0 and math.frexp(scale)[0] in (0.5, -0.5)


def _scaled(grad: torch.Tensor, scale) -> torch.Tensor:
    """grad * scale, in place when nothing but the autograd node holds grad (pykernels' own
    calls drop the op's gradient outputs at once; a direct caller of the op may keep them)."""
    # References: the ctx tuple was released by the caller; the argument and this frame's
    # parameter remain.
    if sys.getrefcount(grad) <= 3:
        return grad.mul_(scale)
    return grad * scale


def _fused_backward(ctx, grad_row, *_unused):
    """Backward of divergence_forward_with_grad: the forward already computed the gradient of
    row_weight * row_loss (row_weight = 1 / the reduction's divisor), so the first backward of a
    plain `loss.backward()` returns it untouched, and other upstream gradients scale it in place
    (the buffers belong to this node alone) when that adds no rounding a 16-bit gradient would
    feel: fp32, or a power-of-two scale. Otherwise, and for a second backward
    (retain_graph=True), a traced graph (no Python state) or create_graph=True, the backward
    kernel recomputes the gradient from the logits."""
    student, teacher = ctx.saved_tensors[:2]
    if grad_row is None:
        return (None,) * 8
    want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    unit = ctx.unit_grads
    usable = unit is not None and (not want_s or unit[0].shape == student.shape) and (
        not want_t or unit[1].shape == teacher.shape)
    # create_graph=True (grad mode on here) goes through the backward op, whose own backward
    # raises the double-backward error instead of silently dropping second-order terms.
    # A traced graph (torch.compile, AOT dispatch: grads are tensor subclasses there) cannot
    # keep Python state either.
    eager = type(grad_row) is torch.Tensor and not torch.compiler.is_compiling()
    if usable and eager and not torch.is_grad_enabled():
        scale = _uniform_scale(grad_row, ctx.row_weight)
        if _exact_scale(scale) or student.dtype == torch.float32:
            ctx.unit_grads = None  # consumed: a second backward recomputes
            if scale is None:
                scale = grad_row.to(torch.float32).reshape(*student.shape[:-1], 1) / ctx.row_weight
            grad_s, grad_t = unit
            del unit
            if not (isinstance(scale, float) and scale == 1.0):
                grad_s = _scaled(grad_s, scale) if want_s else None
                grad_t = _scaled(grad_t, scale) if want_t else None
            return (grad_s if want_s else None, grad_t if want_t else None) + (None,) * 7
    return _autograd_backward(torch.ops.pykernels.divergence_backward)(ctx, grad_row, None) + (None,) * 3


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "pykernels: double backward (differentiating a gradient) is not supported by the "
        "fused kernels; use backend='torch' if you need higher-order gradients"
    )


# An op pair: fake tensors (C++ ops only: triton_op traces its own), autograd of the forward
# through the backward op, and a clear error for differentiating the backward.
_PAIRS = {}  # family -> (fake forward, fake backward, backward factory, setup_context)


def _register_op_pair(family: str, forward_name: str, backward_name: str, fake: bool) -> None:
    fake_forward, fake_backward, make_backward, setup_context = _PAIRS[family]
    if fake:
        torch.library.register_fake(f"{_LIB}::{forward_name}")(fake_forward)
        torch.library.register_fake(f"{_LIB}::{backward_name}")(fake_backward)
    torch.library.register_autograd(
        f"{_LIB}::{forward_name}", make_backward(getattr(torch.ops.pykernels, backward_name)),
        setup_context=setup_context)
    torch.library.register_autograd(
        f"{_LIB}::{backward_name}", _no_double_backward, setup_context=lambda ctx, inputs, output: None)


_PAIRS["divergence"] = (_fake_forward, _fake_backward, _autograd_backward, _setup_context)


# ------------------------------------------------------------------ token log-probs + entropy
def _fake_logprob_forward(logits, tokens, inv_temperature, with_entropy):
    n = _rows(logits)
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty((n,), **f32), logits.new_empty((n if with_entropy else 0,), **f32),
            logits.new_empty((n, LOGPROB_STATS_WIDTH), **f32))


def _fake_logprob_backward(grad_logp, grad_entropy, logits, tokens, stats, inv_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_logprob_context(ctx, inputs, output):
    logits, tokens, inv_temperature, _ = inputs
    _, _, stats = output
    ctx.save_for_backward(logits, tokens, stats)
    ctx.inv_temperature = inv_temperature
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _logprob_autograd_backward(backward_op):
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        logits, tokens, stats = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
            return None, None, None, None
        n = stats.shape[0]
        grad_logp = (torch.zeros(n, dtype=torch.float32, device=logits.device) if grad_logp is None
                     else grad_logp.to(torch.float32).contiguous())
        grad_entropy = (logits.new_empty((0,), dtype=torch.float32) if grad_entropy is None
                        else grad_entropy.to(torch.float32).contiguous())
        grad = backward_op(grad_logp, grad_entropy, logits, tokens, stats, ctx.inv_temperature)
        return grad, None, None, None

    return backward


_PAIRS["logprob"] = (_fake_logprob_forward, _fake_logprob_backward, _logprob_autograd_backward,
                    _setup_logprob_context)



# ------------------------------------------------------------------------- softmax cdist
# softmax_cdist_forward(student [Bt, Gs, V], teacher [Bt, Gt, V], row_valid, cost, inv_t)
#   -> (C [Bt, Gs, Gt], A [Bt, Gs, Gt], norm_s [Bt*Gs, NORM_WIDTH], norm_t [Bt*Gt, NORM_WIDTH]),
#   all fp32, where with q_i, p_j the softmaxes and phi the cost per element (|d| or d^2,
#   d = q_iv - p_jv): C_ij = sum_v phi(d), A_ij = sum_v q_iv phi'(d); norm: each row's (m, 1 / S).
# softmax_cdist_backward(W [Bt, Gx, Gy], x, y, norm_x, norm_y, dot_x, row_valid, cost, inv_t)
#   -> dz_x = inv_t q_x (sum_j W_ij phi'(q_x,i - q_y,j) - dot_x,i), in x's dtype.
# phi' is odd, so the teacher gradient is the same op with the sides swapped and W = dC^T.
# From dC: dot_s,i = sum_j dC_ij A_ij and, as sum_v d phi'(d) = k phi(d) (k = 1 for l1, 2 for
# the squared distance), dot_t,j = sum_i dC_ij (k C_ij - A_ij). Saved: the inputs, C, A and the
# per-row normalisers: O(G^2 + G), never a G x V tensor.
def _fake_cdist_forward(student, teacher, row_valid, cost, inv_temperature):
    bt, gs, gt = student.shape[0], student.shape[1], teacher.shape[1]
    f32 = dict(dtype=torch.float32)
    return (student.new_empty((bt, gs, gt), **f32), student.new_empty((bt, gs, gt), **f32),
            student.new_empty((bt * gs, NORM_WIDTH), **f32),
            student.new_empty((bt * gt, NORM_WIDTH), **f32))


def _fake_cdist_backward(weight, x, y, norm_x, norm_y, dot_x, row_valid, cost, inv_temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_cdist_context(ctx, inputs, output):
    student, teacher, row_valid, cost, inv_temperature = inputs
    C, A, norm_s, norm_t = output
    ctx.save_for_backward(student, teacher, row_valid, C, A, norm_s, norm_t)
    ctx.params = (cost, inv_temperature)
    ctx.mark_non_differentiable(A, norm_s, norm_t)
    ctx.set_materialize_grads(False)


def _cdist_autograd_backward(backward_op):
    def backward(ctx, grad_c, *_unused):
        if grad_c is None:
            return (None,) * 5
        student, teacher, row_valid, C, A, norm_s, norm_t = ctx.saved_tensors
        cost, inv_temperature = ctx.params
        grad_c = grad_c.to(torch.float32).contiguous()
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            dot_s = (grad_c * A).sum(-1).reshape(-1)
            grad_s = backward_op(grad_c, student, teacher, norm_s, norm_t, dot_s, row_valid, cost,
                                 inv_temperature)
        if ctx.needs_input_grad[1]:
            k = 1.0 if cost == 0 else 2.0
            dot_t = (grad_c * (k * C - A)).sum(-2).reshape(-1)
            grad_t = backward_op(grad_c.transpose(1, 2).contiguous(), teacher, student, norm_t, norm_s,
                                 dot_t, row_valid, cost, inv_temperature)
        return grad_s, grad_t, None, None, None

    return backward


_PAIRS["cdist"] = (_fake_cdist_forward, _fake_cdist_backward, _cdist_autograd_backward,
                  _setup_cdist_context)


# sinkhorn_iterations_forward(log_k, valid, n_iters, save_steps) -> (log plan, steps);
# sinkhorn_iterations_backward(grad_plan, steps) -> d/d(log_k). The steps are saved when the
# input needs a gradient (autograd decides before the op runs: see sinkhorn_iterations).
def _fake_sinkhorn_forward(log_k, valid, n_iters, save_steps):
    steps = log_k.new_empty((2 * n_iters if save_steps else 0, *log_k.shape))
    return torch.empty_like(log_k, memory_format=torch.contiguous_format), steps


def _fake_sinkhorn_backward(grad_plan, steps):
    return torch.empty_like(grad_plan, memory_format=torch.contiguous_format)


def _setup_sinkhorn_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _sinkhorn_autograd_backward(backward_op):
    def backward(ctx, grad_plan, _unused):
        if grad_plan is None:
            return (None,) * 4
        (steps,) = ctx.saved_tensors
        return backward_op(grad_plan, steps), None, None, None

    return backward


_PAIRS["sinkhorn"] = (_fake_sinkhorn_forward, _fake_sinkhorn_backward, _sinkhorn_autograd_backward,
                      _setup_sinkhorn_context)


if _backend.EXTENSION_ERROR is None:
    _register_op_pair("divergence", "divergence_forward", "divergence_backward", fake=True)
    _register_op_pair("logprob", "token_logprob_forward", "token_logprob_backward", fake=True)
    _register_op_pair("cdist", "softmax_cdist_forward", "softmax_cdist_backward", fake=True)
    _register_op_pair("sinkhorn", "sinkhorn_iterations_forward", "sinkhorn_iterations_backward",
                      fake=True)
    torch.library.register_fake("pykernels::divergence_forward_with_grad")(_fake_forward_with_grad)
    torch.library.register_autograd("pykernels::divergence_forward_with_grad", _fused_backward,
                                    setup_context=_setup_fused_context)


# ---------------------------------------------------------------------------- Triton ops
def rows3d(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] views of x, y ([..., V], same shape) with unit vocab stride; the Python twin of
    as_rows3d in csrc/ops_common.h (the Triton path runs without the extension)."""
    V = x.shape[-1]
    if V > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    if V > 1 and y.stride(-1) != 1:
        y = y.contiguous()
    groups: list[list[int]] = []  # [size, stride_x, stride_y] of each group's innermost dim
    for d in range(x.dim() - 2, -1, -1):
        n = x.shape[d]
        if n == 1:
            continue
        if groups and x.stride(d) == groups[-1][1] * groups[-1][0] and y.stride(d) == groups[-1][2] * groups[-1][0]:
            groups[-1][0] *= n
            continue
        groups.append([n, x.stride(d), y.stride(d)])
    if len(groups) > 2:
        warnings.warn("pykernels: the logits' leading dims do not merge into two strided dims; "
                      "copying them to contiguous memory", stacklevel=3)
        return rows3d(x.contiguous(), y.contiguous())
    inner = groups[0] if groups else [1, V, V]
    outer = groups[1] if len(groups) == 2 else [1, inner[1] * inner[0], inner[2] * inner[0]]
    size = (outer[0], inner[0], V)
    return (x.as_strided(size, (outer[1], inner[1], 1)), y.as_strided(size, (outer[2], inner[2], 1)))


if _backend.HAS_TRITON:
    from typing import Optional

    from torch.library import triton_op, wrap_triton

    from .triton_kernels import divergence as _triton_divergence

    def _launch_wrapper():
        # Under the interpreter kernels are plain Python callables that wrap_triton rejects;
        # eager execution does not need the wrapper anyway (it only matters for tracing).
        return (lambda kernel: kernel) if _backend.triton_interpret() else wrap_triton

    @triton_op(f"{_LIB}::triton_divergence_forward", mutates_args=())
    def triton_divergence_forward(
        student: torch.Tensor, teacher: torch.Tensor, row_valid: Optional[torch.Tensor],
        kind: int, w: float, inv_temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s3, t3 = rows3d(student, teacher)
        return _triton_divergence.divergence_forward(
            s3, t3, row_valid, kind, w, inv_temperature, _wrap=_launch_wrapper()
        )

    @triton_op(f"{_LIB}::triton_divergence_backward", mutates_args=())
    def triton_divergence_backward(
        grad_row: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
        row_valid: Optional[torch.Tensor], stats: torch.Tensor, kind: int, w: float,
        inv_temperature: float, student_grad: bool, teacher_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s3, t3 = rows3d(student, teacher)
        grad_s, grad_t = _triton_divergence.divergence_backward(
            grad_row, s3, t3, row_valid, stats, kind, w, inv_temperature, student_grad,
            teacher_grad, _wrap=_launch_wrapper(),
        )
        # The kernels write [B, T, V] contiguous, which is the contiguous layout of the input.
        if student_grad:
            grad_s = grad_s.view(student.shape)
        if teacher_grad:
            grad_t = grad_t.view(teacher.shape)
        return grad_s, grad_t

    _register_op_pair("divergence", "triton_divergence_forward", "triton_divergence_backward", fake=False)

    from .triton_kernels import logprobs as _triton_logprobs

    @triton_op(f"{_LIB}::triton_token_logprob_forward", mutates_args=())
    def triton_token_logprob_forward(
        logits: torch.Tensor, tokens: torch.Tensor, inv_temperature: float, with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x3, _ = rows3d(logits, logits)
        return _triton_logprobs.token_logprob_forward(
            x3, tokens, inv_temperature, with_entropy, _wrap=_launch_wrapper())

    @triton_op(f"{_LIB}::triton_token_logprob_backward", mutates_args=())
    def triton_token_logprob_backward(
        grad_logp: torch.Tensor, grad_entropy: torch.Tensor, logits: torch.Tensor,
        tokens: torch.Tensor, stats: torch.Tensor, inv_temperature: float,
    ) -> torch.Tensor:
        x3, _ = rows3d(logits, logits)
        grad = _triton_logprobs.token_logprob_backward(
            grad_logp, grad_entropy, x3, tokens, stats, inv_temperature, _wrap=_launch_wrapper())
        return grad.view(logits.shape)

    _register_op_pair("logprob", "triton_token_logprob_forward", "triton_token_logprob_backward",
                      fake=False)

    from .triton_kernels import cdist as _triton_cdist

    @triton_op(f"{_LIB}::triton_softmax_cdist_forward", mutates_args=())
    def triton_softmax_cdist_forward(
        student: torch.Tensor, teacher: torch.Tensor, row_valid: Optional[torch.Tensor], cost: int,
        inv_temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _triton_cdist.softmax_cdist_forward(student, teacher, row_valid, cost,
                                                   inv_temperature, _wrap=_launch_wrapper())

    @triton_op(f"{_LIB}::triton_softmax_cdist_backward", mutates_args=())
    def triton_softmax_cdist_backward(
        weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, norm_x: torch.Tensor,
        norm_y: torch.Tensor, dot_x: torch.Tensor, row_valid: Optional[torch.Tensor], cost: int,
        inv_temperature: float,
    ) -> torch.Tensor:
        return _triton_cdist.softmax_cdist_backward(weight, x, y, norm_x, norm_y, dot_x, row_valid,
                                                    cost, inv_temperature, _wrap=_launch_wrapper())

    _register_op_pair("cdist", "triton_softmax_cdist_forward", "triton_softmax_cdist_backward",
                      fake=False)


def divergence_rows(backend: str, student, teacher, row_valid, kind: int, w: float,
                    inv_temperature: float, row_weight: float = 1.0) -> torch.Tensor:
    """Per-row divergence [N] fp32 on the resolved `backend`, differentiable. `row_weight` is
    the factor the caller's reduction will apply to every row (a hint for the CPU backend's
    fused gradient; results do not depend on it)."""
    if backend == "torch":
        return _torch_backend.divergence_rows(student, teacher, row_valid, kind, w, inv_temperature)
    if backend == "cpu" and torch.is_grad_enabled():
        # CPU kernels are bound by exps, not memory: computing the gradient in the forward
        # from the probabilities it already has halves them.
        want_s, want_t = student.requires_grad, teacher.requires_grad
        if want_s or want_t:
            row_loss, *_ = torch.ops.pykernels.divergence_forward_with_grad(
                student, teacher, row_valid, kind, w, inv_temperature, want_s, want_t, row_weight)
            return row_loss
    if backend == "triton":
        op = torch.ops.pykernels.triton_divergence_forward
    else:  # "cpu" / "cuda": one C++ op, the dispatcher picks the device's kernel
        op = torch.ops.pykernels.divergence_forward
    row_loss, _ = op(student, teacher, row_valid, kind, w, inv_temperature)
    return row_loss


def token_logprob_rows(backend: str, logits, tokens, inv_temperature: float, with_entropy: bool):
    """(logp [N], entropy [N] or None) in fp32 on the resolved backend, differentiable;
    tokens is the flattened [N] int32/int64 tensor, already range-checked."""
    if backend == "torch":
        return _torch_backend.token_logprob_rows(logits, tokens, inv_temperature, with_entropy)
    logp, entropy, _ = _token_logprob_ops(backend)[0](logits, tokens, inv_temperature, with_entropy)
    return logp, (entropy if with_entropy else None)


class _TokenLogprobsK(torch.autograd.Function):
    """K token log-probs per row from one read of the logits: the forward op gives each row's
    normaliser (max m, log S; run for the first token, whose log-prob is recomputed with the
    others), the rest is a gather: log q_y = (s_y - m) - log S. The gradient is one backward-op
    pass with no token, which writes -inv_t * (sum_k g_k) q: one N x V buffer, rounded once (K
    separate ops would round and hold it K times). At the K token positions the exact value
    inv_t * (G_y - sum_k g_k q_y), G_y the sum of the g_k whose token is y, is formed in fp32 and
    written over it, so that it too is rounded once: adding g_k to an already rounded -g q_y
    would cost an ulp of g where q_y is near 1 (V = 1 gave 0.0078 in bf16 for an exact 0)."""

    @staticmethod
    def forward(ctx, logits, tokens, inv_temperature, backend):
        N, K = tokens.shape
        forward_op, _ = _token_logprob_ops(backend)
        _, _, stats = forward_op(logits, tokens[:, 0].contiguous(), inv_temperature, False)
        idx = tokens.long()
        picked = logits.gather(-1, idx.view(*logits.shape[:-1], K)).reshape(N, K)
        # the gathered logits, not the output, are saved: a caller may modify the output in place
        ctx.save_for_backward(logits, idx, stats, picked)
        ctx.inv_temperature, ctx.backend = inv_temperature, backend
        return _logprobs_of_picked(picked, stats, inv_temperature)

    @staticmethod
    def backward(ctx, grad):
        logits, idx, stats, picked = ctx.saved_tensors
        inv_t = ctx.inv_temperature
        logp = _logprobs_of_picked(picked, stats, inv_t)
        no_token = torch.full((idx.shape[0],), -1, dtype=torch.int64, device=idx.device)
        g = grad.float()
        grad_sum = g.sum(-1)
        empty = grad_sum.new_empty((0,))
        dz = _token_logprob_ops(ctx.backend)[1](grad_sum.contiguous(), empty, logits, no_token,
                                                stats, inv_t)
        at_tokens = (_sum_over_equal(idx, g) - grad_sum[:, None] * logp.exp()) * inv_t
        dz.view(-1, dz.shape[-1]).scatter_(1, idx, at_tokens.to(dz.dtype))
        return dz, None, None, None


def _logprobs_of_picked(picked: torch.Tensor, stats: torch.Tensor, inv_t: float) -> torch.Tensor:
    """log q of gathered logits [N, K] from the rows' saved normalisers: (s - m) - log S."""
    return (picked.float() * inv_t - stats[:, 0:1]) - stats[:, 1:2]


def _sum_over_equal(idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[N, K]: out[n, k] = sum of g[n, j] over the j with idx[n, j] == idx[n, k], in O(N K)
    memory (a K x K comparison would not be, for long candidate lists): sort each row, sum
    runs of equal ids, scatter back."""
    sorted_idx, perm = idx.sort(dim=1)
    starts = torch.ones_like(sorted_idx, dtype=torch.bool)
    starts[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    run = starts.cumsum(1) - 1  # run number of each sorted entry
    run_sum = torch.zeros_like(g).scatter_add_(1, run, g.gather(1, perm))
    return torch.empty_like(g).scatter_(1, perm, run_sum.gather(1, run))


def _token_logprob_ops(backend: str):
    """(forward op, backward op) of the token log-prob kernels of a kernel backend."""
    ops = torch.ops.pykernels
    if backend == "triton":
        return ops.triton_token_logprob_forward, ops.triton_token_logprob_backward
    return ops.token_logprob_forward, ops.token_logprob_backward  # cpu / cuda: one C++ op


def token_logprobs_k(backend: str, logits, tokens, inv_temperature: float):
    """Log-probs [N, K] fp32 of K tokens per row (tokens [N, K] int32/int64, range-checked),
    differentiable, from one read of the logits on the resolved backend."""
    if backend == "torch":
        return _torch_backend.token_logprob_rows(logits, tokens, inv_temperature, False)[0]
    return _TokenLogprobsK.apply(logits, tokens, inv_temperature, backend)


def softmax_cdist_3d(backend: str, student, teacher, row_valid, cost: int, inv_temperature: float):
    """C [Bt, Gs, Gt] (fp32) between the softmax rows of [Bt, Gs, V] and [Bt, Gt, V] views with
    unit vocab stride, on the resolved backend, differentiable."""
    if backend == "torch":
        return _torch_backend.softmax_cdist(student, teacher, row_valid, cost, inv_temperature)
    op = (torch.ops.pykernels.triton_softmax_cdist_forward if backend == "triton"
          else torch.ops.pykernels.softmax_cdist_forward)
    return op(student, teacher, row_valid, cost, inv_temperature)[0]


def sinkhorn_iterations(backend: str, log_k, valid, n_iters: int):
    """The log-domain Sinkhorn iterations on log_k [groups, g, g], differentiable: the cpu
    backend's fused kernel (fp32); the GPU backends run the torch loop with its backward
    written out (G x G work: no GPU kernel of ours yet); the torch backend, plain autograd."""
    if backend == "cpu":
        save_steps = torch.is_grad_enabled() and log_k.requires_grad
        return torch.ops.pykernels.sinkhorn_iterations_forward(log_k, valid, n_iters, save_steps)[0]
    return _torch_backend.sinkhorn_iterations(log_k, valid, n_iters, higher_order=backend == "torch")
