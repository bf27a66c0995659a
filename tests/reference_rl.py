"""Independent float64 oracle for the pykernels RL ops (token log-probs, entropy, KL penalties).

Written from DESIGN.md ("RL quantities", "Math conventions") and verl / TRL's published
formulas only; it does not import pykernels.

Per row, after temperature (s = z / T, q = softmax(s)):
    token log-prob   logp = log q_y = log_softmax(s)[y]          (-inf where z_y = -inf)
    entropy          H = -sum_i q_i log q_i                       (0 log 0 = 0)
    backward         dz_i = (dlogp (1[i = y] - q_i) - dH q_i (log q_i + H)) / T
KL penalties (verl core_algos.kl_penalty; logp = policy, ref = reference token log-probs):
    kl / k1          logp - ref
    abs              |logp - ref|
    mse / k2         0.5 (logp - ref)^2
    low_var_kl / k3  x = clamp(ref - logp, -20, 20); clamp(e^x - x - 1, -10, 10)
    <mode>+          value of <mode>, gradient of k2 (straight-through)
    full             KL(pi || pi_ref) = sum_v pi (log pi - log pi_ref) per token, from logits,
                     pi = softmax(policy / T), pi_ref = softmax(ref / T); +inf where pi > 0 = pi_ref
Drop-ins (eager formulas of verl / TRL):
    logprobs_from_logits(logits, labels)  = log_softmax(logits).gather(-1, labels[..., None])[..., 0]
    entropy_from_logits(logits)           = logsumexp(logits) - sum(softmax(logits) * logits)
    selective_log_softmax(logits, index)  = log_softmax(logits).gather(-1, index) ([..., K] index)
                                            or the [...]-index form (one token per row)

Everything is float64 on the given values (low-precision inputs are upcast exactly) and
differentiable with torch.autograd.  Masking uses the "safe where" pattern (both branches
finite where they are not selected), so autograd stays finite at -inf logits.  A row with a
NaN logit gives NaN.
"""

from __future__ import annotations

import math

import torch

ELEMENTWISE_BASE_MODES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
PLUS_MODES = tuple(m + "+" for m in ELEMENTWISE_BASE_MODES)
ELEMENTWISE_MODES = ELEMENTWISE_BASE_MODES + PLUS_MODES
ALL_MODES = ELEMENTWISE_MODES + ("full",)


def _f64(x: torch.Tensor) -> torch.Tensor:
    """float64 view of x; keeps the autograd graph when x already is float64."""
    return x if x.dtype == torch.float64 else x.detach().to(torch.float64)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _f64(logits) / float(temperature)


def _check_tokens(tokens: torch.Tensor, lead_shape, V: int) -> torch.Tensor:
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(lead_shape):
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != leading shape {tuple(lead_shape)}")
    t = tokens.detach().to("cpu", torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"tokens out of range [0, {V})")
    return tokens.to(torch.int64)


def _entropy_from_logq(lq: torch.Tensor) -> torch.Tensor:
    """-sum q log q over the last dim with 0 log 0 = 0 (finite autograd at q = 0)."""
    q = torch.exp(lq)
    pos = q > 0
    zero = torch.zeros_like(lq)
    safe_lq = torch.where(pos, lq, zero)
    return -torch.where(pos, q * safe_lq, zero).sum(-1)


def _nan_rows(z: torch.Tensor) -> torch.Tensor:
    return torch.isnan(z).any(-1)


# ----------------------------------------------------------------------------- token log-probs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """log softmax(logits / T)[tokens], float64, leading shape."""
    logp, _ = token_logprobs_and_entropy(logits, tokens, temperature)
    return logp


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(softmax(logits / T)), float64, leading shape."""
    s = _scaled(logits, temperature)
    lq = torch.log_softmax(s, dim=-1)
    h = _entropy_from_logq(lq)
    nan = _nan_rows(s)
    if nan.any():
        h = torch.where(nan, torch.full_like(h, math.nan), h)
    return h


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0):
    """(logp, H), both float64 with the leading shape; differentiable w.r.t. float64 logits."""
    s = _scaled(logits, temperature)
    idx = _check_tokens(tokens, s.shape[:-1], s.shape[-1]).to(s.device)
    lq = torch.log_softmax(s, dim=-1)
    logp = lq.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    h = _entropy_from_logq(lq)
    nan = _nan_rows(s)
    if nan.any():
        logp = torch.where(nan, torch.full_like(logp, math.nan), logp)
        h = torch.where(nan, torch.full_like(h, math.nan), h)
    return logp, h


def analytic_grad(logits, tokens, temperature, dlogp=None, dH=None):
    """DESIGN.md's backward, float64: dz_i = (dlogp (1[i=y] - q_i) - dH q_i (log q_i + H)) / T.

    dlogp / dH: leading-shape tensors or None (0).  Used to check the oracle's autograd.
    """
    s = _scaled(logits, temperature).detach()
    idx = _check_tokens(tokens, s.shape[:-1], s.shape[-1]).to(s.device)
    lq = torch.log_softmax(s, -1)
    q = lq.exp()
    h = _entropy_from_logq(lq)
    g = torch.zeros_like(s)
    if dlogp is not None:
        onehot = torch.zeros_like(s).scatter_(-1, idx.unsqueeze(-1), 1.0)
        g = g + _f64(dlogp)[..., None] * (onehot - q)
    if dH is not None:
        pos = q > 0
        safe = torch.where(pos, lq, torch.zeros_like(lq))
        term = torch.where(pos, q * (safe + h[..., None]), torch.zeros_like(q))
        g = g - _f64(dH)[..., None] * term
    return g / float(temperature)


# ----------------------------------------------------------------------------- KL penalties


def _mode_value(logp: torch.Tensor, ref: torch.Tensor, base: str) -> torch.Tensor:
    if base in ("kl", "k1"):
        return logp - ref
    if base == "abs":
        return (logp - ref).abs()
    if base in ("mse", "k2"):
        return 0.5 * (logp - ref).square()
    if base in ("low_var_kl", "k3"):
        x = torch.clamp(ref - logp, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(x) - x - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown kl_penalty mode {base!r}")


def kl_penalty(logp: torch.Tensor, ref: torch.Tensor, mode: str) -> torch.Tensor:
    """Elementwise KL penalty (verl semantics), float64, differentiable w.r.t. float64 inputs.

    '+' modes: value of the base mode, gradient of k2 (k2 - k2.detach() + mode.detach()).
    """
    if mode not in ELEMENTWISE_MODES:
        raise ValueError(f"unknown kl_penalty mode {mode!r}")
    a, b = _f64(logp), _f64(ref)
    if mode.endswith("+"):
        base = mode[:-1]
        value = _mode_value(a, b, base)
        k2 = 0.5 * (a - b).square()
        return k2 - k2.detach() + value.detach()
    return _mode_value(a, b, mode)


def kl_penalty_grad(logp, ref, mode, grad_output):
    """Analytic d/dlogp, d/dref of the elementwise modes times grad_output (float64).

    Off the clamp / abs kinks only (the callers keep inputs away from them)."""
    a, b = _f64(logp).detach(), _f64(ref).detach()
    go = _f64(grad_output).detach()
    d = a - b
    base = mode[:-1] if mode.endswith("+") else mode
    if mode.endswith("+") or base in ("mse", "k2"):
        ga = d
    elif base in ("kl", "k1"):
        ga = torch.ones_like(d)
    elif base == "abs":
        ga = torch.sign(d)
    elif base in ("low_var_kl", "k3"):
        x = b - a
        inner = (x > -20) & (x < 20)
        val = torch.exp(torch.clamp(x, -20, 20)) - torch.clamp(x, -20, 20) - 1
        outer = (val > -10) & (val < 10)
        # d/dlogp of e^x - x - 1 with x = ref - logp is -(e^x - 1) = 1 - e^x
        ga = torch.where(inner & outer, 1.0 - torch.exp(x.clamp(-20, 20)), torch.zeros_like(x))
    else:
        raise ValueError(mode)
    return go * ga, -go * ga


def full_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(pi || pi_ref), pi = softmax(policy / T), pi_ref = softmax(ref / T); float64.

    0 log 0 = 0; pi_i > 0 where pi_ref_i = 0 gives +inf; NaN rows give NaN.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError("policy/ref logits shape mismatch")
    s = _scaled(policy_logits, temperature)
    t = _scaled(ref_logits, temperature)
    lq = torch.log_softmax(s, -1)
    lp = torch.log_softmax(t, -1)
    q = lq.exp()
    pos = q > 0
    zero = torch.zeros_like(q)
    la = torch.where(pos, lq, zero)
    lb = torch.where(pos, lp, zero)
    val = torch.where(pos, q * (la - lb), zero).sum(-1)
    nan = _nan_rows(s) | _nan_rows(t)
    if nan.any():
        val = torch.where(nan, torch.full_like(val, math.nan), val)
    return val


def full_kl_analytic_grads(policy_logits, ref_logits, temperature=1.0):
    """d KL(pi||pi_ref) / d (policy, ref) logits per row, float64 (DESIGN.md's reverse_kl row):
    policy: q_i (log q_i - log p_i - KL) / T; ref: (p_i - q_i) / T.  Finite rows only."""
    s = _scaled(policy_logits, temperature).detach()
    t = _scaled(ref_logits, temperature).detach()
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()
    pos = q > 0
    diff = torch.where(pos, lq, torch.zeros_like(lq)) - torch.where(pos, lp, torch.zeros_like(lp))
    k = torch.where(pos, q * diff, torch.zeros_like(q)).sum(-1, keepdim=True)
    gs = torch.where(pos, q * (diff - k), torch.zeros_like(q))
    return gs / temperature, (p - q) / temperature


# ----------------------------------------------------------------------------- drop-ins (eager)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """verl: log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1), float64."""
    z = _f64(logits)
    lq = torch.log_softmax(z, dim=-1)
    return lq.gather(-1, labels.to(z.device, torch.int64).unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl: logsumexp(logits) - sum(softmax(logits) * logits), float64 (finite logits)."""
    z = _f64(logits)
    pd = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (pd * z).sum(-1)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL: log_softmax(logits).gather(-1, index) for index [..., K]; index [...] (one token
    per row) gives [...].  float64."""
    z = _f64(logits)
    lq = torch.log_softmax(z, dim=-1)
    idx = index.to(z.device, torch.int64)
    if idx.dim() == z.dim() - 1:
        return lq.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return lq.gather(-1, idx)
