"""GPU benchmark of the divergence losses (forward + backward): pykernels' `triton` and `cuda`
backends against eager PyTorch and a device copy of the same bytes, in one run.

    python -m benchmarks.gpu_divergence [--rows 8192] [--vocab 128256] [--dtype bfloat16]

Time: triton.testing.do_bench (median and 20/80 % quantiles, ms). Bandwidth on the
minimal-bytes model of DESIGN.md: read student, read teacher, write the student gradient =
3 * N * V * element size, and its ratio to the bandwidth of a plain device copy (read + write
of N * V elements) measured in the same run. Memory: torch.cuda.max_memory_allocated during
one call beyond what was allocated before it, minus the returned gradient.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pykernels as pk

from .cpu_divergence import OPS, _git_commit

RESULTS = Path(__file__).resolve().parent / "results"


def _fwd_bwd(fn, student, teacher):
    student.grad = None
    fn(student, teacher).backward()


def _bench(fn) -> tuple[float, float, float]:
    from triton.testing import do_bench

    q20, q50, q80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=200)
    return q50, q20, q80


def _extra_memory_mb(fn, student, teacher) -> float:
    student.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _fwd_bwd(fn, student, teacher)
    torch.cuda.synchronize()
    grad_bytes = student.grad.numel() * student.grad.element_size()
    return max(0.0, (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.rows, args.vocab)
    student = (2 * torch.randn(shape, device="cuda", generator=gen)).to(dtype).requires_grad_()
    teacher = (2 * torch.randn(shape, device="cuda", generator=gen)).to(dtype)
    elem = student.element_size()
    model_bytes = 3 * student.numel() * elem

    scratch = torch.empty_like(student)
    copy_ms, _, _ = _bench(lambda: scratch.copy_(student.detach()))
    copy_gbs = 2 * student.numel() * elem / copy_ms / 1e6
    del scratch
    device = torch.cuda.get_device_name()
    print(f"{device}: copy of {shape} {args.dtype}: {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")

    rows = []
    tokens = torch.randint(0, args.vocab, (args.rows,), device="cuda", generator=gen)
    for op in args.ops:
        eager_op, ours_op = OPS[op]
        providers = {"eager": lambda s, t, f=eager_op: f(s, t, tokens)}
        for backend in ("triton", "cuda"):
            if backend in pk.available_backends("cuda"):
                providers[f"pykernels-{backend}"] = (
                    lambda s, t, f=ours_op, b=backend: f(s, t, tokens, b))
        for name, fn in providers.items():
            try:
                med, q20, q80 = _bench(lambda: _fwd_bwd(fn, student, teacher))
                mem = _extra_memory_mb(fn, student, teacher)
            except Exception as exc:  # one failing provider must not end the sweep
                print(f"{op:11s} {name:16s} FAILED: {type(exc).__name__}: {exc}")
                continue
            gbs = model_bytes / med / 1e6
            row = {"op": op, "provider": name, "rows": args.rows, "vocab": args.vocab,
                   "dtype": args.dtype, "median_ms": med, "q20_ms": q20, "q80_ms": q80,
                   "model_gbs": gbs, "fraction_of_copy": gbs / copy_gbs, "extra_peak_mb": mem}
            rows.append(row)
            print(f"{op:11s} {name:16s} {med:8.3f} ms (q20 {q20:.3f}, q80 {q80:.3f})  "
                  f"{gbs:6.0f} GB/s = {gbs / copy_gbs:5.2f} x copy  extra {mem:9.1f} MB", flush=True)
    meta = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": _git_commit(), "copy_ms": copy_ms, "copy_gbs": copy_gbs}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out = args.out or RESULTS / device.replace(" ", "_") / f"divergence_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
