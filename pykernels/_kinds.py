"""Public divergence kinds and how each maps onto the five kernel kinds.

Kernels work in one canonical frame: q = softmax(first logits) (the "student side"), p =
softmax(second logits). The reverse kinds are the forward ones with the two inputs swapped, so
they need no kernel code of their own; jsd's endpoints are forward and reverse KL exactly
(TRL / Liger convention), and so are the skew kinds at alpha = 0. Kernel kind numbers must match csrc/pk_math.h (DivKind).
"""

from __future__ import annotations

from typing import NamedTuple

FORWARD_KL, JSD, SKEW_FORWARD_KL, TVD, HELLINGER = range(5)

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "hellinger")

# The keyword that carries each kind's parameter, and its default.
KIND_PARAM = {"jsd": ("beta", 0.5), "skew_forward_kl": ("alpha", 0.1), "skew_reverse_kl": ("alpha", 0.1)}


def kind_param(kind: str, beta: float | None, alpha: float | None) -> float | None:
    """The parameter of `kind` from the beta / alpha keywords (its default when not given).
    A keyword the kind does not take is an error, not silently ignored. Unknown kinds are
    left to the caller's validation."""
    given = {"beta": beta, "alpha": alpha}
    if not (isinstance(kind, str) and kind in KINDS):
        return None
    takes, default = KIND_PARAM.get(kind, (None, None))
    for name, value in given.items():
        if value is not None and name != takes:
            raise TypeError(f"kind={kind!r} takes no {name} (got {name}={value!r})")
    if takes is None:
        return None
    return default if given[takes] is None else given[takes]


class KernelCall(NamedTuple):
    kind: int  # kernel kind
    w: float  # beta or alpha in the kernel's frame (0 when unused)
    swap: bool  # the kernel's "student side" is the teacher


def kernel_call(kind: str, param: float | None) -> KernelCall:
    """Kernel kind, parameter and argument order computing public `kind` (already validated)."""
    if kind == "forward_kl":
        return KernelCall(FORWARD_KL, 0.0, False)
    if kind == "reverse_kl":
        return KernelCall(FORWARD_KL, 0.0, True)
    if kind == "jsd":
        if param == 0.0:
            return KernelCall(FORWARD_KL, 0.0, False)
        if param == 1.0:
            return KernelCall(FORWARD_KL, 0.0, True)
        return KernelCall(JSD, float(param), False)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        swap = kind == "skew_reverse_kl"
        if param == 0.0:  # no skew: exactly forward / reverse KL, without the mixture terms
            return KernelCall(FORWARD_KL, 0.0, swap)
        return KernelCall(SKEW_FORWARD_KL, float(param), swap)
    if kind == "tvd":
        return KernelCall(TVD, 0.0, False)
    if kind == "hellinger":
        return KernelCall(HELLINGER, 0.0, False)
    raise ValueError(f"kind={kind!r} is not one of {KINDS}")
