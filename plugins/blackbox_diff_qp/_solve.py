"""`solve_qp`: one QP instance, solved by a real solver and polished on its active set.

This is the black box of the QP backend, and a public function on its own, so that another backend (the
cvxpy one, for LP/QP-class problems) can hand its QPs to the same solvers and get the same exact answer,
multipliers, active set and factorisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from blackbox_diff import InputError, SolverError

from ._kkt import refine
from ._solvers import choose_solver, not_convex, not_convex_message, run_solver

__all__ = ["QPSolution", "solve_qp"]


@dataclasses.dataclass
class QPSolution:
    """The answer to min 1/2 x^T Q x + p^T x s.t. Gx <= h, Ax = b (Lagrangian f + eq^T(Ax-b) + ineq^T(Gx-h)).

    Attributes:
        x: the primal solution (n,).
        eq: multipliers of Ax = b (p,).
        ineq: multipliers of Gx <= h (m,), >= 0, exactly zero off the active set.
        active: boolean mask (m,) of the inequality rows held with equality.
        weak: rows where the solution map is not differentiable (active with multiplier ~0, or inactive
            with slack ~0).
        solver: the qpsolvers name of the solver that ran.
        kkt_inverse: the inverse of the reduced KKT matrix K_S on the active set (see
            `blackbox_diff_qp._kkt`), or None (singular, or not factored densely).
        singular: K_S is singular (dependent active rows, or a non-unique solution).
        dependent: (equality rows, inequality rows) that break LICQ, when singular.
        polished: the exact solve on the active set replaced the solver's answer.
    """

    x: np.ndarray
    eq: np.ndarray
    ineq: np.ndarray
    active: np.ndarray
    weak: np.ndarray
    solver: str
    kkt_inverse: np.ndarray | None = None
    singular: bool = False
    dependent: tuple[list[int], list[int]] = ([], [])
    polished: bool = False


def _dense(M: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    if M is None:
        return np.zeros((max(shape[0], 0), shape[1]))
    if hasattr(M, "toarray"):  # scipy.sparse
        M = M.toarray()
    M = np.asarray(M, dtype=np.float64)
    if M.size == 0:
        M = M.reshape(0, shape[1])
    if M.ndim != 2 or M.shape[1] != shape[1] or (shape[0] >= 0 and M.shape[0] != shape[0]):
        raise InputError(f"{name} has shape {M.shape}; expected {shape}.")
    return M


def _vector(v: Any, size: int, name: str) -> np.ndarray:
    v = np.zeros(size) if v is None else np.asarray(v, dtype=np.float64).reshape(-1)
    if v.shape != (size,):
        raise InputError(f"{name} has {v.size} entries; expected {size} (one per row of its matrix).")
    return v


def solve_qp(
    Q: Any,
    p: Any,
    G: Any = None,
    h: Any = None,
    A: Any = None,
    b: Any = None,
    *,
    solver: str = "auto",
    settings: dict[str, Any] | None = None,
    active_tol: float = 1e-7,
    check_psd: bool = True,
    dense: bool = True,
) -> QPSolution:
    """Solve one QP with a real solver, identify its active set and polish the answer on it.

    Args:
        Q, p, G, h, A, b: the QP min 1/2 x^T Q x + p^T x s.t. Gx <= h, Ax = b (dense arrays or scipy.sparse
            matrices; G/h and A/b may be None or have zero rows).
        solver: "auto" (DAQP for dense problems up to a few thousand KKT unknowns, PIQP beyond when
            sparse) or a qpsolvers name ("daqp", "proxqp", "osqp", "piqp", "clarabel", "highs", ...).
        settings: keyword settings for the solver (override the accurate defaults).
        active_tol: relative tolerance of the active-set identification (slack and multiplier).
        check_psd: verify that Q is positive semidefinite first (DAQP checks it itself).
        dense: factor the reduced KKT system densely and keep the factors (for the backward).

    Returns:
        A `QPSolution`.

    Raises:
        InputError: mismatched shapes.
        SolverError: Q not positive semidefinite, the QP infeasible or unbounded, or the solver failed
            (the message says which).
    """
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    n = p.size
    Q = _dense(Q, (n, n), "Q")
    G = _dense(G, (-1, n), "G")
    A = _dense(A, (-1, n), "A")
    h = _vector(h, G.shape[0], "h")
    b = _vector(b, A.shape[0], "b")
    Q = 0.5 * (Q + Q.T)
    name = choose_solver(solver, n, A.shape[0], G.shape[0], Q, G, A)
    if check_psd and name != "daqp":
        smallest = not_convex(Q)
        if smallest is not None:
            raise SolverError(not_convex_message(smallest))
    try:
        raw = run_solver(name, Q, p, G, h, A, b, dict(settings or {}))
    except SolverError as err:
        if solver != "auto" or "Clarabel solves it" not in str(err):
            raise
        raw = run_solver("clarabel", Q, p, G, h, A, b, {})  # 'auto': a convex, feasible, bounded QP
    r = refine(Q, p, G, h, A, b, raw.x, raw.eq, raw.ineq, tol=active_tol, dense=dense)
    return QPSolution(r.x, r.eq, r.ineq, r.active, r.weak, raw.solver, r.inverse, r.singular, r.dependent,
                      r.polished)
