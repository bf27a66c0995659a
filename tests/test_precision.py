"""Precision with large logits, against the float64 oracle.

Log-probabilities formed as s - lse round lse, an error of about |s| * 6e-8 that eager's
max-shifted log_softmax does not make; where student and teacher are close (late in
distillation, or an RL policy next to its reference) that error is most of a small KL. The
kernels keep each softmax's normaliser as (max, log sum), so their errors should stay at the
size of eager's whatever the logits' offset. Tolerances here are a few times what fp32 eager
reaches on these inputs, and an order of magnitude below what s - lse gives at offset 1000.
"""

from __future__ import annotations

import pytest
import torch

import helpers as H
import reference as ref
import reference_rl as R
from helpers import FP32

BACKENDS = H.cpu_backends()
GPU_BACKENDS = ["cuda", "triton"]
KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
         "hellinger")
OFFSETS = [(1000.0, 1.0), (200.0, 0.5)]
OFFSET_IDS = ["offset1000", "offset200-T0.5"]


def _close_pair(offset: float, seed: int, N: int = 4, V: int = 300):
    """fp32 logits of one offset and scale 3, and a teacher 0.1 away (KL ~ 5e-3 per row)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 3.0 + offset
    t = s + torch.randn(N, V, generator=g, dtype=torch.float64) * 0.1
    return s.float(), t.float()


def _gpu_or_skip(backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert backend in H.pk().available_backends("cuda")


def _check_divergence(backend, kind, offset, temperature, device="cpu", V=300, pair=None):
    s, t = _close_pair(offset, seed=5, V=V) if pair is None else pair
    student = s.to(device, copy=True).requires_grad_()
    teacher = t.to(device, copy=True).requires_grad_()
    got = H.pk().divergence(student, teacher, kind=kind, temperature=temperature,
                            reduction="none", backend=backend)
    s64 = s.double().requires_grad_()
    t64 = t.double().requires_grad_()
    want = ref.row_divergence(s64, t64, kind, temperature=temperature)
    err = (got.double().cpu() - want).abs()
    assert err.max() <= 2e-6 + 1e-4 * want.abs().max(), (
        f"{kind}/{backend}: row losses off by {err.max():.2e} (rows ~ {want.abs().mean():.2e})")

    got.sum().backward()
    want.sum().backward()
    for name, g, g64 in (("student", student.grad, s64.grad), ("teacher", teacher.grad, t64.grad)):
        gerr = (g.double().cpu() - g64).abs().max()
        scale = g64.abs().max()
        assert gerr <= 1e-7 + 2e-4 * scale, (
            f"{kind}/{backend}: {name} gradient off by {gerr:.2e} (max |grad| {scale:.2e})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset,temperature", OFFSETS, ids=OFFSET_IDS)
def test_divergence_of_close_rows_with_large_logits(backend, kind, offset, temperature):
    _check_divergence(backend, kind, offset, temperature)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset,temperature", OFFSETS, ids=OFFSET_IDS)
def test_gpu_divergence_of_close_rows_with_large_logits(backend, kind, offset, temperature):
    _gpu_or_skip(backend)
    # V = 1271: the block sizes test_divergence's GPU tests compile already
    _check_divergence(backend, kind, offset, temperature, device="cuda", V=1271)


def _check_token_logprobs(backend, device="cpu", V=300):
    pk = H.pk()
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(6, V, generator=g, dtype=torch.float64) * 3.0 + 1000.0).float()
    tok = torch.randint(0, V, (6,), generator=g)
    ones = torch.ones(6, dtype=torch.float64)
    zz = z.to(device, copy=True).requires_grad_()
    logp, ent = pk.token_logprobs(zz, tok.to(device), return_entropy=True, backend=backend)
    l64, h64 = R.token_logprobs_and_entropy(z, tok, 1.0)
    assert (logp.double().cpu() - l64).abs().max() <= 1e-6 + 1e-6 * l64.abs().max()
    assert (ent.double().cpu() - h64).abs().max() <= 1e-6
    (logp.sum() + ent.sum()).backward()
    want = R.analytic_grad(z, tok, 1.0, dlogp=ones, dH=ones)
    assert (zz.grad.double().cpu() - want).abs().max() <= 1e-7 + 2e-4 * want.abs().max()

    # K tokens per row (selective_log_softmax's [..., K] path) from the same normaliser
    idx = torch.randint(0, V, (6, 3), generator=g)
    zk = z.to(device, copy=True).requires_grad_()
    lk = pk._registry.token_logprobs_k(backend, zk, idx.to(device), 1.0)
    lk64 = torch.log_softmax(z.double(), -1).gather(-1, idx)
    assert (lk.double().cpu() - lk64).abs().max() <= 1e-6 + 1e-6 * lk64.abs().max()
    lk.sum().backward()
    want_k = sum(R.analytic_grad(z, idx[:, k], 1.0, dlogp=ones) for k in range(3))
    assert (zk.grad.double().cpu() - want_k).abs().max() <= 1e-7 + 2e-4 * want_k.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_with_large_logits(backend):
    _check_token_logprobs(backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_token_logprobs_with_large_logits(backend):
    _gpu_or_skip(backend)
    _check_token_logprobs(backend, device="cuda", V=1271)


def _shifted_pair(shift: float, seed: int = 23, N: int = 3, V: int = 2600):
    """Close rows whose teacher logits sit `shift` above the student's (softmax ignores a
    constant, eager's log_softmax removes it exactly, and logits of two models routinely sit
    at different levels). Steps of +20 past columns 1100 and 2100 move both running maxima
    between blocks (CPU 2048 columns, the interpreter's Triton 1024), each by its own amount."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0
    s[:, 1100:] += 20.0
    s[:, 2100:] += 20.0
    t = s + torch.randn(N, V, generator=g, dtype=torch.float64) * 0.05
    return s.float(), (t + shift).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [300.0, -300.0])
def test_divergence_of_close_rows_at_different_offsets(backend, kind, shift):
    """A forward KL summed as p (t - s) and then corrected by the normalisers' gap cancels
    two numbers of the shift's size (300 * 6e-8 of each, against KL ~ 1e-3): 2-5 % row error
    and a 1e-3 error in the gradients that use the KL, where eager stays at 1e-4."""
    _check_divergence(backend, kind, 0.0, 1.0, pair=_shifted_pair(shift))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [300.0, -300.0])
def test_gpu_divergence_of_close_rows_at_different_offsets(backend, kind, shift):
    _gpu_or_skip(backend)
    _check_divergence(backend, kind, 0.0, 1.0, device="cuda", pair=_shifted_pair(shift))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,param,w,tol", [
    ("jsd", "beta", 1 - 1e-6, 5e-3), ("jsd", "beta", 1 - 1e-4, 1e-4),
    *[(kind, "alpha", w, tol) for kind in ("skew_forward_kl", "skew_reverse_kl")
      for w, tol in ((0.9, 2e-4), (0.99, 6e-4), (0.999, 1e-3))],
])
def test_mixture_weight_near_one(backend, kind, param, w, tol):
    """Gradients of the mixture kinds as their weight approaches 1, on rows of different scales
    (student std 8, teacher std 1), against float64; tolerances are a few times eager fp32's
    (the torch backend's) error on the same rows, as a fraction of the largest gradient.
    jsd: 1 - w formed in fp32 after rounding w is 1.0133e-6 at w = 1 - 1e-6, 1.3 % off; it went
    into jsd's (1 - w) gradient factor, loss weight and mixture (CPU 1.3e-2 and 1.6e-4 at the
    two weights; eager 5.3e-4 and 3.0e-5 on the teacher side; CPU now 3.1e-3 and 2.8e-5, its
    log M formed from the probabilities rather than in the log domain).
    Skew kinds: d KL(p||M) / dp carried w p / M, which tends to 1 while the gradient shrinks
    like 1 - alpha, so the centred gradient was a difference of terms near 1: skew_reverse_kl's
    student gradient had 5.2e-4, 2.2e-3 and 2.3e-2 at alpha = 0.9, 0.99, 0.999 on CPU and
    Triton, eager 3.6e-5, 1.1e-4 and 3.0e-4. (Closer still to 1 the skew kinds lose their
    gradients to fp32 cancellation on every backend, eager included.)"""
    g = torch.Generator().manual_seed(31)
    s = (torch.randn(2, 1025, generator=g, dtype=torch.float64) * 8.0).float()
    t = torch.randn(2, 1025, generator=g, dtype=torch.float64).float()
    student, teacher = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = H.pk().divergence(student, teacher, kind=kind, reduction="none", backend=backend,
                            **{param: w})
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    want = ref.row_divergence(s64, t64, kind, **{param: w})
    assert (got.double() - want).abs().max() <= 1e-6 + 1e-4 * want.abs().max()
    got.sum().backward()
    want.sum().backward()
    for name, g32, g64 in (("student", student.grad, s64.grad), ("teacher", teacher.grad, t64.grad)):
        err = (g32.double() - g64).abs().max() / g64.abs().max()
        assert err <= tol, f"{kind}/{backend} {param}={w}: {name} gradient off by {err:.2e} of its max"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_close_rows_whose_max_comes_late(backend, kind):
    """The row max sits past the first 2048 logits, 50 above them (the CPU kernel takes its
    exponentials against a running max and redoes a block only when its max overshoots by
    more than a slack; a 60-unit slack rounded x - m at the size of 50)."""
    g = torch.Generator().manual_seed(17)
    s = torch.randn(6, 4200, generator=g, dtype=torch.float64) * 2.0
    s[:, 2048:] += 50.0
    t = s + torch.randn(6, 4200, generator=g, dtype=torch.float64) * 1e-3
    s, t = s.float(), t.float()
    got = H.pk().divergence(s, t, kind=kind, reduction="none", backend=backend).double()
    want = ref.row_divergence(s.double(), t.double(), kind)
    err = (got - want).abs().max()
    assert err <= 5e-7, f"{kind}/{backend}: off by {err:.2e} (rows ~ {want.abs().mean():.2e})"


def _check_cdist(backend, cost, offset, temperature, device="cpu", G=6, V=1000):
    """Cost matrix between close rows (the diagonal pairs differ by 0.05 noise) with large
    logits: the probabilities must be as accurate as eager's exp(z - m) / S, or sign(q - p) of
    the l1 cost flips at near-equal entries (s - lse gave l1 gradients 1e3 times eager's error
    at offset 1000). Tolerances: a few times fp32 eager's on these inputs."""
    import reference_sinkhorn as RS

    g = torch.Generator().manual_seed(0)
    base = torch.randn(G, V, generator=g, dtype=torch.float64) * 3.0 + offset
    s = (base + 0.05 * torch.randn(G, V, generator=g, dtype=torch.float64)).float()
    t = base.float()
    w = torch.randn(G, G, generator=g)
    student = s.to(device, copy=True).requires_grad_()
    teacher = t.to(device, copy=True).requires_grad_()
    C = H.pk().softmax_cdist(student, teacher, cost=cost, temperature=temperature, backend=backend)
    (C * w.to(device)).sum().backward()
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    C64 = RS.softmax_cdist(s64, t64, cost, temperature)
    (C64 * w.double()).sum().backward()
    cerr = ((C.detach().double().cpu() - C64.detach()).abs() / (1e-2 + C64.detach().abs())).max()
    assert cerr <= 1e-4, f"{cost}/{backend}: C off by {cerr:.2e} (relative, floor 1e-2)"
    for name, gr, g64 in (("student", student.grad, s64.grad), ("teacher", teacher.grad, t64.grad)):
        gerr = (gr.double().cpu() - g64).abs().max() / g64.abs().max()
        assert gerr <= 6e-5, f"{cost}/{backend}: {name} gradient off by {gerr:.2e} of max |grad|"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
@pytest.mark.parametrize("offset,temperature", OFFSETS, ids=OFFSET_IDS)
def test_softmax_cdist_of_close_rows_with_large_logits(backend, cost, offset, temperature):
    _check_cdist(backend, cost, offset, temperature)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
@pytest.mark.parametrize("offset,temperature", OFFSETS, ids=OFFSET_IDS)
def test_gpu_softmax_cdist_of_close_rows_with_large_logits(backend, cost, offset, temperature):
    _gpu_or_skip(backend)
    _check_cdist(backend, cost, offset, temperature, device="cuda")
