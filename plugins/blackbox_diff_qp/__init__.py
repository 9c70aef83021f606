"""QP backend: dense quadratic programs (qpth's Q, p, G, h, A, b) solved by real QP solvers.

Forward: qpsolvers' solver per instance (DAQP, a dense active-set solver, by default), the answer's active
set identified from slacks and multipliers together, the answer polished by an exact solve on that set,
and the reduced KKT matrix LU-factored. Backward: the engine's adjoint with the KKT residual
preconditioned by that factorisation (triangular solves plus one product). `bbd.QPLayer` is the
qpth-style front end; `solve_qp` is the single-instance black box for other backends.
"""

from __future__ import annotations

from typing import Any

import blackbox_diff as bbd
from blackbox_diff_qp._backend import QPBackend, QPSolve
from blackbox_diff_qp._solve import QPSolution, solve_qp
from blackbox_diff_qp._solvers import SOLVER_PACKAGES

__all__ = ["SOLVER_PACKAGES", "QPBackend", "QPSolution", "QPSolve", "register_backends", "solve_qp"]


@bbd.hookimpl
def register_backends(register: Any) -> None:
    """Register the QP backend (its availability is checked lazily)."""
    register(QPBackend())
