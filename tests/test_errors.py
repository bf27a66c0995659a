"""Bad inputs: every one raises ValueError or TypeError whose message names the argument.

backend="triton" on CPU tensors without TRITON_INTERPRET cannot be tested in-process when
conftest has turned the interpreter on (no GPU); it runs in a subprocess instead.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import helpers as H
import reference as ref

BACKENDS = H.cpu_backends()
HAS_CUDA = torch.cuda.is_available()
BAD = (ValueError, TypeError)
LOGITS = r"student_logits|teacher_logits"

FUNCS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
         "hellinger"]


def pair(shape=(4, 17), dtype=torch.float32):
    return H.make_pair(shape, dtype, seed=0)


def fn(name):
    return getattr(H.pk(), name)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((4, 17), (4, 18)), ((4, 17), (5, 17)), ((2, 3, 17), (6, 17)), ((2, 3, 17), (3, 2, 17)),
     ((2, 3, 17), (2, 3, 16)), ((4, 17), (4, 1))],
    ids=["vocab", "rows", "rank", "leading-perm", "vocab-3d", "vocab-1"],
)
def test_mismatched_shapes(backend, name, s_shape, t_shape):
    s = torch.randn(s_shape)
    t = torch.randn(t_shape)
    with pytest.raises(BAD, match=LOGITS):
        fn(name)(s, t, backend=backend)
    with pytest.raises(BAD, match=LOGITS):
        fn(name)(t, s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool],
                         ids=["int64", "int32", "int8", "bool"])
def test_integer_logits(backend, dtype):
    s, t = pair()
    bad = torch.ones(4, 17, dtype=dtype)
    with pytest.raises(BAD, match="student_logits"):
        H.pk().forward_kl(bad, t, backend=backend)
    with pytest.raises(BAD, match="teacher_logits"):
        H.pk().forward_kl(s, bad, backend=backend)
    with pytest.raises(BAD, match="student_logits"):
        H.pk().divergence(bad, t, kind="tvd", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_logits(backend):
    s, t = pair()
    with pytest.raises(BAD, match="student_logits"):
        H.pk().jsd(s.tolist(), t, backend=backend)
    with pytest.raises(BAD, match="teacher_logits"):
        H.pk().jsd(s, t.numpy(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_logit_dtypes_raise_or_compute_correctly(backend):
    """student fp32 / teacher bf16: not pinned by the spec, so either a clear error naming
    the logits, or a result equal to the oracle on the given values."""
    s, t = pair()
    t = t.to(torch.bfloat16)
    try:
        out = H.pk().jsd(s, t, backend=backend, reduction="none")
    except BAD as exc:
        assert "student_logits" in str(exc) or "teacher_logits" in str(exc), str(exc)
        return
    H.assert_loss_close(out, ref.divergence(s, t, "jsd", reduction="none"), torch.bfloat16)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA for a second device")
@pytest.mark.gpu
def test_logits_on_different_devices():
    s, t = pair()
    for backend in ("auto", "torch"):
        with pytest.raises(BAD, match=LOGITS):
            H.pk().forward_kl(s, t.cuda(), backend=backend)
        with pytest.raises(BAD, match=LOGITS):
            H.pk().forward_kl(s.cuda(), t, backend=backend)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(BAD, match="labels"):
        H.pk().forward_kl(s.cuda(), t.cuda(), labels=labels)


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "logit_shape,label_shape",
    [((4, 17), (5,)), ((4, 17), (4, 1)), ((4, 17), (4, 17)), ((2, 3, 17), (6,)),
     ((2, 3, 17), (3, 2)), ((2, 3, 17), (2, 3, 1)), ((4, 17), ())],
    ids=["N+1", "Nx1", "NxV", "flat-for-3d", "perm", "BxTx1", "scalar"],
)
def test_labels_wrong_shape(backend, logit_shape, label_shape):
    s, t = pair(logit_shape)
    labels = torch.zeros(label_shape, dtype=torch.int64)
    with pytest.raises(BAD, match="labels"):
        H.pk().jsd(s, t, labels=labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool],
                         ids=["float32", "float16", "bool"])
def test_labels_wrong_dtype(backend, dtype):
    s, t = pair()
    labels = torch.zeros(4, dtype=dtype)
    with pytest.raises(BAD, match="labels"):
        H.pk().forward_kl(s, t, labels=labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_not_a_tensor(backend):
    s, t = pair()
    with pytest.raises(BAD, match="labels"):
        H.pk().forward_kl(s, t, labels=[0, 1, 2, 3], backend=backend)


def test_ignore_index_not_an_int():
    s, t = pair()
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(BAD, match="ignore_index"):
        H.pk().forward_kl(s, t, labels=labels, ignore_index="pad")


# ----------------------------------------------------------------------------- scalars


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("temperature", [0.0, -1.0, -0.0, math.inf, -math.inf, math.nan],
                         ids=["0", "-1", "-0", "inf", "-inf", "nan"])
def test_bad_temperature(backend, name, temperature):
    s, t = pair()
    with pytest.raises(BAD, match="temperature"):
        fn(name)(s, t, temperature=temperature, backend=backend)


def test_temperature_wrong_type():
    s, t = pair()
    with pytest.raises(BAD, match="temperature"):
        H.pk().forward_kl(s, t, temperature="2")
    with pytest.raises(BAD, match="temperature"):
        H.pk().forward_kl(s, t, temperature=None)


BAD_UNIT = [-0.1, 1.1, -1e-9, 1.0 + 1e-9, math.nan, math.inf, -math.inf]
BAD_UNIT_IDS = ["-0.1", "1.1", "-1e-9", "1+1e-9", "nan", "inf", "-inf"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BAD_UNIT, ids=BAD_UNIT_IDS)
def test_beta_outside_unit_interval(backend, beta):
    s, t = pair()
    with pytest.raises(BAD, match="beta"):
        H.pk().jsd(s, t, beta=beta, backend=backend)
    with pytest.raises(BAD, match="beta"):
        H.pk().divergence(s, t, kind="jsd", beta=beta, backend=backend)
    with pytest.raises(BAD, match="beta"):
        H.pk().nn.DistillationLoss(kind="jsd", beta=beta, backend=backend)(s, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", BAD_UNIT, ids=BAD_UNIT_IDS)
def test_alpha_outside_unit_interval(backend, name, alpha):
    s, t = pair()
    with pytest.raises(BAD, match="alpha"):
        fn(name)(s, t, alpha=alpha, backend=backend)
    with pytest.raises(BAD, match="alpha"):
        H.pk().divergence(s, t, kind=name, alpha=alpha, backend=backend)
    with pytest.raises(BAD, match="alpha"):
        H.pk().nn.DistillationLoss(kind=name, alpha=alpha, backend=backend)(s, t)


@pytest.mark.parametrize("num_items", [0, -3, "13", math.inf, math.nan],
                         ids=["0", "-3", "str", "inf", "nan"])
def test_bad_num_items_in_batch(num_items):
    s, t = pair()
    with pytest.raises(BAD, match="num_items_in_batch"):
        H.pk().forward_kl(s, t, num_items_in_batch=num_items)


@pytest.mark.parametrize("kind,stray", [("jsd", "alpha"), ("forward_kl", "beta"),
                                        ("skew_reverse_kl", "beta"), ("tvd", "alpha")])
def test_parameter_the_kind_does_not_take(kind, stray):
    """beta for a skew kind, alpha for jsd, either for a kind without a parameter: an error,
    not a silently ignored keyword."""
    s, t = pair()
    with pytest.raises(TypeError, match=stray):
        H.pk().divergence(s, t, kind=kind, **{stray: 0.3})
    with pytest.raises(TypeError, match=stray):
        H.pk().nn.DistillationLoss(kind=kind, **{stray: 0.3})


@pytest.mark.parametrize("kind,params,named", [
    ("jsd", {"beta": 2.0}, "beta"),
    ("skew_forward_kl", {"alpha": -0.5}, "alpha"),
    ("forward_kl", {"temperature": 0.0}, "temperature"),
    ("tvd", {"temperature": math.nan}, "temperature"),
    ("hellinger", {"reduction": "avg"}, "reduction"),
    ("reverse_kl", {"backend": "gpu"}, "backend"),
    ("forward_kl", {"ignore_index": 1.5}, "ignore_index"),
])
def test_distillation_loss_rejects_bad_options_when_built(kind, params, named):
    """A module built with a bad option fails where it is built, not at its first call deep
    inside a training step."""
    with pytest.raises(BAD, match=named):
        H.pk().nn.DistillationLoss(kind=kind, **params)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("kind", ["kl", "JSD", "", "sinkhorn_typo", None],
                         ids=["kl", "JSD", "empty", "typo", "None"])
def test_unknown_kind(kind):
    s, t = pair()
    with pytest.raises(BAD, match="kind"):
        H.pk().divergence(s, t, kind=kind)
    with pytest.raises(BAD, match="kind"):
        H.pk().nn.DistillationLoss(kind=kind)(s, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["avg", "", "Mean", "batch_mean", None],
                         ids=["avg", "empty", "Mean", "batch_mean", "None"])
def test_unknown_reduction(backend, reduction):
    s, t = pair()
    with pytest.raises(BAD, match="reduction"):
        H.pk().hellinger(s, t, reduction=reduction, backend=backend)
    with pytest.raises(BAD, match="reduction"):
        H.pk().nn.DistillationLoss(kind="tvd", reduction=reduction, backend=backend)(s, t)


@pytest.mark.parametrize("backend", ["gpu", "numpy", "", "CPU", "triton_interpret", None],
                         ids=["gpu", "numpy", "empty", "CPU", "triton_interpret", "None"])
def test_unknown_backend(backend):
    s, t = pair()
    with pytest.raises(BAD, match="backend"):
        H.pk().reverse_kl(s, t, backend=backend)


def test_cuda_backend_on_cpu_tensors():
    s, t = pair()
    for name in FUNCS:
        with pytest.raises(BAD, match="backend"):
            fn(name)(s, t, backend="cuda")
    with pytest.raises(BAD, match="backend"):
        H.pk().nn.DistillationLoss(kind="jsd", backend="cuda")(s, t)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cpu_backend_on_cuda_tensors():
    s, t = pair()
    with pytest.raises(BAD, match="backend"):
        H.pk().jsd(s.cuda(), t.cuda(), backend="cpu")


def test_errors_do_not_depend_on_requires_grad():
    s, t = pair()
    s.requires_grad_(True)
    with pytest.raises(BAD, match="temperature"):
        H.pk().jsd(s, t, temperature=0.0)
    with pytest.raises(BAD, match="labels"):
        H.pk().jsd(s, t, labels=torch.zeros(3, dtype=torch.int64))


def test_triton_backend_on_cpu_tensors_without_interpreter():
    """In a fresh interpreter without TRITON_INTERPRET, backend='triton' on CPU tensors is a
    ValueError/TypeError naming the backend (or triton is absent, same error)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = textwrap.dedent(
        """
        import torch, pykernels as pk
        assert "triton" not in pk.available_backends("cpu"), pk.available_backends("cpu")
        s = torch.randn(2, 5); t = torch.randn(2, 5)
        try:
            pk.jsd(s, t, backend="triton")
        except (ValueError, TypeError) as exc:
            assert "backend" in str(exc), str(exc)
            print("OK")
        else:
            raise SystemExit("no error for backend='triton' on CPU tensors")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
