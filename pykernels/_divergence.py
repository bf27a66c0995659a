"""The one path every divergence loss takes: validate, map the kind onto a kernel call, run the
per-row op on the chosen backend, reduce. Public functions in functional.py only forward here."""

from __future__ import annotations

import torch

from . import _backend, _kinds, _registry, _validate


def row_valid_mask(labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
    if labels is None:
        return None
    return (labels != ignore_index).reshape(-1).contiguous()


def reduce_rows(
    rows: torch.Tensor,
    row_valid: torch.Tensor | None,
    reduction: str,
    num_items_in_batch,
    leading_shape: torch.Size,
    vocab: int,
) -> torch.Tensor:
    """Applies `reduction` to per-row losses [N] (ignored rows already hold 0)."""
    if reduction == "none":
        return rows.reshape(leading_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        count = num_items_in_batch
    elif row_valid is None:
        count = rows.numel()
    else:
        count = row_valid.sum()  # a device tensor: no host sync
    if isinstance(count, torch.Tensor):
        count = count.to(total.dtype).clamp_min(1)
    else:
        count = max(count, 1)
    if reduction == "mean":
        count = count * vocab
    return total / count


def divergence_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    param: float | None,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    num_items_in_batch,
    backend: str,
) -> torch.Tensor:
    _validate.logit_pair(student_logits, teacher_logits)
    if kind not in _kinds.KINDS:
        raise ValueError(f"kind={kind!r} is not one of {_kinds.KINDS}")
    if kind in _kinds.KIND_PARAM:
        param = _validate.unit_interval(_kinds.KIND_PARAM[kind][0], param)
    temperature = _validate.temperature(temperature)
    leading_shape = student_logits.shape[:-1]
    _validate.labels(labels, leading_shape, student_logits.device)
    ignore_index = _validate.ignore_index(ignore_index)
    reduction = _validate.reduction(reduction)
    num_items_in_batch = _validate.num_items_in_batch(num_items_in_batch, student_logits.device)
    backend = _backend.resolve_backend(_validate.backend(backend), student_logits)

    call = _kinds.kernel_call(kind, param)
    first, second = (teacher_logits, student_logits) if call.swap else (student_logits, teacher_logits)
    row_valid = row_valid_mask(labels, ignore_index)
    rows = _registry.divergence_rows(backend, first, second, row_valid, call.kind, call.w, 1.0 / temperature)
    return reduce_rows(rows, row_valid, reduction, num_items_in_batch, leading_shape, student_logits.shape[-1])
