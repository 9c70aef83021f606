"""Cart-pole MPC (casadi.Opti + IPOPT) as a layer: cost of the sensitivity against re-solving, finite
differences, CasADi's own nlpsol sensitivity and mpc.pytorch (when installed); accuracy against a
tight-tolerance finite-difference reference, with the control bounds inactive and active.

Run:  python benchmarks/bench_mpc.py [--fast] [--reps N]
      python benchmarks/bench_mpc.py --check-cost [--fast] [--reps N]   (what certification and the
      degeneracy test cost, against the backward)

Every time is the minimum over `--reps` repetitions in this one run (the minimum, not the median: on a busy
2-core machine the scheduler's 4 ms time slices land on random repetitions); compare ratios, not absolute
numbers across machines. Targets: backward <= 1x a warm re-solve, >= 10x faster than central finite differences,
gradient within 1e-8 of the reference.

mpc.pytorch (Amos et al. 2018, `pip install --no-deps mpc==0.0.6`; its metadata pins numpy<2, which it does not
need) solves the same problem by box-constrained iLQR and differentiates the final LQR approximation: the same
dynamics (the example's RK4 step, written in torch), cost 0.5 tau' C tau with C = 2 diag(w, 0.05) over T+1 steps
(x_0 is fixed and u_T is 0 at the optimum, so the minimiser is the same), autograd Jacobians.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mpc_imitation as mpc  # noqa: E402

try:
    from mpc import mpc as mpc_pytorch
    from mpc import util as _mpc_util
except ImportError:
    mpc_pytorch = None
else:
    _mpc_util.bdiag = torch.diag_embed  # mpc 0.0.6 predates torch 2.x's removal of the old diag helpers

TIGHT = {"ipopt.tol": 1e-10, "ipopt.acceptable_tol": 1e-10}
STARTS = {"bounds inactive": [0.05, 0.0, 0.1, 0.0], "bounds active": [0.2, 0.3, 0.4, 0.4]}


def _best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.min(times))


def _best_backward_ms(make_loss, reps: int) -> float:
    """Best time of `make_loss().backward()` alone (the forward that builds the loss is not timed)."""
    times = []
    for _ in range(reps):
        loss = make_loss()
        t = time.perf_counter()
        loss.backward()
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


class _TorchCartPole(torch.nn.Module):
    """The example's RK4 cart-pole step on a batch of states (B, 4) and forces (B, 1), in torch."""

    ops = types.SimpleNamespace(sin=torch.sin, cos=torch.cos, vertcat=lambda *rows: torch.stack(rows))

    def __init__(self, length: torch.Tensor, dt: float):
        super().__init__()
        self.length, self.dt = length, dt

    def forward(self, x, u):
        return mpc.rk4(x.T, u[:, 0], self.length, self.dt, self.ops).T


def _mpc_pytorch_solve(T: int, x0, w, length):
    """(X (4, T+1), U (1, T)) from mpc.pytorch's iLQR, differentiable by its LQR backward."""
    n_tau = 5
    C = torch.diag_embed(2 * torch.cat([w, torch.tensor([mpc.CONTROL_WEIGHT], dtype=w.dtype)]))
    c = torch.zeros(T + 1, 1, n_tau, dtype=w.dtype)
    solver = mpc_pytorch.MPC(
        4, 1, T + 1, u_lower=-mpc.U_MAX, u_upper=mpc.U_MAX, lqr_iter=100, eps=1e-8, n_batch=1,
        grad_method=mpc_pytorch.GradMethods.AUTO_DIFF, exit_unconverged=False, verbose=-1,
    )
    with warnings.catch_warnings():  # its pre-1.0 torch idioms (Variable, .data) warn on every iteration
        warnings.simplefilter("ignore")
        X, U, _ = solver(x0[None], mpc_pytorch.QuadCost(C.expand(T + 1, 1, n_tau, n_tau), c),
                         _TorchCartPole(length, 0.05))
    return X[:, 0].T, U[:-1, 0].T


def _rel_err(g: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(g - ref).max() / max(1.0, np.abs(ref).max()))


def _mpc_pytorch_rows(row: dict, T: int, name: str, x0, probe, ref: np.ndarray, U_ref, reps: int) -> None:
    ps = _params(x0)
    X, U = _mpc_pytorch_solve(T, *ps)
    _loss(X, U, probe).backward()
    g = np.concatenate([p.grad.numpy().reshape(-1) for p in ps])
    row[f"mpc.pytorch err {name}"] = _rel_err(g, ref)
    row[f"mpc.pytorch err {name} (x0, w only)"] = _rel_err(g[:8], ref[:8])
    row[f"mpc.pytorch |u - u*| {name}"] = float((U.detach() - U_ref).abs().max())
    if name != "bounds active":
        return
    row["mpc.pytorch forward"] = _best_ms(lambda: _mpc_pytorch_solve(T, *ps), reps)
    row["mpc.pytorch backward"] = _best_backward_ms(lambda: _loss(*_mpc_pytorch_solve(T, *ps), probe), reps)


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
    row["backward (ours)"] = _best_backward_ms(lambda: _loss(*warm(*params), probe), reps)
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
        row[f"err {name}"] = _rel_err(ours, ref)
        if mpc_pytorch is not None:
            _mpc_pytorch_rows(row, T, name, x0, probe, ref, U.detach(), max(2, reps // 10))
        row[f"active u ({name})"] = int((U.detach().abs() > mpc.U_MAX - 1e-6).sum())
        if name == "bounds inactive":
            J = _casadi_sensitivity(tight, ps, T)()
            n = 4 * (T + 1)
            n_u = J.shape[0] - n
            dl_dx = np.concatenate([probe[0].T.reshape(-1), probe[1].reshape(-1)[:n_u]])
            theirs = dl_dx @ J
            row["err casadi sens. (inactive)"] = _rel_err(theirs, ref)
    return row


def check_cost(T: int, reps: int) -> list[dict]:
    """What the answer checks cost, in ms, timed inside the code that runs them (`_checks.CheckTimer`):
    certification, and the degeneracy test less the sparse LU it triggers (the LU of K at the answer, which
    with adjoint="sparse_lu" the preconditioned residual needs at that point anyway and the backward
    reuses: reported apart), against the backward; both adjoints, the control bounds inactive and active;
    best of `reps`."""
    from _checks import CheckTimer

    probe = _probe(T)
    rows = []
    for adjoint in ("sparse_lu", "engine"):
        layer = mpc.mpc_layer(T, 0.05, warm_start=True, adjoint=adjoint)
        timer = CheckTimer()
        for name, x0 in STARTS.items():
            ps = _params(x0)
            _loss(*layer(*ps), probe).backward()
            fwd, bwd, spent = [], [], []
            with timer.active(layer.compiled.condition):
                for _ in range(reps):
                    timer.reset()
                    t = time.perf_counter()
                    loss = _loss(*layer(*ps), probe)
                    fwd.append(time.perf_counter() - t)
                    spent.append(timer.row(lu_reused=adjoint == "sparse_lu"))
                    t = time.perf_counter()
                    loss.backward()
                    bwd.append(time.perf_counter() - t)
            row = {"T": T, "adjoint": adjoint, "case": name, "forward": 1e3 * min(fwd), "backward": 1e3 * min(bwd)}
            for key in spent[0]:
                row[key] = min(s[key] for s in spent)
            row["checks / backward"] = (row["certification"] + row["degeneracy"]) / row["backward"]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="T=10 only, few repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    parser.add_argument("--check-cost", action="store_true",
                        help="only the cost of the answer checks (certification, degeneracy) against the backward")
    args = parser.parse_args(argv)
    horizons = (10,) if args.fast else (20, 50)
    reps = args.reps or (5 if args.fast else 40)
    torch.set_num_threads(1)
    if args.check_cost:
        rows = [r for T in horizons for r in check_cost(T, reps)]
        print(f"\nCost of the answer checks, cart-pole MPC, IPOPT, best of {reps} runs [ms]")
        cols = ["forward", "backward", "certification", "degeneracy", "LU moved from the residual"]
        print(f"{'T':>4} {'adjoint':>9} {'case':>16} " + " ".join(f"{c:>26}" for c in cols) + "  checks / backward")
        for r in rows:
            print(f"{r['T']:>4} {r['adjoint']:>9} {r['case']:>16} " + " ".join(f"{r[c]:>26.4f}" for c in cols)
                  + f"  {r['checks / backward']:>17.0%}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return rows
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
    if mpc_pytorch is None:
        print("\nmpc.pytorch: not installed (pip install --no-deps mpc==0.0.6)")
    else:
        print("\nmpc.pytorch (iLQR, LQR-approximation backward), same problem [ms] and errors vs the same reference")
        for r in rows:
            fwd, bwd = r["mpc.pytorch forward"], r["mpc.pytorch backward"]
            err = {k: r[f"mpc.pytorch err bounds {k}"] for k in ("inactive", "active")}
            err_xw = {k: r[f"mpc.pytorch err bounds {k} (x0, w only)"] for k in ("inactive", "active")}
            print(f"T={r['T']:>3}: forward {fwd:.1f} ({fwd / r['layer forward']:.0f}x our layer forward), "
                  f"backward {bwd:.2f} ({bwd / r['backward (ours)']:.1f}x ours); |u - u*| "
                  f"{r['mpc.pytorch |u - u*| bounds active']:.1e}; gradient error, bounds inactive "
                  f"{err['inactive']:.2e} (x0, w only {err_xw['inactive']:.2e}), bounds active "
                  f"{err['active']:.2e} (x0, w only {err_xw['active']:.2e})")
            if r["mpc.pytorch |u - u*| bounds active"] > 1e-2:
                print("       mpc.pytorch's iLQR (100 iterations) stopped away from IPOPT's solution: its gradient "
                      "is of a different point")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
