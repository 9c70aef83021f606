"""`scipy.integrate.solve_ivp` as a differentiable black box.

The trajectory y(t; y0, p) of ``dy/dt = func(t, y, *params)`` is computed by scipy (any method: RK45,
DOP853, Radau, BDF, LSODA). Its derivatives come from the same integrator, never from differentiating
its steps:

* ``sensitivity="forward"`` integrates the forward sensitivity equations alongside y,
  ``S' = (df/dy) S + [0 | df/dp]`` with ``S(t0) = [I | 0]`` (S = dy/d(y0, p)), and the backward is
  ``sum_k S(t_k)^T g_k``. Cost grows with the number of parameters; exact to the integrator tolerance.
* ``sensitivity="adjoint"`` integrates y forward with dense output, then the adjoint equations
  ``lambda' = -(df/dy)^T lambda``, ``mu' = -(df/dp)^T lambda`` backward in time with jumps
  ``lambda += g_k`` at the output times. Cost independent of the number of parameters.

The Jacobians df/dy and df/dp are evaluated by torch (func is written in torch) at float64 on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from blackbox_diff._errors import InputError, SolverError

__all__ = ["solve_ivp_layer"]


class _Field:
    """func on numpy float64, with its Jacobians with respect to y and the flat parameter vector."""

    def __init__(self, func: Callable, params: list[torch.Tensor]) -> None:
        self.func = func
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.P = sum(self.sizes)

    def _unflat(self, p: torch.Tensor) -> list[torch.Tensor]:
        return [q.reshape(s) for q, s in zip(torch.split(p, self.sizes), self.shapes, strict=True)]

    def _f(self, t: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.func(t, y, *self._unflat(p)).reshape(-1)

    def value(self, t: float, y: np.ndarray, p: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self._f(torch.tensor(t, dtype=torch.float64), torch.from_numpy(y), p).numpy()

    def jacobians(self, t: float, y: np.ndarray, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # One forward and one batched reverse sweep (d cotangents at once): far cheaper than
        # torch.func.jacrev's set-up for small d, and this runs at every right-hand-side evaluation.
        tt = torch.tensor(t, dtype=torch.float64)
        yy = torch.from_numpy(np.array(y)).requires_grad_(True)
        pp = p.detach().clone().requires_grad_(True)
        d = yy.numel()
        with torch.enable_grad():
            f = self._f(tt, yy, pp)
            eye = torch.eye(d, dtype=f.dtype)
            try:
                gy, gp = torch.autograd.grad(f, (yy, pp), eye, is_grads_batched=True, allow_unused=True)
            except RuntimeError:  # an op without a batching rule: one sweep per output
                rows = [torch.autograd.grad(f, (yy, pp), eye[i], retain_graph=True, allow_unused=True)
                        for i in range(d)]
                gy = None if rows[0][0] is None else torch.stack([r[0] for r in rows])
                gp = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        Jy = np.zeros((d, d)) if gy is None else gy.numpy()
        Jp = np.zeros((d, self.P)) if gp is None else gp.numpy()
        return f.detach().numpy(), Jy, Jp


def _integrate(rhs, jac, t_span, x0, t_eval, method, rtol, atol, dense=False):
    import scipy.integrate

    sol = scipy.integrate.solve_ivp(
        rhs, t_span, x0, method=method, t_eval=t_eval, rtol=rtol, atol=atol, dense_output=dense,
        **({"jac": jac} if method in ("Radau", "BDF", "LSODA") else {}),
    )
    if not sol.success:
        raise SolverError(f"scipy.integrate.solve_ivp ({method}) failed: {sol.message}", status=sol.status)
    return sol


def _forward_sensitivity(field: _Field, y0, p, t, method, rtol, atol):
    d, P = y0.size, field.P
    m = d + P

    def rhs(tau, x):
        f, Jy, Jp = field.jacobians(tau, x[:d], p)
        S = x[d:].reshape(d, m)
        dS = Jy @ S
        dS[:, d:] += Jp
        return np.concatenate([f, dS.reshape(-1)])

    def jac(tau, x):  # Newton matrix of the implicit methods: second-derivative terms left out
        _, Jy, _ = field.jacobians(tau, x[:d], p)
        import scipy.linalg

        return scipy.linalg.block_diag(Jy, np.kron(Jy, np.eye(m)))

    S0 = np.concatenate([np.eye(d), np.zeros((d, P))], axis=1)
    sol = _integrate(rhs, jac, (t[0], t[-1]), np.concatenate([y0, S0.reshape(-1)]), t, method, rtol, atol)
    Y = sol.y[:d].T
    S = sol.y[d:].T.reshape(len(t), d, m)
    return Y, S


def _adjoint(field: _Field, traj, p, t, G, method, rtol, atol):
    """lambda(t_0) and mu(t_0) for the loss sum_k g_k . y(t_k), integrating backward in time."""
    d, P = G.shape[1], field.P
    lam, mu = G[-1].copy(), np.zeros(P)

    def rhs(tau, x):
        _, Jy, Jp = field.jacobians(tau, traj.sol(tau), p)
        lam_ = x[:d]
        return np.concatenate([-Jy.T @ lam_, -Jp.T @ lam_])

    def jac(tau, x):
        _, Jy, _ = field.jacobians(tau, traj.sol(tau), p)
        out = np.zeros((d + P, d + P))
        out[:d, :d] = -Jy.T
        return out

    for k in range(len(t) - 1, 0, -1):
        x0 = np.concatenate([lam, mu])
        sol = _integrate(rhs, jac, (t[k], t[k - 1]), x0, None, method, rtol, atol)
        lam, mu = sol.y[:d, -1] + G[k - 1], sol.y[d:, -1]
    return lam, mu


class _IVP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field, y0, t, method, rtol, atol, sensitivity, *params):  # noqa: D102
        p = torch.cat([q.detach().reshape(-1).double().cpu() for q in params]) if params else torch.zeros(0)
        y0n = y0.detach().double().cpu().numpy().reshape(-1)
        if sensitivity == "forward":
            Y, S = _forward_sensitivity(field, y0n, p, t, method, rtol, atol)
            ctx.S = S
        else:
            rhs = lambda tau, y: field.value(tau, y, p)  # noqa: E731
            jac = lambda tau, y: field.jacobians(tau, y, p)[1]  # noqa: E731
            traj = _integrate(rhs, jac, (t[0], t[-1]), y0n, t, method, rtol, atol, dense=True)
            Y = traj.y.T
            ctx.traj = traj
        ctx.field, ctx.p, ctx.t, ctx.args = field, p, t, (method, rtol, atol, sensitivity)
        ctx.like = [(q.dtype, q.device, q.shape) for q in params]
        ctx.y0like = (y0.dtype, y0.device, y0.shape)
        return torch.as_tensor(Y, dtype=y0.dtype, device=y0.device).reshape(len(t), *y0.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        method, rtol, atol, sensitivity = ctx.args
        G = g.detach().double().cpu().reshape(len(ctx.t), -1).numpy()
        d = G.shape[1]
        if sensitivity == "forward":
            total = np.einsum("kim,ki->m", ctx.S, G)
            g_y0, g_p = total[:d], total[d:]
        else:
            g_y0, g_p = _adjoint(ctx.field, ctx.traj, ctx.p, ctx.t, G, method, rtol, atol)
        dt, dev, shape = ctx.y0like
        grads = [torch.as_tensor(g_y0, dtype=dt, device=dev).reshape(shape)]
        offset = 0
        for dt, dev, shape in ctx.like:
            n = math.prod(shape)
            grads.append(torch.as_tensor(g_p[offset : offset + n], dtype=dt, device=dev).reshape(shape))
            offset += n
        return (None, grads[0], None, None, None, None, None, *grads[1:])


def solve_ivp_layer(
    func: Callable,
    y0: torch.Tensor,
    t: Any,
    *params: torch.Tensor,
    method: str = "LSODA",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    sensitivity: Literal["forward", "adjoint"] = "forward",
) -> torch.Tensor:
    """y(t_k) from `scipy.integrate.solve_ivp`, differentiable with respect to y0 and params.

    Args:
        func: ``func(t, y, *params) -> dy/dt`` written in torch (y is 1-D of size d, float64).
        y0: initial state, 1-D tensor.
        t: output times, 1-D and strictly increasing; t[0] is the initial time.
        *params: tensors the vector field depends on; they receive gradients.
        method: any solve_ivp method ('RK45', 'DOP853', 'Radau', 'BDF', 'LSODA').
        rtol: relative tolerance of the integrator (also that of the sensitivity/adjoint equations).
        atol: absolute tolerance, likewise.
        sensitivity: 'forward' (sensitivity equations) or 'adjoint' (adjoint equations backward in time).

    Returns:
        y at the output times, shape ``(len(t), d)``.

    Raises:
        InputError: malformed y0, t or options. SolverError: solve_ivp failed.
    """
    if not torch.is_tensor(y0) or y0.dim() != 1 or not y0.is_floating_point():
        raise InputError(
            f"solve_ivp_layer: y0 must be a 1-D floating-point tensor; got "
            f"{tuple(y0.shape) if torch.is_tensor(y0) else type(y0).__name__}. Flatten the state first."
        )
    tt = np.asarray(t.detach().cpu() if torch.is_tensor(t) else t, dtype=np.float64).reshape(-1)
    if tt.size < 2 or not np.all(np.diff(tt) > 0):
        raise InputError(
            "solve_ivp_layer: t must be 1-D, strictly increasing, with at least two times (t[0] is the start); "
            f"got {tt.tolist()[:6]}."
        )
    if sensitivity not in ("forward", "adjoint"):
        raise InputError(f"solve_ivp_layer: sensitivity must be 'forward' or 'adjoint'; got {sensitivity!r}.")
    for i, q in enumerate(params):
        if not torch.is_tensor(q) or not q.is_floating_point():
            raise InputError(f"solve_ivp_layer: parameter {i} must be a floating-point tensor; got {type(q).__name__}.")
    field = _Field(func, list(params))
    return _IVP.apply(field, y0, tt, method, rtol, atol, sensitivity, *params)
