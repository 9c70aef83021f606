"""The shared problem zoo: small black boxes with closed-form gradients, used across the core tests.

Each entry is a real solver call (scipy or numpy) plus the optimality condition it satisfies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

import blackbox_diff as bbd


@dataclasses.dataclass
class Problem:
    name: str
    condition: bbd.AbstractCondition
    solve: Callable
    params: Callable[[], tuple[torch.Tensor, ...]]
    options: dict = dataclasses.field(default_factory=dict)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _spd(n: int, seed: int) -> np.ndarray:
    M = _rng(seed).standard_normal((n, n))
    return M @ M.T + n * np.eye(n)


# Root: a nonlinear 3x3 system x + 0.1*tanh(A x) = b, solved with scipy.optimize.root (hybr).
def _root_F(x, A, b):
    return x + 0.1 * torch.tanh(A @ x) - b


def _root_solve(A, b):
    res = scipy.optimize.root(lambda x: x + 0.1 * np.tanh(A @ x) - b, np.zeros_like(b), tol=1e-14)
    return res.x


# Argmin: a smooth convex objective, solved with scipy's trust-exact fed exact derivatives.
def _argmin_f(x, Q, c):
    return 0.5 * x @ Q @ x + c @ x + 0.25 * (x**4).sum()


def _argmin_solve(Q, c):
    S = 0.5 * (Q + Q.T)  # the gradient of 0.5 x^T Q x, also for a perturbed (asymmetric) Q
    res = scipy.optimize.minimize(
        lambda x: 0.5 * x @ Q @ x + c @ x + 0.25 * (x**4).sum(),
        np.zeros_like(c),
        jac=lambda x: S @ x + c + x**3,
        hess=lambda x: S + np.diag(3 * x**2),
        method="trust-exact",
        options={"gtol": 1e-14},
    )
    return res.x


# FixedPoint: z = tanh(W z + x) with a contractive W, by plain iteration.
def _fp_T(z, W, x):
    return torch.tanh(W @ z + x)


def _fp_solve(W, x):
    z = np.zeros_like(x)
    for _ in range(400):
        z = np.tanh(W @ z + x)
    return z


# KKT: projection of y onto the simplex {x >= 0, sum x = 1}, closed form by sorting.
def _simplex_project(y):
    u = np.sort(y)[::-1]
    css = np.cumsum(u) - 1
    k = np.nonzero(u - css / np.arange(1, y.size + 1) > 0)[0][-1]
    return np.maximum(y - css[k] / (k + 1), 0.0)


KKT_SIMPLEX = bbd.KKT(
    lambda x, y: 0.5 * ((x - y) ** 2).sum(),
    eq=lambda x, y: x.sum().reshape(1) - 1,
    ineq=lambda x, y: -x,
)


def problems() -> list[Problem]:
    n = 3
    A = torch.tensor(_rng(1).standard_normal((n, n)))
    W = torch.tensor(0.4 * _rng(2).standard_normal((4, 4)) / 2)
    return [
        Problem("root", bbd.Root(_root_F), _root_solve, lambda: (A.clone(), torch.tensor([0.3, -0.2, 0.5]))),
        Problem(
            "argmin",
            bbd.Argmin(_argmin_f),
            _argmin_solve,
            lambda: (torch.tensor(_spd(n, 3)), torch.tensor([1.0, -2.0, 0.5])),
        ),
        Problem(
            "fixed_point", bbd.FixedPoint(_fp_T), _fp_solve, lambda: (W.clone(), torch.tensor([0.5, -1.0, 0.2, 0.1]))
        ),
        Problem("kkt", KKT_SIMPLEX, _simplex_project, lambda: (torch.tensor([0.9, 0.5, -0.4, 0.1]),)),
    ]


def by_name(name: str) -> Problem:
    return next(p for p in problems() if p.name == name)
