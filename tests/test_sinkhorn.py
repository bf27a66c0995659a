"""softmax_cdist and sinkhorn_loss against the float64 SinKD oracle (tests/reference_sinkhorn.py),
on every backend that runs CPU tensors here (cpu, triton under the interpreter, torch).

Tolerances (elementwise, the oracle runs on the same input values upcast to float64):
  cost matrix C (fp32 out for every input dtype):  |C - ref| <= 1e-5 + 1e-4 |ref|
  gradients: |g - ref| <= c max|ref| + F, c = 1e-4 (fp32), 2e-3 (fp16), 1e-2 (bf16): the
      gradient is rounded once to the input dtype; F = 8 eps_fp32 max_i sum_j |dC_ij| / T, the
      fp32 rounding of sum_j dC_ij phi'(.) (|phi'| <= 2), which is all that remains where the
      exact gradient vanishes (V = 1, ties).
  sinkhorn loss: 2e-4 relative (+1e-6); its gradients c = 2e-3 (fp32): the iterations
      amplify the fp32 error of C by about 1 / epsilon.
"""

from __future__ import annotations

import math

import pytest
import torch

import helpers as H
import reference_sinkhorn as ref

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
GRAD_REL = {FP32: 1e-4, FP16: 2e-3, BF16: 1e-2}
COSTS = ("l1", "sqeuclidean")


def _assert_close(out, expected, rel_to_max, what, floor=1e-7):
    out = out.double()
    expected = expected.double()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (out - expected).abs()
    tol = rel_to_max * scale + floor
    assert bool((err <= tol).all()), f"{what}: max err {err.max().item():.3e} > tol {tol:.3e}"


def _assert_c_close(out, expected, what):
    assert out.dtype == torch.float32 or out.dtype == torch.float64
    err = (out.double() - expected).abs()
    tol = 1e-5 + 1e-4 * expected.abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max().item():.3e}"


def _cdist_floor(grad_c, temperature):
    w = grad_c.double().abs()
    return 8 * torch.finfo(torch.float32).eps / temperature * max(
        w.sum(-1).max().item() if w.numel() else 0.0, w.sum(-2).max().item() if w.numel() else 0.0)


def _cdist_grads(fn, s, t, grad_c):
    s1 = s.detach().clone().requires_grad_(True)
    t1 = t.detach().clone().requires_grad_(True)
    C = fn(s1, t1)
    C.backward(grad_c.to(C.dtype))
    return C.detach(), s1.grad, t1.grad


def _oracle_cdist(s, t, cost, temperature, grad_c):
    return _cdist_grads(lambda a, b: ref.softmax_cdist(a, b, cost, temperature),
                        s.double(), t.double(), grad_c.double())


# shapes: (student shape, teacher shape)
CDIST_SHAPES = [
    ((6, 17), (9, 17)),         # Gs != Gt, one batch
    ((2, 3, 5, 33), (2, 3, 4, 33)),  # batched [..., G, V]
    ((3, 1), (4, 1)),           # V = 1: every probability is 1, C = 0
    ((5, 1271), (5, 1271)),
    ((40, 9), (35, 9)),         # more rows than one tile on every backend
]


def _cdist_cases():
    cases = []
    for backend in H.cpu_backends():
        for cost in COSTS:
            for shapes in CDIST_SHAPES:
                for T in (0.5, 1.0, 2.0):
                    if (shapes[0][-1] == 1271 or shapes[0][0] == 40) and T != 1.0:
                        continue
                    cases.append((backend, cost, shapes, T))
    return cases


@pytest.mark.parametrize("backend,cost,shapes,T", _cdist_cases())
def test_softmax_cdist_fp32_vs_oracle(backend, cost, shapes, T):
    pk = H.pk()
    s = H.make_logits(shapes[0], FP32, seed=1)
    t = H.make_logits(shapes[1], FP32, seed=2)
    grad_c = H.make_logits(shapes[0][:-1] + shapes[1][-2:-1], FP32, seed=3, scale=1.0)
    C, gs, gt = _cdist_grads(
        lambda a, b: pk.softmax_cdist(a, b, cost=cost, temperature=T, backend=backend), s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s, t, cost, T, grad_c)
    assert C.dtype == FP32 and gs.dtype == FP32
    _assert_c_close(C, rC, f"{backend} {cost} C")
    floor = _cdist_floor(grad_c, T)
    _assert_close(gs, rgs, GRAD_REL[FP32], f"{backend} {cost} student grad", floor)
    _assert_close(gt, rgt, GRAD_REL[FP32], f"{backend} {cost} teacher grad", floor)


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cost", COSTS)
def test_softmax_cdist_low_precision(cpu_backend, cost, dtype):
    pk = H.pk()
    s = H.make_logits((2, 7, 301), dtype, seed=4)
    t = H.make_logits((2, 6, 301), dtype, seed=5)
    grad_c = H.make_logits((2, 7, 6), FP32, seed=6, scale=1.0)
    C, gs, gt = _cdist_grads(
        lambda a, b: pk.softmax_cdist(a, b, cost=cost, temperature=2.0, backend=cpu_backend), s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s, t, cost, 2.0, grad_c)
    assert C.dtype == FP32 and gs.dtype == dtype and gt.dtype == dtype
    _assert_c_close(C, rC, f"{cpu_backend} {cost} C")
    floor = _cdist_floor(grad_c, 2.0)
    _assert_close(gs, rgs, GRAD_REL[dtype], f"{cpu_backend} {cost} student grad", floor)
    _assert_close(gt, rgt, GRAD_REL[dtype], f"{cpu_backend} {cost} teacher grad", floor)


@pytest.mark.parametrize("cost", COSTS)
def test_softmax_cdist_long_rows(cpu_backend, cost):
    """V = 32001 (many vocabulary blocks, ragged tail) on a few rows."""
    pk = H.pk()
    gs, gt = 3, 2
    s = H.make_logits((gs, 32001), FP32, seed=7, scale=3.0)
    t = H.make_logits((gt, 32001), FP32, seed=8, scale=3.0)
    grad_c = H.make_logits((gs, gt), FP32, seed=9, scale=1.0)
    C, gs, gt = _cdist_grads(lambda a, b: pk.softmax_cdist(a, b, cost=cost, backend=cpu_backend), s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s, t, cost, 1.0, grad_c)
    _assert_c_close(C, rC, f"{cpu_backend} {cost} C")
    floor = _cdist_floor(grad_c, 1.0)
    _assert_close(gs, rgs, GRAD_REL[FP32], f"{cpu_backend} {cost} student grad", floor)
    _assert_close(gt, rgt, GRAD_REL[FP32], f"{cpu_backend} {cost} teacher grad", floor)


@pytest.mark.parametrize("cost", COSTS)
def test_softmax_cdist_ties_and_masked_vocab(cpu_backend, cost):
    """Identical rows (C_ii = 0, l1 subgradient sign(0) = 0), -inf logits at shared and at
    distinct positions (zero probabilities on one or both sides)."""
    pk = H.pk()
    s = H.make_logits((4, 40), FP32, seed=10)
    t = H.make_logits((4, 40), FP32, seed=11)
    t[1] = s[1]  # an exact tie row
    s[:, 3] = float("-inf")
    t[:, 3] = float("-inf")   # both zero there
    s[0, 7] = float("-inf")   # only the student's
    t[2, 9:12] = float("-inf")
    grad_c = H.make_logits((4, 4), FP32, seed=12, scale=1.0)
    C, gs, gt = _cdist_grads(lambda a, b: pk.softmax_cdist(a, b, cost=cost, backend=cpu_backend), s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s, t, cost, 1.0, grad_c)
    _assert_c_close(C, rC, f"{cpu_backend} {cost} C")
    assert C[1, 1].item() <= 1e-6
    for g in (gs, gt):
        assert torch.isfinite(g).all()
        assert (g[:, 3] == 0).all()
    floor = _cdist_floor(grad_c, 1.0)
    _assert_close(gs, rgs, GRAD_REL[FP32], f"{cpu_backend} {cost} student grad", floor)
    _assert_close(gt, rgt, GRAD_REL[FP32], f"{cpu_backend} {cost} teacher grad", floor)


def test_softmax_cdist_nan_row_stays_in_its_row(cpu_backend):
    pk = H.pk()
    s = H.make_logits((3, 20), FP32, seed=13)
    t = H.make_logits((2, 20), FP32, seed=14)
    s[1, 4] = float("nan")
    C = pk.softmax_cdist(s, t, backend=cpu_backend)
    assert torch.isnan(C[1]).all()
    assert torch.isfinite(C[[0, 2]]).all()


def test_softmax_cdist_strided_rows_no_copy(cpu_backend, monkeypatch):
    """[B, T, V] logits sliced to logits[:, :-1] (rows not contiguous with each other): no
    copy of the logits (neither the copy warning nor a .contiguous() of a logits tensor)."""
    import warnings

    pk = H.pk()
    big_s = H.make_logits((2, 6, 50), FP32, seed=15)
    big_t = H.make_logits((2, 6, 50), FP32, seed=16)
    s, t = big_s[:, :-1], big_t[:, 1:]
    grad_c = H.make_logits((2, 5, 5), FP32, seed=17, scale=1.0)
    copied = []
    real_contiguous = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        if self.shape[-1] == 50 and not self.is_contiguous():
            copied.append(tuple(self.shape))
        return real_contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C, gs, gt = _cdist_grads(lambda a, b: pk.softmax_cdist(a, b, backend=cpu_backend), s, t, grad_c)
    monkeypatch.undo()
    assert not copied, copied
    rC, rgs, rgt = _oracle_cdist(s, t, "l1", 1.0, grad_c)
    _assert_c_close(C, rC, "strided C")
    _assert_close(gs, rgs, GRAD_REL[FP32], "strided student grad")
    _assert_close(gt, rgt, GRAD_REL[FP32], "strided teacher grad")


def test_softmax_cdist_sqeuclidean_many_slabs():
    """The CPU squared distance walks the vocabulary in column slabs of about 8 MB over all
    rows (1984 columns for 1040 rows): 130 groups of 4 + 4 rows of V = 5000 take two full slabs
    and a ragged one; against the float64 oracle, values and both gradients."""
    pk = H.pk()
    H.needs_cpu_extension()
    s = H.make_logits((130, 4, 5000), FP32, seed=41, scale=3.0)
    t = H.make_logits((130, 4, 5000), FP32, seed=42, scale=3.0)
    grad_c = H.make_logits((130, 4, 4), FP32, seed=43, scale=1.0)
    C, gs, gt = _cdist_grads(
        lambda a, b: pk.softmax_cdist(a, b, cost="sqeuclidean", temperature=1.5, backend="cpu"),
        s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s, t, "sqeuclidean", 1.5, grad_c)
    _assert_c_close(C, rC, "many slabs C")
    floor = _cdist_floor(grad_c, 1.5)
    _assert_close(gs, rgs, GRAD_REL[FP32], "many slabs student grad", floor)
    _assert_close(gt, rgt, GRAD_REL[FP32], "many slabs teacher grad", floor)


@pytest.mark.parametrize("cost", COSTS)
def test_softmax_cdist_cpu_rows_2_31_elements_apart(cost):
    """64-bit row offsets in the CPU cdist kernels: bf16 rows 2**31 + 7 elements apart in one
    storage (row * stride overflows int32), read in place, with both gradients (the storage is
    untouched virtual memory; the Triton interpreter is left out, as it may copy it)."""
    pk = H.pk()
    H.needs_cpu_extension()
    s = H.rows_far_apart((2, 2000), BF16, seed=304).requires_grad_(True)
    t = H.rows_far_apart((2, 2000), BF16, seed=305).requires_grad_(True)
    grad_c = H.make_logits((2, 2), FP32, seed=306, scale=1.0)
    C = pk.softmax_cdist(s, t, cost=cost, temperature=1.5, backend="cpu")
    C.backward(grad_c)
    rC, rgs, rgt = _oracle_cdist(s.detach(), t.detach(), cost, 1.5, grad_c)
    _assert_c_close(C.detach(), rC, f"{cost} C, rows far apart")
    floor = _cdist_floor(grad_c, 1.5)
    _assert_close(s.grad, rgs, GRAD_REL[BF16], f"{cost} student grad, rows far apart", floor)
    _assert_close(t.grad, rgt, GRAD_REL[BF16], f"{cost} teacher grad, rows far apart", floor)


def test_softmax_cdist_teacher_without_grad(cpu_backend):
    pk = H.pk()
    s = H.make_logits((5, 30), FP32, seed=18).requires_grad_(True)
    t = H.make_logits((5, 30), FP32, seed=19)
    pk.softmax_cdist(s, t, cost="sqeuclidean", backend=cpu_backend).sum().backward()
    s2 = s.detach().double().requires_grad_(True)
    ref.softmax_cdist(s2, t.double(), "sqeuclidean").sum().backward()
    _assert_close(s.grad, s2.grad, GRAD_REL[FP32], "student grad")
    assert t.grad is None


@pytest.mark.parametrize("cost", COSTS)
def test_sinkhorn_teacher_only_grad(cpu_backend, cost):
    """Only the teacher requires grad (the student side of the backward is skipped)."""
    pk = H.pk()
    s, t, group_size, labels = _layout_inputs(((2, 5, 27), 5, 0.2), seed=160)
    t1 = t.clone().requires_grad_(True)
    pk.sinkhorn_loss(s, t1, cost=cost, group_size=group_size, labels=labels,
                     backend=cpu_backend).backward()
    t2 = t.double().requires_grad_(True)
    ref.sinkhorn_loss(s.double(), t2, cost=cost, group_size=group_size, labels=labels).backward()
    _assert_close(t1.grad, t2.grad, 2e-3, "teacher-only grad")


def test_softmax_cdist_empty(cpu_backend):
    pk = H.pk()
    s = torch.zeros((0, 8), requires_grad=True)
    t = H.make_logits((3, 8), FP32, seed=20).requires_grad_(True)
    C = pk.softmax_cdist(s, t, backend=cpu_backend)
    assert C.shape == (0, 3)
    C.sum().backward()
    assert s.grad.shape == (0, 8)
    assert (t.grad == 0).all()


def test_gradcheck_softmax_cdist_float64():
    """torch.autograd.gradcheck in float64 (the kernels take fp32/fp16/bf16 only, so float64
    runs on the eager `torch` backend; the kernels are checked against float64 finite
    differences below)."""
    pk = H.pk()
    g = torch.Generator().manual_seed(21)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(2, 4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    for cost in COSTS:
        assert torch.autograd.gradcheck(
            lambda a, b: pk.softmax_cdist(a, b, cost=cost, temperature=0.7, backend="torch"),
            (s, t), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("higher_order", [True, False], ids=["autograd_loop", "written_backward"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
def test_gradcheck_sinkhorn_iterations_float64(masked, higher_order):
    """Both torch forms of the log-domain iterations (plain autograd: the torch backend; the
    hand-written backward: the GPU backends) against float64 finite differences of the plan,
    with and without masked rows / columns (one group fully masked, one with a single valid
    row). The cpu kernel is fp32: checked below."""
    from pykernels._torch_backend import sinkhorn_iterations

    g = torch.Generator().manual_seed(23)
    C = torch.rand(3, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    valid = torch.tensor([[True, False, True, True], [False] * 4, [False, False, True, False]])
    valid = valid if masked else None

    def plan(c, n_iters):
        log_k = -c / 0.3
        if valid is not None:
            log_k = torch.where(valid[:, :, None] & valid[:, None, :], log_k, float("-inf"))
        return sinkhorn_iterations(log_k, valid, n_iters, higher_order).exp()

    for n_iters in (1, 4):
        assert torch.autograd.gradcheck(lambda c: plan(c, n_iters), (C,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_backend_sinkhorn_second_order():
    """The torch backend promises gradients of any order: gradgradcheck of the loss in float64."""
    pk = H.pk()
    g = torch.Generator().manual_seed(25)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(4, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    for cost in COSTS:
        assert torch.autograd.gradgradcheck(
            lambda a, b: pk.sinkhorn_loss(a, b, cost=cost, n_iters=3, epsilon=0.5, backend="torch"),
            (s, t), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["all_valid", "masked"])
@pytest.mark.parametrize("g", [1, 5, 19])
def test_cpu_sinkhorn_iterations_kernel_vs_float64(masked, g):
    """The cpu backend's fused iterations (fp32) against the torch loop in float64: plan and
    d/dC, on sizes around the vector width, with masked lines and a fully masked group."""
    if "cpu" not in H.cpu_backends():
        pytest.skip("C++ extension not built")
    from pykernels._sinkhorn import sinkhorn_plan

    gen = torch.Generator().manual_seed(24 + g)
    C = 3 * torch.rand(3, g, g, generator=gen)
    weight = torch.randn(3, g, g, generator=gen)
    valid = None
    if masked:
        valid = torch.rand(3, g, generator=gen) > 0.3
        valid[1] = False
        valid[2, 0] = True
    for eps, n_iters in ((0.05, 20), (1.0, 3)):
        out = {}
        for backend, dtype in (("cpu", FP32), ("torch", torch.float64)):
            c = C.to(dtype).detach().requires_grad_(True)
            plan = sinkhorn_plan(c, valid, eps, n_iters, backend).exp()
            (plan * weight.to(dtype)).sum().backward()
            out[backend] = (plan.detach(), c.grad)
        _assert_close(out["cpu"][0], out["torch"][0], 1e-4, "plan")
        _assert_close(out["cpu"][1], out["torch"][1], 1e-3, "dC")
        if masked:
            assert (out["cpu"][0][1] == 0).all() and (out["cpu"][1][1] == 0).all()


def _central_differences(f, x, eps=1e-6):
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for k in range(flat.numel()):
        orig = flat[k].item()
        flat[k] = orig + eps
        hi = f(x).item()
        flat[k] = orig - eps
        lo = f(x).item()
        flat[k] = orig
        gflat[k] = (hi - lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("cost", COSTS)
def test_kernel_cdist_grad_vs_float64_finite_differences(cpu_backend, cost):
    pk = H.pk()
    s = H.make_logits((3, 7), FP32, seed=22, scale=1.5)
    t = H.make_logits((4, 7), FP32, seed=23, scale=1.5)
    w = H.make_logits((3, 4), FP32, seed=24, scale=1.0).double()
    _, gs, gt = _cdist_grads(lambda a, b: pk.softmax_cdist(a, b, cost=cost, temperature=0.8,
                                                           backend=cpu_backend), s, t, w)
    sd, td = s.double(), t.double()
    fs = _central_differences(lambda a: (ref.softmax_cdist(a, td, cost, 0.8) * w).sum(), sd.clone())
    ft = _central_differences(lambda b: (ref.softmax_cdist(sd, b, cost, 0.8) * w).sum(), td.clone())
    _assert_close(gs, fs, 1e-4, "student grad vs FD", floor=1e-6)
    _assert_close(gt, ft, 1e-4, "teacher grad vs FD", floor=1e-6)


# ============================================================================ sinkhorn loss

def _loss_and_grads(fn, s, t):
    s1 = s.detach().clone().requires_grad_(True)
    t1 = t.detach().clone().requires_grad_(True)
    loss = fn(s1, t1)
    loss.backward()
    return loss.detach(), s1.grad, t1.grad


def _oracle_sinkhorn(s, t, **kw):
    return _loss_and_grads(lambda a, b: ref.sinkhorn_loss(a, b, **kw), s.double(), t.double())


# (shape, group_size, labels frac ignored)
SINKHORN_LAYOUTS = [
    ((12, 37), None, 0.0),
    ((3, 4, 37), 4, 0.3),       # one group per sequence, some rows ignored
    ((2, 6, 37), None, 0.25),   # one group over [B, T, V], ignored rows dropped
]


def _sinkhorn_cases():
    cases = []
    for backend in H.cpu_backends():
        for cost in COSTS:
            for eps in (0.05, 0.1, 1.0):
                for n_iters in (1, 20):
                    for layout in SINKHORN_LAYOUTS:
                        if H.is_interpreted(backend) and (eps, n_iters) not in ((0.1, 20), (0.05, 1)):
                            continue
                        cases.append((backend, cost, eps, n_iters, layout))
    return cases


def _layout_inputs(layout, dtype=FP32, seed=30):
    shape, group_size, frac = layout
    s = H.make_logits(shape, dtype, seed=seed)
    t = H.make_logits(shape, dtype, seed=seed + 1)
    labels = None
    if frac:
        labels = H.make_labels(shape[:-1], seed=seed + 2, frac_ignored=frac)
    return s, t, group_size, labels


@pytest.mark.parametrize("backend,cost,eps,n_iters,layout", _sinkhorn_cases())
def test_sinkhorn_loss_vs_oracle(backend, cost, eps, n_iters, layout):
    pk = H.pk()
    s, t, group_size, labels = _layout_inputs(layout)
    kw = dict(cost=cost, epsilon=eps, n_iters=n_iters, temperature=2.0, group_size=group_size,
              labels=labels)
    loss, gs, gt = _loss_and_grads(lambda a, b: pk.sinkhorn_loss(a, b, backend=backend, **kw), s, t)
    rl, rgs, rgt = _oracle_sinkhorn(s, t, **kw)
    assert loss.dtype == FP32 and loss.dim() == 0
    assert abs(loss.item() - rl.item()) <= 2e-4 * abs(rl.item()) + 1e-6, (loss.item(), rl.item())
    _assert_close(gs, rgs, 2e-3, f"{backend} student grad")
    _assert_close(gt, rgt, 2e-3, f"{backend} teacher grad")
    if labels is not None:  # ignored rows take no gradient
        ignored = (labels == -100)
        assert (gs[ignored] == 0).all() and (gt[ignored] == 0).all()


@pytest.mark.parametrize("cost", COSTS)
def test_sinkhorn_loss_bf16(cpu_backend, cost):
    pk = H.pk()
    s, t, group_size, labels = _layout_inputs(((2, 5, 64), 5, 0.2), BF16, seed=40)
    kw = dict(cost=cost, epsilon=0.1, n_iters=20, temperature=2.0, group_size=group_size, labels=labels)
    loss, gs, gt = _loss_and_grads(lambda a, b: pk.sinkhorn_loss(a, b, backend=cpu_backend, **kw), s, t)
    rl, rgs, rgt = _oracle_sinkhorn(s, t, **kw)
    assert gs.dtype == BF16
    assert abs(loss.item() - rl.item()) <= 2e-4 * abs(rl.item()) + 1e-6
    _assert_close(gs, rgs, 1e-2, "bf16 student grad")
    _assert_close(gt, rgt, 1e-2, "bf16 teacher grad")


def test_sinkhorn_envelope_gradient(cpu_backend):
    """envelope=True: same value, gradient with the plan held constant (dLoss/dC = plan)."""
    pk = H.pk()
    s, t, group_size, labels = _layout_inputs(((3, 4, 29), 4, 0.2), seed=50)
    kw = dict(cost="l1", epsilon=0.1, n_iters=20, temperature=2.0, group_size=group_size, labels=labels)
    loss, gs, gt = _loss_and_grads(
        lambda a, b: pk.sinkhorn_loss(a, b, envelope=True, backend=cpu_backend, **kw), s, t)

    def oracle_envelope(a, b):
        with torch.no_grad():
            plans = []
            V = a.shape[-1]
            keep = (labels.reshape(-1) != -100)
            for g0 in range(0, a.numel() // V, group_size):
                idx = [r for r in range(g0, g0 + group_size) if bool(keep[r])]
                C = ref.softmax_cdist(a.reshape(-1, V)[idx], b.reshape(-1, V)[idx], "l1", 2.0)
                K = torch.exp(-C / 0.1)
                for _ in range(20):
                    K = K / K.sum(1, keepdim=True)
                    K = K / K.sum(0, keepdim=True)
                plans.append((idx, K))
        total = 0
        for idx, K in plans:
            V = a.shape[-1]
            total = total + (K * ref.softmax_cdist(a.reshape(-1, V)[idx], b.reshape(-1, V)[idx], "l1", 2.0)).sum()
        return total / len(plans)

    rl, rgs, rgt = _loss_and_grads(oracle_envelope, s.double(), t.double())
    assert abs(loss.item() - rl.item()) <= 2e-4 * abs(rl.item()) + 1e-6
    _assert_close(gs, rgs, 2e-3, "envelope student grad")
    _assert_close(gt, rgt, 2e-3, "envelope teacher grad")
    # and it differs from the full gradient through the iterations
    _, fgs, _ = _oracle_sinkhorn(s, t, **kw)
    assert (fgs - rgs).abs().max() > 1e-3 * rgs.abs().max()


@pytest.mark.parametrize("eps", [0.01, 0.003])
def test_sinkhorn_small_epsilon_stays_finite(cpu_backend, eps):
    """The plain-domain fp32 iteration underflows exp(-C / eps) to 0 (0/0 = NaN) here; the
    float64 oracle is finite, and so must the log-domain kernels be."""
    pk = H.pk()
    s = H.make_logits((6, 31), FP32, seed=60, scale=3.0)
    t = H.make_logits((6, 31), FP32, seed=61, scale=3.0)
    kw = dict(cost="l1", epsilon=eps, n_iters=20, temperature=1.0)
    C = ref.softmax_cdist(s, t, "l1", 1.0)
    plain32 = torch.exp(-C.float() / eps)
    assert (plain32 == 0).any()  # the naive fp32 version would divide 0 by 0
    rl, rgs, rgt = _oracle_sinkhorn(s, t, **kw)
    assert math.isfinite(rl.item())
    loss, gs, gt = _loss_and_grads(lambda a, b: pk.sinkhorn_loss(a, b, backend=cpu_backend, **kw), s, t)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert abs(loss.item() - rl.item()) <= 1e-3 * abs(rl.item()) + 1e-5


def test_sinkhorn_all_rows_ignored_and_empty(cpu_backend):
    pk = H.pk()
    s = H.make_logits((2, 3, 11), FP32, seed=70).requires_grad_(True)
    t = H.make_logits((2, 3, 11), FP32, seed=71).requires_grad_(True)
    labels = torch.full((2, 3), -100)
    loss = pk.sinkhorn_loss(s, t, labels=labels, group_size=3, backend=cpu_backend)
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all() and (t.grad == 0).all()
    e_s = torch.zeros((0, 11), requires_grad=True)
    e_t = torch.zeros((0, 11), requires_grad=True)
    loss = pk.sinkhorn_loss(e_s, e_t, backend=cpu_backend)
    assert loss.item() == 0.0
    loss.backward()
    assert e_s.grad.shape == (0, 11)


@pytest.mark.parametrize("cost", COSTS)
def test_sinkhorn_whole_group_ignored_vs_oracle(cpu_backend, cost):
    """Groups with every row ignored take no part in the mean and pass no gradient; a group
    with one valid row transports all its mass to itself (loss C_ii); the others as usual."""
    pk = H.pk()
    s = H.make_logits((4, 3, 19), FP32, seed=85)
    t = H.make_logits((4, 3, 19), FP32, seed=86)
    labels = torch.tensor([[1, 2, 3], [-100, -100, -100], [-100, 4, -100], [5, -100, 6]])
    kw = dict(cost=cost, epsilon=0.1, n_iters=20, temperature=2.0, group_size=3, labels=labels)
    loss, gs, gt = _loss_and_grads(lambda a, b: pk.sinkhorn_loss(a, b, backend=cpu_backend, **kw), s, t)
    rl, rgs, rgt = _oracle_sinkhorn(s, t, **kw)
    assert abs(loss.item() - rl.item()) <= 2e-4 * abs(rl.item()) + 1e-6, (loss.item(), rl.item())
    _assert_close(gs, rgs, 2e-3, "student grad")
    _assert_close(gt, rgt, 2e-3, "teacher grad")
    assert (gs[1] == 0).all() and (gt[1] == 0).all()


@pytest.mark.parametrize("cost", COSTS)
def test_sinkhorn_ignored_rows_do_not_leak(cpu_backend, cost):
    """NaN / inf logits in ignored rows change neither the loss nor the other gradients."""
    pk = H.pk()
    s, t, group_size, labels = _layout_inputs(((2, 5, 23), 5, 0.3), seed=80)
    kw = dict(group_size=group_size, labels=labels, backend=cpu_backend, cost=cost)
    loss, gs, gt = _loss_and_grads(lambda a, b: pk.sinkhorn_loss(a, b, **kw), s, t)
    ignored = labels == -100
    assert ignored.any()
    s2, t2 = s.clone(), t.clone()
    s2[ignored] = float("nan")
    t2[ignored] = float("inf")
    loss2, gs2, gt2 = _loss_and_grads(lambda a, b: pk.sinkhorn_loss(a, b, **kw), s2, t2)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
    assert torch.isfinite(gs2).all() and torch.isfinite(gt2).all()
    _assert_close(gs2, gs, 1e-5, "student grad with garbage in ignored rows")


# ============================================================================ errors

def test_bad_arguments_are_named():
    pk = H.pk()
    s = H.make_logits((4, 10), FP32, seed=90)
    t = H.make_logits((4, 10), FP32, seed=91)
    cases = [
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(epsilon=-1.0), ValueError, "epsilon"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(epsilon="0.1"), TypeError, "epsilon"),
        (dict(n_iters=0), ValueError, "n_iters"),
        (dict(n_iters=2.5), TypeError, "n_iters"),
        (dict(cost="cosine"), ValueError, "cost"),
        (dict(group_size=3), ValueError, "group_size"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(envelope="yes"), TypeError, "envelope"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            pk.sinkhorn_loss(s, t, **kw)
    with pytest.raises(ValueError, match="teacher_logits"):
        pk.sinkhorn_loss(s, t[:, :9])
    cd_cases = [
        ((s, t[:, :9]), {}, ValueError, "vocab"),
        ((s[None].expand(2, 4, 10), t[None].expand(3, 4, 10)), {}, ValueError, "batch"),
        ((s[0], t), {}, ValueError, "student_logits"),
        ((s, t.double()), {}, TypeError, "dtype"),
        ((s.long(), t), {}, TypeError, "student_logits"),
        ((s, t), dict(cost="l2"), ValueError, "cost"),
        ((s, t), dict(temperature=-1.0), ValueError, "temperature"),
    ]
    for args, kw, exc, name in cd_cases:
        with pytest.raises(exc, match=name):
            pk.softmax_cdist(*args, **kw)


# ============================================================================ registration

def _op_args(cost, with_mask, dtype=FP32):
    s = H.make_logits((2, 5, 19), dtype, seed=100)
    t = H.make_logits((2, 5, 19), dtype, seed=101)
    mask = torch.tensor([True, False, True, True, True] * 2) if with_mask else None
    return s.requires_grad_(True), t.requires_grad_(True), mask, cost, 0.8


@pytest.mark.skipif("cpu" not in H.cpu_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_cpu_sinkhorn_iterations(with_mask):
    log_k = (-3 * torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(102))).requires_grad_(True)
    valid = None
    if with_mask:
        valid = torch.tensor([[True, False, True, True, True, True], [True] * 6])
        pair = valid[:, :, None] & valid[:, None, :]
        log_k = torch.where(pair, log_k.detach(), float("-inf")).requires_grad_(True)
    torch.library.opcheck(torch.ops.pykernels.sinkhorn_iterations_forward, (log_k, valid, 3, True))
    torch.library.opcheck(torch.ops.pykernels.sinkhorn_iterations_forward, (log_k.detach(), valid, 3, False))
    steps = torch.ops.pykernels.sinkhorn_iterations_forward(log_k.detach(), valid, 3, True)[1]
    torch.library.opcheck(torch.ops.pykernels.sinkhorn_iterations_backward, (torch.randn(2, 6, 6), steps))


@pytest.mark.skipif("cpu" not in H.cpu_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("cost", [0, 1])
def test_opcheck_cpu_cdist(cost, with_mask):
    torch.library.opcheck(torch.ops.pykernels.softmax_cdist_forward, _op_args(cost, with_mask))
    s, t, mask, _, _ = _op_args(cost, with_mask)
    C, A, norm_s, norm_t = torch.ops.pykernels.softmax_cdist_forward(s.detach(), t.detach(), mask, cost, 0.8)
    w = torch.randn(2, 5, 5)
    dot = torch.randn(10)
    torch.library.opcheck(torch.ops.pykernels.softmax_cdist_backward,
                          (w, s.detach(), t.detach(), norm_s, norm_t, dot, mask, cost, 0.8))


@pytest.mark.skipif("triton" not in H.cpu_backends(), reason="Triton interpreter not active")
@pytest.mark.parametrize("cost", [0, 1])
def test_opcheck_triton_cdist_interpreter(cost):
    """Schema and autograd registration of the Triton op under the interpreter (fake-tensor
    tracing of a triton_op needs a GPU: the full opcheck is a GPU test)."""
    torch.library.opcheck(torch.ops.pykernels.triton_softmax_cdist_forward, _op_args(cost, True),
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.skipif("cpu" not in H.cpu_backends(), reason="C++ extension not built")
def test_torch_compile_fullgraph_sinkhorn_cpu():
    pk = H.pk()
    s = H.make_logits((2, 4, 33), FP32, seed=110)
    t = H.make_logits((2, 4, 33), FP32, seed=111)
    labels = H.make_labels((2, 4), seed=112, frac_ignored=0.25)

    def f(a, b, lab):
        return pk.sinkhorn_loss(a, b, group_size=4, labels=lab, n_iters=5, backend="cpu")

    compiled = torch.compile(f, fullgraph=True)
    s1 = s.clone().requires_grad_(True)
    out = compiled(s1, t, labels)
    out.backward()
    s2 = s.clone().requires_grad_(True)
    expected = f(s2, t, labels)
    expected.backward()
    assert out.item() == pytest.approx(expected.item(), rel=1e-5)
    _assert_close(s1.grad, s2.grad, 1e-5, "compiled grad")


@pytest.mark.parametrize("backend", [b for b in H.cpu_backends() if b != "torch"])
def test_double_backward_raises(backend):
    pk = H.pk()
    s = H.make_logits((3, 12), FP32, seed=120).requires_grad_(True)
    t = H.make_logits((3, 12), FP32, seed=121)
    C = pk.softmax_cdist(s, t, backend=backend)
    (g,) = torch.autograd.grad(C.sum(), s, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ============================================================================ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cost", COSTS)
def test_softmax_cdist_gpu_vs_oracle(backend, cost, dtype):
    pk = H.pk()
    if backend not in pk.available_backends("cuda"):
        pytest.skip(f"{backend} not available on cuda")
    s = H.make_logits((2, 70, 3001), dtype, seed=130, device="cuda")
    t = H.make_logits((2, 45, 3001), dtype, seed=131, device="cuda")
    grad_c = H.make_logits((2, 70, 45), FP32, seed=132, scale=1.0, device="cuda")
    C, gs, gt = _cdist_grads(lambda a, b: pk.softmax_cdist(a, b, cost=cost, temperature=2.0,
                                                           backend=backend), s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s.cpu(), t.cpu(), cost, 2.0, grad_c.cpu())
    _assert_c_close(C.cpu(), rC, f"{backend} {cost} C")
    floor = _cdist_floor(grad_c, 2.0)
    _assert_close(gs.cpu(), rgs, GRAD_REL[dtype], f"{backend} {cost} student grad", floor)
    _assert_close(gt.cpu(), rgt, GRAD_REL[dtype], f"{backend} {cost} teacher grad", floor)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cost", COSTS)
def test_sinkhorn_loss_gpu_vs_oracle(backend, cost):
    pk = H.pk()
    if backend not in pk.available_backends("cuda"):
        pytest.skip(f"{backend} not available on cuda")
    s, t, group_size, labels = _layout_inputs(((3, 8, 501), 8, 0.25), seed=140)
    kw = dict(cost=cost, epsilon=0.1, n_iters=20, temperature=2.0, group_size=group_size)
    loss, gs, gt = _loss_and_grads(
        lambda a, b: pk.sinkhorn_loss(a, b, labels=labels.cuda(), backend=backend, **kw),
        s.cuda(), t.cuda())
    rl, rgs, rgt = _oracle_sinkhorn(s, t, labels=labels, **kw)
    assert abs(loss.item() - rl.item()) <= 2e-4 * abs(rl.item()) + 1e-6
    _assert_close(gs.cpu(), rgs, 2e-3, f"{backend} student grad")
    _assert_close(gt.cpu(), rgt, 2e-3, f"{backend} teacher grad")



@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_softmax_cdist_gpu_on_a_device_that_is_not_current(backend):
    """Kernels launch on the tensors' device (and its stream), not on the current device."""
    pk = H.pk()
    if backend not in pk.available_backends("cuda"):
        pytest.skip(f"{backend} not available on cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    s = H.make_logits((2, 20, 501), BF16, seed=133, device="cuda:1")
    t = H.make_logits((2, 9, 501), BF16, seed=134, device="cuda:1")
    grad_c = H.make_logits((2, 20, 9), FP32, seed=135, scale=1.0, device="cuda:1")
    with torch.cuda.device(0):
        C, gs, gt = _cdist_grads(lambda a, b: pk.softmax_cdist(a, b, cost="sqeuclidean",
                                                               backend=backend), s, t, grad_c)
    rC, rgs, rgt = _oracle_cdist(s.cpu(), t.cpu(), "sqeuclidean", 1.0, grad_c.cpu())
    _assert_c_close(C.cpu(), rC, f"{backend} C")
    floor = _cdist_floor(grad_c, 1.0)
    _assert_close(gs.cpu(), rgs, GRAD_REL[BF16], f"{backend} student grad", floor)
    _assert_close(gt.cpu(), rgt, GRAD_REL[BF16], f"{backend} teacher grad", floor)


def test_sinkhorn_loss_module(cpu_backend):
    pk = H.pk()
    s, t, group_size, labels = _layout_inputs(((2, 4, 19), 4, 0.25), seed=150)
    module = pk.nn.SinkhornLoss(cost="sqeuclidean", epsilon=0.2, n_iters=10, group_size=4,
                                backend=cpu_backend)
    assert "epsilon=0.2" in repr(module)
    got = module(s, t, labels=labels)
    expected = ref.sinkhorn_loss(s, t, cost="sqeuclidean", epsilon=0.2, n_iters=10, group_size=4,
                                 labels=labels)
    assert got.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
    with pytest.raises(TypeError, match="unknown keyword"):
        pk.nn.SinkhornLoss(eps=0.1)
