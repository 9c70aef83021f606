"""The optimality condition of a QP, preconditioned by the LU of its reduced KKT matrix.

Unknowns z = (x, nu, lam) with lam pinned to zero off the active set S (a 0/1 indicator `a`):

    F(z; Q, p, G, h, A, b) = [ Q x + p + A^T nu + G^T (a*lam) ;  A x - b ;  a*(G x - h) + (1-a)*lam ].

F is the explicit-active-set KKT residual (as `bbd.KKT` states it), linear in z, with the symmetric
Jacobian K = dF/dz. After a symmetric permutation that puts the active multipliers before the inactive
ones, K = blockdiag(K_S, I), and the black box has already inverted K_S (`_kkt.factor`). The residual
handed to the engine is

    R(z; theta) = K0^{-1} F(z; theta),   K0 = K at the answer (a constant: its factors are aux data),

which vanishes exactly where F does, has dR/dz = I at the answer (structure "identity": the engine's
adjoint is the cotangent itself, checked by one product) and dR/dtheta = K0^{-1} dF/dtheta, the implicit
function theorem's. So the backward is one batched vector-matrix product with K0^{-1} and one with
dF/dtheta (outer products with x and the multipliers); no per-instance Python loop and no factorisation.
Because R is an honest function of z and theta (K0 is constant, F is torch), forward mode and higher
derivatives through the engine see the true dependence.

A degenerate instance (K_S singular: LICQ fails or the solution is not unique) gets K0 = I, i.e. the raw
F: the engine's identity check fails there and escalates (GMRES, then dense least squares), which gives
the minimum-norm adjoint, and the instance is flagged with the rows concerned.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from blackbox_diff import AbstractCondition, KKTSolution

__all__ = ["QPCondition"]


class QPCondition(AbstractCondition):
    """KKT conditions of min 1/2 x^T Q x + p^T x s.t. Gx <= h, Ax = b on the identified active set."""

    raw_solution = True

    def __init__(self, n: int, n_ineq: int, n_eq: int, *, precondition: bool = True) -> None:
        self.n, self.m, self.p = n, n_ineq, n_eq
        self.precondition = precondition
        self.structure = "identity" if precondition else "symmetric"

    def describe(self) -> str:
        return f"QP KKT (n={self.n}, {self.m} inequalities, {self.p} equalities)"

    # --- the residual ------------------------------------------------------------------------------
    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, p = self.n, self.p
        return z[..., :n], z[..., n : n + p], z[..., n + p :]

    def raw_residual(self, z, active, Q, p, G, h, A, b) -> torch.Tensor:
        x, nu, lam = self.split(z)
        # Row-vector products (v @ M, v @ M.mT), never M @ v: under vmap the latter is a batched
        # matrix-vector bmm, which torch runs 3-5x slower on CPU than the batched vector-matrix one.
        # The symmetric part of Q (the QP only sees it): one product with x, and for a Q shared by the batch
        # the symmetrisation runs once, outside vmap's batching.
        stationarity = x @ (0.5 * (Q + Q.mT)) + p + nu @ A + (active * lam) @ G
        return torch.cat([stationarity, x @ A.mT - b, active * (x @ G.mT - h) + (1 - active) * lam])

    def residual(self, z: torch.Tensor, active: torch.Tensor, *rest: Any) -> torch.Tensor:
        if not self.precondition:
            return self.raw_residual(z, active, *rest)
        inverse, *params = rest
        # K0^{-1} F as F @ K0^{-1} (K0 symmetric): a vector-matrix product in both directions of autograd.
        return self.raw_residual(z, active, *params) @ inverse

    def certificate(self, z: torch.Tensor, active: torch.Tensor, *rest: Any) -> torch.Tensor:
        """F and the sign conditions, each component relative to the size of its terms, in float64."""
        Q, p, G, h, A, b = (t.to(torch.float64) for t in (rest[1:] if self.precondition else rest))
        z, a = z.to(torch.float64), active.to(torch.float64)
        x, nu, lam = self.split(z)
        Qs = 0.5 * (Q + Q.mT)
        F = self.raw_residual(z, a, Qs, p, G, h, A, b)
        n, pe = self.n, self.p
        stat_scale = 1 + Qs.abs() @ x.abs() + p.abs() + A.abs().mT @ nu.abs() + G.abs().mT @ (a * lam).abs()
        row = 1 + G.abs() @ x.abs() + h.abs()
        lam_scale = 1 + (lam.abs().amax() if self.m else lam.new_zeros(()))
        scaled = torch.cat([F[:n] / stat_scale, F[n : n + pe] / (1 + A.abs() @ x.abs() + b.abs()),
                            a * F[n + pe :] / row + (1 - a) * F[n + pe :] / lam_scale])
        feasibility = torch.cat([(1 - a) * torch.relu(G @ x - h) / row, a * torch.relu(-lam) / lam_scale])
        return torch.cat([scaled, feasibility])

    # --- answer -> unknowns -> outputs ------------------------------------------------------------
    def prepare(self, solution: Any, params: tuple, options: Any) -> tuple[torch.Tensor, tuple]:
        like = next((q for q in params if torch.is_tensor(q) and q.is_floating_point()), None)
        dtype = like.dtype if like is not None else torch.float64
        device = like.device if like is not None else torch.device("cpu")
        _warn(solution, self.m)
        active = np.asarray(solution.active, dtype=bool)
        z = np.concatenate([solution.x, solution.eq, np.where(active, solution.ineq, 0.0)])
        a = torch.as_tensor(active.astype(np.float64)).to(dtype=dtype, device=device)
        z_t = torch.as_tensor(z).to(dtype=dtype, device=device)
        if not self.precondition:
            return z_t, (a,)
        inverse = torch.as_tensor(self._full_inverse(solution, active)).to(dtype=dtype, device=device)
        return z_t, (a, inverse)

    def _full_inverse(self, solution: Any, active: np.ndarray) -> np.ndarray:
        """K0^{-1} in the unknowns' order: K_S^{-1} on (x, nu, lam_S), the identity on the inactive lam."""
        N = self.n + self.p + self.m
        out = np.eye(N)
        if solution.kkt_inverse is None:  # degenerate: K0 = I, the raw F (see the module docstring)
            return out
        keep = np.concatenate([np.ones(self.n + self.p, dtype=bool), active])
        idx = np.nonzero(keep)[0]
        out[np.ix_(idx, idx)] = solution.kkt_inverse
        return out

    def finish(self, z: torch.Tensor, aux: tuple, options: Any) -> Any:
        x, nu, lam = self.split(z)
        if not getattr(options, "return_duals", False):
            return x
        return KKTSolution(x=x, eq=nu, ineq=lam)


def _warn(solution: Any, m: int) -> None:
    if solution.singular:
        eq_rows, ineq_rows = solution.dependent
        if eq_rows or ineq_rows:
            why = (f"the active constraints are linearly dependent (LICQ fails): equality rows {eq_rows} and "
                   f"inequality rows {ineq_rows} depend on the other active rows, so their multipliers are not "
                   "unique and the solution is not differentiable in their right-hand sides")
        else:
            why = ("Q is singular on the null space of the active constraints, so the solution is not unique "
                   "(e.g. an LP with a face of optima)")
        warnings.warn(
            f"QP layer: the reduced KKT matrix is singular: {why}. The gradient returned is the minimum-norm "
            "one (least squares).",
            RuntimeWarning,
            stacklevel=6,
        )
    weak = np.nonzero(np.asarray(solution.weak, dtype=bool))[0].tolist() if m else []
    if weak:
        warnings.warn(
            f"QP layer: inequality rows {weak} are weakly active (slack and multiplier both ~0). The solution map "
            "is not differentiable there; the gradient returned is the one-sided derivative that keeps "
            f"{[i for i in weak if solution.active[i]]} active and {[i for i in weak if not solution.active[i]]} "
            "inactive.",
            RuntimeWarning,
            stacklevel=6,
        )
