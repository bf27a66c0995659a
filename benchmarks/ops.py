"""The benchmarked ops: for each, how to build its inputs, the eager PyTorch code users write
today, the pykernels call, Liger-Kernel's equivalent where one exists, and the bytes of the
minimal-bytes model (DESIGN.md).

Every op is a scalar loss of (student, teacher, tokens) so that forward + backward is
`loss.backward()`; gradients go to the student logits only (the teacher is frozen, as in
distillation and for the RL reference model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import pykernels as pk

# ----------------------------------------------------------------------------- eager code
# Written as users write it (TRL / DistiLLM / verl / SinKD), in the inputs' dtype except where
# that code upcasts itself.


def eager_forward_kl(s, t):
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)


def eager_reverse_kl(s, t):
    return eager_forward_kl(t, s)


def eager_jsd(s, t, beta=0.5):
    """TRL's generalized_jsd_loss (mixture formed in log space)."""
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    beta_t = torch.tensor(beta, dtype=log_q.dtype, device=log_q.device)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - beta_t), log_p + torch.log(beta_t)]), dim=0)
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    return (beta_t * kl_p + (1 - beta_t) * kl_q).sum() / s.shape[0]


def _skew_kl(p_logits, q_logits, alpha):
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q) from probabilities."""
    p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)
    mix = alpha * p + (1 - alpha) * q
    return (p * (torch.log(p + 1e-30) - torch.log(mix + 1e-30))).sum(-1).mean()


def eager_tvd(s, t):
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1).mean()


def eager_hellinger(s, t):
    return 0.5 * (F.softmax(t, -1).sqrt() - F.softmax(s, -1).sqrt()).square().sum(-1).mean()


def eager_logprobs_entropy(s, tokens):
    """verl's logprobs_from_logits + entropy_from_logits."""
    logp = F.log_softmax(s, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs = F.softmax(s, -1)
    ent = torch.logsumexp(s, -1) - (probs * s).sum(-1)
    return logp, ent


def logprob_loss(logp, ent):
    # A scalar through both outputs, as a PPO/GRPO loss with an entropy bonus.
    return (logp.float().sum() + 0.01 * ent.float().sum()) / logp.shape[0]


def eager_kl_full(s, r):
    """Per-token KL(pi || pi_ref) over the vocabulary, averaged."""
    log_pi, log_ref = F.log_softmax(s, -1), F.log_softmax(r, -1)
    return (log_pi.exp() * (log_pi - log_ref)).sum(-1).mean()


def eager_softmax_cdist(s, t, cost):
    # torch.cdist has no bf16 CPU kernel; SinKD computes its loss in fp32 anyway
    q, p = F.softmax(s.float(), -1), F.softmax(t.float(), -1)
    return torch.cdist(q, p, p=1) if cost == "l1" else torch.cdist(q, p, p=2) ** 2


def eager_sinkhorn(s, t, cost, epsilon=0.1, n_iters=20, temperature=2.0):
    """SinKD as written: softmaxes, torch.cdist, the plain row / column normalisation loop."""
    C = eager_softmax_cdist(s / temperature, t / temperature, cost)
    K = torch.exp(-C / epsilon)
    for _ in range(n_iters):
        K = K / K.sum(dim=1, keepdim=True)
        K = K / K.sum(dim=0, keepdim=True)
    return (K * C).sum()


# ----------------------------------------------------------------------------- Liger
def _liger(name: str):
    import liger_kernel.transformers as lk

    return getattr(lk, name)


def liger_forward_kl():
    loss = _liger("LigerKLDIVLoss")(reduction="batchmean", log_target=True)
    return lambda s, t: loss(F.log_softmax(s, -1), F.log_softmax(t, -1))


def liger_jsd():
    cls = _liger("LigerJSD")
    try:
        loss = cls(beta=0.5)
    except TypeError:  # older releases: beta fixed at 0.5
        loss = cls()
    return lambda s, t: loss(F.log_softmax(s, -1), F.log_softmax(t, -1))


def liger_tvd():
    loss = _liger("LigerTVDLoss")(reduction="batchmean")
    return lambda s, t: loss(F.softmax(s, -1), F.softmax(t, -1))


# ----------------------------------------------------------------------------- op table
@dataclass(frozen=True)
class Op:
    name: str
    family: str  # "divergence", "rl", "sinkhorn": which shapes the sweep gives it
    eager: Callable  # (s, t, tokens) -> scalar loss
    ours: Callable  # (s, t, tokens, backend) -> scalar loss
    n_inputs: int  # logit tensors read (student, teacher)
    liger: Optional[Callable] = None  # () -> (s, t) -> loss; None: Liger has no such op
    liger_note: str = ""


def _div(kind, **params):
    return lambda s, t, y, backend: pk.divergence(s, t, kind, backend=backend, **params)


OPS: dict[str, Op] = {op.name: op for op in [
    Op("forward_kl", "divergence", lambda s, t, y: eager_forward_kl(s, t), _div("forward_kl"), 2,
       liger_forward_kl, "log_softmax of both inputs + LigerKLDIVLoss"),
    Op("reverse_kl", "divergence", lambda s, t, y: eager_reverse_kl(s, t), _div("reverse_kl"), 2),
    Op("jsd", "divergence", lambda s, t, y: eager_jsd(s, t), _div("jsd", beta=0.5), 2,
       liger_jsd, "log_softmax of both inputs + LigerJSD"),
    Op("skew_forward_kl", "divergence", lambda s, t, y: _skew_kl(t, s, 0.1),
       _div("skew_forward_kl", alpha=0.1), 2),
    Op("skew_reverse_kl", "divergence", lambda s, t, y: _skew_kl(s, t, 0.1),
       _div("skew_reverse_kl", alpha=0.1), 2),
    Op("tvd", "divergence", lambda s, t, y: eager_tvd(s, t), _div("tvd"), 2,
       liger_tvd, "softmax of both inputs + LigerTVDLoss"),
    Op("hellinger", "divergence", lambda s, t, y: eager_hellinger(s, t), _div("hellinger"), 2),
    Op("logprobs_entropy", "rl", lambda s, t, y: logprob_loss(*eager_logprobs_entropy(s, y)),
       lambda s, t, y, backend: logprob_loss(*pk.token_logprobs(s, y, return_entropy=True,
                                                                backend=backend)), 1),
    Op("kl_full", "rl", lambda s, t, y: eager_kl_full(s, t),
       lambda s, t, y, backend: pk.kl_penalty(s, t, mode="full", backend=backend).mean(), 2),
    Op("cdist_l1", "sinkhorn", lambda s, t, y: eager_softmax_cdist(s, t, "l1").sum(),
       lambda s, t, y, backend: pk.softmax_cdist(s, t, cost="l1", backend=backend).sum(), 2),
    Op("cdist_sqeuclidean", "sinkhorn", lambda s, t, y: eager_softmax_cdist(s, t, "sqeuclidean").sum(),
       lambda s, t, y, backend: pk.softmax_cdist(s, t, cost="sqeuclidean", backend=backend).sum(), 2),
    Op("sinkhorn_l1", "sinkhorn", lambda s, t, y: eager_sinkhorn(s, t, "l1"),
       lambda s, t, y, backend: pk.sinkhorn_loss(s, t, cost="l1", backend=backend), 2),
    Op("sinkhorn_sqeuclidean", "sinkhorn", lambda s, t, y: eager_sinkhorn(s, t, "sqeuclidean"),
       lambda s, t, y, backend: pk.sinkhorn_loss(s, t, cost="sqeuclidean", backend=backend), 2),
]}


def min_bytes(op: Op, rows: int, vocab: int, elem_size: int, backward: bool) -> int:
    """DESIGN.md's minimal-bytes model: every logit tensor read once, plus the student
    gradient written once for forward + backward."""
    return (op.n_inputs + (1 if backward else 0)) * rows * vocab * elem_size


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    s = (2 * torch.randn(rows, vocab, device=device, generator=gen)).to(dtype)
    t = (2 * torch.randn(rows, vocab, device=device, generator=gen)).to(dtype)
    tokens = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    return s, t, tokens
