"""The benchmarks no other test runs, in --fast mode: they run, compare what they say they compare, and
report the accuracy they claim (times are printed, never asserted: this machine is shared and noisy)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_bench_adjoint_fast_solvers_agree():
    import bench_adjoint

    rows = bench_adjoint.main(["--fast"])
    assert [r["N"] for r in rows] == [50, 100]
    for r in rows:
        assert all(r[f"{s}_s"] > 0 for s in ("dense", "minres", "gmres"))
        assert r["max_rel_err"] < 1e-8


def test_bench_argmin_fast_matches_the_closed_form_and_torchopt():
    import bench_argmin

    (row,) = bench_argmin.main(["--fast"])
    assert row["n"] == 100
    assert row["ours_err"] < 1e-9 and row["ours_root_err"] < 1e-9
    assert row["torchopt_err"] < 1e-9  # torchopt is a dev dependency: its column must be there
    assert row["ours/torchopt"] > 0 and row["ours_root/torchopt"] > 0
    # forward mode: the JVP against the closed form H^{-1} t (its time is printed, never asserted)
    assert row["ours_jvp_err"] < 1e-9 and row["ours_root_jvp_err"] < 1e-9
    assert all(math.isfinite(row[k]) for k in ("ours_jvp/bwd", "ours_root_jvp/bwd", "ours_func_jvp/bwd"))


def test_bench_ode_fast_reports_accuracy_beside_time():
    import bench_ode

    rows = bench_ode.main(["--fast"])
    by_name = {r["method"]: r for r in rows}
    assert {"radau5 + IFT h=2.5", "radau5 + IFT h=1", "trapezoid + IFT h=0.25"} <= set(by_name)
    assert any(name.startswith("dopri5 adjoint") for name in by_name)
    # radau5 with unit steps is accurate to better than 1e-3 against the tight dopri5 reference
    assert by_name["radau5 + IFT h=1"]["grad_rel_err"] < 1e-3
    assert all(math.isfinite(r["grad_rel_err"]) and r["fwd_ms"] > 0 for r in rows)


def test_bench_scale_fast_every_executor_gives_the_serial_answers(capsys):
    import bench_scale

    rows = bench_scale.main(["--fast"])
    kinds = {r["executor"] for r in rows}
    assert {"serial", "threads", "processes", "pool (owned)", "dask", "ray"} <= kinds
    for r in rows:
        # Dask and Ray workers run BLAS single-threaded: SLSQP's answers may move in the last digits
        assert r["max_err"] < 1e-6, r
        assert r["solves_per_s"] > 0 and r["B"] == 100
    assert "ray is not installed" not in capsys.readouterr().out


def test_check_cost_timers_see_the_checks_of_every_layer():
    # The issue-13 tables time certification where it runs: each layer's row must have seen it (a timer
    # patched onto a function the call no longer goes through would report 0 and a flattering ratio).
    import bench_mpc
    import bench_qp

    for row in bench_qp.check_cost(10, 2, repeats=2):
        assert row["certification_ms"] > 0 and row["degeneracy_ms"] > 0 and row["backward_ms"] > 0, row
    rows = bench_mpc.check_cost(5, reps=2)
    assert {(r["adjoint"], r["case"]) for r in rows} == {(a, c) for a in ("sparse_lu", "engine")
                                                          for c in bench_mpc.STARTS}
    for r in rows:
        assert r["certification"] > 0 and r["degeneracy"] > 0, r
        # The LU the degeneracy test triggers is set apart only where the residual reuses it.
        assert (r["LU moved from the residual"] > 0) == (r["adjoint"] == "sparse_lu"), r
