"""`SubprocessBackend`: a `bbd.Executable` plus the optimality condition its answer satisfies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from blackbox_diff import AbstractBackend, AbstractCondition, Compiled, Executable, InputError
from blackbox_diff._options import parse_options

__all__ = ["SubprocessBackend", "SubprocessOptions"]


class SubprocessOptions(BaseModel):
    """Options of the subprocess backend."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    condition: Any = Field(
        ...,
        description="The optimality condition the program's answer satisfies (bbd.Root, bbd.FixedPoint, "
        "bbd.Argmin, bbd.KKT or any AbstractCondition), written in torch.",
    )
    parallel: bool = Field(
        True,
        description="Run the instances of a batch concurrently (threads, each waiting on its own process), "
        "unless executor= is given.",
    )


def _shapes(parameters: Any) -> list[tuple[int, ...]] | None:
    if parameters is None:
        return None
    if not isinstance(parameters, Sequence) or isinstance(parameters, str):
        raise InputError(f"parameters must be a list of shapes (tuples of ints); got {type(parameters).__name__}.")
    out = []
    for i, spec in enumerate(parameters):
        if isinstance(spec, int) and not isinstance(spec, bool):
            out.append((spec,))
        elif isinstance(spec, (tuple, list)) and all(isinstance(n, int) and not isinstance(n, bool) for n in spec):
            out.append(tuple(spec))
        elif torch.is_tensor(spec) or isinstance(spec, np.ndarray):
            out.append(tuple(spec.shape))
        else:
            raise InputError(
                f"parameters[{i}] = {spec!r} is not a shape; expected a tuple of ints such as (3,) or (), an int "
                "n for shape (n,), or an example array."
            )
    return out


class SubprocessBackend(AbstractBackend):
    """A compiled program (`bbd.Executable`) run once per instance, differentiated through `condition`."""

    name: ClassVar[str] = "subprocess"
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = "subprocess"
    problem_types: ClassVar[str] = "bbd.Executable (any program: json/npy/text I/O) + a torch condition"
    returns_duals: ClassVar[bool] = True
    Options = SubprocessOptions

    def accepts(self, problem: Any) -> bool:
        return isinstance(problem, Executable)

    def compile(self, problem, parameters, variables, options) -> Compiled:
        opts: SubprocessOptions = parse_options(dict(options or {}), SubprocessOptions)
        if not isinstance(problem, Executable):
            raise InputError(f"The subprocess backend runs a bbd.Executable; got {type(problem).__name__}.")
        if not isinstance(opts.condition, AbstractCondition):
            raise InputError(
                f"The subprocess backend needs condition= an optimality condition (bbd.Root(F), ...); got "
                f"{type(opts.condition).__name__}."
            )
        variable_shapes = _shapes(variables) or ([problem.output_shape] if problem.output_shape else [])
        return Compiled(
            solve=problem,
            condition=opts.condition,
            parameter_shapes=_shapes(parameters),
            variable_shapes=variable_shapes,
            outputs=None,
            options={"executor": "threads"} if opts.parallel else {},
            backend=self.name,
        )
