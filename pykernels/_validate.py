"""Argument checks for the public functions: every error names the argument and its value."""

from __future__ import annotations

import math
import numbers

import torch

from ._backend import BACKENDS

REDUCTIONS = ("batchmean", "sum", "mean", "none")


def logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of logits, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(x.shape)})")


def logit_pair(student: torch.Tensor, teacher: torch.Tensor, rows_may_differ: bool = False) -> None:
    """Same device, dtype and shape [..., V]; with rows_may_differ, shapes [..., G, V] whose
    row counts G may differ (a cost matrix between the two sets of rows)."""
    logits("student_logits", student)
    logits("teacher_logits", teacher)
    if rows_may_differ:
        for name, x in (("student_logits", student), ("teacher_logits", teacher)):
            if x.dim() < 2:
                raise ValueError(f"{name} must have shape [..., G, V], got {tuple(x.shape)}")
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(f"student_logits and teacher_logits differ in vocab sizes: "
                             f"{tuple(student.shape)} vs {tuple(teacher.shape)}")
        if student.shape[:-2] != teacher.shape[:-2]:
            raise ValueError(f"student_logits and teacher_logits differ in batch dims (no "
                             f"broadcasting): {tuple(student.shape)} vs {tuple(teacher.shape)}")
    elif student.shape != teacher.shape:
        what = "vocab sizes" if student.shape[-1] != teacher.shape[-1] else "shapes"
        raise ValueError(
            f"student_logits and teacher_logits differ in {what}: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits is on {student.device} but teacher_logits is on {teacher.device}"
        )
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"student_logits ({student.dtype}) and teacher_logits ({teacher.dtype}) must have the "
            "same dtype; cast one of them explicitly (a hidden cast would copy a whole N x V tensor)"
        )


def positive_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def temperature(value) -> float:
    return positive_real("temperature", value)


def unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def labels(value, leading_shape: torch.Size, device: torch.device) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {value.dtype}")
    if value.shape != leading_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(leading_shape)}, "
            f"got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"labels is on {value.device} but the logits are on {device}")


def ignore_index(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__}")
    return int(value)


def reduction(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction={value!r} is not one of {REDUCTIONS}")
    return value


def num_items_in_batch(value, device: torch.device):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        return value.to(device=device).reshape(())  # value not inspected: that would sync
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a number or a tensor, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"num_items_in_batch must be finite and > 0, got {value}")
    return value


def backend(value) -> str:
    if value not in BACKENDS:
        raise ValueError(f"backend={value!r} is not one of {BACKENDS}")
    return value
