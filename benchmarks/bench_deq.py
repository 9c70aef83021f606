"""DEQ layers: forward/backward time, backward memory and gradient accuracy of the IFT vs unrolling.

The tutorial's layer z = tanh(W z + x) with d units on a batch of B inputs (||W|| about 0.5, float64).
Rows: forward by plain iteration or Anderson acceleration, backward by the IFT with Neumann or GMRES
(through `bbd.implicit` with `bbd.FixedPoint`), and the baseline of backpropagating through the unrolled
iteration. Columns: forward and backward time (best of `repeat`), their ratio, the bytes autograd saves
for the backward (memory that grows with the iteration count when unrolled), and the max relative error
of dL/dx against the dense IFT formula on the first instances.

Run:  python benchmarks/bench_deq.py [--fast]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from blackbox_diff import saved_tensor_bytes
from blackbox_diff.deq import DEQ


class TanhLayer(torch.nn.Module):
    def __init__(self, d: int, scale: float) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(scale * torch.randn(d, d, dtype=torch.float64) / math.sqrt(d))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def dense_grad(f: TanhLayer, x: torch.Tensor, z: torch.Tensor, n: int) -> torch.Tensor:
    """dL/dx for L = sum(z*) on the first n instances, by the dense IFT."""
    d = x.shape[1]
    rows = []
    for b in range(n):
        D = 1 - z[b] ** 2
        A = torch.eye(d, dtype=x.dtype) - D[:, None] * f.W.detach()
        u = torch.linalg.solve(A.T, torch.ones(d, dtype=x.dtype))
        rows.append(u * D)
    return torch.stack(rows)


def measure(fn, x, repeat):
    best_f = best_b = float("inf")
    for _ in range(repeat):
        xs = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        z = fn(xs)
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(z.sum(), xs)
        best_f, best_b = min(best_f, t1 - t0), min(best_b, time.perf_counter() - t1)
    mem = saved_tensor_bytes(lambda: fn(x.clone().requires_grad_(True)))
    return best_f, best_b, mem, g, z.detach()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="d = 200, B = 8")
    parser.add_argument("--json", help="write the table as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    d, B, repeat = (200, 8, 2) if args.fast else (1000, 32, 3)
    tol = 1e-8
    torch.manual_seed(0)
    f = TanhLayer(d, 0.5)
    x = torch.randn(B, d, dtype=torch.float64)
    cases = []
    for solver in ("iteration", "anderson"):
        for ls in ("neumann", "gmres"):
            layer = DEQ(f, solver=solver, linear_solver=ls, tol=tol, max_iter=300)
            cases.append((f"{solver} + IFT {ls}", layer))
    k = cases[0][1].solve(x).iterations

    def unrolled(xs, n):
        z = torch.zeros_like(xs)
        for _ in range(n):
            z = f(z, xs)
        return z

    cases += [(f"unrolled {k} iterations", lambda xs: unrolled(xs, k)),
              (f"unrolled {2 * k} iterations", lambda xs: unrolled(xs, 2 * k))]
    rows = []
    ref = None
    for name, fn in cases:
        fwd, bwd, mem, g, z = measure(fn, x, repeat)
        if ref is None:
            ref = dense_grad(f, x, z, 2)
        err = float((g[:2] - ref).abs().max() / ref.abs().max())
        iters = fn.last.iterations if isinstance(fn, DEQ) else None
        rows.append({"method": name, "fwd_ms": 1e3 * fwd, "bwd_ms": 1e3 * bwd, "bwd_over_fwd": bwd / fwd,
                     "saved_MB": mem / 2**20, "grad_rel_err": err, "forward_evals": iters})
    print(f"d = {d}, batch = {B}, tol = {tol:g}")
    print(f"{'method':26s} {'fwd ms':>8s} {'bwd ms':>8s} {'bwd/fwd':>8s} {'saved MB':>9s} {'grad rel err':>13s}")
    for r in rows:
        print(f"{r['method']:26s} {r['fwd_ms']:8.1f} {r['bwd_ms']:8.1f} {r['bwd_over_fwd']:8.2f} "
              f"{r['saved_MB']:9.2f} {r['grad_rel_err']:13.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
