"""The benchmark harness itself (benchmarks/harness.py) on tiny shapes: providers skipped with a
note, errors reported without ending the sweep, result files with their metadata, the
minimal-bytes model, plots."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchmarks.harness as harness  # noqa: E402  (a broken harness must fail, not skip)
import benchmarks.ops as bench_ops  # noqa: E402

HAS_EXT = "cpu" in __import__("pykernels").available_backends("cpu")


def test_minimal_bytes_model():
    ops = bench_ops.OPS
    N, V = 7, 1000
    # two logit tensors read, plus the student gradient written in forward + backward
    assert bench_ops.min_bytes(ops["forward_kl"], N, V, 2, backward=True) == 3 * N * V * 2
    assert bench_ops.min_bytes(ops["jsd"], N, V, 4, backward=False) == 2 * N * V * 4
    # token log-probs read one tensor
    assert bench_ops.min_bytes(ops["logprobs_entropy"], N, V, 2, backward=True) == 2 * N * V * 2
    assert bench_ops.min_bytes(ops["logprobs_entropy"], N, V, 2, backward=False) == N * V * 2
    assert bench_ops.min_bytes(ops["sinkhorn_l1"], N, V, 4, backward=True) == 3 * N * V * 4


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if HAS_EXT else []))
def test_every_op_has_eager_and_pykernels_agreeing(backend):
    """Each benchmarked pair computes the same loss (the table compares like with like)."""
    s, t, y = bench_ops.make_inputs(6, 50, torch.float32, "cpu")
    for name, op in bench_ops.OPS.items():
        ours = op.ours(s, t, y, backend).item()
        eager = op.eager(s, t, y).item()
        assert ours == pytest.approx(eager, rel=2e-4, abs=1e-6), (name, backend)


def test_providers_skipped_with_a_note():
    notes = set()
    names = harness.provider_names(bench_ops.OPS["forward_kl"], "cpu", notes)
    assert "eager" in names and "compile" in names
    assert "pykernels-triton" not in names  # interpreter only on CPU
    assert "liger" not in names
    assert any(n.startswith("liger") for n in notes)
    if "triton" in __import__("pykernels").available_backends("cpu"):
        assert any("pykernels-triton" in n for n in notes)


def _args(tmp_path, *extra):
    return ["--op", "forward_kl", "logprobs_entropy", "--shape", "8x64", "16x128",
            "--results-dir", str(tmp_path), "--no-progress", *extra]


@pytest.mark.skipif(not HAS_EXT, reason="C++ extension not built")
def test_sweep_writes_results_table_and_plots(tmp_path, capsys):
    out = harness.main(_args(tmp_path, "--mode", "both", "--provider", "eager", "pykernels-*", "compile"))
    meta, results = out["meta"], out["results"]
    for key in ("device", "torch", "date", "commit"):
        assert meta[key], key
    assert "triton" in meta  # None when Triton is not installed
    # 2 ops x 2 shapes x 2 modes x 3 providers
    assert len(results) == 24
    assert all(r["status"] == "ok" for r in results), [r["status"] for r in results]
    for r in results:
        elem = 4
        n_inputs = 1 if r["op"] == "logprobs_entropy" else 2
        assert r["min_bytes"] == (n_inputs + (r["mode"] == "fwd+bwd")) * r["rows"] * r["vocab"] * elem
        assert r["gbps"] == pytest.approx(r["min_bytes"] / r["median_ms"] / 1e6)
        assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["extra_peak_mb"] is not None and r["extra_peak_mb"] >= 0
    eager = {(r["op"], r["rows"], r["mode"]): r["median_ms"] for r in results if r["provider"] == "eager"}
    for r in results:
        assert r["speedup_vs_eager"] == pytest.approx(eager[(r["op"], r["rows"], r["mode"])] / r["median_ms"])
    out_dir = tmp_path / harness.device_dir_name(meta["device"])
    saved = json.loads((out_dir / f"bench_{meta['date']}.json").read_text())
    assert saved["meta"]["commit"] == meta["commit"] and len(saved["results"]) == 24
    lines = (out_dir / f"bench_{meta['date']}.csv").read_text().splitlines()
    header = [ln for ln in lines if ln.startswith("# ")]
    assert any(ln.startswith("# device:") for ln in header) and any(ln.startswith("# torch:") for ln in header)
    rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("# ")))
    assert len(rows) == 24 and rows[0]["provider"]
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert any("time_fwd_bwd" in p for p in pngs) and any("memory_fwd" in p for p in pngs)
    printed = capsys.readouterr().out
    assert "forward_kl" in printed and "eager ms" in printed


class _FakeClock:
    """Stands in for the harness's `time` module: scripted calls advance a virtual clock by
    the durations given for them, so the timing rules are tested exactly and at once."""

    def __init__(self, durations=(), steady=0.0):
        self.now, self.log = 0.0, []
        self.call = self.scripted("call", durations, steady)

    def perf_counter(self):
        return self.now

    def scripted(self, name, durations, steady, fail_at=None):
        """A call taking `durations` in turn, then `steady` seconds; raising on call `fail_at`."""
        clock, durations = self, list(durations)

        class Call:
            calls = 0

            def __call__(self):
                self.calls += 1
                clock.log.append(name)
                if self.calls == fail_at:
                    raise RuntimeError(f"{name} failed")
                clock.now += durations.pop(0) if durations else steady

        return Call()

    @property
    def calls(self):
        return self.call.calls


def test_cpu_warmup_starts_after_the_setup_call(monkeypatch):
    """A torch.compile'd function: 4 s to compile, then 0.76 s of calls at 190 ms before the
    steady 88 ms. The compilation call must not stand for the warm-up, else the cold calls
    are what gets timed."""
    clock = _FakeClock([4.0] + [0.19] * 4, steady=0.088)
    monkeypatch.setattr(harness, "time", clock)
    (med, q20, q80), reps = harness.time_calls({"compiled": clock.call}, "cpu")["compiled"]
    assert med == pytest.approx(88.0) and q80 == pytest.approx(88.0), (med, q80)
    assert reps >= 3


def test_cpu_warmup_of_slow_calls_is_one_call(monkeypatch):
    """Calls of half the warm-up time or more: a set-up call and one warm-up call, then the
    timed ones (min_reps of them, as min_seconds is already spent)."""
    clock = _FakeClock([3.0, 2.5], steady=1.5)
    monkeypatch.setattr(harness, "time", clock)
    (med, _, _), reps = harness.time_calls({"slow": clock.call}, "cpu")["slow"]
    assert med == pytest.approx(1500.0) and reps == 3
    assert clock.calls == 2 + 3


def test_cpu_calls_take_turns_and_share_the_warmup(monkeypatch):
    """Three providers: one call of each per round, from the set-up call on, and one warm-up
    of about 1 s for all of them (one each would be 3 s)."""
    clock = _FakeClock()
    calls = {"a": clock.scripted("a", [], 0.1), "b": clock.scripted("b", [3.0], 0.2),
             "c": clock.scripted("c", [], 0.05)}
    monkeypatch.setattr(harness, "time", clock)
    out = harness.time_calls(calls, "cpu")
    assert clock.log[:12] == ["a", "b", "c"] * 4, clock.log[:12]
    warmup_rounds = (1.0 + 0.35 - 1e-9) // 0.35  # rounds of 0.35 s until 1 s has passed
    assert clock.log.count("b") == 1 + warmup_rounds + out["b"][1]
    for name, steady in (("a", 100.0), ("b", 200.0), ("c", 50.0)):
        (med, q20, q80), reps = out[name]
        assert med == pytest.approx(steady) and q20 == pytest.approx(steady), name
        assert reps >= 3 and reps * steady >= 100.0
    assert clock.now < 3.0 + 1.0 + 3 * 0.35 + 1.0  # set-ups, one warm-up, timed rounds


def test_cpu_call_failing_midway_leaves_the_others(monkeypatch):
    """A provider that raises in its set-up or in a later call is dropped with its exception;
    the others are timed as if it had not run, and it is not called again."""
    clock = _FakeClock()
    calls = {"setup_fails": clock.scripted("setup_fails", [], 0.1, fail_at=1),
             "ok": clock.scripted("ok", [], 0.1),
             "later_fails": clock.scripted("later_fails", [], 0.1, fail_at=4)}
    monkeypatch.setattr(harness, "time", clock)
    out = harness.time_calls(calls, "cpu")
    assert list(out) == list(calls)
    assert isinstance(out["setup_fails"], RuntimeError) and calls["setup_fails"].calls == 1
    assert isinstance(out["later_fails"], RuntimeError) and calls["later_fails"].calls == 4
    assert out["later_fails"].__traceback__ is None  # its frames (and tensors) are let go
    (med, _, _), reps = out["ok"]
    assert med == pytest.approx(100.0) and reps >= 3


def test_failing_provider_is_reported_and_sweep_goes_on(tmp_path, monkeypatch, capsys):
    real = harness.provider_fn

    def flaky(name, op):
        if name == "eager" and op.name == "forward_kl":
            def boom(s, t, y):
                raise RuntimeError("simulated failure")
            return boom
        return real(name, op)

    monkeypatch.setattr(harness, "provider_fn", flaky)
    out = harness.main(_args(tmp_path, "--provider", "eager", "pykernels-torch", "--no-plots", "--no-memory"))
    status = {(r["op"], r["rows"], r["provider"]): r["status"] for r in out["results"]}
    assert status[("forward_kl", 8, "eager")].startswith("error: RuntimeError: simulated failure")
    assert status[("logprobs_entropy", 8, "eager")] == "ok"
    assert "simulated failure" in capsys.readouterr().out


def test_memory_child_sees_eager_allocations(tmp_path):
    """The CPU memory method counts allocations the allocator would otherwise serve from
    memory it holds: eager forward+backward of forward KL at 256 x 8192 fp32 builds several
    8 MB tensors, the fused kernel none."""
    if not Path("/proc/self/clear_refs").exists() or not HAS_EXT:
        pytest.skip("needs Linux /proc and the C++ extension")
    case = dict(op="forward_kl", rows=256, vocab=8192, dtype="float32", mode="fwd+bwd", device="cpu")
    results = [dict(case, provider=p, status="ok") for p in ("eager", "pykernels-cpu")]
    note = harness.add_cpu_memory(results)
    assert "MALLOC_MMAP_THRESHOLD_" in note
    eager_mb, ours_mb = results[0]["extra_peak_mb"], results[1]["extra_peak_mb"]
    tensor_mb = 256 * 8192 * 4 / 2**20
    assert eager_mb >= 2 * tensor_mb, (eager_mb, tensor_mb)
    assert ours_mb < 0.5 * tensor_mb, (ours_mb, tensor_mb)


def test_cli_filters(tmp_path):
    args = harness.parse_args(["--op", "sinkhorn_*", "--dtype", "bfloat16", "--mode", "fwd"])
    cases = harness.build_cases(args)
    assert {c.op for c in cases} == {"sinkhorn_l1", "sinkhorn_sqeuclidean"}
    assert {c.dtype for c in cases} == {"bfloat16"} and {c.mode for c in cases} == {"fwd"}
    assert {c.rows for c in cases} == set(harness.CPU_SHAPES["groups"])
    with pytest.raises(SystemExit):
        harness.build_cases(harness.parse_args(["--op", "nope"]))
