"""`QPBackend`: dense QPs (qpth's Q, p, G, h, A, b) solved by real QP solvers, differentiated exactly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import ConfigDict, Field

from blackbox_diff import AbstractBackend, Compiled, InputError, KKTSolution
from blackbox_diff.plugin import BackendOptions
from blackbox_diff.qp import QuadraticProgram

from ._condition import QPCondition
from ._solve import solve_qp
from ._solvers import check_solver_name

__all__ = ["QPBackend", "QPSolve"]


class QPOptions(BackendOptions):
    """Options of the QP backend (everything else goes to `bbd.implicit`)."""

    model_config = ConfigDict(extra="forbid")

    solver: str = Field(
        "auto",
        description="'auto' (DAQP, the dense active-set solver, unless the problem is large and sparse: then "
        "PIQP) or a qpsolvers name: 'daqp', 'proxqp', 'osqp', 'piqp', 'clarabel', 'highs', 'quadprog', "
        "'ecos', 'scs'.",
    )
    solver_settings: dict[str, Any] = Field(
        default_factory=dict, description="Keyword settings passed to the solver through qpsolvers."
    )
    check_psd: bool = Field(
        True, description="Check that Q is positive semidefinite before solving (a Cholesky factorisation)."
    )
    active_tol: float = Field(
        1e-7, gt=0.0, description="Relative tolerance of the active-set identification (slack, multiplier)."
    )
    dense_max: int = Field(
        3000,
        ge=0,
        description="Largest KKT size (n + equalities + inequalities) whose reduced KKT matrix is LU-factored "
        "densely in the forward pass (the backward is then triangular solves); larger problems are polished "
        "with a sparse LU and their adjoint system is left to the engine's solvers.",
    )


class QPSolve:
    """The black box for one instance: `solve_qp` on the instance's float64 arrays (picklable)."""

    def __init__(self, options: QPOptions, dense: bool) -> None:
        self.solver, self.settings = options.solver, dict(options.solver_settings)
        self.check_psd, self.active_tol, self.dense = options.check_psd, options.active_tol, dense
        self.__name__ = f"qp[{self.solver}]"

    def __call__(self, Q, p, G, h, A, b):
        return solve_qp(Q, p, G, h, A, b, solver=self.solver, settings=self.settings, active_tol=self.active_tol,
                        check_psd=self.check_psd, dense=self.dense)


def _outputs(result: Any) -> tuple:
    if isinstance(result, KKTSolution):
        return (result.x, result.eq, result.ineq)
    return (result,)


class QPBackend(AbstractBackend):
    """min 1/2 x^T Q x + p^T x s.t. Gx <= h, Ax = b with every matrix a parameter (`bbd.QPLayer`)."""

    name: ClassVar[str] = "qp"
    requires: ClassVar[tuple[str, ...]] = ("qpsolvers",)
    extra: ClassVar[str | None] = "qp"
    problem_types: ClassVar[str] = "bbd.qp.QuadraticProgram (dense Q, p, G, h, A, b; DAQP, ProxQP, OSQP, PIQP, ...)"
    returns_duals: ClassVar[bool] = True
    Options = QPOptions

    def accepts(self, problem: Any) -> bool:
        return isinstance(problem, QuadraticProgram)

    def compile(
        self,
        problem: Any,
        parameters: Sequence[Any] | None,
        variables: Sequence[Any] | None,
        options: dict[str, Any],
    ) -> Compiled:
        self.require()
        if not isinstance(problem, QuadraticProgram):
            raise InputError(
                f"The qp backend accepts a bbd.qp.QuadraticProgram(n, n_ineq, n_eq); got {type(problem).__name__}."
            )
        if parameters is not None or variables is not None:
            raise InputError(
                "The qp backend's parameters are always (Q, p, G, h, A, b) and its variable is z: pass neither "
                "parameters= nor variables=."
            )
        opts: QPOptions = self.validate_options(options)
        check_solver_name(opts.solver)
        n, m, pe = problem.n, problem.n_ineq, problem.n_eq
        dense = n + m + pe <= opts.dense_max
        return Compiled(
            solve=QPSolve(opts, dense),
            condition=QPCondition(n, m, pe, precondition=dense, active_tol=opts.active_tol),
            parameter_shapes=[(n, n), (n,), (m, n), (m,), (pe, n), (pe,)],
            variable_shapes=[(n,)],
            outputs=_outputs,
            options={},
            backend=self.name,
            unknowns_shape=(n + pe + m,),
        )

