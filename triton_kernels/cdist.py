"""Softmax cdist kernels (Triton): the cost matrix between the softmax rows of two logit
tensors, and its backward, without a G x V probability tensor.

Inputs are [Bt, G, V] views (vocab stride 1); q_i = softmax(student_i * inv_t), p_j likewise
for the teacher; a row flagged False in row_valid has all-zero probabilities. With d = q_iv -
p_jv and phi = |d| (cost 0, l1) or d^2 (cost 1, squared euclidean):
  forward   C_ij = sum_v phi(d),  A_ij = sum_v q_iv phi'(d)     (A feeds the backward)
  backward  dz_x,iv = inv_t x_iv (sum_j W_ij phi'(x_iv - y_jv) - dot_x,i)   for one side
Probabilities are recomputed per tile from the saved per-row normaliser (max m, 1 / S) as
exp(z inv_t - m) / S, eager softmax's order (pk_math.h ProbNorm says why). The l1 tiles are 3-D
broadcasts [BI, BJ, BV] reduced over the vocabulary (no matrix-multiply form); the squared
distance goes through tl.dot: C = |q|^2 + |p|^2 - 2 q.p and g = 2 (x sum_j W_ij - W @ Y), on
tensor cores with TF32x3 (about fp32 accuracy).
"""

import torch
import triton
import triton.language as tl

from .divergence import _check_side, _exp, _identity, _launch_config, _launch_guard, _rescale

__all__ = ["softmax_cdist_forward", "softmax_cdist_backward"]

COST_L1 = 0
COST_SQEUCLIDEAN = 1
NORM_WIDTH = 2  # a row's [m, 1 / S] (pk_math.h ProbNorm)
_NORM_WIDTH = tl.constexpr(NORM_WIDTH)  # the same, for the kernels


@triton.jit
def _norm_kernel(z_ptr, valid_ptr, norm_ptr, G, V, stride_b, stride_g, inv_t,
                 HAS_VALID: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row (b, i): (m, 1 / sum_v e^{z_v inv_t - m}) with m the row max;
    (+inf, 0) for a masked row (its probabilities are then 0)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // G
    base = z_ptr + b * stride_b + (row - b * G) * stride_g
    cols0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    l = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        s = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(s, axis=0))
        e = tl.where(s == float("-inf"), 0.0, _exp(s - m_new))
        l = l * _rescale(m, m_new) + tl.sum(e, axis=0)
        m = m_new
    inv_s = 1.0 / l
    if HAS_VALID:
        ok = tl.load(valid_ptr + row) != 0
        m = tl.where(ok, m, float("inf"))
        inv_s = tl.where(ok, inv_s, 0.0)
    tl.store(norm_ptr + row * _NORM_WIDTH, m)
    tl.store(norm_ptr + row * _NORM_WIDTH + 1, inv_s)


@triton.jit
def _probs_tile(base, rows, row_ok, cols, col_ok, stride_g, inv_t, m, inv_s):
    # [len(rows), len(cols)] probabilities; 0 outside the tensor and on masked rows (row_ok)
    ok = row_ok[:, None] & col_ok[None, :]
    z = tl.load(base + rows[:, None] * stride_g + cols[None, :], mask=ok, other=0.0)
    p = _exp(z.to(tl.float32) * inv_t - m[:, None]) * inv_s[:, None]
    return tl.where(ok, p, 0.0)


@triton.jit
def _row_ok(valid_ptr, offset, rows, in_range, HAS_VALID: tl.constexpr):
    if HAS_VALID:
        return in_range & (tl.load(valid_ptr + offset + rows, mask=in_range, other=0) != 0)
    return in_range


@triton.jit
def _tile_rows(norm_ptr, valid_ptr, b, rows, G, HAS_VALID: tl.constexpr):
    # (in range, usable (in range and not masked), m, 1 / S) of rows `rows` of batch b
    in_range = rows < G
    at = norm_ptr + (b * G + rows) * _NORM_WIDTH
    m = tl.load(at, mask=in_range, other=float("inf"))
    inv_s = tl.load(at + 1, mask=in_range, other=0.0)
    return in_range, _row_ok(valid_ptr, b * G, rows, in_range, HAS_VALID), m, inv_s


@triton.jit
def _sign(d):
    # sign(d), 0 at 0 and at NaN (pk_math.h cost_slope_times)
    return tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))


@triton.jit
def _cdist_fwd_kernel(
    s_ptr, t_ptr, valid_ptr, norm_s_ptr, norm_t_ptr, c_ptr, a_ptr,
    Gs, Gt, V, s_sb, s_sg, t_sb, t_sg, inv_t, tiles_i, tiles_j,
    COST: tl.constexpr, HAS_VALID: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program ((b * tiles_i + tile i) * tiles_j + tile j), a 1-D grid (axis 1 would cap Gt
    at 65535 tiles): C and A for a BI x BJ block of pairs."""
    pid = tl.program_id(0)
    row_tile = pid // tiles_j
    b = (row_tile // tiles_i).to(tl.int64)
    ri = (row_tile % tiles_i) * BI + tl.arange(0, BI).to(tl.int64)
    rj = (pid % tiles_j) * BJ + tl.arange(0, BJ).to(tl.int64)
    in_i, ok_i, m_i, is_i = _tile_rows(norm_s_ptr, valid_ptr, b, ri, Gs, HAS_VALID)
    in_j, ok_j, m_j, is_j = _tile_rows(norm_t_ptr, valid_ptr, b, rj, Gt, HAS_VALID)
    s_base = s_ptr + b * s_sb
    t_base = t_ptr + b * t_sb
    cols0 = tl.arange(0, BV)
    if COST == 0:
        acc_c = tl.zeros([BI, BJ], dtype=tl.float32)
        acc_a = tl.zeros([BI, BJ], dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + cols0
            q = _probs_tile(s_base, ri, ok_i, cols, cols < V, s_sg, inv_t, m_i, is_i)
            p = _probs_tile(t_base, rj, ok_j, cols, cols < V, t_sg, inv_t, m_j, is_j)
            d = q[:, None, :] - p[None, :, :]
            acc_c += tl.sum(tl.abs(d), axis=2)
            acc_a += tl.sum(q[:, None, :] * _sign(d), axis=2)
    else:
        dots = tl.zeros([BI, BJ], dtype=tl.float32)
        nq = tl.zeros([BI], dtype=tl.float32)
        np_ = tl.zeros([BJ], dtype=tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + cols0
            q = _probs_tile(s_base, ri, ok_i, cols, cols < V, s_sg, inv_t, m_i, is_i)
            p = _probs_tile(t_base, rj, ok_j, cols, cols < V, t_sg, inv_t, m_j, is_j)
            dots += tl.dot(q, tl.trans(p), input_precision=DOT_PRECISION)
            nq += tl.sum(q * q, axis=1)
            np_ += tl.sum(p * p, axis=1)
        acc_c = nq[:, None] + np_[None, :] - 2.0 * dots
        acc_c = tl.where(acc_c < 0.0, 0.0, acc_c)  # rounding below 0; NaN kept
        acc_a = 2.0 * (nq[:, None] - dots)
    out = (b * Gs + ri)[:, None] * Gt + rj[None, :]
    ok = in_i[:, None] & in_j[None, :]
    tl.store(c_ptr + out, acc_c, mask=ok)
    tl.store(a_ptr + out, acc_a, mask=ok)


@triton.jit
def _cdist_bwd_kernel(
    w_ptr, x_ptr, y_ptr, norm_x_ptr, norm_y_ptr, dot_ptr, valid_ptr, g_ptr,
    Gx, Gy, V, x_sb, x_sg, y_sb, y_sg, inv_t, tiles_i, tiles_v,
    COST: tl.constexpr, HAS_VALID: tl.constexpr,
    BI: tl.constexpr, BJ: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program ((b * tiles_i + tile i) * tiles_v + vocab block), a 1-D grid (axis 1 would cap
    the vocabulary blocks at 65535): dz_x for BI rows x BV columns."""
    pid = tl.program_id(0).to(tl.int64)
    row_tile = pid // tiles_v
    b = row_tile // tiles_i
    ri = (row_tile % tiles_i) * BI + tl.arange(0, BI).to(tl.int64)
    cols = (pid % tiles_v) * BV + tl.arange(0, BV)
    in_c = cols < V
    in_i, ok_i, m_i, is_i = _tile_rows(norm_x_ptr, valid_ptr, b, ri, Gx, HAS_VALID)
    x = _probs_tile(x_ptr + b * x_sb, ri, ok_i, cols, in_c, x_sg, inv_t, m_i, is_i)
    y_base = y_ptr + b * y_sb
    g = tl.zeros([BI, BV], dtype=tl.float32)
    w_total = tl.zeros([BI], dtype=tl.float32)
    for j0 in range(0, Gy, BJ):
        rj = j0 + tl.arange(0, BJ).to(tl.int64)
        in_j, ok_j, m_j, is_j = _tile_rows(norm_y_ptr, valid_ptr, b, rj, Gy, HAS_VALID)
        y = _probs_tile(y_base, rj, ok_j, cols, in_c, y_sg, inv_t, m_j, is_j)
        w = tl.load(w_ptr + (b * Gx + ri)[:, None] * Gy + rj[None, :],
                    mask=in_i[:, None] & in_j[None, :], other=0.0)
        if COST == 0:
            g += tl.sum(w[:, :, None] * _sign(x[:, None, :] - y[None, :, :]), axis=1)
        else:
            g += tl.dot(w, y, input_precision=DOT_PRECISION)
            w_total += tl.sum(w, axis=1)
    if COST != 0:
        g = 2.0 * (x * w_total[:, None] - g)
    dot = tl.load(dot_ptr + b * Gx + ri, mask=in_i, other=0.0)
    dz = tl.where(ok_i[:, None], inv_t * x * (g - dot[:, None]), 0.0)
    out = (b * Gx + ri)[:, None] * V + cols[None, :]
    tl.store(g_ptr + out, dz.to(g_ptr.dtype.element_ty), mask=in_i[:, None] & in_c[None, :])


def _check_rows(name, x):
    if x.dim() != 3 or (x.shape[2] > 1 and x.stride(2) != 1):
        raise ValueError(f"{name} must be a [Bt, G, V] view with unit vocab stride, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {x.dtype}")


def _check_pair(x, y, row_valid, cost, x_name, y_name):
    if cost not in (COST_L1, COST_SQEUCLIDEAN):
        raise ValueError(f"unknown cdist cost {cost}")
    _check_rows(x_name, x)
    _check_rows(y_name, y)
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"{x_name} {tuple(x.shape)} and {y_name} {tuple(y.shape)} need the same "
                         f"batch and vocabulary sizes")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"{x_name} ({x.dtype} on {x.device}) and {y_name} ({y.dtype} on "
                         f"{y.device}) need one dtype and device")
    if row_valid is not None:
        if x.shape[1] != y.shape[1]:
            raise ValueError("row_valid needs as many rows on both sides")
        _check_side("row_valid", row_valid, (x.shape[0] * x.shape[1],), torch.bool, x)


def _tiles(cost: int, device):
    """(BI, BJ, BV, num_warps, dot precision) per cost; tl.dot needs every dim >= 16. Under
    the interpreter (CPU tensors) each block op costs far more than its elements, so the
    tiles there are long in V and narrow in rows."""
    if torch.device(device).type == "cpu":
        return (8, 8, 128, 1, "ieee") if cost == COST_L1 else (16, 16, 128, 1, "ieee")
    if cost == COST_L1:
        return 32, 32, 16, 8, "ieee"
    # BV = 64 compiles for sm_90 (Triton 3.8's ptxas) to 255 registers and 250-430 B of
    # spills in the forward; BV = 32 fits in 216-244 registers with none.
    return 32, 32, 32, 4, "tf32x3"


def _row_norms(x, row_valid, inv_t, wrap):
    Bt, G, V = x.shape
    norm = torch.empty((Bt * G, NORM_WIDTH), dtype=torch.float32, device=x.device)
    if norm.numel() == 0:
        return norm
    block_v, num_warps = _launch_config(V, x.device)
    wrap(_norm_kernel)[(Bt * G,)](
        x, row_valid if row_valid is not None else norm, norm, G, V, x.stride(0), x.stride(1),
        float(inv_t), HAS_VALID=row_valid is not None, BLOCK_V=block_v, num_warps=num_warps)
    return norm


def softmax_cdist_forward(student, teacher, row_valid, cost: int, inv_t: float, *, _wrap=None):
    """(C [Bt, Gs, Gt], A [Bt, Gs, Gt], norm_s [Bt*Gs, 2], norm_t [Bt*Gt, 2]), fp32, for student
    [Bt, Gs, V] and teacher [Bt, Gt, V] (see the module docstring)."""
    _check_pair(student, teacher, row_valid, cost, "student", "teacher")
    Bt, Gs, V = student.shape
    Gt = teacher.shape[1]
    dev = student.device
    C = torch.empty((Bt, Gs, Gt), dtype=torch.float32, device=dev)
    A = torch.empty_like(C)
    wrap = _wrap or _identity
    with _launch_guard(dev):
        norm_s = _row_norms(student, row_valid, inv_t, wrap)
        norm_t = _row_norms(teacher, row_valid, inv_t, wrap)
        if C.numel() == 0:
            return C, A, norm_s, norm_t
        BI, BJ, BV, num_warps, precision = _tiles(cost, dev)
        tiles_i, tiles_j = triton.cdiv(Gs, BI), triton.cdiv(Gt, BJ)
        wrap(_cdist_fwd_kernel)[(Bt * tiles_i * tiles_j,)](
            student, teacher, row_valid if row_valid is not None else norm_s, norm_s, norm_t, C, A,
            Gs, Gt, V, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            float(inv_t), tiles_i, tiles_j, COST=int(cost), HAS_VALID=row_valid is not None,
            BI=BI, BJ=BJ, BV=BV, DOT_PRECISION=precision, num_warps=num_warps)
    return C, A, norm_s, norm_t


def softmax_cdist_backward(weight, x, y, norm_x, norm_y, dot_x, row_valid, cost: int, inv_t: float,
                           *, _wrap=None):
    """dz_x [Bt, Gx, V] (contiguous, x's dtype) for weight [Bt, Gx, Gy] (fp32 contiguous), the
    saved normalisers of both sides and dot_x [Bt*Gx] (see the module docstring)."""
    _check_pair(x, y, row_valid, cost, "x", "y")
    Bt, Gx, V = x.shape
    Gy = y.shape[1]
    _check_side("weight", weight, (Bt, Gx, Gy), torch.float32, x)
    _check_side("norm_x", norm_x, (Bt * Gx, NORM_WIDTH), torch.float32, x)
    _check_side("norm_y", norm_y, (Bt * Gy, NORM_WIDTH), torch.float32, x)
    _check_side("dot_x", dot_x, (Bt * Gx,), torch.float32, x)
    grad = torch.empty((Bt, Gx, V), dtype=x.dtype, device=x.device)
    if grad.numel() == 0:
        return grad
    if Gy == 0:
        return grad.zero_()
    BI, BJ, BV, num_warps, precision = _tiles(cost, x.device)
    tiles_i, tiles_v = triton.cdiv(Gx, BI), triton.cdiv(V, BV)
    wrap = _wrap or _identity
    with _launch_guard(x.device):
        wrap(_cdist_bwd_kernel)[(Bt * tiles_i * tiles_v,)](
            weight, x, y, norm_x, norm_y, dot_x, row_valid if row_valid is not None else norm_x, grad,
            Gx, Gy, V, x.stride(0), x.stride(1), y.stride(0), y.stride(1), float(inv_t), tiles_i, tiles_v,
            COST=int(cost), HAS_VALID=row_valid is not None, BI=BI, BJ=BJ, BV=BV,
            DOT_PRECISION=precision, num_warps=num_warps)
    return grad
