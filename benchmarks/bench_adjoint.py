"""Adjoint solve: dense batched solve vs MINRES/GMRES on KKT systems, to set `dense_max_size`.

The residual is F(z, theta) = K z - theta with K = [[H, A^T], [A, 0]] (H SPD with spread spectrum,
A full rank): symmetric indefinite, like every KKT system. The black box is numpy's solve. We time the
backward of a batch (B instances, N unknowns) with each linear solver and report the ratio to dense.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import blackbox_diff as bbd


def kkt_matrix(N: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, m = (3 * N) // 4, N - (3 * N) // 4
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    H = U @ np.diag(np.logspace(0, 3, n)) @ U.T
    A = rng.standard_normal((m, n))
    return np.block([[H, A.T], [A, np.zeros((m, m))]])


def time_backward(N: int, B: int, solver: str, repeat: int) -> tuple[float, float]:
    Kn = kkt_matrix(N)
    K = torch.tensor(Kn)
    fn = bbd.implicit(bbd.Root(lambda z, th: K @ z - th, structure="symmetric"), in_dims=0,
                      linear_solver=solver, rtol=1e-10, dense_max_size=10**9)(lambda th: np.linalg.solve(Kn, th))
    theta = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    best, err = float("inf"), 0.0
    for _ in range(repeat):
        th = theta.clone().requires_grad_(True)
        z = fn(th)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (gr,) = torch.autograd.grad(z, th, g)
        best = min(best, time.perf_counter() - t0)
        exact = torch.linalg.solve(K.T, g.T).T
        err = float((gr - exact).abs().max() / exact.abs().max())
    return best, err


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="N in {50, 100}, B = 4 (a smoke run)")
    parser.add_argument("--json", help="write the table as JSON to this path")
    args = parser.parse_args(argv)
    sizes, B, repeat = ([50, 100], 4, 2) if args.fast else ([100, 300, 1000, 2000], 8, 3)
    rows = []
    print(f"{'N':>6} {'B':>3} {'dense ms':>9} {'minres ms':>10} {'gmres ms':>9} {'minres/dense':>13} "
          f"{'gmres/dense':>12} {'max rel err':>12}")
    for N in sizes:
        row = {"N": N, "B": B}
        errs = []
        for solver in ("dense", "minres", "gmres"):
            t, e = time_backward(N, B, solver, repeat)
            row[f"{solver}_s"] = t
            errs.append(e)
        row["max_rel_err"] = max(errs)
        rows.append(row)
        print(f"{N:>6} {B:>3} {1e3 * row['dense_s']:>9.1f} {1e3 * row['minres_s']:>10.1f} {1e3 * row['gmres_s']:>9.1f} "
              f"{row['minres_s'] / row['dense_s']:>13.2f} {row['gmres_s'] / row['dense_s']:>12.2f} "
              f"{row['max_rel_err']:>12.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
