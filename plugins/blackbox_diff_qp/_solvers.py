"""The QP solvers, through qpsolvers' one API: names, accurate default settings, the automatic choice,
and a diagnosis of failures (not convex, infeasible, unbounded) that names the cause.

qpsolvers and the solver libraries are imported inside functions: a missing one disables the backend (or
one solver name), never the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import threading
import warnings
from typing import Any

import numpy as np

from blackbox_diff import BackendUnavailableError, InputError, SolverError

__all__ = [
    "ACTIVE_SET_SOLVERS",
    "SOLVER_PACKAGES",
    "RawAnswer",
    "check_solver_name",
    "choose_solver",
    "not_convex",
    "run_solver",
]

#: solver name (qpsolvers') -> the pip package that provides it.
SOLVER_PACKAGES: dict[str, str] = {
    "daqp": "daqp",
    "proxqp": "proxsuite",
    "piqp": "piqp",
    "osqp": "osqp",
    "clarabel": "clarabel",
    "highs": "highspy",
    "quadprog": "quadprog",
    "ecos": "ecos",
    "scs": "scs",
}
_MODULES = {"proxqp": "proxsuite", "highs": "highspy"}

#: Solvers whose answer carries their final working set: a multiplier is nonzero exactly on it.
ACTIVE_SET_SOLVERS = frozenset({"daqp", "quadprog", "highs"})

# Defaults tight enough that the active set is identified from the answer (the polish on that set then
# makes it exact); the user's solver_settings override them. Interior-point solvers' defaults (1e-8) are.
_SETTINGS: dict[str, dict[str, Any]] = {
    "proxqp": {"eps_abs": 1e-9, "eps_rel": 0.0},
    "osqp": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iter": 100_000, "polishing": True, "raise_error": False},
    "scs": {"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 100_000},
}

# Past this many KKT unknowns (n + equalities + inequalities) the default is a sparse interior-point
# solver; below it the dense active-set solver DAQP, which is fastest on dense small and medium QPs.
DENSE_AUTO_MAX = 2000


@dataclasses.dataclass
class RawAnswer:
    """A solver's answer in the Lagrangian convention L = f + eq^T (Ax - b) + ineq^T (Gx - h)."""

    x: np.ndarray
    eq: np.ndarray
    ineq: np.ndarray
    solver: str


def _installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES.get(name, name)) is not None


def check_solver_name(name: str) -> None:
    """Raise a clear error for an unknown solver name, or a known one that is not installed.

    Raises:
        InputError: the name is neither "auto" nor one of `SOLVER_PACKAGES`.
        BackendUnavailableError: its library is not installed (with the pip command).
    """
    if name == "auto":
        return
    if name not in SOLVER_PACKAGES:
        raise InputError(
            f"Unknown QP solver {name!r}; expected 'auto' or one of {sorted(SOLVER_PACKAGES)} (qpsolvers' names)."
        )
    if not _installed(name):
        raise BackendUnavailableError(
            f"QP solver {name!r} needs the package {SOLVER_PACKAGES[name]!r}, which is not installed. Install "
            f'it with: pip install {SOLVER_PACKAGES[name]} (or pip install "blackbox-diff[qp]" for all of them).'
        )


def density(*matrices: np.ndarray) -> float:
    total = sum(m.size for m in matrices)
    return sum(int(np.count_nonzero(m)) for m in matrices) / total if total else 1.0


def choose_solver(name: str, n: int, n_eq: int, n_ineq: int, Q: np.ndarray, G: np.ndarray, A: np.ndarray) -> str:
    """The solver 'auto' stands for: DAQP (dense active set) unless the problem is large and sparse,
    then PIQP (sparse interior point) on sparse matrices."""
    if name != "auto":
        return name
    if n + n_eq + n_ineq <= DENSE_AUTO_MAX or density(Q, G, A) > 0.1:
        return "daqp"
    return "piqp"


def _problem(name: str, Q, p, G, h, A, b):
    import qpsolvers

    sparse = name not in qpsolvers.dense_solvers
    if sparse:
        import scipy.sparse as sps

        Q, G, A = (sps.csc_matrix(M) if M is not None else None for M in (Q, G, A))
    return qpsolvers.Problem(Q, p, G, h, A, b)


def run_solver(name: str, Q, p, G, h, A, b, settings: dict[str, Any]) -> RawAnswer:
    """Solve min 1/2 x^T Q x + p^T x s.t. Gx <= h, Ax = b with qpsolvers' solver `name`.

    Raises:
        SolverError: the solver raised, or reported no solution (the message says why when the
            diagnosis finds it: not convex, infeasible, unbounded).
    """
    import qpsolvers

    G_, h_ = (G, h) if G.shape[0] else (None, None)
    A_, b_ = (A, b) if A.shape[0] else (None, None)
    options = {**_SETTINGS.get(name, {}), **settings}
    try:
        # No stdout redirection (HiGHS prints a banner from C++ whatever its settings): swapping sys.stdout
        # is process-wide, and under executor="threads" it lost the caller's own output.
        sol = qpsolvers.solve_problem(_problem(name, Q, p, G_, h_, A_, b_), solver=name, **options)
    except Exception as err:  # noqa: BLE001 - every solver failure becomes one SolverError with the cause
        raise SolverError(
            f"QP solver {name!r} raised {type(err).__name__}: {err}. {diagnose(Q, p, G, h, A, b, name)}"
        ) from err
    if not sol.found or sol.x is None or not np.all(np.isfinite(sol.x)):
        raise SolverError(f"QP solver {name!r} found no solution. {diagnose(Q, p, G, h, A, b, name)}")
    eq = np.zeros(A.shape[0]) if sol.y is None else np.asarray(sol.y, dtype=np.float64)
    ineq = np.zeros(G.shape[0]) if sol.z is None else np.asarray(sol.z, dtype=np.float64)
    return RawAnswer(np.asarray(sol.x, dtype=np.float64), eq, ineq, name)


def not_convex(Q: np.ndarray) -> float | None:
    """The smallest eigenvalue of Q when Q is not positive semidefinite (beyond round-off), else None.

    A Cholesky factorisation of Q + delta*I (cheap) settles the common case; only a failure pays for the
    eigenvalues.
    """
    if Q.shape[0] == 0:
        return None
    scale = max(1.0, float(np.abs(Q).max()))
    delta = 1e-10 * scale * Q.shape[0]
    try:
        np.linalg.cholesky(Q + delta * np.eye(Q.shape[0]))
        return None
    except np.linalg.LinAlgError:
        smallest = float(np.linalg.eigvalsh(Q)[0])
        return smallest if smallest < -delta else None


def not_convex_message(smallest: float) -> str:
    return (
        f"Q is not positive semidefinite (smallest eigenvalue {smallest:.3g}), so the QP is not convex. Expected "
        "a symmetric positive semidefinite Q (e.g. Q = L L^T + eps*I)."
    )


@contextlib.contextmanager
def _nothing():
    yield


_UNBOUNDED = (
    "The QP is unbounded below (Q is singular along a feasible direction in which p^T z decreases): add "
    "constraints or make Q positive definite."
)


def diagnose(Q, p, G, h, A, b, tried: str) -> str:
    """Why a QP has no solution, in words: not convex, infeasible or unbounded (Clarabel's certificates)."""
    smallest = not_convex(Q)
    if smallest is not None:
        return not_convex_message(smallest)
    if G.shape[0] == 0 and A.shape[0] == 0:  # unconstrained: bounded iff p is in the range of Q (Q PSD)
        x = np.linalg.lstsq(Q, -p, rcond=None)[0]
        if np.abs(Q @ x + p).max(initial=0.0) > 1e-9 * (1.0 + np.abs(p).max(initial=0.0)):
            return _UNBOUNDED
        return f"The QP is convex and bounded: solver {tried!r} failed on it; try another."
    if not _installed("clarabel"):
        return "Check that the QP is feasible and bounded."
    import qpsolvers

    G_, h_ = (G, h) if G.shape[0] else (None, None)
    A_, b_ = (A, b) if A.shape[0] else (None, None)
    quiet = warnings.catch_warnings() if threading.current_thread() is threading.main_thread() else _nothing()
    try:
        with quiet:  # qpsolvers warns about the status it then returns (filters are process-wide: main thread only)
            if isinstance(quiet, warnings.catch_warnings):
                warnings.simplefilter("ignore")
            sol = qpsolvers.solve_problem(_problem("clarabel", Q, p, G_, h_, A_, b_), solver="clarabel")
    except Exception:  # noqa: BLE001 - the diagnosis is best effort
        return "Check that the QP is feasible and bounded."
    status = str(getattr(sol, "extras", {}).get("status", ""))
    if "PrimalInfeasible" in status:
        return "The QP is infeasible (no z satisfies Gz <= h and Az = b): check h and b."
    if "DualInfeasible" in status:
        return _UNBOUNDED
    if sol.found:
        return f"The QP is feasible and bounded (Clarabel solves it): solver {tried!r} failed on it; try another."
    return f"Clarabel's status on it: {status or 'unknown'}."
