"""`CvxpyBackend`: cvxpy problems as differentiable layers (the cvxpylayers calling convention)."""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from blackbox_diff import AbstractBackend, Compiled, InputError
from blackbox_diff._options import parse_options

from ._canon import ConeProgram, build_program, theta_numpy
from ._condition import ConeCondition
from ._solvers import SOLVERS, default_solver_args, solve_conic

__all__ = ["CvxpyBackend", "DPPSolve"]

_SOLVER_MODULES = {"CLARABEL": "clarabel", "SCS": "scs", "ECOS": "ecos", "OSQP": "osqp"}


class CvxpyOptions(BaseModel):
    """Options of the cvxpy backend (``bbd.layer(problem, ..., solver="SCS", solver_args={...})``)."""

    model_config = ConfigDict(extra="forbid")

    solver: str = Field("CLARABEL", description="Conic solver: CLARABEL (default), SCS, ECOS or OSQP.")
    solver_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword settings passed to the solver (e.g. {'max_iter': 500}); they override eps.",
    )
    eps: float | None = Field(
        None,
        gt=0.0,
        description="Absolute and relative tolerance of the solver. None: Clarabel's and ECOS's defaults "
        "(1e-8), 1e-10 for SCS and OSQP (whose defaults are too loose for accurate gradients).",
    )
    accept_inaccurate: bool = Field(
        False,
        description="Accept the solver's 'almost solved'/'inaccurate' answers (certification still applies).",
    )
    allow_non_dpp: bool = Field(
        True,
        description="Non-DPP problems are canonicalised per call and their data linearised in the "
        "parameters by central differences (slower). False rejects them, as cvxpylayers does.",
    )
    fd_step: float = Field(
        1e-6, gt=0.0, description="Non-DPP only: relative step of the central differences of the data."
    )
    refine: bool = Field(
        True,
        description="Take one Newton step on the identified active set after the solve (active rows then "
        "hold exactly; an interior-point answer is off by ~sqrt(tolerance) there). Kept only if it "
        "reduces the residual.",
    )
    precondition: bool = Field(
        True,
        description="LU-factor the KKT matrix at the answer during the forward pass, so the backward is "
        "one triangular solve per instance. False leaves the adjoint system to the engine's solvers.",
    )
    dense_max: int = Field(
        2000,
        ge=0,
        description="Largest KKT size (conic variables + rows) factored densely; larger problems are "
        "refined with a sparse LU and their adjoint system is left to the engine's Krylov solver.",
    )


def _fortran_unflatten(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    lead = v.shape[:-1]
    if len(shape) <= 1:
        return v.reshape(*lead, *shape)
    out = v.reshape(*lead, *reversed(shape))
    nl = len(lead)
    return out.permute(*range(nl), *(nl + k for k in reversed(range(len(shape)))))


class DPPSolve:
    """The black box for one instance of a DPP problem: apply the affine parameter map, run the solver."""

    def __init__(self, program: ConeProgram, solver: str, args: dict[str, Any]) -> None:
        self.program, self.solver, self.args = program, solver, args
        self.__name__ = f"cvxpy[{solver}]"

    def __call__(self, *params: np.ndarray):
        P, c, A, b = self.program.data(theta_numpy(self.program, list(params)))
        answer = solve_conic(self.solver, P, c, A, b, self.program.cones, self.args)
        answer.data = self.program.dense(P, c, A, b)
        return answer


class Outputs:
    """Maps the engine's result (x, or [x, y] with duals) to the tuple of variable (and dual) tensors."""

    def __init__(self, program: ConeProgram, n_constraints: int) -> None:
        self.program = program
        self.n_constraints = n_constraints

    def __call__(self, result: torch.Tensor) -> tuple:
        n = self.program.n
        x = result[..., :n]
        out = [_fortran_unflatten(x[..., off : off + int(np.prod(shape, dtype=int))], shape)
               for off, shape in self.program.var_slices]
        if result.shape[-1] == n:
            return tuple(out)
        y = result[..., n:]
        for where in self.program.constraint_slices:
            if where is None:
                out.append(None)
                continue
            off, size, shape = where
            out.append(_fortran_unflatten(y[..., off : off + size], shape))
        return tuple(out)


class CvxpyBackend(AbstractBackend):
    """cvxpy problems (LP, QP, SOCP, SDP, exponential cones) solved by Clarabel, SCS, ECOS or OSQP.

    DPP problems are canonicalised once: the affine map parameters -> cone program data is kept as
    sparse tensors, applied with scipy in the forward solve and with torch in the optimality condition.
    Non-DPP problems are canonicalised on every call (slower; cvxpylayers refuses them).
    """

    name: ClassVar[str] = "cvxpy"
    requires: ClassVar[tuple[str, ...]] = ("cvxpy",)
    extra: ClassVar[str | None] = "cvxpy"
    problem_types: ClassVar[str] = "cvxpy.Problem: LP, QP, SOCP, SDP, exponential cone (DPP or not)"
    returns_duals: ClassVar[bool] = True
    Options = CvxpyOptions

    def accepts(self, problem: Any) -> bool:
        return type(problem).__module__.startswith("cvxpy") and type(problem).__name__ == "Problem"

    def compile(self, problem, parameters, variables, options) -> Compiled:
        self.require()
        opts: CvxpyOptions = parse_options(dict(options or {}), CvxpyOptions)
        parameters, variables = _check_handles(problem, parameters, variables)
        solver = _check_solver(opts.solver)
        args = {**default_solver_args(solver, opts.eps), **opts.solver_args}
        if opts.accept_inaccurate:
            args["accept_inaccurate"] = True
        if problem.is_dpp():
            program = _canonicalise(problem, solver, parameters, variables)
            solve = DPPSolve(program, solver, args)
            condition = ConeCondition(program, precondition=opts.precondition, refine=opts.refine,
                                      dense_max=opts.dense_max)
            outputs = Outputs(program, len(problem.constraints))
        else:
            if not opts.allow_non_dpp:
                raise InputError(
                    "The cvxpy problem is not DPP (disciplined parametrized programming), and "
                    "allow_non_dpp=False. Rewrite it in DPP form (see cvxpy's DPP tutorial), or pass "
                    "allow_non_dpp=True to canonicalise on every call (slower)."
                )
            from ._nondpp import compile_non_dpp

            solve, condition, outputs = compile_non_dpp(problem, solver, parameters, variables, args, opts)
        return Compiled(
            solve=solve,
            condition=condition,
            parameter_shapes=[tuple(p.shape) for p in parameters],
            variable_shapes=[tuple(v.shape) for v in variables],
            outputs=outputs,
            backend=self.name,
        )


def _check_handles(problem, parameters, variables) -> tuple[list, list]:
    import cvxpy as cp

    if not isinstance(problem, cp.Problem):
        raise InputError(f"The cvxpy backend expects a cvxpy.Problem; got {type(problem).__name__}.")
    if not problem.is_dcp():
        raise InputError(
            "The cvxpy problem is not DCP (disciplined convex), so it has no cone program to differentiate. "
            "Check problem.is_dcp() and reformulate it."
        )
    parameters = list(problem.parameters() if parameters is None else parameters)
    variables = list(problem.variables() if variables is None else variables)
    for i, p in enumerate(parameters):
        if not isinstance(p, cp.Parameter):
            raise InputError(f"parameters[{i}] is a {type(p).__name__}; expected a cvxpy.Parameter.")
    declared = {p.id for p in problem.parameters()}
    given = {p.id for p in parameters}
    if given != declared or len(given) != len(parameters):
        names = sorted(p.name() for p in problem.parameters())
        raise InputError(
            f"parameters must list every cvxpy.Parameter of the problem exactly once; the problem has "
            f"{names}, got {[p.name() for p in parameters]}. Pass parameters=[...] with all of them."
        )
    ids = {v.id for v in problem.variables()}
    for i, v in enumerate(variables):
        if not isinstance(v, cp.Variable) or v.id not in ids:
            raise InputError(
                f"variables[{i}] ({v!r}) is not a cvxpy.Variable of the problem; pass variables of the problem."
            )
    return parameters, variables


def _check_solver(name: str) -> str:
    import cvxpy as cp

    solver = str(name).upper()
    if solver not in SOLVERS:
        raise InputError(
            f"cvxpy backend: solver {name!r} is not supported; expected one of {sorted(SOLVERS)} "
            f"(installed cvxpy solvers: {cp.installed_solvers()})."
        )
    if importlib.util.find_spec(_SOLVER_MODULES[solver]) is None:
        raise InputError(
            f"cvxpy backend: solver {solver} is not installed. Install it (pip install "
            f"{_SOLVER_MODULES[solver]}) or pick one of {cp.installed_solvers()}."
        )
    return solver


def _cons_id_map(inverse_data: list) -> dict[int, int]:
    """Compose the constraint id maps of cvxpy's reductions: user constraint id -> cone program id."""
    mapping: dict[int, int] = {}
    for inv in inverse_data:
        step = getattr(inv, "cons_id_map", None)
        if not step:
            continue
        if not mapping:
            mapping = dict(step)
            continue
        mapping = {k: step.get(v, v) for k, v in mapping.items()}
    return mapping


def _canonicalise(problem, solver: str, parameters: list, variables: list) -> ConeProgram:
    import cvxpy as cp

    try:
        data, chain, inverse = problem.get_problem_data(solver)
    except cp.error.SolverError as err:
        raise InputError(
            f"cvxpy cannot pass this problem to {solver}: {err}. Pick a solver that supports its cones "
            "(CLARABEL supports LP, QP, SOCP, SDP)."
        ) from err
    pp = data["param_prob"]
    if pp.cone_dims.p3d or pp.cone_dims.pnd:
        raise InputError(
            "The cvxpy backend does not differentiate power cones yet (the problem has "
            f"{len(pp.cone_dims.p3d) + len(pp.cone_dims.pnd)}). Supported: LP, QP, SOCP, SDP and "
            "exponential cones."
        )
    if pp.cone_dims.exp and solver not in ("CLARABEL", "SCS"):
        raise InputError(
            f"The cvxpy backend differentiates exponential cones with CLARABEL or SCS, not {solver} (whose "
            "exponential cone orders its coordinates differently). Pass solver='CLARABEL'."
        )
    if data.get("lower_bounds") is not None or data.get("upper_bounds") is not None:
        raise InputError(
            "The cvxpy backend does not support variable bounds (Variable(bounds=...)); write them as "
            "constraints instead."
        )
    cols = pp.var_id_to_col
    id_map = _var_id_map(chain)
    sizes = sorted(cols.values()) + [pp.x.size]
    span = {c: sizes[i + 1] - c for i, c in enumerate(sorted(cols.values()))}
    for v in variables:
        vid = id_map.get(v.id, v.id)
        if vid not in cols or span[cols[vid]] < v.size:
            raise InputError(
                f"Variable {v.name()} is stored compressed by cvxpy (a symmetric, PSD or diagonal attribute); "
                "the cvxpy backend returns it only when declared without that attribute. Declare it plainly "
                "and add the matching constraint (X == X.T, X >> 0)."
            )
    return build_program(pp, chain.reductions[-1], parameters, variables, problem, _cons_id_map(inverse), id_map)


def _var_id_map(chain) -> dict[int, int]:
    """User variable id -> cone program variable id where cvxpy replaced a variable one-to-one."""
    compose = getattr(chain, "compose_var_id_map", None)
    if compose is None:
        return {}
    return {k: v[0] for k, v in compose().items() if len(v) == 1}
