"""Fused token log-prob + entropy kernels (Triton) for RL post-training.

Per row r of logits z viewed as [B, T, V], with s = z * inv_t (fp32) and y = tokens[r]:
  m = max_i s_i, log S = log sum_i e^{s_i - m}
  logp = (s_y - m) - log S          (NaN when y is outside [0, V); -inf when s_y = -inf)
  H    = -sum_i q_i log q_i,  q = softmax(s), 0 log 0 = 0
computed in one read of the row. Backward, one more read:
  dz_i = inv_t * (g_lp * (1[i = y] - q_i) - g_H * (q_i log q_i + q_i H)).

Natural-log units throughout; exponentials and logs go through exp2 / log2 via the
divergence helpers (_exp / _log), with log2(e) folded into the argument only.
"""

import torch
import triton
import triton.language as tl

from .divergence import (
    _exp,
    _identity,
    _launch_config,
    _check_side,
    _launch_guard,
    _log,
    _rescale,
    _row_base,
    _xmul0,
)

__all__ = [
    "token_logprob_forward",
    "token_logprob_backward",
    "_token_logprob_fwd_kernel",
    "_token_logprob_bwd_kernel",
]

STATS_WIDTH = 3  # [m, log S, H] (pk_math.h kLogprobStat*)


@triton.jit
def _token_logit(row_ptr, tok_ptr, row, V, inv_t):
    # s_y with one scalar load; an out-of-range token never forms an out-of-bounds address
    # (index clamped to 0 and the load masked off) and reports valid = False.
    y = tl.load(tok_ptr + row).to(tl.int64)
    valid = (y >= 0) & (y < V)
    y_safe = tl.where(valid, y, 0)
    s_y = tl.load(row_ptr + y_safe, mask=valid, other=0.0).to(tl.float32) * inv_t
    return s_y, valid


@triton.jit
def _token_logprob_fwd_kernel(
    z_ptr, tok_ptr, logp_ptr, ent_ptr, stats_ptr,
    T, V, stride0, stride1, inv_t,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row r = b*T + t: logp[r], entropy[r] (WITH_ENTROPY), stats[r] = [m, log S, H].

    ent_ptr is never touched when WITH_ENTROPY is off (any tensor may be passed).
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + _row_base(row, T, stride0, stride1)

    cols0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    l = 0.0  # sum e^{s - m}
    # c = sum e^{s - m} (s - m): centred on the running max so H = log l - c / l does not
    # cancel two numbers of size |s| (lse - sum q s loses ~|s| * eps for large logits).
    c = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        # tail lanes load -inf: they add e = 0 and never win the max
        s = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(s, axis=0))
        # -inf entries give exactly 0 even while the running max is still -inf
        e = tl.where(s == float("-inf"), 0.0, _exp(s - m_new))
        a = _rescale(m, m_new)
        # re-centre the old sum on m_new: sum e'(s - m_new) = a * (c + (m - m_new) * l);
        # l == 0 (nothing finite yet) contributes 0, not -inf * 0.
        c = a * (c + _xmul0(l, m - m_new)) + tl.sum(_xmul0(e, s - m_new), axis=0)
        l = l * a + tl.sum(e, axis=0)
        m = m_new

    log_l = _log(l)
    ent = log_l - c / l

    s_y, valid = _token_logit(z_row, tok_ptr, row, V, inv_t)
    logp = tl.where(valid, (s_y - m) - log_l, float("nan"))

    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, ent)
    sp = stats_ptr + row * 3
    tl.store(sp + 0, m)
    tl.store(sp + 1, log_l)
    tl.store(sp + 2, ent)


@triton.jit
def _token_logprob_bwd_kernel(
    z_ptr, tok_ptr, g_lp_ptr, g_ent_ptr, stats_ptr, grad_ptr,
    T, V, stride0, stride1, inv_t,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row, one pass: grad[r, :] (contiguous [N, V], logits dtype).

    g_ent_ptr is never touched when HAS_GRAD_ENTROPY is off.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + _row_base(row, T, stride0, stride1)
    g_lp = tl.load(g_lp_ptr + row) * inv_t
    sp = stats_ptr + row * 3
    m = tl.load(sp + 0)
    log_l = tl.load(sp + 1)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(g_ent_ptr + row) * inv_t
        ent = tl.load(sp + 2)
    # an out-of-range token becomes -1, which matches no column and skips the one-hot term;
    # a valid one fits int32 (V does), so the per-block compare stays 32-bit
    y = tl.load(tok_ptr + row).to(tl.int64)
    y = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)

    cols0 = tl.arange(0, BLOCK_V)
    out_row = grad_ptr + row * V
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        s = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        lq = (s - m) - log_l
        q = _exp(lq)
        g = g_lp * (tl.where(cols == y, 1.0, 0.0) - q)
        if HAS_GRAD_ENTROPY:
            g -= g_h * (_xmul0(q, lq) + q * ent)
        tl.store(out_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _check_inputs(logits, tokens):
    if logits.dim() != 3:
        raise ValueError(f"logits must be a 3-D [B, T, V] view, got shape {tuple(logits.shape)}")
    if logits.shape[2] > 1 and logits.stride(2) != 1:
        raise ValueError("logits must have stride(2) == 1")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be fp32/fp16/bf16, got {logits.dtype}")
    n = logits.shape[0] * logits.shape[1]
    if tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be int32 or int64, got {tokens.dtype}")
    if tokens.dim() != 1 or tokens.numel() != n or not tokens.is_contiguous():
        raise ValueError(
            f"tokens must be a contiguous 1-D tensor of B*T = {n} entries, got shape "
            f"{tuple(tokens.shape)}")
    if tokens.device != logits.device:
        raise ValueError(f"tokens on {tokens.device}, logits on {logits.device}")
    return n


def token_logprob_forward(logits, tokens, inv_t: float, with_entropy: bool,
                          *, _wrap=None, _block_v=None):
    """Token log-probs (and entropy) of softmax(logits * inv_t) in one read of the logits.

    logits: [B, T, V] fp32/fp16/bf16 with stride(2) == 1 (other strides arbitrary);
    tokens: contiguous int32/int64 [B*T]. Returns (logp fp32 [B*T], entropy fp32 [B*T] or an
    empty fp32 tensor when with_entropy is False, stats fp32 [B*T, 3] = [m, log S, H]).

    `_wrap` maps a jit kernel to something launchable as `k[grid](...)` (the torch.library
    registration passes torch.library.wrap_triton); `_block_v` overrides the block size.
    """
    n = _check_inputs(logits, tokens)
    _, T, V = logits.shape
    dev = logits.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=dev)
    stats = torch.empty((n, STATS_WIDTH), dtype=torch.float32, device=dev)
    if n == 0:
        return logp, entropy, stats
    block_v, num_warps = _launch_config(V, dev, _block_v)
    wrap = _wrap or _identity
    with _launch_guard(dev):
        wrap(_token_logprob_fwd_kernel)[(n,)](
            logits, tokens, logp, entropy if with_entropy else logp, stats,
            T, V, logits.stride(0), logits.stride(1), float(inv_t),
            WITH_ENTROPY=bool(with_entropy), BLOCK_V=block_v, num_warps=num_warps,
        )
    return logp, entropy, stats


def token_logprob_backward(grad_logp, grad_entropy, logits, tokens, stats, inv_t: float,
                           *, _wrap=None, _block_v=None):
    """Gradient of sum_r (grad_logp[r] * logp[r] + grad_entropy[r] * H[r]) w.r.t. logits.

    grad_logp: contiguous fp32 [B*T]; grad_entropy: contiguous fp32 [B*T], or numel 0 for
    no entropy gradient; stats: fp32 [B*T, 3] from token_logprob_forward with the same
    logits, tokens and inv_t. Returns contiguous [B, T, V] in the logits' dtype.
    """
    n = _check_inputs(logits, tokens)
    B, T, V = logits.shape
    dev = logits.device
    _check_side("grad_logp", grad_logp, (n,), torch.float32, logits)
    has_grad_ent = grad_entropy.numel() != 0
    if has_grad_ent:
        _check_side("grad_entropy", grad_entropy, (n,), torch.float32, logits)
    _check_side("stats", stats, (n, STATS_WIDTH), torch.float32, logits)
    grad = torch.empty((B, T, V), dtype=logits.dtype, device=dev)
    if n == 0 or V == 0:
        return grad
    block_v, num_warps = _launch_config(V, dev, _block_v)
    wrap = _wrap or _identity
    with _launch_guard(dev):
        wrap(_token_logprob_bwd_kernel)[(n,)](
            logits, tokens, grad_logp, grad_entropy if has_grad_ent else grad_logp, stats, grad,
            T, V, logits.stride(0), logits.stride(1), float(inv_t),
            HAS_GRAD_ENTROPY=has_grad_ent, BLOCK_V=block_v, num_warps=num_warps,
        )
    return grad
