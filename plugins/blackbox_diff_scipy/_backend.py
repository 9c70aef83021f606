"""`ScipyBackend`: bbd conditions stated with torch callables, solved by scipy.optimize."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import ConfigDict, Field

from blackbox_diff import KKT, AbstractBackend, Argmin, Compiled, FixedPoint, InputError, Root
from blackbox_diff.plugin import BackendOptions, parse_shapes

from ._condition import BoxArgmin
from ._solve import DEFAULT_METHODS, METHODS, ScipySolve

__all__ = ["ScipyBackend", "ScipyOptions"]


class ScipyOptions(BackendOptions):
    """Options of the scipy backend (``bbd.layer(cond, backend="scipy", x0=..., method=...)``)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    x0: Any = Field(
        None,
        description="Starting point: an array shared by every instance, or a callable x0(*params) -> array "
        "called with each instance's numpy parameters (per-instance starts). None: zeros shaped like "
        "variables[0].",
    )
    method: str | None = Field(
        None,
        description="scipy method. Argmin: BFGS (default; L-BFGS-B with bounds), L-BFGS-B, Newton-CG, CG, "
        "TNC, SLSQP, trust-ncg, trust-krylov, trust-exact, trust-constr, Nelder-Mead, Powell. KKT: SLSQP "
        "(default) or trust-constr. Root: hybr (default), lm, krylov, broyden1, broyden2, anderson, "
        "df-sane, ... FixedPoint: del2 (default) or iteration.",
    )
    bounds: Any = Field(
        None,
        description="Argmin only: box bounds, a pair (lb, ub) of arrays/floats (None or inf for no bound). "
        "The bounds' active set is identified from slacks and multipliers as for KKT constraints, weakly "
        "active bounds warned about (BoxArgmin).",
    )
    tol: float = Field(1e-12, gt=0.0, description="scipy's tol (the method's main stopping tolerance).")
    maxiter: int | None = Field(None, ge=1, description="Iteration cap (None: the method's default).")
    solver_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra method-specific settings passed as scipy's options=...; win."
    )
    accept_gtol: float = Field(
        1e-8,
        gt=0.0,
        description="scipy often reports 'precision loss' at a minimiser when asked for tight tolerances; "
        "such a result is accepted when max|projected gradient| <= accept_gtol*(1+|f|) (certification "
        "still applies).",
    )
    warm_start: bool = Field(
        False,
        description="Start each solve from the previous solution this layer computed (the previous instance "
        "of the batch, or the last instance of the previous call) when its shape matches.",
    )
    polish: bool = Field(
        True,
        description="trust-constr only: refine its interior-point answer with Newton steps on the KKT "
        "system of the identified active set (trust-constr stops while its barrier parameter is ~1e-5).",
    )


class ScipyBackend(AbstractBackend):
    """bbd.Argmin / bbd.KKT / bbd.Root / bbd.FixedPoint solved by scipy.optimize, fed torch derivatives.

    scipy receives exact gradients, Jacobians and Hessian-vector products computed by torch autograd from
    the condition's own functions, so the solver and the implicit gradient see the same model.
    """

    name: ClassVar[str] = "scipy"
    requires: ClassVar[tuple[str, ...]] = ("scipy",)
    extra: ClassVar[str | None] = "scipy"
    problem_types: ClassVar[str] = (
        "bbd.Argmin (minimize, box bounds), bbd.KKT (SLSQP, trust-constr), bbd.Root, bbd.FixedPoint"
    )
    returns_duals: ClassVar[bool] = True
    Options = ScipyOptions

    def accepts(self, problem: Any) -> bool:
        return isinstance(problem, (Argmin, KKT, Root, FixedPoint)) and not isinstance(problem, BoxArgmin)

    def compile(self, problem, parameters, variables, options) -> Compiled:
        self.require()
        if not self.accepts(problem):
            raise InputError(
                f"The scipy backend solves bbd.Argmin, bbd.KKT, bbd.Root or bbd.FixedPoint; got "
                f"{type(problem).__name__}."
            )
        opts: ScipyOptions = self.validate_options(options)
        kind = type(problem).__name__ if type(problem) in (Argmin, KKT, Root, FixedPoint) else _kind(problem)
        method = opts.method or DEFAULT_METHODS[kind]
        if opts.bounds is not None and kind == "Argmin" and opts.method is None:
            method = "L-BFGS-B"
        if method not in METHODS[kind]:
            raise InputError(
                f"scipy backend: method {method!r} is not supported for {kind}; expected one of {METHODS[kind]}."
            )
        if opts.bounds is not None and kind != "Argmin":
            raise InputError(
                f"scipy backend: bounds= applies to bbd.Argmin only; for {kind} state the bounds in the "
                "problem (e.g. as inequality constraints of bbd.KKT)."
            )
        variable_shapes = parse_shapes(variables, "variables") or []
        if len(variable_shapes) > 1:
            raise InputError(
                f"The scipy backend solves for one unknown; variables declares {len(variable_shapes)} shapes. "
                "Stack them into one vector."
            )
        x_shape = variable_shapes[0] if variable_shapes else None
        if opts.x0 is None and x_shape is None:
            raise InputError(
                "The scipy backend needs a starting point: pass x0=array (or a callable x0(*params) for "
                "per-instance starts), or variables=[shape] to start from zeros."
            )
        if x_shape is not None and opts.x0 is not None and not callable(opts.x0) and np.shape(opts.x0) != x_shape:
            raise InputError(
                f"scipy backend: x0 has shape {np.shape(opts.x0)} but variables declares {x_shape}; make them agree."
            )
        condition = problem
        lb = ub = None
        if opts.bounds is not None:
            if x_shape is None and opts.x0 is None:
                raise InputError("scipy backend: bounds= needs the unknown's shape: pass x0= or variables=[shape].")
            shape = x_shape if x_shape is not None else np.shape(opts.x0) if not callable(opts.x0) else None
            if shape is None:
                raise InputError("scipy backend: with bounds= and a callable x0, pass variables=[shape].")
            lb, ub = _bounds(opts.bounds, shape)
            condition = BoxArgmin(problem.f, lb, ub)
        solve = ScipySolve(kind, problem, method, opts, x_shape, lb, ub)
        return Compiled(
            solve=solve,
            condition=condition,
            parameter_shapes=parse_shapes(parameters),
            variable_shapes=variable_shapes,
            outputs=None,
            options={},
            backend=self.name,
            # z is x itself except for KKT, whose multipliers' count the first answer tells
            unknowns_shape=tuple(x_shape) if x_shape is not None and kind != "KKT" else None,
        )


def _kind(problem: Any) -> str:
    for cls in (KKT, Argmin, Root, FixedPoint):
        if isinstance(problem, cls):
            return cls.__name__
    raise InputError(f"Unsupported problem {type(problem).__name__}.")


def _bounds(bounds: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    try:
        lo, hi = bounds
        lb = np.broadcast_to(np.asarray(-np.inf if lo is None else lo, dtype=np.float64), shape).copy()
        ub = np.broadcast_to(np.asarray(np.inf if hi is None else hi, dtype=np.float64), shape).copy()
    except (TypeError, ValueError) as err:
        raise InputError(
            f"scipy backend: bounds must be a pair (lb, ub) of floats or arrays broadcastable to the unknown's "
            f"shape {shape}; got {bounds!r} ({err})."
        ) from err
    if np.any(lb > ub):
        raise InputError(f"scipy backend: bounds have lb > ub at indices {np.nonzero(lb > ub)[0].tolist()}.")
    return lb, ub
