"""`bbd.implicit`: call a black box, certify its answer, differentiate it by the implicit function theorem.

Invariant: the black box returns z* with ``condition.residual(z*, *params) == 0``. Then, for a loss L,

    dL/dparams = -(dF/dparams)^T u,   where (dF/dz)^T u = dL/dz*.

The forward evaluates F(z*, params) once with autograd on (this value also certifies z*). The output is
``z* - (G - G.detach())`` with ``G = _AdjointSolve(F(z*, params))``: its value is exactly z*, and its
backward sends dL/dz* through `_AdjointSolve`, which replaces it by the adjoint solution u, into the graph
of F, which applies -(dF/dparams)^T. Because that graph is ordinary autograd, parameters that F captures
by closure (an nn.Module's weights) receive gradients too, and the memory of a backward is one evaluation
of F, whatever the number of solver iterations.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from blackbox_diff._adjoint import solve_adjoint
from blackbox_diff._batching import as_parameters, batch_layout, instance_args, owned_tensor, run_instances
from blackbox_diff._conditions import AbstractCondition, KKTSolution
from blackbox_diff._errors import CertificationError, InputError, SolverError
from blackbox_diff._options import ImplicitOptions, parse_options

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


@dataclasses.dataclass
class _Residual:
    """The per-call residual on flat unknowns, batched with vmap (or a loop where vmap cannot go)."""

    condition: AbstractCondition
    shape: torch.Size
    batched: list[bool]
    n_aux: int
    use_vmap: bool = True

    def single(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        aux, params = rest[: self.n_aux], rest[self.n_aux :]
        return self.condition.residual(z.reshape(self.shape), *aux, *params).reshape(-1)

    def single_certificate(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        aux, params = rest[: self.n_aux], rest[self.n_aux :]
        return self.condition.certificate(z.reshape(self.shape), *aux, *params).reshape(-1)

    def __call__(self, Z: torch.Tensor, aux: tuple, params: list, fn: Callable | None = None) -> torch.Tensor:
        fn = fn or self.single
        if Z.shape[0] == 1:  # one instance: no batching transform needed
            p = [q[0] if b else q for q, b in zip(params, self.batched, strict=True)]
            return fn(Z[0], *[x[0] for x in aux], *p).unsqueeze(0)
        if self.use_vmap:
            dims = (0,) + (0,) * self.n_aux + tuple(0 if b else None for b in self.batched)
            try:
                return torch.func.vmap(fn, in_dims=dims)(Z, *aux, *params)
            except Exception:  # noqa: BLE001 - any op vmap cannot batch: fall back to a loop
                self.use_vmap = False
        rows = []
        for i in range(Z.shape[0]):
            a = [x[i] for x in aux]
            p = [q[i] if b else q for q, b in zip(params, self.batched, strict=True)]
            rows.append(fn(Z[i], *a, *p))
        return torch.stack(rows) if rows else Z.new_zeros(0, Z.shape[1])


class _AdjointSolve(torch.autograd.Function):
    """Identity on F's value; its backward maps the cotangent g to u solving (dF/dz)^T u = g."""

    @staticmethod
    def forward(ctx, R, residual, Z, aux, params, structure, options):  # noqa: D102
        ctx.residual, ctx.Z, ctx.aux, ctx.params = residual, Z, aux, params
        ctx.structure, ctx.options = structure, options
        ctx.batched_grads = residual.use_vmap
        return R.view_as(R)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        with torch.enable_grad():
            z = ctx.Z.detach().requires_grad_(True)
            Fz = ctx.residual(z, ctx.aux, ctx.params)
            if not Fz.requires_grad:  # F does not depend on z: the IFT does not apply
                raise InputError(
                    "The residual does not depend on z, so dF/dz is zero and the implicit function theorem "
                    "cannot be applied. Check that the condition uses its first argument."
                )

            def matvec(v: torch.Tensor) -> torch.Tensor:
                (out,) = torch.autograd.grad(Fz, z, v, retain_graph=True, allow_unused=True)
                return torch.zeros_like(v) if out is None else out

            def batched_matvec(V: torch.Tensor) -> torch.Tensor:
                if ctx.batched_grads:
                    try:
                        (out,) = torch.autograd.grad(Fz, z, V, retain_graph=True, is_grads_batched=True)
                        return out
                    except Exception:  # noqa: BLE001 - an op in F without a batching rule: loop instead
                        ctx.batched_grads = False
                return torch.stack([matvec(v) for v in V])

            u, _ = solve_adjoint(
                matvec, g.detach(), structure=ctx.structure, options=ctx.options, batched_matvec=batched_matvec
            )
        return u, None, None, None, None, None, None


class ImplicitFunction:
    """A black-box solver made differentiable (returned by `bbd.implicit`)."""

    def __init__(self, condition: AbstractCondition, solve: Callable, options: ImplicitOptions) -> None:
        self.condition, self.solve, self.options = condition, solve, options
        functools.update_wrapper(self, solve, updated=())

    def with_options(self, **options: Any) -> ImplicitFunction:
        """A copy with some options replaced."""
        merged = {**self.options.model_dump(exclude_unset=True), **options}
        return ImplicitFunction(self.condition, self.solve, parse_options(merged))

    def __call__(self, *params: Any) -> Any:
        opts = self.options
        tensors = as_parameters(params)
        moved, batched, B = batch_layout(tensors, opts.in_dims)
        dtype = _result_dtype(tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        indices = list(range(B)) if B is not None else [None]
        args = [instance_args(moved, batched, i, opts.arrays) for i in indices]
        results = run_instances(self.solve, args, opts.executor, opts.max_workers)
        condition = copy.copy(self.condition)  # per-call state (KKT sizes) never touches the user's object
        Z, aux, ok, shape = self._unknowns(condition, results, args, moved, batched, indices, dtype, device)
        out = self._differentiable(condition, Z, aux, ok, shape, moved, batched, args, unbatched=B is None)
        out = out.reshape(out.shape[0], *shape)
        result = condition.finish(out, aux, opts)
        return _unbatch(result) if B is None else result

    # --- forward helpers -----------------------------------------------------------------------
    def _fail(self, err: Exception, index: int | None, args: tuple) -> None:
        if self.options.capture_failures is not None:
            from blackbox_diff._replay import record_failure

            record_failure(self.options.capture_failures, self.solve, args, err, index)
        if self.options.on_failure == "raise":
            raise err
        warnings.warn(f"{err} The instance's output is NaN and its gradient zero.", RuntimeWarning, stacklevel=4)

    def _unknowns(self, condition, results, args, moved, batched, indices, dtype, device):
        """Black-box answers -> flat unknowns Z (B, n), per-instance aux tensors, success mask."""
        zs: list[torch.Tensor | None] = []
        auxes: list[tuple | None] = []
        shape = None
        for (ok, value), idx, call_args in zip(results, indices, args, strict=True):
            where = "" if idx is None else f" at batch index {idx}"
            if not ok:
                err = value if isinstance(value, SolverError) else SolverError(
                    f"The black box {getattr(self.solve, '__name__', self.solve)!r} raised "
                    f"{type(value).__name__}: {value}{where}. Fix the solver or its inputs; with "
                    "on_failure='nan' the rest of the batch proceeds.",
                    batch_index=idx,
                )
                if err is value and err.batch_index is None and idx is not None:
                    err.batch_index = idx
                    if err.args and isinstance(err.args[0], str) and "batch index" not in err.args[0]:
                        err.args = (f"{err.args[0].rstrip()} (batch index {idx})", *err.args[1:])
                if err is not value:
                    err.__cause__ = value
                self._fail(err, idx, call_args)
                zs.append(None)
                auxes.append(None)
                continue
            try:
                p = [q.detach() for q in _instance_tensors(moved, batched, idx)]
                sol = value if condition.raw_solution else _solution_tensor(value, dtype, device, where)
                z, a = condition.prepare(sol, tuple(p), self.options)
                z = z.to(dtype=dtype, device=device)
                if shape is None:
                    shape = z.shape
                elif z.shape != shape:
                    raise SolverError(
                        f"The black box returned shape {tuple(z.shape)}{where}, but {tuple(shape)} for an "
                        "earlier instance; expected the same solution shape for every instance."
                    )
                if not bool(torch.isfinite(z).all()):
                    raise SolverError(
                        f"The black box returned NaN or Inf{where}: {z.flatten()[:6].tolist()}... Expected "
                        "a finite solution; a solver that failed should raise instead."
                    )
            except SolverError as err:
                err.batch_index = idx if err.batch_index is None else err.batch_index
                self._fail(err, idx, call_args)
                z, a = None, None
            except InputError:
                raise
            except Exception as err:
                raise InputError(
                    f"Preparing the {condition.describe()} unknowns from the black box's answer{where} failed: "
                    f"{type(err).__name__}: {err}. Check the condition's functions (signature (z, *params), "
                    "torch operations only)."
                ) from err
            zs.append(z)
            auxes.append(a)
        ok = [z is not None for z in zs]
        if shape is None:
            raise SolverError("Every instance of the batch failed; no solution to return.")
        n = shape.numel()
        Z = torch.full((len(zs), n), float("nan"), dtype=dtype, device=device)
        template = next(a for a in auxes if a is not None)
        aux = tuple(torch.zeros((len(zs), *t.shape), dtype=t.dtype, device=device) for t in template)
        for i, (z, a) in enumerate(zip(zs, auxes, strict=True)):
            if z is not None:
                Z[i] = z.reshape(-1)
                for dst, src in zip(aux, a, strict=True):
                    dst[i] = src
        return Z, aux, torch.tensor(ok, device=device), shape

    def _certify(self, residual: _Residual, R, Z, aux, params, idx_ok: list[int], args, unbatched) -> list[bool]:
        tol = self.options.residual_tol
        if tol is None:
            return [True] * len(idx_ok)
        with torch.no_grad():
            if type(self.condition).certificate is AbstractCondition.certificate:
                C = R.detach()
            else:
                C = residual(Z, aux, params, fn=residual.single_certificate)
            err = C.abs().amax(dim=1) if C.shape[1] else C.new_zeros(C.shape[0])
            scale = 1.0 + (Z.abs().amax(dim=1) if Z.shape[1] else Z.new_zeros(Z.shape[0]))
            bad = (err > tol * scale).tolist()
        passed = []
        for b, e, s, i in zip(bad, err.tolist(), (scale * tol).tolist(), idx_ok, strict=True):
            if not b:
                passed.append(True)
                continue
            where = "" if unbatched else f" at batch index {i}"
            msg = (
                f"The black box's answer{where} does not satisfy the {self.condition.describe()} condition: "
                f"max|F| = {e:.3g} > residual_tol*(1+max|z|) = {s:.3g}. Solve more accurately, check that the "
                "condition matches the solver, or loosen residual_tol (None disables the check)."
            )
            if self.options.certify == "warn":
                warnings.warn(msg + " Gradients may be wrong.", RuntimeWarning, stacklevel=4)
                passed.append(True)
                continue
            err = CertificationError(msg, batch_index=None if unbatched else i, residual=e, tolerance=s)
            self._fail(err, None if unbatched else i, args[i])
            passed.append(False)
        return passed

    def _differentiable(self, condition, Z, aux, ok, shape, moved, batched, args, unbatched) -> torch.Tensor:
        """Evaluate F at the answers, certify them, and attach the implicit gradient."""
        residual = _Residual(condition, shape, batched, len(aux), use_vmap=bool(getattr(condition, "vmappable", True)))
        for _ in range(2):  # a second pass only when certification removed instances
            idx_ok = torch.nonzero(ok).flatten()
            if idx_ok.numel() == 0:
                return Z
            Zs = Z[idx_ok]
            As = tuple(a[idx_ok] for a in aux)
            Ps = [p[idx_ok] if b else p for p, b in zip(moved, batched, strict=True)]
            try:
                with torch.enable_grad():
                    R = residual(Zs, As, Ps)
            except (InputError, SolverError):
                raise
            except Exception as err:
                raise InputError(
                    f"Evaluating the {condition.describe()} residual at the black box's answer failed: "
                    f"{type(err).__name__}: {err}. Check the residual's signature F(z, *params) and that it "
                    f"accepts z of shape {tuple(shape)}."
                ) from err
            if R.shape[1] != Zs.shape[1]:
                raise InputError(
                    f"The {condition.describe()} residual has {R.shape[1]} entries but z has {Zs.shape[1]}; "
                    "the implicit function theorem needs a square system (one equation per unknown)."
                )
            passed = self._certify(residual, R, Zs, As, Ps, idx_ok.tolist(), args, unbatched)
            if all(passed):
                break
            ok = ok.clone()
            ok[idx_ok[~torch.tensor(passed, device=ok.device)]] = False
            Z = Z.clone()
            Z[~ok] = float("nan")
        if not R.requires_grad or not torch.is_grad_enabled():
            return Z
        G = _AdjointSolve.apply(R, residual, Zs.detach(), As, [p.detach() for p in Ps],
                                condition.structure, self.options)
        out_ok = Zs - (G - G.detach())
        return Z.index_put((idx_ok,), out_ok)

def _instance_tensors(moved, batched, idx):
    return [p[idx] if (b and idx is not None) else p for p, b in zip(moved, batched, strict=True)]


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
