"""The extension point for solver families: `AbstractBackend`, its `BackendOptions`, what it compiles to
(`Compiled`), and `parse_shapes` for the shapes a backend declares."""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from blackbox_diff._errors import BackendUnavailableError, InputError
from blackbox_diff.conditions import AbstractCondition
from blackbox_diff.engine import parse_options

__all__ = ["AbstractBackend", "BackendOptions", "Compiled", "parse_shapes"]


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


class _ReadsAsMapping:
    """Mapping methods for a validated options model: the options the user set, by name."""

    def keys(self) -> Iterator[str]:
        """The names of the options that were set (not those left at their defaults)."""
        return iter(sorted(self.model_fields_set))

    def __getitem__(self, name: str) -> Any:
        if name not in type(self).model_fields:
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.model_fields_set

    def get(self, name: str, default: Any = None) -> Any:
        """The option's value if it was set, else `default` (as ``dict.get``)."""
        return getattr(self, name) if name in self.model_fields_set else default


class BackendOptions(_ReadsAsMapping, BaseModel):
    """Base of a backend's own options: a pydantic model that refuses unknown keys.

    `bbd.layer` validates the options meant for a backend into its ``Options`` model and passes the
    validated instance to `AbstractBackend.compile`; read it by attribute (``options.tol``). It also
    reads as a mapping of the options the user set (``dict(options)``, ``options["tol"]``, ``"tol" in
    options``, ``self.Options(**options)``), so that a ``compile`` written for the dict of options that
    blackbox_diff passed before keeps working. (An ``Options`` model derived from pydantic's ``BaseModel``
    directly is validated into a subclass that reads the same way.)
    """

    model_config = ConfigDict(extra="forbid")


_READABLE: dict[type, type] = {}


def _readable(model: type[BaseModel]) -> type[BaseModel]:
    """`model`, or (for a model without the mapping methods) its subclass that has them, so that what
    `compile` receives works wherever the dict it received before did."""
    if issubclass(model, _ReadsAsMapping):
        return model
    if model not in _READABLE:  # a race makes two equivalent classes: harmless
        _READABLE[model] = type(model.__name__, (model, _ReadsAsMapping),
                                {"__module__": model.__module__, "__doc__": model.__doc__})
    return _READABLE[model]


def parse_shapes(specs: Any, what: str = "parameters") -> list[tuple[int, ...]] | None:
    """The shapes a user declares with ``parameters=[...]`` or ``variables=[...]``, as tuples.

    Each entry is one of:

    - a tuple or list of non-negative ints (a ``torch.Size`` too): that shape, ``()`` for a scalar;
    - an int ``n``: the shape ``(n,)``;
    - an example value whose shape is taken: a numpy array, a torch tensor, or a real number (a
      float such as ``0.5`` is a scalar example: shape ``()``; an int always means a length).

    Args:
        specs: the list, or None when nothing was declared.
        what: the argument's name in error messages (``"parameters"``, ``"variables"``).

    Returns:
        One shape per entry, or None when `specs` is None.

    Raises:
        InputError: `specs` is not a list, or an entry is none of the above (a string, a bool, a
            negative size, ...); the message names the entry and what is accepted.
    """
    if specs is None:
        return None
    if not isinstance(specs, Sequence) or isinstance(specs, (str, bytes)):
        raise InputError(
            f"{what} must be a list with one entry per {what[:-1] if what.endswith('s') else what} (a shape tuple, "
            f"an int n for shape (n,), or an example array); got {type(specs).__name__}."
        )
    return [_shape(spec, f"{what}[{i}]") for i, spec in enumerate(specs)]


def _is_int(n: Any) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_))


def _shape(spec: Any, where: str) -> tuple[int, ...]:
    if _is_int(spec) and spec >= 0:
        return (int(spec),)
    if isinstance(spec, (tuple, list)) and all(_is_int(n) and n >= 0 for n in spec):
        return tuple(int(n) for n in spec)
    if torch.is_tensor(spec) or isinstance(spec, np.ndarray):
        return tuple(spec.shape)
    if isinstance(spec, numbers.Real) and not isinstance(spec, (bool, np.bool_)) and not _is_int(spec):
        return ()
    raise InputError(
        f"{where} = {spec!r} is not a shape; expected a tuple of ints >= 0 such as (3,) or (), an int n >= 0 for "
        "shape (n,), or an example array (or number) whose shape is taken."
    )


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
        Options: the backend's own options, a subclass of `BackendOptions` (pydantic, unknown keys
            refused). `bbd.layer` sends it the keys it declares and validates them before `compile`.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    install_hint: ClassVar[str | None] = None
    problem_types: ClassVar[str] = ""
    returns_duals: ClassVar[bool] = False

    Options: ClassVar[type[BaseModel]] = BackendOptions

    def validate_options(self, options: Mapping[str, Any] | BaseModel | None) -> Any:
        """`options` as an instance of this backend's `Options` model.

        An instance of ``Options`` (what `bbd.layer` passes to `compile`) is returned as it is; a mapping
        (a dict, when `compile` is called directly) or None is validated.

        Raises:
            InputError: an option is unknown or has a wrong type or value (the message lists the valid
                names).
        """
        model = self.Options
        if isinstance(options, model):
            return options
        if options is None:
            options = {}
        elif isinstance(options, BaseModel):
            options = {k: getattr(options, k) for k in options.model_fields_set}
        elif not isinstance(options, Mapping):
            raise InputError(
                f"Backend {self.name!r}: options must be a mapping of option names to values or an instance of "
                f"its Options model; got {type(options).__name__}."
            )
        return parse_options(dict(options), _readable(model))

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
            parameters: the problem's parameter handles, in the order the layer is called with (shapes
                can be read with `parse_shapes`).
            variables: the variable handles whose values the layer returns.
            options: the backend options the user passed to `bbd.layer`, already validated: an instance
                of `Options`. A direct call may pass a dict instead: start with
                ``opts = self.validate_options(options)``, which accepts either.

        Raises:
            InputError: the problem, its handles or an option cannot be compiled (say which and why).
        """
