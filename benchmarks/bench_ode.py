"""Implicit ODE layers vs torchdiffeq: forward/backward time beside gradient accuracy.

A random MLP vector field (2 -> 30 -> 30 -> 2, tanh) on a batch of 16 states, integrated over [0, 5]
with 21 output times, loss = MSE to a fixed random target; the gradient with respect to the network's
weights is compared with the true ODE gradient (torchdiffeq dopri5, direct backprop, rtol = atol = 1e-12).
Rows: our implicit methods (per-step IFT, dense adjoint solves) at several step sizes, and dopri5 with
the adjoint method and with direct backprop at several tolerances. ``time/direct`` and ``time/adjoint``
divide a row's fwd+bwd time by that of the fastest dopri5 row of that kind whose gradient error is at
most 1e-3 (the accuracy target). Times are the best of `repeat` runs, single-threaded, measured
round-robin. The last line is the per-call cost of the generic `bbd.implicit` engine on a 2-unknown
root (the reason odeint runs its own per-step autograd Function).

Run:  python benchmarks/bench_ode.py [--fast]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import blackbox_diff as bbd
from blackbox_diff.ode import odeint


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 30), torch.nn.Tanh(), torch.nn.Linear(30, 30), torch.nn.Tanh(), torch.nn.Linear(30, 2)
    ).double()

    class Field(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    field = Field()
    y0 = torch.randn(16, 2, dtype=torch.float64)
    t = torch.linspace(0, 5, 21, dtype=torch.float64)
    target = torch.randn(21, 16, 2, dtype=torch.float64)
    return field, y0, t, target


def _once(field, y0, t, target, fn):
    field.zero_grad()
    t0 = time.perf_counter()
    loss = ((fn(field, y0, t) - target) ** 2).mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.cat([p.grad.reshape(-1) for p in field.parameters()])


def _run_all(field, y0, t, target, cases, repeat):
    """Best fwd/bwd time per case; the repeats go round-robin over the cases so that a change of machine
    load during the run affects every row alike."""
    best = {name: [float("inf"), float("inf"), None] for name, _ in cases}
    for _ in range(repeat):
        for name, fn in cases:
            fwd, bwd, grad = _once(field, y0, t, target, fn)
            b = best[name]
            b[0], b[1], b[2] = min(b[0], fwd), min(b[1], bwd), grad
    return best


def engine_overhead(repeat: int) -> float:
    """Seconds per forward+backward of bbd.implicit on a 2-unknown Root whose solve is free."""
    w = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
    fn = bbd.implicit(bbd.Root(lambda z, w: z * z - w), arrays="torch")(lambda w: torch.sqrt(w))
    best = float("inf")
    for _ in range(repeat * 20):
        t0 = time.perf_counter()
        fn(w).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    import torchdiffeq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer rows and repeats")
    parser.add_argument("--json", help="write the table as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeat = 2 if args.fast else 5
    field, y0, t, target = _setup()
    *_, ref = _once(field, y0, t, target, lambda f, y, tt: torchdiffeq.odeint(f, y, tt, rtol=1e-12, atol=1e-12))
    tols = [1e-3, 1e-5] if args.fast else [1e-3, 1e-4, 1e-5, 1e-7]
    # (method, h, step_check): the default compares every step with two half steps; "none" shows its cost
    ours = [("radau5", 2.5, "doubling"), ("radau5", 1.0, "doubling"), ("radau5", 1.0, "none"),
            ("trapezoid", 0.25, "doubling")]
    if not args.fast:
        ours += [("radau5", 0.5, "doubling"), ("radau3", 0.5, "doubling"), ("backward_euler", 0.05, "doubling"),
                 ("backward_euler", 0.05, "none")]
    cases = []
    for tol in tols:
        cases.append((f"dopri5 direct tol={tol:g}",
                      lambda f, y, tt, tol=tol: torchdiffeq.odeint(f, y, tt, rtol=tol, atol=tol)))
        cases.append((f"dopri5 adjoint tol={tol:g}",
                      lambda f, y, tt, tol=tol: torchdiffeq.odeint_adjoint(f, y, tt, rtol=tol, atol=tol)))
    for method, h, check in ours:
        label = f"{method} + IFT h={h:g}" + ("" if check == "doubling" else f" step_check={check}")
        cases.append((label, lambda f, y, tt, m=method, h=h, c=check: odeint(f, y, tt, method=m, step_size=h,
                                                                              batch_dims=1, step_check=c)))
    rows = []
    for name, (fwd, bwd, grad) in _run_all(field, y0, t, target, cases, repeat).items():
        err = float((grad - ref).norm() / ref.norm())
        rows.append({"method": name, "fwd_ms": 1e3 * fwd, "bwd_ms": 1e3 * bwd, "grad_rel_err": err})
    # Ratios against the fastest dopri5 row of each kind that reaches <= 1e-3 gradient accuracy.
    for kind in ("direct", "adjoint"):
        ok = [r for r in rows if f"dopri5 {kind}" in r["method"] and r["grad_rel_err"] <= 1e-3]
        base = min(ok, key=lambda r: r["fwd_ms"] + r["bwd_ms"]) if ok else None
        for r in rows:
            r[f"vs_{kind}"] = (r["fwd_ms"] + r["bwd_ms"]) / (base["fwd_ms"] + base["bwd_ms"]) if base else None
    print(f"{'method':30s} {'fwd ms':>8s} {'bwd ms':>8s} {'grad rel err':>13s} {'time/direct':>12s} "
          f"{'time/adjoint':>13s}")
    for r in rows:
        vd = f"{r['vs_direct']:.2f}" if r["vs_direct"] else "-"
        va = f"{r['vs_adjoint']:.2f}" if r["vs_adjoint"] else "-"
        print(f"{r['method']:30s} {r['fwd_ms']:8.1f} {r['bwd_ms']:8.1f} {r['grad_rel_err']:13.1e} {vd:>12s} {va:>13s}")
    print("(time/direct, time/adjoint: fwd+bwd relative to the fastest dopri5 row of that kind with grad rel err "
          "<= 1e-3)")
    overhead = engine_overhead(repeat)
    print(f"bbd.implicit per call (2-unknown Root, free solve, fwd+bwd): {1e6 * overhead:.0f} us")
    rows.append({"method": "bbd.implicit overhead per call", "fwd_ms": 1e3 * overhead, "bwd_ms": 0.0,
                 "grad_rel_err": 0.0, "vs_direct": None, "vs_adjoint": None})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
