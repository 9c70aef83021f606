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

"p" is every tensor the field's gradient can reach: the ``*params`` passed explicitly, and the tensors
that require grad which func uses without receiving them (weights captured by a closure, a module's
Parameters, a hypernetwork's output). The latter are found by running func once at (t0, y0) under a
`TorchFunctionMode` that records the tensor arguments of every torch operation. The output times get
gradients too: dL/dt_k = g_k . f(t_k, y(t_k)) for k >= 1 and dL/dt_0 = -(dL/dy0 - g_0) . f(t_0, y0).

The Jacobians df/dy and df/dp are evaluated by torch at float64 on the CPU. The integration loop is
scipy's OdeSolver stepped here (as solve_ivp does) so that a step cap, a time limit and a stalled step
size (LSODA steps forever at a finite-time blow-up) end in a `SolverError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from blackbox_diff._errors import BlackBoxDiffError, InputError, SolverError
from blackbox_diff.engine import first_order_only

__all__ = ["solve_ivp_layer"]

METHODS = ("RK23", "RK45", "DOP853", "Radau", "BDF", "LSODA")
_IMPLICIT = ("Radau", "BDF", "LSODA")  # the methods that take a Jacobian
_STALL_STEPS = 20  # consecutive steps without progress in t that count as a stalled integration


class _Capture(TorchFunctionMode):
    """Records the tensors requiring grad that torch operations receive from outside the call."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[int, torch.Tensor] = {}
        self._made: dict[int, torch.Tensor] = {}  # outputs of the call, kept alive so ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for x in _tensors((args, kwargs)):
            if x.requires_grad and id(x) not in self._made:
                self.found.setdefault(id(x), x)
        for x in _tensors(out):
            self._made[id(x)] = x
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Field:
    """func on numpy float64, with its Jacobians with respect to y and the flat parameter vector.

    The parameter vector p holds the explicit params (passed to func); the captured tensors follow it
    in the Jacobian's columns but are used by func directly, so their columns come from autograd on the
    tensors themselves.
    """

    def __init__(self, func: Callable, params: list[torch.Tensor], captured: list[torch.Tensor]) -> None:
        self.func = func
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.captured = captured
        self.P = sum(self.sizes) + sum(c.numel() for c in captured)

    def _unflat(self, p: torch.Tensor) -> list[torch.Tensor]:
        return [q.reshape(s) for q, s in zip(torch.split(p, self.sizes), self.shapes, strict=True)]

    def _f(self, t: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.func(t, y, *self._unflat(p)).reshape(-1)

    def value(self, t: float, y: np.ndarray, p: torch.Tensor) -> np.ndarray:
        try:
            with torch.no_grad():
                return _to_numpy(self._f(torch.tensor(t, dtype=torch.float64), torch.from_numpy(np.array(y)), p))
        except BlackBoxDiffError:
            raise
        except Exception as err:
            raise SolverError(f"solve_ivp_layer: func raised {type(err).__name__} at t = {t:.6g}: {err}") from err

    def jacobians(self, t: float, y: np.ndarray, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            return self._jacobians(t, y, p)
        except BlackBoxDiffError:
            raise
        except Exception as err:
            raise SolverError(
                f"solve_ivp_layer: differentiating func raised {type(err).__name__} at t = {t:.6g}: {err}"
            ) from err

    def _jacobians(self, t: float, y: np.ndarray, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # One forward and one batched reverse sweep (d cotangents at once): far cheaper than
        # torch.func.jacrev's set-up for small d, and this runs at every right-hand-side evaluation.
        tt = torch.tensor(t, dtype=torch.float64)
        yy = torch.from_numpy(np.array(y)).requires_grad_(True)
        pp = p.detach().clone().requires_grad_(True)
        inputs = (yy, pp, *self.captured)
        d = yy.numel()
        with torch.enable_grad():
            f = self._f(tt, yy, pp)
            eye = torch.eye(d, dtype=f.dtype)
            try:
                grads = torch.autograd.grad(f, inputs, eye, is_grads_batched=True, allow_unused=True)
            except RuntimeError:  # an op without a batching rule: one sweep per output
                rows = [torch.autograd.grad(f, inputs, eye[i], retain_graph=True, allow_unused=True) for i in range(d)]
                grads = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(inputs))]
        Jy = np.zeros((d, d)) if grads[0] is None else _to_numpy(grads[0])
        blocks = [np.zeros((d, n)) if g is None else _to_numpy(g.reshape(d, n).detach().double().cpu())
                  for g, n in zip(grads[1:], [pp.numel()] + [c.numel() for c in self.captured], strict=True)]
        return _to_numpy(f.detach()), Jy, np.concatenate(blocks, axis=1)


@dataclass(frozen=True)
class _Settings:
    method: Any
    rtol: float
    atol: float
    sensitivity: str
    max_steps: int | None
    timeout: float | None


def _integrate(rhs, jac, t_span, x0, t_eval, s: _Settings, dense: bool = False):
    """Step scipy's solver from t_span[0] to t_span[1]; (values at t_eval, dense solution or None)."""
    import scipy.integrate

    cls = getattr(scipy.integrate, s.method) if isinstance(s.method, str) else s.method
    name = s.method if isinstance(s.method, str) else cls.__name__
    kw = {"jac": jac} if name in _IMPLICIT else {}
    solver = cls(rhs, t_span[0], x0, t_span[1], rtol=s.rtol, atol=s.atol, **kw)
    direction = 1.0 if t_span[1] >= t_span[0] else -1.0
    t_eval = np.asarray([] if t_eval is None else t_eval, dtype=np.float64)
    Y = np.empty((t_eval.size, x0.size))
    nxt = 0
    while nxt < t_eval.size and (t_eval[nxt] - t_span[0]) * direction <= 0:
        Y[nxt], nxt = x0, nxt + 1
    ts, interpolants = [t_span[0]], []
    steps, stalled, start = 0, 0, time.monotonic()
    while solver.status == "running":
        try:
            message = solver.step()
        except BlackBoxDiffError:
            raise
        except Exception as err:  # scipy's own failures (a singular Newton matrix, ...): never bare
            raise SolverError(f"scipy.integrate.solve_ivp ({name}) failed: {type(err).__name__}: {err} at "
                              f"t = {solver.t:.6g}", status=-1) from err
        steps += 1
        if solver.status == "failed":
            raise SolverError(f"scipy.integrate.solve_ivp ({name}) failed: {message}", status=-1)
        stalled = stalled + 1 if solver.t == solver.t_old or solver.step_size == 0 else 0
        _check_progress(solver, name, steps, stalled, time.monotonic() - start, s)
        if dense or (nxt < t_eval.size and (t_eval[nxt] - solver.t) * direction <= 0):
            interp = solver.dense_output()
            if dense:
                ts.append(solver.t)
                interpolants.append(interp)
            while nxt < t_eval.size and (t_eval[nxt] - solver.t) * direction <= 0:
                Y[nxt], nxt = (solver.y if t_eval[nxt] == solver.t else interp(t_eval[nxt])), nxt + 1
    return Y, (scipy.integrate.OdeSolution(ts, interpolants) if dense else None)


def _check_progress(solver, name: str, steps: int, stalled: int, elapsed: float, s: _Settings) -> None:
    where = f"at t = {solver.t:.6g} (max|y| = {np.max(np.abs(solver.y), initial=0.0):.3g})"
    if not np.all(np.isfinite(solver.y)):
        raise SolverError(f"solve_ivp_layer ({name}): the solution became non-finite {where}. The solution "
                          "probably blows up there; integrate to an earlier time.", status="non-finite")
    if stalled >= _STALL_STEPS:
        raise SolverError(f"solve_ivp_layer ({name}): the step size fell to zero {where} and the integration "
                          "stopped making progress: the solution probably blows up in finite time there. "
                          "Integrate to an earlier time.", status="stalled")
    if solver.status == "running" and s.max_steps is not None and steps >= s.max_steps:
        raise SolverError(f"solve_ivp_layer ({name}): max_steps={s.max_steps} steps taken, stopped {where} "
                          "before the final time. Raise max_steps, or check for a blow-up or stiffness "
                          "(method='Radau' or 'BDF').", status="max_steps")
    if solver.status == "running" and s.timeout is not None and elapsed > s.timeout:
        raise SolverError(f"solve_ivp_layer ({name}): timeout={s.timeout:g} s exceeded after {steps} steps, "
                          f"stopped {where}. Raise timeout, or check for a blow-up or stiffness.",
                          status="timeout")


def _forward_sensitivity(field: _Field, y0, p, t, s: _Settings):
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
    X, _ = _integrate(rhs, jac, (t[0], t[-1]), np.concatenate([y0, S0.reshape(-1)]), t, s)
    return X[:, :d], X[:, d:].reshape(len(t), d, m)


def _adjoint(field: _Field, traj, p, t, G, s: _Settings):
    """lambda(t_0) and mu(t_0) for the loss sum_k g_k . y(t_k), integrating backward in time."""
    d, P = G.shape[1], field.P
    lam, mu = G[-1].copy(), np.zeros(P)

    def rhs(tau, x):
        _, Jy, Jp = field.jacobians(tau, traj(tau), p)
        lam_ = x[:d]
        return np.concatenate([-Jy.T @ lam_, -Jp.T @ lam_])

    def jac(tau, x):
        _, Jy, _ = field.jacobians(tau, traj(tau), p)
        out = np.zeros((d + P, d + P))
        out[:d, :d] = -Jy.T
        return out

    for k in range(len(t) - 1, 0, -1):
        X, _ = _integrate(rhs, jac, (t[k], t[k - 1]), np.concatenate([lam, mu]), [t[k - 1]], s)
        lam, mu = X[-1, :d] + G[k - 1], X[-1, d:]
    return lam, mu


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """t as numpy; inside a torch.func transform (a jvp or backward rule evaluating the field), tensors made
    there are wrapped and give their values through tolist only."""
    try:
        return t.numpy()
    except RuntimeError:
        return np.asarray(t.tolist(), dtype=np.float64)


class _Record:
    """What the forward of one call leaves for its backward and jvp (setup_context-style Functions get
    no ctx in forward)."""

    S: np.ndarray | None = None
    traj: Any = None
    Y: np.ndarray | None = None
    p: torch.Tensor | None = None


def _numpy(g: torch.Tensor, what: str) -> np.ndarray:
    """A cotangent or tangent as float64 numpy, also under torch.func.grad/vjp/jvp (whose wrapped tensors
    hand out their values through tolist); vmap's batched tensors cannot be read one instance at a time."""
    try:
        return np.asarray(g.detach().double().cpu().tolist(), dtype=np.float64)
    except RuntimeError as err:
        raise BlackBoxDiffError(
            f"solve_ivp_layer: {what} under torch.func.vmap (vmap, jacrev, jacfwd, hessian) is not supported: the "
            "scipy integrator runs one trajectory at a time. Use torch.autograd.functional.jacobian, or loop over "
            "the batch."
        ) from err


class _IVP(torch.autograd.Function):
    """(record, field, settings, tt, y0, t, *params) -> y(t_k): scipy's integrator, with first derivatives
    from its own sensitivity or adjoint equations (reverse mode both ways, forward mode with
    sensitivity='forward'); second derivatives raise `BlackBoxDiffError`."""

    generate_vmap_rule = False

    @staticmethod
    def forward(record, field, settings, tt, y0, t, *params):  # noqa: D102
        # params: the explicit ones, then the captured ones (inputs so that autograd routes their grads).
        n = len(field.sizes)
        explicit = params[:n]
        p = torch.cat([q.detach().reshape(-1).double().cpu() for q in explicit]) if explicit else torch.zeros(0)
        y0n = y0.detach().double().cpu().numpy().reshape(-1)
        if settings.sensitivity == "forward":
            Y, record.S = _forward_sensitivity(field, y0n, p, tt, settings)
        else:
            rhs = lambda tau, y: field.value(tau, y, p)  # noqa: E731
            jac = lambda tau, y: field.jacobians(tau, y, p)[1]  # noqa: E731
            Y, record.traj = _integrate(rhs, jac, (tt[0], tt[-1]), y0n, tt, settings, dense=True)
        record.p, record.Y = p, Y
        return torch.tensor(Y.reshape(len(tt), *y0.shape), dtype=y0.dtype, device=y0.device)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        record, field, settings, tt, y0, t, *params = inputs
        ctx.save_for_backward(*params)  # torch's version check: a parameter changed in place is refused
        ctx.record, ctx.field, ctx.settings, ctx.tt = record, field, settings, tt
        ctx.t_like = None if t is None else (t.dtype, t.device, t.shape)
        ctx.y0like = (y0.dtype, y0.device, y0.shape)
        ctx.anchors = [y0, *([] if t is None else [t]), *params]
        ctx.param_sizes = [q.numel() for q in params]

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        params = ctx.saved_tensors
        record, field, s, tt = ctx.record, ctx.field, ctx.settings, ctx.tt
        if torch.is_grad_enabled():
            return _IVP._differentiable_backward(ctx, g, params)
        G = _numpy(g, "reverse mode").reshape(len(tt), -1)
        if s.sensitivity == "forward":
            total = np.einsum("kim,ki->m", record.S, G)
        else:
            total = np.concatenate(_adjoint(field, record.traj, record.p, tt, G, s))
        grads = _split(torch.as_tensor(total), ctx, params)
        F = _IVP._fields(ctx) if ctx.t_like is not None and ctx.needs_input_grad[5] else None
        g_t = None if F is None else _time_gradient(ctx, torch.as_tensor(G), grads[0].reshape(-1).double().cpu(),
                                                    torch.as_tensor(F))
        return (None, None, None, None, grads[0], g_t, *grads[1:])

    @staticmethod
    def _differentiable_backward(ctx, g, params):
        """create_graph: the gradients as torch functions of the cotangent (they are linear in it), so that
        derivatives in the cotangent (torch.autograd.functional.jvp, double-backward tricks) are exact;
        derivatives in y0, t or the parameters (second derivatives) raise."""
        record, s, tt = ctx.record, ctx.settings, ctx.tt
        message = ("solve_ivp_layer: second derivatives are not supported (the derivatives come from scipy's "
                   "sensitivity equations, which are not differentiated again). Use bbd.odeint, whose steps are "
                   "implicit functions with second derivatives, or finite differences of the gradient.")
        if s.sensitivity != "forward":
            # The adjoint integration runs in a Function's forward: torch.func transforms hand it plain tensors.
            total = _AdjointGradients.apply(_Plain(ctx), g)
            total = first_order_only([total], message, [*ctx.anchors, g])[0]
            grads = _split(total, ctx, params)
            g_t = None
            if ctx.t_like is not None and ctx.needs_input_grad[5]:
                G = g.reshape(len(tt), -1).to(torch.float64).cpu()
                g_t = _time_gradient(ctx, G, total[: G.shape[1]], torch.as_tensor(_IVP._fields(ctx)))
            return (None, None, None, None, grads[0], g_t, *grads[1:])
        G = g.reshape(len(tt), -1).to(torch.float64).cpu()
        S = torch.as_tensor(record.S)
        total = torch.einsum("kim,ki->m", S, G)
        total = total + first_order_only([torch.zeros_like(total)], message, ctx.anchors)[0]
        grads = _split(total, ctx, params)
        g_t = None
        if ctx.t_like is not None and ctx.needs_input_grad[5]:
            g_t = _time_gradient(ctx, G, total[: G.shape[1]], torch.as_tensor(_IVP._fields(ctx)))
        return (None, None, None, None, grads[0], g_t, *grads[1:])

    @staticmethod
    def _fields(ctx) -> np.ndarray:
        """f(t_k, y(t_k)) at the output times (k, d)."""
        record = ctx.record
        return np.stack([ctx.field.value(tk, yk, record.p) for tk, yk in zip(ctx.tt, record.Y, strict=True)])

    @staticmethod
    def jvp(ctx, _r, _f, _s, _tt, y0_dot, t_dot, *p_dots):  # noqa: D102
        record, tt = ctx.record, ctx.tt
        if ctx.settings.sensitivity != "forward":
            raise BlackBoxDiffError(
                "solve_ivp_layer: forward mode (jvp) needs the forward sensitivities; pass sensitivity='forward' "
                "(sensitivity='adjoint' only integrates backward in time)."
            )
        dt, dev, shape = ctx.y0like
        d = int(np.prod(shape))
        parts = [np.zeros(d) if y0_dot is None else _numpy(y0_dot, "forward mode").reshape(-1)]
        for size, pd in zip(ctx.param_sizes, p_dots, strict=True):
            parts.append(np.zeros(size) if pd is None else _numpy(pd, "forward mode").reshape(-1))
        tangent = np.einsum("kim,m->ki", record.S, np.concatenate(parts))
        if t_dot is not None:
            td = _numpy(t_dot, "forward mode").reshape(-1)
            F = np.stack([ctx.field.value(tk, yk, record.p) for tk, yk in zip(tt, record.Y, strict=True)])
            tangent[1:] += F[1:] * td[1:, None]  # moving t_k moves the sample along the trajectory
            tangent[1:] -= np.einsum("kij,j->ki", record.S[1:, :, :d], F[0]) * td[0]  # moving t0 shifts it all
        return torch.tensor(tangent.reshape(len(tt), *shape), dtype=dt, device=dev)

    @staticmethod
    def vmap(info, in_dims, *args):  # noqa: D102
        raise BlackBoxDiffError(
            "solve_ivp_layer under torch.func.vmap (vmap, jacrev, jacfwd, hessian) is not supported: the scipy "
            "integrator runs one trajectory at a time. Use torch.autograd.functional.jacobian, or loop over the "
            "batch."
        )


class _AdjointGradients(torch.autograd.Function):
    """(ctx, g) -> the flat (y0, params) gradient by the adjoint equations; first order only."""

    @staticmethod
    def forward(plain, g):  # noqa: D102
        G = _numpy(g, "reverse mode").reshape(len(plain.tt), -1)
        return torch.as_tensor(np.concatenate(_adjoint(plain.field, plain.record.traj, plain.record.p, plain.tt, G,
                                                       plain.settings)))

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        pass

    @staticmethod
    def backward(ctx, _):  # noqa: D102
        raise BlackBoxDiffError(
            "solve_ivp_layer(sensitivity='adjoint'): derivatives of the gradient (in the cotangent too) are not "
            "supported; use sensitivity='forward', whose gradient is linear in the cotangent in torch."
        )

    @staticmethod
    def vmap(info, in_dims, *args):  # noqa: D102
        raise BlackBoxDiffError(
            "solve_ivp_layer(sensitivity='adjoint') under torch.func.vmap (jacrev, vmap) is not supported: the "
            "adjoint integration runs one cotangent at a time. Use sensitivity='forward' (jacrev works there)."
        )


class _Plain:
    """A ctx stand-in whose backward runs with create_graph off (numeric), for the adjoint path."""

    def __init__(self, ctx) -> None:
        self.__dict__.update({k: getattr(ctx, k) for k in ("record", "field", "settings", "tt", "t_like", "y0like",
                                                             "anchors", "param_sizes")})
        self.saved_tensors = ctx.saved_tensors
        self.needs_input_grad = ctx.needs_input_grad


def _split(total: torch.Tensor, ctx, params) -> list[torch.Tensor]:
    """The flat (y0, params) gradient as tensors of y0's and each parameter's shape, dtype and device."""
    dt, dev, shape = ctx.y0like
    d = int(np.prod(shape))
    grads = [total[:d].to(dtype=dt, device=dev).reshape(shape)]
    offset = d
    for q in params:
        grads.append(total[offset : offset + q.numel()].to(dtype=q.dtype, device=q.device).reshape(q.shape))
        offset += q.numel()
    return grads


def _time_gradient(ctx, G: torch.Tensor, g_y0: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """dL/dt_k = g_k . f(t_k, y_k) for k >= 1; dL/dt_0 = -(dL/dy0 - g_0) . f(t_0, y_0)."""
    out = (G * F).sum(dim=1)
    out = torch.cat([-((g_y0 - G[0]) * F[0]).sum().reshape(1), out[1:]])
    dtype, device, shape = ctx.t_like
    return out.to(dtype=dtype, device=device).reshape(shape)


def _probe(func: Callable, t0: float, y0: np.ndarray, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run func once at (t0, y0): check what it returns; the tensors requiring grad it uses from outside."""
    d = y0.size
    capture = _Capture()
    views = [q.detach().double().cpu() for q in params]
    try:
        with capture:
            out = func(torch.tensor(t0, dtype=torch.float64), torch.from_numpy(y0.copy()), *views)
    except BlackBoxDiffError:
        raise
    except Exception as err:
        raise InputError(
            f"solve_ivp_layer: func(t0, y0, *params) raised {type(err).__name__}: {err}. func receives t (a 0-d "
            f"float64 tensor), y (a float64 tensor of shape ({d},)) and the params as float64 CPU tensors; the "
            "tensors it uses from outside (module weights) must be float64 CPU tensors too (module.double().cpu())."
        ) from err
    if not torch.is_tensor(out):
        raise InputError(
            f"solve_ivp_layer: func must return dy/dt as a torch tensor; it returned {type(out).__name__}. Build "
            "it with torch operations, e.g. torch.stack([...]) of the components."
        )
    if out.dtype != torch.float64:
        raise InputError(
            f"solve_ivp_layer: func returned a {out.dtype} tensor; the integration runs in float64. Make its "
            "constants and modules float64 (module.double(), torch.tensor(..., dtype=torch.float64))."
        )
    if out.numel() != d:
        raise InputError(
            f"solve_ivp_layer: func returned shape {tuple(out.shape)}; expected {d} values (shape ({d},)), one "
            "derivative per entry of y0."
        )
    if not bool(torch.isfinite(out).all()):
        raise InputError(f"solve_ivp_layer: func(t0, y0, *params) is not finite: {out.detach().tolist()[:6]}.")
    ours = {id(q) for q in params}
    return [c for c in capture.found.values() if id(c) not in ours] if torch.is_grad_enabled() else []


def _check_inputs(y0, t, params, settings: _Settings) -> np.ndarray:
    if not torch.is_tensor(y0) or y0.dim() != 1 or not y0.is_floating_point():
        raise InputError(
            f"solve_ivp_layer: y0 must be a 1-D floating-point tensor; got "
            f"{tuple(y0.shape) if torch.is_tensor(y0) else type(y0).__name__}. Flatten the state first."
        )
    if y0.numel() == 0:
        raise InputError("solve_ivp_layer: y0 is empty; the state needs at least one entry.")
    if not bool(torch.isfinite(y0).all()):
        raise InputError("solve_ivp_layer: y0 contains NaN or Inf.")
    try:
        # tolist, not numpy: torch.func's grad-level tensors hand out values that way only
        tt = np.asarray(t.detach().tolist() if torch.is_tensor(t) else t, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise InputError(f"solve_ivp_layer: t must be a 1-D array of times; got {t!r}.") from err
    if tt.size < 2 or not np.all(np.diff(tt) > 0):
        raise InputError(
            "solve_ivp_layer: t must be 1-D, strictly increasing, with at least two times (t[0] is the start); "
            f"got {tt.tolist()[:6]}."
        )
    if settings.sensitivity not in ("forward", "adjoint"):
        raise InputError(f"solve_ivp_layer: sensitivity must be 'forward' or 'adjoint'; got {settings.sensitivity!r}.")
    _check_settings(settings)
    for i, q in enumerate(params):
        if not torch.is_tensor(q) or not q.is_floating_point():
            raise InputError(f"solve_ivp_layer: parameter {i} must be a floating-point tensor; got {type(q).__name__}.")
        if not bool(torch.isfinite(q).all()):
            raise InputError(f"solve_ivp_layer: parameter {i} contains NaN or Inf.")
    return tt


def _check_settings(s: _Settings) -> None:
    import scipy.integrate

    if not (s.method in METHODS or (isinstance(s.method, type) and issubclass(s.method, scipy.integrate.OdeSolver))):
        raise InputError(
            f"solve_ivp_layer: method must be one of {METHODS} or a scipy.integrate.OdeSolver subclass; "
            f"got {s.method!r}."
        )
    for name, value in (("rtol", s.rtol), ("atol", s.atol)):
        if not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"solve_ivp_layer: {name} must be a positive number; got {value!r}.")
    if s.max_steps is not None and (not isinstance(s.max_steps, int) or s.max_steps < 1):
        raise InputError(f"solve_ivp_layer: max_steps must be a positive integer or None; got {s.max_steps!r}.")
    if s.timeout is not None and (not isinstance(s.timeout, (int, float)) or not s.timeout > 0):
        raise InputError(f"solve_ivp_layer: timeout must be a positive number of seconds or None; got {s.timeout!r}.")


@torch.compiler.disable
def solve_ivp_layer(
    func: Callable,
    y0: torch.Tensor,
    t: Any,
    *params: torch.Tensor,
    method: str = "LSODA",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    sensitivity: Literal["forward", "adjoint"] = "forward",
    max_steps: int | None = None,
    timeout: float | None = None,
) -> torch.Tensor:
    """y(t_k) from scipy's integrators, differentiable with respect to y0, params, captured weights and t.

    Gradients reach every tensor requiring grad that func uses: the ``*params`` it receives, and the
    tensors it reaches by itself (a closure over a module, ``lambda t, y: net(y)``, a hypernetwork's
    output); the latter are found by running func once at (t0, y0). A `t` that requires grad gets
    dL/dt_k = g_k . f(t_k, y(t_k)) and dL/dt_0 = -(dL/dy0 - g_0) . f(t_0, y0).

    Args:
        func: ``func(t, y, *params) -> dy/dt`` written in torch (y is 1-D of size d, float64), returning a
            float64 tensor of d values.
        y0: initial state, 1-D tensor.
        t: output times, 1-D and strictly increasing; t[0] is the initial time. A tensor that requires
            grad receives the gradient with respect to the times.
        *params: tensors the vector field receives; they receive gradients.
        method: 'RK23', 'RK45', 'DOP853', 'Radau', 'BDF', 'LSODA', or a scipy.integrate.OdeSolver subclass.
        rtol: relative tolerance of the integrator (also that of the sensitivity/adjoint equations).
        atol: absolute tolerance, likewise.
        sensitivity: 'forward' (sensitivity equations) or 'adjoint' (adjoint equations backward in time).
        max_steps: cap on the integrator's steps per integration (None: no cap).
        timeout: wall-clock limit in seconds per integration (None: none). A stalled step size (LSODA at a
            finite-time blow-up steps forever without advancing) is a `SolverError` in any case.

    Returns:
        y at the output times, shape ``(len(t), d)``.

    Raises:
        InputError: malformed y0, t, options, or a func that fails or returns the wrong type, dtype or
            shape at (t0, y0). SolverError: the integrator failed, stalled, exceeded max_steps or timeout,
            or func raised during the integration.
    """
    settings = _Settings(method, rtol, atol, sensitivity, max_steps, timeout)
    try:
        tt = _check_inputs(y0, t, params, settings)
    except RuntimeError as err:  # vmap's batched tensors have no single value to check or integrate
        raise BlackBoxDiffError(
            "solve_ivp_layer under torch.func.vmap is not supported: the scipy integrator runs one trajectory at a "
            "time. Loop over the batch (or use bbd.odeint with batch_dims=1)."
        ) from err
    explicit = list(params)
    captured = _probe(func, float(tt[0]), np.asarray(y0.detach().tolist(), dtype=np.float64).reshape(-1), explicit)
    field = _Field(func, explicit, captured)
    t_input = t if torch.is_tensor(t) and t.is_floating_point() else None  # a tangent or a gradient may ride on it
    return _IVP.apply(_Record(), field, settings, tt, y0, t_input, *explicit, *captured)
