"""pykernels: fused softmax + divergence kernels over huge vocabularies, from raw logits
(KL / JSD / TVD / Hellinger, RL log-probs / entropy / KL penalties, Sinkhorn).

Set TRITON_INTERPRET=1 before importing pykernels to run the Triton kernels on CPU tensors.
"""

from . import _registry  # noqa: F401  (registers the ops: must come before any use)
from . import nn, rl
from ._backend import available_backends
from .functional import (
    divergence,
    forward_kl,
    hellinger,
    jsd,
    reverse_kl,
    sinkhorn_loss,
    skew_forward_kl,
    skew_reverse_kl,
    softmax_cdist,
    tvd,
)
from .rl import entropy, kl_penalty, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "divergence",
    "entropy",
    "forward_kl",
    "hellinger",
    "jsd",
    "kl_penalty",
    "nn",
    "reverse_kl",
    "rl",
    "sinkhorn_loss",
    "skew_forward_kl",
    "skew_reverse_kl",
    "softmax_cdist",
    "token_logprobs",
    "tvd",
]
