"""benchmarks/bench_deq.py --fast: torchdeq's IFT rows beside ours on the same layer, and what the table claims."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_deq  # noqa: E402


def test_fast_table_has_torchdeq_ift_rows_beside_ours(capsys):
    import torchdeq  # noqa: F401  (a dev dependency: CI installs it, so a missing one must fail, not skip)

    rows = bench_deq.main(["--fast"])
    out = capsys.readouterr().out
    ours = [r for r in rows if r["library"] == "blackbox_diff"]
    theirs = [r for r in rows if r["library"] == "torchdeq"]
    unrolled = [r for r in rows if r["library"] == "unrolled"]
    assert [r["method"] for r in ours] == [f"{s} + IFT {ls}" for s in ("iteration", "anderson")
                                           for ls in ("neumann", "gmres")]
    assert [r["method"] for r in theirs] == [f"torchdeq {s} + IFT" for s in ("fixed_point_iter", "anderson", "broyden")]
    assert len(unrolled) == 2
    for r in rows:
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and math.isfinite(r["bwd_over_fwd"]) and r["bwd_over_fwd"] > 0
        assert math.isfinite(r["grad_rel_err"])
    for r in ours:
        assert r["grad_rel_err"] < 1e-6
        assert r["forward_residual"] <= 1e-8  # our own criterion, max|f(z)-z| <= tol (1 + max|z|)
    # torchdeq reaches the tolerance in float64 (its 'rel' stop mode) well inside its 300 steps, and its
    # z meets our criterion too; its gradient is as accurate as ours (about 1e-9 here).
    for r in theirs:
        assert r["grad_rel_err"] < 1e-7
        assert r["forward_rel_residual"] <= 1e-8 and r["backward_rel_residual"] <= 1e-8
        assert 0 < r["forward_evals"] < 300 and 0 < r["backward_steps"] < 300
        assert r["forward_residual"] <= 1e-8
        assert f"{r['method']}: forward {r['forward_evals']} steps" in out
        assert f"ours / {r['method']}: backward" in out
    # Our backward memory: the same for every forward solver and far below unrolling, which doubles with
    # the iteration count; torchdeq's IFT keeps about as much as ours.
    mb = [r["saved_MB"] for r in ours]
    assert max(mb) == pytest.approx(min(mb))
    # ours: the answers plus one evaluation of f's graph (3 tensors of the state's size), whatever the iteration
    # count; unrolling keeps one per iteration (about 20 here)
    assert max(mb) < 0.25 * min(r["saved_MB"] for r in unrolled)
    assert unrolled[1]["saved_MB"] == pytest.approx(2 * unrolled[0]["saved_MB"], rel=0.05)
    assert all(r["saved_MB"] < 2 * max(mb) for r in theirs)
    assert "meets our tol" in out and "MISSES" not in out and "not installed" not in out
    assert "ours / fastest torchdeq backward" in out


def test_our_saved_memory_does_not_grow_with_the_iteration_count():
    torch.manual_seed(1)
    f = bench_deq.TanhLayer(40, 0.5)
    x = torch.randn(3, 40, dtype=torch.float64)
    by_evals = bench_deq.saved_mb_vs_iterations(f, x)
    assert len(by_evals) == 3 and max(by_evals) > 2 * min(by_evals)  # 1e-4 vs 1e-12: many more iterations
    assert max(by_evals.values()) == pytest.approx(min(by_evals.values()))


def test_without_torchdeq_one_line_and_no_rows(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # `import torchdeq` now raises ImportError
    f = bench_deq.TanhLayer(10, 0.5)
    assert bench_deq.torchdeq_cases(f, 1e-8, 300) == []
    assert capsys.readouterr().out == "torchdeq: not installed (pip install torchdeq)\n"
