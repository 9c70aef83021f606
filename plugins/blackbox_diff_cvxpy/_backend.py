"""`CvxpyBackend`: cvxpy problems as differentiable layers (the cvxpylayers calling convention).

What a cvxpylayers user relies on maps one to one: ``variables=[x, con.dual_variables[0]]`` (duals as
outputs), ``gp=True`` (geometric programs), symmetric/PSD/diagonal variables and parameters, ``solver=``
with cvxpy's solver constants, and ``layer(*params, solver_args={...})`` per call (through the generic
`Compiled.on_call` hook, merged over the construction-time ``solver_args``).
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

import numpy as np
from pydantic import ConfigDict, Field

from blackbox_diff import AbstractBackend, Compiled, InputError
from blackbox_diff.plugin import BackendOptions

from ._canon import ConeProgram, build_program
from ._condition import ConeCondition
from ._nondpp import compile_non_dpp
from ._problem import Handles, build_outputs, canonicalise, check_handles, check_values
from ._qp_route import CountsSolvers, RoutedSolve, routable
from ._solvers import SOLVERS, check_cones, default_solver_args, solve_conic
from ._theta import theta_numpy

__all__ = ["CvxpyBackend", "DPPSolve"]

_SOLVER_MODULES = {"CLARABEL": "clarabel", "SCS": "scs", "ECOS": "ecos", "OSQP": "osqp"}
# cvxpylayers' solver names without a solver of their own here: its default DIFFCP (which runs SCS, ECOS or
# Clarabel, as solver_args["solve_method"] says) and CUCLARABEL (Clarabel on the GPU; here Clarabel runs on
# the CPU while the residual and the adjoint solve run on the parameters' device).
_ALIASES = {"DIFFCP": "CLARABEL", "CUCLARABEL": "CLARABEL"}
_MAX_SETTINGS = 16  # Compiled kept per distinct solver settings (the canonicalisation is kept per solver)


class CvxpyOptions(BackendOptions):
    """Options of the cvxpy backend (``bbd.layer(problem, ..., solver="SCS", solver_args={...})``)."""

    model_config = ConfigDict(extra="forbid")

    solver: str = Field(
        "CLARABEL",
        description="Conic solver: CLARABEL (default), SCS, ECOS or OSQP; cvxpy's constants (cp.SCS, ...) "
        "work. cvxpylayers' DIFFCP and CUCLARABEL run CLARABEL (DIFFCP: unless solver_args['solve_method'] "
        "names another). Not given (and no solver_args, eps or verbose): an LP or QP (zero and non-negative "
        "cones only, at most 2000 variables plus rows) is solved by DAQP, a dense active-set QP solver "
        "(qpsolvers), with CLARABEL where DAQP fails or is not installed; other problems by CLARABEL. The "
        "black box's solver_counts (layer.compiled.solve.solver_counts) says which solver answered.",
    )
    solver_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword settings passed to the solver (e.g. {'max_iter': 500}); they override eps. "
        "Also per call: layer(*params, solver_args={...}), merged over these. 'eps' sets every tolerance "
        "(as the eps option); 'solve_method' (cvxpylayers/diffcp) picks the solver.",
    )
    eps: float | None = Field(
        None,
        gt=0.0,
        description="Absolute and relative tolerance of the solver. None: Clarabel's and ECOS's defaults "
        "(1e-8), 1e-10 for SCS and OSQP (whose defaults are too loose for accurate gradients).",
    )
    verbose: bool = Field(False, description="Let the solver print its progress (cvxpylayers' verbose=).")
    canon_backend: str | None = Field(
        None,
        description="cvxpy's canonicalisation backend (cvxpylayers' canon_backend=, e.g. 'SCIPY', 'CPP'); None: "
        "cvxpy's default.",
    )
    gp: bool = Field(
        False,
        description="The problem is a log-log convex program (DGP, cvxpy's gp=True): parameters and "
        "variables are positive, it is solved in log space and values come back in the original space.",
    )
    return_duals: bool = Field(
        False,
        description="(Shared with the engine option of the same name.) Append the dual value of every "
        "constraint of problem.constraints to the outputs, as cvxpy's constraint.dual_value.",
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


class DPPSolve(CountsSolvers):
    """The black box for one instance of a DPP problem: apply the affine parameter map, run the solver
    (`solver_counts`: instances answered, see `CountsSolvers`)."""

    def __init__(self, program: ConeProgram, solver: str, args: dict[str, Any]) -> None:
        super().__init__()
        self.program, self.solver, self.args = program, solver, args
        self.__name__ = f"cvxpy[{solver}]"

    def __call__(self, *params: np.ndarray):
        P, c, A, b = self.program.data(theta_numpy(self.program.pieces, self.program.n_theta, list(params)))
        self._count(self.solver)
        answer = solve_conic(self.solver, P, c, A, b, self.program.cones, self.args)
        answer.data = self.program.dense(P, c, A, b)
        return answer


class CvxpyBackend(AbstractBackend):
    """cvxpy problems (LP, QP, SOCP, SDP, exponential and power cones, geometric programs) solved by
    Clarabel, SCS, ECOS or OSQP.

    DPP problems are canonicalised once: the affine map parameters -> cone program data is kept as
    sparse tensors, applied with scipy in the forward solve and with torch in the optimality condition.
    Non-DPP problems are canonicalised on every call (slower; cvxpylayers refuses them).
    """

    name: ClassVar[str] = "cvxpy"
    requires: ClassVar[tuple[str, ...]] = ("cvxpy",)
    extra: ClassVar[str | None] = "cvxpy"
    problem_types: ClassVar[str] = "cvxpy.Problem: LP, QP, SOCP, SDP, exp/power cones, GP (DPP or not)"
    returns_duals: ClassVar[bool] = True
    Options = CvxpyOptions

    def accepts(self, problem: Any) -> bool:
        return type(problem).__module__.startswith("cvxpy") and type(problem).__name__ == "Problem"

    def compile(self, problem, parameters, variables, options) -> Compiled:
        self.require()
        opts: CvxpyOptions = self.validate_options(options)
        handles = check_handles(problem, parameters, variables, opts.gp)
        compiler = _Compiler(problem, handles, opts)
        return compiler.compiled({})


class _Compiler:
    """Builds (and caches) the layer's `Compiled` per solver and per solver settings.

    The canonicalisation depends on the solver only (its PSD triangle, its cones), so it is done once per
    solver; per-call ``solver_args`` only change the black box's settings.
    """

    def __init__(self, problem: Any, handles: Handles, opts: CvxpyOptions) -> None:
        self.problem, self.handles, self.opts = problem, handles, opts
        self.names = [f"parameter {i} ({p.name()!r})" for i, p in enumerate(handles.parameters)]
        self.solver = _check_solver(opts.solver)
        # No solver named: LP/QP-class programs take the default route (DAQP, Clarabel as fallback).
        self.auto = "solver" not in opts
        self._programs: dict[str, ConeProgram] = {}  # per solver, DPP problems only
        self.logged: set[int] = set()  # parameters a geometric program takes the logarithm of
        self._parts: dict[str, tuple] = {}
        self._compiled: dict[str, Compiled] = {}

    def _build(self, solver: str) -> tuple:
        """(solve factory: args -> black box, condition, outputs) for `solver`."""
        if solver in self._parts:
            return self._parts[solver]
        opts, problem, handles = self.opts, self.problem, self.handles
        with_duals = handles.wants_duals or opts.return_duals
        if (opts.gp and problem.is_dpp("dgp")) or (not opts.gp and problem.is_dpp()):
            canonical = canonicalise(problem, solver, opts.gp, canon_backend=opts.canon_backend)
            check_cones(canonical.param_prob, solver)
            pieces = canonical.pieces(handles.parameters)
            self.logged = {piece.index for piece in pieces if piece.log}
            program = build_program(canonical.param_prob, canonical.solver_instance, pieces)
            self._programs[solver] = program
            outputs = build_outputs(canonical, problem, handles, opts.gp, opts.return_duals)
            condition = ConeCondition(program, precondition=opts.precondition, refine=opts.refine,
                                      dense_max=opts.dense_max, with_duals=with_duals)
            parts = (lambda args: DPPSolve(program, solver, args), condition, outputs)
        else:
            if not opts.allow_non_dpp:
                raise InputError(
                    "The cvxpy problem is not DPP (disciplined parametrized programming), and "
                    "allow_non_dpp=False. Rewrite it in DPP form (see cvxpy's DPP tutorial), or pass "
                    "allow_non_dpp=True to canonicalise on every call (slower)."
                )
            parts = compile_non_dpp(problem, solver, handles, opts)
        self._parts[solver] = parts
        return parts

    def compiled(self, solver_args: dict[str, Any]) -> Compiled:
        """The `Compiled` for the construction-time options with `solver_args` merged over theirs.

        With no solver named (no solver=, solver_args, eps or verbose), an LP/QP-class DPP problem is solved
        by the default route (`_qp_route`): DAQP, with Clarabel (on these settings) where DAQP fails."""
        merged = {**self.opts.solver_args, **solver_args}
        route = self.auto and not merged and self.opts.eps is None and not self.opts.verbose
        solver, args = _solver_settings(self.solver, self.opts, merged)
        key = f"{solver}:{sorted(args.items(), key=lambda kv: kv[0])!r}:{route}"
        if key not in self._compiled:
            if len(self._compiled) >= _MAX_SETTINGS:  # settings varied call after call: keep the newest
                self._compiled.pop(next(iter(self._compiled)))
            factory, condition, outputs = self._build(solver)
            program = self._programs.get(solver)
            routed = route and program is not None and routable(program)
            self._compiled[key] = Compiled(
                solve=RoutedSolve(program, args) if routed else factory(args),
                condition=condition,
                parameter_shapes=[tuple(p.shape) for p in self.handles.parameters],
                variable_shapes=self.handles.shapes(self.problem),
                outputs=outputs,
                backend=CvxpyBackend.name,
                on_call=self.on_call,
                unknowns_shape=getattr(condition, "unknowns_shape", None),
            )
        return self._compiled[key]

    def on_call(self, params: tuple, call_options: dict[str, Any]) -> Compiled | None:
        """Per call: check the parameter values, and apply ``solver_args={...}`` (cvxpylayers' forward)."""
        check_values(self.handles.parameters, self.names, list(params), self.logged)
        unknown = sorted(set(call_options) - {"solver_args"})
        if unknown:
            raise InputError(
                f"The cvxpy layer takes the keyword argument solver_args at call time, not {unknown}. Pass "
                "layer(*params, solver_args={...}), or set other options in bbd.layer(...)."
            )
        if "solver_args" not in call_options:
            return None
        extra = call_options["solver_args"]
        if extra is None:
            return None
        if not isinstance(extra, dict):
            raise InputError(
                f"solver_args must be a dict of solver settings; got {type(extra).__name__}. Pass e.g. "
                "solver_args={'eps': 1e-10}."
            )
        return self.compiled(extra)


def _check_solver(name: Any) -> str:
    import cvxpy as cp

    solver = str(name).upper()
    if solver in _ALIASES:
        return _ALIASES[solver]
    if solver not in SOLVERS:
        raise InputError(
            f"cvxpy backend: solver {name!r} is not supported; expected one of {sorted(SOLVERS)}, or cvxpylayers' "
            f"{sorted(_ALIASES)} (run as CLARABEL) (installed cvxpy solvers: {cp.installed_solvers()})."
        )
    if importlib.util.find_spec(_SOLVER_MODULES[solver]) is None:
        raise InputError(
            f"cvxpy backend: solver {solver} is not installed. Install it (pip install "
            f"{_SOLVER_MODULES[solver]}) or pick one of {cp.installed_solvers()}."
        )
    return solver


def _solver_settings(solver: str, opts: CvxpyOptions, solver_args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(solver, settings): 'solve_method' picks the solver and 'eps' every tolerance, as in cvxpylayers."""
    args = dict(solver_args)
    method = args.pop("solve_method", None)
    if method is not None:
        solver = _check_solver(method)
    eps = opts.eps
    if "eps" in args:
        eps = args.pop("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise InputError(f"solver_args['eps'] must be a positive number (a tolerance); got {eps!r}.")
    if solver == "CLARABEL":
        import clarabel

        settings = clarabel.DefaultSettings()
        bad = sorted(k for k in args if k != "accept_inaccurate" and not hasattr(settings, k))
        if bad:
            valid = sorted(k for k in dir(settings) if not k.startswith("_") and k != "default")
            raise InputError(
                f"solver_args {bad} are not settings of CLARABEL, the solver this layer runs (SCS's settings need "
                f"solver='SCS' or solver_args={{'solve_method': 'SCS'}}); CLARABEL's settings are {valid}."
            )
    out = {**default_solver_args(solver, eps), **({"verbose": True} if opts.verbose else {}), **args}
    if opts.accept_inaccurate:
        out["accept_inaccurate"] = True
    return solver, out


