"""RL ops against the float64 oracle in tests/reference_rl.py.

API under test (DESIGN.md "RL quantities"):
    pk.token_logprobs(logits, tokens, temperature=1.0, return_entropy=False, backend="auto")
    pk.entropy(logits, temperature=1.0, backend="auto")
    pk.kl_penalty(logp, ref_logp, mode=...)                      elementwise verl modes
    pk.kl_penalty(policy_logits, ref_logits, mode="full", temperature=..., backend=...)
    pykernels.rl.logprobs_from_logits / entropy_from_logits / selective_log_softmax (drop-ins)
    torch.ops.pykernels.token_logprob_forward(logits, tokens_flat, inv_T, with_entropy)
        -> (logp, entropy, stats)

Every backend that runs CPU tensors here (H.cpu_backends(): "cpu", "torch", and "triton"
through the interpreter when there is no GPU) is compared with the oracle for values and for
the logits gradient through logp only, the entropy only, and both (random grad_outputs).
Tolerances are those of tests/helpers.py (fp32 values rtol 1e-4 / atol 1e-5*max(1,|ref|),
gradients 1e-5*max|ref grad| plus the fp32 log-domain rounding floor U_i; fp16/bf16 against the
oracle on the same low-precision values upcast: values rtol 2e-3, gradients 2e-3 (fp16) /
1e-2 (bf16) times max|ref grad|).  Triton interpreter cases keep V <= 1271 and few rows,
except one single-row V = 32001 case.  GPU cases are marked `gpu`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import helpers as H
import reference_rl as R
from helpers import BF16, FP16, FP32

BACKENDS = H.cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
NON_INTERPRETED = [b for b in BACKENDS if not H.is_interpreted(b)]
HAS_CUDA = torch.cuda.is_available()
BAD = (ValueError, TypeError)
RANGE_MSG = r"(?i)range|out of|bound|\[0"
F64 = torch.float64


def pk():
    return H.pk()


def rl():
    import pykernels.rl

    return pykernels.rl


_params = H.param_grid


# ============================================================================ inputs


def make_tokens(lead_shape, V, seed=0, dtype=torch.int64, logits=None):
    """Random tokens in [0, V); with `logits`, every other row takes its argmax (a sampled
    token of high probability, logp close to 0, as in RL rollouts)."""
    g = torch.Generator().manual_seed(seed + 17)
    tok = torch.randint(0, V, tuple(lead_shape), generator=g)
    if logits is not None and tok.numel():
        am = logits.detach().cpu().float().argmax(-1)
        flat_t, flat_a = tok.reshape(-1), am.reshape(-1)
        flat_t[::2] = flat_a[::2]
        tok = flat_t.reshape(tuple(lead_shape))
    return tok.to(dtype)


def make_logp_pair(shape, seed=0, dtype=FP32, special=True):
    """(logp, ref) token log-probs (<= 0), with entries that hit every clamp of k3 when
    special: x = ref - logp in {25, -25, 3.5, -12.5, 2, -5, 0.5, -0.5, 0.01, -0.01} at the
    start; no ties (|logp - ref| > 1e-3) and no entry within 0.05 of a clamp kink."""
    g = torch.Generator().manual_seed(seed + 5)
    logp = -(torch.rand(shape, generator=g, dtype=F64) * 6.0)
    ref = -(torch.rand(shape, generator=g, dtype=F64) * 6.0)
    if special:
        xs = torch.tensor([25.0, -25.0, 3.5, -12.5, 2.0, -5.0, 0.5, -0.5, 0.01, -0.01], dtype=F64)
        flat_l, flat_r = logp.view(-1), ref.view(-1)
        n = min(len(xs), flat_l.numel())
        base = -torch.linspace(1.0, 4.0, n, dtype=F64)
        # logp = base - 24 for the big positive x so both stay log-probabilities
        flat_l[:n] = torch.where(xs[:n] > 0, base - xs[:n], base)
        flat_r[:n] = torch.where(xs[:n] > 0, base, base + xs[:n])
    logp, ref = logp.to(dtype), ref.to(dtype)
    for _ in range(20):  # rounding to a low-precision dtype can create ties: move them apart
        tie = (ref.to(F64) - logp.to(F64)).abs() <= 1e-3
        if not tie.any():
            break
        ref = torch.where(tie, (ref.to(F64) - 0.375).to(dtype), ref)
    d = ref.to(F64) - logp.to(F64)
    assert (d.abs() > 1e-3).all(), "tie in make_logp_pair (test bug)"
    val = torch.exp(d.clamp(-20, 20)) - d.clamp(-20, 20) - 1
    assert ((d.abs() - 20).abs() > 0.05).all() and ((val - 10).abs() > 0.05).all()
    return logp, ref


# ============================================================================ comparing


def assert_values_close(out, expected, dtype, what, extra=None):
    """H.assert_loss_close, plus an optional per-element absolute allowance `extra`
    (the fp32 rounding of a log-probability of magnitude |z/T| + log V)."""
    if extra is None:
        return H.assert_loss_close(out, expected, dtype, what=what)
    rtol, atol, _, _ = H.TOL[dtype]
    assert out.dtype == torch.float32, f"{what}: dtype {out.dtype}, expected float32"
    assert tuple(out.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}")
    o = out.detach().cpu().to(F64)
    e = expected.detach().cpu().to(F64)
    x = extra.detach().cpu().to(F64).expand_as(e)
    assert torch.equal(torch.isnan(o), torch.isnan(e)), f"{what}: NaN pattern differs"
    inf = torch.isinf(e)
    assert torch.equal(o[inf], e[inf]), f"{what}: inf entries differ"
    fin = torch.isfinite(e)
    of, ef, xf = o[fin], e[fin], x[fin]
    assert torch.isfinite(of).all(), f"{what}: non-finite output where the oracle is finite"
    bound = rtol * ef.abs() + atol * ef.abs().clamp(min=1.0) + xf
    err = (of - ef).abs()
    if (err > bound).any():
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())}/{ef.numel()} out of tolerance; worst got "
            f"{of[i].item()!r} expected {ef[i].item()!r} (err {err[i].item():.3e} > "
            f"{bound[i].item():.3e})")


def assert_dropin_values(out, expected, logits_dtype, what):
    """Drop-ins may return float32 (preferred here) or the logits dtype: compare values with a
    tolerance matching the output's precision."""
    if out.dtype == torch.float32:
        return H.assert_loss_close(out, expected, logits_dtype, what=what)
    assert out.dtype == logits_dtype, f"{what}: output dtype {out.dtype}"
    eps = torch.finfo(out.dtype).eps
    e = expected.detach().cpu().to(F64)
    torch.testing.assert_close(out.detach().cpu().to(F64), e, rtol=2 * eps,
                               atol=2 * eps * max(1.0, e.abs().max().item() if e.numel() else 1.0),
                               msg=lambda m: f"{what}: {m}")


def _identity(x):
    return x


def _scatter_to_leaf(leaf_like, transform, view_values):
    base = torch.zeros_like(leaf_like, dtype=F64)
    transform(base).copy_(view_values)
    return base


OUTPUTS = ["logp", "entropy", "both", "both_logp_only", "both_entropy_only"]


def run_token_op(x, tokens, T, backend, outputs):
    """Call the public API for `outputs`; returns (logp or None, entropy or None, used)
    where used says which outputs get a gradient."""
    kw = {} if backend is None else {"backend": backend}
    if outputs == "logp":
        logp = pk().token_logprobs(x, tokens, temperature=T, **kw)
        return logp, None, (True, False)
    if outputs == "entropy":
        ent = pk().entropy(x, temperature=T, **kw)
        return None, ent, (False, True)
    logp, ent = pk().token_logprobs(x, tokens, temperature=T, return_entropy=True, **kw)
    used = {"both": (True, True), "both_logp_only": (True, False),
            "both_entropy_only": (False, True)}[outputs]
    return logp, ent, used


def check_token_ops(logits, tokens, *, backend, temperature=1.0, outputs="both",
                    transform=None, grad_mask=None, what="", value_extra=False, seed=0):
    """Run pk on transform(logits) and compare values and the logits gradient (w.r.t. the
    untransformed leaf) with the oracle.  grad_mask: bool mask of the leaf's shape selecting
    the gradient entries that are compared (None: all)."""
    tf = _identity if transform is None else transform
    dtype = logits.dtype
    T = temperature
    x = logits.detach().clone().requires_grad_(True)
    view = tf(x)
    logp, ent, used = run_token_op(view, tokens, T, backend, outputs)
    label = f"{what} backend={backend} dtype={dtype} T={T} outputs={outputs}"
    lead = tuple(view.shape[:-1])

    # oracle
    z64 = logits.detach().cpu().to(F64).requires_grad_(True)
    v64 = tf(z64)
    logp64, ent64 = R.token_logprobs_and_entropy(v64, tokens.cpu(), T)

    extra = None
    if value_extra:
        s = v64.detach() / T
        fa = torch.where(torch.isfinite(s), s.abs(), torch.zeros_like(s)).amax(-1)
        extra = 4 * H.EPS32 * (fa + math.log(s.shape[-1]) + 1.0)
    if logp is not None:
        assert tuple(logp.shape) == lead, f"{label}: logp shape {tuple(logp.shape)} != {lead}"
        assert_values_close(logp, logp64, dtype, f"{label} logp", extra)
    if ent is not None:
        assert tuple(ent.shape) == lead, f"{label}: entropy shape {tuple(ent.shape)} != {lead}"
        assert_values_close(ent, ent64, dtype, f"{label} entropy", extra)

    if view.numel() == 0:
        return logp, ent
    g_logp = H.make_grad_output(lead, seed=seed) if used[0] else None
    g_ent = H.make_grad_output(lead, seed=seed + 1) * 0.7 if used[1] else None
    outs, gos, outs64, gos64 = [], [], [], []
    if used[0]:
        outs.append(logp), gos.append(g_logp.to(logp.device))
        outs64.append(logp64), gos64.append(g_logp.to(F64))
    if used[1]:
        outs.append(ent), gos.append(g_ent.to(ent.device))
        outs64.append(ent64), gos64.append(g_ent.to(F64))
    torch.autograd.backward(outs, gos)
    (g_ref,) = torch.autograd.grad(outs64, z64, gos64)

    w = torch.zeros(lead, dtype=F64)
    if g_logp is not None:
        w = w + g_logp.to(F64).abs()
    if g_ent is not None:
        w = w + g_ent.to(F64).abs()
    vd = v64.detach()
    unit = _scatter_to_leaf(z64, tf, H.grad_ulp_unit(vd, vd, T, w))
    if grad_mask is None:
        # rows with a NaN logit: the oracle gradient is NaN there; compare the other rows
        nan_rows = torch.isnan(logp64.detach()) | torch.isnan(ent64.detach())
        if nan_rows.any():
            assert transform is None
            grad_mask = (~nan_rows)[..., None].expand_as(z64)
    H.assert_grad_close(x.grad, g_ref, dtype, what=f"{label} grad", row_mask=grad_mask,
                        unit=unit)
    return logp, ent


# ============================================================================ oracle self-checks


@pytest.mark.parametrize("T", [0.7, 1.0, 2.0])
def test_oracle_autograd_matches_design_backward(T):
    """The oracle's autograd equals DESIGN.md's dz formula, including at -inf logits (masked
    vocabulary, a -inf sampled token, a one-hot row)."""
    z = H.make_logits((5, 11), F64, seed=1)
    z[1, [2, 5]] = -math.inf
    z[2, 3] = -math.inf
    z[3, :] = -math.inf
    z[3, 7] = 0.4
    tok = torch.tensor([0, 4, 3, 7, 10])
    z64 = z.clone().requires_grad_(True)
    logp, h = R.token_logprobs_and_entropy(z64, tok, T)
    assert logp[2].item() == -math.inf and logp[3].item() == 0.0 and h[3].item() == 0.0
    assert torch.isfinite(h).all()
    dl, dh = H.make_grad_output((5,), 1).to(F64), H.make_grad_output((5,), 2).to(F64)
    (g,) = torch.autograd.grad((logp, h), z64, (dl, dh))
    torch.testing.assert_close(g, R.analytic_grad(z, tok, T, dl, dh), rtol=1e-10, atol=1e-12)
    z2 = z.clone().requires_grad_(True)
    (g_h,) = torch.autograd.grad(R.entropy(z2, T), z2, dh)
    torch.testing.assert_close(g_h, R.analytic_grad(z, tok, T, None, dh), rtol=1e-10, atol=1e-12)


def test_oracle_definitions():
    """logp and entropy against direct float64 formulas; V = 1 gives logp = H = 0."""
    z = H.make_logits((3, 9), F64, seed=2)
    tok = torch.tensor([0, 8, 4])
    q = torch.softmax(z / 0.7, -1)
    logp, h = R.token_logprobs_and_entropy(z, tok, 0.7)
    torch.testing.assert_close(logp, torch.log(q[torch.arange(3), tok]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, -(q * q.log()).sum(-1), rtol=1e-12, atol=1e-12)
    l1, h1 = R.token_logprobs_and_entropy(torch.randn(4, 1, dtype=F64), torch.zeros(4, dtype=torch.long))
    assert torch.equal(l1, torch.zeros(4, dtype=F64)) and torch.equal(h1, torch.zeros(4, dtype=F64))
    # drop-in eager formulas agree with the oracle on finite logits
    torch.testing.assert_close(R.entropy_from_logits(z), R.entropy(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.logprobs_from_logits(z, tok), R.token_logprobs(z, tok))
    torch.testing.assert_close(R.selective_log_softmax(z, tok), R.token_logprobs(z, tok))


@pytest.mark.parametrize("mode", R.ELEMENTWISE_MODES)
def test_oracle_kl_penalty_grads(mode):
    logp, ref = make_logp_pair((4, 7), seed=3, dtype=F64)
    a = logp.clone().requires_grad_(True)
    b = ref.clone().requires_grad_(True)
    go = H.make_grad_output((4, 7), 3).to(F64)
    out = R.kl_penalty(a, b, mode)
    ga, gb = torch.autograd.grad(out, (a, b), go)
    ea, eb = R.kl_penalty_grad(logp, ref, mode, go)
    torch.testing.assert_close(ga, ea, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, eb, rtol=1e-10, atol=1e-12)
    if mode.endswith("+"):
        torch.testing.assert_close(out.detach(), R.kl_penalty(logp, ref, mode[:-1]), rtol=0, atol=0)


def test_oracle_full_kl():
    s = H.make_logits((4, 13), F64, seed=4)
    t = H.make_logits((4, 13), F64, seed=5)
    s[1, 3] = t[1, 3] = -math.inf
    for T in (0.7, 2.0):
        q = torch.softmax(s / T, -1)
        p = torch.softmax(t / T, -1)
        terms = torch.where(q > 0, q * (torch.log_softmax(s / T, -1) - torch.log_softmax(t / T, -1)),
                            torch.zeros_like(q))
        torch.testing.assert_close(R.full_kl(s, t, T), terms.sum(-1), rtol=1e-12, atol=1e-12)
        a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        go = H.make_grad_output((4,), 4).to(F64)
        ga, gb = torch.autograd.grad(R.full_kl(a, b, T), (a, b), go)
        ea, eb = R.full_kl_analytic_grads(s, t, T)
        torch.testing.assert_close(ga, ea * go[:, None], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, eb * go[:, None], rtol=1e-10, atol=1e-12)
        del p
    t2 = t.clone()
    t2[2, 0] = -math.inf
    assert R.full_kl(s, t2)[2].item() == math.inf


# ============================================================================ token log-probs / entropy


TEMPS = [0.7, 1.0, 2.0]
VOCABS = [1, 17, 1271, 32001]


@pytest.mark.parametrize(
    "backend,T,V,outputs",
    _params((BACKENDS, BACKENDS), (TEMPS, ["T0.7", "T1", "T2"]),
            (VOCABS, [f"V{v}" for v in VOCABS]), (OUTPUTS, OUTPUTS),
            skip=lambda b, T, V, o: V > 1271 and (H.is_interpreted(b) or o.startswith("both_"))),
)
def test_token_ops_fp32(backend, T, V, outputs):
    """[N, V] fp32, int64 tokens (half of them the row's argmax), every temperature and vocab
    size, gradients through logp only, entropy only, or both (V = 32001: not the
    both-but-one-unused variants, to save time)."""
    rows = 2 if V > 2000 else 5
    z = H.make_logits((rows, V), FP32, seed=V + int(10 * T))
    tok = make_tokens((rows,), V, seed=V, logits=z)
    check_token_ops(z, tok, backend=backend, temperature=T, outputs=outputs, seed=V)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run CPU tensors here")
def test_triton_interpreter_large_vocab_single_row():
    z = H.make_logits((1, 32001), FP32, seed=6)
    tok = torch.tensor([31999])
    check_token_ops(z, tok, backend="triton", temperature=2.0, outputs="both")


@pytest.mark.parametrize(
    "backend,dtype,V,outputs",
    _params((BACKENDS, BACKENDS), ([FP16, BF16], ["fp16", "bf16"]), ([17, 1271], ["V17", "V1271"]),
            (["logp", "entropy", "both"], ["logp", "entropy", "both"])),
)
def test_token_ops_low_precision(backend, dtype, V, outputs):
    """fp16/bf16 [B, T, V]: outputs fp32, the gradient in the logits dtype; the oracle runs on
    the same low-precision values upcast."""
    T = 0.7 if V == 17 else 1.0
    z = H.make_logits((2, 3, V), dtype, seed=11 + V)
    tok = make_tokens((2, 3), V, seed=12, logits=z)
    check_token_ops(z, tok, backend=backend, temperature=T, outputs=outputs, seed=2)


@pytest.mark.parametrize(
    "backend,dtype", _params((NON_INTERPRETED, NON_INTERPRETED), ([FP32, BF16, FP16], ["fp32", "bf16", "fp16"])))
def test_token_ops_large_vocab_3d(backend, dtype):
    z = H.make_logits((2, 2, 32001), dtype, seed=7)
    tok = make_tokens((2, 2), 32001, seed=7, logits=z)
    check_token_ops(z, tok, backend=backend, temperature=0.7, outputs="both", seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tok_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("outputs", ["logp", "both"])
def test_token_dtypes(backend, tok_dtype, outputs):
    """int32 and int64 tokens give the oracle's values (and the same as each other)."""
    z = H.make_logits((3, 4, 50), FP32, seed=8)
    tok = make_tokens((3, 4), 50, seed=8, dtype=tok_dtype, logits=z)
    tok[0, 0] = 0
    tok[0, 1] = 49
    logp, _ = check_token_ops(z, tok, backend=backend, temperature=1.3, outputs=outputs)
    other = pk().token_logprobs(z, tok.to(torch.int64 if tok_dtype == torch.int32 else torch.int32),
                                temperature=1.3, backend=backend)
    torch.testing.assert_close(logp.detach(), other, rtol=1e-6, atol=1e-7)


V_LAYOUT = 77


def _layout(name):
    """(logits base shape, transform of the logits, tokens of the transformed leading shape)."""
    V = V_LAYOUT
    g = torch.Generator().manual_seed(9)
    if name == "2d":
        return (6, V), None, torch.randint(0, V, (6,), generator=g)
    if name == "3d":
        return (2, 3, V), None, torch.randint(0, V, (2, 3), generator=g)
    if name == "4d":
        return (2, 2, 2, V), None, torch.randint(0, V, (2, 2, 2), generator=g)
    if name == "causal_sliced":  # logits[:, :-1] with tokens[:, 1:] (both non-contiguous)
        ids = torch.randint(0, V, (2, 6), generator=g)
        return (2, 6, V), (lambda x: x[:, :-1]), ids[:, 1:]
    if name == "row_padded":  # row stride V + 7
        return (5, V + 7), (lambda x: x[:, :V]), torch.randint(0, V, (5,), generator=g)
    if name == "vocab_strided":  # stride(-1) != 1
        return (V, 5), (lambda x: x.t()), torch.randint(0, V, (5,), generator=g)
    if name == "batch1_3d":
        return (1, 4, V), None, torch.randint(0, V, (1, 4), generator=g)
    if name == "expanded_tokens":  # tokens with a zero stride
        return (3, 4, V), None, torch.randint(0, V, (4,), generator=g).expand(3, 4)
    raise ValueError(name)


LAYOUTS = ["2d", "3d", "4d", "causal_sliced", "row_padded", "vocab_strided", "batch1_3d",
           "expanded_tokens"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])
def test_layouts(backend, layout, outputs):
    """[N, V], [B, T, V], 4-d, the causal-LM pattern logits[:, :-1] / tokens[:, 1:], padded
    rows, a vocab dim with stride != 1, expanded tokens.  Gradients on the base tensor (zero
    outside the view)."""
    shape, tf, tok = _layout(layout)
    z = H.make_logits(shape, FP32, seed=10)
    if layout == "causal_sliced":
        assert not tok.is_contiguous()
    check_token_ops(z, tok, backend=backend, temperature=1.5, outputs=outputs, transform=tf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_causal_sliced_int32_low_precision(backend, dtype):
    z = H.make_logits((2, 7, 300), dtype, seed=11)
    ids = make_tokens((2, 7), 300, seed=11, dtype=torch.int32)
    check_token_ops(z, ids[:, 1:], backend=backend, temperature=0.7, outputs="both",
                    transform=lambda x: x[:, :-1])


# ============================================================================ -inf / NaN / extremes


def _masked_inputs(V, at_token, seed=41):
    """[6, V] fp32 logits with -inf entries and tokens:
    row 0 no -inf; row 1 a few -inf; row 2 a few -inf (token on one of them if at_token);
    row 3 a single finite entry, the token on it (logp = 0, H = 0); row 4 top-k style (4 finite
    entries; token on a -inf entry if at_token); row 5 the leading half of the vocab -inf.
    Returns (logits, tokens, rows whose token sits on a -inf logit)."""
    z = H.make_logits((6, V), FP32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(6, dtype=torch.int64)
    perm = lambda: torch.randperm(V, generator=g)  # noqa: E731
    p = perm()
    z[1, p[:4]] = -math.inf
    tok[1] = p[10]
    p = perm()
    z[2, p[:5]] = -math.inf
    tok[2] = p[0] if at_token else p[7]
    k = int(perm()[0])
    z[3, :] = -math.inf
    z[3, k] = 1.7
    tok[3] = k
    p = perm()
    z[4, p[4:]] = -math.inf
    tok[4] = p[20] if at_token else p[2]
    z[5, : V // 2] = -math.inf
    tok[5] = V - 3
    tok[0] = int(perm()[0])
    inf_rows = [2, 4] if at_token else []
    return z, tok, inf_rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [33, 1271])
@pytest.mark.parametrize("at_token", [False, True], ids=["token-finite", "token-on-neg-inf"])
@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])
def test_neg_inf_logits(backend, V, at_token, outputs):
    """Masked vocabulary (-inf logits) follows the eager definition: 0 log 0 = 0, entropy and
    gradients finite; a sampled token whose logit is -inf gives logp = -inf exactly.  The
    gradient entry of such a token is deliberately not compared (only its row's other
    entries, which must be finite and match the oracle)."""
    z, tok, inf_rows = _masked_inputs(V, at_token)
    mask = torch.ones_like(z, dtype=torch.bool)
    for r in inf_rows:
        mask[r, tok[r]] = False
    logp, ent = check_token_ops(z, tok, backend=backend, temperature=1.3, outputs=outputs,
                                grad_mask=mask)
    if logp is not None:
        for r in inf_rows:
            assert logp[r].item() == -math.inf, (r, logp[r].item())
        assert logp[3].item() == pytest.approx(0.0, abs=1e-6)
    if ent is not None:
        assert torch.isfinite(ent).all(), ent
        assert ent[3].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_sampled_token_grad_is_finite(backend):
    """Backward through logp = -inf (a masked sampled token): the gradient is finite on the
    other entries of the row (eager: dlogp * (0 - q_i) / T), and the other rows are
    unaffected."""
    z, tok, inf_rows = _masked_inputs(33, True)
    x = z.clone().requires_grad_(True)
    logp, ent = pk().token_logprobs(x, tok, temperature=1.0, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    mask = torch.ones_like(z, dtype=torch.bool)
    for r in inf_rows:
        mask[r, tok[r]] = False
    assert torch.isfinite(x.grad[mask]).all(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])
def test_nan_logits_stay_nan(backend, outputs):
    """A NaN logit makes its row's logp and entropy NaN; the other rows are unaffected
    (values and gradients)."""
    z = H.make_logits((3, 21), FP32, seed=51)
    z[1, 4] = math.nan
    tok = torch.tensor([3, 9, 20])
    check_token_ops(z, tok, backend=backend, temperature=1.0, outputs=outputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0.7, 1.0])
def test_large_magnitude_logits(backend, T):
    """|z| ~ 100 (fp32 probabilities underflow): finite, never NaN; values within the fp32
    rounding of a log-probability of magnitude max|z/T| + log V."""
    z = H.make_logits((3, 257), FP32, seed=52, scale=40.0)
    tok = make_tokens((3,), 257, seed=52, logits=z)
    check_token_ops(z, tok, backend=backend, temperature=T, outputs="both", value_extra=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_late_max(backend):
    """V = 5000 rows whose max arrives late (several kernel blocks; running-max rescaling)."""
    z = H.make_logits((3, 5000), FP32, seed=53)
    z[0] += torch.linspace(0.0, 60.0, 5000)
    z[1, 4900] += 40.0
    z[2, :2000] = -math.inf
    tok = torch.tensor([4999, 4900, 100 + 2000])
    check_token_ops(z, tok, backend=backend, temperature=1.0, outputs="both",
                    value_extra=True)


# ============================================================================ API relations


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_entropy_consistency(backend):
    """logp is the same with and without return_entropy; the returned entropy equals
    pk.entropy."""
    z = H.make_logits((2, 3, 40), FP32, seed=54)
    tok = make_tokens((2, 3), 40, seed=54)
    a = pk().token_logprobs(z, tok, temperature=0.9, backend=backend)
    b, h = pk().token_logprobs(z, tok, temperature=0.9, return_entropy=True, backend=backend)
    h2 = pk().entropy(z, temperature=0.9, backend=backend)
    assert a.dtype == b.dtype == h.dtype == h2.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, h2, rtol=1e-6, atol=1e-6)


def test_defaults_and_auto_backend():
    """Default temperature 1 and backend "auto" (also backend omitted)."""
    z = H.make_logits((4, 30), FP32, seed=55)
    tok = make_tokens((4,), 30, seed=55, logits=z)
    logp64, ent64 = R.token_logprobs_and_entropy(z, tok, 1.0)
    H.assert_loss_close(pk().token_logprobs(z, tok), logp64, FP32, what="default logp")
    H.assert_loss_close(pk().entropy(z), ent64, FP32, what="default entropy")
    out = pk().token_logprobs(z, tok, return_entropy=True)
    assert isinstance(out, tuple) and len(out) == 2
    for backend in (None, "auto"):
        check_token_ops(z, tok, backend=backend, temperature=1.0, outputs="both")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 19), (2, 0, 19)], ids=["0xV", "2x0xV"])
def test_empty_input(backend, shape):
    """0 rows: empty fp32 outputs of the leading shape; backward gives zero gradients."""
    z = torch.zeros(shape, requires_grad=True)
    tok = torch.zeros(shape[:-1], dtype=torch.int64)
    logp = pk().token_logprobs(z, tok, backend=backend)
    logp2, ent = pk().token_logprobs(z, tok, return_entropy=True, backend=backend)
    ent2 = pk().entropy(z, backend=backend)
    for o in (logp, logp2, ent, ent2):
        assert o.dtype == torch.float32 and tuple(o.shape) == tuple(shape[:-1]), (o.dtype, o.shape)
    (logp.sum() + logp2.sum() + ent.sum() + ent2.sum()).backward()
    assert z.grad is not None and z.grad.shape == z.shape and not z.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_logits(backend):
    """logits [V] with a 0-dim token: leading shape (), 0-dim outputs."""
    z = H.make_logits((23,), FP32, seed=56)
    tok = torch.tensor(5)
    check_token_ops(z, tok, backend=backend, temperature=1.0, outputs="both")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_retain_graph(backend):
    """A second backward through the same graph with another upstream gradient."""
    z = H.make_logits((3, 2, 23), FP32, seed=57).requires_grad_(True)
    tok = make_tokens((3, 2), 23, seed=57)
    logp, ent = pk().token_logprobs(z, tok, temperature=1.1, return_entropy=True, backend=backend)
    w1, w2 = H.make_grad_output((3, 2), 1), H.make_grad_output((3, 2), 2)
    g1 = torch.autograd.grad((logp, ent), z, (w1, w2), retain_graph=True)[0]
    g2 = torch.autograd.grad((logp, ent), z, (2.5 * w2, -w1), retain_graph=True)[0]
    z64 = z.detach().to(F64).requires_grad_(True)
    l64, h64 = R.token_logprobs_and_entropy(z64, tok, 1.1)
    r1 = torch.autograd.grad((l64, h64), z64, (w1.to(F64), w2.to(F64)), retain_graph=True)[0]
    r2 = torch.autograd.grad((l64, h64), z64, (2.5 * w2.to(F64), -w1.to(F64)))[0]
    H.assert_grad_close(g1, r1, FP32, what="first backward",
                        unit=H.grad_ulp_unit(z64, z64, 1.1, w1.abs() + w2.abs()))
    H.assert_grad_close(g2, r2, FP32, what="second backward",
                        unit=H.grad_ulp_unit(z64, z64, 1.1, 2.5 * w2.abs() + w1.abs()))


# ============================================================================ kl_penalty (elementwise)


@pytest.mark.parametrize("mode", R.ELEMENTWISE_MODES)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("grads", ["both", "logp_only"])
def test_kl_penalty_elementwise(mode, dtype, grads):
    """Every verl mode (and its '+' straight-through variant): fp32 value of the same shape,
    gradients w.r.t. logp and ref (in their dtypes) against the oracle, with clamps hit."""
    logp, ref = make_logp_pair((4, 9), seed=1, dtype=dtype)
    a = logp.clone().requires_grad_(True)
    b = ref.clone().requires_grad_(grads == "both")
    out = pk().kl_penalty(a, b, mode=mode)
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == logp.shape
    expected = R.kl_penalty(logp, ref, mode)
    # computed in fp32 on the given (upcast) values: fp32 tolerances
    H.assert_loss_close(out, expected, FP32, what=f"kl_penalty {mode} {dtype} value")
    go = H.make_grad_output((4, 9), 5)
    out.backward(go)
    ga, gb = R.kl_penalty_grad(logp, ref, mode, go)
    H.assert_grad_close(a.grad, ga, dtype, what=f"kl_penalty {mode} {dtype} d/dlogp")
    if grads == "both":
        H.assert_grad_close(b.grad, gb, dtype, what=f"kl_penalty {mode} {dtype} d/dref")
    else:
        assert b.grad is None


@pytest.mark.parametrize("base", R.ELEMENTWISE_BASE_MODES)
def test_kl_penalty_plus_is_straight_through(base):
    """mode+ has the value of mode and the gradient of k2."""
    logp, ref = make_logp_pair((3, 11), seed=2)
    vals, grads = {}, {}
    for m in (base, base + "+", "k2"):
        a = logp.clone().requires_grad_(True)
        b = ref.clone().requires_grad_(True)
        out = pk().kl_penalty(a, b, mode=m)
        out.sum().backward()
        vals[m], grads[m] = out.detach(), (a.grad, b.grad)
    torch.testing.assert_close(vals[base + "+"], vals[base], rtol=1e-6, atol=1e-7)
    for x, y in zip(grads[base + "+"], grads["k2"]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_kl_penalty_aliases():
    logp, ref = make_logp_pair((2, 10), seed=3)
    for x, y in [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3"), ("kl+", "k1+"),
                 ("mse+", "k2+"), ("low_var_kl+", "k3+")]:
        torch.testing.assert_close(pk().kl_penalty(logp, ref, mode=x),
                                   pk().kl_penalty(logp, ref, mode=y), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["k1", "k3", "k3+", "abs"])
def test_kl_penalty_mixed_dtypes_and_shapes(mode):
    """logp fp32 with ref bf16 (and the reverse), 1-d and 3-d shapes: fp32 output, gradients
    in each input's dtype."""
    for shape in [(13,), (2, 3, 5)]:
        logp, ref = make_logp_pair(shape, seed=4)
        for da, db in [(FP32, BF16), (BF16, FP32)]:
            la, rb = logp.to(da), ref.to(db)
            a = la.clone().requires_grad_(True)
            b = rb.clone().requires_grad_(True)
            out = pk().kl_penalty(a, b, mode=mode)
            assert out.dtype == torch.float32 and out.shape == la.shape
            H.assert_loss_close(out, R.kl_penalty(la, rb, mode), FP32,
                                what=f"{mode} {da}/{db} {shape}")
            go = H.make_grad_output(shape, 6)
            out.backward(go)
            ga, gb = R.kl_penalty_grad(la, rb, mode, go)
            H.assert_grad_close(a.grad, ga, da, what=f"{mode} d/dlogp {da}")
            H.assert_grad_close(b.grad, gb, db, what=f"{mode} d/dref {db}")


@pytest.mark.parametrize("mode", ["k1", "k2", "k3", "abs", "k3+"])
def test_kl_penalty_non_contiguous_and_empty(mode):
    logp, ref = make_logp_pair((6, 8), seed=7)
    a, b = logp.t(), ref[:, ::1].t()
    H.assert_loss_close(pk().kl_penalty(a, b, mode=mode), R.kl_penalty(a, b, mode), FP32,
                        what=f"{mode} transposed")
    e = torch.zeros(0, 5, requires_grad=True)
    out = pk().kl_penalty(e, torch.zeros(0, 5), mode=mode)
    assert out.shape == (0, 5) and out.dtype == torch.float32
    out.sum().backward()
    assert e.grad is not None and e.grad.shape == e.shape


@pytest.mark.parametrize("mode", ["k4", "", "kl++", "K3x", "full+", "reverse_kl"])
def test_kl_penalty_unknown_mode(mode):
    logp, ref = make_logp_pair((2, 3), seed=8)
    with pytest.raises(ValueError, match="mode"):
        pk().kl_penalty(logp, ref, mode=mode)


def test_kl_penalty_end_to_end_rl_loss():
    """A verl-style loss: -A * logp + beta * k3(logp, ref_logp) - c * H, with logp and H from
    the policy logits and ref_logp from frozen reference logits; gradient to the policy logits
    against the oracle."""
    B, Tn, V = 2, 5, 97
    pol = H.make_logits((B, Tn, V), FP32, seed=60)
    refz = H.make_logits((B, Tn, V), FP32, seed=61)
    tok = make_tokens((B, Tn), V, seed=60, logits=pol)
    adv = H.make_grad_output((B, Tn), 60)
    for backend in BACKENDS:
        x = pol.clone().requires_grad_(True)
        logp, ent = pk().token_logprobs(x, tok, temperature=0.9, return_entropy=True,
                                        backend=backend)
        with torch.no_grad():
            ref_logp = pk().token_logprobs(refz, tok, temperature=0.9, backend=backend)
        loss = (-adv * logp + 0.1 * pk().kl_penalty(logp, ref_logp, mode="k3")
                - 0.01 * ent).mean()
        loss.backward()
        x64 = pol.to(F64).requires_grad_(True)
        l64, h64 = R.token_logprobs_and_entropy(x64, tok, 0.9)
        r64 = R.token_logprobs(refz, tok, 0.9)
        loss64 = (-adv.to(F64) * l64 + 0.1 * R.kl_penalty(l64, r64, "k3") - 0.01 * h64).mean()
        H.assert_loss_close(loss.detach(), loss64.detach(), FP32, what=f"{backend} rl loss")
        (g64,) = torch.autograd.grad(loss64, x64)
        w = torch.full((B, Tn), 2.0 / (B * Tn), dtype=F64)
        H.assert_grad_close(x.grad, g64, FP32, what=f"{backend} rl loss grad",
                            unit=H.grad_ulp_unit(x64, x64, 0.9, w))


# ============================================================================ kl_penalty "full"


def check_full(policy, ref, *, backend, temperature=1.0, ref_grad=True, transform=None,
               finite_rows_only=False, what=""):
    tf = _identity if transform is None else transform
    dtype = policy.dtype
    a = policy.detach().clone().requires_grad_(True)
    b = ref.detach().clone().requires_grad_(ref_grad)
    kw = {} if backend is None else {"backend": backend}
    out = pk().kl_penalty(tf(a), tf(b), mode="full", temperature=temperature, **kw)
    a64 = policy.detach().cpu().to(F64).requires_grad_(True)
    b64 = ref.detach().cpu().to(F64).requires_grad_(True)
    va, vb = tf(a64), tf(b64)
    exp = R.full_kl(va, vb, temperature)
    label = f"{what} full backend={backend} dtype={dtype} T={temperature}"
    assert tuple(out.shape) == tuple(va.shape[:-1]), (out.shape, va.shape)
    H.assert_loss_close(out, exp, dtype, what=f"{label} value")
    if out.numel() == 0:
        return out
    go = H.make_grad_output(tuple(out.shape), 13)
    out.backward(go)
    ga, gb = torch.autograd.grad(exp, (a64, b64), go.to(F64), allow_unused=True)
    unit_view = H.grad_ulp_unit(va.detach(), vb.detach(), temperature, go.to(F64))
    ua = _scatter_to_leaf(a64, tf, unit_view)
    mask = None
    if finite_rows_only:
        assert transform is None
        mask = torch.isfinite(exp.detach())
    H.assert_grad_close(a.grad, ga, dtype, what=f"{label} d/dpolicy", row_mask=mask, unit=ua)
    if ref_grad:
        H.assert_grad_close(b.grad, gb, dtype, what=f"{label} d/dref", row_mask=mask, unit=ua)
    else:
        assert b.grad is None
    return out


@pytest.mark.parametrize(
    "backend,T,V",
    _params((BACKENDS, BACKENDS), (TEMPS, ["T0.7", "T1", "T2"]), (VOCABS, [f"V{v}" for v in VOCABS]),
            skip=lambda b, T, V: V > 1271 and (H.is_interpreted(b) or T != 0.7)),
)
@pytest.mark.parametrize("ref_grad", [False, True], ids=["policy-grad", "both-grads"])
def test_kl_full_fp32(backend, T, V, ref_grad):
    """Per-token KL(pi || pi_ref) from the two logits tensors; gradient to the policy logits,
    and to the ref logits when they require grad (V = 32001 at T = 0.7 only)."""
    rows = 2 if V > 2000 else 4
    s = H.make_logits((rows, V), FP32, seed=70 + V)
    t = H.make_logits((rows, V), FP32, seed=71 + V)
    check_full(s, t, backend=backend, temperature=T, ref_grad=ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_kl_full_low_precision(backend, dtype):
    s = H.make_logits((2, 3, 300), dtype, seed=72)
    t = H.make_logits((2, 3, 300), dtype, seed=73)
    check_full(s, t, backend=backend, temperature=1.0, ref_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_full_causal_sliced(backend):
    s = H.make_logits((2, 6, 45), FP32, seed=74)
    t = H.make_logits((2, 6, 45), FP32, seed=75)
    check_full(s, t, backend=backend, temperature=0.7, transform=lambda x: x[:, :-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["matching", "policy_only", "ref_only"])
def test_kl_full_neg_inf(backend, which):
    """-inf at the same positions: finite; -inf in the policy only: finite (0 log 0);
    -inf in the reference only: +inf where pi > 0 = pi_ref (gradients on finite rows)."""
    V = 33
    s = H.make_logits((5, V), FP32, seed=76)
    t = H.make_logits((5, V), FP32, seed=77)
    g = torch.Generator().manual_seed(76)
    for r in range(1, 5):
        pos = torch.randperm(V, generator=g)[: 2 + r]
        if which in ("matching", "policy_only"):
            s[r, pos] = -math.inf
        if which in ("matching", "ref_only"):
            t[r, pos] = -math.inf
    out = check_full(s, t, backend=backend, temperature=1.2, finite_rows_only=True)
    if which == "ref_only":
        assert (out[1:] == math.inf).all(), out
    else:
        assert torch.isfinite(out).all(), out


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_full_identical_is_zero_and_empty(backend):
    s = H.make_logits((3, 50), FP32, seed=78)
    out = pk().kl_penalty(s, s.clone(), mode="full", backend=backend)
    assert out.abs().max().item() <= 1e-6, out
    e = torch.zeros(0, 7, requires_grad=True)
    out = pk().kl_penalty(e, torch.zeros(0, 7), mode="full", backend=backend)
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert e.grad is not None and not e.grad.any()


def test_kl_full_auto_backend():
    s = H.make_logits((3, 40), FP32, seed=79)
    t = H.make_logits((3, 40), FP32, seed=80)
    check_full(s, t, backend=None, temperature=1.0)
    check_full(s, t, backend="auto", temperature=2.0)


# ============================================================================ drop-ins


@pytest.fixture
def force_backend(monkeypatch, request):
    """Run the drop-ins (no backend argument) on a given backend through PYKERNELS_BACKEND."""
    backend = request.param
    monkeypatch.setenv("PYKERNELS_BACKEND", backend)
    return backend


DROPIN_SHAPES = [((5, 17), "2d"), ((2, 3, 1271), "3d")]


@pytest.mark.parametrize("force_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [s for s, _ in DROPIN_SHAPES], ids=[i for _, i in DROPIN_SHAPES])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lab_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_dropin_logprobs_from_logits(force_backend, shape, dtype, lab_dtype):
    z = H.make_logits(shape, dtype, seed=90)
    labels = make_tokens(shape[:-1], shape[-1], seed=90, dtype=lab_dtype, logits=z)
    x = z.clone().requires_grad_(True)
    out = rl().logprobs_from_logits(x, labels)
    assert tuple(out.shape) == tuple(shape[:-1])
    z64 = z.to(F64).requires_grad_(True)
    exp = R.logprobs_from_logits(z64, labels)
    assert_dropin_values(out, exp, dtype, f"logprobs_from_logits {force_backend}")
    go = H.make_grad_output(tuple(out.shape), 91)
    out.backward(go.to(out.dtype))
    (g64,) = torch.autograd.grad(exp, z64, go.to(F64))
    H.assert_grad_close(x.grad, g64, dtype, what=f"logprobs_from_logits grad {force_backend}",
                        unit=H.grad_ulp_unit(z64, z64, 1.0, go.to(F64)))


@pytest.mark.parametrize("force_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", [s for s, _ in DROPIN_SHAPES], ids=[i for _, i in DROPIN_SHAPES])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_dropin_entropy_from_logits(force_backend, shape, dtype):
    z = H.make_logits(shape, dtype, seed=92)
    x = z.clone().requires_grad_(True)
    out = rl().entropy_from_logits(x)
    assert tuple(out.shape) == tuple(shape[:-1])
    z64 = z.to(F64).requires_grad_(True)
    exp = R.entropy_from_logits(z64)
    assert_dropin_values(out, exp, dtype, f"entropy_from_logits {force_backend}")
    go = H.make_grad_output(tuple(out.shape), 93)
    out.backward(go.to(out.dtype))
    (g64,) = torch.autograd.grad(exp, z64, go.to(F64))
    H.assert_grad_close(x.grad, g64, dtype, what=f"entropy_from_logits grad {force_backend}",
                        unit=H.grad_ulp_unit(z64, z64, 1.0, go.to(F64)))


@pytest.mark.parametrize("force_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("index_form", ["rows", "K1", "K3", "K8"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_dropin_selective_log_softmax(force_backend, index_form, dtype, idx_dtype):
    """TRL: index [...] (one token per row) -> [...]; index [..., K] -> [..., K] (repeated
    indices accumulate their gradients)."""
    shape = (2, 3, 61)
    z = H.make_logits(shape, dtype, seed=94)
    g = torch.Generator().manual_seed(94)
    if index_form == "rows":
        index = torch.randint(0, 61, (2, 3), generator=g)
    else:
        K = int(index_form[1:])
        index = torch.randint(0, 61, (2, 3, K), generator=g)
        if K > 1:
            index[0, 0, 2] = index[0, 0, 0]  # a repeated index
    index = index.to(idx_dtype)
    x = z.clone().requires_grad_(True)
    out = rl().selective_log_softmax(x, index)
    assert tuple(out.shape) == tuple(index.shape), (out.shape, index.shape)
    z64 = z.to(F64).requires_grad_(True)
    exp = R.selective_log_softmax(z64, index)
    assert_dropin_values(out, exp, dtype, f"selective_log_softmax {index_form} {force_backend}")
    go = H.make_grad_output(tuple(out.shape), 95)
    out.backward(go.to(out.dtype))
    (g64,) = torch.autograd.grad(exp, z64, go.to(F64))
    w = go.to(F64).abs()
    if w.dim() == 3:
        w = w.sum(-1)
    H.assert_grad_close(x.grad, g64, dtype, what=f"selective_log_softmax grad {index_form}",
                        unit=H.grad_ulp_unit(z64, z64, 1.0, w))



@pytest.mark.parametrize("force_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("index_form", ["rows", "K1", "K3"])
@pytest.mark.parametrize("V", [1, 40])
def test_selective_log_softmax_grad_at_tokens_is_rounded_once(force_backend, index_form, V):
    """bf16, rows peaked on their token (q_y near 1; V = 1: exactly 1): the gradient there,
    g (1 - q_y), is small next to g. Each element must be the float64 value rounded once to
    bf16 (relative error 2^-8) up to fp32 noise of size |g|, not a rounded -g q_y plus g,
    which is off by an ulp of g."""
    g_ = torch.Generator().manual_seed(131)
    z = torch.randn(6, V, generator=g_) * 2.0
    z[:, 0] += 9.0  # q_0 ~ 0.999
    z = z.to(BF16)
    if index_form == "rows":
        index = torch.zeros(6, dtype=torch.int64)
        go = torch.randn(6, generator=g_)
    else:
        K = int(index_form[1:])
        index = torch.randint(0, V, (6, K), generator=g_)
        index[:, 0] = 0
        if K > 1:
            index[:, 1] = 0  # a repeated token: its two terms are summed before rounding
        go = torch.randn(6, K, generator=g_)
    x = z.clone().requires_grad_(True)
    rl().selective_log_softmax(x, index).backward(go)
    z64 = z.to(F64).requires_grad_(True)
    (g64,) = torch.autograd.grad(R.selective_log_softmax(z64, index), z64, go.to(F64))
    g_scale = go.abs().reshape(6, -1).sum(-1, keepdim=True).to(F64)
    err = (x.grad.to(F64) - g64).abs()
    # Triton's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest): one ulp there
    rel = 2.0 ** -7 if H.is_interpreted(force_backend) else 2.0 ** -8
    bound = g64.abs() * rel + 1e-6 * g_scale
    assert (err <= bound).all(), (
        f"worst excess {(err - bound).max():.3g}: got {x.grad[(err - bound).argmax() // V]}")


@pytest.mark.parametrize("force_backend", BACKENDS, indirect=True)
def test_selective_log_softmax_output_may_be_modified_in_place(force_backend):
    """As with eager's gather, the K form's output is not saved for backward: scaling it in
    place before backward works and gives the scaled gradient."""
    z = H.make_logits((3, 29), FP32, seed=133)
    index = torch.randint(0, 29, (3, 4), generator=torch.Generator().manual_seed(133))
    x = z.clone().requires_grad_(True)
    out = rl().selective_log_softmax(x, index)
    out.mul_(3.0)
    out.sum().backward()
    z64 = z.to(F64).requires_grad_(True)
    (g64,) = torch.autograd.grad(3.0 * R.selective_log_softmax(z64, index).sum(), z64)
    H.assert_grad_close(x.grad, g64, FP32, what="selective_log_softmax grad after in-place scale")


@pytest.mark.parametrize("force_backend", KERNEL_BACKENDS, indirect=True)
def test_selective_log_softmax_k_form_reads_the_logits_once(force_backend):
    """[..., K] index: one forward and one backward op for all K (not K of each, which held K
    N x V gradients), on strided logits (a causal slice) without a copy of them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    z = H.make_logits((2, 6, 45), FP32, seed=97)
    x = z.clone().requires_grad_(True)
    index = torch.randint(0, 45, (2, 5, 4), generator=torch.Generator().manual_seed(97))
    with CountOps() as mode:
        out = rl().selective_log_softmax(x[:, :-1], index)
        out.backward(H.make_grad_output(tuple(out.shape), 98))
    fwd = [n for n in mode.names if "token_logprob_forward" in n]
    bwd = [n for n in mode.names if "token_logprob_backward" in n]
    assert len(fwd) == 1 and len(bwd) == 1, mode.names
    z64 = z.to(F64).requires_grad_(True)
    exp = R.selective_log_softmax(z64[:, :-1], index)
    assert_dropin_values(out, exp, FP32, "selective_log_softmax K=4 on a slice")
    (g64,) = torch.autograd.grad(exp, z64, H.make_grad_output(tuple(out.shape), 98).to(F64))
    H.assert_grad_close(x.grad, g64, FP32, what="selective_log_softmax K=4 grad on a slice")


def test_selective_log_softmax_k_zero_is_empty_and_still_validated():
    """An [..., 0] index gives an empty [..., 0] result, as eager's gather does; the inputs are
    checked all the same (an empty index is no licence for integer logits or float ids)."""
    z = H.make_logits((2, 3, 11), FP32, seed=31)
    empty = torch.zeros(2, 3, 0, dtype=torch.int64)
    out = rl().selective_log_softmax(z, empty)
    assert out.shape == (2, 3, 0) and out.dtype == torch.float32
    with pytest.raises(TypeError, match="logits"):
        rl().selective_log_softmax(z.long(), empty)
    with pytest.raises(TypeError, match="index"):
        rl().selective_log_softmax(z, empty.float())
    with pytest.raises(ValueError, match="index"):
        rl().selective_log_softmax(z, torch.zeros(2, 4, 0, dtype=torch.int64))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_op_without_a_token_has_no_one_hot_term(backend):
    """A token outside [0, V) in the backward op adds no one-hot term: the gradient is
    -inv_t * grad_logp * q (selective_log_softmax's K form scatters its K one-hot terms in)."""
    prefix = "triton_" if backend == "triton" else ""
    fwd = getattr(torch.ops.pykernels, prefix + "token_logprob_forward")
    bwd = getattr(torch.ops.pykernels, prefix + "token_logprob_backward")
    z = H.make_logits((5, 37), FP32, seed=99)
    inv_t = 1.0 / 1.3
    _, _, stats = fwd(z, torch.zeros(5, dtype=torch.int64), inv_t, False)
    g = H.make_grad_output((5,), 99)
    got = bwd(g, torch.empty(0), z, torch.full((5,), -1, dtype=torch.int64), stats, inv_t)
    q = torch.softmax(z.to(F64) * inv_t, dim=-1)
    H.assert_grad_close(got, -inv_t * g.to(F64)[:, None] * q, FP32, what="no-token backward")

def test_dropins_default_backend_and_causal_slice():
    """Plain calls (backend "auto") on the causal-LM slice, fp32."""
    z = H.make_logits((2, 8, 40), FP32, seed=96)
    ids = make_tokens((2, 8), 40, seed=96)
    v, lab = z[:, :-1], ids[:, 1:]
    H.assert_loss_close(rl().logprobs_from_logits(v, lab).float(), R.logprobs_from_logits(v, lab),
                        FP32, what="logprobs_from_logits sliced")
    H.assert_loss_close(rl().selective_log_softmax(v, lab).float(),
                        R.selective_log_softmax(v, lab), FP32, what="selective_log_softmax sliced")
    H.assert_loss_close(rl().entropy_from_logits(v).float(), R.entropy_from_logits(v), FP32,
                        what="entropy_from_logits sliced")


def test_dropins_empty():
    z = torch.zeros(0, 11, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.int64)
    for out, shape in [(rl().logprobs_from_logits(z, idx), (0,)),
                       (rl().entropy_from_logits(z), (0,)),
                       (rl().selective_log_softmax(z, idx), (0,)),
                       (rl().selective_log_softmax(z, torch.zeros(0, 2, dtype=torch.int64)), (0, 2))]:
        assert tuple(out.shape) == shape
        out.sum().backward()
    assert z.grad is not None and not z.grad.any()


# ============================================================================ bad inputs


def _match_both(exc_info, *patterns):
    msg = str(exc_info.value)
    for p in patterns:
        assert re.search(p, msg), f"message {msg!r} does not match {p!r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [17, -1, -100, 10**6], ids=["V", "-1", "-100", "huge"])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_tokens_out_of_range(backend, bad, return_entropy):
    z = H.make_logits((2, 4, 17), FP32, seed=100)
    tok = make_tokens((2, 4), 17, seed=100)
    tok[1, 2] = bad
    for t in (tok, tok.to(torch.int32)):
        with pytest.raises(ValueError) as ei:
            pk().token_logprobs(z, t, return_entropy=return_entropy, backend=backend)
        _match_both(ei, r"(?i)tokens", RANGE_MSG)


@pytest.mark.parametrize("force_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("bad", [17, -1], ids=["V", "-1"])
def test_dropin_index_out_of_range(force_backend, bad):
    z = H.make_logits((2, 4, 17), FP32, seed=101)
    lab = make_tokens((2, 4), 17, seed=101)
    lab[0, 3] = bad
    with pytest.raises(ValueError) as ei:
        rl().logprobs_from_logits(z, lab)
    _match_both(ei, r"(?i)labels", RANGE_MSG)
    with pytest.raises(ValueError) as ei:
        rl().selective_log_softmax(z, lab)
    _match_both(ei, r"(?i)index", RANGE_MSG)
    with pytest.raises(ValueError) as ei:
        rl().selective_log_softmax(z, lab[..., None].expand(2, 4, 2))
    _match_both(ei, r"(?i)index", RANGE_MSG)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["float32", "float64", "float16"])
def test_non_integer_tokens(backend, dtype):
    z = H.make_logits((4, 17), FP32, seed=102)
    tok = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match=r"(?i)tokens"):
        pk().token_logprobs(z, tok, backend=backend)
    with pytest.raises(TypeError, match=r"(?i)tokens"):
        pk().token_logprobs(z, tok, return_entropy=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "logit_shape,tok_shape",
    [((4, 17), (5,)), ((4, 17), (3,)), ((4, 17), (4, 1)), ((4, 17), (2, 2)),
     ((2, 3, 17), (6,)), ((2, 3, 17), (3, 2)), ((2, 3, 17), (2, 4)), ((4, 17), ())],
    ids=["N+1", "N-1", "Nx1", "reshaped", "flat-for-3d", "perm", "T+1", "scalar"],
)
def test_tokens_wrong_shape(backend, logit_shape, tok_shape):
    z = H.make_logits(logit_shape, FP32, seed=103)
    tok = torch.zeros(tok_shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"(?i)tokens"):
        pk().token_logprobs(z, tok, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, -0.0, -1.0], ids=["0", "-0", "-1"])
def test_bad_temperature(backend, temperature):
    z = H.make_logits((3, 17), FP32, seed=104)
    tok = torch.zeros(3, dtype=torch.int64)
    calls = [
        lambda: pk().token_logprobs(z, tok, temperature=temperature, backend=backend),
        lambda: pk().token_logprobs(z, tok, temperature=temperature, return_entropy=True,
                                    backend=backend),
        lambda: pk().entropy(z, temperature=temperature, backend=backend),
        lambda: pk().kl_penalty(z, z.clone(), mode="full", temperature=temperature,
                                backend=backend),
    ]
    for c in calls:
        with pytest.raises(ValueError, match=r"(?i)temperature"):
            c()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_temperature(backend, temperature):
    """Not pinned by the RL spec (only T <= 0 is); the divergences reject non-finite
    temperatures with a message naming it, and so should these."""
    z = H.make_logits((3, 17), FP32, seed=105)
    tok = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(BAD, match=r"(?i)temperature"):
        pk().token_logprobs(z, tok, temperature=temperature, backend=backend)
    with pytest.raises(BAD, match=r"(?i)temperature"):
        pk().entropy(z, temperature=temperature, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=["int64", "int32", "bool"])
def test_integer_logits(backend, dtype):
    z = torch.ones(4, 17, dtype=dtype)
    tok = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(BAD):
        pk().token_logprobs(z, tok, backend=backend)
    with pytest.raises(BAD):
        pk().entropy(z, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_full_shape_mismatch(backend):
    s = H.make_logits((3, 17), FP32, seed=106)
    for t in (H.make_logits((3, 18), FP32), H.make_logits((4, 17), FP32)):
        with pytest.raises(BAD):
            pk().kl_penalty(s, t, mode="full", backend=backend)


# ============================================================================ gradcheck / opcheck


def test_gradcheck_torch_backend_float64():
    """torch.autograd.gradcheck of the 'torch' backend in float64 (assumes, as for the
    divergences, that the eager backend keeps float64 in float64): logp and entropy together,
    the entropy alone, and kl_penalty 'full' w.r.t. both logits."""
    g = torch.Generator().manual_seed(110)
    z = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    r = (torch.randn(2, 3, 5, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    tok = torch.tensor([[0, 4, 2], [1, 1, 3]])
    kw = dict(eps=1e-6, atol=1e-6, rtol=1e-4)

    def both(x):
        return pk().token_logprobs(x, tok, temperature=0.8, return_entropy=True, backend="torch")

    assert torch.autograd.gradcheck(both, (z,), **kw)
    assert torch.autograd.gradcheck(
        lambda x: pk().token_logprobs(x, tok, temperature=0.8, backend="torch"), (z,), **kw)
    assert torch.autograd.gradcheck(
        lambda x: pk().entropy(x, temperature=1.3, backend="torch"), (z,), **kw)
    assert torch.autograd.gradcheck(
        lambda a, b: pk().kl_penalty(a, b, mode="full", temperature=0.8, backend="torch"),
        (z, r), **kw)


def _opcheck_cases():
    out = []
    for shape in [(6, 13), (2, 3, 13)]:
        for tok_dtype in (torch.int64, torch.int32):
            for with_entropy in (True, False):
                for rg in (False, True):
                    out.append(pytest.param(
                        shape, tok_dtype, with_entropy, rg,
                        id=f"{len(shape)}d-{str(tok_dtype)[6:]}-{'ent' if with_entropy else 'noent'}"
                           f"-{'grad' if rg else 'nograd'}"))
    return out


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu backend is not built")
@pytest.mark.parametrize("shape,tok_dtype,with_entropy,requires_grad", _opcheck_cases())
def test_opcheck_token_logprob_forward(shape, tok_dtype, with_entropy, requires_grad):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) of
    token_logprob_forward(logits [..., V], tokens [N], inv_T, with_entropy) on CPU, and its
    values against the oracle."""
    op = torch.ops.pykernels.token_logprob_forward
    z = H.make_logits(shape, FP32, seed=111)
    N = z.numel() // shape[-1]
    tok = make_tokens((N,), shape[-1], seed=111, dtype=tok_dtype)
    z.requires_grad_(requires_grad)
    torch.library.opcheck(op, (z, tok, 1.0 / 0.8, with_entropy))
    logp, ent, stats = op(z.detach(), tok, 1.0 / 0.8, with_entropy)
    z2 = z.detach().reshape(N, shape[-1])
    l64, h64 = R.token_logprobs_and_entropy(z2, tok, 0.8)
    H.assert_loss_close(logp.reshape(-1), l64, FP32, what="op logp")
    if with_entropy:
        H.assert_loss_close(ent.reshape(-1), h64, FP32, what="op entropy")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu backend is not built")
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_opcheck_token_logprob_forward_low_precision(dtype):
    op = torch.ops.pykernels.token_logprob_forward
    z = H.make_logits((2, 3, 29), dtype, seed=112).requires_grad_(True)
    tok = make_tokens((6,), 29, seed=112)
    torch.library.opcheck(op, (z, tok, 1.0, True))
    logp, ent, _ = op(z.detach(), tok, 1.0, True)
    l64, h64 = R.token_logprobs_and_entropy(z.detach().reshape(6, 29), tok, 1.0)
    H.assert_loss_close(logp.reshape(-1), l64, dtype, what="op logp")
    H.assert_loss_close(ent.reshape(-1), h64, dtype, what="op entropy")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu backend is not built")
@pytest.mark.parametrize("with_entropy", [True, False], ids=["ent", "noent"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_opcheck_token_logprob_backward(with_entropy, dtype):
    """token_logprob_backward(grad_logp, grad_entropy (may be empty), logits, tokens, stats,
    inv_T) under opcheck; its gradient against DESIGN.md's dz formula."""
    z = H.make_logits((2, 3, 31), dtype, seed=113)
    tok = make_tokens((6,), 31, seed=113)
    inv_t = 1.0 / 1.3
    _, _, stats = torch.ops.pykernels.token_logprob_forward(z, tok, inv_t, True)
    g_lp = H.make_grad_output((6,), 113)
    g_h = H.make_grad_output((6,), 114) if with_entropy else torch.empty(0)
    args = (g_lp, g_h, z, tok, stats, inv_t)
    torch.library.opcheck(torch.ops.pykernels.token_logprob_backward, args)
    grad = torch.ops.pykernels.token_logprob_backward(*args)
    z2 = z.reshape(6, 31)
    exp = R.analytic_grad(z2, tok, 1.3, g_lp, g_h if with_entropy else None)
    w = g_lp.abs().to(F64) + (g_h.abs().to(F64) if with_entropy else 0.0)
    H.assert_grad_close(grad.reshape(6, 31), exp, dtype, what="backward op",
                        unit=H.grad_ulp_unit(z2, z2, 1.3, w))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run CPU tensors here")
@pytest.mark.parametrize("with_entropy", [True, False], ids=["ent", "noent"])
def test_opcheck_triton_token_logprob_forward_interpreter(with_entropy):
    """Under the interpreter a triton_op cannot be traced with fake tensors (DESIGN.md): only
    the schema and autograd-registration checks run here."""
    op = getattr(torch.ops.pykernels, "triton_token_logprob_forward", None)
    if op is None:
        pytest.skip("no triton_token_logprob_forward op registered")
    z = H.make_logits((2, 3, 13), FP32, seed=115).requires_grad_(True)
    tok = make_tokens((6,), 13, seed=115)
    torch.library.opcheck(op, (z, tok, 1.0 / 0.8, with_entropy),
                          test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows(backend):
    """Enough rows to be split across threads / programs (cpu: at::parallel_for chunks)."""
    rows = 64 if H.is_interpreted(backend) else 3000
    z = H.make_logits((rows, 37), FP32, seed=116)
    tok = make_tokens((rows,), 37, seed=116, logits=z)
    check_token_ops(z, tok, backend=backend, temperature=0.9, outputs="both")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu backend is not built")
def test_torch_compile_fullgraph_cpu():
    """torch.compile(fullgraph=True) of an RL loss with backend='cpu' (the C++ op): no graph
    breaks (no host syncs or Python branches on tensor values), same values and gradients as
    eager."""
    torch._dynamo.reset()
    mod = pk()

    def f(z, tok, ref_logp, adv):
        logp, ent = mod.token_logprobs(z, tok, temperature=0.9, return_entropy=True,
                                       backend="cpu")
        return (-adv * logp + 0.1 * mod.kl_penalty(logp, ref_logp, mode="k3") - 0.01 * ent).sum()

    compiled = torch.compile(f, fullgraph=True)
    z = H.make_logits((2, 4, 29), FP32, seed=117)
    tok = make_tokens((2, 4), 29, seed=117, logits=z)
    ref_logp = R.token_logprobs(H.make_logits((2, 4, 29), FP32, seed=118), tok, 0.9).float()
    adv = H.make_grad_output((2, 4), 117)
    z1 = z.clone().requires_grad_(True)
    out = compiled(z1, tok, ref_logp, adv)
    out.backward()
    z2 = z.clone().requires_grad_(True)
    eager = f(z2, tok, ref_logp, adv)
    eager.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)


# ============================================================================ GPU


def _cuda_backends_or_skip():
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    avail = [b for b in pk().available_backends("cuda") if b != "torch"]
    assert avail, "no kernel backend for CUDA tensors"
    return avail


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("V", [1, 17, 1271, 32001, 151936])
@pytest.mark.parametrize("outputs", ["logp", "entropy", "both"])
def test_gpu_token_ops(dtype, V, outputs):
    for backend in _cuda_backends_or_skip():
        rows = 6 if V <= 32001 else 2
        z = H.make_logits((rows, V), dtype, seed=120 + V, device="cuda")
        tok = make_tokens((rows,), V, seed=120, logits=z).cuda()
        check_token_ops(z, tok, backend=backend, temperature=0.7, outputs=outputs)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_layouts(layout):
    for backend in _cuda_backends_or_skip():
        shape, tf, tok = _layout(layout)
        z = H.make_logits(shape, BF16, seed=121, device="cuda")
        check_token_ops(z, tok.cuda(), backend=backend, temperature=1.5, outputs="both",
                        transform=tf)


@pytest.mark.gpu
@pytest.mark.parametrize("at_token", [False, True])
def test_gpu_neg_inf(at_token):
    for backend in _cuda_backends_or_skip():
        z, tok, inf_rows = _masked_inputs(1100, at_token)
        mask = torch.ones_like(z, dtype=torch.bool)
        for r in inf_rows:
            mask[r, tok[r]] = False
        check_token_ops(z.cuda(), tok.cuda(), backend=backend, temperature=1.3,
                        outputs="both", grad_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [17, 32001, 151936])
def test_gpu_kl_full(dtype, V):
    for backend in _cuda_backends_or_skip():
        s = H.make_logits((3, V), dtype, seed=122, device="cuda")
        t = H.make_logits((3, V), dtype, seed=123, device="cuda")
        check_full(s, t, backend=backend, temperature=0.7, ref_grad=True)


@pytest.mark.gpu
def test_gpu_dropins_and_kl_penalty():
    _cuda_backends_or_skip()
    z = H.make_logits((2, 5, 3001), BF16, seed=124, device="cuda")
    lab = make_tokens((2, 5), 3001, seed=124, logits=z).cuda()
    assert_dropin_values(rl().logprobs_from_logits(z, lab), R.logprobs_from_logits(z.cpu(), lab.cpu()),
                         BF16, "gpu logprobs_from_logits")
    assert_dropin_values(rl().entropy_from_logits(z), R.entropy_from_logits(z.cpu()), BF16,
                         "gpu entropy_from_logits")
    assert_dropin_values(rl().selective_log_softmax(z, lab),
                         R.selective_log_softmax(z.cpu(), lab.cpu()), BF16, "gpu selective")
    logp, ref = make_logp_pair((4, 9), seed=9)
    for mode in R.ELEMENTWISE_MODES:
        H.assert_loss_close(pk().kl_penalty(logp.cuda(), ref.cuda(), mode=mode).cpu(),
                            R.kl_penalty(logp, ref, mode), FP32, what=f"gpu {mode}")


def test_cpu_rows_2_31_elements_apart():
    """64-bit row offsets in the CPU token log-prob kernels: bf16 rows 2**31 + 7 elements apart
    in one storage (row * stride overflows int32), read in place; log-probs, entropy and the
    gradient through both, and the K-token form."""
    H.needs_cpu_extension()
    z = H.rows_far_apart((2, 2500), BF16, seed=303).requires_grad_(True)
    tok = torch.tensor([17, 2498])
    logp, ent = pk().token_logprobs(z, tok, return_entropy=True, backend="cpu")
    go_l, go_h = torch.tensor([1.1, -0.4]), torch.tensor([0.3, 0.9])
    torch.autograd.backward((logp, ent), (go_l, go_h))
    z64 = z.detach().to(F64).requires_grad_(True)
    l64, h64 = R.token_logprobs_and_entropy(z64, tok)
    H.assert_loss_close(logp.detach(), l64.detach(), BF16, what="logp, rows far apart")
    H.assert_loss_close(ent.detach(), h64.detach(), BF16, what="entropy, rows far apart")
    (g64,) = torch.autograd.grad((l64, h64), z64, (go_l.to(F64), go_h.to(F64)))
    H.assert_grad_close(z.grad, g64, BF16, what="grad, rows far apart")
    index = torch.tensor([[0, 5, 2499], [7, 7, 100]])
    got = rl().selective_log_softmax(z.detach(), index)
    H.assert_loss_close(got, R.selective_log_softmax(z.detach().to(F64), index), BF16,
                        what="K form, rows far apart")


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N * V > 2**31: row * stride overflows int32.  Checks the last rows only."""
    backends = _cuda_backends_or_skip()
    N, V = 16500, 131072
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    for backend in backends:
        g = torch.Generator(device="cuda").manual_seed(125)
        z = torch.randn(N, V, device="cuda", dtype=BF16, generator=g).requires_grad_(True)
        tok = torch.randint(0, V, (N,), device="cuda", generator=g)
        logp, ent = pk().token_logprobs(z, tok, return_entropy=True, backend=backend)
        go = torch.zeros(N, device="cuda")
        go[-3:] = 1.0
        torch.autograd.backward((logp, ent), (go, go))
        tail = z.detach()[-3:].cpu().to(F64).requires_grad_(True)
        l64, h64 = R.token_logprobs_and_entropy(tail, tok[-3:].cpu())
        H.assert_loss_close(logp[-3:].detach().cpu(), l64.detach(), BF16, what="tail logp")
        H.assert_loss_close(ent[-3:].detach().cpu(), h64.detach(), BF16, what="tail entropy")
        (g64,) = torch.autograd.grad((l64, h64), tail, (torch.ones(3, dtype=F64),) * 2)
        H.assert_grad_close(z.grad[-3:].cpu(), g64, BF16, what="tail grads")
        del z, logp, ent


@pytest.mark.gpu
def test_gpu_tensors_on_a_device_that_is_not_current():
    """Kernels launch on the tensors' device (and its stream), not on the current device."""
    backends = _cuda_backends_or_skip()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    z = H.make_logits((4, 3001), BF16, seed=126, device="cuda:1")
    tok = make_tokens((4,), 3001, seed=126, logits=z).to("cuda:1")
    with torch.cuda.device(0):
        for backend in backends:
            check_token_ops(z, tok, backend=backend, outputs="both")
