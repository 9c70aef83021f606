"""The layer's outputs as torch expressions of the cone program's primal x and dual y.

Every output is linear in x or y (a gather, possibly with scales):

* a variable is its columns of x, Fortran-ordered; a variable cvxpy stores reduced (symmetric, PSD, NSD,
  diagonal, sparse) is expanded with cvxpy's own `recover_value_for_leaf`, so a symmetric X is one
  upper-triangle entry read twice and its gradient respects the symmetry; a geometric program's variable
  is exp of its log-space column;
* a dual variable (``constraint.dual_variables[k]``, or every constraint with return_duals) is read off y
  by cvxpy's own inversion chain: the map y -> dual values that ``problem.solve`` uses (reshapes, the
  interleaving of several second-order cones in one constraint, PSD triangles with their sqrt(2) scaling)
  is probed once at compile time and stored as a gather with scales (or, were it not one, a matrix).

Because the outputs are torch expressions of the engine's unknowns, their gradients come from the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

__all__ = ["LinearRead", "Outputs", "dual_reads", "primal_read"]


@dataclasses.dataclass
class LinearRead:
    """out = scale * source[index] (index -1 reads 0), reshaped; or out = matrix @ source.

    Attributes:
        source: "x" (primal) or "y" (dual of the cone program).
        index: C-order flat indices into the source, one per output entry.
        shape: the output's shape.
        scale: per-entry factors (None: 1).
        matrix: a dense map used instead of index/scale where the inversion is not a gather.
        exp: take exp of the result (variables of geometric programs).
    """

    source: str
    index: np.ndarray
    shape: tuple[int, ...]
    scale: np.ndarray | None = None
    matrix: np.ndarray | None = None
    exp: bool = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        v = x if self.source == "x" else y
        lead = v.shape[:-1]
        if self.matrix is not None:
            out = v @ torch.as_tensor(self.matrix, dtype=v.dtype, device=v.device).mT
        else:
            padded = torch.cat([v, v.new_zeros(*lead, 1)], dim=-1)
            idx = torch.as_tensor(np.where(self.index < 0, v.shape[-1], self.index), device=v.device)
            out = padded[..., idx]
            if self.scale is not None:
                out = out * torch.as_tensor(self.scale, dtype=v.dtype, device=v.device)
        if self.exp:
            out = torch.exp(out)
        return out.reshape(*lead, *self.shape)


def primal_read(variable: Any, column: int, span: int, exp: bool = False) -> LinearRead:
    """The read of a user variable whose (possibly reduced) values sit at x[column : column + span]."""
    shape = tuple(variable.shape)
    size = int(np.prod(shape, dtype=int))
    if span == size and not getattr(variable, "_has_dim_reducing_attr", False):
        local = np.arange(size).reshape(shape, order="F").reshape(-1)
    else:
        from cvxpy.reductions.cvx_attr2constr import recover_value_for_leaf

        full = recover_value_for_leaf(variable, np.arange(1.0, span + 1.0), project=False)
        full = full.toarray() if hasattr(full, "toarray") else np.asarray(full)
        local = np.rint(full.reshape(-1)).astype(np.int64) - 1
    index = np.where(local < 0, -1, local + column)
    return LinearRead("x", index, shape, exp=exp)


def _invert(reductions: list, inverses: list, param_prob: Any, y: np.ndarray) -> dict:
    """cvxpy's dual values of the user's constraints for a cone-program dual y (the solve path's inversion)."""
    from cvxpy import settings
    from cvxpy.reductions.solution import Solution

    duals, row = {}, 0
    for con in param_prob.constraints:
        size = int(con.size)
        duals[con.id] = y[row] if size == 1 else y[row : row + size].copy()
        row += size
    solution = Solution(settings.OPTIMAL, 0.0, {0: np.zeros(param_prob.x.size)}, duals, {})
    for reduction, inverse in reversed(list(zip(reductions, inverses, strict=True))):
        solution = reduction.invert(solution, inverse)
    return solution.dual_vars or {}


def _unpack(constraint: Any, value: Any) -> list[np.ndarray]:
    """The values of each of the constraint's dual variables, as `constraint.save_dual_value` sets them."""
    saved = [dv.value for dv in constraint.dual_variables]
    try:
        constraint.save_dual_value(value)
        out = []
        for dv in constraint.dual_variables:
            v = dv.value
            v = v.toarray() if hasattr(v, "toarray") else np.asarray(v, dtype=np.float64)
            # cvxpy may store a scalar dual as shape (1,): sizes decide, the declared shape is applied later.
            out.append((v.reshape(-1) if v.size == dv.size else np.broadcast_to(v, dv.shape).reshape(-1)).astype(
                np.float64))
        return out
    finally:
        for dv, old in zip(constraint.dual_variables, saved, strict=True):
            dv.save_value(old)


def _probe(constraints: list, reductions: list, inverses: list, param_prob: Any, y: np.ndarray) -> list:
    values = _invert(reductions, inverses, param_prob, y)
    return [_unpack(con, values[con.id]) if con.id in values else None for con in constraints]


def dual_reads(constraints: list, reductions: list, inverses: list, param_prob: Any, m: int) -> list:
    """Per constraint, the reads of its dual variables from y (None where cvxpy keeps no dual for it).

    The map is probed with three vectors: ones (the scales), 1..m (which row each entry reads) and a random
    one (the check). Should the map not be a gather (no cvxpy reduction needs that today), it is probed
    row by row into a matrix instead.
    """
    ones = _probe(constraints, reductions, inverses, param_prob, np.ones(m))
    code = _probe(constraints, reductions, inverses, param_prob, np.arange(1.0, m + 1.0))
    check_y = np.random.default_rng(0).uniform(0.5, 1.5, m)
    check = _probe(constraints, reductions, inverses, param_prob, check_y)
    reads: list = []
    basis = None
    for k, con in enumerate(constraints):
        if ones[k] is None:
            reads.append(None)
            continue
        per_dual = []
        for j, dv in enumerate(con.dual_variables):
            scale, enc, want = ones[k][j], code[k][j], check[k][j]
            safe = np.where(scale != 0, scale, 1.0)
            index = np.where(scale != 0, np.rint(enc / safe).astype(np.int64) - 1, -1)
            got = np.where(index >= 0, scale * check_y[np.clip(index, 0, m - 1)], 0.0)
            if np.allclose(got, want, rtol=1e-12, atol=1e-12) and np.all(index < m):
                per_dual.append(LinearRead("y", index, tuple(dv.shape), scale=None if np.all(scale == 1) else scale))
                continue
            if basis is None:  # column i of every dual map: the values for y = e_i
                basis = [_probe(constraints, reductions, inverses, param_prob, e) for e in np.eye(m)]
            matrix = np.stack([b[k][j] for b in basis], axis=1)
            per_dual.append(LinearRead("y", np.zeros(0, dtype=np.int64), tuple(dv.shape), matrix=matrix))
        reads.append(per_dual)
    return reads


class Outputs:
    """Maps the engine's result ((B, n) or (B, n + m) with the duals) to the layer's tuple of tensors.

    Args:
        n: size of x.
        reads: one `LinearRead` per requested output (variables and dual variables, in the user's order).
        all_duals: with return_duals, per constraint its dual reads (appended after the outputs: one tensor
            for a constraint with one dual variable, a tuple for SOC / exponential / power cones, None where
            cvxpy keeps no dual).
    """

    def __init__(self, n: int, reads: list[LinearRead], all_duals: list | None = None) -> None:
        self.n, self.reads, self.all_duals = n, reads, all_duals

    def __call__(self, result: torch.Tensor) -> tuple:
        x, y = result[..., : self.n], result[..., self.n :]
        out: list = [read(x, y) for read in self.reads]
        for per_con in self.all_duals or []:
            if per_con is None:
                out.append(None)
            elif len(per_con) == 1:
                out.append(per_con[0](x, y))
            else:
                out.append(tuple(read(x, y) for read in per_con))
        return tuple(out)
