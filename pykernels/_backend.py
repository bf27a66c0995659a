"""Which backends exist here, and which one runs a given call.

Backends: "cpu" and "cuda" (the C++ extension pykernels._C), "triton" (Triton kernels; on CPU
tensors only under TRITON_INTERPRET=1, which is how they are tested without a GPU) and
"torch" (the eager reference in pykernels._torch_backend, always available).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")

try:  # loading the extension registers torch.ops.pykernels.* for CPU (and CUDA when built)
    from . import _C  # noqa: F401

    EXTENSION_ERROR = None
except ImportError as exc:  # not built: the Triton and torch backends still work
    EXTENSION_ERROR = exc


def _op_has_kernel(dispatch_key: str) -> bool:
    return EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "pykernels::divergence_forward", dispatch_key
    )


HAS_CPU_EXT = _op_has_kernel("CPU")
HAS_CUDA_EXT = _op_has_kernel("CUDA")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return HAS_CPU_EXT and device_type == "cpu"
    if backend == "cuda":
        return HAS_CUDA_EXT and device_type == "cuda" and torch.cuda.is_available()
    if backend == "triton":
        if not HAS_TRITON:
            return False
        if device_type == "cuda":
            return torch.cuda.is_available()
        return device_type == "cpu" and triton_interpret()
    return False


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backend names that can run here: for tensors on `device`, or on any device if None."""
    names = ("cpu", "cuda", "triton", "torch")
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        return [b for b in names if any(_runs_on(b, t) for t in types)]
    return [b for b in names if _runs_on(b, torch.device(device).type)]


# "auto" order per device type. On CUDA both kernels are candidates; Triton goes first until a
# GPU benchmark of this package says otherwise. The interpreter is never picked automatically.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Backend name that will run `x`; a clear ValueError if the requested one cannot."""
    if backend == "auto":
        backend = os.environ.get("PYKERNELS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"PYKERNELS_BACKEND={backend!r} is not a backend; expected one of {BACKENDS}"
            )
    device_type = x.device.type
    if backend == "auto":
        if x.dtype not in _KERNEL_DTYPES:  # float64: only the eager reference computes in it
            return "torch"
        for name in _AUTO_ORDER.get(device_type, ("torch",)):
            if _runs_on(name, device_type):
                return name
        return "torch"
    if not _runs_on(backend, device_type):
        raise ValueError(f"backend={backend!r} cannot run {device_type} tensors here: {why_not(backend, device_type)}")
    if backend != "torch" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} takes float32, float16 or bfloat16 logits, got {x.dtype}; "
            "use backend='torch' for float64"
        )
    return backend


def why_not(backend: str, device_type: str) -> str:
    if backend in ("cpu", "cuda") and EXTENSION_ERROR is not None:
        return f"the C++ extension is not built ({EXTENSION_ERROR})"
    if backend == "cpu":
        return "the 'cpu' backend runs CPU tensors only"
    if backend == "cuda":
        if not HAS_CUDA_EXT:
            return "the extension was built without CUDA kernels"
        return "the 'cuda' backend runs CUDA tensors only (and needs a CUDA device)"
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device_type == "cpu":
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return "Triton needs a CUDA device"
    return "unsupported device"
