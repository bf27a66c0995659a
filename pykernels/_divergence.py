"""The one path every divergence loss takes: validate, map the kind onto a kernel call, run the
per-row op on the chosen backend, reduce. Public functions in functional.py only forward here."""

from __future__ import annotations

import math

import torch

from . import _backend, _kinds, _registry, _validate


def row_valid_mask(labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor | None:
    if labels is None:
        return None
    return (labels != ignore_index).reshape(-1).contiguous()


def _count(num_items_in_batch, row_valid: torch.Tensor | None, rows: int):
    """The batchmean divisor: num_items_in_batch as given (a number or a 0-dim tensor, never
    synced; dividing by it is what the caller's eager code does), else the kept rows, at least
    1 (all rows ignored: loss 0)."""
    if num_items_in_batch is not None:
        return num_items_in_batch
    if row_valid is None:
        return max(rows, 1)
    return row_valid.sum().clamp_min(1)


def row_weight_hint(backend: str, reduction: str, num_items_in_batch, row_valid, rows: int,
                    vocab: int, student: torch.Tensor, teacher: torch.Tensor) -> float:
    """The factor reduce_rows will apply to every row, as a float, for the CPU backend's fused
    gradient (so a plain loss.backward() needs no pass over the gradient). CPU tensors only:
    reading a count there is not a device sync; 1.0 wherever it does not matter."""
    if (backend != "cpu" or reduction in ("none", "sum") or not torch.is_grad_enabled()
            or not (student.requires_grad or teacher.requires_grad)
            or torch.compiler.is_compiling()):
        return 1.0
    count = _count(num_items_in_batch, row_valid, rows)
    count = float(count.item() if isinstance(count, torch.Tensor) else count)
    if not (math.isfinite(count) and count > 0):
        return 1.0  # only a hint: the backward rescales by the factor the reduction applied
    return 1.0 / (count * vocab if reduction == "mean" else count)


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
    count = _count(num_items_in_batch, row_valid, rows.numel())  # a tensor stays a tensor
    if isinstance(count, torch.Tensor):
        count = count.to(total.dtype)
    if reduction == "mean":
        count = count * vocab
    return total / count


def check_options(kind: str, param: float | None, temperature: float, ignore_index: int,
                  reduction: str, backend: str):
    """The scalar options of a divergence loss, validated (so that DistillationLoss can reject
    them when it is built, not at its first call)."""
    if kind not in _kinds.KINDS:
        raise ValueError(f"kind={kind!r} is not one of {_kinds.KINDS}")
    if kind in _kinds.KIND_PARAM:
        param = _validate.unit_interval(_kinds.KIND_PARAM[kind][0], param)
    return (param, _validate.temperature(temperature), _validate.ignore_index(ignore_index),
            _validate.reduction(reduction), _validate.backend(backend))


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
    param, temperature, ignore_index, reduction, backend = check_options(
        kind, param, temperature, ignore_index, reduction, backend)
    leading_shape = student_logits.shape[:-1]
    _validate.labels(labels, leading_shape, student_logits.device)
    num_items_in_batch = _validate.num_items_in_batch(num_items_in_batch, student_logits.device)
    backend = _backend.resolve_backend(backend, student_logits)

    call = _kinds.kernel_call(kind, param)
    first, second = (teacher_logits, student_logits) if call.swap else (student_logits, teacher_logits)
    row_valid = row_valid_mask(labels, ignore_index)
    vocab = student_logits.shape[-1]
    weight = row_weight_hint(backend, reduction, num_items_in_batch, row_valid,
                             student_logits.numel() // vocab, vocab, student_logits, teacher_logits)
    rows = _registry.divergence_rows(backend, first, second, row_valid, call.kind, call.w,
                                     1.0 / temperature, weight)
    return reduce_rows(rows, row_valid, reduction, num_items_in_batch, leading_shape, student_logits.shape[-1])
