"""Divergence losses between a student's and a teacher's logits, computed by fused kernels that
never materialise the probabilities.

Common keywords (all functions):
    temperature: logits are divided by it (the loss is NOT multiplied by T**2, as in TRL).
    labels, ignore_index: rows whose label equals ignore_index are dropped (add 0, not counted).
    reduction: "batchmean" (sum / number of kept rows, default), "sum", "mean" (sum / (rows * V)),
        "none" (per-row losses of the leading shape).
    num_items_in_batch: replaces the number of kept rows as divisor of batchmean / mean
        (Hugging Face gradient accumulation); an int or a one-element tensor.
    backend: "auto", "cpu", "cuda", "triton" or "torch" (see pykernels.available_backends()).

q = softmax(student / T), p = softmax(teacher / T). Logits have shape [..., V] (fp32, fp16 or
bf16); the loss is fp32 and gradients come back in the logits' dtype, for the teacher too when
its logits require grad.
"""

from __future__ import annotations

import torch

from . import _sinkhorn
from ._divergence import divergence_loss
from ._kinds import kind_param


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "jsd", *,
               beta: float | None = None, alpha: float | None = None, temperature: float = 1.0,
               labels: torch.Tensor | None = None, ignore_index: int = -100,
               reduction: str = "batchmean", num_items_in_batch=None,
               backend: str = "auto") -> torch.Tensor:
    """Divergence of kind `kind` ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
    "skew_reverse_kl", "tvd", "hellinger"); `beta` for jsd, `alpha` for the skew kinds."""
    param = kind_param(kind, beta, alpha)
    return divergence_loss(kind, student_logits, teacher_logits, param, temperature, labels,
                           ignore_index, reduction, num_items_in_batch, backend)


def forward_kl(student_logits, teacher_logits, **common) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q): the usual distillation loss."""
    return divergence(student_logits, teacher_logits, "forward_kl", **common)


def reverse_kl(student_logits, teacher_logits, **common) -> torch.Tensor:
    """KL(q || p), mode-seeking."""
    return divergence(student_logits, teacher_logits, "reverse_kl", **common)


def jsd(student_logits, teacher_logits, beta: float = 0.5, **common) -> torch.Tensor:
    """Generalised JSD (TRL GKD): with M = beta p + (1 - beta) q,
    beta KL(p || M) + (1 - beta) KL(q || M). beta = 0 gives forward_kl, beta = 1 reverse_kl."""
    return divergence(student_logits, teacher_logits, "jsd", beta=beta, **common)


def skew_forward_kl(student_logits, teacher_logits, alpha: float = 0.1, **common) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q)."""
    return divergence(student_logits, teacher_logits, "skew_forward_kl", alpha=alpha, **common)


def skew_reverse_kl(student_logits, teacher_logits, alpha: float = 0.1, **common) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    return divergence(student_logits, teacher_logits, "skew_reverse_kl", alpha=alpha, **common)


def tvd(student_logits, teacher_logits, **common) -> torch.Tensor:
    """Total variation distance 1/2 sum |p - q| (subgradient sign(0) = 0 at ties)."""
    return divergence(student_logits, teacher_logits, "tvd", **common)


def hellinger(student_logits, teacher_logits, **common) -> torch.Tensor:
    """Squared Hellinger distance 1/2 sum (sqrt p - sqrt q)^2 = 1 - sum sqrt(p q)."""
    return divergence(student_logits, teacher_logits, "hellinger", **common)


def softmax_cdist(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, cost: str = "l1",
                  temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Cost matrix between softmax rows: C[..., i, j] = cost(softmax(s_i / T), softmax(t_j / T))
    for student_logits [..., Gs, V] and teacher_logits [..., Gt, V] -> [..., Gs, Gt] (fp32).

    cost="l1": sum_v |q_iv - p_jv| (SinKD's choice); G_s * G_t * V elementwise work on every
        backend (no matrix-multiply form, so no tensor cores), its backward the same again.
    cost="sqeuclidean": sum_v (q_iv - p_jv)^2 = |q_i|^2 + |p_j|^2 - 2 q_i . p_j, clamped at 0;
        the q . p products and the backward's dC @ P are matrix products of on-the-fly
        probabilities: tile products on tensor cores with Triton on GPU (TF32x3, about fp32
        accurate), BLAS on column slabs of probabilities on CPU; the portable CUDA kernel
        computes it elementwise, like l1.
    Each row's log-sum-exp is computed once; no G x V probability tensor is built, forward or
    backward. Gradients flow to both logits (the l1 subgradient takes sign(0) = 0 at ties)."""
    return _sinkhorn.softmax_cdist(student_logits, teacher_logits, cost, temperature, backend)


def sinkhorn_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, cost: str = "l1",
                  epsilon: float = 0.1, n_iters: int = 20, temperature: float = 2.0,
                  group_size: int | None = None, labels: torch.Tensor | None = None,
                  ignore_index: int = -100, envelope: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """SinKD's Sinkhorn distance between the student's and the teacher's distributions, with the
    cost between SAMPLES (rows), not between vocabulary entries (Cui et al., 2024).

    The rows of [..., V] logits form groups (group_size=None: all rows one group; an int:
    consecutive groups of that many rows, which must divide the row count, e.g. one group per
    sequence of [B, T, V] with group_size=T); rows whose label is ignore_index are dropped from
    their group. Per group: C = softmax_cdist(student rows, teacher rows, cost, temperature);
    K = exp(-C / epsilon); n_iters times, every row of K is divided by its sum, then every
    column by its sum (so the plan P has columns summing to 1), in the log domain, which stays
    finite for small epsilon; loss = sum_ij P_ij C_ij. Returns the mean over non-empty groups
    (fp32, or fp64 for fp64 logits on the torch backend; 0 when every row is ignored). Gradients flow through the iterations, as in SinKD;
    envelope=True treats P as a constant (the gradient at convergence), which is cheaper."""
    return _sinkhorn.sinkhorn_loss(student_logits, teacher_logits, cost, epsilon, n_iters,
                                   temperature, group_size, labels, ignore_index, envelope, backend)
