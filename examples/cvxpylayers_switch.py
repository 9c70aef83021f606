"""Switching from cvxpylayers to blackbox_diff: change one import, keep the problem and the training loop.

The cvxpylayers README problem (least absolute deviations with x >= 0) is built once with cvxpy and
wrapped both ways:

    from cvxpylayers.torch import CvxpyLayer          # before
    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])

    import blackbox_diff as bbd                       # after
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])

Both layers are called the same way (batched or not) and return the same solutions and gradients. The
script then fits the parameters A, b of a layer (a smooth QP relative of the problem) by gradient
descent so that its solutions match those of a hidden "true" (A, b) -- the usual use of a convex
optimisation layer inside a model -- and runs the rest of cvxpylayers' README the same way: dual
variables requested in ``variables=[x, eq_con.dual_variables[0]]``, a log-log convex program with
``gp=True``, and per-call solver settings ``layer(A, b, solver_args={"eps": 1e-10})``. Last, what
cvxpylayers does not have: other solvers and a non-DPP problem.

Run:  python examples/cvxpylayers_switch.py [--fast]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "plugins")]

import blackbox_diff as bbd  # noqa: E402


def lad_problem(n: int = 2, m: int = 3):
    """The cvxpylayers README problem: min 0.5 * ||A x - b||_1 s.t. x >= 0."""
    import cvxpy as cp

    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    assert problem.is_dpp()
    return problem, A, b, x


def compare(batch: int, seed: int = 0) -> float:
    """Solutions and gradients of both layers on one batch; returns the largest gradient difference."""
    from cvxpylayers.torch import CvxpyLayer

    problem, A, b, x = lad_problem()
    before = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    after = bbd.layer(problem, parameters=[A, b], variables=[x])

    torch.manual_seed(seed)
    A_tch = torch.randn(batch, 3, 2, dtype=torch.float64)
    b_tch = torch.randn(batch, 3, dtype=torch.float64)
    results = {}
    for name, layer, kwargs in (
        ("cvxpylayers", before, {"solver_args": {"solve_method": "Clarabel"}}),
        ("blackbox_diff", after, {}),
    ):
        A_ = A_tch.clone().requires_grad_(True)
        b_ = b_tch.clone().requires_grad_(True)
        start = time.perf_counter()
        (solution,) = layer(A_, b_, **kwargs)
        solution.sum().backward()
        results[name] = (solution.detach(), A_.grad, b_.grad, time.perf_counter() - start)
    ref, new = results["cvxpylayers"], results["blackbox_diff"]
    diff = max(float((r - q).abs().max()) for r, q in zip(ref[:3], new[:3], strict=True))
    print(f"batch of {batch}: max |difference| in solution and gradients = {diff:.2e} "
          f"(cvxpylayers {ref[3] * 1e3:.1f} ms, blackbox_diff {new[3] * 1e3:.1f} ms, forward + backward)")
    return diff


def ridge_nnls_problem(n: int = 2, m: int = 3):
    """A smooth relative of the README problem: min ||A x - b||^2 + 0.1 ||x||^2 s.t. x >= 0 (a QP)."""
    import cvxpy as cp

    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)), [x >= 0])
    return problem, A, b, x


def fit(steps: int, batch: int, seed: int = 1) -> tuple[float, float]:
    """Learn (A, b) of a QP layer from the solutions of a hidden one; returns (first, last) mean loss."""
    problem, A, b, x = ridge_nnls_problem()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    gen = torch.Generator().manual_seed(seed)
    A_true = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    b_true = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    A_hat = (A_true + 0.3 * torch.randn(3, 2, generator=gen, dtype=torch.float64)).requires_grad_(True)
    b_hat = (b_true + 0.3 * torch.randn(3, generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([A_hat, b_hat], lr=0.05)
    losses = []
    for _ in range(steps):
        # A batch of perturbed problems: the perturbation is shared data, (A_hat, b_hat) are learned.
        noise = 0.2 * torch.randn(batch, 3, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            (target,) = layer(A_true, b_true + noise)
        (pred,) = layer(A_hat, b_hat + noise)  # A_hat broadcasts over the batch: its gradient is summed
        loss = ((pred - target) ** 2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    k = max(steps // 10, 1)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(f"fitting (A, b) from solutions: mean loss {first:.2e} (first {k} steps) -> {last:.2e} (last {k})")
    return first, last


def duals() -> float:
    """cvxpylayers' README dual example: an LP's equality dual as an output, next to x.

    min c^T x s.t. sum(x) = b, x >= 0 puts all of b on the cheapest coordinate; the equality's dual (cvxpy's
    sign) is -min(c), and d(dual)/dc = -e_argmin. Returns the largest error against that closed form.
    """
    import cvxpy as cp

    x, c, b = cp.Variable(2), cp.Parameter(2), cp.Parameter()
    eq_con = cp.sum(x) == b
    problem = cp.Problem(cp.Minimize(c @ x), [eq_con, x >= 0])
    layer = bbd.layer(problem, parameters=[c, b], variables=[x, eq_con.dual_variables[0]])
    c_tch = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b_tch = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    x_star, eq_dual = layer(c_tch, b_tch)
    eq_dual.backward()
    error = max(float((x_star.detach() - torch.tensor([1.0, 0.0])).abs().max()), abs(float(eq_dual) + 1.0),
                float((c_tch.grad - torch.tensor([-1.0, 0.0])).abs().max()), abs(float(b_tch.grad)))
    print(f"  duals: x* = {x_star.detach().numpy().round(6)}, dual of sum(x) == b = {float(eq_dual):.6f}, "
          f"d(dual)/dc = {c_tch.grad.numpy().round(6)} (closed form: [1, 0], -1, [-1, 0]; error {error:.1e})")
    return error


def geometric_program() -> float:
    """cvxpylayers' README log-log convex program with gp=True, side by side with cvxpylayers, then a GP with a
    closed form (min x + y s.t. x y >= k: x = y = sqrt(k)). Returns the closed-form error."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x, y, z = cp.Variable(pos=True), cp.Variable(pos=True), cp.Variable(pos=True)
    a, b, c = cp.Parameter(pos=True, value=2.0), cp.Parameter(pos=True, value=1.0), cp.Parameter(value=0.5)
    problem = cp.Problem(cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y**c])
    for name, layer in (("cvxpylayers", CvxpyLayer(problem, parameters=[a, b, c], variables=[x, y, z], gp=True)),
                        ("blackbox_diff", bbd.layer(problem, parameters=[a, b, c], variables=[x, y, z], gp=True))):
        params = [torch.tensor(p.value, dtype=torch.float64, requires_grad=True) for p in (a, b, c)]
        x_star, y_star, z_star = layer(*params)
        (x_star + y_star + z_star).backward()
        print(f"  gp=True, {name:13s}: x, y, z = {[round(float(v), 7) for v in (x_star, y_star, z_star)]}, "
              f"gradient = {[round(float(p.grad), 7) for p in params]}")
    u, v, k = cp.Variable(pos=True), cp.Variable(pos=True), cp.Parameter(pos=True)
    gp = bbd.layer(cp.Problem(cp.Minimize(u + v), [u * v >= k]), parameters=[k], variables=[u, v], gp=True)
    k_t = torch.tensor([0.5, 4.0], dtype=torch.float64, requires_grad=True)
    u_star, _ = gp(k_t)
    u_star.sum().backward()
    error = max(float((u_star.detach() - k_t.detach().sqrt()).abs().max()),
                float((k_t.grad - 0.5 / k_t.detach().sqrt()).abs().max()))
    print(f"  gp=True closed form: x* = sqrt(k) and dx*/dk = 1/(2 sqrt(k)) to {error:.1e}")
    return error


def per_call_solver_args() -> float:
    """layer(A, b, solver_args={...}) as in cvxpylayers: merged over the settings given at construction."""
    problem, A, b, x = lad_problem()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    gen = torch.Generator().manual_seed(7)
    A_t = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    b_t = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    (default,) = layer(A_t, b_t)
    (tight,) = layer(A_t, b_t, solver_args={"eps": 1e-10})
    (scs,) = layer(A_t, b_t, solver_args={"solve_method": "SCS", "eps": 1e-10})
    diff = max(float((tight - default).abs().max()), float((scs - default).abs().max()))
    print(f"  solver_args per call: eps=1e-10 and solve_method='SCS' agree with the default to {diff:.1e}")
    return diff


def extras() -> None:
    """What cvxpylayers does not offer: other solvers (cvxpy's constants), all duals at once, non-DPP problems."""
    import cvxpy as cp

    problem, A, b, x = lad_problem()
    A_t = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.3, -0.4]], dtype=torch.float64)
    b_t = torch.tensor([1.0, 0.8, -0.2], dtype=torch.float64)
    for solver in (cp.CLARABEL, cp.SCS, cp.ECOS):
        (sol,) = bbd.layer(problem, parameters=[A, b], variables=[x], solver=solver)(A_t, b_t)
        print(f"  {solver:8s} x* = {sol.numpy().round(6)}")
    sol, dual = bbd.layer(problem, parameters=[A, b], variables=[x], return_duals=True)(A_t, b_t)
    print(f"  return_duals=True, dual of x >= 0: {dual.numpy().round(6)}")
    # Not DPP (a product of parameters): cvxpylayers refuses it; here it is canonicalised per call.
    y = cp.Variable(2)
    scale, target = cp.Parameter(pos=True), cp.Parameter(2)
    non_dpp = cp.Problem(cp.Minimize(cp.sum_squares(scale * scale * y - target)), [y >= 0])
    s_t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (y_t,) = bbd.layer(non_dpp, parameters=[scale, target], variables=[y])(s_t, torch.tensor([1.0, -1.0]))
    y_t.sum().backward()
    print(f"  non-DPP: y* = {y_t.detach().numpy().round(6)}, dy0/dscale = {float(s_t.grad):.6f} (exact -0.25)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small setting for the test suite")
    args = parser.parse_args(argv)
    steps, batch = (20, 8) if args.fast else (200, 32)
    diffs = [compare(1), compare(batch)]
    first, last = fit(steps, batch)
    print("cvxpylayers' README, the rest of it:")
    dual_error = duals()
    gp_error = geometric_program()
    eps_difference = per_call_solver_args()
    print("beyond cvxpylayers:")
    extras()
    return {"max_gradient_difference": max(diffs), "first_loss": first, "last_loss": last, "dual_error": dual_error,
            "gp_error": gp_error, "per_call_eps_difference": eps_difference}


if __name__ == "__main__":
    main()
