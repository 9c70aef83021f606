"""The extension point for solver families: `AbstractBackend` and what it compiles to, `Compiled`."""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from blackbox_diff._conditions import AbstractCondition
from blackbox_diff._errors import BackendUnavailableError

__all__ = ["AbstractBackend", "Compiled"]


@dataclasses.dataclass
class Compiled:
    """Everything the engine needs to run and differentiate one problem.

    Attributes:
        solve: the black box for ONE instance: ``solve(*params) -> solution``. It receives float64 numpy
            arrays (or torch tensors when ``options["arrays"] == "torch"``) shaped as `parameter_shapes`.
        condition: the optimality condition that holds at the solution (Root/Argmin/FixedPoint/KKT or
            any `AbstractCondition`, e.g. a residual built from the solver's own model).
        parameter_shapes: the declared (unbatched) shape of each parameter, in call order.
        variable_shapes: the shape of each output variable.
        outputs: maps the engine's batched result (what ``condition.finish`` returns) to the tuple of
            variable tensors the layer returns. None: the result is returned as a 1-tuple.
        options: defaults for `bbd.implicit` options (e.g. the linear solver); the user's options win.
        backend: the backend's name, used in error messages.
        unknowns_shape: the shape of one instance's unknowns (what the condition's `prepare` returns), when the
            backend knows it: with on_failure='nan', a call where every instance fails is shaped by it.
        on_call: optional per-call hook, ``on_call(params, call_options) -> Compiled | None``. The layer
            calls it on every call with the parameter tensors (before any solve) and the call's keyword
            arguments (``layer(*params, **call_options)``, e.g. cvxpylayers' ``solver_args={...}``). It
            raises `InputError` for values or keywords the backend cannot take, and returns the `Compiled`
            to run for this call (e.g. the same problem with other solver settings; its condition should
            be the same object whenever it can, and its engine options are ignored) or None to run this
            one. None (the default): the layer takes no keyword arguments at call time.
    """

    solve: Callable[..., Any]
    condition: AbstractCondition
    parameter_shapes: Sequence[tuple[int, ...]]
    variable_shapes: Sequence[tuple[int, ...]] = ()
    outputs: Callable[[Any], tuple] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    backend: str = ""
    on_call: Callable[[tuple[Any, ...], dict[str, Any]], Compiled | None] | None = None
    unknowns_shape: tuple[int, ...] | None = None


class AbstractBackend(abc.ABC):
    """A solver family: which problems it accepts and how to compile them into a `Compiled`.

    Class attributes:
        name: the registry key (``bbd.layer(..., backend=name)``).
        requires: importable module names the backend needs; a missing one makes it unavailable.
        extra: the pip extra that installs them (``pip install "blackbox-diff[extra]"``).
        install_hint: the full install command, for third-party backends whose libraries are not one of
            blackbox-diff's extras (e.g. ``"pip install my-solver"``); it overrides `extra`.
        problem_types: a short human description of what it accepts, for ``blackbox-diff plugins``.
        returns_duals: whether its solutions carry multipliers.
        Options: a pydantic model (extra="forbid") of the backend's own options.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    install_hint: ClassVar[str | None] = None
    problem_types: ClassVar[str] = ""
    returns_duals: ClassVar[bool] = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def available(self) -> bool:
        """True when every module in `requires` can be imported (checked without importing it)."""
        return all(importlib.util.find_spec(mod) is not None for mod in self.requires)

    def require(self) -> None:
        """Raise `BackendUnavailableError` with the install hint when the backend's library is missing."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            hint = self.install_hint or f'pip install "blackbox-diff[{self.extra or self.name}]"'
            raise BackendUnavailableError(
                f"Backend {self.name!r} needs {', '.join(missing)}, which is not installed. "
                f"Install it with: {hint}"
            )

    @abc.abstractmethod
    def accepts(self, problem: Any) -> bool:
        """Whether this backend understands `problem`. Must not import optional libraries eagerly
        when a cheap check (module name of the problem's type) answers."""

    @abc.abstractmethod
    def compile(
        self,
        problem: Any,
        parameters: Sequence[Any] | None,
        variables: Sequence[Any] | None,
        options: dict[str, Any],
    ) -> Compiled:
        """Build the black box and its optimality condition for `problem`.

        Args:
            problem: the user's problem object (a cvxpy.Problem, casadi.Opti, a condition, ...).
            parameters: the problem's parameter handles, in the order the layer is called with.
            variables: the variable handles whose values the layer returns.
            options: the backend options the user passed to `bbd.layer` (validate with `Options`).
        """
