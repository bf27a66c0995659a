"""Sanity checks of the float64 oracle itself (tests/reference.py), so that it can fail.

These do not import pykernels.
"""

import math

import pytest
import torch

import reference as ref

ALL_CASES = (
    [("forward_kl", {}), ("reverse_kl", {})]
    + [("jsd", {"beta": b}) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    + [("skew_forward_kl", {"alpha": a}) for a in (0.0, 0.1, 0.9)]
    + [("skew_reverse_kl", {"alpha": a}) for a in (0.0, 0.1, 0.9)]
    + [("tvd", {}), ("hellinger", {})]
)
ALL_IDS = [k + "".join(f"-{n}{v:g}" for n, v in p.items()) for k, p in ALL_CASES]


def rand(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_identical_logits_give_zero(case):
    kind, params = case
    z = rand((3, 11), 0)
    v = ref.row_divergence(z, z.clone(), kind, **params, temperature=1.7)
    torch.testing.assert_close(v, torch.zeros(3, dtype=torch.float64), atol=1e-14, rtol=0)


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_nonnegative_and_bounded(case):
    kind, params = case
    s, t = rand((50, 13), 1), rand((50, 13), 2)
    v = ref.row_divergence(s, t, kind, **params)
    assert (v >= 0).all()
    if kind in ("tvd", "hellinger"):
        assert (v <= 1).all()
    if kind == "jsd" and params["beta"] == 0.5:
        assert (v <= math.log(2)).all()


def test_two_class_by_hand():
    # q = [1/2, 1/2] (student logits [0, 0]); p = [1/4, 3/4] (teacher logits [0, ln 3]).
    s = t64([[0.0, 0.0]])
    t = t64([[0.0, math.log(3.0)]])
    q, p = [0.5, 0.5], [0.25, 0.75]

    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)

    def mix(w, a, b):
        return [w * ai + (1 - w) * bi for ai, bi in zip(a, b)]

    m = mix(0.5, p, q)
    expected = {
        ("forward_kl", ()): 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        ("reverse_kl", ()): 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0),
        ("jsd", (("beta", 0.5),)): 0.5 * kl(p, m) + 0.5 * kl(q, m),
        ("jsd", (("beta", 0.1),)): 0.1 * kl(p, mix(0.1, p, q)) + 0.9 * kl(q, mix(0.1, p, q)),
        ("skew_forward_kl", (("alpha", 0.1),)): kl(p, mix(0.1, p, q)),
        ("skew_reverse_kl", (("alpha", 0.1),)): kl(q, mix(0.1, q, p)),
        ("tvd", ()): 0.25,
        ("hellinger", ()): 0.5 * ((0.5 - math.sqrt(0.5)) ** 2 + (math.sqrt(0.75) - math.sqrt(0.5)) ** 2),
    }
    # Check the literals themselves once.
    assert expected[("forward_kl", ())] == pytest.approx(kl(p, q), rel=1e-15)
    assert expected[("reverse_kl", ())] == pytest.approx(kl(q, p), rel=1e-15)
    for (kind, params), val in expected.items():
        got = ref.row_divergence(s, t, kind, **dict(params)).item()
        assert got == pytest.approx(val, rel=1e-12, abs=1e-15), (kind, params)


def test_temperature_divides_logits_and_no_t_squared():
    s, t = rand((4, 9), 3), rand((4, 9), 4)
    for kind, params in ALL_CASES:
        a = ref.row_divergence(s, t, kind, **params, temperature=2.0)
        b = ref.row_divergence(s / 2.0, t / 2.0, kind, **params, temperature=1.0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_jsd_symmetry_and_endpoints():
    s, t = rand((6, 10), 5), rand((6, 10), 6)
    j = lambda a, b, beta: ref.row_divergence(a, b, "jsd", beta=beta)  # noqa: E731
    torch.testing.assert_close(j(s, t, 0.5), j(t, s, 0.5), rtol=1e-12, atol=1e-14)
    # Swapping the roles and beta -> 1 - beta gives the same mixture and the same value.
    torch.testing.assert_close(j(s, t, 0.1), j(t, s, 0.9), rtol=1e-12, atol=1e-14)
    # Endpoint convention: beta=0 -> KL(p||q), beta=1 -> KL(q||p) (the JSD itself -> 0).
    assert torch.equal(j(s, t, 0.0), ref.row_divergence(s, t, "forward_kl"))
    assert torch.equal(j(s, t, 1.0), ref.row_divergence(s, t, "reverse_kl"))
    assert (j(s, t, 1e-7) < 1e-5).all()
    assert (ref.row_divergence(s, t, "forward_kl") > 1e-2).all()


def test_skew_relations():
    s, t = rand((6, 10), 7), rand((6, 10), 8)
    fkl = ref.row_divergence(s, t, "forward_kl")
    rkl = ref.row_divergence(s, t, "reverse_kl")
    torch.testing.assert_close(ref.row_divergence(s, t, "skew_forward_kl", alpha=0.0), fkl)
    torch.testing.assert_close(ref.row_divergence(s, t, "skew_reverse_kl", alpha=0.0), rkl)
    # skew_reverse_kl(s, t) is skew_forward_kl with the roles swapped.
    torch.testing.assert_close(
        ref.row_divergence(s, t, "skew_reverse_kl", alpha=0.3),
        ref.row_divergence(t, s, "skew_forward_kl", alpha=0.3),
    )
    # alpha = 1 mixes to the distribution itself: 0.
    assert ref.row_divergence(s, t, "skew_forward_kl", alpha=1.0).abs().max() < 1e-14
    # Skewing shrinks the divergence.
    assert (ref.row_divergence(s, t, "skew_forward_kl", alpha=0.5) < fkl).all()


def test_pinsker_and_hellinger_identity():
    s, t = rand((40, 12), 9), rand((40, 12), 10)
    tvd = ref.row_divergence(s, t, "tvd")
    fkl = ref.row_divergence(s, t, "forward_kl")
    h = ref.row_divergence(s, t, "hellinger")
    assert (tvd**2 <= fkl / 2 + 1e-15).all()
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    torch.testing.assert_close(h, 1 - (p * q).sqrt().sum(-1), rtol=1e-10, atol=1e-14)
    assert (h <= tvd + 1e-15).all()


def test_disjoint_supports():
    # p = [0, 1], q = [1, 0]
    s = t64([[0.0, -math.inf]])
    t = t64([[-math.inf, 0.0]])
    v = lambda k, **kw: ref.row_divergence(s, t, k, **kw).item()  # noqa: E731
    assert v("tvd") == 1.0
    assert v("hellinger") == pytest.approx(1.0, abs=1e-15)
    assert v("forward_kl") == math.inf
    assert v("reverse_kl") == math.inf
    assert v("jsd", beta=0.5) == pytest.approx(math.log(2.0), rel=1e-14)
    assert v("skew_forward_kl", alpha=0.1) == pytest.approx(math.log(10.0), rel=1e-14)
    assert v("skew_reverse_kl", alpha=0.1) == pytest.approx(math.log(10.0), rel=1e-14)


def test_zero_log_zero_at_matching_neg_inf():
    # -inf at the same positions is the same as dropping those entries.
    s, t = rand((3, 8), 11), rand((3, 8), 12)
    s[:, [1, 5]] = -math.inf
    t[:, [1, 5]] = -math.inf
    keep = [0, 2, 3, 4, 6, 7]
    for kind, params in ALL_CASES:
        a = ref.row_divergence(s, t, kind, **params)
        b = ref.row_divergence(s[:, keep], t[:, keep], kind, **params)
        assert torch.isfinite(a).all(), kind
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_non_matching_neg_inf():
    s, t = rand((1, 6), 13), rand((1, 6), 14)
    s2 = s.clone()
    s2[0, 2] = -math.inf  # q = 0 where p > 0
    assert ref.row_divergence(s2, t, "forward_kl").item() == math.inf
    assert ref.row_divergence(s2, t, "jsd", beta=0.0).item() == math.inf
    assert ref.row_divergence(s2, t, "skew_forward_kl", alpha=0.0).item() == math.inf
    for kind, params in [("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 1.0}),
                         ("skew_forward_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.1}),
                         ("tvd", {}), ("hellinger", {})]:
        assert math.isfinite(ref.row_divergence(s2, t, kind, **params).item()), kind
    t2 = t.clone()
    t2[0, 4] = -math.inf  # p = 0 where q > 0
    assert ref.row_divergence(s, t2, "reverse_kl").item() == math.inf
    assert math.isfinite(ref.row_divergence(s, t2, "forward_kl").item())


def test_nan_propagates_per_row():
    s, t = rand((3, 5), 15), rand((3, 5), 16)
    s[1, 2] = math.nan
    for kind, params in ALL_CASES:
        v = ref.row_divergence(s, t, kind, **params)
        assert torch.isnan(v[1]), kind
        assert torch.isfinite(v[[0, 2]]).all(), kind
    v = ref.row_divergence(t, s, "tvd")
    assert torch.isnan(v[1])


# ----------------------------------------------------------------------------- reductions


def test_reductions_and_masking():
    per_row = t64([1.0, 2.0, 4.0, 8.0])
    labels = torch.tensor([3, -100, 0, 7])
    V = 5
    r = lambda **kw: ref.reduce_rows(per_row, V, **kw)  # noqa: E731
    assert r(reduction="sum").item() == 15.0
    assert r(reduction="batchmean").item() == 15.0 / 4
    assert r(reduction="mean").item() == 15.0 / (4 * V)
    assert torch.equal(r(reduction="none"), per_row)
    assert r(labels=labels, reduction="sum").item() == 13.0
    assert r(labels=labels, reduction="batchmean").item() == 13.0 / 3
    assert r(labels=labels, reduction="mean").item() == 13.0 / (3 * V)
    assert torch.equal(r(labels=labels, reduction="none"), t64([1.0, 0.0, 4.0, 8.0]))
    assert r(labels=labels, reduction="batchmean", num_items_in_batch=10).item() == 1.3
    assert r(labels=labels, reduction="mean", num_items_in_batch=10).item() == 13.0 / (10 * V)
    assert r(labels=torch.tensor([0, 1, 0, 1]), ignore_index=1, reduction="sum").item() == 5.0
    # all ignored -> 0 (divisor max(n_valid, 1))
    allign = torch.full((4,), -100)
    for red in ("sum", "batchmean", "mean"):
        assert r(labels=allign, reduction=red).item() == 0.0
    assert torch.equal(r(labels=allign, reduction="none"), torch.zeros(4, dtype=torch.float64))
    # empty
    e = torch.zeros(0, dtype=torch.float64)
    for red in ("sum", "batchmean", "mean"):
        assert ref.reduce_rows(e, V, reduction=red).item() == 0.0
    assert ref.reduce_rows(e, V, reduction="none").shape == (0,)


def test_ignored_rows_have_zero_gradient():
    s, t = rand((4, 6), 17), rand((4, 6), 18)
    labels = torch.tensor([1, -100, 2, -100])
    loss, gs, gt = ref.loss_and_grads(s, t, "jsd", beta=0.3, labels=labels)
    assert gs[[1, 3]].abs().max() == 0 and gt[[1, 3]].abs().max() == 0
    assert gs[[0, 2]].abs().max() > 0


# ----------------------------------------------------------------------------- gradients


ANALYTIC_CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.1}),
                  ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}), ("tvd", {}), ("hellinger", {})]


@pytest.mark.parametrize("case", ANALYTIC_CASES, ids=lambda c: c[0] + str(c[1].get("beta", "")))
@pytest.mark.parametrize("with_neg_inf", [False, True], ids=["finite", "matching-neg-inf"])
def test_oracle_autograd_matches_design_table(case, with_neg_inf):
    kind, params = case
    T = 1.5
    s, t = rand((4, 9), 19), rand((4, 9), 20)
    if with_neg_inf:
        s[:, [0, 6]] = -math.inf
        t[:, [0, 6]] = -math.inf
    _, gs, gt = ref.loss_and_grads(s, t, kind, **params, temperature=T, reduction="sum")
    gs_a, gt_a = ref.analytic_grads(s, t, kind, **params, temperature=T)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(gs, gs_a, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gt, gt_a, rtol=1e-10, atol=1e-13)
    if with_neg_inf:
        assert gs[:, [0, 6]].abs().max() == 0 and gt[:, [0, 6]].abs().max() == 0


def test_oracle_autograd_non_matching_neg_inf_finite_rows():
    # Student -inf where the teacher has mass: reverse KL, JSD(0<beta<1), TVD, Hellinger
    # stay finite; the oracle's autograd must be finite and equal to the analytic table.
    s, t = rand((3, 7), 21), rand((3, 7), 22)
    s[:, 2] = -math.inf
    t[:, 5] = -math.inf
    for kind, params in [("jsd", {"beta": 0.5}), ("tvd", {}), ("hellinger", {})]:
        _, gs, gt = ref.loss_and_grads(s, t, kind, **params, reduction="sum")
        gs_a, gt_a = ref.analytic_grads(s, t, kind, **params)
        torch.testing.assert_close(gs, gs_a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gt, gt_a, rtol=1e-10, atol=1e-13)
        assert gs[:, 2].abs().max() == 0  # q_i = 0 there


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_oracle_autograd_matches_finite_differences(case):
    kind, params = case
    s, t = rand((2, 5), 23, scale=1.5), rand((2, 5), 24, scale=1.5)
    labels = torch.tensor([4, -100])
    kw = dict(params, temperature=0.8, labels=labels, reduction="batchmean")
    _, gs, gt = ref.loss_and_grads(s, t, kind, grad_output=0.7, **kw)
    fs, ft = ref.central_differences(s, t, kind, grad_output=0.7, eps=1e-6, **kw)
    torch.testing.assert_close(gs, fs, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gt, ft, rtol=1e-6, atol=1e-8)


def test_oracle_gradcheck():
    s = rand((2, 3, 4), 25).requires_grad_(True)
    t = rand((2, 3, 4), 26).requires_grad_(True)
    labels = torch.tensor([[1, -100, 2], [0, 0, -100]])
    for kind, params in ALL_CASES:
        for red in ("batchmean", "none"):
            f = lambda a, b: ref.divergence(a, b, kind, **params, labels=labels,  # noqa: E731
                                            reduction=red, temperature=0.7)
            assert torch.autograd.gradcheck(f, (s, t)), (kind, params, red)
