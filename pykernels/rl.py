"""RL post-training quantities from huge logit tensors: token log-probs and entropy in one read
of the logits (no log_softmax materialised), KL penalties as verl defines them, and drop-in
replacements for verl's and TRL's helpers.

    logp = pk.token_logprobs(logits, tokens)                              # [...]
    logp, ent = pk.token_logprobs(logits, tokens, return_entropy=True)
    ent = pk.entropy(logits)
    kl = pk.kl_penalty(logp, ref_logp, mode="k3")                         # elementwise
    kl = pk.kl_penalty(policy_logits, ref_logits, mode="full")            # whole vocabulary

Drop-ins (same signatures, import from pykernels.rl): logprobs_from_logits(logits, labels)
and entropy_from_logits(logits) (verl), selective_log_softmax(logits, index) (TRL).
"""

from __future__ import annotations

import torch

from . import _backend, _registry, _validate
from .functional import divergence


def _check_tokens(name: str, tokens, logits: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """The flattened [N] token tensor ([N, K] with per_row: K tokens per position), after
    checking dtype, shape and range (the range check reads the values on CPU; on CUDA it is an
    asynchronous device assert, no host sync)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {tokens.dtype}")
    lead = tokens.shape[:-1] if per_row else tokens.shape
    if lead != logits.shape[:-1]:
        raise ValueError(f"{name} must have the logits' leading shape {tuple(logits.shape[:-1])}"
                         f"{' + (K,)' if per_row else ''}, got {tuple(tokens.shape)}")
    if tokens.device != logits.device:
        raise ValueError(f"{name} is on {tokens.device} but the logits are on {logits.device}")
    flat = tokens.reshape(lead.numel(), tokens.shape[-1]) if per_row else tokens.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.long()
    flat = flat.contiguous()
    V = logits.shape[-1]
    if flat.numel() and not torch.compiler.is_compiling():
        in_range = (flat >= 0) & (flat < V)
        if flat.device.type == "cpu":
            if not bool(in_range.all()):
                bad = flat[~in_range][0].item()
                raise ValueError(f"{name} holds id {bad}, out of range for a vocabulary of {V}")
        else:
            torch._assert_async(in_range.all(), f"pykernels: {name} out of range [0, {V})")
    return flat


def _checked_inputs(logits, tokens, backend, name, per_row=False):
    """(resolved backend, flattened tokens) after validating the logits and the tokens."""
    _validate.logits("logits", logits)
    backend = _backend.resolve_backend(_validate.backend(backend), logits)
    return backend, _check_tokens(name, tokens, logits, per_row)


def _token_logprob(logits, tokens, temperature, with_entropy, backend, name="tokens"):
    temperature = _validate.temperature(temperature)
    backend, flat = _checked_inputs(logits, tokens, backend, name)
    logp, ent = _registry.token_logprob_rows(backend, logits, flat, 1.0 / temperature, with_entropy)
    lead = logits.shape[:-1]
    return logp.reshape(lead), (ent.reshape(lead) if with_entropy else None)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, backend: str = "auto"):
    """log softmax(logits / T)[tokens] per position, fp32, of the leading shape.

    With return_entropy=True also the entropy H = -sum q log q of softmax(logits / T), from the
    same read of the logits. Gradients flow from either output or both:
    dz = (dlogp (onehot - q) - dH q (log q + H)) / T. A token whose logit is -inf has log-prob
    -inf, as in eager PyTorch; token ids outside [0, V) are an error."""
    logp, ent = _token_logprob(logits, tokens, temperature, return_entropy, backend)
    return (logp, ent) if return_entropy else logp


def entropy(logits: torch.Tensor, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Entropy -sum q log q of softmax(logits / T) per position, fp32 (0 log 0 = 0)."""
    _validate.logits("logits", logits)
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return _token_logprob(logits, tokens, temperature, True, backend)[1]


_KL_MODES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full")


def _k2(diff: torch.Tensor) -> torch.Tensor:
    return 0.5 * diff.square()


def _elementwise_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mode: str) -> torch.Tensor:
    diff = logp - ref_logp
    if mode in ("kl", "k1"):
        return diff
    if mode == "abs":
        return diff.abs()
    if mode in ("mse", "k2"):
        return _k2(diff)
    # low_var_kl / k3 (Schulman's estimator), clamped as verl does
    x = torch.clamp(-diff, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(x) - x - 1.0, min=-10.0, max=10.0)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mode: str = "k3", *,
               temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """KL penalty between the policy and the reference, with verl's modes.

    Elementwise on token log-probs (logp = policy, ref = reference, same shape, fp32 result):
      "kl" / "k1": logp - ref
      "abs": |logp - ref|
      "mse" / "k2": 1/2 (logp - ref)^2
      "low_var_kl" / "k3": x = clamp(ref - logp, -20, 20); clamp(e^x - x - 1, -10, 10)
      a "+" suffix (e.g. "k3+"): the value of the mode with the gradient of k2
        (straight-through: k2 + (mode - k2).detach()).
    "full": logp and ref_logp are the policy and reference LOGITS [..., V]; returns
      KL(pi || pi_ref) = sum_v pi (log pi - log pi_ref) per position with pi = softmax(logits / T),
      from the fused divergence kernels, with gradients to both logits (verl has no "full").
    """
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a string, got {type(mode).__name__}")
    straight_through = mode.endswith("+") and mode[:-1] in _KL_MODES and mode != "full+"
    base = mode[:-1] if straight_through else mode
    if base not in _KL_MODES:
        raise ValueError(f"mode={mode!r} is not one of {_KL_MODES} (or one of them with a '+' suffix)")
    if base == "full":
        return divergence(logp, ref_logp, "reverse_kl", temperature=temperature,
                          reduction="none", backend=backend)
    for name, x in (("logp", logp), ("ref_logp", ref_logp)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of log-probs")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    logp, ref_logp = logp.float(), ref_logp.float()
    value = _elementwise_kl(logp, ref_logp, base)
    if straight_through:
        k2 = _k2(logp - ref_logp)
        return k2 + (value - k2).detach()
    return value


# ------------------------------------------------------------------------------------ drop-ins
def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward=True):
    """verl's logprobs_from_logits: log_softmax(logits)[labels] per position, without the
    N x V log_softmax. (`inplace_backward` is accepted for signature compatibility.)"""
    return _token_logprob(logits, labels, 1.0, False, "auto", name="labels")[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's entropy_from_logits: entropy of softmax(logits) over the last dim."""
    return entropy(logits)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's selective_log_softmax: log_softmax(logits).gather(-1, index). `index` has the
    logits' leading shape (one token per position) or [..., K] (K tokens per position, from one
    read of the logits and one gradient buffer)."""
    if isinstance(index, torch.Tensor) and isinstance(logits, torch.Tensor) and index.dim() == logits.dim():
        backend, flat = _checked_inputs(logits, index, "auto", "index", per_row=True)
        if index.shape[-1] == 0:
            return logits.new_empty(index.shape, dtype=torch.float32)
        return _registry.token_logprobs_k(backend, logits, flat, 1.0).reshape(index.shape)
    return _token_logprob(logits, index, 1.0, False, "auto", name="index")[0]
