"""`bbd.implicit`: call a black box, certify its answer, differentiate it by the implicit function theorem.

Invariant: the black box returns z* with ``condition.residual(z*, *params) == 0``. The call goes through
the engine's autograd core (`blackbox_diff.engine.apply`): the black box runs inside its forward, on
detached copies of the parameters, one instance at a time (or through an executor); every derivative
(reverse, forward, higher order, torch.func transforms) comes from the implicit function theorem on the
condition, never from the solver's iterations. Memory of a backward is one evaluation of the condition,
whatever the number of solver iterations.
"""

from __future__ import annotations

import collections
import copy
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from blackbox_diff import engine
from blackbox_diff._errors import BlackBoxDiffError, InputError, SolverError
from blackbox_diff.conditions import AbstractCondition, KKTSolution
from blackbox_diff.engine import (
    ImplicitOptions,
    as_parameters,
    batch_layout,
    check_finite,
    instance_args,
    owned_tensor,
    parse_options,
)
from blackbox_diff.runtime import record_failure, run_instances

__all__ = ["ImplicitFunction", "implicit"]


def implicit(condition: AbstractCondition, **options: Any) -> Callable[[Callable], ImplicitFunction]:
    """Decorate a black-box solver so that its answer is differentiable.

    Args:
        condition: the optimality condition that holds at the solver's answer (`bbd.Root`,
            `bbd.FixedPoint`, `bbd.Argmin`, `bbd.KKT`, or any `AbstractCondition`).
        **options: see `ImplicitOptions` (linear_solver, rtol, max_steps, ridge, residual_tol, certify,
            on_failure, fallback, in_dims, executor, arrays, return_duals, ...).

    Returns:
        A decorator turning ``solve(*numpy_params) -> solution`` into a callable on torch tensors.

    Raises:
        InputError: the condition is not a condition, or an option is unknown or invalid.
    """
    if not isinstance(condition, AbstractCondition):
        raise InputError(
            f"implicit() expects an optimality condition (bbd.Root, bbd.FixedPoint, bbd.Argmin, bbd.KKT); "
            f"got {type(condition).__name__}. Wrap your residual: bbd.implicit(bbd.Root(F))(solve)."
        )
    opts = parse_options(options)

    def decorate(solve: Callable) -> ImplicitFunction:
        if not callable(solve):
            raise InputError(f"implicit(...) must decorate a callable solver; got {type(solve).__name__}.")
        return ImplicitFunction(condition, solve, opts)

    return decorate


class ImplicitFunction:
    """A black-box solver made differentiable (returned by `bbd.implicit`)."""

    def __init__(self, condition: AbstractCondition, solve: Callable, options: ImplicitOptions,
                 unknowns_shape: tuple[int, ...] | None = None) -> None:
        self.condition, self.solve, self.options = condition, solve, options
        # The shape of one instance's unknowns when known in advance (a layer's backend knows it); else the
        # last successful call's. With on_failure='nan', a call where every instance fails is shaped by it.
        self.unknowns_shape = unknowns_shape
        functools.update_wrapper(self, solve, updated=())

    def with_options(self, **options: Any) -> ImplicitFunction:
        """A copy with some options replaced."""
        merged = {**self.options.model_dump(exclude_unset=True), **options}
        return ImplicitFunction(self.condition, self.solve, parse_options(merged), self.unknowns_shape)

    @torch.compiler.disable
    def __call__(self, *params: Any) -> Any:
        opts = self.options
        tensors = as_parameters(params)
        moved, batched, B = batch_layout(tensors, opts.in_dims)
        dtype = _result_dtype(tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        # Per-call state (KKT sizes) lives on a copy and never touches the user's condition.
        call = _BlackBoxCall(self, copy.copy(self.condition), tuple(batched), dtype, device)
        Z, aux = engine.apply(call, moved)
        if call.ok is not None and (call.vmapped or bool(call.ok.any())) and self.unknowns_shape is None:
            self.unknowns_shape = tuple(call.shape)
        out = Z.reshape(Z.shape[0], *call.shape)
        result = call.condition.finish(out, aux, opts)
        return _unbatch(result) if B is None else result


class _Residual:
    """A per-instance condition on flat unknowns, batched with vmap (or a loop where vmap cannot go)."""

    def __init__(self, fn: Callable, shape: torch.Size, use_vmap: bool) -> None:
        self.fn, self.shape, self.use_vmap = fn, shape, use_vmap

    def single(self, z: torch.Tensor, n_aux: int, *rest: Any) -> torch.Tensor:
        aux, params = rest[:n_aux], rest[n_aux:]
        return self.fn(z.reshape(self.shape), *aux, *params).reshape(-1)

    def __call__(self, Z: torch.Tensor, aux: tuple, params: list, batched: tuple[bool, ...]) -> torch.Tensor:
        n_aux = len(aux)
        if Z.shape[0] == 1:  # one instance: no batching transform needed
            p = [q[0] if b else q for q, b in zip(params, batched, strict=True)]
            return self.single(Z[0], n_aux, *[x[0] for x in aux], *p).unsqueeze(0)
        if self.use_vmap:
            dims = (0,) + (0,) * n_aux + tuple(0 if b else None for b in batched)
            try:
                return torch.func.vmap(lambda z, *r: self.single(z, n_aux, *r), in_dims=dims)(Z, *aux, *params)
            except BlackBoxDiffError:
                raise
            except Exception:  # noqa: BLE001 - any op vmap cannot batch: fall back to a loop
                self.use_vmap = False
        rows = []
        for i in range(Z.shape[0]):
            a = [x[i] for x in aux]
            p = [q[i] if b else q for q, b in zip(params, batched, strict=True)]
            rows.append(self.single(Z[i], n_aux, *a, *p))
        return torch.stack(rows) if rows else Z.new_zeros(0, Z.shape[1])


class _BlackBoxCall(engine.Call):
    """One call of a user's black box: per-instance solves (through the executor), the condition per instance."""

    def __init__(self, function: ImplicitFunction, condition: AbstractCondition, batched: tuple[bool, ...],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(function.options, batched, condition.describe())
        self.function, self.condition = function, condition
        self.structure = condition.structure
        self.functional = bool(getattr(condition, "functional", True))
        self.check_curvature = bool(getattr(condition, "minimises", False))
        self.dtype, self.device = dtype, device
        self.shape: torch.Size | None = None
        self._residual: _Residual | None = None

    @property
    def unbatched(self) -> bool:
        return not any(self.batched)

    def index_of(self, row: int) -> int | None:
        return None if self.unbatched else row

    def adopt(self, other: engine.Call) -> None:
        super().adopt(other)
        self.shape = other.shape

    # --- the black box ------------------------------------------------------------------------------
    def answers(self, params: list[torch.Tensor]) -> engine.Answers:
        check_finite(params)
        opts = self.options
        B = next((p.shape[0] for p, b in zip(params, self.batched, strict=True) if b), None)
        indices = list(range(B)) if B is not None else [None]
        args = [instance_args(params, self.batched, i, opts.arrays) for i in indices]
        self._args = args
        results = run_instances(self.function.solve, args, opts.executor, opts.max_workers)
        zs, auxes = self._unknowns(results, args, params, indices)
        ok = torch.tensor([z is not None for z in zs], dtype=torch.bool)
        n = self.shape.numel()
        Z = torch.full((len(zs), n), float("nan"), dtype=self.dtype, device=self.device)
        template = next((a for a in auxes if a is not None), None)
        if template is None:
            template = self._aux_template(params)
        aux = tuple(torch.zeros((len(zs), *t.shape), dtype=t.dtype, device=self.device) for t in template)
        for i, (z, a) in enumerate(zip(zs, auxes, strict=True)):
            if z is not None:
                Z[i] = z.reshape(-1)
                for dst, src in zip(aux, a, strict=True):
                    dst[i] = src
        return engine.Answers(Z, aux, ok.to(self.device))

    def _aux_template(self, params) -> tuple:
        return ()

    def answer_shape(self) -> str:
        return f"{super().answer_shape()}, from the black box {_name(self.function.solve)}"

    def fail(self, err: BlackBoxDiffError, index: int | None, args: tuple | None = None) -> None:
        opts = self.options
        if args is None and getattr(self, "_args", None):
            args = self._args[0 if index is None else index]
        if opts.capture_failures is not None and args is not None:
            record_failure(opts.capture_failures, self.function.solve, args, err, index)
        super().fail(err, index)

    def _unknowns(self, results, args, params, indices) -> tuple[list, list]:
        """Black-box answers -> per-instance unknowns and aux tensors (None where an instance failed)."""
        prepared: list[tuple[torch.Tensor, tuple] | None] = []
        failed_shapes: list[tuple[int, ...]] = []
        for (ok, value), idx, call_args in zip(results, indices, args, strict=True):
            where = "" if idx is None else f" at batch index {idx}"
            try:
                if not ok:
                    raise _solver_error(self.function.solve, value, idx, where)
                prepared.append(self._prepare(value, params, idx, where))
            except SolverError as err:
                err.batch_index = idx if err.batch_index is None else err.batch_index
                if getattr(err, "answer_shape", None) is not None:
                    failed_shapes.append(err.answer_shape)
                self.fail(err, idx, call_args)
                prepared.append(None)
        self.shape = self._agreed_shape(prepared, indices, args, failed_shapes)
        zs, auxes = [], []
        for item in prepared:
            zs.append(None if item is None else item[0])
            auxes.append(None if item is None else item[1])
        return zs, auxes

    def _prepare(self, value: Any, params, idx, where) -> tuple[torch.Tensor, tuple]:
        condition = self.condition
        if value is None:
            raise SolverError(
                f"The black box {_name(self.function.solve)} returned None{where}; expected its solution (a float, "
                "a numpy array or a tensor). A solver that failed should raise instead."
            )
        if isinstance(value, (str, bytes)):
            raise SolverError(
                f"The black box {_name(self.function.solve)} returned a {type(value).__name__}{where} "
                f"({str(value)[:40]!r}); expected numbers (a float, a numpy array or a tensor). Convert the "
                "solver's output with float(...) or np.asarray(..., dtype=float)."
            )
        p = [q[idx].detach() if (b and idx is not None) else q.detach() for q, b in zip(params, self.batched,
                                                                                      strict=True)]
        sol = value if condition.raw_solution else _solution_tensor(value, self.dtype, self.device, where)
        try:
            z, a = condition.prepare(sol, tuple(p), self.options)
        except (BlackBoxDiffError, InputError):
            raise
        except Exception as err:
            raise InputError(
                f"Preparing the {condition.describe()} unknowns from the black box's answer{where} failed: "
                f"{type(err).__name__}: {err}. Check the condition's functions (signature (z, *params), torch "
                "operations only)."
            ) from err
        z = z.to(dtype=self.dtype, device=self.device)
        degeneracy = condition.degeneracy(z, a, tuple(p), self.options)
        if degeneracy is not None:
            self.degeneracies[0 if idx is None else idx] = degeneracy
        if not bool(torch.isfinite(z).all()):
            err = SolverError(
                f"The black box returned NaN or Inf{where}: {z.flatten()[:6].tolist()}... Expected a finite "
                "solution; a solver that failed should raise instead."
            )
            err.answer_shape = tuple(z.shape)  # a NaN answer still says the output's shape
            raise err
        return z, a

    def _agreed_shape(self, prepared, indices, args, failed_shapes=()) -> torch.Size:
        """The solution shape: declared by the black box, else the majority's; odd instances are failed.
        When every instance failed: the function's known shape, else the shape of the NaN answers."""
        declared = getattr(self.function.solve, "output_shape", None)
        shapes = [tuple(item[0].shape) for item in prepared if item is not None]
        if declared is not None:
            target = tuple(declared)
        elif not shapes and self.function.unknowns_shape is not None:
            target = tuple(self.function.unknowns_shape)  # every instance failed: shape the NaN output
        elif not shapes and failed_shapes:
            counts = collections.Counter(failed_shapes)
            target = max(counts, key=lambda s: (counts[s], -failed_shapes.index(s)))
        elif shapes:
            counts = collections.Counter(shapes)
            target = max(counts, key=lambda s: (counts[s], -shapes.index(s)))
        else:
            raise SolverError(
                "Every instance of the call failed, before any call of this function succeeded, and the black "
                "box declares no output shape (an `output_shape` attribute), so no NaN output can be shaped. "
                "See the warnings (or use on_failure='raise') for each instance's error."
            )
        for k, (item, idx) in enumerate(zip(prepared, indices, strict=True)):
            if item is None or tuple(item[0].shape) == target:
                continue
            where = "" if idx is None else f" at batch index {idx}"
            source = "declared output_shape" if declared is not None else "the other instances' shape"
            err = SolverError(
                f"The black box {_name(self.function.solve)} returned shape {tuple(item[0].shape)}{where}, expected "
                f"{target} ({source}). Every instance must return a solution of the same shape.",
                batch_index=idx,
            )
            self.fail(err, idx, args[k])
            prepared[k] = None
        return torch.Size(target)

    # --- the condition ---------------------------------------------------------------------------
    def residual_fn(self):
        if self._residual is None or self._residual.shape != self.shape:
            use_vmap = bool(getattr(self.condition, "vmappable", True))
            self._residual = _Residual(self.condition.residual, self.shape, use_vmap)
        return self._residual

    def certificate_fn(self):
        if type(self.condition).certificate is AbstractCondition.certificate:
            return None
        use_vmap = bool(getattr(self.condition, "vmappable", True))
        return _Residual(self.condition.certificate, self.shape, use_vmap)

    def certify_fn(self):
        if type(self.condition).certify is AbstractCondition.certify:
            return None
        return self.condition.certify

    def scale_fn(self):
        if type(self.condition).residual_scale is AbstractCondition.residual_scale:
            return None
        use_vmap = bool(getattr(self.condition, "vmappable", True))
        return _Residual(self.condition.residual_scale, self.shape, use_vmap)

    def certificate_blocks(self):
        return self.condition.certificate_blocks()

    def closed(self) -> bool:
        return bool(getattr(self.condition, "closed", False))

    def jvp_params_fn(self):
        if type(self.condition).jvp_params is AbstractCondition.jvp_params:
            return None
        if getattr(self.condition, "batched_jvp_params", False):  # the whole batch in one call, no vmap
            cond = self.condition

            def batched(Z, aux, params, tangents, batched):
                filled = [torch.zeros_like(p) if t is None else t for p, t in zip(params, tangents, strict=True)]
                return cond.jvp_params(Z.reshape(Z.shape[0], *self.shape), *aux, *params, *filled).reshape(
                    Z.shape[0], -1)

            return batched
        per_instance = _Residual(self.condition.jvp_params, self.shape, bool(getattr(self.condition, "vmappable",
                                                                                    True)))

        def jvp_params(Z, aux, params, tangents, batched):
            filled = [torch.zeros_like(p) if t is None else t for p, t in zip(params, tangents, strict=True)]
            return per_instance(Z, aux, [*params, *filled], (*batched, *batched))

        return jvp_params

    def fresh(self, batched):
        new = super().fresh(batched)
        new._residual = None
        return new


def _name(solve: Callable) -> str:
    return repr(getattr(solve, "__name__", solve))


def _solver_error(solve: Callable, value: BaseException, idx: int | None, where: str) -> SolverError:
    if isinstance(value, SolverError):
        if value.batch_index is None and idx is not None:
            value.batch_index = idx
        return value
    err = SolverError(
        f"The black box {_name(solve)} raised {type(value).__name__}: {value}{where}. Fix the solver or its "
        "inputs; with on_failure='nan' the rest of the batch proceeds.",
        batch_index=idx,
    )
    err.__cause__ = value
    return err


def _result_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.float64
    dtype = floats[0]
    for d in floats[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _solution_tensor(value: Any, dtype: torch.dtype, device: torch.device, where: str) -> torch.Tensor:
    if isinstance(value, KKTSolution):
        value = value.x
    try:
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
            raise TypeError(f"dtype {value.dtype}")
        return owned_tensor(value, dtype, device)
    except (TypeError, ValueError) as err:
        raise SolverError(
            f"The black box returned a {type(value).__name__}{where} that is not an array of numbers: "
            f"{str(value)[:80]!r}. Return a float, a numpy array or a tensor."
        ) from err


def _unbatch(result: Any) -> Any:
    if isinstance(result, KKTSolution):
        return KKTSolution(x=result.x[0], eq=result.eq[0], ineq=result.ineq[0])
    if isinstance(result, (tuple, list)):
        return type(result)(_unbatch(r) for r in result)
    return result[0]
