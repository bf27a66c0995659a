"""Op registration: torch.library.opcheck, direct op calls, torch.compile, double backward,
available_backends and the nn module.

Registered ops (DESIGN.md):
  torch.ops.pykernels.divergence_forward(student3d, teacher3d, row_valid|None, kind, w, inv_T)
      -> (row_loss [N] fp32, stats [N, STATS_WIDTH] fp32)
  torch.ops.pykernels.divergence_backward(grad_row, student3d, teacher3d, row_valid, stats,
      kind, w, inv_T, student_grad, teacher_grad) -> (grad_student, grad_teacher)
  torch.ops.pykernels.triton_divergence_forward / triton_divergence_backward (same schemas)
kernel kinds: 0 forward_kl, 1 jsd (0 < w < 1), 2 skew_forward_kl (w = alpha), 3 tvd,
4 hellinger.  row_valid is a bool mask over the N = B*T rows.
"""

import os

import pytest
import torch

import helpers as H
import reference as ref
from helpers import BF16, FP16, FP32
from pykernels._registry import LOGPROB_STATS_WIDTH, STATS_WIDTH

BACKENDS = H.cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
HAS_CUDA = torch.cuda.is_available()

# (kernel kind, w, public kind + params of the same value)
KERNEL_KINDS = [
    (0, 0.0, "forward_kl", {}),
    (1, 0.1, "jsd", {"beta": 0.1}),
    (1, 0.5, "jsd", {"beta": 0.5}),
    (1, 0.9, "jsd", {"beta": 0.9}),
    (2, 0.1, "skew_forward_kl", {"alpha": 0.1}),
    (2, 0.0, "skew_forward_kl", {"alpha": 0.0}),
    (3, 0.0, "tvd", {}),
    (4, 0.0, "hellinger", {}),
]
KERNEL_KIND_IDS = [f"k{k}-w{w:g}" for k, w, _, _ in KERNEL_KINDS]


def forward_op(backend):
    if backend == "triton":
        return torch.ops.pykernels.triton_divergence_forward
    return torch.ops.pykernels.divergence_forward


def backward_op(backend):
    if backend == "triton":
        return torch.ops.pykernels.triton_divergence_backward
    return torch.ops.pykernels.divergence_backward


def op_inputs(kind_name, dtype=FP32, shape=(2, 3, 13), device="cpu", seed=0, with_mask=True):
    s, t = H.make_pair(shape, dtype, seed=seed, kind=kind_name, device=device)
    row_valid = None
    if with_mask:
        row_valid = torch.tensor([True, False, True, True, True, False], device=device)
        row_valid = row_valid[: shape[0] * shape[1]]
    return s, t, row_valid


# ----------------------------------------------------------------------------- backends


def test_expected_backends_available_on_cpu():
    """The C++ 'cpu' backend and the eager 'torch' backend always run CPU tensors here;
    'triton' runs them exactly when the interpreter is on (no CUDA device)."""
    pk = H.pk()
    avail = pk.available_backends("cpu")
    assert isinstance(avail, list)
    assert "cpu" in avail, f"C++ extension not usable: available_backends('cpu') = {avail}"
    assert "torch" in avail
    assert "cuda" not in avail
    triton_importable = __import__("importlib").util.find_spec("triton") is not None
    if not HAS_CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert ("triton" in avail) == triton_importable, avail
    else:
        assert "triton" not in avail  # no interpreter when a GPU exists


def test_available_backends_forms():
    pk = H.pk()
    known = {"auto", "cpu", "cuda", "triton", "torch"}
    cpu = pk.available_backends("cpu")
    assert pk.available_backends(torch.device("cpu")) == cpu
    every = pk.available_backends()
    assert set(every) <= known
    assert set(cpu) <= set(every)
    cuda = pk.available_backends("cuda")
    assert set(cuda) <= set(every)
    if not HAS_CUDA:
        assert "cuda" not in cuda and "triton" not in cuda and "cuda" not in every
    else:
        assert "cuda" in cuda or "triton" in cuda
        assert pk.available_backends(torch.device("cuda", 0)) == cuda


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_listed_backend_runs_cpu_tensors(backend):
    s, t = H.make_pair((2, 9), FP32, seed=1)
    out = H.pk().jsd(s, t, backend=backend)
    H.assert_loss_close(out, ref.divergence(s, t, "jsd"), FP32)


# ----------------------------------------------------------------------------- direct op calls


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kk", KERNEL_KINDS, ids=KERNEL_KIND_IDS)
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_forward_backward_ops_direct(backend, kk, with_mask):
    """The registered ops on [B, T, V]: row_loss per row (0 at invalid rows), stats
    [N, STATS_WIDTH] fp32, and the backward op's gradients for a given grad_row."""
    kind_int, w, kind, params = kk
    T = 1.25
    s, t, row_valid = op_inputs(kind, with_mask=with_mask)
    row_loss, stats = forward_op(backend)(s, t, row_valid, kind_int, w, 1.0 / T)
    N = s.shape[0] * s.shape[1]
    assert row_loss.shape == (N,) and row_loss.dtype == FP32
    assert stats.shape == (N, STATS_WIDTH) and stats.dtype == FP32
    expected = ref.row_divergence(s, t, kind, **params, temperature=T).reshape(N)
    if row_valid is not None:
        expected = torch.where(row_valid, expected, torch.zeros_like(expected))
    H.assert_loss_close(row_loss, expected, FP32, what="row_loss")

    grad_row = H.make_grad_output((N,))
    gs, gt = backward_op(backend)(grad_row, s, t, row_valid, stats, kind_int, w, 1.0 / T,
                                  True, True)
    labels = None
    if row_valid is not None:
        labels = torch.where(row_valid, 0, -100).reshape(s.shape[:-1])
    _, gs_ref, gt_ref = ref.loss_and_grads(s, t, kind, grad_output=grad_row.reshape(2, 3),
                                           **params, temperature=T, labels=labels,
                                           reduction="none")
    unit = H.oracle_unit(s, t, kind, params, grad_output=grad_row.reshape(2, 3),
                         temperature=T, labels=labels, reduction="none")
    H.assert_grad_close(gs, gs_ref, FP32, what="op grad_student", unit=unit)
    H.assert_grad_close(gt, gt_ref, FP32, what="op grad_teacher", unit=unit)

    gs_only, _ = backward_op(backend)(grad_row, s, t, row_valid, stats, kind_int, w, 1.0 / T,
                                      True, False)
    H.assert_grad_close(gs_only, gs_ref, FP32, what="op grad_student (student only)", unit=unit)
    _, gt_only = backward_op(backend)(grad_row, s, t, row_valid, stats, kind_int, w, 1.0 / T,
                                      False, True)
    H.assert_grad_close(gt_only, gt_ref, FP32, what="op grad_teacher (teacher only)", unit=unit)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_ops_direct_low_precision(backend, dtype):
    s, t, row_valid = op_inputs("jsd", dtype=dtype, shape=(2, 2, 300), with_mask=False)
    row_loss, stats = forward_op(backend)(s, t, None, 1, 0.3, 1.0)
    assert row_loss.dtype == FP32 and stats.dtype == FP32
    H.assert_loss_close(row_loss, ref.row_divergence(s, t, "jsd", beta=0.3).reshape(4), dtype)
    gs, gt = backward_op(backend)(torch.ones(4), s, t, None, stats, 1, 0.3, 1.0, True, True)
    assert gs.dtype == dtype and gt.dtype == dtype
    _, gs_ref, gt_ref = ref.loss_and_grads(s, t, "jsd", beta=0.3, reduction="sum")
    unit = H.oracle_unit(s, t, "jsd", {"beta": 0.3}, reduction="sum")
    H.assert_grad_close(gs, gs_ref, dtype, unit=unit)
    H.assert_grad_close(gt, gt_ref, dtype, unit=unit)



def _bad_side_input_cases():
    """(op family, argument, bad value maker): side inputs the kernels index as contiguous
    arrays: a stride-0 expand, a short one, a wrong dtype."""
    N = 6
    return [
        ("divergence", "grad_row", lambda: torch.ones(1).expand(N)),
        ("divergence", "grad_row", lambda: torch.ones(N - 1)),
        ("divergence", "stats", lambda: torch.zeros(N - 1, STATS_WIDTH)),
        ("divergence", "stats", lambda: torch.zeros(N, STATS_WIDTH - 1)),
        ("divergence", "row_valid", lambda: torch.ones(N - 1, dtype=torch.bool)),
        ("divergence", "row_valid", lambda: torch.ones(N, dtype=torch.int8)),
        ("logprob", "grad_logp", lambda: torch.ones(1).expand(N)),
        ("logprob", "stats", lambda: torch.zeros(N, 1)),
        ("logprob", "stats", lambda: torch.zeros(N - 1, LOGPROB_STATS_WIDTH)),
        ("cdist", "weight", lambda: torch.ones(2, 3, 2)),
        ("cdist", "norm_x", lambda: torch.zeros(6)),
        ("cdist", "norm_y", lambda: torch.zeros(6, 2)[:, :1]),
        ("cdist", "dot_x", lambda: torch.zeros(12)[::2]),
        ("cdist", "row_valid", lambda: torch.ones(5, dtype=torch.bool)),
    ]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("family,arg,make_bad", _bad_side_input_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_ops_direct_reject_bad_side_inputs(backend, family, arg, make_bad):
    """Direct op calls (not the public functions, which build these inputs themselves) with a
    side input the kernel would read past or through the wrong stride: an error naming it."""
    ops = torch.ops.pykernels
    prefix = "triton_" if backend == "triton" else ""
    s, t, row_valid = op_inputs("jsd")  # [2, 3, 13], N = 6
    if family == "divergence":
        _, stats = forward_op(backend)(s, t, row_valid, 1, 0.5, 1.0)
        args = dict(grad_row=torch.ones(6), s=s, t=t, row_valid=row_valid, stats=stats)
        args[arg] = make_bad()
        call = lambda: backward_op(backend)(*args.values(), 1, 0.5, 1.0, True, True)
    elif family == "logprob":
        tok = torch.zeros(6, dtype=torch.int64)
        _, _, stats = getattr(ops, prefix + "token_logprob_forward")(s, tok, 1.0, True)
        args = dict(grad_logp=torch.ones(6), grad_entropy=torch.ones(6), z=s, tok=tok,
                    stats=stats)
        args[arg] = make_bad()
        call = lambda: getattr(ops, prefix + "token_logprob_backward")(*args.values(), 1.0)
    else:
        x, y = s[:, :, :7].contiguous(), t[:, :, :7].contiguous()  # [Bt=2, G=3, V=7]
        C, A, norm_x, norm_y = getattr(ops, prefix + "softmax_cdist_forward")(x, y, row_valid, 1, 1.0)
        dot_x = torch.zeros(6)
        args = dict(weight=torch.ones(2, 3, 3), x=x, y=y, norm_x=norm_x, norm_y=norm_y, dot_x=dot_x,
                    row_valid=row_valid)
        args[arg] = make_bad()
        call = lambda: getattr(ops, prefix + "softmax_cdist_backward")(*args.values(), 1, 1.0)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=arg):
        call()

# ----------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    cases = []
    for kind_int, w, kind, _ in KERNEL_KINDS:
        for grads in ("none", "student", "teacher", "both"):
            for with_mask in (False, True):
                cases.append(pytest.param(kind_int, w, kind, grads, with_mask,
                                          id=f"k{kind_int}-w{w:g}-{grads}-{'mask' if with_mask else 'nomask'}"))
    return cases


@pytest.mark.parametrize("kind_int,w,kind,grads,with_mask", _opcheck_cases())
def test_opcheck_cpu_forward(kind_int, w, kind, grads, with_mask):
    """Full torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch)
    of the C++ forward op on small CPU inputs, with and without requires_grad."""
    s, t, row_valid = op_inputs(kind, shape=(2, 3, 11), with_mask=with_mask)
    s.requires_grad_(grads in ("student", "both"))
    t.requires_grad_(grads in ("teacher", "both"))
    torch.library.opcheck(torch.ops.pykernels.divergence_forward,
                          (s, t, row_valid, kind_int, w, 0.8))


@pytest.mark.parametrize("kind_int,w,kind", [(k, w, n) for k, w, n, _ in KERNEL_KINDS],
                         ids=KERNEL_KIND_IDS)
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both", "student", "teacher", "none"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_opcheck_cpu_forward_with_grad(kind_int, w, kind, flags, with_mask):
    """The CPU backend's fused forward (gradient computed in the forward) under opcheck, and
    its gradients of row_weight * row_loss equal the backward op's for grad_row = row_weight."""
    s, t, row_valid = op_inputs(kind, shape=(2, 3, 11), with_mask=with_mask)
    s.requires_grad_(flags[0])
    t.requires_grad_(flags[1])
    args = (s, t, row_valid, kind_int, w, 0.8, *flags, 0.3)
    torch.library.opcheck(torch.ops.pykernels.divergence_forward_with_grad, args)
    loss, stats, gs, gt = torch.ops.pykernels.divergence_forward_with_grad(*args)
    ones = torch.full((6,), 0.3)
    ref_s, ref_t = torch.ops.pykernels.divergence_backward(
        ones, s.detach(), t.detach(), row_valid, stats, kind_int, w, 0.8, *flags)
    for got, want, wanted in ((gs, ref_s, flags[0]), (gt, ref_t, flags[1])):
        if wanted:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        else:
            assert got.numel() == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_backward_twice_with_retain_graph(backend, name):
    """A second backward through the same graph (retain_graph=True) with another upstream
    gradient must give that gradient's result: the CPU fused path scales its saved gradient
    in place on the first call and must not reuse it."""
    s, t = H.make_pair((3, 2, 23), FP32, seed=12)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = getattr(H.pk(), name)(s, t, backend=backend, reduction="none")
    w1, w2 = H.make_grad_output((3, 2)), 2.5 * H.make_grad_output((3, 2)).flip(0)
    g1 = torch.autograd.grad(loss, (s, t), w1, retain_graph=True)
    g2 = torch.autograd.grad(loss, (s, t), w2, retain_graph=True)
    ref_loss = getattr(H.pk(), name)(s, t, backend="torch", reduction="none")
    r1 = torch.autograd.grad(ref_loss, (s, t), w1, retain_graph=True)
    r2 = torch.autograd.grad(ref_loss, (s, t), w2)
    for got, want in zip(g1 + g2, r1 + r2):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind_int,w,kind", [(k, w, n) for k, w, n, _ in KERNEL_KINDS],
                         ids=KERNEL_KIND_IDS)
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)],
                         ids=["both", "student", "teacher"])
def test_opcheck_cpu_backward(kind_int, w, kind, flags):
    s, t, row_valid = op_inputs(kind, shape=(2, 3, 11))
    _, stats = torch.ops.pykernels.divergence_forward(s, t, row_valid, kind_int, w, 0.8)
    grad_row = H.make_grad_output((6,))
    torch.library.opcheck(torch.ops.pykernels.divergence_backward,
                          (grad_row, s, t, row_valid, stats, kind_int, w, 0.8, *flags))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run CPU tensors here")
@pytest.mark.parametrize("kind_int,w,kind", [(k, w, n) for k, w, n, _ in KERNEL_KINDS],
                         ids=KERNEL_KIND_IDS)
@pytest.mark.parametrize("grads", ["none", "both"])
def test_opcheck_triton_forward_interpreter(kind_int, w, kind, grads):
    """Under the interpreter a triton_op runs eagerly but cannot be traced with fake
    tensors (DESIGN.md), so only the schema and autograd-registration checks run here;
    the full opcheck of the Triton ops is a GPU test."""
    s, t, row_valid = op_inputs(kind, shape=(2, 3, 11))
    s.requires_grad_(grads == "both")
    t.requires_grad_(grads == "both")
    torch.library.opcheck(torch.ops.pykernels.triton_divergence_forward,
                          (s, t, row_valid, kind_int, w, 0.8),
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.gpu
@pytest.mark.parametrize("op_name", ["divergence_forward", "triton_divergence_forward"])
@pytest.mark.parametrize("kind_int,w,kind", [(k, w, n) for k, w, n, _ in KERNEL_KINDS],
                         ids=KERNEL_KIND_IDS)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_opcheck_gpu_forward(op_name, kind_int, w, kind, dtype):
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    s, t, row_valid = op_inputs(kind, dtype=dtype, shape=(2, 3, 300), device="cuda")
    s.requires_grad_(True)
    t.requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.pykernels, op_name),
                          (s, t, row_valid, kind_int, w, 0.8))


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph_cpu_op():
    """torch.compile(fullgraph=True) of a function calling pk.jsd on CPU tensors with
    backend='cpu' (the C++ op; the interpreted Triton op cannot be traced): same loss and
    gradients as eager, no graph breaks."""
    pk = H.pk()
    torch._dynamo.reset()

    def f(s, t, labels):
        return pk.jsd(s, t, beta=0.3, temperature=2.0, labels=labels, backend="cpu") * 1.5

    compiled = torch.compile(f, fullgraph=True)
    s, t = H.make_pair((2, 4, 37), FP32, seed=7)
    labels = H.make_labels((2, 4), seed=7)
    s1 = s.clone().requires_grad_(True)
    t1 = t.clone().requires_grad_(True)
    out = compiled(s1, t1, labels)
    out.backward()
    s2 = s.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    eager = f(s2, t2, labels)
    eager.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-5, atol=1e-8)
    loss_ref, gs_ref, gt_ref = ref.loss_and_grads(s, t, "jsd", beta=0.3, temperature=2.0,
                                                  labels=labels, grad_output=1.5)
    H.assert_loss_close(out / 1.5, loss_ref, FP32)
    unit = H.oracle_unit(s, t, "jsd", {"beta": 0.3}, grad_output=1.5, temperature=2.0,
                         labels=labels)
    H.assert_grad_close(s1.grad, gs_ref, FP32, unit=unit)
    H.assert_grad_close(t1.grad, gt_ref, FP32, unit=unit)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_compile_fullgraph_gpu(backend):
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    pk = H.pk()
    torch._dynamo.reset()

    def f(s, t, labels):
        return pk.skew_reverse_kl(s, t, alpha=0.1, labels=labels, backend=backend)

    compiled = torch.compile(f, fullgraph=True)
    s, t = H.make_pair((2, 8, 4099), BF16, seed=8, device="cuda")
    labels = H.make_labels((2, 8), seed=8, device="cuda")
    s1 = s.clone().requires_grad_(True)
    out = compiled(s1, t, labels)
    out.backward()
    loss_ref, gs_ref, _ = ref.loss_and_grads(s.cpu(), t.cpu(), "skew_reverse_kl", alpha=0.1,
                                             labels=labels.cpu())
    H.assert_loss_close(out.cpu(), loss_ref, BF16)
    H.assert_grad_close(s1.grad.cpu(), gs_ref, BF16)


# ----------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_double_backward_raises(backend, name):
    s, t = H.make_pair((3, 19), FP32, seed=9)
    s.requires_grad_(True)
    loss = getattr(H.pk(), name)(s, t, backend=backend)
    with pytest.raises(RuntimeError, match="(?i)double backward"):
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        g.pow(2).sum().backward()


# ----------------------------------------------------------------------------- nn module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", H.KIND_CASES, ids=H.KIND_IDS)
def test_distillation_loss_module(backend, case):
    kind, params = case
    pk = H.pk()
    mod = pk.nn.DistillationLoss(kind=kind, **params, temperature=1.7, backend=backend)
    assert isinstance(mod, torch.nn.Module)
    assert list(mod.parameters()) == []
    assert kind in repr(mod)
    s, t = H.make_pair((2, 3, 27), FP32, seed=10, kind=kind, temperature=1.7)
    labels = H.make_labels((2, 3), seed=10)
    s1 = s.clone().requires_grad_(True)
    out = mod(s1, t, labels=labels)
    fn_out = H.call(kind, params, s, t, backend, temperature=1.7, labels=labels)
    torch.testing.assert_close(out.detach(), fn_out, rtol=1e-6, atol=1e-7)
    out.backward()
    loss_ref, gs_ref, _ = ref.loss_and_grads(s, t, kind, **params, temperature=1.7,
                                             labels=labels)
    H.assert_loss_close(out, loss_ref, FP32)
    unit = H.oracle_unit(s, t, kind, params, temperature=1.7, labels=labels)
    H.assert_grad_close(s1.grad, gs_ref, FP32, unit=unit)
    # num_items_in_batch per call; positional labels
    out2 = mod(s, t, labels, num_items_in_batch=10)
    H.assert_loss_close(out2, ref.divergence(s, t, kind, **params, temperature=1.7,
                                             labels=labels, num_items_in_batch=10), FP32)


def test_distillation_loss_module_options():
    pk = H.pk()
    s, t = H.make_pair((4, 3, 21), FP32, seed=11)
    labels = torch.zeros(4, 3, dtype=torch.int64)
    labels[0] = 5
    mod = pk.nn.DistillationLoss(kind="reverse_kl", reduction="none", ignore_index=5)
    out = mod(s, t, labels=labels)
    H.assert_loss_close(out, ref.divergence(s, t, "reverse_kl", reduction="none",
                                            labels=labels, ignore_index=5), FP32)
    assert torch.equal(out[0], torch.zeros(3))
    # Module with teacher requiring grad (mutual distillation)
    t1 = t.clone().requires_grad_(True)
    pk.nn.DistillationLoss(kind="jsd", beta=0.5)(s, t1).backward()
    _, _, gt_ref = ref.loss_and_grads(s, t, "jsd", beta=0.5)
    H.assert_grad_close(t1.grad, gt_ref, FP32, unit=H.oracle_unit(s, t, "jsd", {"beta": 0.5}))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("upstream", [1.0, 0.25, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_cpu_fused_gradient_under_upstream_scales(dtype, upstream, reduction):
    """The CPU backend computes the gradient in the forward (pre-multiplied by the reduction's
    row factor) and returns it as is, scales it (fp32, or a power of two for bf16) or
    recomputes it (bf16 with any other scale): every route must give the torch backend's
    gradient of the same upstream-scaled loss."""
    s, t = H.make_pair((5, 37), dtype, seed=21)
    labels = H.make_labels((5,), seed=21)
    s.requires_grad_(True)
    t.requires_grad_(True)
    got = torch.autograd.grad(upstream * H.pk().jsd(s, t, beta=0.3, labels=labels, reduction=reduction,
                                                    backend="cpu"), (s, t))
    s64, t64 = (x.detach().double().requires_grad_(True) for x in (s, t))
    want = torch.autograd.grad(upstream * H.pk().jsd(s64, t64, beta=0.3, labels=labels,
                                                     reduction=reduction, backend="torch"), (s64, t64))
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == FP32 else dict(rtol=2e-2, atol=1e-3)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, **tol)
