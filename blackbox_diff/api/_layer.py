"""`bbd.layer`: a problem a backend understands, as a differentiable `torch.nn.Module`.

Batching follows cvxpylayers: a parameter whose tensor has exactly one more leading dimension than its
declared shape (``Compiled.parameter_shapes``) is batched along dimension 0; parameters with their declared
shape are shared by every instance and broadcast (autograd then sums their gradients over the batch). A
backend that cannot know the shapes (``parameter_shapes=None``, e.g. the scipy backend given torch
callables and no ``parameters=[shape, ...]``) gets no convention: every parameter is unbatched unless the
user passes ``in_dims=``.

Keyword arguments of a call (``layer(*params, solver_args={...})``, cvxpylayers' per-call settings) go to
the backend's `Compiled.on_call` hook, which returns the `Compiled` to run for that call; a backend without
the hook takes none.
"""

from __future__ import annotations

from typing import Any

import torch

from blackbox_diff._errors import InputError, PluginError, SolverError
from blackbox_diff.api._implicit import ImplicitFunction
from blackbox_diff.conditions import AbstractCondition, KKTSolution
from blackbox_diff.engine import ImplicitOptions, parse_options
from blackbox_diff.plugin import AbstractBackend, Compiled, find_backend, get_backend

__all__ = ["Layer", "layer"]


def layer(
    problem: Any,
    *,
    parameters: Any = None,
    variables: Any = None,
    backend: str | AbstractBackend | None = None,
    **options: Any,
) -> Layer:
    """Turn `problem` into a differentiable layer, through the backend that understands it.

    Args:
        problem: what the backend solves (a cvxpy.Problem, a casadi.Opti, a `bbd.KKT`, ...).
        parameters: the problem's parameter handles, in the order the layer is called with (backend
            specific: cvxpy Parameters, casadi parameters, or shapes for the scipy backend).
        variables: the variable handles whose values the layer returns.
        backend: a registered backend's name, or an `AbstractBackend` instance. None: the first
            available registered backend whose ``accepts(problem)`` is true.
        **options: `bbd.implicit` options (linear_solver, rtol, residual_tol, on_failure, executor, ...)
            and the backend's own options (its ``Options`` model), in one namespace.

    Returns:
        A `Layer` (a torch.nn.Module); ``layer(*params)`` returns the tuple of variable tensors.

    Raises:
        PluginError: no backend accepts the problem, or the named backend does not exist.
        BackendUnavailableError: the backend's solver library is missing (with the pip hint).
        InputError: an option is unknown to both `bbd.implicit` and the backend, or invalid (the backend's
            own options are validated into its ``Options`` model before its ``compile`` is called).
    """
    chosen = _choose(problem, backend)
    chosen.require()
    implicit_options, backend_options = _split_options(options, chosen)
    compiled = chosen.compile(problem, parameters, variables, chosen.validate_options(backend_options))
    if not isinstance(compiled, Compiled):
        raise PluginError(
            f"Backend {chosen.name!r}.compile returned a {type(compiled).__name__}; expected bbd.Compiled. "
            "This is a bug in the backend's plugin."
        )
    if not isinstance(compiled.condition, AbstractCondition) or not callable(compiled.solve):
        raise PluginError(
            f"Backend {chosen.name!r} compiled a Compiled without a callable solve and an AbstractCondition "
            f"(got solve={type(compiled.solve).__name__}, condition={type(compiled.condition).__name__})."
        )
    merged = {**compiled.options, **implicit_options}
    return Layer(compiled, parse_options(merged), _names(parameters, compiled), "in_dims" in implicit_options)


def _choose(problem: Any, backend: str | AbstractBackend | None) -> AbstractBackend:
    if backend is None:
        return find_backend(problem)
    if isinstance(backend, AbstractBackend):
        return backend
    if isinstance(backend, str):
        return get_backend(backend)
    raise InputError(
        f"backend must be a registered backend's name or an AbstractBackend instance; got "
        f"{type(backend).__name__}. See bbd.backends() for the names."
    )


def _split_options(options: dict[str, Any], backend: AbstractBackend) -> tuple[dict, dict]:
    engine_names = set(ImplicitOptions.model_fields)
    backend_model = getattr(backend, "Options", None)
    backend_names = set(getattr(backend_model, "model_fields", {}) or {})
    unknown = sorted(k for k in options if k not in engine_names and k not in backend_names)
    if unknown:
        raise InputError(
            f"Unknown option(s) {unknown} for bbd.layer with backend {backend.name!r}. Engine options "
            f"(bbd.implicit): {sorted(engine_names)}. Options of backend {backend.name!r}: "
            f"{sorted(backend_names) or 'none'}."
        )
    # A name both sides know goes to the backend too: the engine option wins for the engine.
    engine = {k: v for k, v in options.items() if k in engine_names}
    own = {k: v for k, v in options.items() if k in backend_names}
    parse_options(engine)  # reject bad values now, with the engine's message
    return engine, own


def _names(parameters: Any, compiled: Compiled) -> list[str]:
    count = len(compiled.parameter_shapes) if compiled.parameter_shapes is not None else 0
    names = []
    for i in range(count):
        handle = parameters[i] if isinstance(parameters, (list, tuple)) and i < len(parameters) else None
        label = getattr(handle, "name", None)
        try:
            label = label() if callable(label) else label
        except Exception:  # noqa: BLE001 - a name is only decoration for error messages
            label = None
        names.append(f"parameter {i} ({label!r})" if isinstance(label, str) and label else f"parameter {i}")
    return names


class Layer(torch.nn.Module):
    """A compiled problem as a module: ``layer(*params, **call_options) -> tuple of variable tensors``.

    Attributes:
        compiled: what the backend built (solve, condition, shapes, outputs).
        options: the engine options (`ImplicitOptions`), backend defaults overridden by the user's.
    """

    def __init__(self, compiled: Compiled, options: ImplicitOptions, names: list[str], explicit_dims: bool):
        super().__init__()
        self.compiled = compiled
        self.options = options
        self._names = names
        self._explicit_dims = explicit_dims
        self._function = ImplicitFunction(compiled.condition, compiled.solve, options, compiled.unknowns_shape)
        self._per_call: tuple[Compiled, ImplicitFunction] | None = None

    def extra_repr(self) -> str:
        shapes = self.compiled.parameter_shapes
        return f"backend={self.compiled.backend!r}, parameter_shapes={None if shapes is None else list(shapes)}"

    def forward(self, *params: Any, **call_options: Any) -> Any:
        """Solve for the given parameters (tensors in the order of ``parameters=``).

        Args:
            *params: one tensor per parameter, with its declared shape (shared by the batch) or one more
                leading dimension (batched). Numbers and numpy arrays are converted to float64.
            **call_options: per-call settings the backend takes through `Compiled.on_call` (e.g. the cvxpy
                backend's ``solver_args={...}``, merged over the ones given to `bbd.layer`).

        Raises:
            InputError: a parameter is None or not numeric, has a wrong shape or value, or a keyword is
                not one the backend takes at call time.
        """
        tensors = [self._tensor(i, p) for i, p in enumerate(params)]
        in_dims, batch = self._layout(tensors)
        compiled, fn = self._for_call(tensors, call_options)
        fn = fn if in_dims is None else fn.with_options(in_dims=in_dims)
        try:
            result = fn(*tensors)
        except SolverError as err:
            raise _with_backend(err, compiled.backend) from err
        return self._outputs(result, batch is not None, compiled)

    def _name(self, i: int) -> str:
        return self._names[i] if i < len(self._names) else f"parameter {i}"

    def _tensor(self, i: int, value: Any) -> torch.Tensor:
        if torch.is_tensor(value):
            return value
        shapes = self.compiled.parameter_shapes
        expected = "a torch.Tensor"
        if shapes is not None and i < len(shapes):
            declared = tuple(shapes[i])
            expected += f" of shape {declared} (or with a leading batch dimension)"
        name = self._name(i)
        if value is None:
            raise InputError(
                f"{name[:1].upper()}{name[1:]} is None; expected {expected}. Pass a value for every parameter, "
                "in the order given to bbd.layer(parameters=...)."
            )
        try:
            return torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(
                f"{name[:1].upper()}{name[1:]} is a {type(value).__name__} that is not numeric ({err}); expected "
                f"{expected} (numbers and numpy arrays are converted)."
            ) from err

    def _for_call(self, tensors: list[torch.Tensor], call_options: dict[str, Any]) -> tuple[Compiled, Any]:
        """The Compiled and engine function for this call: the layer's own, or the backend's `on_call` pick."""
        hook = self.compiled.on_call
        if hook is None:
            if call_options:
                raise InputError(
                    f"The layer of backend {self.compiled.backend!r} takes no keyword arguments at call time; got "
                    f"{sorted(call_options)}. Set options in bbd.layer(...) instead."
                )
            return self.compiled, self._function
        chosen = hook(tuple(tensors), dict(call_options))
        if chosen is None or chosen is self.compiled:
            return self.compiled, self._function
        if not isinstance(chosen, Compiled):
            raise PluginError(
                f"Backend {self.compiled.backend!r}: Compiled.on_call returned a {type(chosen).__name__}; expected "
                "a bbd.Compiled or None. This is a bug in the backend's plugin."
            )
        if self._per_call is None or self._per_call[0] is not chosen:
            self._per_call = (chosen, ImplicitFunction(chosen.condition, chosen.solve, self.options,
                                                       chosen.unknowns_shape))
        return self._per_call

    def _layout(self, tensors: list[torch.Tensor]) -> tuple[Any, int | None]:
        """The in_dims of the call (cvxpylayers convention) and the batch size (None: unbatched)."""
        shapes = self.compiled.parameter_shapes
        if self._explicit_dims or shapes is None:
            dims = self.options.in_dims
            return None, (None if dims is None or all(d is None for d in _as_tuple(dims, len(tensors))) else 1)
        if len(tensors) != len(shapes):
            raise InputError(
                f"The layer takes {len(shapes)} parameter(s) ({', '.join(self._names) or 'none'}) but was called "
                f"with {len(tensors)}. Pass them in the order given to bbd.layer(parameters=...)."
            )
        dims: list[int | None] = []
        sizes: dict[str, int] = {}
        for name, t, declared in zip(self._names, tensors, shapes, strict=True):
            declared = tuple(declared)
            if tuple(t.shape) == declared:
                dims.append(None)
            elif t.dim() == len(declared) + 1 and tuple(t.shape[1:]) == declared:
                dims.append(0)
                sizes[name] = t.shape[0]
            else:
                raise InputError(
                    f"{name[:1].upper()}{name[1:]} has shape {tuple(t.shape)}; declared shape {declared}, so expected "
                    f"{declared} (shared by the batch) or (batch, {', '.join(map(str, declared))}"
                    f"{',' if len(declared) == 1 else ''}) (batched)."
                )
        if len(set(sizes.values())) > 1:
            raise InputError(
                f"Batched parameters disagree on the batch size: {sizes}. Expected the same leading size for "
                "every batched parameter."
            )
        if not sizes:
            return None, None
        return tuple(dims), next(iter(sizes.values()))

    def _outputs(self, result: Any, batched: bool, compiled: Compiled) -> Any:
        outputs = compiled.outputs
        if outputs is None:
            return result if not compiled.variable_shapes else (result,)
        if batched:
            return tuple(outputs(result))
        # The backend's `outputs` maps batched results: give it a batch of one and take it back off.
        out = outputs(_lead(result, add=True))
        return tuple(_lead(o, add=False) for o in out)


def _as_tuple(dims: Any, n: int) -> tuple:
    return (dims,) * n if isinstance(dims, int) else tuple(dims)


def _lead(value: Any, add: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, KKTSolution):
        return KKTSolution(*(_lead(v, add) for v in (value.x, value.eq, value.ineq)))
    if isinstance(value, (tuple, list)):  # an output made of several tensors (e.g. a cone's dual parts)
        return type(value)(_lead(v, add) for v in value)
    if torch.is_tensor(value):
        return value.unsqueeze(0) if add else value.squeeze(0)
    return value


def _with_backend(err: SolverError, backend: str) -> SolverError:
    where = "" if err.batch_index is None or f"batch index {err.batch_index}" in str(err) else (
        f" (batch index {err.batch_index})"
    )
    # Name the backend unless the message already does (scipy's messages start with "scipy ...").
    name = f"[{backend}] " if backend and backend.lower() not in str(err).lower() else ""
    new = SolverError(
        f"{name}{err}{where}",
        batch_index=err.batch_index,
        backend=err.backend or backend or None,
        status=err.status,
        exit_code=err.exit_code,
        stderr_tail=err.stderr_tail,
    )
    return new
