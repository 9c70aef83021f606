"""The MPC imitation showcase (examples/mpc_imitation.py) in --fast mode: it learns through the layer."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mpc_imitation  # noqa: E402


@pytest.mark.slow
def test_mpc_imitation_fast_learns_weights_and_pole_length(tmp_path, capsys):
    out = mpc_imitation.main(["--fast", "--quiet", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "MPC-IFT (ours)" in printed and "Behavioral Cloning" in printed and str(tmp_path) in printed
    assert Path(out["png"]).is_file() and Path(out["png"]).stat().st_size > 10_000
    losses = out["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]  # the imitation loss falls through the implicit gradient
    # The pole length starts at 1.0; the true one is 0.5.
    assert abs(out["length"] - mpc_imitation.TRUE_LENGTH) < 0.1
    table = out["table"]
    for split in ("low", "high"):
        expert, bc, ours = (table[(name, split)][0] for name in
                            ("Expert", "Behavioral Cloning", "MPC-IFT (ours)"))
        assert all(math.isfinite(v) for v in (expert, bc, ours))
        assert ours < bc  # the learned MPC imitates the expert better than behavioural cloning
        assert ours < 1.5 * expert


def test_mpc_benchmark_fast_reports_exact_gradients_where_casadi_is_wrong(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_mpc

    (row,) = bench_mpc.main(["--fast", "--reps", "2"])
    out = capsys.readouterr().out
    assert "backward / warm re-solve" in out
    assert row["err bounds inactive"] < 1e-8
    assert row["err bounds active"] < 1e-8
    assert row["active u (bounds active)"] > 0
    assert row["err casadi sens. (inactive)"] > 0.1  # CasADi 3.8's own sensitivity with inactive bounds
    assert all(row[k] > 0 for k in ("warm re-solve", "backward (ours)", "central FD"))
    if bench_mpc.mpc_pytorch is None:  # the Makefile installs it; a bare `pip install -e .[dev]` does not
        assert "mpc.pytorch: not installed" in out
        return
    # mpc.pytorch solves the same MPC (its iLQR lands within 1e-3 of IPOPT's controls) but differentiates the
    # LQR approximation: its gradient is far from the reference where ours matches it to 1e-8.
    assert row["mpc.pytorch |u - u*| bounds inactive"] < 1e-3
    assert row["mpc.pytorch err bounds inactive"] > 1e-3
    assert row["mpc.pytorch forward"] > 0 and row["mpc.pytorch backward"] > 0
