"""Implicit ODE layers: one-step implicit Runge-Kutta methods differentiated step by step by the IFT.

`odeint(func, y0, t, *params, method=...)` integrates ``dy/dt = func(t, y, *params)``. Each step's stage
values Y (one stage for backward Euler and the trapezoidal rule, two for Radau IIA order 3, three for
Radau IIA order 5) solve the collocation equations

    F(Y, y_n, params) = Y_i - y_n - h sum_j a_ij f(t_n + c_j h, Y_j) = 0,

a `bbd.Root` condition per step whose root is found by a black box: Newton in torch (default),
`scipy.optimize.root`, or any ``solver(F, Y0) -> Y``. The step's output is ``Y* - (G - G.detach())`` with
``G = _StepAdjoint(F(Y*, y_n, params))`` (the construction of `bbd.implicit`): its backward solves
``(dF/dY)^T u = dL/dY*`` with a batched linear solve (dense block-diagonal for small states, GMRES, or CG
on the normal equations as in the Differentiable Implicit Layers poster) and then runs the ordinary
autograd graph of one evaluation of F. Memory is O(steps x stages x state), never O(Newton iterations),
and parameters that `func` captures by closure (an nn.Module's weights) receive gradients too.

All methods are stiffly accurate (y_{n+1} is the last stage), so y_{n+1} = Y*_s. The gradient is the
exact gradient of the discretisation (the "discretise-then-optimise" adjoint), up to the Newton and
linear-solve tolerances.

`solve_ivp_layer` is a different black box: `scipy.integrate.solve_ivp` (RK45, Radau, BDF, LSODA...)
with the forward sensitivity equations S' = (df/dy) S + df/dp integrated by the same scipy integrator.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from blackbox_diff._errors import InputError, LinearSolveError, SolverError
from blackbox_diff._ivp import solve_ivp_layer
from blackbox_diff._options import parse_options

__all__ = ["METHODS", "OdeOptions", "newton", "odeint", "solve_ivp_layer"]

_S6 = math.sqrt(6.0)
# Butcher tableaux (A, c) of stiffly accurate implicit Runge-Kutta methods; b is the last row of A.
_TABLEAUX: dict[str, tuple[list[list[float]], list[float], int]] = {
    "backward_euler": ([[1.0]], [1.0], 1),
    # Lobatto IIIA with two stages: the first stage is explicit (Y_1 = y_n).
    "trapezoid": ([[0.0, 0.0], [0.5, 0.5]], [0.0, 1.0], 2),
    "radau3": ([[5 / 12, -1 / 12], [3 / 4, 1 / 4]], [1 / 3, 1.0], 3),
    "radau5": (
        [
            [(88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225],
            [(296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225],
            [(16 - _S6) / 36, (16 + _S6) / 36, 1 / 9],
        ],
        [(4 - _S6) / 10, (4 + _S6) / 10, 1.0],
        5,
    ),
}
METHODS: dict[str, int] = {name: order for name, (_, _, order) in _TABLEAUX.items()}
"""The implicit methods of `odeint` and their order of convergence."""
# A step whose Newton iteration fails is halved, at most this many times in a row.
_MAX_HALVINGS = 6


class OdeOptions(BaseModel):
    """Options of `odeint` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    method: Literal["backward_euler", "trapezoid", "radau3", "radau5"] = Field(
        "radau5", description="Implicit Runge-Kutta method (order 1, 2, 3, 5)."
    )
    solver: Any = Field(
        "newton",
        description="Per-step root finder: 'newton' (torch), 'scipy' (scipy.optimize.root, hybr), or a "
        "callable solver(F, Y0) -> Y with F mapping a (B, n) tensor to a (B, n) residual.",
    )
    linear_solver: Literal["auto", "dense", "gmres", "cg"] = Field(
        "auto",
        description="Adjoint solve per step: 'dense' (batched block-diagonal LU), 'gmres', 'cg' (CG on the "
        "normal equations J J^T, as in the DIL poster); 'auto' is dense up to dense_max_size unknowns per "
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
        "by row, like an MLP on a batch): Newton and adjoint solves become batched block-diagonal.",
    )
    newton_tol: float | None = Field(
        None, gt=0.0, description="Newton stops at max|F| <= tol (1 + max|Y|); None: 1e-11 (float64), 1e-5."
    )
    newton_max_iter: int = Field(20, ge=1, description="Newton iteration cap per step.")
    rtol: float = Field(1e-10, ge=0.0, description="Relative tolerance of iterative adjoint solves.")
    dense_max_size: int = Field(64, ge=0, description="'auto' solves densely up to this many unknowns.")


# --------------------------------------------------------------------------------------------------
# Newton in torch (the default per-step black box)
# --------------------------------------------------------------------------------------------------
def newton(
    residual: Callable[[torch.Tensor], torch.Tensor],
    jacobian: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    tol: float,
    max_iter: int = 20,
    lu: tuple[torch.Tensor, torch.Tensor] | None = None,
    refresh: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
    """Batched (simplified) Newton for ``residual(z) == 0``, z of shape (B, n), Jacobians (B, n, n).

    Starts from the LU factors `lu` when given (e.g. the previous step's) or of ``jacobian(z0)``, and
    re-factors ``refresh(z)`` (default: ``jacobian``; e.g. an exact Jacobian where `jacobian` is a cheap
    approximation) at the current iterate whenever the residual contracted by less than 4x in the last
    step, so easy steps cost no Jacobian and hard ones converge quadratically.

    Returns:
        (z, lu, iterations): the root, the factors last used (to pass to the next call), the count.

    Raises:
        SolverError: no convergence to ``max|F| <= tol (1 + max|z|)`` within ``max_iter`` iterations
            (a residual stuck within 1e3 x that bound after an exact-Jacobian step counts as converged).
    """
    z = z0
    prev = None
    fresh = False
    err = z0.new_full((1,), float("nan"))
    for k in range(max_iter + 1):
        r = residual(z)
        err = r.abs().amax(dim=1)
        if not bool(torch.isfinite(err).all()):
            break
        bound = tol * (1.0 + z.abs().amax(dim=1))
        if bool((err <= bound).all()):
            return z, lu, k
        # Round-off floor: an exact-Jacobian step that no longer reduces a residual already within
        # 1e3 x tolerance cannot do better in this arithmetic (large |h f| terms); accept it.
        if fresh and prev is not None and bool((err <= 1e3 * bound).all()) and bool((err > 0.5 * prev).any()):
            return z, lu, k
        if k == max_iter:
            break
        slow = prev is not None and bool((err > 0.25 * prev).any())
        if lu is None:
            lu = _lu(jacobian(z))
            fresh = True
        elif slow and not fresh:
            lu = _lu((refresh or jacobian)(z))
            fresh = True
        else:
            fresh = False
        z = z - torch.linalg.lu_solve(lu[0], lu[1], r.unsqueeze(-1)).squeeze(-1)
        prev = err
    raise SolverError(
        f"Newton did not converge in {max_iter} iterations (max|F| = {err.max().item():.3g}, tolerance "
        f"{tol:.3g}). Use a smaller step_size, more newton_max_iter, or a looser newton_tol."
    )


def _lu(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    LU, piv, info = torch.linalg.lu_factor_ex(J)
    if bool((info != 0).any()) or not bool(torch.isfinite(LU).all()):
        raise SolverError(
            "Newton: the step's Jacobian I - h A (x) df/dy is singular or not finite at batch instances "
            f"{torch.nonzero(info).flatten().tolist()}. Use a smaller step_size."
        )
    return LU, piv


def _scipy_root(residual: Callable, jacobian: Callable, z0: torch.Tensor, tol: float) -> torch.Tensor:
    import scipy.linalg
    import scipy.optimize

    shape, like = z0.shape, z0

    def fun(x: np.ndarray) -> np.ndarray:
        z = torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(shape)
        return residual(z).reshape(-1).detach().cpu().double().numpy()

    def jac(x: np.ndarray) -> np.ndarray:
        z = torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(shape)
        return scipy.linalg.block_diag(*jacobian(z).detach().cpu().double().numpy())

    sol = scipy.optimize.root(fun, z0.reshape(-1).cpu().double().numpy(), jac=jac, method="hybr", tol=tol)
    if not sol.success:
        raise SolverError(f"scipy.optimize.root (hybr) failed on an ODE step: {sol.message}")
    return torch.as_tensor(sol.x, dtype=like.dtype, device=like.device).reshape(shape)


# --------------------------------------------------------------------------------------------------
# The step system
# --------------------------------------------------------------------------------------------------
class _System:
    """f on flat states (B, d), the tableau, and the step residual/Jacobian on stage values (B, s, d)."""

    def __init__(self, func: Callable, shape: torch.Size, batch_dims: int, params: tuple, opts: OdeOptions):
        self.func, self.shape, self.params, self.opts = func, shape, params, opts
        self.B = math.prod(shape[:batch_dims])
        self.d = math.prod(shape[batch_dims:])
        A, c, _ = _TABLEAUX[opts.method]
        self.explicit_first = all(a == 0.0 for a in A[0])
        first = 1 if self.explicit_first else 0
        self.A = torch.tensor([row[first:] for row in A[first:]], dtype=torch.float64)
        self.a0 = torch.tensor([row[0] for row in A[first:]], dtype=torch.float64)
        self.c = [float(x) for x in c[first:]]
        self.s = len(self.c)
        self.lu: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lu_h = float("nan")
        self.newton_iterations = 0
        self.iterations = 0
        # Whether the per-row (block-diagonal) Jacobian was checked against the exact one; only rows
        # that may interact need the check.
        self.verified = batch_dims == 0 or self.B == 1

    def f(self, t: float, y: torch.Tensor) -> torch.Tensor:
        out = self.func(torch.as_tensor(t, dtype=y.dtype, device=y.device), y.reshape(self.shape), *self.params)
        if out.shape != self.shape:
            raise InputError(
                f"func(t, y, *params) returned shape {tuple(out.shape)}; expected the shape of y, "
                f"{tuple(self.shape)}."
            )
        return out.reshape(self.B, self.d)

    def jac_f(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """Per-instance Jacobians df/dy (B, d, d) by d batched VJPs (rows of a batch are independent)."""
        with torch.enable_grad():
            yl = y.detach().requires_grad_(True)
            out = self.f(t, yl)
            eye = torch.eye(self.d, dtype=y.dtype, device=y.device)
            V = eye[:, None, :].expand(self.d, self.B, self.d)
            try:
                # retain_graph: the graph must survive a failed batched attempt for the fallback below.
                (rows,) = torch.autograd.grad(out, yl, V, is_grads_batched=True, allow_unused=True, retain_graph=True)
            except RuntimeError:  # an op without a batching rule: one VJP per row of the Jacobian
                rows = torch.stack(
                    [torch.autograd.grad(out, yl, V[k], retain_graph=True, allow_unused=True)[0]
                     for k in range(self.d)]
                ) if out.requires_grad else None
        if rows is None:
            return y.new_zeros(self.B, self.d, self.d)
        return rows.transpose(0, 1)

    def residual(self, Y: torch.Tensor, y: torch.Tensor, f0: torch.Tensor | None, t: float, h: float):
        """F(Y) = Y_i - y_n - h sum_j a_ij f(t + c_j h, Y_j) (B, s, d)."""
        F = torch.stack([self.f(t + cj * h, Y[:, j]) for j, cj in enumerate(self.c)], dim=1)
        A = self.A.to(dtype=Y.dtype, device=Y.device)
        R = Y - y[:, None] - h * torch.einsum("ij,bjd->bid", A, F)
        if f0 is not None:
            R = R - h * self.a0.to(dtype=Y.dtype, device=Y.device)[None, :, None] * f0[:, None]
        return R

    def jacobian(self, Y: torch.Tensor, t: float, h: float) -> torch.Tensor:
        """dF/dY per instance, (B, s d, s d): I - h a_ij df/dy(Y_j)."""
        s, d, B = self.s, self.d, self.B
        Jf = torch.stack([self.jac_f(t + cj * h, Y[:, j]) for j, cj in enumerate(self.c)], dim=1)  # B s d d
        A = self.A.to(dtype=Y.dtype, device=Y.device)
        J = -h * A[None, :, :, None, None] * Jf[:, None]  # B i j d d
        J = J.permute(0, 1, 3, 2, 4).reshape(B, s * d, s * d)
        return J + torch.eye(s * d, dtype=Y.dtype, device=Y.device)

    def simplified_jacobian(self, Y: torch.Tensor, t: float, h: float) -> torch.Tensor:
        """I - h A (x) df/dy(Y_s): every stage's Jacobian replaced by the last stage's (simplified Newton)."""
        s, d, B = self.s, self.d, self.B
        Jf = self.jac_f(t + h, Y[:, -1])
        A = self.A.to(dtype=Y.dtype, device=Y.device)
        J = -h * A[None, :, :, None, None] * Jf[:, None, None]
        J = J.permute(0, 1, 3, 2, 4).reshape(B, s * d, s * d)
        return J + torch.eye(s * d, dtype=Y.dtype, device=Y.device)

    def solve_stages(self, y: torch.Tensor, f0, Y0: torch.Tensor, t: float, h: float) -> torch.Tensor:
        B, s, d = self.B, self.s, self.d
        opts = self.opts
        tol = opts.newton_tol or (1e-10 if y.dtype == torch.float64 else 1e-5)

        def res(z: torch.Tensor) -> torch.Tensor:
            return self.residual(z.reshape(B, s, d), y, f0, t, h).reshape(B, s * d)

        def jac(z: torch.Tensor) -> torch.Tensor:
            return self.jacobian(z.reshape(B, s, d), t, h)

        def simple_jac(z: torch.Tensor) -> torch.Tensor:
            return self.simplified_jacobian(z.reshape(B, s, d), t, h)

        z0 = Y0.reshape(B, s * d)
        with torch.no_grad():
            if opts.solver == "newton":
                # The previous step's factors are a fine simplified-Newton matrix while h is unchanged.
                lu = self.lu if self.lu_h == h else None
                z, self.lu, self.iterations = newton(
                    res, simple_jac, z0, tol=tol, max_iter=opts.newton_max_iter, lu=lu, refresh=jac
                )
                self.lu_h = h
                self.newton_iterations += self.iterations
            elif opts.solver == "scipy":
                z = _scipy_root(res, jac, z0, tol)
            else:
                z = _call_user_solver(opts.solver, res, z0)
        return z.reshape(B, s, d)


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


# --------------------------------------------------------------------------------------------------
# The per-step IFT
# --------------------------------------------------------------------------------------------------
class _StepAdjoint(torch.autograd.Function):
    """Identity on F's value; backward maps the cotangent g (B, s, d) to u with (dF/dY)^T u = g."""

    @staticmethod
    def forward(ctx, R, system, Y, y, f0, t, h):  # noqa: D102
        ctx.system, ctx.Y, ctx.y, ctx.f0, ctx.t, ctx.h = system, Y, y, f0, t, h
        return R.view_as(R)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        u = _adjoint_solve(ctx.system, ctx.Y, ctx.y, ctx.f0, ctx.t, ctx.h, g)
        return u, None, None, None, None, None, None


def _adjoint_solve(system: _System, Y, y, f0, t, h, g: torch.Tensor) -> torch.Tensor:
    B, s, d = system.B, system.s, system.d
    n = s * d
    method = system.opts.linear_solver
    if method == "auto":
        method = "dense" if n <= system.opts.dense_max_size else "gmres"
    g2 = g.reshape(B, n)
    if method == "dense":
        with torch.no_grad():
            J = system.jacobian(Y, t, h)
        u = torch.linalg.solve(J.transpose(1, 2), g2.unsqueeze(-1)).squeeze(-1)
        if not system.verified:
            _verify_block_jacobian(system, Y, y, f0, t, h, u, g2)
        return u.reshape(B, s, d)
    from blackbox_diff import linalg

    with torch.enable_grad():
        Yl = Y.detach().reshape(B, n).requires_grad_(True)
        R = system.residual(Yl.reshape(B, s, d), y.detach(), None if f0 is None else f0.detach(), t, h)
        R = R.reshape(B, n)

        def jt(v: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(R, Yl, v, retain_graph=True)[0]

        if method == "gmres":
            sol = linalg.gmres(jt, g2, rtol=system.opts.rtol)
        else:  # CG on the normal equations J J^T u = J g (J v by the double-VJP trick)
            w = torch.zeros_like(g2, requires_grad=True)
            (JTw,) = torch.autograd.grad(R, Yl, w, create_graph=True)

            def jv(v: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(JTw, w, v, retain_graph=True)[0]

            sol = linalg.cg(lambda v: jv(jt(v)), jv(g2), rtol=system.opts.rtol)
    if not bool(sol.converged.all()):
        raise LinearSolveError(
            f"The per-step adjoint solve ({method}) did not converge: {sol.summary()}. Use "
            "linear_solver='dense' for small states or a smaller step_size."
        )
    return sol.x.reshape(B, s, d)


def _verify_block_jacobian(system: _System, Y, y, f0, t, h, u: torch.Tensor, g: torch.Tensor) -> None:
    """Once per call (the last step, first in the backward): the dense solve used per-row Jacobians
    (batch_dims); check J^T u = g with the exact operator (one VJP through the whole batch), so that a
    func coupling the rows fails loudly instead of silently. A probe, not a proof: a cotangent blind to
    the coupling (e.g. uniform over rows, for which the per-row answer happens to be right) passes."""
    system.verified = True
    B, s, d = system.B, system.s, system.d
    with torch.enable_grad():
        Yl = Y.detach().requires_grad_(True)
        R = system.residual(Yl, y.detach(), None if f0 is None else f0.detach(), t, h)
        (JTu,) = torch.autograd.grad(R, Yl, u.reshape(B, s, d))
    err = (JTu.reshape(B, -1) - g).norm()
    tol = (1e-6 if g.dtype == torch.float64 else 1e-3) * (g.norm() + JTu.norm())
    if bool(err > tol):
        raise InputError(
            f"odeint: with batch_dims={system.opts.batch_dims}, the adjoint solve assumed that func acts on "
            f"each of the {B} leading-dimension rows independently, but the exact Jacobian disagrees "
            f"(residual {err.item():.3g} > {tol.item():.3g}): func couples the rows. Use batch_dims=0 (one "
            "system), or linear_solver='gmres'."
        )


# --------------------------------------------------------------------------------------------------
# odeint
# --------------------------------------------------------------------------------------------------
def odeint(func: Callable, y0: torch.Tensor, t: Any, *params: Any, **options: Any) -> torch.Tensor:
    """Integrate ``dy/dt = func(t, y, *params)`` with an implicit one-step method, differentiably.

    Args:
        func: the vector field, ``func(t, y, *params) -> dy/dt`` with the shape of y (torchdiffeq's
            convention); weights it captures by closure receive gradients.
        y0: initial state, any shape (leading `batch_dims` dimensions index independent systems).
        t: 1-D increasing or decreasing output times (tensor, array or list); t[0] is the start. The
            times are data: no gradient flows to them.
        *params: tensors passed to func after y; they receive gradients.
        **options: see `OdeOptions`: method ('backward_euler', 'trapezoid', 'radau3', 'radau5'),
            solver, linear_solver, step_size or substeps, batch_dims, newton_tol, newton_max_iter.

    Returns:
        y at every output time, shape ``(len(t), *y0.shape)``; ``out[0]`` is y0.

    Raises:
        InputError: malformed y0, t or options. SolverError: a step's root finder failed even after
            halving that step 6 times (a failed step is replaced by two half steps).
        LinearSolveError: an iterative adjoint solve did not converge (backward).
    """
    opts = parse_options(options, OdeOptions)
    if not (opts.solver in ("newton", "scipy") or callable(opts.solver)):
        raise InputError(
            f"odeint: solver must be 'newton', 'scipy' or a callable solver(F, Y0) -> Y; got {opts.solver!r}."
        )
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
    times = _times(t)
    system = _System(func, y0.shape, opts.batch_dims, params, opts)
    steps, where = _grid(times, opts)
    y = y0.reshape(system.B, system.d)
    outs: list[torch.Tensor | None] = [y] + [None] * (len(times) - 1)
    prev: tuple[torch.Tensor, torch.Tensor, float] | None = None
    queue = collections.deque((t_n, h, where.get(i, []), 0) for i, (t_n, h) in enumerate(steps))
    while queue:
        t_n, h, wanted, halvings = queue.popleft()
        try:
            Y = _step(system, y, t_n, h, prev)
        except SolverError as err:
            # A step whose root finder fails is replaced by two half steps (the outputs it owed are
            # re-addressed); each half is again one root problem, so the IFT gradient is unchanged in kind.
            if halvings >= _MAX_HALVINGS:
                raise SolverError(
                    f"odeint: the step at t = {t_n:.6g} failed even after halving it {halvings} times (h = "
                    f"{h:.3g}): {err} The problem may blow up there; check func and y0."
                ) from err
            system.lu = None
            first = [(k, 2.0 * th) for k, th in wanted if th <= 0.5 + 1e-12]
            second = [(k, 2.0 * th - 1.0) for k, th in wanted if th > 0.5 + 1e-12]
            queue.appendleft((t_n + 0.5 * h, 0.5 * h, second, halvings + 1))
            queue.appendleft((t_n, 0.5 * h, first, halvings + 1))
            continue
        y_new = Y[:, -1]
        for k, theta in wanted:
            outs[k] = y_new if theta > 1.0 - 1e-12 else _dense_output(system, y, Y, theta)
        prev = y.detach(), Y.detach(), h
        y = y_new
    return torch.stack(outs).reshape(len(times), *y0.shape)


def _grid(times: list[float], opts: OdeOptions) -> tuple[list[tuple[float, float]], dict[int, list]]:
    """The steps (t_n, h) and, per step, the outputs (index, theta) it produces at t_n + theta h.

    Without step_size every output interval is split into `substeps` equal steps. With step_size the
    grid is uniform over [t_0, t_end] and outputs between grid points come from the collocation
    polynomial (dense output), so output times never force extra steps.
    """
    steps: list[tuple[float, float]] = []
    where: dict[int, list] = {}
    if len(times) < 2:
        return steps, where
    if opts.step_size is None:
        for k, (t_a, t_b) in enumerate(zip(times[:-1], times[1:], strict=True), start=1):
            h = (t_b - t_a) / opts.substeps
            steps += [(t_a + j * h, h) for j in range(opts.substeps)]
            where[len(steps) - 1] = [(k, 1.0)]
        return steps, where
    span = times[-1] - times[0]
    n = max(1, math.ceil(abs(span) / opts.step_size - 1e-9))
    h = span / n
    steps = [(times[0] + j * h, h) for j in range(n)]
    for k, tk in enumerate(times[1:], start=1):
        x = (tk - times[0]) / h
        i = min(n - 1, max(0, math.ceil(x - 1e-9) - 1))
        where.setdefault(i, []).append((k, min(1.0, x - i)))
    return steps, where


def _dense_output(system: _System, y: torch.Tensor, Y: torch.Tensor, theta: float) -> torch.Tensor:
    """The collocation polynomial through (0, y_n), (c_j, Y_j) at t_n + theta h (Lagrange form)."""
    nodes = [0.0, *system.c]
    values = [y, *Y.unbind(1)]
    out = torch.zeros_like(y)
    for i, (xi, v) in enumerate(zip(nodes, values, strict=True)):
        w = 1.0
        for j, xj in enumerate(nodes):
            if j != i:
                w *= (theta - xj) / (xi - xj)
        out = out + w * v
    return out


def _times(t: Any) -> list[float]:
    tt = torch.as_tensor(t).detach().reshape(-1) if not torch.is_tensor(t) or t.dim() <= 1 else None
    if tt is None or tt.numel() < 1 or not bool(torch.isfinite(tt.double()).all()):
        raise InputError(
            f"odeint: t must be a non-empty 1-D sequence of finite times; got {t!r:.80}. Pass e.g. "
            "torch.linspace(0, 1, 11)."
        )
    times = tt.double().tolist()
    diffs = np.diff(times)
    if diffs.size and not (np.all(diffs > 0) or np.all(diffs < 0)):
        raise InputError("odeint: t must be strictly increasing or strictly decreasing; got repeated or "
                         "unordered times. Sort the output times.")
    return times


def _step(system: _System, y: torch.Tensor, t: float, h: float, prev) -> torch.Tensor:
    need_grad = torch.is_grad_enabled() and (
        y.requires_grad or any(torch.is_tensor(p) and p.requires_grad for p in system.params)
        or _captures_grad(system)
    )
    f0 = None
    if system.explicit_first:
        with torch.set_grad_enabled(need_grad):
            f0 = system.f(t, y)
    # Predictor: extrapolate the previous step's collocation polynomial to this step's nodes (free;
    # Hairer & Wanner's RADAU5 starting values), or y_n + c_j h f(y_n) on the first step.
    yd = y.detach()
    if prev is not None:
        y_prev, Y_prev, h_prev = prev
        Y0 = torch.stack(
            [_dense_output(system, y_prev, Y_prev, 1.0 + cj * h / h_prev) for cj in system.c], dim=1
        )
    else:
        with torch.no_grad():
            slope = f0.detach() if f0 is not None else system.f(t, yd)
        Y0 = torch.stack([yd + (cj * h) * slope for cj in system.c], dim=1)
    Y = system.solve_stages(yd, None if f0 is None else f0.detach(), Y0, t, h)
    if not need_grad:
        return Y
    with torch.enable_grad():
        R = system.residual(Y, y, f0, t, h)
    G = _StepAdjoint.apply(R, system, Y, y.detach(), None if f0 is None else f0.detach(), t, h)
    return Y - (G - G.detach())


def _captures_grad(system: _System) -> bool:
    """Whether func reaches tensors that require grad (e.g. module weights): probe once per call."""
    cached = getattr(system, "_captures", None)
    if cached is None:
        owner = getattr(system.func, "__self__", None) or system.func
        if isinstance(owner, torch.nn.Module):
            cached = any(p.requires_grad for p in owner.parameters())
        else:
            cached = True  # closures may capture anything: build the graph
        system._captures = cached
    return cached
