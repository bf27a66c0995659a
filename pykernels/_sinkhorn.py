"""Softmax cdist and the Sinkhorn distillation loss (SinKD): validation, grouping, and the
log-domain Sinkhorn iterations on the small G x G cost matrices. The vocabulary-wide work (the
cost matrix and its backward) is the registered softmax_cdist op; everything here is G x G."""

from __future__ import annotations

import math
import warnings

import torch

from . import _backend, _registry, _validate
from ._divergence import row_valid_mask

COSTS = ("l1", "sqeuclidean")
_COST_ID = {"l1": 0, "sqeuclidean": 1}


def cost_id(cost) -> int:
    if cost not in _COST_ID:
        raise ValueError(f"cost={cost!r} is not one of {COSTS}")
    return _COST_ID[cost]


def _as_batches(x: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    """x [..., V] as a [groups, rows, V] view (vocab stride 1). Copies only a vocabulary dim
    with a non-unit stride (as the divergence ops do) or, with a warning, leading dims that
    cannot be viewed that way (e.g. one group over a sliced [B, T, V])."""
    V = x.shape[-1]
    if V > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(groups, rows, V)
    except RuntimeError:
        warnings.warn("pykernels: these logits' rows cannot be viewed as groups of equally "
                      "strided rows; copying them (pick group_size to match a tensor dim, or "
                      "pass contiguous logits)", stacklevel=4)
        return x.reshape(groups, rows, V).contiguous()


def softmax_cdist(student_logits, teacher_logits, cost="l1", temperature=1.0, backend="auto",
                  row_valid=None) -> torch.Tensor:
    _validate.logit_pair(student_logits, teacher_logits, rows_may_differ=True)
    cost = cost_id(cost)
    temperature = _validate.temperature(temperature)
    backend = _backend.resolve_backend(_validate.backend(backend), student_logits)
    batch = student_logits.shape[:-2]
    gs, gt, V = student_logits.shape[-2], teacher_logits.shape[-2], student_logits.shape[-1]
    n = math.prod(batch)
    s3 = _as_batches(student_logits, n, gs)
    t3 = _as_batches(teacher_logits, n, gt)
    C = _registry.softmax_cdist_3d(backend, s3, t3, row_valid, cost, 1.0 / temperature)
    return C.reshape(*batch, gs, gt)


def _pair_mask(valid: torch.Tensor) -> torch.Tensor:
    """[ng, g, g]: both the row and the column of the pair are valid."""
    return valid[:, :, None] & valid[:, None, :]


def sinkhorn_plan(C: torch.Tensor, valid: torch.Tensor | None, epsilon: float, n_iters: int,
                  backend: str) -> torch.Tensor:
    """log of the plan of SinKD's iterations for costs C [ng, g, g] with rows/columns flagged
    by valid [ng, g] (None: all valid): K = exp(-C / eps), then n_iters times every row divided
    by its sum and every column by its sum, in the log domain (no underflow for small eps).
    Masked rows and columns hold -inf (they take no mass)."""
    log_k = -C / epsilon
    if valid is not None:
        log_k = torch.where(_pair_mask(valid), log_k, float("-inf"))
    return _registry.sinkhorn_iterations(backend, log_k, valid, n_iters)


def sinkhorn_loss(student_logits, teacher_logits, cost, epsilon, n_iters, temperature,
                  group_size, labels, ignore_index, envelope, backend) -> torch.Tensor:
    _validate.logit_pair(student_logits, teacher_logits)
    cost_id(cost)
    epsilon = _validate.positive_real("epsilon", epsilon)
    n_iters = _validate.positive_int("n_iters", n_iters)
    lead = student_logits.shape[:-1]
    _validate.labels(labels, lead, student_logits.device)
    ignore_index = _validate.ignore_index(ignore_index)
    if not isinstance(envelope, bool):
        raise TypeError(f"envelope must be a bool, got {type(envelope).__name__}")
    rows = student_logits.numel() // student_logits.shape[-1]
    if group_size is None:
        group_size = max(rows, 1)
    else:
        group_size = _validate.positive_int("group_size", group_size)
        if rows % group_size:
            raise ValueError(f"group_size={group_size} does not divide the {rows} rows of the logits "
                             f"(leading shape {tuple(lead)})")
    if rows == 0:  # nothing to transport; keep the graph so backward gives zero gradients
        return (student_logits.sum() + teacher_logits.sum()).float() * 0.0
    groups = rows // group_size
    row_valid = row_valid_mask(labels, ignore_index)
    s3 = _as_batches(student_logits, groups, group_size)
    t3 = _as_batches(teacher_logits, groups, group_size)
    backend = _backend.resolve_backend(_validate.backend(backend), student_logits)
    C = softmax_cdist(s3, t3, cost=cost, temperature=temperature, backend=backend, row_valid=row_valid)
    valid = None if row_valid is None else row_valid.view(groups, group_size)
    if envelope:  # the plan at convergence is a constant: dLoss/dC = plan
        with torch.no_grad():
            log_plan = sinkhorn_plan(C.detach(), valid, epsilon, n_iters, backend)
    else:
        log_plan = sinkhorn_plan(C, valid, epsilon, n_iters, backend)
    transport = log_plan.exp() * C
    if valid is not None:  # masked pairs: 0, whatever C holds there
        transport = torch.where(_pair_mask(valid), transport, 0.0)
    transport = transport.sum(dim=(1, 2))
    if valid is None:
        return transport.sum() / groups
    nonempty = valid.any(dim=1)
    return transport.sum() / nonempty.sum().clamp_min(1).to(transport.dtype)
