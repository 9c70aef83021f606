"""benchmarks/bench_qp.py in --fast mode: the side-by-side table with cvxpylayers (and qpth when installed)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_qp  # noqa: E402


def test_qp_benchmark_fast_compares_every_installed_anchor(capsys, tmp_path):
    rows = bench_qp.main(["--fast", "--json", str(tmp_path / "qp.json")])
    out = capsys.readouterr().out
    assert [(r["n"], r["B"]) for r in rows] == [(10, 1), (10, 16), (50, 1), (50, 16)]
    for r in rows:
        assert all(r[k] > 0 for k in ("bbd_forward_ms", "bbd_backward_ms", "cvxpylayers_backward_ms"))
        assert r["qplayer_forward_ms"] > 0 and r["qplayer_backward_ms"] > 0
    for r in rows[::2]:  # bbd.QPLayer: exact (DAQP's active set, polished), against a tight Clarabel solve
        assert r["qplayer_grad_error"] < 1e-6
    for r in rows[::2]:  # the gradient error is measured on the first batch size of each n
        assert r["bbd_grad_error"] < 1e-6
        assert math.isfinite(r["cvxpylayers_grad_error"])
        # forward mode (one JVP) against the same central differences: exact too
        assert r["bbd_jvp_error"] < 1e-6 and r["qplayer_jvp_error"] < 1e-6
    for r in rows:  # the JVP columns are there (their values are times: printed, never asserted)
        assert all(math.isfinite(r[k]) for k in ("bbd_jvp_ms", "bbd_jvp_ratio", "qplayer_jvp_ms", "qplayer_jvp_ratio"))
    barely = json.loads((tmp_path / "qp.json").read_text())["barely_active"]
    assert barely["bbd_clarabel"] < 1e-8 and barely["bbd_scs"] < 1e-8  # closed form: 0/1 Jacobians
    assert barely["qplayer"] < 1e-8
    fanout = json.loads((tmp_path / "qp.json").read_text())["fanout"]
    assert set(fanout) == {"serial", "threads", "processes"} and all(v > 0 for v in fanout.values())
    assert "QPLayer forward fan-out" in out and "fwd QPLayer" in out and "jvp QPLayer" in out
    if bench_qp._qpth_layer(bench_qp.fixed_hessian(2)) is None:  # the Makefile installs qpth
        assert "qpth: not installed" in out
    else:
        assert all(r["qpth_backward_ms"] > 0 and r["qplayer_backward_ratio"] > 0 for r in rows)
        assert all(math.isfinite(r["qpth_grad_error"]) for r in rows[::2])
        assert "err qpth" in out
