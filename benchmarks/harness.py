"""pykernels' benchmark harness: every op, every provider, identical inputs, one process and run.

    python -m benchmarks [--device cpu|cuda] [--op forward_kl jsd ...] [--shape 1024x32000 ...]
                         [--dtype float32 ...] [--provider eager pykernels-cpu ...]
                         [--mode fwd+bwd|fwd|both] [--results-dir DIR] [--no-plots] [--no-memory]
    pykernels-bench ...            (the same, as a console script)

Providers: pykernels-<backend> for every kernel backend that runs on the device (Triton on
CPU tensors only runs in its interpreter, which is for tests, so it is skipped there), eager
PyTorch written as users write it (benchmarks/ops.py), torch.compile of that eager code, and
Liger-Kernel where it is installed and has the op (its losses take log-probabilities or
probabilities, so the timed region includes the log_softmax / softmax the caller must do).

Time: on CPU the median and 20/80 % quantiles of perf_counter over repeated calls, the
providers of a case taking turns, after a set-up call each (where torch.compile compiles) and
one second of shared warm-up rounds (at least one); on GPU triton.testing.do_bench.
Bandwidth: the minimal-bytes model of DESIGN.md (every logit tensor read once, the student
gradient written once) over the median time, and its ratio to a plain copy of the student
logits timed among the providers of the same case. Memory beyond the
inputs and the returned gradient: on GPU torch.cuda.max_memory_allocated; on CPU one child
process runs every case once more with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_), so that every tensor of 64 KiB or more is its own mapping, returned
to the system when freed, and the peak resident size of one call (VmHWM, reset through
/proc/self/clear_refs) counts every allocation the call makes, cached or not.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import pykernels as pk

from .ops import OPS, Op, make_inputs, min_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("fwd+bwd", "fwd")

# Default sweeps. CPU: sized for about 3 minutes on 2 cores; CUDA: the grid for one
# H200 run. Sinkhorn ops take G rows (one group) instead of N.
CPU_SHAPES = {"rows": [512], "vocab": [4096, 16384, 32000], "groups": [128], "dtypes": ["float32"]}
CUDA_SHAPES = {"rows": [1024, 4096, 8192, 16384], "vocab": [32000, 128256, 151936, 256000],
               "groups": [1024], "dtypes": ["bfloat16"]}
# Under a time budget these run first, for every op: the figures the issues quote (N = 8192 at
# Llama-3's and Qwen2.5's vocabularies; G = 1024 for the Sinkhorn cost matrix).
HEADLINE_SHAPES = {(8192, 128256), (8192, 151936), (1024, 128256), (512, 32000), (128, 32000)}


@dataclass(frozen=True)
class Case:
    op: str
    rows: int
    vocab: int
    dtype: str
    mode: str
    device: str

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"


# ----------------------------------------------------------------------------- providers
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def provider_names(op: Op, device: str, notes: set) -> list[str]:
    """Providers that can run `op` on `device`; a one-line note for each one that cannot."""
    names = []
    for backend in pk.available_backends(device):
        if backend == "torch":
            continue  # the eager reference backend: "eager" below is what users run
        if backend == "triton" and device == "cpu":
            notes.add("pykernels-triton: skipped on cpu (Triton needs a CUDA device; its "
                      "interpreter is for tests)")
            continue
        names.append(f"pykernels-{backend}")
    names += ["eager", "compile"]
    if not liger_available():
        notes.add("liger: skipped (liger-kernel is not installed)")
    elif device != "cuda":
        notes.add("liger: skipped on cpu (its kernels are Triton, GPU only)")
    elif op.liger is None:
        notes.add(f"liger: no equivalent of {op.name}")
    else:
        notes.add(f"liger {op.name}: timed region includes {op.liger_note}")
        names.append("liger")
    return names


_COMPILED: dict = {}


def provider_fn(name: str, op: Op):
    """(student, teacher, tokens) -> scalar loss for provider `name`."""
    if name.startswith("pykernels-"):
        backend = name[len("pykernels-"):]
        return lambda s, t, y: op.ours(s, t, y, backend)
    if name == "eager":
        return op.eager
    if name == "compile":
        if op.name not in _COMPILED:  # one compiled function per op, reused across shapes
            # torch.compile's defaults, as users call it: static shapes first, then one
            # dynamic-shape recompile when a second shape arrives
            _COMPILED[op.name] = torch.compile(op.eager)
        return _COMPILED[op.name]
    if name == "liger":
        fn = op.liger()
        return lambda s, t, y: fn(s, t)
    raise ValueError(f"unknown provider {name!r}")


def call_once(fn, s, t, y, backward: bool):
    if backward:
        s.grad = None
        fn(s, t, y).backward()
    else:
        with torch.no_grad():
            fn(s, t, y)


# ----------------------------------------------------------------------------- measurement
def time_calls(calls: dict, device: str, min_reps: int = 3, min_seconds: float = 0.1,
               max_reps: int = 20, warmup_seconds: float = 1.0, max_warmup: int = 40) -> dict:
    """{name: ((median, q20, q80) in ms, number of timed calls), or the exception the call
    raised}. On CPU the calls take turns, one call of each per round, so that what the machine
    does meanwhile (other load, the host's page faults) falls on all of them alike:
    - a set-up call each (torch.compile compiles in it, so its time says nothing of a steady
      call);
    - warm-up rounds, shared, until warmup_seconds have passed (at least one round; a call
      leaves the warm-up after max_warmup calls, or after one call of warmup_seconds / 2 or
      more). On VMs that hand freed memory back to the host (free page reporting, as on the
      development VM), calls that touch memory freed more than ~2 s earlier pay the host's
      page faults, up to 5x a steady call (for about 1.3 s of calls, in a process that makes
      only one of them); a torch.compile'd function's first calls after compiling pay it too.
      Taking turns, the calls reuse each other's freshly freed memory, and the set-up calls
      have already touched it, so one short warm-up serves them all (the README has the runs
      that compared 1 s with 2 s);
    - timed rounds: a call stays in them until it has min_reps timings and either min_seconds
      of them or max_reps.
    On CUDA, triton.testing.do_bench times each call in turn."""
    out, live = {}, {}
    if device == "cuda":
        for name, call in calls.items():
            try:
                out[name] = _time_cuda(call, min_reps, max_reps)
            except Exception as exc:  # one provider failing ends only its own run
                out[name] = _without_frames(exc)
                gc.collect()  # e.g. eager out of memory at the largest shapes: free its
                torch.cuda.empty_cache()  # tensors before the next provider runs
        return out

    def run(name, call):
        try:
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0
        except Exception as exc:
            out[name] = _without_frames(exc)
            live.pop(name, None)
            return None

    for name, call in calls.items():
        live[name] = call
        run(name, call)  # set-up
    warm_start, warming = time.perf_counter(), {name: 0 for name in live}
    while warming:
        for name in list(warming):
            took = run(name, live[name]) if name in live else None
            warming[name] += 1
            if took is None or took >= warmup_seconds / 2 or warming[name] >= max_warmup:
                del warming[name]
        if time.perf_counter() - warm_start >= warmup_seconds:
            break
    times = {name: [] for name in live}
    timing = list(live)
    while timing:
        for name in list(timing):
            took = run(name, live[name]) if name in live else None
            if took is None:
                timing.remove(name)
                continue
            times[name].append(1e3 * took)
            done = times[name]
            if len(done) >= min_reps and (sum(done) >= 1e3 * min_seconds or len(done) >= max_reps):
                timing.remove(name)
    for name, done in times.items():
        if name in out:  # failed after its set-up
            continue
        if len(done) == 1:
            out[name] = ((done[0],) * 3, 1)
        else:
            deciles = statistics.quantiles(done, n=10, method="inclusive")
            out[name] = ((statistics.median(done), deciles[1], deciles[7]), len(done))
    return {name: out[name] for name in calls}


def _without_frames(exc: Exception) -> Exception:
    """The exception without its traceback, whose frames would keep the failed call's tensors
    alive while the other providers run."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def _time_cuda(call, min_reps: int, max_reps: int):
    try:
        from triton.testing import do_bench
    except ImportError:  # Triton is optional: time with CUDA events instead
        return _time_cuda_events(call, min_reps, max_reps)
    q20, q50, q80 = do_bench(call, quantiles=[0.2, 0.5, 0.8], warmup=10, rep=50)
    return (q50, q20, q80), None


def _time_cuda_events(call, min_reps: int, max_reps: int):
    call()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(min_reps, max_reps)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return (statistics.median(times), deciles[1], deciles[7]), len(times)


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def extra_memory_mb(call, s, backward: bool, device: str) -> float:
    """Peak memory of one call beyond what was held before it and the returned gradient.
    No gc.collect() first (0.2 s each, with torch.compile loaded): garbage still held is part
    of the baseline, and freeing it during the call cannot raise the peak."""
    s.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = 1024 * _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        call()
        peak = 1024 * _status_kb("VmHWM")
    grad = s.grad.numel() * s.grad.element_size() if (backward and s.grad is not None) else 0
    return max(0.0, (peak - base - grad) / 2**20)


# ----------------------------------------------------------------------------- the sweep
def build_cases(args) -> list[Case]:
    defaults = CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES
    ops = [o for o in OPS if any(fnmatch.fnmatch(o, pat) for pat in (args.op or ["*"]))]
    if not ops:
        raise SystemExit(f"--op {args.op} matches none of {list(OPS)}")
    modes = MODES if args.mode == "both" else (args.mode,)
    dtypes = args.dtype or defaults["dtypes"]
    cases = []
    for op in ops:
        family = OPS[op].family
        if args.shape:
            shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shape]
        else:
            rows = defaults["groups"] if family == "sinkhorn" else defaults["rows"]
            shapes = [(n, v) for n in rows for v in defaults["vocab"]]
        for dtype in dtypes:
            for mode in modes:
                cases += [Case(op, n, v, dtype, mode, args.device) for n, v in shapes]
    if not args.shape:  # headline shapes of every op first, then the rest of the grid
        order = {op: i for i, op in enumerate(ops)}
        cases.sort(key=lambda c: ((c.rows, c.vocab) not in HEADLINE_SHAPES, order[c.op]))
    return cases


def _error(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


_COPY = " copy"  # the yardstick's name among a case's calls; no provider's name has a space


def run_case(case: Case, providers: list[str], inputs, bar=None) -> list[dict]:
    """One row per provider; a plain copy of the student logits is timed among them (taking
    turns on CPU), as the yardstick of the bandwidth ratios."""
    op = OPS[case.op]
    s, t, y = inputs
    elem = s.element_size()
    nbytes = min_bytes(op, case.rows, case.vocab, elem, case.backward)
    rows, calls = {}, {}
    for name in providers:
        rows[name] = dict(asdict(case), provider=name, min_bytes=nbytes)
        try:
            fn = provider_fn(name, op)
        except Exception as exc:
            rows[name].update(status=_error(exc))
            continue
        s_in = s.detach().requires_grad_(case.backward)
        calls[name] = (functools.partial(call_once, fn, s_in, t, y, case.backward), s_in)
    scratch = torch.empty_like(s)
    timed = time_calls({_COPY: functools.partial(scratch.copy_, s),
                        **{name: call for name, (call, _) in calls.items()}}, case.device)
    del scratch
    copied = timed.pop(_COPY)
    copy = float("nan") if isinstance(copied, Exception) else copied[0][0]
    copy_gbps = 2 * case.rows * case.vocab * elem / copy / 1e6
    for row in rows.values():
        row.update(copy_ms=copy, copy_gbps=copy_gbps)
    for name, result in timed.items():
        row = rows[name]
        if isinstance(result, Exception):  # report and go on with the sweep
            row.update(status=_error(result))
            continue
        (med, q20, q80), reps = result
        gbps = nbytes / med / 1e6
        row.update(status="ok", median_ms=med, q20_ms=q20, q80_ms=q80, reps=reps, gbps=gbps,
                   fraction_of_copy=gbps / copy_gbps)
        if case.device == "cuda":
            call, s_in = calls[name]
            try:
                row["extra_peak_mb"] = extra_memory_mb(call, s_in, case.backward, case.device)
            except torch.cuda.OutOfMemoryError:  # timed, but not measurable next to the others
                torch.cuda.empty_cache()
    if bar is not None:
        bar.update(len(providers))
    out = list(rows.values())
    eager = next((r for r in out if r["provider"] == "eager" and r["status"] == "ok"), None)
    for r in out:
        if eager and r["status"] == "ok":
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"]
    return out


def sweep(cases: list[Case], provider_filter, progress: bool = True, max_minutes=None,
          checkpoint=None) -> tuple[list[dict], list[str]]:
    """Runs every case on its providers; `max_minutes` stops starting new cases after that
    long (noted), and `checkpoint(results)` is called after every case so that an
    interrupted run keeps what it measured."""
    notes: set = set()
    start = time.monotonic()
    plan = []
    for case in cases:
        names = provider_names(OPS[case.op], case.device, notes)
        if provider_filter:
            names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in provider_filter)]
        plan.append((case, names))
    total = sum(len(n) for _, n in plan)
    bar = _progress(total, progress)
    results = []
    inputs_key, inputs = None, None
    for done, (case, names) in enumerate(plan):
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            notes.add(f"time budget of {max_minutes} min reached: {len(plan) - done} of {len(plan)} "
                      "cases not run")
            break
        key = (case.rows, case.vocab, case.dtype, case.device)
        if key != inputs_key:
            inputs = None
            gc.collect()
            inputs = make_inputs(case.rows, case.vocab, getattr(torch, case.dtype), case.device)
            inputs_key = key
        if bar is not None:
            bar.set_description(f"{case.op} {case.rows}x{case.vocab} {case.mode}")
        rows = run_case(case, names, inputs, bar)
        if rows and math.isnan(rows[0]["copy_ms"]):  # GB/s are still reported, ratios are not
            notes.add(f"copy timing failed at {case.rows}x{case.vocab}")
        results += rows
        if checkpoint is not None:
            checkpoint(results)
    if bar is not None:
        bar.close()
    return results, sorted(notes)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------- CPU memory
def cpu_memory_child(spec_path: str, out_path: str) -> None:
    """Child process: one warm-up and one measured call per (case, provider) in the spec."""
    spec = json.loads(Path(spec_path).read_text())
    found = {}
    inputs_key, inputs = None, None
    for item in spec:
        case = Case(**item["case"])
        key = (case.rows, case.vocab, case.dtype)
        if key != inputs_key:
            inputs = None
            gc.collect()
            inputs = make_inputs(case.rows, case.vocab, getattr(torch, case.dtype), "cpu")
            inputs_key = key
        s, t, y = inputs
        s_in = s.detach().requires_grad_(case.backward)
        try:
            fn = provider_fn(item["provider"], OPS[case.op])
            call = lambda: call_once(fn, s_in, t, y, case.backward)  # noqa: E731
            call()
            found[item["id"]] = extra_memory_mb(call, s_in, case.backward, "cpu")
        except Exception:  # the timing pass reports the error
            pass
    Path(out_path).write_text(json.dumps(found))


def add_cpu_memory(results: list[dict]) -> str:
    """Fills extra_peak_mb of the CPU rows from one child process; returns a note."""
    todo = [r for r in results if r["device"] == "cpu" and r["status"] == "ok"]
    if not todo:
        return "memory: nothing to measure (no successful CPU run)"
    if not Path("/proc/self/clear_refs").exists():
        return "memory: not measured (needs Linux /proc/self/clear_refs)"
    with tempfile.TemporaryDirectory() as tmp:
        spec = [{"id": i, "provider": r["provider"],
                 "case": {k: r[k] for k in ("op", "rows", "vocab", "dtype", "mode", "device")}}
                for i, r in enumerate(todo)]
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        cmd = [sys.executable, "-c", f"import sys; from {__package__}.harness import cpu_memory_child; "
               "cpu_memory_child(sys.argv[1], sys.argv[2])", str(spec_path), str(out_path)]
        root = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.exists():
            return f"memory: child process failed ({proc.stderr.strip().splitlines()[-1:] or proc.returncode})"
        found = json.loads(out_path.read_text())
    for i, r in enumerate(todo):
        r["extra_peak_mb"] = found.get(str(i))
    return "memory: peak RSS beyond inputs and gradient, one child process, MALLOC_MMAP_THRESHOLD_=65536"


# ----------------------------------------------------------------------------- output
@functools.lru_cache(maxsize=None)  # asked again for every checkpoint
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_")


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:  # not a checkout
        return "unknown"


def metadata(device: str, notes: list[str]) -> dict:
    meta = {"device": device_name(device), "device_type": device, "torch": torch.__version__,
            "triton": None, "pykernels": pk.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S"),
            "commit": git_commit(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda": torch.version.cuda,
            "notes": notes}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


CSV_FIELDS = ["op", "mode", "rows", "vocab", "dtype", "device", "provider", "status", "median_ms",
              "q20_ms", "q80_ms", "reps", "speedup_vs_eager", "min_bytes", "gbps", "copy_ms",
              "copy_gbps", "fraction_of_copy", "extra_peak_mb"]


def write_results(results: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    with csv_path.open("w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in meta.items() if k != "notes"))
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    return [json_path, csv_path]


def plot_results(results: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    """Time and memory against V, one line per provider, one panel per op; one figure per
    (metric, mode, dtype, rows-per-family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in results if r["status"] == "ok"]
    for mode in MODES:
        for dtype in sorted({r["dtype"] for r in ok}):
            sel = [r for r in ok if r["mode"] == mode and r["dtype"] == dtype]
            if not sel:
                continue
            ops = list(dict.fromkeys(r["op"] for r in sel))
            for metric, label in (("median_ms", "time (ms, median)"), ("extra_peak_mb", "extra memory (MB)")):
                cols = min(4, len(ops))
                fig, axes = plt.subplots(math.ceil(len(ops) / cols), cols, squeeze=False,
                                         figsize=(4 * cols, 3.2 * math.ceil(len(ops) / cols)))
                for ax, op in zip(axes.flat, ops):
                    rows_of_op = [r for r in sel if r["op"] == op]
                    n = max(r["rows"] for r in rows_of_op)  # the largest N of the sweep
                    for prov in dict.fromkeys(r["provider"] for r in rows_of_op):
                        pts = sorted((r["vocab"], r.get(metric)) for r in rows_of_op
                                     if r["provider"] == prov and r["rows"] == n and r.get(metric) is not None)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                    ax.set_title(f"{op} (N={n})", fontsize=9)
                    ax.set_xlabel("V")
                    ax.set_ylabel(label, fontsize=8)
                    if metric == "median_ms":
                        ax.set_yscale("log")
                    ax.grid(alpha=0.3)
                    ax.legend(fontsize=7)
                for ax in list(axes.flat)[len(ops):]:
                    ax.axis("off")
                fig.suptitle(f"{meta['device']} - {mode}, {dtype} - {meta['date']} ({meta['commit']})", fontsize=10)
                fig.tight_layout()
                kind = "time" if metric == "median_ms" else "memory"
                path = out_dir / f"{stem}_{kind}_{mode.replace('+', '_')}_{dtype}.png"
                fig.savefig(path, dpi=90)
                plt.close(fig)
                paths.append(path)
    return paths


def format_table(results: list[dict]) -> str:
    """One line per (op, mode, dtype, shape): each provider's median time, pykernels' best
    speed-up over eager, and extra memory."""
    providers = list(dict.fromkeys(r["provider"] for r in results))
    head = ["op", "mode", "dtype", "N x V"] + [f"{p} ms" for p in providers] + ["best pk vs eager", "extra MB (pk / eager)"]
    lines = []
    groups = {}
    for r in results:
        groups.setdefault((r["op"], r["mode"], r["dtype"], r["rows"], r["vocab"]), {})[r["provider"]] = r
    op_order = {name: i for i, name in enumerate(OPS)}
    for (op, mode, dtype, n, v), by in sorted(groups.items(), key=lambda kv: (op_order.get(kv[0][0], 99),) + kv[0][1:]):
        cells = [op, mode, dtype, f"{n}x{v}"]
        for p in providers:
            r = by.get(p)
            cells.append("-" if r is None else (f"{r['median_ms']:.2f}" if r["status"] == "ok" else "error"))
        ours = [r for p, r in by.items() if p.startswith("pykernels-") and r["status"] == "ok"]
        best = min(ours, key=lambda r: r["median_ms"]) if ours else None
        cells.append(f"{best['speedup_vs_eager']:.2f}x" if best and "speedup_vs_eager" in best else "-")
        eager = by.get("eager")

        def mb(r):
            return "-" if r is None or r.get("extra_peak_mb") is None else f"{r['extra_peak_mb']:.0f}"

        cells.append(f"{mb(best)} / {mb(eager)}")
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pykernels-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--op", nargs="+", help=f"ops (glob patterns) among {list(OPS)}")
    p.add_argument("--shape", nargs="+", help="N x V shapes, e.g. 1024x32000 (G x V for Sinkhorn ops)")
    p.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--provider", nargs="+", help="providers (glob patterns), e.g. eager 'pykernels-*'")
    p.add_argument("--mode", choices=MODES + ("both",), default="fwd+bwd")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--stem", default=None, help="result file name stem (default bench_<date>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the memory child process")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new cases after this long (results so far are kept)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cases = build_cases(args)
    out_dir = args.results_dir / device_dir_name(device_name(args.device))
    stem = args.stem or f"bench_{time.strftime('%Y-%m-%d')}"
    checkpoint = lambda res: write_results(res, metadata(args.device, ["partial"]), out_dir, stem)  # noqa: E731
    results, notes = sweep(cases, args.provider, progress=not args.no_progress,
                           max_minutes=args.max_minutes, checkpoint=checkpoint)
    if args.device == "cpu" and not args.no_memory:
        notes.append(add_cpu_memory(results))
    meta = metadata(args.device, notes)
    files = write_results(results, meta, out_dir, stem)
    if not args.no_plots:
        files += plot_results(results, meta, out_dir, stem)
    isa = f"  {meta['cpu_capability']}, {meta['threads']} threads" if meta["device_type"] == "cpu" else ""
    print(f"\n{meta['device']}{isa}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}  "
          f"commit {meta['commit']}")
    for note in notes:
        print(f"note: {note}")
    print(format_table(results))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['op']} {r['rows']}x{r['vocab']} {r['mode']} {r['provider']}: {r['status']}")
    print("wrote " + ", ".join(str(f) for f in files))
    return {"meta": meta, "results": results, "files": files}


def cli() -> None:
    """Console-script entry point (pykernels-bench)."""
    main()
