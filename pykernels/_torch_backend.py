"""The eager `torch` backend: the kernels' math in plain PyTorch, differentiated by autograd.

It materialises log-probabilities (several N x V tensors), so it is the fallback and a
readable statement of what the kernels compute, not a fast path. Conventions match
csrc/pk_math.h: canonical frame (q = student side, p = teacher side), 0 * log 0 = 0, two -inf
log-probabilities mix to -inf, NaN inputs stay NaN. Every `where` guards its inputs as well as
its output so that no NaN leaks into a gradient through the branch that is not taken.
"""

from __future__ import annotations

import math

import torch

from ._kinds import FORWARD_KL, HELLINGER, JSD, SKEW_FORWARD_KL, TVD

_NEG_INF = float("-inf")


def _xmul0(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x * d, with 0 wherever x == 0 (also when d is infinite or NaN there)."""
    zero = x == 0
    return x * torch.where(zero, torch.zeros_like(d), d)


def _ratio0(x: torch.Tensor, lx: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """x / M as exp(log x - log M), 0 where x == 0."""
    zero = x == 0
    r = torch.exp(torch.where(zero, torch.zeros_like(lx), lx - lm))
    return torch.where(zero, torch.zeros_like(r), r)


def _log_mixture(lq: torch.Tensor, lp: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q); -inf (with a zero gradient) where both terms vanish."""
    a = lp + (math.log(w) if w > 0 else _NEG_INF)
    b = lq + (math.log1p(-w) if w < 1 else _NEG_INF)
    both = (a == _NEG_INF) & (b == _NEG_INF)
    zero = torch.zeros_like(a)
    out = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full_like(out, _NEG_INF), out)


def _row_terms(kind: int, w: float, lq: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    q, p = lq.exp(), lp.exp()
    if kind == FORWARD_KL:
        return _xmul0(p, lp - lq)
    if kind == JSD:
        lm = _log_mixture(lq, lp, w)
        return w * _xmul0(p, lp - lm) + (1 - w) * _xmul0(q, lq - lm)
    if kind == SKEW_FORWARD_KL:
        return _xmul0(p, lp - _log_mixture(lq, lp, w))
    if kind == TVD:
        return 0.5 * (q - p).abs()
    if kind == HELLINGER:
        return 0.5 * ((0.5 * lp).exp() - (0.5 * lq).exp()) ** 2
    raise ValueError(f"unknown kernel kind {kind}")


def divergence_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_valid: torch.Tensor | None,
    kind: int,
    w: float,
    inv_temperature: float,
) -> torch.Tensor:
    """Per-row divergence [N] (fp32; fp64 for fp64 input) of kernel kind `kind`."""
    V = student.shape[-1]
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.reshape(-1, V).to(compute) * inv_temperature
    t = teacher.reshape(-1, V).to(compute) * inv_temperature
    if row_valid is not None:
        # Ignored rows are zeroed first so that NaN/-inf logits there cannot reach a gradient.
        keep = row_valid[:, None]
        s = torch.where(keep, s, torch.zeros_like(s))
        t = torch.where(keep, t, torch.zeros_like(t))
    lq = torch.log_softmax(s, dim=-1)
    lp = torch.log_softmax(t, dim=-1)
    rows = _row_terms(kind, w, lq, lp).sum(dim=-1)
    if row_valid is not None:
        rows = torch.where(row_valid, rows, torch.zeros_like(rows))
    return rows


def token_logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, inv_temperature: float,
                       with_entropy: bool):
    """Token log-probs [N] (tokens [N]) or [N, K] (tokens [N, K]) and (with_entropy)
    entropies [N] of softmax(logits * inv_t)."""
    V = logits.shape[-1]
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lq = torch.log_softmax(logits.reshape(-1, V).to(compute) * inv_temperature, dim=-1)
    idx = tokens.long()
    logp = lq.gather(-1, idx[:, None]).squeeze(-1) if idx.dim() == 1 else lq.gather(-1, idx)
    entropy = -_xmul0(lq.exp(), lq).sum(-1) if with_entropy else None
    return logp, entropy


def _row_probs(z: torch.Tensor, row_valid: torch.Tensor | None, inv_temperature: float,
               compute: torch.dtype) -> torch.Tensor:
    """softmax(z * inv_t) per row of [Bt, G, V]; rows with row_valid False are all zeros (their
    logits, NaN included, never reach a value or a gradient)."""
    x = z.to(compute) * inv_temperature
    if row_valid is None:
        return torch.softmax(x, dim=-1)
    keep = row_valid.reshape(x.shape[:-1])[..., None]
    q = torch.softmax(torch.where(keep, x, torch.zeros_like(x)), dim=-1)
    return torch.where(keep, q, torch.zeros_like(q))


def softmax_cdist(student: torch.Tensor, teacher: torch.Tensor, row_valid: torch.Tensor | None,
                  cost: int, inv_temperature: float) -> torch.Tensor:
    """C[b, i, j] = cost(softmax(student[b, i]), softmax(teacher[b, j])) for [Bt, G, V] inputs:
    the l1 distance (cost 0) or the squared euclidean distance (cost 1), fp32 (fp64 for fp64)."""
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    q = _row_probs(student, row_valid, inv_temperature, compute)
    p = _row_probs(teacher, row_valid, inv_temperature, compute)
    if cost == 0:
        return torch.cdist(q, p, p=1.0)
    # |q|^2 + |p|^2 - 2 q.p: matmul-shaped, as the kernels compute it on GPU
    sq = q.square().sum(-1)[..., :, None] + p.square().sum(-1)[..., None, :] - 2.0 * (q @ p.transpose(-1, -2))
    return sq.clamp_min(0.0)


def _normalize_lines(log_k: torch.Tensor, line_valid: torch.Tensor | None, dim: int) -> torch.Tensor:
    """log_k minus its logsumexp along `dim`: every valid line sums to 1 in the linear domain.
    An entirely masked line (all -inf) is left as it is; its logsumexp is taken over zeros
    instead, as the logsumexp of an all -inf line would give -inf - -inf = NaN, in the value
    and in autograd's gradient."""
    if line_valid is None:
        return log_k - torch.logsumexp(log_k, dim=dim, keepdim=True)
    keep = line_valid.unsqueeze(dim)
    lse = torch.logsumexp(torch.where(keep, log_k, 0.0), dim=dim, keepdim=True)
    return log_k - torch.where(keep, lse, 0.0)


def _sinkhorn_loop(log_k: torch.Tensor, valid: torch.Tensor | None, n_iters: int,
                   steps: list | None = None) -> torch.Tensor:
    """n_iters times: rows, then columns, normalised; each half-step's result appended to steps."""
    for _ in range(n_iters):
        for dim in (2, 1):  # rows, then columns
            log_k = _normalize_lines(log_k, valid, dim)
            if steps is not None:
                steps.append(log_k)
    return log_k


class _SinkhornIterations(torch.autograd.Function):
    """The log-domain iterations with their backward written out: for L' = L - lse_d(L),
    dL = dL' - exp(L') * sum_d dL' (exp(L') is softmax_d(L); 0 on masked entries, so masked
    lines pass their gradient through, which is 0 there). Autograd of the plain loop records
    about five ops per half-step and differentiates each; this saves one G x G tensor per
    half-step and runs three ops on it, the cost that matters next to the cost matrix at
    small V. The cpu backend's kernel (csrc/cpu/sinkhorn_kernel.cpp) runs the same loops."""

    @staticmethod
    def forward(ctx, log_k, valid, n_iters):
        steps = []
        log_k = _sinkhorn_loop(log_k, valid, n_iters, steps)
        ctx.save_for_backward(*steps)
        return log_k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        steps = ctx.saved_tensors
        for k in range(len(steps) - 1, -1, -1):
            dim = 2 if k % 2 == 0 else 1
            grad = torch.addcmul(grad, steps[k].exp(), grad.sum(dim=dim, keepdim=True), value=-1.0)
        return grad, None, None


def sinkhorn_iterations(log_k: torch.Tensor, valid: torch.Tensor | None, n_iters: int,
                        higher_order: bool) -> torch.Tensor:
    """higher_order: autograd through the plain loop (the torch backend, which promises
    gradients of any order); else the Function above (first-order gradients, fewer ops)."""
    if higher_order:
        return _sinkhorn_loop(log_k, valid, n_iters)
    return _SinkhornIterations.apply(log_k, valid, n_iters)
