"""LP/QP-class cone programs solved as QPs by a dense active-set solver: the default route.

A cvxpy problem whose cone program has only zero and non-negative cones is a QP (an LP when P = 0):

    minimise 1/2 x^T P x + c^T x   subject to   A_zero x = b_zero,   A_nonneg x <= b_nonneg,

the rows of the cone program's  b - A x = s in {0}^z x R_+^l  read as equalities and inequalities. When the
user names no solver (no ``solver=``, ``solver_args``, ``eps`` or ``verbose``), such a program with at most `ROUTE_MAX`
KKT unknowns (n + m) goes to DAQP, a dense dual active-set solver (through qpsolvers), which answers these
in well under a millisecond where Clarabel's interior point takes tens. When DAQP is not installed, or fails
(infeasible, unbounded, iteration limit), the instance is solved by Clarabel as before, so the errors say
what Clarabel says.

The QP answer is returned in the cone program's form, so the condition, certification, active-set
refinement and degeneracy test are the ones every solver's answer goes through: with qpsolvers'
Lagrangian  L = f + y_eq^T (A_zero x - b_zero) + z^T (A_nonneg x - b_nonneg),  stationarity
P x + c + A_zero^T y_eq + A_nonneg^T z = 0 is the cone program's  P x + c + A^T y = 0  with y = (y_eq, z),
z >= 0 is y in the dual cone, and the slack is s = (0, b_nonneg - A_nonneg x). The active set is identified
from slacks and multipliers (not from DAQP's working set), so a row with zero slack and zero multiplier at
a degenerate vertex is seen as weakly active and examined like any other solver's.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import Counter
from typing import Any

import numpy as np

from ._canon import ConeProgram
from ._solvers import ConicAnswer, solve_conic
from ._theta import theta_numpy

__all__ = ["QP_SETTINGS", "QP_SOLVER", "ROUTE_MAX", "CountsSolvers", "RoutedSolve", "routable", "solve_qp"]

#: The QP solver of the default route (qpsolvers' name).
QP_SOLVER = "daqp"
#: DAQP's settings on the route. A singular P (an LP, or a QP whose objective leaves some variables out, as
#: cvxpy's epigraph variables) makes DAQP run proximal-point iterations, which stop at eta_prox (1e-6 by
#: default: x off by 10 % on a QP whose objective is scaled by 1e-6); they are run to 1e-12 here (as fast on
#: the benchmark's LPs). The refinement on the active set then removes what is left.
QP_SETTINGS = {"eta_prox": 1e-12}
#: Relative accuracy below which a DAQP answer is not taken (Clarabel solves the instance instead).
GUARD_TOL = 1e-7
#: Largest cone program (n + m: variables plus rows) routed to the dense QP solver; larger ones go to Clarabel.
ROUTE_MAX = 2000


def _qp_solver_installed() -> bool:
    return importlib.util.find_spec("qpsolvers") is not None and importlib.util.find_spec("daqp") is not None


def routable(program: ConeProgram) -> bool:
    """Whether the default route sends `program` to the QP solver: zero and non-negative cones only, at most
    `ROUTE_MAX` KKT unknowns, and qpsolvers with DAQP installed."""
    return not program.cones.nonlinear and program.n + program.m <= ROUTE_MAX and _qp_solver_installed()


def solve_qp(dense: tuple, z0: int) -> ConicAnswer | None:
    """DAQP on the dense cone data (P full or None, c, A, b), the first `z0` rows equalities and the others
    inequalities; the answer in the cone program's form, or None when DAQP found no solution."""
    import qpsolvers

    P, c, A, b = dense
    n = c.size
    Q = P if P is not None else np.zeros((n, n))
    A_eq, b_eq = (A[:z0], b[:z0]) if z0 else (None, None)
    G, h = (A[z0:], b[z0:]) if A.shape[0] > z0 else (None, None)
    try:
        sol = qpsolvers.solve_problem(qpsolvers.Problem(Q, c, G, h, A_eq, b_eq), solver=QP_SOLVER, **QP_SETTINGS)
    except Exception:  # noqa: BLE001 - any failure of the QP solver falls back to Clarabel
        return None
    if not sol.found or sol.x is None:
        return None
    x = np.asarray(sol.x, dtype=np.float64)
    y_eq = np.zeros(z0) if sol.y is None else np.asarray(sol.y, dtype=np.float64).reshape(-1)
    y_in = np.zeros(A.shape[0] - z0) if sol.z is None else np.asarray(sol.z, dtype=np.float64).reshape(-1)
    y = np.concatenate([y_eq, y_in])
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return None
    if not _kkt_close(Q, c, A, b, z0, x, y):
        return None
    s = np.concatenate([np.zeros(z0), np.maximum(b[z0:] - A[z0:] @ x, 0.0)])
    return ConicAnswer(x, y, s, "solved", solver="DAQP")


def _kkt_close(P, c, A, b, z0: int, x, y, tol: float = GUARD_TOL) -> bool:
    """Whether (x, y) satisfies the KKT conditions to `tol` relative to the size of their terms (stationarity,
    feasibility, multiplier signs, complementarity): a guard against an answer DAQP reports found but is not
    (the route then asks Clarabel). The refinement on the active set makes a close answer exact."""
    Aa, ax, ay = np.abs(A), np.abs(x), np.abs(y)
    stationarity = P @ x + c + A.T @ y
    stat_scale = float((np.abs(P) @ ax + np.abs(c) + Aa.T @ ay).max(initial=0.0))
    r = A @ x - b
    row_scale = float((Aa @ ax + np.abs(b)).max(initial=0.0))
    y_in = y[z0:]
    violation = max(float(np.abs(r[:z0]).max(initial=0.0)), float(r[z0:].max(initial=0.0)))
    slack = np.maximum(-r[z0:], 0.0)
    dual_scale = float(ay.max(initial=0.0))
    return (float(np.abs(stationarity).max(initial=0.0)) <= tol * stat_scale
            and violation <= tol * row_scale
            and float((-y_in).max(initial=0.0)) <= tol * dual_scale
            and float((y_in * slack).max(initial=0.0)) <= tol * dual_scale * row_scale)


class CountsSolvers:
    """Base of the cvxpy black boxes: `solver_counts` says which solver answered how many instances.

    Attributes:
        solver_counts: per solver, the instances (in this process) whose answer or failure came from it, e.g.
            ``{"DAQP": 7, "CLARABEL": 1}`` (a `collections.Counter`). On the default route, CLARABEL counts the
            instances DAQP gave no acceptable answer on (whether Clarabel then solved them or not). Instances
            solved in worker processes (a process-pool executor) are not counted here.
    """

    def __init__(self) -> None:
        self.solver_counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable for process executors (the lock is not)
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _count(self, solver: str) -> None:
        with self._lock:
            self.solver_counts[solver] += 1


class RoutedSolve(CountsSolvers):
    """The black box of the default route for one instance: DAQP on the LP/QP, Clarabel when DAQP fails."""

    def __init__(self, program: ConeProgram, fallback_args: dict[str, Any]) -> None:
        super().__init__()
        self.program, self.fallback_args = program, fallback_args
        self.__name__ = "cvxpy[DAQP, CLARABEL fallback]"

    def __call__(self, *params: np.ndarray) -> ConicAnswer:
        program = self.program
        P, c, A, b = program.data(theta_numpy(program.pieces, program.n_theta, list(params)))
        dense = program.dense(P, c, A, b)
        answer = solve_qp(dense, program.cones.zero)
        if answer is None:
            self._count("CLARABEL")
            answer = solve_conic("CLARABEL", P, c, A, b, program.cones, self.fallback_args)
        else:
            self._count("DAQP")
        answer.data = dense
        return answer
