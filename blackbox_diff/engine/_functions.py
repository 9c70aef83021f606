"""The IFT autograd core: the black box inside a `torch.autograd.Function`, and its derivatives.

Invariant: ``F(z*, params) = 0`` at the black box's answer z*. With J = dF/dz and K = dF/dparams,

    reverse mode:  dL/dparams = -K^T u,     J^T u = dL/dz*        (`_Solve.backward`)
    forward mode:  z*' = -v,                J v = K params'       (`_Solve.jvp`)

Both linear solves are `_LinearSolve`, itself an implicit function of (rhs, z*, params) with its own
backward and jvp, so derivatives of derivatives (create_graph, hvp, Hessians, jacfwd(jacrev)) stay exact:
for x solving A x = b with A = J^T or J, the cotangent x' gives  w = A^{-T} x',  db = w,
d(z, params) = -grad_{z,params} <a, J b'> with (a, b') = (x, w) for A = J^T and (w, x) for A = J.

Every Function is written in the `setup_context` style with a `vmap` rule that folds a vmapped dimension
into the engine's own batch, so torch.func transforms (grad, vjp, jacrev, jacfwd, vmap, hessian) hand the
black box plain tensors, one instance at a time. Trainable tensors that the condition reaches by closure
(module weights, a hypernetwork's output) get their first-order gradient through `_ClosureLink`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from blackbox_diff._errors import BlackBoxDiffError
from blackbox_diff.engine._call import Call
from blackbox_diff.engine._policy import solve_linear
from blackbox_diff.engine._system import Linearization, System, first_order_only, guard, once

__all__ = ["apply"]


@dataclasses.dataclass(eq=False)
class _LinearProblem:
    """A linear system of the IFT: A x = b with A = (dF/dz)^T (transpose) or dF/dz, per instance.

    The condition's aux tensors travel as tensor inputs of `_LinearSolve` (so that vmap can fold them
    with z); `system` supplies everything else.
    """

    system: System
    transpose: bool
    linearization: Linearization | None = None

    @property
    def what(self) -> str:
        return "adjoint system (dF/dz)^T u = dL/dz" if self.transpose else "tangent system (dF/dz) v = (dF/dp) p'"


def _solve_numeric(problem: _LinearProblem, rhs: torch.Tensor, Z: torch.Tensor, params) -> torch.Tensor:
    system = problem.system
    lin = problem.linearization or Linearization(system, Z.detach(), [p.detach() for p in params])
    op, op_t = (lin.vjp_z, lin.jvp_z) if problem.transpose else (lin.jvp_z, lin.vjp_z)
    x, _ = solve_linear(op, rhs.detach(), structure=system.structure, options=system.options,
                        materialize=lambda: lin.dense(problem.transpose), what=problem.what, op_t=op_t,
                        verify=None if system.independent else system.coupling_hint,
                        identity_check=lin.vjp_z)
    return x


def _linear_solve(system: System, transpose: bool, rhs, Z, params) -> torch.Tensor:
    return _LinearSolve.apply(_LinearProblem(system, transpose), rhs, Z, len(system.aux), *system.aux, *params)


class _LinearSolve(torch.autograd.Function):
    """x with A(z, params) x = rhs; differentiable in rhs, z and params (see the module docstring).

    Inputs: (problem, rhs, Z, n_aux, *aux, *params).
    """

    generate_vmap_rule = False

    @staticmethod
    def forward(problem, rhs, Z, n_aux, *rest):  # noqa: D102
        system = problem.system.with_aux(rest[:n_aux], problem.system.batched)
        return _solve_numeric(dataclasses.replace(problem, system=system), rhs, Z, rest[n_aux:])

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        problem, _, Z, n_aux, *rest = inputs
        ctx.problem, ctx.n_aux = problem, n_aux
        ctx.save_for_backward(output, Z, *rest)
        ctx.save_for_forward(output, Z, *rest)

    @staticmethod
    def backward(ctx, x_bar):  # noqa: D102
        x, Z, *rest = ctx.saved_tensors
        n_aux, problem = ctx.n_aux, ctx.problem
        aux, params = rest[:n_aux], rest[n_aux:]
        system = problem.system.with_aux(aux, problem.system.batched)
        w = _linear_solve(system, not problem.transpose, x_bar, Z, params)
        nones = [None] * n_aux
        if not (ctx.needs_input_grad[2] or any(ctx.needs_input_grad[4 + n_aux:])):
            return (None, w, None, None, *nones, *[None] * len(params))
        a, b = (x, w) if problem.transpose else (w, x)
        gZ, gP = Linearization(system, Z, params).bilinear(a, b)
        return (None, w, -gZ, None, *nones, *[-g for g in gP])

    @staticmethod
    def jvp(ctx, _, rhs_dot, Z_dot, __, *rest_dots):  # noqa: D102
        x, Z, *rest = _primals(ctx.saved_tensors)
        n_aux, problem = ctx.n_aux, ctx.problem
        aux, params, P_dots = rest[:n_aux], rest[n_aux:], rest_dots[n_aux:]
        system = problem.system.with_aux(aux, problem.system.batched)
        r = torch.zeros_like(x) if rhs_dot is None else rhs_dot
        if Z_dot is not None or any(t is not None for t in P_dots):
            r = r - Linearization(system, Z, params).directional(x, problem.transpose, Z_dot, P_dots)
        return _linear_solve(system, problem.transpose, r, Z, params)

    @staticmethod
    def vmap(info, in_dims, problem, rhs, Z, n_aux, *rest):  # noqa: D102
        V = info.batch_size
        if not problem.system.foldable:  # one vmap slice at a time
            args = (rhs, Z, *rest)
            dims = (in_dims[1], in_dims[2], *in_dims[4:])
            outs = []
            for v in range(V):
                r, z, *more = [a if d is None else a.select(d, v) for a, d in zip(args, dims, strict=True)]
                system = problem.system.with_aux(more[:n_aux], problem.system.batched)
                outs.append(_linear_solve(system, problem.transpose, r, z, more[n_aux:]))
            return torch.stack(outs), 0
        B = _logical_rows(Z, in_dims[2])
        aux = [_fold(a, d, V) for a, d in zip(rest[:n_aux], in_dims[4 : 4 + n_aux], strict=True)]
        P_m, batched = _fold_params(rest[n_aux:], in_dims[4 + n_aux :], problem.system.batched, V, B)
        system = problem.system.with_aux(aux, batched)
        out = _linear_solve(system, problem.transpose, _fold(rhs, in_dims[1], V), _fold(Z, in_dims[2], V), P_m)
        return out.reshape(V, B, *out.shape[1:]), 0


class _Solve(torch.autograd.Function):
    """params -> (Z (B, n), *aux): the call's black box, certified; Z differentiable by the IFT, the aux
    tensors (active sets, factorisations) constants."""

    generate_vmap_rule = False

    @staticmethod
    def forward(call, *params):  # noqa: D102
        Z = call.run(list(params))
        return (Z, *call.system.aux)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        call, *params = inputs
        ctx.call = call
        ctx.n_aux = len(output) - 1
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output, *params)
        ctx.save_for_forward(*output, *params)

    @staticmethod
    def backward(ctx, g, *_):  # noqa: D102
        Z, *rest = ctx.saved_tensors
        aux, params = rest[: ctx.n_aux], rest[ctx.n_aux :]
        return (None, *_solution_vjp(ctx.call, Z, aux, params, g, ctx.needs_input_grad[1:]))

    @staticmethod
    def jvp(ctx, _, *tangents):  # noqa: D102
        Z, *rest = _primals(ctx.saved_tensors)
        aux, params = rest[: ctx.n_aux], rest[ctx.n_aux :]
        return (_solution_jvp(ctx.call, Z, aux, params, tangents), *[None] * ctx.n_aux)

    @staticmethod
    def vmap(info, in_dims, call, *params):  # noqa: D102
        V = info.batch_size
        B = _call_rows(call, params, in_dims[1:])
        P_m, batched = _fold_params(params, in_dims[1:], call.batched, V, B)
        merged = call.fresh(batched)
        outs = _Solve.apply(merged, *P_m)
        call.adopt(merged)
        return tuple(o.reshape(V, B, *o.shape[1:]) for o in outs), (0,) * len(outs)


class _ClosureLink(torch.autograd.Function):
    """Zeros whose backward sends -u (J^T u = g) into R = F(z*, params) evaluated with z* and the params
    detached: so trainable tensors that F reaches by closure get -(dF/dW)^T u, their IFT gradient."""

    @staticmethod
    def forward(call, R, *params):  # noqa: D102
        return torch.zeros_like(R)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        ctx.call = inputs[0]
        ctx.n_params = len(inputs) - 2
        ctx.anchors = [t for t in inputs[2:] if torch.is_tensor(t) and t.requires_grad]

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        call = ctx.call
        u = call.recall_adjoint(g) if not torch.is_grad_enabled() else None
        if u is None:
            Zs, Ps = call.point
            u = _solve_numeric(_LinearProblem(_ok_system(call), True), g, Zs, Ps)
        # Under create_graph the captured tensors' gradients depend on z*, the parameters and g in ways this
        # first-order link does not carry: hang them from all of those, so that differentiating them raises.
        marked = once([-u], call.system, "tensors the condition captures by closure (pass them as parameters)",
                      inputs=[g, *ctx.anchors])[0]
        return (None, marked, *[None] * ctx.n_params)

    @staticmethod
    def jvp(ctx, _, R_dot, *__):  # noqa: D102
        call = ctx.call
        Zs, Ps = call.point
        return -_linear_solve(_ok_system(call), False, R_dot, Zs, Ps)

    @staticmethod
    def vmap(info, in_dims, call, R, *params):  # noqa: D102
        raise BlackBoxDiffError(
            f"torch.func.vmap over the {call.describe} condition, which reaches trainable tensors by closure "
            "(e.g. module weights used inside the condition): pass those tensors as parameters of the call, or "
            "batch with the engine's own in_dims= instead of vmap."
        )


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a tensor the condition captures by closure. Its gradient (first order, exact) passes
    through marked: differentiating it again raises, because the captured tensor's second derivatives miss
    the dependence of z* on it (it is not an input of the core; pass it as a parameter, or use a Module field,
    whose weights are lifted)."""

    generate_vmap_rule = True
    MESSAGE = ("Second derivatives with respect to a tensor the condition captures by closure are not supported "
               "(the dependence of z* on it is first order only): pass it as a parameter of the call, or use an "
               "nn.Module field (DEQ, odeint), whose weights are lifted into the core.")

    @staticmethod
    def forward(x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        if not torch.is_grad_enabled():
            return g
        (x,) = ctx.saved_tensors
        return first_order_only([g], _FirstOrderOnly.MESSAGE, [g, x])[0]

    @staticmethod
    def jvp(ctx, t):  # noqa: D102
        return t


class _GuardCaptures(TorchFunctionMode):
    """While F is evaluated for the closure link, every tensor that requires grad and that F did not make
    (a captured weight, a hypernetwork's output) goes through `_FirstOrderOnly` once."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, torch.Tensor] = {}  # tensors made inside F, kept alive so their ids stay unique
        self.guarded: dict[int, torch.Tensor] = {}

    def _guard(self, t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.requires_grad) or id(t) in self.made:
            return t
        if id(t) not in self.guarded:  # (the mode is off inside its own __torch_function__)
            self.guarded[id(t)] = _FirstOrderOnly.apply(t)
            self.made[id(self.guarded[id(t)])] = self.guarded[id(t)]
        return self.guarded[id(t)]

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        args = torch.utils._pytree.tree_map(self._guard, args)
        kwargs = torch.utils._pytree.tree_map(self._guard, kwargs)
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made[id(t)] = t
        return out


# --------------------------------------------------------------------------------------------------
def apply(call: Call, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run `call` through the IFT core.

    Returns:
        (Z, aux): the answers (B, n), NaN rows for failed instances, differentiable in `params` and in
        trainable tensors the condition captures by closure; the per-instance aux tensors (constants).
    """
    params = list(params)
    grad = torch.is_grad_enabled()
    # Forward-mode AD does not reach into the Function's forward: tangents of captured tensors are seen
    # only by evaluating F out here (torch.autograd.forward_ad keeps its level in this module variable).
    forward_mode = getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    call.want_graph = grad
    Z, *aux = _Solve.apply(call, *params)
    aux = tuple(aux)
    if not ((grad and call.captures) or (forward_mode and not call.closed())) or call.point is None:
        # A copy: the output is the caller's to modify in place; the saved answers are the backward's.
        return Z.clone(), aux
    Zs, Ps = call.point
    if grad and call.captures:
        with torch.enable_grad(), _GuardCaptures():
            R = _ok_system(call)(Zs, Ps)
    else:  # forward mode only: F's tangent from captured dual tensors, nothing to guard for a backward
        with torch.no_grad():
            R = _ok_system(call)(Zs, Ps)
    tangent = torch.autograd.forward_ad.unpack_dual(R).tangent if forward_mode else None
    if not R.requires_grad and tangent is None:
        return Z.clone(), aux
    link = _ClosureLink.apply(call, R, *params)
    if bool(call.ok.all()):
        return Z + link, aux
    return Z.index_add(0, torch.nonzero(call.ok).flatten(), link), aux


def _ok_system(call: Call) -> System:
    ok = call.ok
    return call.system if bool(ok.all()) else call.system.rows(torch.nonzero(ok).flatten())


def _restrict(call: Call, Z, aux, params, extra=()):
    """The ok rows of a backward's point: (idx or None, system, Z, params, extra rows)."""
    system = call.system.with_aux(aux, call.batched)
    if call.vmapped:
        if not call.ok:
            raise BlackBoxDiffError(
                "An instance failed (on_failure='nan') inside torch.func.vmap, and derivatives cannot be taken "
                "through a partly failed vmapped batch. Batch with the engine's in_dims= instead of vmap, or "
                "fix the failing instance."
            )
        return None, system, Z, list(params), list(extra)
    if bool(call.ok.all()):
        return None, system, Z, list(params), list(extra)
    idx = torch.nonzero(call.ok).flatten()
    sub = system.rows(idx)
    return idx, sub, Z[idx], sub.params_rows(params, idx), [None if e is None else e[idx] for e in extra]


def _scatter(values: torch.Tensor, idx: torch.Tensor | None, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    if idx is None:
        return values
    out = torch.full(like.shape, fill, dtype=values.dtype, device=values.device)
    return out.index_put((idx,), values)


def _nothing_ok(call: Call) -> bool:
    return call.ok is None or (not call.vmapped and not bool(call.ok.any()))


def _primals(tensors) -> list[torch.Tensor]:
    """Saved tensors without their torch.autograd.forward_ad tangents: a jvp rule computes the tangent
    from the primals; tangents left on them would make torch differentiate that computation again."""
    return [torch.autograd.forward_ad.unpack_dual(t).primal for t in tensors]


def _wrapped(*tensors: torch.Tensor) -> bool:
    """Whether a torch.func transform wrapped any of these tensors (torch's functorch predicate; where it
    is missing, assume so: the transform-safe path is always correct)."""
    predicate = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return predicate is None or any(predicate(t) for t in tensors if torch.is_tensor(t))


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether a backward is a plain first-order one: no create_graph and no torch.func transform (whose
    wrapped tensors the numeric fast path cannot read)."""
    return not torch.is_grad_enabled() and not _wrapped(*tensors)


def _solution_vjp(call: Call, Z, aux, params, g, needs) -> list[torch.Tensor | None]:
    """-K^T u with J^T u = g, on the ok rows; zeros for the failed ones."""
    if _nothing_ok(call):
        return [None] * len(params)
    idx, sub, Zs, Ps, (gs,) = _restrict(call, Z, aux, params, (g,))
    plain = _plain(g, Zs, *Ps)
    if not sub.functional and _wrapped(g, Zs, *Ps):
        raise BlackBoxDiffError(
            f"torch.func transforms through the {sub.describe} condition are not supported: its residual is "
            "evaluated outside torch (a once-differentiable operator). Use torch.autograd (backward, "
            "autograd.grad, forward_ad) on it, which gives first derivatives and forward mode."
        )
    if plain:  # first order: F's graph from the forward (or one new one), plain numerics
        lin = call.linearization or Linearization(sub, Zs.detach(), [p.detach() for p in Ps])
        call.linearization = None  # a second backward (retain_graph) builds its own
        u = _solve_numeric(_LinearProblem(sub, True, lin), gs, Zs, Ps)
        call.remember_adjoint(gs, u)
        grads = [None if gr is None else -gr for gr in lin.vjp_params_graph(u, needs)]
    elif not sub.functional:  # create_graph through a condition torch differentiates once
        wanted = [i for i, need in enumerate(needs) if need]
        # z and the parameters reach the gradients through a guard that raises if a second derivative needs
        # them; the cotangent's path (the transpose, i.e. forward mode) stays exact.
        Zg, *Pg = guard([Zs, *Ps], sub)
        grads = [None] * len(params)
        for i, gr in zip(wanted, _ParamGrad.apply(_ParamGradProblem(sub, wanted), gs, Zg, *Pg), strict=True):
            grads[i] = gr
    else:
        u = _linear_solve(sub, True, gs, Zs, Ps)
        grads = [-gr for gr in Linearization(sub, Zs, Ps).vjp_params(u)]
    out: list[torch.Tensor | None] = []
    for gr, p, b, need in zip(grads, params, call.batched, needs, strict=True):
        if gr is None or not need:
            out.append(None)
            continue
        out.append(_scatter(gr, idx, p) if b else gr)
    return out


@dataclasses.dataclass(eq=False)
class _ParamGradProblem:
    system: System
    wanted: list[int]


class _ParamGrad(torch.autograd.Function):
    """-(dF/dp)^T u with J^T u = g, for a condition torch differentiates once: differentiable in the
    cotangent g (its transpose is forward mode, -J^{-1} (dF/dp) p', which needs first derivatives only),
    and a clear error for derivatives in z or the parameters (second derivatives of the condition).
    Inputs: (problem, g, Z, *params); outputs: the gradients of the parameters `problem.wanted`."""

    @staticmethod
    def forward(problem, g, Z, *params):  # noqa: D102
        sub = problem.system
        lin = Linearization(sub, Z.detach(), [p.detach() for p in params])
        u = _solve_numeric(_LinearProblem(sub, True, lin), g, Z, params)
        needs = [i in problem.wanted for i in range(len(params))]
        grads = lin.vjp_params_graph(u, needs)
        return tuple(-grads[i] if grads[i] is not None else torch.zeros_like(params[i]) for i in problem.wanted)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        problem, _, Z, *params = inputs
        ctx.problem = problem
        ctx.save_for_backward(Z, *params)

    @staticmethod
    def backward(ctx, *grad_bars):  # noqa: D102
        problem = ctx.problem
        Z, *params = ctx.saved_tensors
        dots: list[torch.Tensor | None] = [None] * len(params)
        for i, gb in zip(problem.wanted, grad_bars, strict=True):
            dots[i] = gb
        lin = Linearization(problem.system, Z.detach(), [p.detach() for p in params])
        r = lin.jvp_params(dots)
        v = _solve_numeric(_LinearProblem(problem.system, False, lin), r, Z, params)
        # z and the parameters came through `guard`: zeros here reach it only if a second derivative of the
        # condition is requested, and it raises then.
        zeros = [None if not need else torch.zeros_like(t) for need, t in zip(ctx.needs_input_grad[2:], [Z, *params],
                                                                             strict=True)]
        return (None, -v, *zeros)


def _solution_jvp(call: Call, Z, aux, params, tangents) -> torch.Tensor:
    """-J^{-1} K params' on the ok rows; zeros for the failed ones."""
    if _nothing_ok(call):
        return torch.zeros_like(Z)
    idx, sub, Zs, Ps, _ = _restrict(call, Z, aux, params)
    dots = [None if t is None else (t[idx] if (b and idx is not None) else t)
            for t, b in zip(tangents, call.batched, strict=True)]
    if not sub.functional and _wrapped(Zs, *Ps, *[d for d in dots if d is not None]):
        raise BlackBoxDiffError(
            f"torch.func transforms through the {sub.describe} condition are not supported: its residual is "
            "evaluated outside torch (a once-differentiable operator). Use torch.autograd.forward_ad (dual "
            "numbers) or torch.autograd.functional.jvp, which give forward mode."
        )
    live = [Zs, *Ps, *[d for d in dots if d is not None]]
    if sub.functional and not any(t.requires_grad for t in live) and not _wrapped(*live):
        # A tangent nothing will differentiate: one graph of F for (dF/dp) p' and the solve, plain numerics.
        dots = [None if d is None else d.detach() for d in dots]
        # F's graph from the forward's certification when it kept one (left for a backward that may follow)
        lin = call.linearization or Linearization(sub, Zs.detach(), [p.detach() for p in Ps])
        if sub.jvp_params is not None:  # stated by the condition: no second-order sweep
            with torch.no_grad():
                r = sub.jvp_params(Zs.detach(), sub.aux, [p.detach() for p in Ps], dots, sub.batched)
        else:
            r = lin.jvp_params_graph(dots)
        v = _solve_numeric(_LinearProblem(sub, False, lin), r, Zs, Ps)
        return -_scatter(v, idx, Z)
    r = Linearization(sub, Zs, Ps).jvp_params(dots)
    v = _linear_solve(sub, False, r, Zs, Ps)
    return -_scatter(v, idx, Z)


# --- vmap folding ---------------------------------------------------------------------------------
def _logical_rows(t: torch.Tensor, dim: int | None) -> int:
    return t.shape[0] if dim is None else t.movedim(dim, 0).shape[1]


def _fold(t: torch.Tensor, dim: int | None, V: int) -> torch.Tensor:
    """(rows, ...) with a vmapped dim -> (V * rows, ...), row c*rows + i; unvmapped: tiled V times."""
    if dim is None:
        return t.repeat(V, *([1] * (t.dim() - 1)))
    t = t.movedim(dim, 0)
    return t.reshape(V * t.shape[1], *t.shape[2:])


def _fold_params(params, dims, batched, V: int, B: int) -> tuple[list[torch.Tensor], tuple[bool, ...]]:
    out, flags = [], []
    for p, d, b in zip(params, dims, batched, strict=True):
        if b:
            out.append(_fold(p, d, V))
            flags.append(True)
        elif d is not None:  # shared by the instances, vmapped: one copy per instance of its vmap slice
            out.append(p.movedim(d, 0).repeat_interleave(B, dim=0))
            flags.append(True)
        else:
            out.append(p)
            flags.append(False)
    return out, tuple(flags)


def _call_rows(call: Call, params, dims) -> int:
    for p, d, b in zip(params, dims, call.batched, strict=True):
        if b:
            return _logical_rows(p, d)
    return 1
