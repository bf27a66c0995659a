"""nn.Module wrappers of the functional losses."""

from __future__ import annotations

import torch

from . import functional
from ._divergence import check_options
from ._kinds import KINDS, kind_param


class DistillationLoss(torch.nn.Module):
    """`DistillationLoss(kind="jsd", beta=0.5, temperature=2.0)(student_logits, teacher_logits)`.

    Holds the kind and its keywords (beta / alpha, temperature, ignore_index, reduction, backend);
    labels and num_items_in_batch are given per call.
    """

    def __init__(self, kind: str = "forward_kl", **params):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        allowed = {"beta", "alpha", "temperature", "ignore_index", "reduction", "backend"}
        unknown = set(params) - allowed
        if unknown:
            raise TypeError(f"DistillationLoss got unknown keyword(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        # bad options raise here, not at the first call (a stray beta / alpha too)
        check_options(kind, kind_param(kind, params.get("beta"), params.get("alpha")),
                      params.get("temperature", 1.0), params.get("ignore_index", -100),
                      params.get("reduction", "batchmean"), params.get("backend", "auto"))
        self.kind = kind
        self.params = params

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        return functional.divergence(student_logits, teacher_logits, self.kind, labels=labels,
                                     num_items_in_batch=num_items_in_batch, **self.params)

    def extra_repr(self) -> str:
        return ", ".join([f"kind={self.kind!r}"] + [f"{k}={v!r}" for k, v in self.params.items()])


class SinkhornLoss(torch.nn.Module):
    """`SinkhornLoss(cost="l1", epsilon=0.1, n_iters=20, temperature=2.0, group_size=T)` applied
    as `loss(student_logits, teacher_logits, labels=None)`: pykernels.sinkhorn_loss with its
    keywords held by the module (SinKD's Sinkhorn term; add a KL term next to it)."""

    _ALLOWED = {"cost", "epsilon", "n_iters", "temperature", "group_size", "ignore_index",
                "envelope", "backend"}

    def __init__(self, **params):
        super().__init__()
        unknown = set(params) - self._ALLOWED
        if unknown:
            raise TypeError(f"SinkhornLoss got unknown keyword(s) {sorted(unknown)}; "
                            f"allowed: {sorted(self._ALLOWED)}")
        self.params = params

    def forward(self, student_logits, teacher_logits, labels=None):
        return functional.sinkhorn_loss(student_logits, teacher_logits, labels=labels, **self.params)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.items())
