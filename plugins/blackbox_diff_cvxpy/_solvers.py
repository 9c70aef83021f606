"""Thin adapters from the conic data (P, c, A, b, cones) to the solver libraries cvxpy ships with.

Every adapter solves  min 1/2 x^T P x + c^T x  s.t.  b - A x = s in K  and returns a `ConicAnswer`
(x, y, s) with P x + c + A^T y = 0, y in K*, s in K, or raises `SolverError` with the solver's status.
The libraries are imported inside the functions: a missing one only disables its solver name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from blackbox_diff import InputError, SolverError

from ._canon import ConeLayout

__all__ = ["SOLVERS", "ConicAnswer", "default_solver_args", "solve_conic"]


@dataclasses.dataclass
class ConicAnswer:
    """A primal-dual solution of the cone program, plus the solver's own status string."""

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    status: str
    data: Any = None  # dense (P, c, A, b) of the instance, for the refinement in the condition
    solver: str = ""  # the solver that answered (CLARABEL, SCS, ECOS, OSQP, or DAQP on the default route)


def _csc(M) -> sp.csc_matrix:
    """A scipy csc_matrix with int32 indices (what ECOS and OSQP accept)."""
    out = sp.csc_matrix(M)
    out.indices = out.indices.astype(np.int32)
    out.indptr = out.indptr.astype(np.int32)
    return out


class _Failure(Exception):
    """The solver's own status (`raw`) and cvxpy's name for it (`status`: 'infeasible', 'unbounded', ...)."""

    def __init__(self, raw: str, status: str | None = None) -> None:
        super().__init__(raw)
        self.raw = raw
        self.status = status or "solver_error"


def _cvxpy_status(solver: str, code: Any) -> str | None:
    """cvxpy's status name for a solver's code, from cvxpy's own solver interfaces."""
    try:
        if solver == "CLARABEL":
            from cvxpy.reductions.solvers.conic_solvers.clarabel_conif import CLARABEL as intf
        elif solver == "SCS":
            from cvxpy.reductions.solvers.conic_solvers.scs_conif import SCS as intf
        elif solver == "ECOS":
            from cvxpy.reductions.solvers.conic_solvers.ecos_conif import ECOS as intf
        else:
            from cvxpy.reductions.solvers.qp_solvers.osqp_qpif import OSQP as intf
        return intf.STATUS_MAP.get(code)
    except (ImportError, AttributeError):
        return None


def _clarabel(P, c, A, b, cones: ConeLayout, args: dict[str, Any]) -> ConicAnswer:
    import clarabel

    n = c.size
    P = P if P is not None else sp.csc_matrix((n, n))
    spec = []
    if cones.zero:
        spec.append(clarabel.ZeroConeT(cones.zero))
    if cones.nonneg:
        spec.append(clarabel.NonnegativeConeT(cones.nonneg))
    spec += [clarabel.SecondOrderConeT(k) for k in cones.soc]
    spec += [clarabel.PSDTriangleConeT(k) for k in cones.psd]
    spec += [clarabel.ExponentialConeT() for _ in range(cones.exp)]
    spec += [clarabel.PowerConeT(alpha) for alpha in cones.pow]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    accept = args.pop("accept_inaccurate", False)
    for key, value in args.items():
        setattr(settings, key, value)
    sol = clarabel.DefaultSolver(P, c, A, b, spec, settings).solve()
    status = str(sol.status)
    if status != "Solved" and not (accept and status == "AlmostSolved"):
        raise _Failure(status, _cvxpy_status("CLARABEL", status))
    return ConicAnswer(np.asarray(sol.x), np.asarray(sol.z), np.asarray(sol.s), status)


_SCS_STATUS = {1: "solved", 2: "solved_inaccurate", -1: "unbounded", -6: "unbounded_inaccurate",
               -2: "infeasible", -7: "infeasible_inaccurate", -3: "indeterminate", -4: "failed",
               -5: "interrupted"}


def _scs(P, c, A, b, cones: ConeLayout, args: dict[str, Any]) -> ConicAnswer:
    import scs

    data = {"A": A, "b": b, "c": c}
    if P is not None:
        data["P"] = P
    cone = {"z": cones.zero, "l": cones.nonneg, "q": list(cones.soc), "s": list(cones.psd), "ep": cones.exp,
            "p": list(cones.pow)}
    accept = args.pop("accept_inaccurate", False)
    args.setdefault("verbose", False)
    out = scs.SCS(data, cone, **args).solve()
    code = int(out["info"]["status_val"])
    status = _SCS_STATUS.get(code, str(out["info"].get("status", code)))
    if code != 1 and not (accept and code == 2):
        raise _Failure(status, _cvxpy_status("SCS", code))
    return ConicAnswer(np.asarray(out["x"]), np.asarray(out["y"]), np.asarray(out["s"]), status)


_ECOS_STATUS = {0: "optimal", 1: "infeasible", 2: "unbounded", 10: "optimal_inaccurate",
                11: "infeasible_inaccurate", 12: "unbounded_inaccurate", -1: "max_iters", -2: "numerics",
                -3: "outcone", -4: "sigint", -7: "fatal"}


def _ecos(P, c, A, b, cones: ConeLayout, args: dict[str, Any]) -> ConicAnswer:
    import ecos

    if P is not None:
        raise _Failure("ECOS takes no quadratic objective (canonicalisation should have removed it)")
    if cones.psd or cones.pow:
        raise _Failure("ECOS does not support PSD or power cones")
    A = _csc(A)
    z = cones.zero
    dims = {"l": cones.nonneg, "q": list(cones.soc), "e": cones.exp}
    kwargs = {"A": _csc(A[:z]), "b": b[:z]} if z else {}
    accept = args.pop("accept_inaccurate", False)
    args.setdefault("verbose", False)
    out = ecos.solve(c, _csc(A[z:]), b[z:], dims, **kwargs, **args)
    code = int(out["info"]["exitFlag"])
    status = _ECOS_STATUS.get(code, str(code))
    if code != 0 and not (accept and code == 10):
        raise _Failure(status, _cvxpy_status("ECOS", code))
    y = np.concatenate([np.asarray(out["y"]).reshape(-1)[:z], np.asarray(out["z"]).reshape(-1)])
    s = np.concatenate([np.zeros(z), np.asarray(out["s"]).reshape(-1)])
    return ConicAnswer(np.asarray(out["x"]), y, s, status)


def _osqp(P, c, A, b, cones: ConeLayout, args: dict[str, Any]) -> ConicAnswer:
    import osqp

    if cones.nonlinear:
        raise _Failure("OSQP solves QPs only (zero and non-negative cones); this problem has other cones")
    n = c.size
    A = _csc(A)
    lower = np.concatenate([b[: cones.zero], np.full(cones.nonneg, -np.inf)])
    P = _csc(P if P is not None else sp.csc_matrix((n, n)))
    accept = args.pop("accept_inaccurate", False)
    args.setdefault("verbose", False)
    solver = osqp.OSQP()
    solver.setup(P=P, q=c, A=A, l=lower, u=b, **args)
    res = solver.solve(raise_error=False)
    status = str(res.info.status)
    if status != "solved" and not (accept and status == "solved inaccurate"):
        raise _Failure(status, _cvxpy_status("OSQP", int(res.info.status_val)))
    x = np.asarray(res.x)
    return ConicAnswer(x, np.asarray(res.y), b - A @ x, status)


SOLVERS: dict[str, Callable[..., ConicAnswer]] = {
    "CLARABEL": _clarabel,
    "SCS": _scs,
    "ECOS": _ecos,
    "OSQP": _osqp,
}


def default_solver_args(solver: str, eps: float | None) -> dict[str, Any]:
    """Tolerances that make the returned point pass certification (the engine checks the residual).

    SCS and OSQP stop at 1e-4/1e-3 by default, far too loose for a gradient; they are tightened here.
    `eps` (when given) sets every solver's absolute and relative tolerances.
    """
    if solver == "CLARABEL":
        return {} if eps is None else {"tol_gap_abs": eps, "tol_gap_rel": eps, "tol_feas": eps}
    if solver == "SCS":
        e = 1e-10 if eps is None else eps
        return {"eps_abs": e, "eps_rel": e, "max_iters": 200_000}
    if solver == "OSQP":
        e = 1e-10 if eps is None else eps
        return {"eps_abs": e, "eps_rel": e, "polishing": True, "max_iter": 200_000}
    if solver == "ECOS":
        return {} if eps is None else {"abstol": eps, "reltol": eps, "feastol": eps}
    return {}


def solve_conic(solver: str, P, c, A, b, cones: ConeLayout, args: dict[str, Any]) -> ConicAnswer:
    """Run `solver` on the data (P: upper triangle, CSC); raise `SolverError` when it does not solve."""
    try:
        answer = SOLVERS[solver](P, c, A, b, cones, dict(args))
    except _Failure as err:  # cvxpy's status name on the error, the solver's own in the message
        raise SolverError(
            f"cvxpy backend: solver {solver} did not solve the problem (status {err.status!r}, {solver}: "
            f"{err.raw!r}); expected an optimal solution. The problem may be infeasible or unbounded for these "
            "parameter values, or the solver inaccurate: check the parameters, pick another solver, or "
            "loosen its tolerances with solver_args.",
            backend="cvxpy",
            status=err.status,
        ) from None
    answer.solver = solver
    if not (np.all(np.isfinite(answer.x)) and np.all(np.isfinite(answer.y))):
        raise SolverError(
            f"cvxpy backend: solver {solver} reported {answer.status!r} but returned NaN/Inf values. "
            "Pick another solver or tighten its tolerances.",
            backend="cvxpy",
            status=answer.status,
        )
    return answer


def check_cones(param_prob: Any, solver: str) -> None:
    """Refuse cones the backend cannot differentiate with `solver` (n-d power cones; exponential cones
    outside CLARABEL/SCS)."""
    dims = param_prob.cone_dims
    if dims.pnd:
        raise InputError(
            f"The cvxpy backend does not differentiate n-dimensional power cones (cp.PowConeND; the problem "
            f"has {len(dims.pnd)}). Write them with 3-d power cones (cp.PowCone3D), which are supported."
        )
    if dims.exp and solver not in ("CLARABEL", "SCS"):
        raise InputError(
            f"The cvxpy backend differentiates exponential cones with CLARABEL or SCS, not {solver} (whose "
            "exponential cone orders its coordinates differently). Pass solver='CLARABEL'."
        )
