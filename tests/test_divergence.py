"""Values and gradients of every public divergence against the float64 oracle.

Every backend that runs CPU tensors here (pk.available_backends("cpu"): the C++ "cpu"
backend, "torch", and "triton" through the interpreter when there is no GPU) is checked
against tests/reference.py for the loss and for the student and teacher gradients.
Tolerances are in tests/helpers.py (fp32: loss rtol 1e-4 / atol 1e-5*max(1,|ref|), grads
1e-5*max|ref grad|; fp16/bf16 against the oracle on the same low-precision values: loss
rtol 2e-3, grads 2e-3 (fp16) / 1e-2 (bf16) times max|ref grad|).

The Triton interpreter is slow, so triton cases keep V <= 1271 and few rows, except one
single-row V = 32001 case.  GPU variants (cuda / triton on cuda tensors) are marked `gpu`.
"""

import math
import subprocess
import sys

import pytest
import torch

import helpers as H
import reference as ref
from helpers import BF16, FP16, FP32, KIND_CASES, KIND_IDS, SOME_CASES, SOME_IDS

BACKENDS = H.cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
HAS_CUDA = torch.cuda.is_available()


_params = H.param_grid


def _b(vals=None):
    vals = BACKENDS if vals is None else vals
    return ("backend", list(vals), list(vals))


def _cases(cases=KIND_CASES, ids=KIND_IDS):
    return ("case", list(cases), list(ids))


# ============================================================================ fp32 matrix


@pytest.mark.parametrize(
    "backend,case,temperature,V",
    _params(_b(), _cases(), ("T", [0.5, 1.0, 2.0], ["T0.5", "T1", "T2"]),
            ("V", [1, 17, 1271], ["V1", "V17", "V1271"])),
)
def test_kinds_fp32(backend, case, temperature, V):
    """Each kind x beta/alpha x T x V, fp32 [N, V], reduction='none' with a random
    grad_output (per-row values and per-row gradient weights), student and teacher grads."""
    kind, params = case
    s, t = H.make_pair((4, V), FP32, seed=V + int(10 * temperature), kind=kind,
                       temperature=temperature)
    H.check_against_oracle(kind, params, s, t, backend=backend, temperature=temperature,
                           reduction="none")


@pytest.mark.parametrize(
    "backend,case,temperature",
    _params(_b(), _cases(), ("T", [0.5, 2.0], ["T0.5", "T2"])),
)
def test_kinds_fp32_batchmean_3d(backend, case, temperature):
    """Default reduction (batchmean) on [B, T, V] with a scalar grad_output != 1."""
    kind, params = case
    s, t = H.make_pair((2, 3, 61), FP32, seed=3, kind=kind, temperature=temperature)
    H.check_against_oracle(kind, params, s, t, backend=backend, temperature=temperature)


# ============================================================================ fp16 / bf16


@pytest.mark.parametrize(
    "backend,dtype,case,V",
    _params(_b(), ("dtype", [FP16, BF16], ["fp16", "bf16"]), _cases(),
            ("V", [17, 1271], ["V17", "V1271"])),
)
def test_kinds_low_precision(backend, dtype, case, V):
    """fp16/bf16 [B, T, V]: the oracle runs on the same low-precision values upcast to
    float64; the loss must be fp32 and the gradients in the input dtype."""
    kind, params = case
    T = 2.0 if V == 17 else 1.0
    s, t = H.make_pair((2, 3, V), dtype, seed=11 + V, kind=kind, temperature=T)
    H.check_against_oracle(kind, params, s, t, backend=backend, temperature=T,
                           reduction="sum")


# ============================================================================ V = 32001


@pytest.mark.parametrize(
    "backend,dtype,case",
    _params(_b([b for b in BACKENDS if not H.is_interpreted(b)]),
            ("dtype", [FP32, BF16], ["fp32", "bf16"]), _cases()),
)
def test_large_vocab(backend, dtype, case):
    """V = 32001 (not a multiple of any block size), two rows."""
    kind, params = case
    s, t = H.make_pair((2, 32001), dtype, seed=5, kind=kind)
    H.check_against_oracle(kind, params, s, t, backend=backend, temperature=1.0,
                           reduction="none")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run CPU tensors here")
@pytest.mark.parametrize("case", [("jsd", {"beta": 0.1}), ("reverse_kl", {})],
                         ids=["jsd-beta0.1", "reverse_kl"])
def test_triton_interpreter_large_vocab_single_row(case):
    kind, params = case
    s, t = H.make_pair((1, 32001), FP32, seed=6, kind=kind)
    H.check_against_oracle(kind, params, s, t, backend="triton", temperature=2.0,
                           reduction="none")


# ============================================================================ layouts

V_LAYOUT = 77


def _layout(name):
    """(student base shape, teacher base shape, transform(s) applied to the leaves,
    leading shape of the result)."""
    V = V_LAYOUT
    if name == "2d":
        return (6, V), (6, V), None, (6,)
    if name == "3d":
        return (2, 3, V), (2, 3, V), None, (2, 3)
    if name == "4d":
        return (2, 2, 2, V), (2, 2, 2, V), None, (2, 2, 2)
    if name == "sliced_3d":  # logits[:, :-1]: non-contiguous leading dims
        return (2, 5, V), (2, 5, V), (lambda x: x[:, :-1]), (2, 4)
    if name == "row_padded":  # row stride V + 7 > V
        return (5, V + 7), (5, V + 7), (lambda x: x[:, :V]), (5,)
    if name == "vocab_strided":  # stride(-1) != 1
        return (V, 5), (V, 5), (lambda x: x.t()), (5,)
    if name == "mixed":  # contiguous student, every-other-row teacher
        return (3, V), (6, V), ((lambda x: x), (lambda x: x[::2])), (3,)
    if name == "batch1_3d":
        return (1, 4, V), (1, 4, V), None, (1, 4)
    raise ValueError(name)


LAYOUTS = ["2d", "3d", "4d", "sliced_3d", "row_padded", "vocab_strided", "mixed", "batch1_3d"]
LAYOUT_CASES = [("forward_kl", {}), ("jsd", {"beta": 0.9}), ("skew_reverse_kl", {"alpha": 0.1}),
                ("hellinger", {})]


@pytest.mark.parametrize(
    "backend,layout,case",
    _params(_b(), ("layout", LAYOUTS, LAYOUTS),
            _cases(LAYOUT_CASES, [H.case_id(c) for c in LAYOUT_CASES])),
)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_layouts(backend, layout, case, reduction):
    """Leading shapes [N, V], [B, T, V], 4-d; a sliced logits[:, :-1]; padded rows;
    a vocab dimension with stride != 1; student and teacher with different strides.
    Gradients are checked on the base tensors (zero outside the view)."""
    kind, params = case
    sb, tb, tf, lead = _layout(layout)
    s = H.make_logits(sb, FP32, seed=21)
    t = H.make_logits(tb, FP32, seed=22)
    H.check_against_oracle(kind, params, s, t, backend=backend, transform=tf,
                           temperature=1.5, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_logits_with_sliced_labels(backend):
    """The causal-LM pattern: logits[:, :-1] against labels[:, 1:] (both non-contiguous)."""
    s = H.make_logits((2, 6, 33), FP32, seed=23)
    t = H.make_logits((2, 6, 33), FP32, seed=24)
    labels_full = H.make_labels((2, 6), seed=3, frac_ignored=0.4)
    labels = labels_full[:, 1:]
    assert not labels.is_contiguous()
    H.check_against_oracle("jsd", {"beta": 0.5}, s, t, backend=backend,
                           transform=lambda x: x[:, :-1], labels=labels, temperature=2.0)


# ============================================================================ masking / reductions

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@pytest.mark.parametrize(
    "backend,case,reduction",
    _params(_b(), _cases(SOME_CASES, SOME_IDS), ("reduction", REDUCTIONS, REDUCTIONS)),
)
def test_ignore_index_some_rows(backend, case, reduction):
    kind, params = case
    s, t = H.make_pair((3, 5, 40), FP32, seed=31, kind=kind)
    labels = H.make_labels((3, 5), seed=1, frac_ignored=0.4)
    n_ign = int((labels == -100).sum())
    assert 0 < n_ign < labels.numel()
    H.check_against_oracle(kind, params, s, t, backend=backend, labels=labels,
                           reduction=reduction)


@pytest.mark.parametrize(
    "backend,case,reduction",
    _params(_b(), _cases(SOME_CASES, SOME_IDS), ("reduction", REDUCTIONS, REDUCTIONS)),
)
def test_ignore_index_all_rows(backend, case, reduction):
    """All rows ignored: the loss is exactly 0 (zeros for 'none') and the gradients are 0."""
    kind, params = case
    s, t = H.make_pair((2, 3, 40), FP32, seed=32, kind=kind)
    labels = torch.full((2, 3), -100, dtype=torch.int64)
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    out = H.call(kind, params, s, t, backend, labels=labels, reduction=reduction)
    assert out.dtype == torch.float32
    expected_shape = (2, 3) if reduction == "none" else ()
    assert tuple(out.shape) == expected_shape
    assert torch.equal(out.detach(), torch.zeros(expected_shape)), out
    out.backward(torch.full(expected_shape, 0.5))
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s)), s.grad.abs().max()
    assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), t.grad.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_custom_ignore_index_and_label_dtype(backend, label_dtype):
    s, t = H.make_pair((4, 3, 25), FP32, seed=33)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 3), generator=g).to(label_dtype)  # 0 is ignored here
    labels[0, 0] = 0
    labels[1, 1] = -100  # an ordinary label when ignore_index=0
    H.check_against_oracle("skew_forward_kl", {"alpha": 0.1}, s, t, backend=backend,
                           labels=labels, ignore_index=0, reduction="batchmean")
    H.check_against_oracle("tvd", {}, s, H.avoid_tvd_ties(s, t), backend=backend,
                           labels=labels, ignore_index=0, reduction="none")


@pytest.mark.parametrize(
    "backend,reduction,nib",
    _params(_b(), ("reduction", ["batchmean", "mean"], ["batchmean", "mean"]),
            ("nib", ["int", "int64_0d", "float32_0d", "below_1"],
             ["int", "int64_0d", "float32_0d", "below_1"])),
)
@pytest.mark.parametrize("case", [("jsd", {"beta": 0.5}), ("reverse_kl", {})],
                         ids=["jsd", "reverse_kl"])
def test_num_items_in_batch(backend, reduction, nib, case):
    """num_items_in_batch replaces n_valid as the divisor of batchmean and mean."""
    kind, params = case
    s, t = H.make_pair((2, 4, 30), FP32, seed=34)
    labels = H.make_labels((2, 4), seed=2, frac_ignored=0.3)
    # an int, or a 0-dim tensor as Hugging Face's Trainer passes it
    # (below 1: the divisor is what was given, not clamped to 1 as the kept-row count is)
    n = {"int": 13, "int64_0d": torch.tensor(13), "float32_0d": torch.tensor(13.0),
         "below_1": 0.25}[nib]
    H.check_against_oracle(kind, params, s, t, backend=backend, labels=labels,
                           reduction=reduction, num_items_in_batch=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch_without_labels(backend):
    s, t = H.make_pair((5, 19), FP32, seed=35)
    for reduction in ("batchmean", "mean"):
        H.check_against_oracle("forward_kl", {}, s, t, backend=backend, reduction=reduction,
                               num_items_in_batch=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 19), (2, 0, 19)], ids=["0xV", "2x0xV"])
def test_empty_input(backend, reduction, shape):
    """0 rows: 0 for sum/batchmean/mean (differentiable, zero grads); empty for none."""
    s = torch.zeros(shape, requires_grad=True)
    t = torch.zeros(shape, requires_grad=True)
    out = H.pk().jsd(s, t, reduction=reduction, backend=backend)
    assert out.dtype == torch.float32
    if reduction == "none":
        assert tuple(out.shape) == tuple(shape[:-1])
        return
    assert out.shape == ()
    assert out.item() == 0.0
    out.backward()
    assert s.grad is not None and s.grad.shape == s.shape
    assert t.grad is not None and t.grad.shape == t.shape


# ============================================================================ -inf / NaN / extremes


def _neg_inf_inputs(kind, which, V=33, seed=41):
    """Rows of [5, V] fp32 logits with -inf entries.

    which="matching":  both sides -inf at the same positions (per-row random sets);
    which="student":   -inf in the student only (q = 0 where p > 0) in rows 1..4;
    which="teacher":   -inf in the teacher only (p = 0 where q > 0) in rows 1..4;
    which="both":      -inf in both, at different positions.
    Row 0 never has -inf.
    """
    s, t = H.make_pair((5, V), FP32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for r in range(1, 5):
        pos = torch.randperm(V, generator=g)[: 3 + r]
        if which in ("matching", "student", "both"):
            s[r, pos] = -math.inf
        if which == "matching":
            t[r, pos] = -math.inf
        if which == "teacher":
            t[r, pos] = -math.inf
        if which == "both":
            other = torch.randperm(V, generator=g)[:4]
            other = other[~torch.isin(other, pos)]
            t[r, other] = -math.inf
    if kind == "tvd":
        t = H.avoid_tvd_ties(s, t)
    return s, t


@pytest.mark.parametrize("backend,case", _params(_b(), _cases()))
def test_neg_inf_matching_positions(backend, case):
    """-inf at the same vocab positions on both sides: 0 log 0 = 0, every value finite,
    and the gradients at those positions are 0."""
    kind, params = case
    s, t = _neg_inf_inputs(kind, "matching")
    per_row = ref.row_divergence(s, t, kind, **params)
    assert torch.isfinite(per_row).all()
    out = H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none",
                                 temperature=1.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "backend,case,which",
    _params(_b(), _cases(), ("which", ["student", "teacher", "both"],
                             ["student-only", "teacher-only", "both-differ"])),
)
def test_neg_inf_non_matching_positions(backend, case, which):
    """-inf on one side only: +inf exactly where the oracle is +inf (e.g. forward KL with
    q = 0 < p), finite and equal to the oracle elsewhere (never NaN); gradients compared on
    the rows whose oracle value is finite."""
    kind, params = case
    s, t = _neg_inf_inputs(kind, which)
    H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none",
                           grads_on_finite_rows_only=True)


@pytest.mark.parametrize("backend,case", _params(_b(), _cases()))
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("V", [5, 2100], ids=["V5", "V2100"])  # one L1 block, two (CPU: 2048)
def test_row_of_neg_inf_only_gives_nan(backend, case, side, V):
    """A row that is -inf throughout has no softmax (eager's is NaN): its loss and its
    gradients are NaN as the oracle's are, never a finite value from zero probabilities; the
    other rows are unaffected."""
    kind, params = case
    s, t = H.make_pair((3, V), FP32, seed=52, kind=kind)
    (s if side == "student" else t)[1] = -math.inf
    H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none",
                           grads_on_finite_rows_only=True)
    a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = H.pk().divergence(a, b, kind=kind, reduction="none", backend=backend, **params)
    out.sum().backward()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), out
    # the side without a softmax has no gradient either (eager: NaN throughout the row)
    g = a.grad if side == "student" else b.grad
    assert g[1].isnan().all(), g[1]

@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_kl_is_plus_inf_when_student_has_zero_mass(backend):
    s = torch.tensor([[0.0, -math.inf, 1.0]])
    t = torch.tensor([[0.0, 0.5, 1.0]])
    assert H.pk().forward_kl(s, t, backend=backend).item() == math.inf
    assert H.pk().reverse_kl(t, s, backend=backend).item() == math.inf
    assert math.isfinite(H.pk().reverse_kl(s, t, backend=backend).item())
    assert H.pk().tvd(torch.tensor([[0.0, -math.inf]]), torch.tensor([[-math.inf, 0.0]]),
                      backend=backend).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("backend,case", _params(_b(), _cases()))
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_inputs_give_nan(backend, case, side):
    """A NaN logit makes its row NaN (reduction none) and the batchmean NaN; the other rows
    are unaffected (values and gradients)."""
    kind, params = case
    s, t = H.make_pair((3, 21), FP32, seed=51, kind=kind)
    (s if side == "student" else t)[1, 4] = math.nan
    H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none",
                           grads_on_finite_rows_only=True)
    out = H.call(kind, params, s, t, backend)
    assert torch.isnan(out), out


@pytest.mark.parametrize("backend,case", _params(_b(), _cases()))
def test_large_magnitude_logits(backend, case):
    """Logits of magnitude ~100 (fp32 probabilities underflow): finite, never NaN."""
    kind, params = case
    s, t = H.make_pair((3, 257), FP32, seed=52, kind=kind, scale=40.0)
    H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {})],
                         ids=["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("pattern", ["rising", "late-spike", "leading-inf", "late-nan"])
def test_rows_spanning_blocks_with_changing_max(backend, case, pattern):
    """Rows of several kernel blocks (V = 7000) whose running max changes late: a block far
    above the earlier ones (kernels that take exponentials against the running max must
    redo or rescale them), maxima rising block by block, leading blocks of -inf entries,
    and a NaN in a late block (the row must be NaN, the other rows unaffected)."""
    kind, params = case
    s, t = H.make_pair((3, 7000), FP32, seed=61, kind=kind)
    s, t = s.detach().clone(), t.detach().clone()
    if pattern == "rising":
        ramp = torch.linspace(0.0, 150.0, 7000)
        s += ramp
        t += ramp.flip(0) * 0.5
    elif pattern == "late-spike":
        s[:, 6000] += 180.0
        t[:, 5000] += 120.0
        t[1, 4500] += 300.0
    elif pattern == "leading-inf":
        s[:, :2500] = float("-inf")
        t[:, :4200] = float("-inf")
        t[:, 10] = 3.0  # one finite teacher entry where the student is -inf: forward KL is inf
    else:
        s[1, 6500] = float("nan")
    H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none",
                           grads_on_finite_rows_only=pattern in ("leading-inf", "late-nan"))


@pytest.mark.parametrize("backend,case", _params(_b(), _cases()))
@pytest.mark.parametrize("swap", [False, True], ids=["student-small", "teacher-small"])
def test_extreme_finite_log_ratio(backend, case, swap):
    """A finite log-ratio of 100 nats (q_i / p_i = e^-100, beyond fp32's exp range): the
    oracle is finite, so the loss and both gradients must be finite and match it (this is
    where a kernel that forms p_i / M_i = exp(log p_i - log M_i) overflows when M = q, i.e.
    skew alpha = 0)."""
    kind, params = case
    a = torch.tensor([[0.0, -100.0, 1.0], [2.0, -60.0, -1.0], [0.5, 0.0, -0.5]])
    b = torch.tensor([[0.0, 0.0, 1.0], [2.0, 1.0, -1.0], [0.0, 0.3, 0.1]])
    s, t = (b, a) if swap else (a, b)
    if kind == "tvd":
        t = H.avoid_tvd_ties(s, t)
    H.check_against_oracle(kind, params, s, t, backend=backend, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_inputs_zero_loss(backend):
    s = H.make_logits((3, 50), FP32, seed=53)
    for kind, params in KIND_CASES:
        out = H.call(kind, params, s, s.clone(), backend, reduction="none")
        assert out.abs().max().item() <= 1e-6, (kind, params, out)


# ============================================================================ gradient plumbing


@pytest.mark.parametrize("backend,case", _params(_b(), _cases(SOME_CASES, SOME_IDS)))
@pytest.mark.parametrize("grads", ["student_only", "teacher_only", "none"])
def test_requires_grad_combinations(backend, case, grads):
    """Teacher without grad (offline distillation), student without grad, neither."""
    kind, params = case
    s, t = H.make_pair((2, 3, 45), FP32, seed=61, kind=kind)
    H.check_against_oracle(kind, params, s, t, backend=backend,
                           student_grad=grads == "student_only",
                           teacher_grad=grads == "teacher_only", reduction="batchmean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_backward_grad_output_one(backend):
    s, t = H.make_pair((4, 30), FP32, seed=62)
    for kind, params in SOME_CASES:
        H.check_against_oracle(kind, params, s, t, backend=backend, grad_output=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_used_twice_and_accumulates(backend):
    """The op's output is an ordinary autograd node: a loss combined with other terms and
    backpropagated accumulates into .grad like any torch op."""
    s, t = H.make_pair((3, 30), FP32, seed=63)
    s1 = s.clone().requires_grad_(True)
    loss = 2.0 * H.pk().jsd(s1, t, beta=0.3, backend=backend) + (s1 ** 2).sum() * 0.0
    loss = loss + H.pk().tvd(s1, t, backend=backend)
    loss.backward()
    _, g1, _ = ref.loss_and_grads(s, t, "jsd", beta=0.3, grad_output=2.0)
    _, g2, _ = ref.loss_and_grads(s, t, "tvd")
    unit = (H.oracle_unit(s, t, "jsd", {"beta": 0.3}, grad_output=2.0)
            + H.oracle_unit(s, t, "tvd", {}))
    H.assert_grad_close(s1.grad, g1 + g2, FP32, what="accumulated grad", unit=unit)


# ============================================================================ API-level relations


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_arguments(backend):
    """Defaults: temperature 1, batchmean, jsd beta 0.5, skew alpha 0.1, ignore_index -100."""
    s, t = H.make_pair((2, 3, 29), FP32, seed=71)
    labels = H.make_labels((2, 3), seed=4, frac_ignored=0.3)
    pk = H.pk()
    cases = [
        (pk.forward_kl, "forward_kl", {}),
        (pk.reverse_kl, "reverse_kl", {}),
        (pk.jsd, "jsd", {"beta": 0.5}),
        (pk.skew_forward_kl, "skew_forward_kl", {"alpha": 0.1}),
        (pk.skew_reverse_kl, "skew_reverse_kl", {"alpha": 0.1}),
        (pk.tvd, "tvd", {}),
        (pk.hellinger, "hellinger", {}),
    ]
    for fn, kind, params in cases:
        out = fn(s, t, backend=backend)
        H.assert_loss_close(out, ref.divergence(s, t, kind, **params), FP32, what=kind)
        out = fn(s, t, labels=labels, backend=backend)
        H.assert_loss_close(out, ref.divergence(s, t, kind, **params, labels=labels), FP32,
                            what=f"{kind} labels")
    # pk.divergence defaults to jsd with beta 0.5
    H.assert_loss_close(pk.divergence(s, t, backend=backend),
                        ref.divergence(s, t, "jsd", beta=0.5), FP32, what="divergence()")
    H.assert_loss_close(pk.divergence(s, t, kind="skew_reverse_kl", backend=backend),
                        ref.divergence(s, t, "skew_reverse_kl", alpha=0.1), FP32,
                        what="divergence(skew_reverse_kl)")


def test_auto_backend():
    s, t = H.make_pair((3, 40), FP32, seed=72)
    for kind, params in SOME_CASES:
        H.check_against_oracle(kind, params, s, t, backend="auto")
        H.check_against_oracle(kind, params, s, t, backend=None)  # the default


@pytest.mark.parametrize("backend,case", _params(_b(), _cases()))
def test_divergence_dispatch_matches_functions(backend, case):
    kind, params = case
    s, t = H.make_pair((2, 3, 23), FP32, seed=73, kind=kind)
    a = H.call(kind, params, s, t, backend, via="function", reduction="none", temperature=0.7)
    b = H.call(kind, params, s, t, backend, via="divergence", reduction="none", temperature=0.7)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_divides_logits_no_t_squared(backend):
    s, t = H.make_pair((4, 37), FP32, seed=74)
    pk = H.pk()
    a = pk.forward_kl(s, t, temperature=2.0, backend=backend, reduction="none")
    b = pk.forward_kl(s / 2.0, t / 2.0, temperature=1.0, backend=backend, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_endpoints(backend):
    """jsd(beta=0) is forward_kl and jsd(beta=1) is reverse_kl (not the vanishing JSD);
    skew kinds with alpha=0 are the plain KLs."""
    s, t = H.make_pair((3, 41), FP32, seed=75)
    pk = H.pk()
    kw = dict(backend=backend, reduction="none", temperature=1.3)
    fkl, rkl = pk.forward_kl(s, t, **kw), pk.reverse_kl(s, t, **kw)
    assert (fkl > 1e-2).all() and (rkl > 1e-2).all()
    torch.testing.assert_close(pk.jsd(s, t, beta=0.0, **kw), fkl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pk.jsd(s, t, beta=1.0, **kw), rkl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pk.skew_forward_kl(s, t, alpha=0.0, **kw), fkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pk.skew_reverse_kl(s, t, alpha=0.0, **kw), rkl, rtol=1e-5, atol=1e-6)
    # swapping roles: jsd(s, t, beta) == jsd(t, s, 1 - beta)
    torch.testing.assert_close(pk.jsd(s, t, beta=0.1, **kw), pk.jsd(t, s, beta=0.9, **kw),
                               rtol=1e-5, atol=1e-6)


# ============================================================================ gradcheck / FD


@pytest.mark.parametrize("case", KIND_CASES, ids=KIND_IDS)
def test_gradcheck_torch_backend_float64(case):
    """torch.autograd.gradcheck of the 'torch' backend in float64 (student and teacher),
    with labels, for batchmean and none."""
    kind, params = case
    g = torch.Generator().manual_seed(81)
    s = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    t = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    labels = torch.tensor([[1, -100, 2], [0, 3, -100]])
    for reduction in ("batchmean", "none"):
        def f(a, b):
            return H.call(kind, params, a, b, "torch", labels=labels, reduction=reduction,
                          temperature=0.8)

        assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "backend,case", _params(_b(KERNEL_BACKENDS), _cases())
)
def test_kernel_grad_vs_oracle_central_differences(backend, case):
    """The fp32 kernel's analytic gradient (cpu; triton too when it runs here) against
    float64 central finite differences of the float64 oracle, on a tiny shape.  (The
    kernels take fp32/fp16/bf16 only, so torch.autograd.gradcheck in float64 is not
    possible for them.)"""
    kind, params = case
    s, t = H.make_pair((2, 2, 6), FP32, seed=82, kind=kind, temperature=0.8, scale=1.5)
    labels = torch.tensor([[3, -100], [1, 2]])
    kw = dict(temperature=0.8, labels=labels, reduction="batchmean")
    s1 = s.clone().requires_grad_(True)
    t1 = t.clone().requires_grad_(True)
    out = H.call(kind, params, s1, t1, backend, **kw)
    out.backward(torch.tensor(0.6))
    fs, ft = ref.central_differences(s, t, kind, grad_output=0.6, eps=1e-6, **params, **kw)
    unit = H.oracle_unit(s, t, kind, params, grad_output=0.6, **kw)
    H.assert_grad_close(s1.grad, fs, FP32, what=f"{backend} {kind}{params} student vs FD",
                        unit=unit)
    H.assert_grad_close(t1.grad, ft, FP32, what=f"{backend} {kind}{params} teacher vs FD",
                        unit=unit)


# ============================================================================ GPU

GPU_BACKENDS = ["cuda", "triton"]


def _gpu_backend_or_skip(backend):
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    avail = H.pk().available_backends("cuda")
    assert backend in avail, f"{backend!r} not in available_backends('cuda') = {avail}"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "backend,dtype,case,V",
    _params(("backend", GPU_BACKENDS, GPU_BACKENDS),
            ("dtype", [FP32, FP16, BF16], ["fp32", "fp16", "bf16"]), _cases(),
            ("V", [1, 17, 1271, 32001, 151936], ["V1", "V17", "V1271", "V32001", "V151936"])),
)
def test_gpu_kinds(backend, dtype, case, V):
    _gpu_backend_or_skip(backend)
    kind, params = case
    rows = 6 if V <= 32001 else 2
    s, t = H.make_pair((rows, V), dtype, seed=91 + V, kind=kind, device="cuda")
    H.check_against_oracle(kind, params, s, t, backend=backend, temperature=2.0,
                           reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_layouts(backend, layout):
    _gpu_backend_or_skip(backend)
    sb, tb, tf, lead = _layout(layout)
    s = H.make_logits(sb, BF16, seed=92, device="cuda")
    t = H.make_logits(tb, BF16, seed=93, device="cuda")
    labels = H.make_labels(lead, seed=5, device="cuda")
    H.check_against_oracle("jsd", {"beta": 0.1}, s, t, backend=backend, transform=tf,
                           labels=labels, reduction="batchmean")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", KIND_CASES, ids=KIND_IDS)
@pytest.mark.parametrize("which", ["matching", "student", "teacher", "both"])
def test_gpu_neg_inf(backend, case, which):
    _gpu_backend_or_skip(backend)
    kind, params = case
    s, t = _neg_inf_inputs(kind, which, V=1100)
    H.check_against_oracle(kind, params, s.cuda(), t.cuda(), backend=backend, reduction="none",
                           grads_on_finite_rows_only=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_masking_and_reductions(backend, reduction):
    _gpu_backend_or_skip(backend)
    s, t = H.make_pair((3, 7, 5000), FP16, seed=94, device="cuda")
    labels = H.make_labels((3, 7), seed=6, device="cuda")
    H.check_against_oracle("reverse_kl", {}, s, t, backend=backend, labels=labels,
                           reduction=reduction)
    if reduction in ("batchmean", "mean"):
        H.check_against_oracle("hellinger", {}, s, t, backend=backend, labels=labels,
                               reduction=reduction,
                               num_items_in_batch=torch.tensor(11, device="cuda"))
    all_ign = torch.full((3, 7), -100, device="cuda")
    out = H.pk().tvd(s, t, labels=all_ign, reduction=reduction, backend=backend)
    assert not out.any()


def test_cpu_rows_2_31_elements_apart():
    """64-bit row offsets in the CPU kernels: bf16 rows 2**31 + 7 elements apart in one storage
    (row * stride overflows int32), read in place, with student and teacher gradients (the
    storage is untouched virtual memory; the Triton interpreter is left out, as it may copy it)."""
    H.needs_cpu_extension()
    s = H.rows_far_apart((2, 3000), BF16, seed=301).requires_grad_(True)
    t = H.rows_far_apart((2, 3000), BF16, seed=302).requires_grad_(True)
    go = torch.tensor([0.7, -1.3])
    out = H.pk().jsd(s, t, beta=0.3, reduction="none", backend="cpu")
    out.backward(go)
    loss_ref, gs_ref, gt_ref = ref.loss_and_grads(s, t, "jsd", beta=0.3, reduction="none",
                                                  grad_output=go)
    H.assert_loss_close(out.detach(), loss_ref, BF16, what="rows far apart")
    H.assert_grad_close(s.grad, gs_ref, BF16, what="student grad, rows far apart")
    H.assert_grad_close(t.grad, gt_ref, BF16, what="teacher grad, rows far apart")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_int64_offsets(backend):
    """N * V > 2**31: row * stride overflows int32.  Checks the last rows only."""
    _gpu_backend_or_skip(backend)
    N, V = 16500, 131072
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(95)
    s = torch.randn(N, V, device="cuda", dtype=BF16, generator=g).requires_grad_(True)
    t = torch.randn(N, V, device="cuda", dtype=BF16, generator=g)
    out = H.pk().forward_kl(s, t, reduction="none", backend=backend)
    go = torch.zeros(N, device="cuda")
    go[-3:] = 1.0
    out.backward(go)
    tail_s, tail_t = s.detach()[-3:].cpu(), t[-3:].cpu()
    loss_ref, gs_ref, _ = ref.loss_and_grads(tail_s, tail_t, "forward_kl", reduction="none")
    H.assert_loss_close(out[-3:].detach().cpu(), loss_ref, BF16, what="tail rows")
    H.assert_grad_close(s.grad[-3:].cpu(), gs_ref, BF16, what="tail grads")
    del s, t, out


@pytest.mark.gpu
def test_gpu_backends_agree_with_cpu_on_big_batch():
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    s, t = H.make_pair((64, 8192), BF16, seed=96)
    cpu = H.pk().jsd(s, t, beta=0.3, reduction="none", backend="cpu")
    for backend in H.pk().available_backends("cuda"):
        out = H.pk().jsd(s.cuda(), t.cuda(), beta=0.3, reduction="none", backend=backend)
        torch.testing.assert_close(out.cpu(), cpu, rtol=2e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_tensors_on_a_device_that_is_not_current(backend):
    """Kernels launch on the tensors' device (and its stream), not on the current device."""
    _gpu_backend_or_skip(backend)
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    s, t = H.make_pair((4, 3000), BF16, seed=97, device="cuda:1")
    with torch.cuda.device(0):
        H.check_against_oracle("jsd", {"beta": 0.3}, s, t, backend=backend, reduction="none")


@pytest.mark.gpu
def test_gpu_row_cache_just_under_the_default_shared_memory_limit():
    """The cuda forward parks row chunks in dynamic shared memory. Near 48 KB of it (fp32
    V = 6144, bf16 V = 12288) the launch needs the opt-in because the kernel's static shared
    memory counts too. A fresh process: an earlier call with a bigger V would have raised the
    kernel's limit and hidden a missing opt-in."""
    _gpu_backend_or_skip("cuda")
    script = (
        "import torch, pykernels as pk\n"
        "for dtype, V in ((torch.float32, 6144), (torch.bfloat16, 12288)):\n"
        "    g = torch.Generator(device='cuda').manual_seed(V)\n"
        "    s = torch.randn(4, V, device='cuda', generator=g).to(dtype)\n"
        "    t = torch.randn(4, V, device='cuda', generator=g).to(dtype)\n"
        "    for kind in ('jsd', 'tvd', 'hellinger'):\n"
        "        got = pk.divergence(s, t, kind=kind, reduction='none', backend='cuda')\n"
        "        want = pk.divergence(s, t, kind=kind, reduction='none', backend='torch')\n"
        "        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
