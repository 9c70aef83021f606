"""Implicit ODE layers: one-step implicit Runge-Kutta methods, each step an implicit function.

`odeint(func, y0, t, *params, method=...)` integrates ``dy/dt = func(t, y, *params)``. Each step's stage
values Y (one stage for backward Euler and the trapezoidal rule, two for Radau IIA order 3, three for
Radau IIA order 5) solve the collocation equations

    F(Y; y_n, t_n, h, params) = Y_i - y_n - h sum_j a_ij f(t_n + c_j h, Y_j) = 0,

a root found by a black box (Newton in torch by default, `scipy.optimize.root`, or any
``solver(F, Y0) -> Y``) and differentiated by the engine's IFT core (`blackbox_diff.engine`): reverse
mode, forward mode, second derivatives and torch.func transforms, with respect to y0, the params, the
output times t, the weights of an nn.Module field, and (first order) any trainable tensor the field
reaches by closure. Memory is O(steps x stages x state), never O(Newton iterations).

All methods are stiffly accurate (y_{n+1} is the last stage). The gradient is the exact gradient of the
discretisation ("discretise-then-optimise"), up to the Newton and linear-solve tolerances.

Every step's answer is certified (each component of F relative to its terms, as bbd.implicit does),
whatever solver produced it; a step whose root finder fails is halved. Stage equations have more than one root
on stiff problems: Newton starts from the previous step's collocation polynomial only when that
predictor keeps every component's sign and has a smaller residual than the safe start y_n, and an answer
that changed a sign is re-solved from y_n (the root continuously connected to y_n as h -> 0).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from blackbox_diff import engine
from blackbox_diff._errors import BlackBoxDiffError, InputError, SolverError
from blackbox_diff.engine import ImplicitOptions, parse_options
from blackbox_diff.ode._newton import newton, scipy_root
from blackbox_diff.ode._tableaux import Tableau, dense_output

__all__ = ["OdeOptions", "odeint"]

# A step whose root finder fails is halved, at most this many times in a row.
_MAX_HALVINGS = 6
# Certification of a step (relative to the size of each component's terms, as everywhere): the default
# tolerance of bbd.implicit, or 10 x newton_tol when that is looser (float32).
_CERTIFY_TOL = 1e-5


class OdeOptions(BaseModel):
    """Options of `odeint` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    method: Literal["backward_euler", "trapezoid", "radau3", "radau5"] = Field(
        "radau5", description="Implicit Runge-Kutta method (order 1, 2, 3, 5)."
    )
    solver: Any = Field(
        "newton",
        description="Per-step root finder: 'newton' (torch), 'scipy' (scipy.optimize.root, hybr), or a "
        "callable solver(F, Y0) -> Y with F mapping a (B, n) tensor to a (B, n) residual. Every step's answer "
        "is certified, whichever solver produced it.",
    )
    linear_solver: Literal["auto", "dense", "gmres", "cg"] = Field(
        "auto",
        description="Adjoint solve per step: 'dense' (batched block-diagonal LU), 'gmres', 'cg' (CG on the "
        "normal equations, as in the DIL poster); 'auto' is dense up to dense_max_size unknowns per "
        "instance, GMRES above.",
    )
    step_size: float | None = Field(
        None, gt=0.0, description="Largest step; each output interval is split into equal steps."
    )
    substeps: int = Field(1, ge=1, description="Steps per output interval when step_size is None.")
    batch_dims: int = Field(
        0,
        ge=0,
        description="Leading dimensions of y0 that index independent systems (func must act on them row "
        "by row, like an MLP on a batch): Newton and adjoint solves become batched block-diagonal, and every "
        "adjoint solution is verified against the exact (coupled) operator.",
    )
    newton_tol: float | None = Field(
        None, gt=0.0, description="Newton stops at max|F| <= tol max|Y|; None: 1e-10 (float64), 1e-5."
    )
    newton_max_iter: int = Field(20, ge=1, description="Newton iteration cap per step.")
    step_check: Literal["doubling", "none"] = Field(
        "doubling",
        description="'doubling': every step is compared with two half steps (about 3x the forward's root "
        "solves); when they disagree grossly (by more than a quarter of the solution's size), the stage "
        "equations' root is not the one connected to y_n (a stiff field with several equilibria and too large "
        "a step) and the step is halved, or refused after 6 halvings. 'none': the residual checks only.",
    )
    rtol: float = Field(1e-10, ge=0.0, description="Relative tolerance of iterative adjoint solves.")
    dense_max_size: int = Field(64, ge=0, description="'auto' solves densely up to this many unknowns.")


class _Field:
    """func on flat states (k, d): explicit params and (lifted) module weights substituted."""

    def __init__(self, func: Callable, shape: torch.Size, batch_dims: int, lifted: engine.Lifted | None) -> None:
        self.func, self.shape, self.batch_dims, self.lifted = func, shape, batch_dims, lifted
        self.B = math.prod(shape[:batch_dims])
        self.d = math.prod(shape[batch_dims:])

    def _shape_for(self, rows: int) -> tuple[int, ...]:
        if rows == self.B:
            return tuple(self.shape)
        return (rows, *self.shape[self.batch_dims:])  # rows folded by the engine (batch_dims == 1)

    def __call__(self, t: torch.Tensor, y: torch.Tensor, params: list, weights: list) -> torch.Tensor:
        shape = self._shape_for(y.shape[0])
        args = (t, y.reshape(shape), *params)
        out = self.func(*args) if self.lifted is None else self.lifted(weights, *args)
        if not torch.is_tensor(out):
            raise InputError(
                f"func(t, y, *params) returned a {type(out).__name__}; expected a tensor of the shape of y, "
                f"{shape}. Return torch.stack([...]) rather than a list."
            )
        if tuple(out.shape) != shape:
            raise InputError(
                f"func(t, y, *params) returned shape {tuple(out.shape)}; expected the shape of y, {shape}."
            )
        if out.dtype != y.dtype:
            raise InputError(
                f"func(t, y, *params) returned dtype {out.dtype} for y of dtype {y.dtype}; expected the same dtype. "
                "Make the field's parameters and constants the dtype of y0 (e.g. module.to(y0.dtype))."
            )
        return out.reshape(y.shape[0], self.d)

    def jacobian(self, t: torch.Tensor, y: torch.Tensor, params: list, weights: list) -> torch.Tensor:
        """Per-row Jacobians df/dy (k, d, d) by d batched VJPs (for Newton: rows taken as independent)."""
        k, d = y.shape
        with torch.enable_grad():
            yl = y.detach().requires_grad_(True)
            out = self(t.detach(), yl, [p.detach() for p in params], [w.detach() for w in weights])
            if not out.requires_grad:
                return y.new_zeros(k, d, d)
            eye = torch.eye(d, dtype=y.dtype, device=y.device)
            V = eye[:, None, :].expand(d, k, d)
            try:
                (rows,) = torch.autograd.grad(out, yl, V, is_grads_batched=True, allow_unused=True, retain_graph=True)
            except RuntimeError:  # an op without a batching rule: one VJP per row of the Jacobian
                rows = torch.stack([torch.autograd.grad(out, yl, V[j], retain_graph=True, allow_unused=True)[0]
                                    for j in range(d)])
        if rows is None:
            return y.new_zeros(k, d, d)
        return rows.transpose(0, 1)


class _Integration:
    """One odeint call: the field, the tableau, the options, and Newton's state carried across steps."""

    def __init__(self, field: _Field, tab: Tableau, opts: OdeOptions, dtype: torch.dtype) -> None:
        self.field, self.tab, self.opts = field, tab, opts
        self.tol = opts.newton_tol or (1e-10 if dtype == torch.float64 else 1e-5)
        self.lu: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lu_h = float("nan")
        self.newton_iterations = 0
        linear = {"cg": "cgne"}.get(opts.linear_solver, opts.linear_solver)
        # Engine options of every step (a constructed model: 'cgne', CG on the normal equations, is a
        # method of the engine's policy that bbd.implicit does not expose).
        self.options = ImplicitOptions.model_construct(
            **{**ImplicitOptions().model_dump(), "linear_solver": linear, "rtol": opts.rtol,
               "dense_max_size": opts.dense_max_size, "residual_tol": max(_CERTIFY_TOL, 10 * self.tol)}
        )

    def stage_rhs(self, Y: torch.Tensor, t, h, params, weights) -> torch.Tensor:
        """f at every stage: (k, s, d)."""
        return torch.stack([self.field(t + cj * h, Y[:, j], params, weights) for j, cj in enumerate(self.tab.c)],
                           dim=1)

    def residual(self, Y: torch.Tensor, y: torch.Tensor, f0, t, h, params, weights) -> torch.Tensor:
        """F(Y) = Y_i - y_n - h sum_j a_ij f(t + c_j h, Y_j) [- h a0_i f0] (k, s, d)."""
        F = self.stage_rhs(Y, t, h, params, weights)
        A = self.tab.A.to(dtype=Y.dtype, device=Y.device)
        R = Y - y[:, None] - h * torch.einsum("ij,bjd->bid", A, F)
        if f0 is not None:
            R = R - h * self.tab.a0.to(dtype=Y.dtype, device=Y.device)[None, :, None] * f0[:, None]
        return R

    def _jacobian(self, Y: torch.Tensor, t, h, params, weights, simplified: bool) -> torch.Tensor:
        """dF/dY per row (k, s d, s d): I - h a_ij df/dy(Y_j) (every stage at Y_s when simplified)."""
        k, s, d = Y.shape
        if simplified:
            Jf = self.field.jacobian(t + h, Y[:, -1], params, weights)[:, None].expand(k, s, d, d)
        else:
            Jf = torch.stack([self.field.jacobian(t + cj * h, Y[:, j], params, weights)
                              for j, cj in enumerate(self.tab.c)], dim=1)
        A = self.tab.A.to(dtype=Y.dtype, device=Y.device)
        J = -float(h) * A[None, :, :, None, None] * Jf[:, None]
        J = J.permute(0, 1, 3, 2, 4).reshape(k, s * d, s * d)
        return J + torch.eye(s * d, dtype=Y.dtype, device=Y.device)

    def solve_stages(self, y, f0, Y0: torch.Tensor, t, h, params, weights, tol: float | None = None) -> torch.Tensor:
        """The stage values (k, s, d) from the start Y0, by the configured root finder (to `tol`, default
        the Newton tolerance)."""
        tol = self.tol if tol is None else tol
        k, s, d = Y0.shape
        opts = self.opts

        def res(z: torch.Tensor) -> torch.Tensor:
            return self.residual(z.reshape(k, s, d), y, f0, t, h, params, weights).reshape(k, s * d)

        def jac(z: torch.Tensor) -> torch.Tensor:
            return self._jacobian(z.reshape(k, s, d), t, h, params, weights, simplified=False)

        def simple_jac(z: torch.Tensor) -> torch.Tensor:
            return self._jacobian(z.reshape(k, s, d), t, h, params, weights, simplified=True)

        z0 = Y0.reshape(k, s * d)
        with torch.no_grad():
            if opts.solver == "newton":
                # The previous step's factors are a fine simplified-Newton matrix while h is unchanged.
                lu = self.lu if self.lu_h == float(h) and self.lu is not None and self.lu[0].shape[0] == k else None
                z, self.lu, its = newton(res, simple_jac, z0, tol=tol, max_iter=opts.newton_max_iter, lu=lu,
                                         refresh=jac)
                self.lu_h = float(h)
                self.newton_iterations += its
            elif opts.solver == "scipy":
                z = scipy_root(res, jac, z0, tol)
            else:
                z = _call_user_solver(opts.solver, res, z0)
        return z.reshape(k, s, d)


def _check_by_doubling(run: _Integration, y, f0, Y, t, h, P, W) -> None:
    """Compare the step's end value with two half steps' (each from its own start value); a gross
    disagreement (beyond a quarter of the solution's size, per component, and 1e-2 of the instance's largest
    value) means the stage equations' root is not the one connected to y_n: SolverError, so the step is
    halved. The simplified-Newton factors of the full step are kept for the next one."""
    k, s, d = Y.shape
    saved = run.lu, run.lu_h
    try:
        with torch.no_grad():
            half = 0.5 * h
            # Only a gross disagreement counts: the half steps are solved to 1e-6, not the step's tolerance.
            loose = max(run.tol, 1e-6)
            y_mid = run.solve_stages(y, f0, y[:, None].expand(k, s, d).clone(), t, half, P, W, loose)[:, -1]
            f_mid = run.field(t + half, y_mid, P, W) if f0 is not None else None
            y_half = run.solve_stages(y_mid, f_mid, y_mid[:, None].expand(k, s, d).clone(), t + half, half, P,
                                      W, loose)[:, -1]
    finally:
        run.lu, run.lu_h = saved
    y_full = Y[:, -1].detach()
    size = torch.maximum(torch.maximum(y.detach().abs(), y_full.abs()), y_half.abs())
    floor = 1e-2 * size.amax(dim=1, keepdim=True)
    gap = (y_full - y_half).abs()
    bad = ~(gap <= 0.25 * size + floor)
    if bool(bad.any()):
        row, col = (int(i) for i in torch.nonzero(bad)[0])
        raise SolverError(
            f"the step from t = {float(t):.6g} (h = {float(h):.3g}) and two half steps disagree (component {col} "
            f"of row {row}: {float(y_full[row, col]):.6g} against {float(y_half[row, col]):.6g}): the stage "
            "equations have several roots and the full step found one not connected to y_n."
        )


def _call_user_solver(solver: Callable, res: Callable, z0: torch.Tensor) -> torch.Tensor:
    try:
        z = solver(res, z0)
    except Exception as err:
        raise SolverError(f"The user's ODE step solver {solver!r} raised {type(err).__name__}: {err}") from err
    z = torch.as_tensor(z, dtype=z0.dtype, device=z0.device)
    if z.shape != z0.shape:
        raise SolverError(
            f"The user's ODE step solver returned shape {tuple(z.shape)}; expected {tuple(z0.shape)} "
            "(the shape of the starting point it received)."
        )
    return z


def _crosses_zero(Y: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether a stage value has the opposite sign of y_n in a component where y_n is clearly nonzero."""
    floor = 1e3 * torch.finfo(y.dtype).eps * (1.0 + y.abs().amax(dim=1, keepdim=True))
    clear = y.abs() > floor
    return bool(((Y * y[:, None] < 0) & clear[:, None]).any())


class _StepCall(engine.Call):
    """One step for the engine: params (y_n, [f0,] t_n, h, *params, *weights); unknowns the stages."""

    structure = "general"
    independent = False
    coupling_hint = ("func couples the rows. Use batch_dims=0 (one system), or make func act on each row of y "
                     "independently.")

    def __init__(self, run: _Integration, has_f0: bool, n_params: int, n_weights: int, prev) -> None:
        batched = (True,) * (2 if has_f0 else 1) + (False,) * (2 + n_params + n_weights)
        super().__init__(run.options, batched, f"ODE step ({run.opts.method})")
        self.run_, self.has_f0, self.n_params, self.prev = run, has_f0, n_params, prev
        self.foldable = run.field.batch_dims == 1

    def split(self, params):
        params = list(params)
        y = params.pop(0)
        f0 = params.pop(0) if self.has_f0 else None
        t, h = params[0], params[1]
        rest = params[2:]
        return y, f0, t, h, rest[: self.n_params], rest[self.n_params :]

    def answers(self, params: list[torch.Tensor]) -> engine.Answers:
        run = self.run_
        y, f0, t, h, P, W = self.split(params)
        k, s, d = y.shape[0], run.tab.s, run.field.d
        safe = y[:, None].expand(k, s, d).clone()
        start = safe
        if self.prev is not None and self.prev[0].shape[0] == k:
            y_prev, Y_prev, h_prev = self.prev
            pred = torch.stack([dense_output(run.tab.c, y_prev, Y_prev, 1.0 + cj * float(h) / h_prev)
                                for cj in run.tab.c], dim=1)
            if not _crosses_zero(pred, y):
                with torch.no_grad():
                    r_pred = run.residual(pred, y, f0, t, h, P, W).abs().amax()
                    r_safe = run.residual(safe, y, f0, t, h, P, W).abs().amax()
                if bool(r_pred <= r_safe):
                    start = pred
        Y = run.solve_stages(y, f0, start, t, h, P, W)
        if start is not safe and _crosses_zero(Y, y):
            # A predictor can lead Newton to a non-physical root of the stage equations (Robertson's y2 < 0):
            # the root reached from y_n is the one connected to the solution; keep it if they differ.
            Y_safe = run.solve_stages(y, f0, safe, t, h, P, W)
            if float((Y - Y_safe).abs().max()) > 1e4 * run.tol * (1.0 + float(Y.abs().max())):
                Y = Y_safe
        if run.opts.step_check == "doubling":
            _check_by_doubling(run, y, f0, Y, t, h, P, W)
        return engine.Answers(Y.reshape(k, s * d), (), torch.ones(k, dtype=torch.bool, device=y.device))

    def residual_fn(self):
        run = self.run_

        def residual(Z: torch.Tensor, aux, params, batched) -> torch.Tensor:
            y, f0, t, h, P, W = self.split(params)
            k = Z.shape[0]
            return run.residual(Z.reshape(k, run.tab.s, run.field.d), y, f0, t, h, P, W).reshape(k, -1)

        return residual

    def scale_fn(self):
        """The size of the terms of each stage equation, exactly and without derivatives:
        |Y_i| + |y_n| + |h| sum_j |a_ij| |f(Y_j)| (+ |h a0_i| |f0|). (The engine's generic estimate takes a few
        double-VJP probes of F, which cost more than the step's Newton solve.)"""
        run = self.run_

        def scale(Z: torch.Tensor, aux, params, batched) -> torch.Tensor:
            y, f0, t, h, P, W = self.split(params)
            k, s, d = Z.shape[0], run.tab.s, run.field.d
            Y = Z.reshape(k, s, d)
            with torch.no_grad():
                F = run.stage_rhs(Y, t, h, P, W)
                A = run.tab.A.to(dtype=Y.dtype, device=Y.device).abs()
                hs = abs(float(h))
                terms = Y.abs() + y.abs()[:, None] + hs * torch.einsum("ij,bjd->bid", A, F.abs())
                if f0 is not None:
                    a0 = run.tab.a0.to(dtype=Y.dtype, device=Y.device).abs()
                    terms = terms + hs * a0[None, :, None] * f0.abs()[:, None]
            return terms.reshape(k, -1)

        return scale

    def fresh(self, batched):
        if not self.foldable:
            raise BlackBoxDiffError(
                "torch.func.vmap over odeint is supported only for batch_dims=1 (rows of y0 as independent "
                "systems); batch the initial states along dimension 0 with batch_dims=1 instead of vmap."
            )
        return super().fresh(batched)


# --------------------------------------------------------------------------------------------------
@torch.compiler.disable
def odeint(func: Callable, y0: torch.Tensor, t: Any, *params: Any, **options: Any) -> torch.Tensor:
    """Integrate ``dy/dt = func(t, y, *params)`` with an implicit one-step method, differentiably.

    Args:
        func: the vector field, ``func(t, y, *params) -> dy/dt`` with the shape and dtype of y
            (torchdiffeq's convention). The weights of an nn.Module field (or of the module owning a
            bound-method field) are lifted into the autograd core (every derivative); other trainable tensors
            it reaches by closure get first-order gradients.
        y0: initial state, any shape (leading `batch_dims` dimensions index independent systems).
        t: 1-D increasing or decreasing output times (tensor, array or list); t[0] is the start. A tensor
            that requires grad gets the gradient of the discretised solution with respect to the times.
        *params: tensors passed to func after y; they receive gradients.
        **options: see `OdeOptions`: method ('backward_euler', 'trapezoid', 'radau3', 'radau5'),
            solver, linear_solver, step_size or substeps, batch_dims, newton_tol, newton_max_iter.

    Returns:
        y at every output time, shape ``(len(t), *y0.shape)``; ``out[0]`` is y0.

    Raises:
        InputError: malformed y0, t, func or options. SolverError: a step's root finder failed even after
            halving that step 6 times (a failed step is replaced by two half steps).
        CertificationError: a step's answer (e.g. from a user solver) does not satisfy the stage equations.
        LinearSolveError: an adjoint solve did not converge (backward).
    """
    opts = parse_options(options, OdeOptions)
    if not (opts.solver in ("newton", "scipy") or callable(opts.solver)):
        raise InputError(
            f"odeint: solver must be 'newton', 'scipy' or a callable solver(F, Y0) -> Y; got {opts.solver!r}."
        )
    y0 = _check_y0(y0, opts)
    params = [_check_param(i, p, y0) for i, p in enumerate(params)]
    tt = _times(t, y0)
    lifted = engine.lift(func)
    weights = [] if lifted is None else lifted.tensors
    field = _Field(func, y0.shape, opts.batch_dims, lifted)
    run = _Integration(field, Tableau(opts.method), opts, y0.dtype)
    y = y0.reshape(field.B, field.d)
    outs: list[torch.Tensor | None] = [y] + [None] * (tt.numel() - 1)
    dense_always = tt.requires_grad
    prev = None
    queue = collections.deque((*step, wanted, 0) for step, wanted in _grid(tt, opts))
    while queue:
        t_n, h, wanted, halvings = queue.popleft()
        try:
            Y = _step(run, y, t_n, h, params, weights, prev)
        except SolverError as err:
            # A step whose root finder fails is replaced by two half steps (the outputs it owed are
            # re-addressed); each half is again one root problem, so the IFT gradient is unchanged in kind.
            if halvings >= _MAX_HALVINGS:
                raise SolverError(
                    f"odeint: the step at t = {float(t_n):.6g} failed even after halving it {halvings} times (h = "
                    f"{float(h):.3g}): {err} The solution may blow up there (check func and y0), or the problem "
                    "is too stiff for this step: try more substeps or a smaller step_size."
                ) from err
            run.lu = None
            first = [(k, 2.0 * th) for k, th in wanted if float(th) <= 0.5 + 1e-12]
            second = [(k, 2.0 * th - 1.0) for k, th in wanted if float(th) > 0.5 + 1e-12]
            queue.appendleft((t_n + 0.5 * h, 0.5 * h, second, halvings + 1))
            queue.appendleft((t_n, 0.5 * h, first, halvings + 1))
            continue
        y_new = Y[:, -1]
        for k, theta in wanted:
            at_end = not torch.is_tensor(theta) and theta > 1.0 - 1e-12
            outs[k] = y_new if (at_end and not dense_always) else dense_output(run.tab.c, y, Y, theta)
        prev = y.detach(), Y.detach(), float(h)
        y = y_new
    return torch.stack(outs).reshape(tt.numel(), *y0.shape)


def _step(run: _Integration, y: torch.Tensor, t_n, h, params, weights, prev) -> torch.Tensor:
    """One step through the engine: the stage values (B, s, d), differentiable."""
    f0 = run.field(t_n, y, params, weights) if run.tab.explicit_first else None
    inputs = [y] + ([f0] if f0 is not None else []) + [t_n, h, *params, *weights]
    call = _StepCall(run, f0 is not None, len(params), len(weights), prev)
    Z, _ = engine.apply(call, inputs)
    return Z.reshape(y.shape[0], run.tab.s, run.field.d)


def _grid(tt: torch.Tensor, opts: OdeOptions) -> list[tuple[tuple[torch.Tensor, torch.Tensor], list]]:
    """The steps ((t_n, h) as 0-dim tensors, differentiable in t) and, per step, the outputs
    (index, theta) it produces at t_n + theta h.

    Without step_size every output interval is split into `substeps` equal steps. With step_size the
    grid is uniform over [t_0, t_end] and outputs between grid points come from the collocation
    polynomial (dense output), so output times never force extra steps.
    """
    n_out = tt.numel()
    out: list = []
    if n_out < 2:
        return out
    if opts.step_size is None:
        for k in range(1, n_out):
            h = (tt[k] - tt[k - 1]) / opts.substeps
            for j in range(opts.substeps):
                out.append(((tt[k - 1] + j * h, h), [(k, 1.0)] if j == opts.substeps - 1 else []))
        return out
    span = tt[-1] - tt[0]
    n = max(1, math.ceil(abs(float(span)) / opts.step_size - 1e-9))
    h = span / n
    wanted: dict[int, list] = {}
    for k in range(1, n_out):
        x = float((tt[k] - tt[0]) / h)
        i = min(n - 1, max(0, math.ceil(x - 1e-9) - 1))
        theta = (tt[k] - tt[0]) / h - i if tt.requires_grad else min(1.0, x - i)
        wanted.setdefault(i, []).append((k, theta))
    return [((tt[0] + j * h, h), wanted.get(j, [])) for j in range(n)]


def _check_y0(y0: Any, opts: OdeOptions) -> torch.Tensor:
    if not torch.is_tensor(y0) or not y0.is_floating_point():
        raise InputError(
            f"odeint: y0 must be a floating-point torch.Tensor; got {type(y0).__name__}"
            f"{'' if not torch.is_tensor(y0) else ' of dtype ' + str(y0.dtype)}. Convert it with "
            "torch.as_tensor(y0, dtype=torch.float64)."
        )
    if opts.batch_dims > y0.dim():
        raise InputError(
            f"odeint: batch_dims={opts.batch_dims} but y0 has only {y0.dim()} dimensions; expected "
            "batch_dims <= y0.dim()."
        )
    if y0.numel() == 0:
        raise InputError(f"odeint: y0 is empty (shape {tuple(y0.shape)}); expected at least one state variable.")
    return y0


def _check_param(i: int, p: Any, y0: torch.Tensor) -> torch.Tensor:
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return torch.tensor(float(p), dtype=y0.dtype, device=y0.device)
    if not torch.is_tensor(p) or not p.is_floating_point():
        raise InputError(
            f"odeint: parameter {i} must be a floating-point tensor (or a number); got {type(p).__name__}. Pass "
            "non-numeric settings through a closure."
        )
    return p


def _times(t: Any, y0: torch.Tensor) -> torch.Tensor:
    """The output times as a 1-D tensor of y0's dtype (keeping t's graph when it requires grad).

    Values are read with `tolist` (which torch.func's grad-level tensors allow), never through numpy.
    """
    try:
        tt = t if torch.is_tensor(t) else torch.as_tensor(np.asarray(t, dtype=np.float64))
        values = tt.detach().reshape(-1).tolist() if tt.dim() <= 1 else None
    except (TypeError, ValueError):
        values = None
    if values is None or not values or not all(math.isfinite(v) for v in values):
        raise InputError(
            f"odeint: t must be a non-empty 1-D sequence of finite times; got {t!r:.80}. Pass e.g. "
            "torch.linspace(0, 1, 11)."
        )
    diffs = np.diff(values)
    if diffs.size and not (np.all(diffs > 0) or np.all(diffs < 0)):
        raise InputError("odeint: t must be strictly increasing or strictly decreasing; got repeated or "
                         "unordered times. Sort the output times.")
    return tt.reshape(-1).to(dtype=y0.dtype, device=y0.device)
