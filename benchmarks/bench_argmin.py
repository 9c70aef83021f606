"""Argmin backward: blackbox_diff (CG on HVPs) vs torchopt's custom_root with CG, side by side; and our
forward mode (one Jacobian-vector product) against our backward.

Problem: x*(theta) = argmin_x 0.5 x^T Q x - theta^T x + 0.25 sum x^4 (Q SPD, n in {100, 1000}).
The forward is the same black box for both (scipy L-BFGS-B polished by Newton, in numpy). We time the
backward (one vector-Jacobian product of x* wrt theta) and report it against the forward, against
torchopt, and the gradient error against the closed form -(H)^{-1} g.

Forward mode: the JVP dx*/dtheta . t (a CG solve of H v = t, the tangent system) is timed as a forward call
with a dual input (torch.autograd.forward_ad) minus the same call without the tangent, the black box
memoised (it returns its answer at theta at once), so that the solver's own time does not drown the
difference; `torch.func.jvp` is timed the same way. The ratio jvp/bwd divides by a backward timed in the
same interleaved loop (best of each). The JVP's error is against the closed form H^{-1} t.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
import torch.autograd.forward_ad as fwAD

import blackbox_diff as bbd


def make_problem(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n)) / np.sqrt(n)
    Q = M @ M.T + np.eye(n)
    theta = rng.standard_normal(n)
    return Q, theta


def solve_numpy(Q: np.ndarray, theta: np.ndarray) -> np.ndarray:
    fun = lambda x: (0.5 * x @ Q @ x - theta @ x + 0.25 * (x**4).sum(), Q @ x - theta + x**3)  # noqa: E731
    x = scipy.optimize.minimize(fun, np.zeros_like(theta), jac=True, method="L-BFGS-B",
                                options={"gtol": 1e-10, "maxiter": 2000}).x
    for _ in range(3):  # Newton polish: the black box returns a tight solution
        x -= np.linalg.solve(Q + np.diag(3 * x**2), Q @ x - theta + x**3)
    return x


def _timeit(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jvp_times(Qn: np.ndarray, thn: np.ndarray, f, optimality, t: torch.Tensor, exact: torch.Tensor,
              repeat: int) -> dict:
    """Forward-mode cost: (forward with a dual input) - (the same forward without), black box memoised.

    `exact` is H^{-1} t, the closed-form JVP (H symmetric, so it is also the closed-form VJP of t).
    """
    x_star = solve_numpy(Qn, thn)

    def memo(th):  # the black box's answer, already known: the timing sees the engine's work only
        return x_star.copy()

    out = {}
    for key, cond, options in (("ours", bbd.Argmin(f), {"linear_solver": "cg"}),
                               ("ours_root", bbd.Root(optimality, structure="spd"), {})):
        fn = bbd.implicit(cond, rtol=1e-10, **options)(memo)

        def plain(fn=fn):
            th = torch.tensor(thn)
            t0 = time.perf_counter()
            fn(th)
            return time.perf_counter() - t0

        def dual(fn=fn):
            th = torch.tensor(thn)
            with fwAD.dual_level():
                t0 = time.perf_counter()
                tangent = fwAD.unpack_dual(fn(fwAD.make_dual(th, t))).tangent
                return time.perf_counter() - t0, tangent

        def func_jvp(fn=fn):
            th = torch.tensor(thn)
            t0 = time.perf_counter()
            torch.func.jvp(fn, (th,), (t,))
            return time.perf_counter() - t0

        def backward(fn=fn):  # the backward again, in the same loop as the JVP: the ratio's denominator
            th = torch.tensor(thn, requires_grad=True)
            x = fn(th)
            t0 = time.perf_counter()
            torch.autograd.grad(x, th, t)
            return time.perf_counter() - t0

        for _ in range(2):  # warm-up
            plain(), dual(), func_jvp(), backward()
        t_plain, t_dual, t_func, t_bwd = [], [], [], []
        for _ in range(repeat):  # interleaved: a load spike hits all four alike
            t_plain.append(plain())
            t_dual.append(dual()[0])
            t_func.append(func_jvp())
            t_bwd.append(backward())
        out[f"{key}_jvp_s"] = min(t_dual) - min(t_plain)
        out[f"{key}_jvp/bwd"] = out[f"{key}_jvp_s"] / min(t_bwd)
        out[f"{key}_jvp_err"] = float((dual()[1] - exact).abs().max() / exact.abs().max())
        if key == "ours":
            out["ours_func_jvp/bwd"] = (min(t_func) - min(t_plain)) / min(t_bwd)
    return out


def bench(n: int, repeat: int, jvp: bool = True) -> dict:
    Qn, thn = make_problem(n)
    Q = torch.tensor(Qn)

    def f(x, theta):
        return 0.5 * x @ Q @ x - theta @ x + 0.25 * (x**4).sum()

    def optimality(x, theta):  # the gradient in closed form, as torchopt users write it
        return Q @ x - theta + x**3

    ours = bbd.implicit(bbd.Argmin(f), linear_solver="cg", rtol=1e-10)(lambda th: solve_numpy(Qn, th))
    ours_root = bbd.implicit(bbd.Root(optimality, structure="spd"), rtol=1e-10)(lambda th: solve_numpy(Qn, th))
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run_ours(fn=ours):
        th = torch.tensor(thn, requires_grad=True)
        x = fn(th)
        t0 = time.perf_counter()
        (gr,) = torch.autograd.grad(x, th, g)
        return time.perf_counter() - t0, gr, x.detach()

    t_forward = _timeit(lambda: solve_numpy(Qn, thn), repeat)
    t_ours = min(run_ours()[0] for _ in range(repeat))
    t_root = min(run_ours(ours_root)[0] for _ in range(repeat))
    _, g_ours, xs = run_ours()
    g_root = run_ours(ours_root)[1]
    H = Q + torch.diag(3 * xs**2)
    exact = torch.linalg.solve(H, g)  # dx/dtheta = H^{-1}, symmetric
    err = lambda got: float((got - exact).abs().max() / exact.abs().max())  # noqa: E731
    row = {"n": n, "forward_s": t_forward, "ours_backward_s": t_ours, "ours_err": err(g_ours),
           "ours_root_backward_s": t_root, "ours_root_err": err(g_root)}
    if jvp:
        row.update(jvp_times(Qn, thn, f, optimality, g, exact, repeat))
    # torchopt 0.7 calls functorch.vjp, which warns on every call under torch 2.x
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")
    try:
        import torchopt
    except ImportError:
        row["torchopt"] = "not installed"
        return row

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                         solve=torchopt.linear_solve.solve_cg(maxiter=10 * n, rtol=1e-10))
    def theirs(x0, theta):
        return torch.tensor(solve_numpy(Qn, theta.detach().numpy()))

    def run_theirs():
        th = torch.tensor(thn, requires_grad=True)
        x = theirs(torch.zeros(n, dtype=torch.float64), th)
        t0 = time.perf_counter()
        (gr,) = torch.autograd.grad(x, th, g)
        return time.perf_counter() - t0, gr

    t_theirs = min(run_theirs()[0] for _ in range(repeat))
    g_theirs = run_theirs()[1]
    row.update({"torchopt_backward_s": t_theirs,
                "torchopt_err": err(g_theirs), "ours_root/torchopt": t_root / t_theirs,
                "ours/torchopt": t_ours / t_theirs, "ours_backward/forward": t_ours / t_forward})
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="n = 100 only, 3 repeats")
    parser.add_argument("--json", help="write the table as JSON to this path")
    parser.add_argument("--repeat", type=int, default=None, help="timing repeats (default 7; 3 with --fast)")
    parser.add_argument("--skip-jvp", action="store_true",
                        help="no forward-mode columns (e.g. to time the backward of a version without forward mode)")
    args = parser.parse_args(argv)
    sizes, repeat = ([100], 3) if args.fast else ([100, 1000], 7)
    repeat = args.repeat or repeat
    rows = [bench(n, repeat, jvp=not args.skip_jvp) for n in sizes]
    cols = [("n", "n", "{:>6}"), ("forward ms", "forward_s", "ms"), ("Argmin bwd ms", "ours_backward_s", "ms"),
            ("Root(spd) bwd ms", "ours_root_backward_s", "ms"), ("torchopt bwd ms", "torchopt_backward_s", "ms"),
            ("Argmin/torchopt", "ours/torchopt", "{:.2f}"), ("Root/torchopt", "ours_root/torchopt", "{:.2f}"),
            ("bwd/fwd", "ours_backward/forward", "{:.2f}"), ("ours err", "ours_err", "{:.1e}"),
            ("torchopt err", "torchopt_err", "{:.1e}"),
            ("Argmin jvp ms", "ours_jvp_s", "ms"), ("Argmin jvp/bwd", "ours_jvp/bwd", "{:.2f}"),
            ("Root jvp ms", "ours_root_jvp_s", "ms"), ("Root jvp/bwd", "ours_root_jvp/bwd", "{:.2f}"),
            ("func.jvp/bwd", "ours_func_jvp/bwd", "{:.2f}"), ("jvp err", "ours_jvp_err", "{:.1e}")]
    print("  ".join(c[0] for c in cols))
    for r in rows:
        cells = []
        for title, key, fmt in cols:
            v = r.get(key, float("nan"))
            text = f"{1e3 * v:.2f}" if fmt == "ms" else fmt.format(v)
            cells.append(text.rjust(len(title)))
        print("  ".join(cells))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
