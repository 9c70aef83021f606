"""The CasADi backend: accepts a `casadi.Opti` or an nlpsol dict, compiles it into the solver (`_solve`) and
its KKT condition (`_condition`), with the options model nested in the backend class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field

from blackbox_diff import AbstractBackend, Compiled, InputError
from blackbox_diff.plugin import BackendOptions

from ._condition import CasadiKKT
from ._kkt import KKTKernels
from ._nlp import from_dict, from_opti
from ._solve import CasadiSolver

__all__ = ["CasadiBackend"]

_NLP_KEYS = {"x", "f"}


class CasadiBackend(AbstractBackend):
    """`casadi.Opti` problems and nlpsol dicts {'x', 'p', 'f', 'g'} solved by any nlpsol plugin."""

    name: ClassVar[str] = "casadi"
    requires: ClassVar[tuple[str, ...]] = ("casadi",)
    extra: ClassVar[str | None] = "casadi"
    problem_types: ClassVar[str] = "casadi.Opti; nlpsol dict {'x','p','f','g'} (ipopt, sqpmethod, ...)"
    returns_duals: ClassVar[bool] = True

    class Options(BackendOptions):
        """Options of the CasADi backend (everything else goes to `bbd.implicit`)."""

        model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

        solver: str = Field("ipopt", description="nlpsol plugin name: 'ipopt', 'sqpmethod', ...")
        solver_options: dict[str, Any] = Field(
            default_factory=dict, description="Options passed to casadi.nlpsol (merged over quiet defaults)."
        )
        warm_start: bool = Field(
            False, description="Start each solve from the previous answer (primal and multipliers)."
        )
        expand: bool | None = Field(
            None, description="Expand MX graphs to SX (faster); None tries and falls back to MX."
        )
        adjoint: Literal["sparse_lu", "engine"] = Field(
            "sparse_lu",
            description="'sparse_lu': factorise the sparse KKT matrix (one LU per instance, exact); "
            "'engine': hand the raw KKT residual to the engine's linear solvers.",
        )
        polish: bool = Field(
            True, description="Newton-polish the solver's answer onto its active set before differentiating."
        )
        x0: Any = Field(None, description="Initial guess for x (default: opti.set_initial / zeros).")
        lbx: Any = Field(None, description="nlp dict only: lower bounds on x.")
        ubx: Any = Field(None, description="nlp dict only: upper bounds on x.")
        lbg: Any = Field(None, description="nlp dict only: lower bounds on g.")
        ubg: Any = Field(None, description="nlp dict only: upper bounds on g.")

    def accepts(self, problem: Any) -> bool:
        mod = type(problem).__module__ or ""
        if mod.startswith("casadi") and type(problem).__name__ == "Opti":
            return True
        if isinstance(problem, dict) and _NLP_KEYS <= set(problem):
            return all((type(v).__module__ or "").startswith("casadi") for k, v in problem.items()
                       if k in ("x", "p", "f", "g"))
        return False

    def compile(
        self,
        problem: Any,
        parameters: Sequence[Any] | None,
        variables: Sequence[Any] | None,
        options: dict[str, Any],
    ) -> Compiled:
        self.require()
        import casadi as ca

        opts = self.validate_options(options)
        if not ca.has_nlpsol(opts.solver):
            raise InputError(
                f"CasADi has no nlpsol plugin {opts.solver!r} installed. Expected one of the plugins "
                "casadi.has_nlpsol(...) accepts, e.g. 'ipopt' or 'sqpmethod'."
            )
        if isinstance(problem, ca.Opti):
            if any(getattr(opts, k) is not None for k in ("lbx", "ubx", "lbg", "ubg")):
                raise InputError(
                    "Options lbx/ubx/lbg/ubg apply to an nlp dict only; an Opti problem states its bounds "
                    "with opti.subject_to(...)."
                )
            nlp = from_opti(problem, parameters, variables)
        elif self.accepts(problem):
            nlp = from_dict(problem, parameters, variables,
                            {k: getattr(opts, k) for k in ("lbx", "ubx", "lbg", "ubg")})
        else:
            raise InputError(
                f"The casadi backend accepts a casadi.Opti or an nlpsol dict with keys 'x', 'f' (and 'p', 'g'); "
                f"got {type(problem).__name__}."
            )
        kernels = KKTKernels(nlp, expand=opts.expand)
        solver = CasadiSolver(nlp, kernels, opts.solver, opts.solver_options, opts.warm_start,
                              expand=opts.expand is not False, x0=opts.x0)
        condition = CasadiKKT(kernels, adjoint=opts.adjoint, polish=opts.polish)
        return Compiled(
            solve=solver,
            condition=condition,
            parameter_shapes=[h.shape for h in nlp.parameters],
            variable_shapes=[h.shape for h in nlp.variables],
            outputs=_Outputs(nlp),
            options={},
            backend=self.name,
            unknowns_shape=(kernels.n + kernels.m,),
        )


class _Outputs:
    """Maps the unknowns z = (x, lam) (..., n + m) to the declared variables, CasADi's column-major
    layout turned into torch shapes."""

    def __init__(self, nlp: Any) -> None:
        self.handles = nlp.variables

    def __call__(self, Z: Any) -> tuple:
        out = []
        for h in self.handles:
            idx = torch.as_tensor(np.asarray(h.index), device=Z.device)
            v = Z.index_select(-1, idx)
            lead = v.shape[:-1]
            if len(h.shape) == 2:
                r, c = h.shape
                v = v.reshape(*lead, c, r).transpose(-1, -2)
            else:
                v = v.reshape(*lead, *h.shape)
            out.append(v)
        return tuple(out)

