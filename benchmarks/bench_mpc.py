"""Cart-pole MPC (casadi.Opti + IPOPT) as a layer: cost of the sensitivity against re-solving, finite
differences and CasADi's own nlpsol sensitivity; accuracy against a tight-tolerance finite-difference
reference, with the control bounds inactive and active.

Run:  python benchmarks/bench_mpc.py [--fast] [--reps N]

Every time is the minimum over `--reps` repetitions in this one run (the minimum, not the median: on a busy
2-core machine the scheduler's 4 ms time slices land on random repetitions); compare ratios, not absolute
numbers across machines. Targets: backward <= 1x a warm re-solve, >= 10x faster than central finite differences,
gradient within 1e-8 of the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mpc_imitation as mpc  # noqa: E402

TIGHT = {"ipopt.tol": 1e-10, "ipopt.acceptable_tol": 1e-10}
STARTS = {"bounds inactive": [0.05, 0.0, 0.1, 0.0], "bounds active": [0.2, 0.3, 0.4, 0.4]}


def _best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.min(times))


def _params(x0):
    x0 = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(mpc.TRUE_WEIGHTS, dtype=torch.float64, requires_grad=True)
    length = torch.tensor(mpc.TRUE_LENGTH, dtype=torch.float64, requires_grad=True)
    return [x0, w, length]


def _probe(T: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(4, T + 1)), rng.normal(size=(1, T))


def _loss(X, U, probe):
    return (X * torch.as_tensor(probe[0])).sum() + (U * torch.as_tensor(probe[1])).sum()


def _loss_np(x: np.ndarray, T: int, probe) -> float:
    n = 4 * (T + 1)
    X = x[:n].reshape(T + 1, 4).T  # CasADi stores X column by column
    return float((X * probe[0]).sum() + (x[n:].reshape(1, T) * probe[1]).sum())


def _polished(layer):
    """The layer's forward without gradients: IPOPT, then Newton steps onto the active set (machine precision)."""
    def solve(*args):
        with torch.no_grad():
            X, U = layer(*[torch.as_tensor(a) for a in args])
        return _Solution(np.concatenate([X.numpy().T.reshape(-1), U.numpy().reshape(-1)]))
    return solve


class _Solution:
    def __init__(self, x):
        self.x = x


def _fd_gradient(solve, params, T, probe, h, stencil):
    base = [p.detach().numpy().copy() for p in params]
    grads = []
    for k, b in enumerate(base):
        g = np.zeros(b.size)
        for j in range(b.size):
            def at(step, k=k, j=j):
                args = [q.copy() for q in base]
                args[k].reshape(-1)[j] += step
                return _loss_np(solve(*args).x, T, probe)
            if stencil == 2:
                g[j] = (at(h) - at(-h)) / (2 * h)
            else:
                g[j] = (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)
        grads.append(g)
    return np.concatenate(grads)


def _casadi_sensitivity(layer, params, T):
    """CasADi's own parametric sensitivity: d x*/d p of the nlpsol call, through an MX graph."""
    import casadi as ca

    solver = layer.compiled.solve
    kernels = layer.compiled.condition.kernels
    p_num = np.concatenate([q.detach().numpy().reshape(-1) for q in params])
    P = ca.MX.sym("P", p_num.size)
    lbg, ubg = kernels.bounds_g(p_num)
    sol = solver._cold(x0=solver.x0, p=P, lbg=lbg, ubg=ubg)
    jac = ca.Function("sens", [P], [ca.jacobian(sol["x"], P)])
    return lambda: np.asarray(jac(p_num).full())


def bench(T: int, reps: int) -> dict:
    probe = _probe(T)
    warm = mpc.mpc_layer(T, 0.05, warm_start=True)
    cold = mpc.mpc_layer(T, 0.05)
    params = _params(STARTS["bounds active"])
    args = [p.detach().numpy() for p in params]
    row: dict = {"T": T}
    row["cold solve"] = _best_ms(lambda: cold.compiled.solve(*args), reps)
    warm.compiled.solve(*args)
    row["warm re-solve"] = _best_ms(lambda: warm.compiled.solve(*args), reps)
    row["layer forward"] = _best_ms(lambda: warm(*params), reps)
    _loss(*warm(*params), probe).backward()  # first backward pays torch's lazy imports
    times = []
    for _ in range(reps):
        loss = _loss(*warm(*params), probe)
        t = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - t)
    row["backward (ours)"] = 1e3 * float(np.min(times))
    row["central FD"] = _best_ms(
        lambda: _fd_gradient(warm.compiled.solve, params, T, probe, 1e-6, 2), max(3, reps // 5)
    )
    sens = _casadi_sensitivity(cold, params, T)
    row["casadi nlpsol sens."] = _best_ms(sens, max(3, reps // 5))
    # Accuracy: tight-tolerance solves, our gradient vs a 5-point finite-difference reference.
    tight = mpc.mpc_layer(T, 0.05, solver_options=TIGHT)
    for name, x0 in STARTS.items():
        if name == "bounds active" and T < 20:  # a short horizon needs a harder start to saturate u
            x0 = [0.3, 0.5, 0.6, 0.8]
        ps = _params(x0)
        X, U = tight(*ps)
        _loss(X, U, probe).backward()
        ours = np.concatenate([p.grad.numpy().reshape(-1) for p in ps])
        ref = _fd_gradient(_polished(tight), ps, T, probe, 1e-4, 5)
        row[f"err {name}"] = float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))
        row[f"active u ({name})"] = int((U.detach().abs() > mpc.U_MAX - 1e-6).sum())
        if name == "bounds inactive":
            J = _casadi_sensitivity(tight, ps, T)()
            n = 4 * (T + 1)
            n_u = J.shape[0] - n
            dl_dx = np.concatenate([probe[0].T.reshape(-1), probe[1].reshape(-1)[:n_u]])
            theirs = dl_dx @ J
            row["err casadi sens. (inactive)"] = float(np.abs(theirs - ref).max() / max(1.0, np.abs(ref).max()))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="T=10 only, few repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    horizons = (10,) if args.fast else (20, 50)
    reps = args.reps or (5 if args.fast else 40)
    torch.set_num_threads(1)
    rows = [bench(T, reps) for T in horizons]
    cols = ["cold solve", "warm re-solve", "layer forward", "backward (ours)", "central FD", "casadi nlpsol sens."]
    print(f"\nCart-pole MPC, IPOPT, best of {reps} runs [ms]")
    print(f"{'T':>4} " + " ".join(f"{c:>20}" for c in cols))
    for r in rows:
        print(f"{r['T']:>4} " + " ".join(f"{r[c]:>20.3f}" for c in cols))
    print("\nratios (target: backward/warm <= 1, FD/backward >= 10)")
    for r in rows:
        r["backward / warm re-solve"] = r["backward (ours)"] / r["warm re-solve"]
        r["FD / backward"] = r["central FD"] / r["backward (ours)"]
        print(f"T={r['T']:>3}: backward / warm re-solve = {r['backward / warm re-solve']:.2f}x, "
              f"FD / backward = {r['FD / backward']:.1f}x, casadi sens. / backward = "
              f"{r['casadi nlpsol sens.'] / r['backward (ours)']:.1f}x")
    print("\naccuracy vs 5-point FD (h=1e-4) of IPOPT (tol 1e-10) + Newton polish (max abs error / max(1, |grad|))")
    for r in rows:
        print(f"T={r['T']:>3}: ours, u bounds inactive {r['err bounds inactive']:.2e}; ours, "
              f"{r['active u (bounds active)']} u bounds active {r['err bounds active']:.2e}; "
              f"CasADi nlpsol sensitivity, bounds inactive {r['err casadi sens. (inactive)']:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
