"""The plugin module named by the entry point: a backend and the `register_backends` hook."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

import blackbox_diff as bbd
from bbd_brentq.problem import BracketedRoot


class BrentqSolve:
    """The black box for one instance: brentq on F(., *params) over the bracket."""

    def __init__(self, problem: BracketedRoot, xtol: float) -> None:
        self.problem, self.xtol = problem, xtol
        self.__name__ = "brentq"

    def __call__(self, *params: np.ndarray) -> float:
        from scipy.optimize import brentq  # imported lazily: a missing scipy disables only this backend

        tp = [torch.as_tensor(p) for p in params]

        def f(x: float) -> float:
            return float(self.problem.F(torch.tensor(x, dtype=torch.float64), *tp))

        try:
            return brentq(f, self.problem.lo, self.problem.hi, xtol=self.xtol)
        except ValueError as err:  # no sign change on the bracket
            raise bbd.SolverError(f"brentq failed: {err}. Widen the bracket [lo, hi].", backend="brentq") from err


class BrentqBackend(bbd.AbstractBackend):
    """Scalar equations on a bracket, solved by scipy.optimize.brentq."""

    name: ClassVar[str] = "brentq"
    requires: ClassVar[tuple[str, ...]] = ("scipy",)
    # The default hint names a blackbox-diff extra; a third-party backend names its own package.
    install_hint: ClassVar[str] = "pip install bbd-brentq"
    problem_types: ClassVar[str] = "bbd_brentq.BracketedRoot (scalar equation on a bracket)"
    returns_duals: ClassVar[bool] = False

    class Options(bbd.plugin.BackendOptions):  # pydantic; unknown keys are refused
        xtol: float = Field(1e-14, gt=0.0, description="brentq's absolute tolerance on x.")

    def accepts(self, problem: Any) -> bool:
        return isinstance(problem, BracketedRoot)

    def compile(self, problem, parameters, variables, options) -> bbd.Compiled:
        # bbd.layer passes the validated Options; a direct call may pass a dict: validate_options takes both.
        opts = self.validate_options(options)
        return bbd.Compiled(
            solve=BrentqSolve(problem, opts.xtol),
            condition=bbd.Root(problem.F),
            parameter_shapes=bbd.plugin.parse_shapes(parameters),
            outputs=None,
            options={"linear_solver": "dense"},  # a 1x1 adjoint system
            backend=self.name,
        )


@bbd.hookimpl
def register_backends(register):
    """blackbox_diff calls this once per registry build; register each backend instance."""
    register(BrentqBackend())
