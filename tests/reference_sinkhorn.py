"""Independent float64 oracle for softmax_cdist and the Sinkhorn loss, written from the SinKD
description (Cui et al., LREC-COLING 2024; DESIGN.md "Sinkhorn"); it does not import pykernels.

softmax cdist, per batch, q_i = softmax(s_i / T), p_j = softmax(t_j / T):
    l1           C_ij = sum_v |q_iv - p_jv|
    sqeuclidean  C_ij = sum_v (q_iv - p_jv)^2
built by explicit broadcasting ([Gs, Gt, V]: small shapes only), differentiated by autograd
(d|x|/dx = sign(x), 0 at 0).
Sinkhorn loss (plain domain, as SinKD writes it): per group of rows (ignored rows removed),
K = exp(-C / eps); n_iters times K /= K.sum(1), then K /= K.sum(0); loss = sum K * C; the mean
over non-empty groups (0 when none).
"""

from __future__ import annotations

import torch


def softmax_cdist(student: torch.Tensor, teacher: torch.Tensor, cost: str, temperature: float = 1.0):
    q = torch.softmax(student.double() / temperature, dim=-1)
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    d = q[..., :, None, :] - p[..., None, :, :]
    if cost == "l1":
        return d.abs().sum(-1)
    if cost == "sqeuclidean":
        return d.square().sum(-1)
    raise ValueError(cost)


def sinkhorn_loss(student, teacher, cost="l1", epsilon=0.1, n_iters=20, temperature=2.0,
                  group_size=None, labels=None, ignore_index=-100):
    V = student.shape[-1]
    s = student.reshape(-1, V)
    t = teacher.reshape(-1, V)
    n = s.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if labels is None else (labels.reshape(-1) != ignore_index)
    size = n if group_size is None else group_size
    losses = []
    for g0 in range(0, n, max(size, 1)):
        idx = [r for r in range(g0, min(g0 + size, n)) if bool(keep[r])]
        if not idx:
            continue
        C = softmax_cdist(s[idx], t[idx], cost, temperature)
        K = torch.exp(-C / epsilon)
        for _ in range(n_iters):
            K = K / K.sum(dim=1, keepdim=True)
            K = K / K.sum(dim=0, keepdim=True)
        losses.append((K * C).sum())
    if not losses:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(losses).mean()
