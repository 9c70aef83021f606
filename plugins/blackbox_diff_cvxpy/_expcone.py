"""Projection onto the exponential cone and its derivative.

K_exp = cl{(x, y, z): y > 0, y exp(x / y) <= z} (cvxpy's, Clarabel's and SCS's order). The projection is
computed numerically (the bisection on the dual variable of SCS 2.x, Newton inside), per 3-vector in
numpy; its Jacobian comes from the implicit function theorem on the projection's own KKT system

    p - v + mu grad g(p) = 0,   g(p) = y exp(x / y) - z = 0,

so dp = [H^-1 - H^-1 a (a^T H^-1 a)^-1 a^T H^-1] dv with H = I + mu hess g(p), a = grad g(p). The
autograd Function has no vmap rule: the engine evaluates residuals with exponential cones in a loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["exp_jacobian", "project_exp"]

_ITERS = 100


def _newton_one_d(rho: float, y_hat: float, z_hat: float) -> float:
    t = max(-z_hat, 1e-6)
    for _ in range(_ITERS):
        f = t * (t + z_hat) / rho / rho - y_hat / rho + math.log(t / rho) + 1
        fp = (2 * t + z_hat) / rho / rho + 1 / t
        t = t - f / fp
        if t <= -z_hat:
            return 0.0
        if t <= 0:
            return z_hat
        if abs(f) < 1e-14:
            break
    return t + z_hat


def _with_rho(v: np.ndarray, rho: float) -> np.ndarray:
    z = _newton_one_d(rho, v[1], v[2])
    y = (z - v[2]) * z / rho
    return np.array([v[0] - rho, y, z])


def _grad(v: np.ndarray, rho: float) -> tuple[float, np.ndarray]:
    p = _with_rho(v, rho)
    if p[1] <= 1e-12:
        return p[0], p
    return p[0] + p[1] * math.log(p[1] / p[2]), p


def _project_one(v: np.ndarray) -> tuple[np.ndarray, int]:
    """(projection, case): 0 inside, 1 polar (zero), 2 analytic (x<0, y<0), 3 boundary."""
    r, s, t = v
    if (s > 0 and s * math.exp(min(r / s, 700.0)) - t <= 1e-13) or (r <= 0 and s == 0 and t >= 0):
        return v.copy(), 0
    if (r > 0 and r * math.exp(min(s / r, 700.0)) + math.e * t <= 1e-13) or (r == 0 and s <= 0 and t <= 0):
        return np.zeros(3), 1
    if r < 0 and s < 0:
        return np.array([r, 0.0, max(t, 0.0)]), 2
    lb, ub = 0.0, 0.125
    for _ in range(200):
        g, _ = _grad(v, ub)
        if g <= 0:
            break
        lb, ub = ub, 2 * ub
    p = v
    for _ in range(200):
        rho = 0.5 * (lb + ub)
        g, p = _grad(v, rho)
        if g > 0:
            lb = rho
        else:
            ub = rho
        if ub - lb < 1e-15 * max(1.0, ub):
            break
    return p, 3


def exp_jacobian(v: np.ndarray) -> np.ndarray:
    """d Pi(v) / dv for one 3-vector."""
    p, case = _project_one(v)
    if case == 0:
        return np.eye(3)
    if case == 1:
        return np.zeros((3, 3))
    if case == 2:
        return np.diag([1.0, 0.0, 1.0 if v[2] > 0 else 0.0])
    x, y, _ = p
    e = math.exp(x / y)
    a = np.array([e, e * (1 - x / y), -1.0])
    mu = float(np.linalg.norm(v - p) / np.linalg.norm(a))
    hess = np.zeros((3, 3))
    hess[0, 0] = e / y
    hess[0, 1] = hess[1, 0] = -x * e / y**2
    hess[1, 1] = x * x * e / y**3
    Hinv = np.linalg.inv(np.eye(3) + mu * hess)
    Ha = Hinv @ a
    return Hinv - np.outer(Ha, Ha) / float(a @ Ha)


class _ProjectExp(torch.autograd.Function):
    @staticmethod
    def forward(v: torch.Tensor) -> torch.Tensor:  # noqa: D102
        arr = v.detach().cpu().numpy().reshape(-1, 3)
        out = np.stack([_project_one(row)[0] for row in arr]) if arr.size else arr
        return torch.as_tensor(out.reshape(v.shape)).to(v)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (v,) = ctx.saved_tensors
        arr = v.detach().cpu().numpy().reshape(-1, 3)
        jac = [exp_jacobian(row) for row in arr]
        gg = g.detach().cpu().numpy().reshape(-1, 3)
        out = np.stack([J.T @ row for J, row in zip(jac, gg, strict=True)]) if arr.size else gg
        return torch.as_tensor(out.reshape(v.shape)).to(g)


def project_exp(v: torch.Tensor) -> torch.Tensor:
    """Projection of consecutive 3-vectors (the last dimension, a multiple of 3) onto K_exp."""
    return _ProjectExp.apply(v)
