"""Independent float64 oracle for the pykernels divergences.

Written from DESIGN.md ("Math conventions") only; it does not import pykernels.

Per row, after temperature:
    s = z_student / T, t = z_teacher / T, q = softmax(s) (student), p = softmax(t) (teacher)
    forward_kl         KL(p || q)
    reverse_kl         KL(q || p)
    jsd(beta)          beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q;
                       beta = 0 -> forward_kl, beta = 1 -> reverse_kl (endpoint convention)
    skew_forward_kl(a) KL(p || a p + (1-a) q)
    skew_reverse_kl(a) KL(q || a q + (1-a) p)
    tvd                1/2 sum |p - q|
    hellinger          1/2 sum (sqrt p - sqrt q)^2
No T^2 factor.  0 log 0 = 0; p > 0 where q = 0 gives +inf.  A row containing a NaN logit
is NaN, and so is a row whose student or teacher logits are all -inf (no softmax exists).

Everything is computed in float64 from the given values (low-precision inputs are upcast
exactly).  All masking uses the "safe where" pattern (both branches finite where they are
not selected), so torch.autograd through the oracle is finite at -inf logits; the
gradients it gives there are checked against DESIGN.md's analytic table in
test_reference.py.
"""

from __future__ import annotations

import math

import torch

KINDS = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "hellinger",
)
REDUCTIONS = ("batchmean", "sum", "mean", "none")

DEFAULT_BETA = 0.5
DEFAULT_ALPHA = 0.1


# ----------------------------------------------------------------------------- helpers


def _kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_i a_i (log a_i - log b_i) over the last dim, with 0 * anything = 0.

    Where a_i > 0 and b_i = 0 (log_b = -inf) the term is +inf.
    """
    pos = a > 0
    zero = torch.zeros_like(a)
    la = torch.where(pos, log_a, zero)
    lb = torch.where(pos, log_b, zero)
    return torch.where(pos, a * (la - lb), zero).sum(-1)


def _log_mixture(w: float, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log(w p + (1-w) q); -inf where the mixture is 0.

    The -inf is a constant branch of a where (the log itself only ever sees positive
    values), so autograd stays finite: where p = q = 0 every term using it is masked, and
    where the mixture is 0 but the other side is not (w = 0 or 1) the value is +inf.
    """
    m = w * p + (1.0 - w) * q
    pos = m > 0
    safe_log = torch.log(torch.where(pos, m, torch.ones_like(m)))
    return torch.where(pos, safe_log, torch.full_like(m, -math.inf))


def kl(p, log_p, log_q):
    """KL(p || q) per row."""
    return _kl_terms(p, log_p, log_q)


def _validate_weight(name: str, w: float) -> float:
    w = float(w)
    if not (0.0 <= w <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {w}")
    return w


# ----------------------------------------------------------------------------- per row


def row_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row divergence, float64, shape = leading shape of the inputs (no masking).

    Differentiable (torch.autograd) with respect to float64 inputs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError("student/teacher shape mismatch")
    zs = student if student.dtype == torch.float64 else student.detach().to(torch.float64)
    zt = teacher if teacher.dtype == torch.float64 else teacher.detach().to(torch.float64)
    s = zs / temperature
    t = zt / temperature
    lq = torch.log_softmax(s, dim=-1)
    lp = torch.log_softmax(t, dim=-1)
    q = torch.exp(lq)
    p = torch.exp(lp)

    if kind == "forward_kl":
        val = kl(p, lp, lq)
    elif kind == "reverse_kl":
        val = kl(q, lq, lp)
    elif kind == "jsd":
        b = _validate_weight("beta", DEFAULT_BETA if beta is None else beta)
        if b == 0.0:
            val = kl(p, lp, lq)
        elif b == 1.0:
            val = kl(q, lq, lp)
        else:
            lm = _log_mixture(b, p, q)
            val = b * kl(p, lp, lm) + (1.0 - b) * kl(q, lq, lm)
    elif kind == "skew_forward_kl":
        a = _validate_weight("alpha", DEFAULT_ALPHA if alpha is None else alpha)
        lm = _log_mixture(a, p, q)  # a p + (1-a) q
        val = kl(p, lp, lm)
    elif kind == "skew_reverse_kl":
        a = _validate_weight("alpha", DEFAULT_ALPHA if alpha is None else alpha)
        lm = _log_mixture(a, q, p)  # a q + (1-a) p
        val = kl(q, lq, lm)
    elif kind == "tvd":
        val = 0.5 * (p - q).abs().sum(-1)
    elif kind == "hellinger":
        # sqrt(p) = exp(log p / 2): exact, and its derivative is 0 (not inf*0) at p = 0.
        val = 0.5 * (torch.exp(0.5 * lp) - torch.exp(0.5 * lq)).pow(2).sum(-1)
    else:  # pragma: no cover
        raise AssertionError(kind)

    # A row that is -inf throughout has no softmax (eager's log_softmax is NaN there).
    row_nan = (torch.isnan(zs).any(-1) | torch.isnan(zt).any(-1)
               | torch.isneginf(zs).all(-1) | torch.isneginf(zt).all(-1))
    if row_nan.any():
        val = torch.where(row_nan, torch.full_like(val, math.nan), val)
    return val


# ----------------------------------------------------------------------------- reductions


def reduce_rows(
    per_row: torch.Tensor,
    vocab_size: int,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """Masking + reduction of per-row float64 values (shape = leading shape)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}")
    if labels is not None:
        if tuple(labels.shape) != tuple(per_row.shape):
            raise ValueError("labels shape mismatch")
        valid = labels.to(per_row.device) != ignore_index
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        n_valid = int(valid.sum())
    else:
        n_valid = per_row.numel()
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        divisor = float(num_items_in_batch)
    else:
        divisor = float(max(n_valid, 1))
    if reduction == "batchmean":
        return total / divisor
    return total / (divisor * vocab_size)  # mean


def divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """The full public-API semantics in float64 (differentiable)."""
    per_row = row_divergence(
        student, teacher, kind, beta=beta, alpha=alpha, temperature=temperature
    )
    return reduce_rows(
        per_row,
        student.shape[-1],
        labels=labels,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


def loss_and_grads(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    grad_output=None,
    **kwargs,
):
    """Oracle loss and gradients (float64) for any input dtype.

    The inputs are upcast exactly to float64.  grad_output: None (=1 for a scalar loss),
    a number, or a tensor shaped like the loss.
    Returns (loss, grad_student, grad_teacher), all float64 and detached.
    """
    zs = student.detach().to(torch.float64).requires_grad_(True)
    zt = teacher.detach().to(torch.float64).requires_grad_(True)
    loss = divergence(zs, zt, kind, **kwargs)
    if grad_output is None:
        go = torch.ones_like(loss)
    elif isinstance(grad_output, torch.Tensor):
        go = grad_output.detach().to(torch.float64).reshape(loss.shape)
    else:
        go = torch.full_like(loss, float(grad_output))
    if loss.numel() == 0:
        return loss.detach(), torch.zeros_like(zs), torch.zeros_like(zt)
    gs, gt = torch.autograd.grad(loss, (zs, zt), go, allow_unused=True)
    gs = torch.zeros_like(zs) if gs is None else gs
    gt = torch.zeros_like(zt) if gt is None else gt
    return loss.detach(), gs.detach(), gt.detach()


def central_differences(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    grad_output=1.0,
    eps: float = 1e-6,
    **kwargs,
):
    """Float64 central finite differences of the oracle loss (a scalar reduction).

    Returns (d loss/d student, d loss/d teacher) * grad_output, float64.
    Only meant for tiny shapes (2 oracle evaluations per element).
    """
    zs = student.detach().to(torch.float64).clone()
    zt = teacher.detach().to(torch.float64).clone()
    go = float(grad_output)
    out = []
    for x in (zs, zt):
        g = torch.zeros_like(x)
        flat = x.view(-1)
        gflat = g.view(-1)
        for i in range(flat.numel()):
            orig = flat[i].item()
            flat[i] = orig + eps
            fp = divergence(zs, zt, kind, **kwargs).item()
            flat[i] = orig - eps
            fm = divergence(zs, zt, kind, **kwargs).item()
            flat[i] = orig
            gflat[i] = go * (fp - fm) / (2 * eps)
        out.append(g)
    return out[0], out[1]


# ----------------------------------------------------------------------------- analytic


def analytic_grads(student, teacher, kind, *, beta=None, alpha=None, temperature=1.0):
    """DESIGN.md's analytic per-row gradients d row_value / d z (student, teacher), float64.

    Implemented for forward_kl, reverse_kl, jsd (0<beta<1), tvd and hellinger (the rows of
    DESIGN.md's table); teacher sides follow by the symmetry stated there.  Used to check
    the oracle's autograd, including at -inf logits.  Rows must give a finite value.
    """
    zs = student.detach().to(torch.float64)
    zt = teacher.detach().to(torch.float64)
    s, t = zs / temperature, zt / temperature
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()

    def kl_grad(a, la, lb):
        # d KL(a||b) / d (logits of a) = a_i (log a_i - log b_i - KL(a||b)); 0 where a_i = 0
        pos = a > 0
        diff = torch.where(pos, la, torch.zeros_like(la)) - torch.where(pos, lb, torch.zeros_like(lb))
        k = torch.where(pos, a * diff, torch.zeros_like(a)).sum(-1, keepdim=True)
        return torch.where(pos, a * (diff - k), torch.zeros_like(a))

    if kind == "forward_kl":
        gs, gt = q - p, kl_grad(p, lp, lq)
    elif kind == "reverse_kl":
        gs, gt = kl_grad(q, lq, lp), p - q
    elif kind == "jsd":
        b = DEFAULT_BETA if beta is None else beta
        assert 0.0 < b < 1.0
        lm = _log_mixture(b, p, q)
        gs = (1.0 - b) * kl_grad(q, lq, lm)
        gt = b * kl_grad(p, lp, lm)
    elif kind == "tvd":
        sgn_qp = 0.5 * torch.sign(q - p)
        gs = q * (sgn_qp - (q * sgn_qp).sum(-1, keepdim=True))
        sgn_pq = -sgn_qp
        gt = p * (sgn_pq - (p * sgn_pq).sum(-1, keepdim=True))
    elif kind == "hellinger":
        r = torch.exp(0.5 * (lp + lq))  # sqrt(p q)
        bc = r.sum(-1, keepdim=True)
        gs = -0.5 * (r - q * bc)
        gt = -0.5 * (r - p * bc)
    else:
        raise NotImplementedError(kind)
    return gs / temperature, gt / temperature
