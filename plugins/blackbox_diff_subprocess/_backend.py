"""`SubprocessBackend`: a `bbd.Executable` plus the optimality condition its answer satisfies."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ConfigDict, Field

from blackbox_diff import AbstractBackend, AbstractCondition, Compiled, Executable, InputError
from blackbox_diff.plugin import BackendOptions, parse_shapes

__all__ = ["SubprocessBackend", "SubprocessOptions"]


class SubprocessOptions(BackendOptions):
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


def _expecting(exe: Executable, variable_shapes: list[tuple[int, ...]]) -> Executable:
    """The executable, told the solution shape that `variables` declares, so that a program writing the
    wrong number of values fails in its own run (a SolverError naming it, isolated by on_failure="nan")
    instead of in the condition."""
    if len(variable_shapes) != 1:
        if len(variable_shapes) > 1:
            raise InputError(
                f"The subprocess backend takes one variable (the program's solution); got {len(variable_shapes)} "
                f"shapes {variable_shapes}. Declare the solution as one array and split it in the condition."
            )
        return exe
    (shape,) = variable_shapes
    if exe.output_shape is not None and exe.output_shape != shape:
        raise InputError(
            f"variables declares the solution shape {shape}, but the Executable has output_shape="
            f"{exe.output_shape}; give one of them, or make them agree."
        )
    return exe if exe.output_shape == shape else exe.with_output_shape(shape)


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
        opts: SubprocessOptions = self.validate_options(options)
        if not isinstance(problem, Executable):
            raise InputError(f"The subprocess backend runs a bbd.Executable; got {type(problem).__name__}.")
        if not isinstance(opts.condition, AbstractCondition):
            raise InputError(
                f"The subprocess backend needs condition= an optimality condition (bbd.Root(F), ...); got "
                f"{type(opts.condition).__name__}."
            )
        declared = parse_shapes(variables, "variables")
        variable_shapes = declared or ([problem.output_shape] if problem.output_shape is not None else [])
        return Compiled(
            solve=_expecting(problem, variable_shapes),
            condition=opts.condition,
            parameter_shapes=parse_shapes(parameters),
            variable_shapes=variable_shapes,
            outputs=None,
            options={"executor": "threads"} if opts.parallel else {},
            backend=self.name,
            unknowns_shape=tuple(variable_shapes[0]) if len(variable_shapes) == 1 else None,
        )
