"""Fused softmax + divergence kernels (Triton) for the canonical kernel kinds.

Kinds (csrc/pk_math.h DivKind): 0 forward_kl KL(p||q), 1 jsd(w = beta),
2 skew_forward_kl(w = alpha), 3 tvd, 4 hellinger, with q = softmax(student * inv_t)
and p = softmax(teacher * inv_t). The per-element formulas, row finalisation and
gradients reproduce csrc/pk_math.h (div_accumulate / div_finalize / div_grad).

All math is fp32 in natural-log units, as in pk_math.h: s = logit * inv_t and
log q = (s - m) - log S with m the row max and S = sum e^(s - m) (the LogNorm split: s - lse
would round lse, an error of |s| * 6e-8).
Exponentials and logs go through the hardware exp2 / log2 with log2(e) folded into their
argument (_exp / _log), never into the logits themselves.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

__all__ = [
    "divergence_forward",
    "divergence_backward",
    "_launch_config",
    "_divergence_fwd_kernel",
    "_divergence_bwd_kernel",
]

KIND_FORWARD_KL = 0
KIND_JSD = 1
KIND_SKEW_FORWARD_KL = 2
KIND_TVD = 3
KIND_HELLINGER = 4
NUM_KINDS = 5
STATS_WIDTH = 6  # [m_q, log S_q, m_p, log S_p, r0, r1] (pk_math.h kStat*)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------
# element helpers (inlined)
# --------------------------------------------------------------------------------------


@triton.jit
def _exp(x):
    # e^x through the hardware exp2. Log-probabilities stay in natural units (s - m - log S with s =
    # logit * inv_t): scaling logits by log2(e) first would add |logit| * eps of absolute error
    # to every log-probability, which large-magnitude logits turn into visible gradient error.
    return tl.exp2(x * _LOG2E)


@triton.jit
def _log(x):
    return tl.log2(x) * _LN2


@triton.jit
def _xmul0(x, d):
    # x * d with 0 * anything = 0 (0 log 0, and -inf - -inf of two zero probabilities);
    # NaN x still propagates since NaN == 0 is false.
    return tl.where(x == 0.0, 0.0, x * d)


@triton.jit
def _skew_ratios(p, q, lp, lq, lm, log_1mw):
    # p q / M and (1 - w) q / M in the log domain (right where p or q underflows but its log is
    # finite), 0 where M is exactly 0; neither overflows. Mirrors skew_ratios in pk_math.h.
    m_zero = lm == float("-inf")
    pq_m = tl.where(m_zero, 0.0, _exp(lp + lq - lm))
    cq_m = tl.where(m_zero, 0.0, _exp(lq + log_1mw - lm))
    return pq_m, cq_m


@triton.jit
def _logaddexp(a, b):
    # log(e^a + e^b): -inf (not NaN) when both are -inf, NaN propagates. log(1 + x) with
    # x in [0, 1] loses only absolute precision far below the ulp of `hi`, so no log1p.
    a_gt = a > b
    hi = tl.where(a_gt, a, b)
    lo = tl.where(a_gt, b, a)
    return tl.where(hi == float("-inf"), float("-inf"), hi + _log(1.0 + _exp(lo - hi)))


@triton.jit
def _half_sign(d):
    # sign(d) / 2 with sign(0) = 0 (ties contribute nothing to tvd)
    return tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))


@triton.jit
def _rescale(m_old, m_new):
    # exp(m_old - m_new) of the online softmax; exactly 1 when the max did not move
    # (also for -inf == -inf, where the running sum is still 0), NaN if m_new is NaN.
    return tl.where(m_old == m_new, 1.0, _exp(m_old - m_new))


@triton.jit
def _fkl_student_ref(m_s):
    # the student's reference in forward KL's cross sum (fkl_student_ref in pk_math.h): its
    # running max, 0 while that is -inf (s - m_s would be -inf - -inf = NaN)
    return tl.where(m_s == float("-inf"), 0.0, m_s)


@triton.jit
def _fkl_cross_rebase(cross, l_t, m_t_old, m_t_new, r_s_old, r_s_new):
    # the cross sum moved to new references (fkl_cross_shift / fkl_cross_rebase in pk_math.h):
    # f (c + ((r_s' - r_s) - (m_t' - m_t)) l_t), an unchanged reference adding exactly 0
    t_same = m_t_old == m_t_new
    shift = tl.where(r_s_old == r_s_new, 0.0, r_s_new - r_s_old) - tl.where(
        t_same, 0.0, m_t_new - m_t_old)
    f = tl.where(t_same, 1.0, _exp(m_t_old - m_t_new))
    return _xmul0(f, cross + _xmul0(l_t, shift))


@triton.jit
def _log_probs(s_ptr, t_ptr, cols, mask, inv_t, m_q, ls_q, m_p, ls_p):
    # log q, log p and q, p of one block once the rows' normalisers (max, log sum) are known
    sv = tl.load(s_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    tv = tl.load(t_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    lq = (sv - m_q) - ls_q
    lp = (tv - m_p) - ls_p
    return lq, lp, _exp(lq), _exp(lp)


@triton.jit
def _row_base(row, T, stride0, stride1):
    # row r = b*T + t of a [B, T, V] view; 64-bit so b*stride0 cannot overflow.
    b = row // T
    t = row - b * T
    return b * stride0 + t * stride1


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_row(
    s_ptr, t_ptr, loss_ptr, stats_ptr, row, V, inv_t, w, w_c, log_w, log_1mw,
    KIND: tl.constexpr, BLOCK_V: tl.constexpr,
):
    cols0 = tl.arange(0, BLOCK_V)

    # ---- pass 1: online max / sum-exp of both rows (+ forward-KL cross term) ----
    m_s = float("-inf")
    l_s = 0.0
    m_t = float("-inf")
    l_t = 0.0
    cross = 0.0  # sum e^(tv - m_t) ((tv - m_t) - (sv - r_s)), r_s = _fkl_student_ref(m_s)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        # tail lanes load -inf: they add exp(-inf) = 0 and never win the max
        sv = tl.load(s_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        tv = tl.load(t_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t

        m_s_new = tl.maximum(m_s, tl.max(sv, axis=0))
        # -inf entries give exactly 0 even while the running max is still -inf
        e_s = tl.where(sv == float("-inf"), 0.0, _exp(sv - m_s_new))
        l_s = l_s * _rescale(m_s, m_s_new) + tl.sum(e_s, axis=0)

        m_t_new = tl.maximum(m_t, tl.max(tv, axis=0))
        e_t = tl.where(tv == float("-inf"), 0.0, _exp(tv - m_t_new))
        if KIND == 0:
            # each side measured from its own max, never t - s (see fkl_cross_term in
            # pk_math.h); 0 where e_t = 0 (teacher -inf, or masked lane)
            r_s = _fkl_student_ref(m_s_new)
            cross = _fkl_cross_rebase(cross, l_t, m_t, m_t_new, _fkl_student_ref(m_s), r_s)
            cross += tl.sum(_xmul0(e_t, (tv - m_t_new) - (sv - r_s)), axis=0)
        l_t = l_t * _rescale(m_t, m_t_new) + tl.sum(e_t, axis=0)
        m_s = m_s_new
        m_t = m_t_new

    ls_q = _log(l_s)
    ls_p = _log(l_t)

    if KIND == 0:
        loss = cross / l_t + _log(l_s / l_t)
        r0 = 0.0
        r1 = loss
    else:
        # ---- pass 2: re-read the row, per-lane accumulators, one reduction at the end ----
        acc0 = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            lq, lp, q, p = _log_probs(s_ptr, t_ptr, cols, mask, inv_t, m_s, ls_q, m_t, ls_p)
            if KIND == 1:
                lm = _logaddexp(lp + log_w, lq + log_1mw)
                acc0 += tl.where(mask, _xmul0(q, lq - lm), 0.0)  # KL(q||M) 
                acc1 += tl.where(mask, _xmul0(p, lp - lm), 0.0)  # KL(p||M) 
            elif KIND == 2:
                lm = _logaddexp(lp + log_w, lq + log_1mw)
                pq_m, cq_m = _skew_ratios(p, q, lp, lq, lm, log_1mw)
                acc0 += tl.where(mask, _xmul0(p, lp - lm), 0.0)  # KL(p||M) 
                acc1 += tl.where(mask, pq_m, 0.0)  # sum p q / M
            elif KIND == 3:
                d = q - p
                sgn = _half_sign(d)
                acc0 += tl.where(mask, 0.5 * tl.abs(d), 0.0)
                acc1 += tl.where(mask, q * sgn, 0.0)
                acc2 += tl.where(mask, p * sgn, 0.0)
            else:
                d = _exp(0.5 * lp) - _exp(0.5 * lq)
                acc0 += tl.where(mask, 0.5 * d * d, 0.0)
                acc1 += tl.where(mask, _exp(0.5 * (lp + lq)), 0.0)  # Bhattacharyya
        a0 = tl.sum(acc0, axis=0)
        a1 = tl.sum(acc1, axis=0)
        a2 = tl.sum(acc2, axis=0)
        if KIND == 1:
            loss = w * a1 + w_c * a0
            r0 = a0
            r1 = a1
        elif KIND == 2:
            loss = a0
            r0 = a1
            r1 = a0 + w_c * a1  # see skew_accumulate in pk_math.h
        elif KIND == 3:
            loss = a0
            r0 = a1
            r1 = a2
        else:
            loss = a0
            r0 = a1
            r1 = a1

    tl.store(loss_ptr + row, loss)
    sp = stats_ptr + row * 6
    tl.store(sp + 0, m_s)
    tl.store(sp + 1, ls_q)
    tl.store(sp + 2, m_t)
    tl.store(sp + 3, ls_p)
    tl.store(sp + 4, r0)
    tl.store(sp + 5, r1)


@triton.jit
def _divergence_fwd_kernel(
    s_ptr, t_ptr, valid_ptr, loss_ptr, stats_ptr,
    T, V, s_stride0, s_stride1, t_stride0, t_stride1,
    inv_t, w, w_c, log_w, log_1mw,
    KIND: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row r = b*T + t; writes loss[r] and stats[r, 0:6].

    log_w / log_1mw = log(w) / log(1 - w) (-inf at 0).
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + _row_base(row, T, s_stride0, s_stride1)
    t_row = t_ptr + _row_base(row, T, t_stride0, t_stride1)
    if HAS_VALID:
        if tl.load(valid_ptr + row) != 0:
            _fwd_row(s_row, t_row, loss_ptr, stats_ptr, row, V, inv_t, w, w_c, log_w, log_1mw,
                     KIND, BLOCK_V)
        else:
            # masked row: zeros, and its logits are never read
            tl.store(loss_ptr + row, 0.0)
            sp = stats_ptr + row * 6
            for k in tl.static_range(6):
                tl.store(sp + k, 0.0)
    else:
        _fwd_row(s_row, t_row, loss_ptr, stats_ptr, row, V, inv_t, w, w_c, log_w, log_1mw,
                 KIND, BLOCK_V)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------


@triton.jit
def _bwd_row(
    s_ptr, t_ptr, gs_ptr, gt_ptr, grad_row_ptr, stats_ptr, row, V, inv_t,
    w, w_c, log_w, log_1mw,
    KIND: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    g_scale = tl.load(grad_row_ptr + row) * inv_t
    sp = stats_ptr + row * 6
    m_q = tl.load(sp + 0)
    ls_q = tl.load(sp + 1)
    m_p = tl.load(sp + 2)
    ls_p = tl.load(sp + 3)
    r0 = tl.load(sp + 4)
    r1 = tl.load(sp + 5)

    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        lq, lp, q, p = _log_probs(s_ptr, t_ptr, cols, mask, inv_t, m_q, ls_q, m_p, ls_p)
        if KIND == 0:
            gq = q - p
            gp = _xmul0(p, (lp - lq) - r1)
        elif KIND == 1:
            lm = _logaddexp(lp + log_w, lq + log_1mw)
            gq = w_c * _xmul0(q, (lq - lm) - r0)
            gp = w * _xmul0(p, (lp - lm) - r1)
        elif KIND == 2:
            lm = _logaddexp(lp + log_w, lq + log_1mw)
            pq_m, cq_m = _skew_ratios(p, q, lp, lq, lm, log_1mw)
            gq = w_c * (q * r0 - pq_m)
            gp = _xmul0(p, ((lp - lm) + cq_m) - r1)
        elif KIND == 3:
            sgn = _half_sign(q - p)
            gq = q * (sgn - r0)
            gp = -(p * (sgn - r1))
        else:
            bc = _exp(0.5 * (lp + lq))
            gq = -0.5 * (bc - q * r0)
            gp = -0.5 * (bc - p * r1)
        out = row * V + cols
        if STUDENT_GRAD:
            tl.store(gs_ptr + out, (g_scale * gq).to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(gt_ptr + out, (g_scale * gp).to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_zero_row(gs_ptr, gt_ptr, row, V, STUDENT_GRAD: tl.constexpr,
                  TEACHER_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    cols0 = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        out = row * V + cols
        if STUDENT_GRAD:
            tl.store(gs_ptr + out, zero.to(gs_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(gt_ptr + out, zero.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _divergence_bwd_kernel(
    s_ptr, t_ptr, valid_ptr, grad_row_ptr, stats_ptr, gs_ptr, gt_ptr,
    T, V, s_stride0, s_stride1, t_stride0, t_stride1,
    inv_t, w, w_c, log_w, log_1mw,
    KIND: tl.constexpr, HAS_VALID: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row, one pass: grad = grad_row[r] * inv_t * (gq | gp).

    Gradient outputs are contiguous [N, V]; a gradient pointer whose flag is off may be any
    tensor (it is never touched).
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + _row_base(row, T, s_stride0, s_stride1)
    t_row = t_ptr + _row_base(row, T, t_stride0, t_stride1)
    if HAS_VALID:
        if tl.load(valid_ptr + row) != 0:
            _bwd_row(s_row, t_row, gs_ptr, gt_ptr, grad_row_ptr, stats_ptr, row, V,
                     inv_t, w, w_c, log_w, log_1mw, KIND, STUDENT_GRAD, TEACHER_GRAD, BLOCK_V)
        else:
            _bwd_zero_row(gs_ptr, gt_ptr, row, V, STUDENT_GRAD, TEACHER_GRAD, BLOCK_V)
    else:
        _bwd_row(s_row, t_row, gs_ptr, gt_ptr, grad_row_ptr, stats_ptr, row, V,
                 inv_t, w, w_c, log_w, log_1mw, KIND, STUDENT_GRAD, TEACHER_GRAD, BLOCK_V)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

# GPU: 4096 elements x 8 warps = 16 per thread per stream; ptxas (sm_90a, Triton 3.8) reports
# 40-128 registers and no spills for every kind and dtype (masked rows, both gradients), except
# 16 bytes in the bf16 JSD backward. DESIGN warns that two-stream
# kernels collapse past ~16k-element blocks, hence the hard cap. Not yet tuned on a GPU.
# Interpreter: numpy per op, so bigger blocks only cost memory; 1024 keeps tests quick
# while rows of a realistic V still loop.
_GPU_MAX_BLOCK = 4096
_CPU_MAX_BLOCK = 1024
_MAX_BLOCK = 16384


def _launch_config(V: int, device, block_v=None):
    """(BLOCK_V, num_warps) for a row of V elements on `device`.

    `block_v` (a power of two) overrides the block size, e.g. to force multi-block rows in
    interpreter tests.
    """
    if block_v is None:
        on_gpu = torch.device(device).type != "cpu"
        cap = _GPU_MAX_BLOCK if on_gpu else _CPU_MAX_BLOCK
        block_v = min(triton.next_power_of_2(max(int(V), 1)), cap)
        block_v = max(block_v, 16)
    if block_v & (block_v - 1) or not 16 <= block_v <= _MAX_BLOCK:
        raise ValueError(f"block_v must be a power of two in [16, {_MAX_BLOCK}], got {block_v}")
    # fewer warps for short rows so each thread still holds several elements
    num_warps = max(1, min(8, block_v // 512))
    return block_v, num_warps


def _div_scalars(kind: int, w: float, inv_t: float):
    if not 0 <= int(kind) < NUM_KINDS:
        raise ValueError(f"unknown divergence kernel kind {kind}")
    w = float(w)
    w_c = 1.0 - w  # in double: 1 - w of the kernel's fp32 w is 1.3 % off at w = 1 - 1e-6
    log_w = math.log(w) if w > 0.0 else float("-inf")
    log_1mw = math.log1p(-w) if w < 1.0 else float("-inf")
    return w, w_c, log_w, log_1mw, float(inv_t)


def _check_inputs(student, teacher, row_valid):
    if student.dim() != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"student/teacher must be 3-D [B, T, V] of the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.dtype != teacher.dtype:
        raise ValueError(f"student/teacher dtypes differ: {student.dtype} vs {teacher.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"student on {student.device}, teacher on {teacher.device}")
    if student.shape[2] > 1 and (student.stride(2) != 1 or teacher.stride(2) != 1):
        raise ValueError("student/teacher must have stride(2) == 1")
    if row_valid is not None:
        _check_side("row_valid", row_valid, (student.shape[0] * student.shape[1],), torch.bool,
                    student)


def _check_side(name, t, shape, dtype, like):
    """The kernels read side inputs (masks, saved stats, row gradients) as contiguous arrays of
    `shape` on the logits' device: a short, strided or foreign one would be read past its end."""
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous() \
            or t.device != like.device:
        raise ValueError(
            f"{name} must be a contiguous {dtype} {list(shape)} tensor on {like.device}, got "
            f"{t.dtype} {list(t.shape)} strides {t.stride()} on {t.device}")


def _identity(kernel):
    return kernel


def _launch_guard(device):
    # The kernels compute NaN/inf intermediates by design (-inf - -inf, 0 * inf) and select
    # them away, as pk_math.h does. On GPU that is silent; the interpreter runs the ops in
    # numpy, which would warn on every masked tail, so silence numpy there.
    device = torch.device(device)
    if device.type == "cpu":
        import numpy as np

        return np.errstate(invalid="ignore", over="ignore", divide="ignore")
    # Triton launches on the current device and its stream, not on the tensors' device
    # (triton_op adds no guard): tensors on cuda:1 while cuda:0 is current would be read
    # through the wrong context. Compiled graphs carry Inductor's own device guard.
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def divergence_forward(student, teacher, row_valid, kind: int, w: float, inv_t: float,
                       *, _wrap=None, _block_v=None):
    """Per-row divergence of softmax(teacher*inv_t) vs softmax(student*inv_t).

    student, teacher: [B, T, V] (fp32/fp16/bf16, same dtype, stride(2) == 1);
    row_valid: None or bool [B*T]. Returns (row_loss fp32 [B*T], stats fp32 [B*T, 6]).

    `_wrap` maps a jit kernel to something launchable as `k[grid](...)`; the torch.library
    registration passes `torch.library.wrap_triton` so the launch is traceable. Default:
    launch directly. `_block_v` overrides the block size (tests).
    """
    _check_inputs(student, teacher, row_valid)
    B, T, V = student.shape
    N = B * T
    dev = student.device
    row_loss = torch.empty(N, dtype=torch.float32, device=dev)
    stats = torch.empty((N, STATS_WIDTH), dtype=torch.float32, device=dev)
    if N == 0:
        return row_loss, stats
    w, w_c, log_w, log_1mw, inv_t = _div_scalars(kind, w, inv_t)
    block_v, num_warps = _launch_config(V, dev, _block_v)
    has_valid = row_valid is not None
    wrap = _wrap or _identity
    with _launch_guard(dev):
        wrap(_divergence_fwd_kernel)[(N,)](
            student, teacher, row_valid if has_valid else row_loss, row_loss, stats,
            T, V, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            inv_t, w, w_c, log_w, log_1mw,
            KIND=int(kind), HAS_VALID=has_valid, BLOCK_V=block_v, num_warps=num_warps,
        )
    return row_loss, stats


def divergence_backward(grad_row, student, teacher, row_valid, stats, kind: int, w: float,
                        inv_t: float, student_grad: bool, teacher_grad: bool,
                        *, _wrap=None, _block_v=None):
    """Gradients of sum_r grad_row[r] * row_loss[r] w.r.t. the student / teacher logits.

    grad_row: fp32 [B*T]; stats: fp32 [B*T, 6] from divergence_forward with the same
    arguments. Returns (grad_student, grad_teacher), each contiguous [B, T, V] in the logits'
    dtype, or an empty (numel 0) tensor of that dtype when not requested. Rows with
    row_valid False get exactly 0. `_wrap` / `_block_v`: see divergence_forward.
    """
    _check_inputs(student, teacher, row_valid)
    B, T, V = student.shape
    N = B * T
    _check_side("grad_row", grad_row, (N,), torch.float32, student)
    _check_side("stats", stats, (N, STATS_WIDTH), torch.float32, student)
    dev = student.device
    gs = torch.empty((B, T, V) if student_grad else (0,), dtype=student.dtype, device=dev)
    gt = torch.empty((B, T, V) if teacher_grad else (0,), dtype=teacher.dtype, device=dev)
    if N == 0 or not (student_grad or teacher_grad):
        return gs, gt
    w, w_c, log_w, log_1mw, inv_t = _div_scalars(kind, w, inv_t)
    block_v, num_warps = _launch_config(V, dev, _block_v)
    has_valid = row_valid is not None
    wrap = _wrap or _identity
    # a disabled output is never touched by the kernel; hand it the other one's pointer
    with _launch_guard(dev):
        wrap(_divergence_bwd_kernel)[(N,)](
            student, teacher, row_valid if has_valid else grad_row, grad_row, stats,
            gs if student_grad else gt, gt if teacher_grad else gs,
            T, V, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            inv_t, w, w_c, log_w, log_1mw,
            KIND=int(kind), HAS_VALID=has_valid, STUDENT_GRAD=bool(student_grad),
            TEACHER_GRAD=bool(teacher_grad), BLOCK_V=block_v, num_warps=num_warps,
        )
    return gs, gt
