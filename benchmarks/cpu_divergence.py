"""CPU benchmark of the divergence losses: forward + backward, pykernels' CPU backend against
eager PyTorch written the way users write it, and torch.compile of that eager code, in one run.

    python -m benchmarks.cpu_divergence [--rows 2048] [--vocab 32000] [--dtypes float32 bfloat16]
                                        [--ops forward_kl jsd logprobs_entropy sinkhorn_l1 ...]

The Sinkhorn ops run on --sinkhorn-rows rows (one group, default 256) instead of --rows.

Time: median (and 20/80 % quantiles) of wall time over repeated calls after warm-up.
Memory: peak resident memory of the process during one call beyond what was resident before it
(Linux: the peak counter VmHWM is reset through /proc/self/clear_refs just before the call), minus
the returned student gradient; so it is what the call needed on top of its inputs and outputs.
Results are printed as a table and written to benchmarks/results/cpu/divergence_<date>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pykernels as pk

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"


# -------------------------------------------------------------------- eager references (users')
def eager_forward_kl(student, teacher, temperature=1.0):
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def eager_jsd(student, teacher, beta=0.5, temperature=1.0):
    """The generalised JSD as TRL's GKD trainer computes it (mixture in log space)."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    beta_t = torch.tensor(beta, dtype=log_q.dtype)
    log_m = torch.logsumexp(
        torch.stack([log_q + torch.log(1 - beta_t), log_p + torch.log(beta_t)]), dim=0
    )
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    return (beta_t * kl_p + (1 - beta_t) * kl_q).sum() / student.shape[0]


def eager_logprobs_entropy(logits, tokens):
    """Token log-probs + entropy as RL trainers compute them (verl's logprobs_from_logits and
    entropy_from_logits): log_softmax + gather, logsumexp - sum softmax * logits."""
    logp = F.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs = F.softmax(logits, dim=-1)
    ent = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logp, ent


def eager_sinkhorn(student, teacher, cost="l1", epsilon=0.1, n_iters=20, temperature=2.0):
    """SinKD as its authors write it: softmaxes, torch.cdist between the rows, then the plain
    row / column normalisation loop on K = exp(-C / eps), loss = sum K * C. In fp32 (torch.cdist
    has no bf16 CPU kernel, and SinKD runs its loss in fp32)."""
    q = F.softmax(student.float() / temperature, dim=-1)
    p = F.softmax(teacher.float() / temperature, dim=-1)
    C = torch.cdist(q, p, p=1) if cost == "l1" else torch.cdist(q, p, p=2) ** 2
    K = torch.exp(-C / epsilon)
    for _ in range(n_iters):
        K = K / K.sum(dim=1, keepdim=True)
        K = K / K.sum(dim=0, keepdim=True)
    return (K * C).sum()


def _logprob_loss(logp, ent):
    # A scalar that sends gradients through both outputs, as a PPO/GRPO loss with an entropy
    # bonus does.
    return (logp.float().sum() + 0.01 * ent.float().sum()) / logp.shape[0]


# Each op: (eager(student, teacher, tokens), pykernels(student, teacher, tokens, backend)).
OPS = {
    "forward_kl": (lambda s, t, y: eager_forward_kl(s, t),
                   lambda s, t, y, backend: pk.forward_kl(s, t, backend=backend)),
    "jsd": (lambda s, t, y: eager_jsd(s, t),
            lambda s, t, y, backend: pk.jsd(s, t, beta=0.5, backend=backend)),
    "logprobs_entropy": (
        lambda s, t, y: _logprob_loss(*eager_logprobs_entropy(s, y)),
        lambda s, t, y, backend: _logprob_loss(
            *pk.token_logprobs(s, y, return_entropy=True, backend=backend))),
    "sinkhorn_l1": (lambda s, t, y: eager_sinkhorn(s, t, "l1"),
                    lambda s, t, y, backend: pk.sinkhorn_loss(s, t, cost="l1", backend=backend)),
    "sinkhorn_sqeuclidean": (
        lambda s, t, y: eager_sinkhorn(s, t, "sqeuclidean"),
        lambda s, t, y, backend: pk.sinkhorn_loss(s, t, cost="sqeuclidean", backend=backend)),
}


def eager_softmax_cdist(student, teacher, cost="l1"):
    q, p = F.softmax(student.float(), dim=-1), F.softmax(teacher.float(), dim=-1)
    return torch.cdist(q, p, p=1) if cost == "l1" else torch.cdist(q, p, p=2) ** 2


for _cost in ("l1", "sqeuclidean"):  # the cost matrix alone, forward + backward of C.sum()
    OPS[f"cdist_{_cost}"] = (
        lambda s, t, y, c=_cost: eager_softmax_cdist(s, t, c).sum(),
        lambda s, t, y, backend, c=_cost: pk.softmax_cdist(s, t, cost=c, backend=backend).sum())
DEFAULT_OPS = ["forward_kl", "jsd", "logprobs_entropy"]
SINKHORN_OPS = ("sinkhorn_l1", "sinkhorn_sqeuclidean", "cdist_l1", "cdist_sqeuclidean")


# ------------------------------------------------------------------------------- measurement
def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _fwd_bwd(fn, student, teacher):
    student.grad = None
    loss = fn(student, teacher)
    loss.backward()
    return loss


def measure(fn, student, teacher, min_reps: int = 3, min_seconds: float = 2.0) -> dict:
    _fwd_bwd(fn, student, teacher)  # warm-up (and compilation for torch.compile)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        _fwd_bwd(fn, student, teacher)
        times.append(time.perf_counter() - t0)
        if len(times) >= 20:
            break
    # Peak memory of one call, beyond what is resident before it and the gradient it returns.
    student.grad = None
    gc.collect()
    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    _fwd_bwd(fn, student, teacher)
    peak = _status_kb("VmHWM")
    grad_kb = student.grad.numel() * student.grad.element_size() / 1024
    extra_mb = max(0.0, (peak - rss_before - grad_kb) / 1024)
    q20, q50, q80 = (statistics.quantiles(times, n=10)[i] for i in (1, 4, 7)) if len(times) > 1 else (times[0],) * 3
    return {"median_ms": 1e3 * statistics.median(times), "q20_ms": 1e3 * q20, "q80_ms": 1e3 * q80,
            "reps": len(times), "extra_peak_mb": extra_mb}


def agreement(op: str, eager, ours, student, teacher) -> str:  # fns of (student, teacher)
    """Loss and gradient of pykernels against eager PyTorch computed in float64 on the same
    inputs (eager in the input dtype would itself round in bf16)."""
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double()
    ref = eager(s64, t64)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    s = student.detach().clone().requires_grad_()
    loss = ours(s, teacher)
    (grad,) = torch.autograd.grad(loss, s)
    return (f"{op:20s} {str(student.dtype)[6:]:9s} agreement with eager float64: loss {loss.item():.6f} vs "
            f"{ref.item():.6f}, max |grad diff| {(grad.double() - ref_grad).abs().max().item():.2e} "
            f"(max |grad| {ref_grad.abs().max().item():.2e})")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.machine()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:  # not a checkout
        return "unknown"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--ops", nargs="+", default=DEFAULT_OPS, choices=list(OPS))
    parser.add_argument("--sinkhorn-rows", type=int, default=256, help="rows (one group) of the Sinkhorn ops")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/cpu/...)")
    args = parser.parse_args(argv)

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for op in args.ops:
            n_rows = args.sinkhorn_rows if op in SINKHORN_OPS else args.rows
            gen = torch.Generator().manual_seed(0)
            student = (2 * torch.randn(n_rows, args.vocab, generator=gen)).to(dtype).requires_grad_()
            teacher = (2 * torch.randn(n_rows, args.vocab, generator=gen)).to(dtype)
            tokens = torch.randint(0, args.vocab, (n_rows,), generator=gen)
            eager_op, ours_op = OPS[op]
            eager = lambda s, t, f=eager_op: f(s, t, tokens)  # noqa: E731
            ours = lambda s, t, f=ours_op: f(s, t, tokens, "cpu")  # noqa: E731
            print(agreement(op, eager, ours, student, teacher), flush=True)
            providers = {"pykernels-cpu": ours, "eager": eager}
            if not args.no_compile:
                providers["torch.compile"] = torch.compile(eager, dynamic=False)
            for name, fn in providers.items():
                result = measure(fn, student, teacher)
                result.update(op=op, dtype=dtype_name, provider=name, rows=n_rows, vocab=args.vocab)
                rows.append(result)
                print(f"{op:20s} {dtype_name:9s} {name:14s} {result['median_ms']:9.1f} ms "
                      f"(q20 {result['q20_ms']:.1f}, q80 {result['q80_ms']:.1f})  "
                      f"extra peak {result['extra_peak_mb']:8.1f} MB", flush=True)
            torch._dynamo.reset()

    print("\nratios (same run): time of eager / compiled over pykernels-cpu; memory as % of eager")
    for dtype_name in args.dtypes:
        for op in args.ops:
            sel = {r["provider"]: r for r in rows if r["op"] == op and r["dtype"] == dtype_name}
            ours = sel["pykernels-cpu"]
            line = f"{op:20s} {dtype_name:9s} vs eager {sel['eager']['median_ms'] / ours['median_ms']:5.2f}x"
            if "torch.compile" in sel:
                line += f"  vs compile {sel['torch.compile']['median_ms'] / ours['median_ms']:5.2f}x"
            eager_mb = sel["eager"]["extra_peak_mb"]
            if eager_mb > 0:
                line += f"  memory {100 * ours['extra_peak_mb'] / eager_mb:5.2f}% of eager's"
            print(line)

    meta = {"machine": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": _git_commit()}
    stem = "sinkhorn" if set(args.ops) <= set(SINKHORN_OPS) else "divergence"
    out = args.out or RESULTS / f"{stem}_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
