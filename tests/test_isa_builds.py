"""The CPU kernels are compiled once per instruction set (DEFAULT, AVX2, AVX-512) and picked at
run time; only the one this CPU prefers runs in the rest of the suite. Here each build is
forced with ATEN_CPU_CAPABILITY in a subprocess and checked against the float64 oracles."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import helpers as H
import reference as ref
import reference_sinkhorn as ref_sk

CASES = [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("skew_reverse_kl", {"alpha": 0.1}),
         ("tvd", {}), ("hellinger", {})]

_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import pykernels as pk
    torch.manual_seed(0)
    out = {}
    for kind, params in json.loads(sys.argv[1]):
        for dtype in (torch.float32, torch.bfloat16):
            s = (3 * torch.randn(4, 2, 3001)).to(dtype)[:, :, :2999]
            t = (3 * torch.randn(4, 2, 3001)).to(dtype)[:, :, :2999]
            s[0, 0, :700] = float("-inf"); t[0, 0, :700] = float("-inf")
            s = s.detach().requires_grad_(); t = t.detach().requires_grad_()
            loss = pk.divergence(s, t, kind, temperature=1.3, reduction="none", backend="cpu",
                                 **params)
            gs, gt = torch.autograd.grad(loss.sum(), (s, t))
            key = kind + "/" + str(dtype)
            out[key] = [loss.tolist(), gs.float().tolist(), gt.float().tolist(),
                        s.detach().float().tolist(), t.detach().float().tolist()]
    print(json.dumps(out))
""")


def _supported(cap: str) -> bool:
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order.index(cap) <= order.index(torch.backends.cpu.get_cpu_capability()
                                           if torch.backends.cpu.get_cpu_capability() in order
                                           else "DEFAULT")


def _last_line_under(cap: str, script: str, *args: str) -> str:
    """The last stdout line of `python -c script args` run with the CPU kernels forced to the
    `cap` build (skips where this CPU cannot run it)."""
    if not _supported(cap):
        pytest.skip(f"this CPU cannot run the {cap} build")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.skipif("cpu" not in H.cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_each_isa_build_matches_oracle(cap):
    results = json.loads(_last_line_under(cap, _SCRIPT, json.dumps(CASES)))
    for (kind, params) in CASES:
        for dtype in ("torch.float32", "torch.bfloat16"):
            loss, gs, gt, s, t = (torch.tensor(x, dtype=torch.float64)
                                  for x in results[f"{kind}/{dtype}"])
            want, want_gs, want_gt = ref.loss_and_grads(s, t, kind, grad_output=1.0,
                                                        temperature=1.3, reduction="none", **params)
            fp32 = dtype == "torch.float32"
            what = f"{cap} {kind} {dtype}"
            torch.testing.assert_close(loss, want, rtol=1e-4 if fp32 else 2e-3, atol=1e-5, msg=what)
            scale = max(want_gs.abs().max().item(), want_gt.abs().max().item())
            atol = (1e-4 if fp32 else 2e-2) * scale
            torch.testing.assert_close(gs, want_gs, rtol=0, atol=atol, msg=what)
            torch.testing.assert_close(gt, want_gt, rtol=0, atol=atol, msg=what)


_SINKHORN_SCRIPT = textwrap.dedent("""
    import json, torch
    import pykernels as pk
    torch.manual_seed(1)
    # 2 groups of 19 rows (not a multiple of any vector width), V = 301, some rows ignored
    s = (3 * torch.randn(2, 19, 301)).requires_grad_()
    t = (3 * torch.randn(2, 19, 301)).requires_grad_()
    labels = torch.randint(0, 301, (2, 19))
    labels[0, 3:7] = -100
    out = {"s": s.tolist(), "t": t.tolist(), "labels": labels.tolist()}
    for cost in ("l1", "sqeuclidean"):
        loss = pk.sinkhorn_loss(s, t, cost=cost, epsilon=0.1, n_iters=20, temperature=2.0,
                                group_size=19, labels=labels, backend="cpu")
        gs, gt = torch.autograd.grad(loss, (s, t))
        out[cost] = [loss.item(), gs.tolist(), gt.tolist()]
    print(json.dumps(out))
""")


@pytest.mark.skipif("cpu" not in H.cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_each_isa_build_sinkhorn_matches_oracle(cap):
    """The cdist kernels (l1 elementwise; squared distance: slabs, norms, gradient pass) and
    the fused Sinkhorn iterations of each build, through sinkhorn_loss."""
    results = json.loads(_last_line_under(cap, _SINKHORN_SCRIPT))
    s, t = (torch.tensor(results[k], dtype=torch.float64).requires_grad_() for k in ("s", "t"))
    labels = torch.tensor(results["labels"])
    for cost in ("l1", "sqeuclidean"):
        want = ref_sk.sinkhorn_loss(s, t, cost=cost, epsilon=0.1, n_iters=20, temperature=2.0,
                                    group_size=19, labels=labels)
        want_gs, want_gt = torch.autograd.grad(want, (s, t))
        loss, gs, gt = results[cost]
        what = f"{cap} sinkhorn {cost}"
        assert loss == pytest.approx(want.item(), rel=2e-4), what
        scale = max(want_gs.abs().max().item(), want_gt.abs().max().item())
        torch.testing.assert_close(torch.tensor(gs, dtype=torch.float64), want_gs, rtol=0,
                                   atol=2e-3 * scale, msg=what)
        torch.testing.assert_close(torch.tensor(gt, dtype=torch.float64), want_gt, rtol=0,
                                   atol=2e-3 * scale, msg=what)
        assert (torch.tensor(gs)[0, 3:7] == 0).all(), what


@pytest.mark.skipif("cpu" not in H.cpu_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_each_isa_build_runs_rows_in_parallel(cap):
    # at::parallel_for is inlined into our sources: a build without OpenMP silently runs every
    # CPU kernel on one thread (it did, until setup.py passed -fopenmp).
    script = ("import torch, pykernels._C as C; torch.set_num_threads(3); "
              "print(C.parallel_threads())")
    assert int(_last_line_under(cap, script)) == 3
