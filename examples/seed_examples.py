"""The Zimmermann lecture's worked examples, each a real black box made differentiable.

Each row runs a solver that autograd cannot see into (scipy's brentq, numpy's linear solve, a
hand-written gradient-descent loop, a constrained argmin returned without multipliers, a numpy fixed-point
iteration), differentiates it with blackbox_diff, and prints the implicit gradient beside the closed form.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import scipy.optimize
import torch

import blackbox_diff as bbd


def root_of_square() -> tuple[str, float, float]:
    @bbd.implicit(bbd.Root(lambda x, w: x**2 - w))
    def legacy_sqrt(w):
        return scipy.optimize.brentq(lambda x: x * x - w, 0.0, 1e6, xtol=1e-15)

    w = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    x = legacy_sqrt(w)
    x.backward()
    return "x^2 - w = 0 (brentq), dx/dw at w=4", w.grad.item(), 1 / (2 * x.item())


def root_of_sine() -> tuple[str, float, float]:
    @bbd.implicit(bbd.Root(lambda x, w: torch.sin(x + w)))
    def solve(w):
        return scipy.optimize.brentq(lambda x: math.sin(x + w), -w - 1, -w + 1, xtol=1e-15)

    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    solve(w).backward()
    return "sin(x + w) = 0, dx/dw", w.grad.item(), -1.0


def linear_system() -> tuple[str, float, float]:
    @bbd.implicit(bbd.Root(lambda x, A, b: A @ x - b))
    def solve(A, b):
        return np.linalg.solve(A, b)

    A = torch.tensor([[2.0, -2.0], [-2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    solve(A, b)[1].backward()
    return "Ax = b, d x_2 / d A_22", A.grad[1, 1].item(), -0.25


def unconstrained_sine() -> tuple[str, float, float]:
    @bbd.implicit(bbd.Argmin(lambda x, w: torch.sin(x * w)), residual_tol=1e-3)
    def gradient_descent(w):  # the lecture's 25 steps of 0.1
        x = 0.0
        for _ in range(25):
            x -= 0.1 * w * math.cos(x * w)
        return x

    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    gradient_descent(w).backward()
    return "argmin sin(xw), 25 GD steps, dx/dw at w=2", w.grad.item(), math.pi / 8


def constrained() -> tuple[str, float, float]:
    cond = bbd.KKT(lambda x, w: x * w, ineq=lambda x, w: x**2 - 1)

    @bbd.implicit(cond, return_duals=True)
    def solve(w):  # returns x only: the multiplier is recovered by NNLS
        opts = {"xatol": 1e-12}
        res = scipy.optimize.minimize_scalar(lambda x: x * w, bounds=(-1, 1), method="bounded", options=opts)
        return res.x

    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    sol = solve(w)
    sol.ineq.sum().backward()
    return "min xw s.t. x^2 <= 1, d lambda*/dw (recovered)", w.grad.item(), 0.5


def fixed_point() -> tuple[str, float, float]:
    W = torch.tensor([[0.2, -0.3], [0.1, 0.4]], dtype=torch.float64)

    @bbd.implicit(bbd.FixedPoint(lambda z, x: torch.tanh(W @ z + x)))
    def iterate(x):
        z = np.zeros(2)
        for _ in range(200):
            z = np.tanh(W.numpy() @ z + x)
        return z

    x = torch.tensor([0.5, -0.2], dtype=torch.float64, requires_grad=True)
    z = iterate(x)
    z[0].backward()
    D = torch.diag(1 - z.detach() ** 2)
    closed = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - D @ W, D)[0, 0].item()
    return "z = tanh(Wz + x), dz_1/dx_1", x.grad[0].item(), closed


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="(already fast; accepted for uniformity)")
    parser.parse_args(argv)
    rows = [f() for f in (root_of_square, root_of_sine, linear_system, unconstrained_sine, constrained, fixed_point)]
    print(f"{'example':48} {'implicit gradient':>18} {'closed form':>14} {'|error|':>9}")
    for name, got, want in rows:
        print(f"{name:48} {got:>18.10f} {want:>14.10f} {abs(got - want):>9.1e}")
    return rows


if __name__ == "__main__":
    main()
