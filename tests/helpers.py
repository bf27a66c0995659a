"""Shared helpers for the pykernels tests: inputs, tolerances, oracle comparison.

pykernels is imported lazily (conftest sets TRITON_INTERPRET first).

Tolerances (stated once, used everywhere; elementwise):
  fp32 inputs:  loss  |out - ref| <= 1e-4 |ref| + 1e-5 max(1, |ref|)
                grads |g_i - ref_i| <= 1e-5 max|ref| + 1e-7 + U_i
  fp16 / bf16:  the oracle runs on the SAME low-precision values upcast to float64;
                loss  |out - ref| <= 2e-3 |ref| + 1e-4 max(1, |ref|)
                grads |g_i - ref_i| <= c max|ref| + 1e-6 + U_i,  c = 2e-3 (fp16), 1e-2 (bf16)
  U_i, the fp32 rounding floor of a log-domain gradient (GRAD_ULP_K = 2):
        U_i = GRAD_ULP_K * eps_fp32 * |w_row| * (p_i + q_i) * (max_row |z/T| + log V + 1)
  where w_row = d loss / d (row value) (grad_output, divided by the reduction's divisor).
  Every gradient in DESIGN.md's table is p_i or q_i times a difference of log-probabilities,
  and a log-probability of magnitude ~|z/T| + log V carries an absolute fp32 error of a few
  ulp of that magnitude, so no fp32 implementation (the eager fp32 `torch` backend
  included) meets "1e-5 max|grad|" alone where the divergence is small relative to the
  logits (skew alpha = 0.9, T = 0.5, |z| ~ 100): measured, the eager fp32 backend reaches
  2.7e-5 max|grad| and the kernels 8e-5, while the error in units of U_i/GRAD_ULP_K stayed
  below 0.6 for every backend.
The loss is always float32; gradients come back in the input dtype.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

import reference as ref

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS32 = torch.finfo(torch.float32).eps
GRAD_ULP_K = 2.0

TOL = {
    # dtype: (loss_rtol, loss_atol (scaled by max(1,|ref|)), grad_rel (to max|g_ref|), grad_floor)
    FP32: (1e-4, 1e-5, 1e-5, 1e-7),
    FP16: (2e-3, 1e-4, 2e-3, 1e-6),
    BF16: (2e-3, 1e-4, 1e-2, 1e-6),
}

# Public function per kind, with the parameter it takes.
KIND_CASES = (
    [("forward_kl", {}), ("reverse_kl", {})]
    + [("jsd", {"beta": b}) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    + [("skew_forward_kl", {"alpha": a}) for a in (0.0, 0.1, 0.9)]
    + [("skew_reverse_kl", {"alpha": a}) for a in (0.0, 0.1, 0.9)]
    + [("tvd", {}), ("hellinger", {})]
)


def case_id(case) -> str:
    kind, params = case
    return kind + "".join(f"-{k}{v:g}" for k, v in params.items())


KIND_IDS = [case_id(c) for c in KIND_CASES]

# A smaller representative set (one of each kernel kind and of each swapped kind).
SOME_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("tvd", {}),
    ("hellinger", {}),
]
SOME_IDS = [case_id(c) for c in SOME_CASES]


@functools.lru_cache(maxsize=None)
def pk():
    import pykernels

    return pykernels


@functools.lru_cache(maxsize=None)
def cpu_backends() -> tuple:
    """Backends that can run CPU tensors here (triton only under TRITON_INTERPRET=1)."""
    return tuple(pk().available_backends("cpu"))


def needs_cpu_extension() -> None:
    """Skips the calling test, one of the CPU kernels' own, where the C++ extension is not built
    (the package still works without it, on the Triton and torch backends)."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")


def is_interpreted(backend: str) -> bool:
    """The Triton backend on CPU tensors runs in the (slow) interpreter."""
    return backend == "triton"


# ----------------------------------------------------------------------------- inputs


def make_logits(shape, dtype=FP32, seed=0, scale=2.0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float32) * scale
    return x.to(dtype).to(device)


def rows_far_apart(shape, dtype=BF16, seed=0, scale=2.0) -> torch.Tensor:
    """Random logits of `shape` [..., V] whose consecutive rows lie 2**31 + 7 elements apart in
    one storage, so any row offset formed in 32 bits overflows. Only the rows' own pages are
    written: the storage is mostly untouched virtual memory (a few MB resident)."""
    *lead, V = shape
    rows = math.prod(lead)
    row_stride = 2**31 + 7
    storage = torch.empty((rows - 1) * row_stride + V, dtype=dtype)
    strides = [1]
    step = row_stride
    for size in reversed(lead):  # row-major over the leading dims
        strides.insert(0, step)
        step *= size
    view = storage.as_strided(tuple(shape), tuple(strides))
    view.copy_(make_logits(shape, dtype, seed, scale))
    return view


def avoid_tvd_ties(student, teacher, temperature=1.0, rel=1e-3, max_iter=20):
    """Nudge teacher logits so no entry has p_i ~= q_i (relative gap < rel).

    The TVD gradient jumps where p_i = q_i (sign(0) = 0); an entry that close to a tie
    could legitimately round either way in fp32, so random TVD inputs keep away from it.
    Exact ties of zero probabilities (matching -inf) are left alone.
    """
    teacher = teacher.clone()
    for _ in range(max_iter):
        q = torch.softmax(student.double() / temperature, -1)
        p = torch.softmax(teacher.double() / temperature, -1)
        near = ((p - q).abs() <= rel * (p + q)) & ((p + q) > 0)
        if not near.any():
            return teacher
        bumped = teacher.double() + 0.3 * torch.clamp(teacher.double().abs(), min=1.0)
        teacher = torch.where(near.to(teacher.device), bumped.to(teacher.dtype), teacher)
    raise AssertionError("could not move TVD inputs away from ties")


def make_pair(shape, dtype=FP32, seed=0, kind=None, temperature=1.0, scale=2.0, device="cpu"):
    s = make_logits(shape, dtype, seed, scale, device)
    t = make_logits(shape, dtype, seed + 1000, scale, device)
    if kind == "tvd" and shape[-1] > 1:
        t = avoid_tvd_ties(s, t, temperature)
    return s, t


def make_labels(lead_shape, seed=0, frac_ignored=0.3, ignore_index=-100, num_classes=50,
                dtype=torch.int64, device="cpu"):
    g = torch.Generator().manual_seed(seed + 7)
    lab = torch.randint(0, num_classes, tuple(lead_shape), generator=g)
    drop = torch.rand(tuple(lead_shape), generator=g) < frac_ignored
    lab = torch.where(drop, torch.full_like(lab, ignore_index), lab)
    return lab.to(dtype).to(device)


# ----------------------------------------------------------------------------- calling


def call(kind, params, student, teacher, backend, via="function", **common):
    """Call the public API: pk.<kind>(...) or pk.divergence(kind=...)."""
    kw = dict(params)
    kw.update(common)
    if backend is not None:
        kw["backend"] = backend
    if via == "function":
        return getattr(pk(), kind)(student, teacher, **kw)
    if via == "divergence":
        return pk().divergence(student, teacher, kind=kind, **kw)
    raise ValueError(via)


# ----------------------------------------------------------------------------- comparing


def assert_loss_close(out: torch.Tensor, expected: torch.Tensor, dtype, what="loss"):
    """Elementwise comparison with the oracle; +-inf must match exactly, NaN where NaN."""
    rtol, atol, _, _ = TOL[dtype]
    assert out.dtype == torch.float32, f"{what}: loss dtype {out.dtype}, expected float32"
    assert tuple(out.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(out.shape)} != expected {tuple(expected.shape)}"
    )
    o = out.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    nan_o, nan_e = torch.isnan(o), torch.isnan(e)
    assert torch.equal(nan_o, nan_e), (
        f"{what}: NaN pattern differs; got NaN at {nan_o.nonzero().tolist()}, "
        f"expected NaN at {nan_e.nonzero().tolist()}; got {o.flatten()[:8].tolist()} "
        f"expected {e.flatten()[:8].tolist()}"
    )
    inf_e = torch.isinf(e)
    if inf_e.any():
        assert torch.equal(o[inf_e], e[inf_e]), (
            f"{what}: expected {e[inf_e].tolist()} got {o[inf_e].tolist()}"
        )
    fin = torch.isfinite(e)
    of, ef = o[fin], e[fin]
    assert torch.isfinite(of).all(), (
        f"{what}: non-finite output where the float64 oracle is finite: got "
        f"{of[~torch.isfinite(of)].tolist()} expected {ef[~torch.isfinite(of)].tolist()}"
    )
    bound = rtol * ef.abs() + atol * torch.clamp(ef.abs(), min=1.0)
    err = (of - ef).abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{ef.numel()} values out of tolerance "
            f"(rtol={rtol}, atol={atol}*max(1,|ref|)); worst: got {of[i].item()!r} "
            f"expected {ef[i].item()!r} (abs err {err[i].item():.3e}, bound {bound[i].item():.3e}); "
            f"got[:6]={of[:6].tolist()} expected[:6]={ef[:6].tolist()}"
        )


def grad_ulp_unit(student, teacher, temperature, row_weight):
    """U_i of the module docstring, float64, shape of the logits (CPU).

    student/teacher: logits [..., V] (any dtype); row_weight: d loss / d row value, of the
    leading shape.  -inf logits do not count towards max|z/T|; NaN rows give 0.
    """
    s = student.detach().cpu().to(torch.float64) / temperature
    t = teacher.detach().cpu().to(torch.float64) / temperature
    V = s.shape[-1]
    q = torch.softmax(s, -1)
    p = torch.softmax(t, -1)

    def finite_absmax(x):
        if x.numel() == 0:
            return x.new_zeros(x.shape[:-1])
        return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(-1)

    R = torch.maximum(finite_absmax(s), finite_absmax(t)) + math.log(V) + 1.0
    w = row_weight.detach().cpu().to(torch.float64).abs()
    unit = GRAD_ULP_K * EPS32 * (w * R)[..., None] * (p + q)
    return torch.nan_to_num(unit, nan=0.0, posinf=0.0)


def oracle_unit(student, teacher, kind, params, grad_output=None, **common):
    """grad_ulp_unit for pk.<kind>(student, teacher, **params, **common) backpropagated with
    grad_output (None: ones), the row weights taken from the oracle."""
    T = common.get("temperature", 1.0)
    s64 = student.detach().cpu().to(torch.float64)
    t64 = teacher.detach().cpu().to(torch.float64)
    per_row = ref.row_divergence(s64, t64, kind, **params, temperature=T).requires_grad_(True)
    labels = common.get("labels")
    loss = ref.reduce_rows(
        per_row, s64.shape[-1], labels=None if labels is None else labels.cpu(),
        ignore_index=common.get("ignore_index", -100),
        reduction=common.get("reduction", "batchmean"),
        num_items_in_batch=common.get("num_items_in_batch"),
    )
    if grad_output is None:
        go = torch.ones_like(loss)
    elif isinstance(grad_output, torch.Tensor):
        go = grad_output.detach().cpu().to(torch.float64).reshape(loss.shape)
    else:
        go = torch.full_like(loss, float(grad_output))
    (w,) = torch.autograd.grad(loss, per_row, go)
    return grad_ulp_unit(s64, t64, T, w)


def assert_grad_close(g: torch.Tensor | None, expected: torch.Tensor, dtype, what="grad",
                      row_mask: torch.Tensor | None = None, unit: torch.Tensor | None = None):
    """|g_i - ref_i| <= rel * max|ref| + floor + unit_i on the rows selected by row_mask
    (a bool mask of the leading shape); unit: grad_ulp_unit(...) or None (no ulp term)."""
    _, _, rel, floor = TOL[dtype]
    assert g is not None, f"{what}: gradient is None"
    assert g.dtype == dtype, f"{what}: gradient dtype {g.dtype}, expected input dtype {dtype}"
    assert tuple(g.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(g.shape)} != {tuple(expected.shape)}"
    )
    o = g.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    u = torch.zeros_like(e) if unit is None else unit.detach().cpu().to(torch.float64)
    if row_mask is not None:
        row_mask = row_mask.cpu()
        o, e, u = o[row_mask], e[row_mask], u[row_mask]
    if e.numel() == 0:
        return
    assert torch.isfinite(e).all(), f"{what}: oracle gradient not finite (test bug)"
    nonfin = ~torch.isfinite(o)
    assert not nonfin.any(), (
        f"{what}: {int(nonfin.sum())} non-finite gradient entries where the oracle is finite, "
        f"e.g. got {o[nonfin][:4].tolist()} expected {e[nonfin][:4].tolist()}"
    )
    scale = e.abs().max().item()
    tol = rel * scale + floor + u
    err = (o - e).abs()
    excess = err - tol
    if (excess > 0).any():
        idx = tuple(torch.nonzero(excess == excess.max())[0].tolist())
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())}/{e.numel()} entries out of tolerance; worst at "
            f"{list(idx)}: got {o[idx].item()!r} expected {e[idx].item()!r}, abs err "
            f"{err[idx].item():.3e} > tol {tol[idx].item():.3e} (= {rel}*max|ref| {scale:.3e} "
            f"+ {floor} + ulp term {u[idx].item():.3e}); max abs err overall {err.max().item():.3e}"
        )


def param_grid(*axes, skip=None):
    """Cartesian product of axes as pytest.params, minus the combos where skip(*values) is true.
    Each axis is (values, ids), or (name, values, ids) with the name only for the reader."""
    out = []
    for combo in itertools.product(*[list(zip(axis[-2], axis[-1])) for axis in axes]):
        values = [c[0] for c in combo]
        if skip is not None and skip(*values):
            continue
        out.append(pytest.param(*values, id="-".join(str(c[1]) for c in combo)))
    return out


def make_grad_output(loss_shape, seed=0):
    """grad_output != 1: a fixed scalar for scalar losses, random signed values for 'none'."""
    if len(loss_shape) == 0:
        return torch.tensor(0.37, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 99)
    return (torch.rand(tuple(loss_shape), generator=g) * 2.0 - 1.0) * 1.5 + 0.1


def check_against_oracle(
    kind,
    params,
    student,
    teacher,
    *,
    backend,
    via="function",
    transform=None,
    student_grad=True,
    teacher_grad=True,
    grad_output="random",
    grads_on_finite_rows_only=False,
    what="",
    **common,
):
    """Run pk on (transform(student), transform(teacher)) and compare loss and gradients
    (w.r.t. the untransformed leaves) with the float64 oracle.

    student/teacher: leaf tensors (any dtype/device); transform: a view/copy function
    applied to both (e.g. slicing), a pair (student_fn, teacher_fn), or None.  Labels are
    passed as given (already in the transformed leading shape).
    common: temperature, labels, ignore_index,
    reduction, num_items_in_batch (only those given are passed to pk).
    grad_output: "random" (make_grad_output), None (plain .backward()), or a tensor.
    Returns the pk loss.
    """
    dtype = student.dtype
    if transform is None:
        tf_s = tf_t = lambda x: x  # noqa: E731
    elif isinstance(transform, tuple):
        tf_s, tf_t = transform
    else:
        tf_s = tf_t = transform
    s = student.detach().clone().requires_grad_(student_grad)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    out = call(kind, params, tf_s(s), tf_t(t), backend, via=via, **common)

    # Oracle, float64, on the same (upcast) values and the same transform.
    s64 = student.detach().cpu().to(torch.float64).requires_grad_(True)
    t64 = teacher.detach().cpu().to(torch.float64).requires_grad_(True)
    ref_common = dict(common)
    if ref_common.get("labels") is not None:
        ref_common["labels"] = ref_common["labels"].cpu()
    nib = ref_common.get("num_items_in_batch")
    if isinstance(nib, torch.Tensor):
        ref_common["num_items_in_batch"] = nib.item()
    T = common.get("temperature", 1.0)
    vs, vt = tf_s(s64), tf_t(t64)
    per_row = ref.row_divergence(vs, vt, kind, **params, temperature=T)
    expected = ref.reduce_rows(
        per_row, vs.shape[-1], labels=ref_common.get("labels"),
        ignore_index=ref_common.get("ignore_index", -100),
        reduction=ref_common.get("reduction", "batchmean"),
        num_items_in_batch=ref_common.get("num_items_in_batch"),
    )

    label = f"{what} {kind}{params} backend={backend} dtype={dtype}"
    assert_loss_close(out, expected, dtype, what=f"{label} loss")
    if not (student_grad or teacher_grad):
        return out

    if isinstance(grad_output, str):
        go = make_grad_output(tuple(out.shape))
    else:
        go = grad_output
    if out.numel() == 0:  # reduction="none" on an empty batch: nothing to differentiate
        return out
    if go is None:
        out.backward()
        go64 = torch.ones_like(expected)
    else:
        out.backward(go.to(out.device))
        go64 = go.detach().to(torch.float64).reshape(expected.shape)
    gs_ref, gt_ref, w_row = torch.autograd.grad(expected, (s64, t64, per_row), go64,
                                                allow_unused=True)
    gs_ref = torch.zeros_like(s64) if gs_ref is None else gs_ref
    gt_ref = torch.zeros_like(t64) if gt_ref is None else gt_ref
    w_row = torch.zeros_like(per_row) if w_row is None else w_row

    # ulp term in view coordinates, scattered back onto the leaves' shapes (views only).
    unit_view = grad_ulp_unit(vs, vt, T, w_row)
    unit_s = torch.zeros_like(s64, requires_grad=False)
    unit_t = torch.zeros_like(t64, requires_grad=False)
    tf_s(unit_s).copy_(unit_view)
    tf_t(unit_t).copy_(unit_view)

    row_mask = None
    if grads_on_finite_rows_only:
        assert transform is None
        row_mask = torch.isfinite(per_row.detach())
    if student_grad:
        assert_grad_close(s.grad, gs_ref, dtype, what=f"{label} student grad", row_mask=row_mask,
                          unit=unit_s)
    else:
        assert s.grad is None
    if teacher_grad:
        assert_grad_close(t.grad, gt_ref, dtype, what=f"{label} teacher grad", row_mask=row_mask,
                          unit=unit_t)
    else:
        assert t.grad is None
    return out
