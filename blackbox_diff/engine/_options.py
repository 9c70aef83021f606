"""Options of `bbd.implicit` and of every layer: one pydantic model, unknown keys rejected."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from blackbox_diff._errors import InputError

__all__ = ["ImplicitOptions", "parse_options"]

LinearSolverName = Literal["auto", "cg", "minres", "gmres", "bicgstab", "neumann", "dense", "lstsq"]


class ImplicitOptions(BaseModel):
    """How the black box is called, certified and differentiated."""

    # allow_inf_nan=False: ridge=inf, rtol=nan and the like are refused where they are given.
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False)

    linear_solver: LinearSolverName = Field(
        "auto",
        description="Adjoint linear solver. 'auto' picks by the condition's structure and size: dense "
        "below `dense_max_size`, CG for Argmin, Neumann for FixedPoint, MINRES for KKT, GMRES for Root.",
    )
    rtol: float = Field(1e-10, ge=0.0, description="Relative tolerance of iterative adjoint solves.")
    max_steps: int | None = Field(
        None, ge=1, description="Iteration cap of iterative adjoint solves (None: 10 x system size)."
    )
    ridge: float = Field(
        0.0, ge=0.0, description="Tikhonov term: solve (J + ridge*I)^T u = g instead of J^T u = g."
    )
    residual_tol: float | None = Field(
        1e-5,
        gt=0.0,
        description="Certification: every component of F(z, params) at the black box's answer must be at most "
        "residual_tol relative to the size of the terms it is made of (|dF_i/dz_j z_j|, |dF_i/dp_k p_k|), "
        "plus sqrt(residual_tol) x the largest term of its part of the certificate (a condition's "
        "certificate_blocks: stationarity, constraint rows, ...; the instance's largest term where there are "
        "no parts or a part's terms vanish); never below 100 eps of the dtype. None disables certification.",
    )
    certify: Literal["raise", "warn"] = Field(
        "raise", description="What an uncertified answer does: fail that instance, or only warn."
    )
    on_failure: Literal["raise", "nan"] = Field(
        "raise",
        description="'raise': a failing instance raises. 'nan': its output is NaN and its gradient zero; "
        "the rest of the batch proceeds.",
    )
    fallback: bool = Field(
        True,
        description="Escalate an unconverged or singular adjoint solve (Krylov -> GMRES -> dense -> least "
        "squares, with a warning; dense only up to 4 x dense_max_size unknowns). False raises "
        "LinearSolveError instead.",
    )
    dense_max_size: int = Field(
        1000, ge=0, description="'auto' uses a dense solve when the system size is at most this."
    )
    in_dims: Any = Field(
        None,
        description="torch.func.vmap convention: an int or None per parameter (or one int for all) "
        "naming its batch dimension; None means unbatched.",
    )
    executor: Any = Field(
        None,
        description="None (serial), 'threads', 'processes', or any concurrent.futures.Executor "
        "(e.g. a Dask Client.get_executor()) used to run the per-instance black-box calls.",
    )
    max_workers: int | None = Field(
        None, ge=1, description="Worker count when executor is 'threads' or 'processes'."
    )
    arrays: Literal["numpy", "torch"] = Field(
        "numpy",
        description="What the black box receives: float64 numpy arrays on CPU (default), or detached "
        "torch tensors on the parameters' device and dtype (for solvers written in torch).",
    )
    return_duals: bool = Field(False, description="KKT only: return the full KKTSolution of tensors.")
    capture_failures: str | None = Field(
        None,
        description="Path of a file to which each failing black-box call (its parameters, error and the "
        "solver's import path) is appended, for `blackbox-diff replay PATH`.",
    )
    degenerate: Literal["warn", "raise", "ignore"] = Field(
        "warn",
        description="At a degenerate point (dependent active constraints, a kink, a weakly active constraint) "
        "the derivative of each output is computed under every admissible active set: where they agree it is "
        "returned exactly; where they differ it does not exist, and 'warn' warns (naming the constraints and "
        "outputs) and returns a one-sided derivative, 'raise' fails the instance (DegenerateError; on_failure "
        "applies), 'ignore' returns the one-sided derivative silently.",
    )
    active_tol: float = Field(
        1e-7,
        gt=0.0,
        description="KKT: an inequality with slack and multiplier both below this is weakly active.",
    )

    @pydantic.field_validator("executor")
    @classmethod
    def _check_executor(cls, value: Any) -> Any:
        if value is None or value in ("threads", "processes"):
            return value
        if isinstance(value, concurrent.futures.Executor) or callable(getattr(value, "submit", None)):
            return value
        raise ValueError(
            f"executor must be None, 'threads', 'processes' or a concurrent.futures.Executor; got {value!r}"
        )

    @pydantic.field_validator("in_dims")
    @classmethod
    def _check_in_dims(cls, value: Any) -> Any:
        if value is None or isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (tuple, list)) and all(
            v is None or isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise ValueError(f"in_dims must be None, an int, or a tuple of int/None per parameter; got {value!r}")


def parse_options(options: dict[str, Any], model: type[BaseModel] = ImplicitOptions) -> Any:
    """Validate keyword options into `model`, turning pydantic's error into an `InputError`.

    Raises:
        InputError: an option is unknown or has a wrong type/value; the message lists the valid names.
    """
    try:
        return model(**options)
    except pydantic.ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<options>"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown option {loc!r}")
            else:
                problems.append(f"option {loc!r}: {e['msg']} (got {e.get('input')!r})")
        valid = ", ".join(sorted(model.model_fields))
        raise InputError(
            f"Invalid options for {model.__name__}: {'; '.join(problems)}. Valid options are: {valid}."
        ) from err
