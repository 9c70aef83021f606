"""Butcher tableaux of the stiffly accurate implicit Runge-Kutta methods of `odeint`, and their
collocation polynomials (dense output)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["METHODS", "Tableau", "dense_output", "tableau"]

_S6 = math.sqrt(6.0)
# (A, c, order); b is the last row of A (stiffly accurate: y_{n+1} is the last stage).
_TABLEAUX: dict[str, tuple[list[list[float]], list[float], int]] = {
    "backward_euler": ([[1.0]], [1.0], 1),
    # Lobatto IIIA with two stages: the first stage is explicit (Y_1 = y_n).
    "trapezoid": ([[0.0, 0.0], [0.5, 0.5]], [0.0, 1.0], 2),
    "radau3": ([[5 / 12, -1 / 12], [3 / 4, 1 / 4]], [1 / 3, 1.0], 3),
    "radau5": (
        [
            [(88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225],
            [(296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225],
            [(16 - _S6) / 36, (16 + _S6) / 36, 1 / 9],
        ],
        [(4 - _S6) / 10, (4 + _S6) / 10, 1.0],
        5,
    ),
}
METHODS: dict[str, int] = {name: order for name, (_, _, order) in _TABLEAUX.items()}
"""The implicit methods of `odeint` and their order of convergence."""


class Tableau:
    """The implicit part of a method: stage matrix A (s x s), nodes c, and the explicit first column a0
    (trapezoid: the first stage is y_n itself and does not enter the unknowns)."""

    def __init__(self, method: str) -> None:
        A, c, self.order = _TABLEAUX[method]
        self.explicit_first = all(a == 0.0 for a in A[0])
        first = 1 if self.explicit_first else 0
        self.A = torch.tensor([row[first:] for row in A[first:]], dtype=torch.float64)
        self.a0 = torch.tensor([row[0] for row in A[first:]], dtype=torch.float64)
        self.c = [float(x) for x in c[first:]]
        self.s = len(self.c)


def tableau(method: str) -> Tableau:
    return Tableau(method)


def dense_output(nodes: list[float], y: torch.Tensor, Y: torch.Tensor, theta: Any) -> torch.Tensor:
    """The collocation polynomial through (0, y_n), (c_j, Y_j) at t_n + theta h (Lagrange form).

    Args:
        nodes: the stage nodes c_j.
        y: y_n (B, d). Y: the stages (B, s, d). theta: a float or a 0-dim tensor (differentiable).
    """
    xs = [0.0, *nodes]
    values = [y, *Y.unbind(1)]
    out = torch.zeros_like(y)
    for i, (xi, v) in enumerate(zip(xs, values, strict=True)):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w = w * (theta - xj) / (xi - xj)
        out = out + w * v
    return out
