"""The reduced KKT system of a QP on its active set: identification, polish, factorisation, degeneracy.

On an active set S (inequality rows held with equality) the QP's KKT conditions are the linear system

    K_S [x; nu; lam_S] = [-p; b; h_S],   K_S = [[Q, A^T, G_S^T], [A, 0, 0], [G_S, 0, 0]],

with lam = 0 off S. K_S is nonsingular exactly when the active rows [A; G_S] are linearly independent
(LICQ) and Q is positive definite on their null space; then the solution map is differentiable wherever
no constraint is weakly active (slack and multiplier both zero), and its derivative is K_S^{-1} applied
to the derivative of the right-hand side and of K_S. One factorisation of K_S therefore polishes the solver's
answer (an exact solve on its active set) and later serves every backward pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = ["Refined", "classify", "dependent_rows", "factor", "refine"]

# K_S is numerically singular when its condition number exceeds the inverse of this.
SINGULAR_PIVOT = 1e-12


@dataclasses.dataclass
class Refined:
    """A QP answer polished on its active set.

    Attributes:
        x, eq, ineq: primal solution, equality and inequality multipliers (ineq is 0 off the active set).
        active: boolean mask of the inequality rows taken as active.
        weak: active rows with a multiplier ~0 or inactive rows with a slack ~0 (not differentiable there).
        inverse: K_S^{-1} (dense, symmetric), or None when K_S is singular or was not factored densely.
        singular: K_S is singular (degenerate): dependent active rows, or Q singular on their null space.
        dependent: (equality rows, inequality rows) that are linearly dependent on the other active rows.
        polished: whether the exact solve on the active set replaced the solver's answer.
    """

    x: np.ndarray
    eq: np.ndarray
    ineq: np.ndarray
    active: np.ndarray
    weak: np.ndarray
    inverse: np.ndarray | None = None
    singular: bool = False
    dependent: tuple[list[int], list[int]] = ([], [])
    polished: bool = False


def _scales(G, h, x, lam, tol):
    slack_scale = tol * (1.0 + np.abs(h) + np.abs(G) @ np.abs(x)) if G.shape[0] else np.zeros(0)
    return slack_scale, tol * (1.0 + float(np.abs(lam).max(initial=0.0)))


def classify(G, h, x, lam, tol) -> np.ndarray:
    """Active rows from slacks and multipliers together: a clearly positive multiplier, or a slack ~0.

    A multiplier sign alone would take an interior-point solver's ~1e-10 multipliers of inactive rows as
    active; a slack alone would miss nothing but a weakly active row, which is kept active (one-sided).
    """
    slack_scale, lam_scale = _scales(G, h, x, lam, tol)
    slack = h - G @ x
    return (lam > lam_scale) | (slack <= slack_scale)


def kkt_matrix(Q, G, A, active, sparse: bool = False):
    """K_S (dense, or scipy.sparse CSC when `sparse`)."""
    C = np.concatenate([A, G[active]], axis=0)
    Qs = 0.5 * (Q + Q.T)
    if sparse:
        import scipy.sparse as sps

        Cs = sps.csr_matrix(C)
        return sps.bmat([[sps.csr_matrix(Qs), Cs.T], [Cs, None]], format="csc")
    n, r = Q.shape[0], C.shape[0]
    K = np.zeros((n + r, n + r))
    K[:n, :n] = Qs
    K[:n, n:] = C.T
    K[n:, :n] = C
    return K


class _Factors:
    """One factorisation of K_S: its explicit inverse (dense, kept for the backward) or a sparse LU."""

    def __init__(self, inverse=None, splu=None) -> None:
        self.inverse, self.splu = inverse, splu

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        if rhs.size == 0:
            return rhs
        if self.splu is not None:
            return self.splu.solve(rhs)
        return self.inverse @ rhs


def factor(Q, G, A, active, dense: bool = True) -> _Factors | None:
    """K_S^{-1} (dense), or a sparse LU of K_S; None when K_S is (numerically) singular.

    Dense: the explicit inverse, with torch's LAPACK (it honours torch.set_num_threads; scipy's threaded
    OpenBLAS was far slower on a loaded machine). An inverse, not LU factors, because the backward then
    applies it as one batched vector-matrix product in each direction; torch's batched CPU triangular
    solves copy the factors into column-major order on every call, in one direction or the other, which
    made them 5-10x slower than the product. K_S is singular when the condition number (1-norm) of its
    symmetric equilibration exceeds 1 / SINGULAR_PIVOT. Sparse: SuperLU.
    """
    if not dense:
        import scipy.sparse.linalg as spla

        K = kkt_matrix(Q, G, A, active, sparse=True)
        try:
            return _Factors(splu=spla.splu(K))
        except RuntimeError:  # exactly singular
            return None
    K = kkt_matrix(Q, G, A, active)
    if K.shape[0] == 0:
        return _Factors(np.zeros((0, 0)))
    inverse, info = torch.linalg.inv_ex(torch.from_numpy(K))
    M = inverse.numpy()
    M = 0.5 * (M + M.T)  # K_S is symmetric; its computed inverse is, up to round-off
    if int(info) != 0 or not np.all(np.isfinite(M)):
        return None
    # The condition number of the equilibrated D K D (D = 1/sqrt of each row's largest entry): a QP in badly
    # scaled units (Q ~ 1e10 beside G ~ 1) is not singular, and (D K D)^{-1} = D^{-1} M D^{-1}.
    top = np.abs(K).max(axis=1)
    d = 1.0 / np.sqrt(np.where(top > 0, top, 1.0))
    cond = np.abs(d[:, None] * K * d).sum(axis=0).max() * np.abs(M / d[:, None] / d).sum(axis=0).max()
    if not cond * SINGULAR_PIVOT < 1.0:
        return None
    return _Factors(M)


def dependent_rows(A: np.ndarray, G_active: np.ndarray, active_idx: np.ndarray, tol: float = 1e-10):
    """Active rows that are linearly dependent on the others (LICQ fails): QR with column pivoting of
    [A; G_S]^T keeps a maximal independent set, the rows left out are named."""
    import scipy.linalg

    C = np.concatenate([A, G_active], axis=0)
    if C.shape[0] == 0:
        return [], []
    _, R, order = scipy.linalg.qr(C.T, mode="economic", pivoting=True)
    d = np.abs(np.diag(R))
    rank = int(np.sum(d > tol * max(float(d.max(initial=0.0)), 1e-300))) if d.size else 0
    left = sorted(order[rank:].tolist())
    p = A.shape[0]
    return [i for i in left if i < p], [int(active_idx[i - p]) for i in left if i >= p]


def refine(Q, p, G, h, A, b, x, nu, lam, *, tol: float, dense: bool = True, max_swaps: int = 6) -> Refined:
    """Polish a solver's answer on its identified active set and factor K_S.

    A primal-dual active-set iteration started at the solver's answer: solve the KKT system on S; an
    inactive row with negative slack joins S, an active row with a negative multiplier leaves it; repeat.
    When the swaps do not settle, the answer is kept on its own active set; when K_S is singular
    (degenerate), the answer is kept as the solver gave it and the rows that break LICQ are named.

    Args:
        Q, p, G, h, A, b: the QP (dense float64 arrays; G, A may have zero rows).
        x, nu, lam: the solver's answer.
        tol: relative tolerance of the active-set identification (slack, multiplier).
        dense: factor K_S densely and keep the factors (False: sparse LU, polish only).

    Returns:
        A `Refined` answer.
    """
    n, p_eq, m = Q.shape[0], A.shape[0], G.shape[0]
    lam = np.where(lam > 0, lam, 0.0)
    active = classify(G, h, x, lam, tol)
    first = None
    for _ in range(max_swaps + 1):
        fac = factor(Q, G, A, active, dense)
        if fac is None:
            break
        first = first or (active.copy(), fac)
        sol = fac.solve(np.concatenate([-p, b, h[active]]))
        if not np.all(np.isfinite(sol)):
            break
        x_new, nu_new = sol[:n], sol[n : n + p_eq]
        lam_new = np.zeros(m)
        lam_new[active] = sol[n + p_eq :]
        slack_scale, lam_scale = _scales(G, h, x_new, lam_new, tol)
        slack = h - G @ x_new
        flip_on = ~active & (slack < -slack_scale)
        flip_off = active & (lam_new < -lam_scale)
        if flip_on.any() or flip_off.any():
            active = (active | flip_on) & ~flip_off
            continue
        # No swap needed: the point solves the KKT system on S exactly (stationarity, active rows tight) and
        # the sign checks just passed, so it is the QP's solution, to the accuracy of K_S^{-1} (its condition
        # number was checked in `factor`); the engine certifies it once more.
        lam_new = np.maximum(lam_new, 0.0) * active
        weak = (active & (lam_new <= lam_scale)) | (~active & (slack <= slack_scale))
        return Refined(x_new, nu_new, lam_new, active, weak, fac.inverse, polished=True)
    return _unpolished(A, G, h, x, nu, lam, tol, first)


def _unpolished(A, G, h, x, nu, lam, tol: float, first) -> Refined:
    """The solver's answer on its own active set: when the swaps did not settle (`first`: that set and its
    factors), or when K_S is singular (degenerate: dependent active rows, or Q singular on their null
    space), in which case the rows that break LICQ are named."""
    active = first[0] if first is not None else classify(G, h, x, lam, tol)
    _, lam_scale = _scales(G, h, x, lam, tol)
    weak = active & (lam <= lam_scale)
    kept = np.where(active, lam, 0.0)
    if first is not None:
        return Refined(x, nu, kept, active, weak, first[1].inverse)
    dependent = dependent_rows(A, G[active], np.nonzero(active)[0])
    return Refined(x, nu, kept, active, weak, singular=True, dependent=dependent)
