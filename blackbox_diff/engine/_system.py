"""The optimality condition of one call, on flat unknowns, batched over instances; its derivatives.

A `System` is ``F(Z, aux, params) = 0``: Z holds the black box's answers, one row of n unknowns per
instance; aux holds per-instance constants (an active set, a factorisation); params are the call's
tensors, each either batched (row i belongs to instance i) or shared. Invariant: row i of F depends only
on row i of Z, of aux and of the batched parameters, so dF/dZ is block diagonal and the linear systems of
the implicit function theorem split into B independent n x n systems.

Everything the IFT needs from F is here, in two implementations:

* the *functional* one (torch.func.vjp / grad on F), which composes with every torch transform (double
  backward, forward mode, vmap, jacrev, jacfwd): used when derivatives must themselves be differentiable;
* the *graph* one (plain autograd on detached leaves), used by first-order backward passes and for
  residuals that torch.func cannot trace (a condition evaluated by an external library inside a
  once-differentiable autograd.Function): first derivatives only, second ones raise `BlackBoxDiffError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from blackbox_diff import linalg
from blackbox_diff._errors import BlackBoxDiffError

__all__ = ["Linearization", "System", "first_order_only", "guard", "once"]

# residual(Z, aux, params, batched) -> (B, n); `batched` says which parameters carry the batch in dim 0.
Residual = Callable[[torch.Tensor, tuple, Sequence[torch.Tensor], tuple], torch.Tensor]
_SYMMETRIC = ("symmetric", "spd", "identity")


@dataclasses.dataclass(eq=False)
class System:
    """F(Z, aux, params) on B instances (see the module docstring for the invariant).

    Attributes:
        residual: batched residual (B, n) -> (B, n), written in torch.
        aux: per-instance constants, each (B, ...); never differentiated.
        batched: per parameter, whether its dim 0 is the batch.
        structure: what is known of dF/dz per instance ("general", "symmetric", "spd", "fixed_point",
            "identity"); chooses the linear solver.
        options: the engine options (linear_solver, rtol, max_steps, ridge, fallback, dense_max_size).
        describe: the condition's name, for messages.
        functional: whether `residual` composes with torch.func transforms (False for residuals that call
            external code through once-differentiable autograd.Functions).
        independent: whether row independence holds by construction (a per-instance condition mapped over
            the batch). When it is only claimed (a batched field that should act row by row: DEQ, odeint
            with batch_dims), dense adjoint solutions are verified against the exact operator.
        foldable: whether `residual` accepts any number of rows (vmap then folds its dimension into the
            batch); otherwise vmapped linear solves run one vmap slice at a time.
        coupling_hint: what to tell the user when the rows turn out to be coupled.
        jvp_params: (Z, aux, params, tangents, batched) -> (dF/dparams) tangents (B, n), when the condition
            states it directly (F linear in its parameters, e.g. a QP's KKT conditions); None: the engine
            derives it (the double-VJP trick on F's graph, two reverse sweeps).
    """

    residual: Residual
    aux: tuple[torch.Tensor, ...]
    batched: tuple[bool, ...]
    structure: str
    options: Any
    describe: str = "condition"
    functional: bool = True
    independent: bool = True
    foldable: bool = True
    coupling_hint: str = ""
    jvp_params: Callable | None = None

    def rows(self, idx: torch.Tensor) -> System:
        """The system of the instances `idx` only."""
        return dataclasses.replace(self, aux=tuple(a[idx] for a in self.aux))

    def tiled(self, copies: int, batched: tuple[bool, ...]) -> System:
        """The system repeated `copies` times along the batch (rows c*B + i), with new batched flags."""
        return dataclasses.replace(
            self, aux=tuple(a.repeat(copies, *([1] * (a.dim() - 1))) for a in self.aux), batched=batched
        )

    def params_rows(self, params: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
        return [p[idx] if b else p for p, b in zip(params, self.batched, strict=True)]

    def with_aux(self, aux: Sequence[torch.Tensor], batched: tuple[bool, ...]) -> System:
        """The same condition at other aux tensors and batch layout (e.g. as a backward sees them)."""
        return dataclasses.replace(self, aux=tuple(aux), batched=tuple(batched))

    def __call__(self, Z: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.residual(Z, self.aux, params, self.batched)


def _zeros_if_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(xs, ys, strict=True))


class Linearization:
    """F linearised at (Z, params): the products and derivatives the IFT needs, for one system.

    The graph implementation evaluates F once on detached leaves and reuses that graph for every
    product (no re-tracing in Krylov loops). The functional implementation goes through torch.func, so
    that what it returns is itself differentiable by whatever transform is active.
    """

    def __init__(self, system: System, Z: torch.Tensor, params: Sequence[torch.Tensor],
                 graph: tuple | None = None) -> None:
        self.system, self.Z, self.params = system, Z, list(params)
        self._graph = graph
        self._double = None

    # --- the graph (first order) ---------------------------------------------------------------
    def graph(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(R, Z leaf, parameter leaves): F evaluated once on detached leaves, with its graph."""
        if self._graph is None:
            with torch.enable_grad():
                Zl = self.Z.detach().requires_grad_(True)
                Pl = [p.detach().requires_grad_(p.is_floating_point()) for p in self.params]
                R = self.system(Zl, Pl)
            if not R.requires_grad or R.grad_fn is None:
                raise BlackBoxDiffError(
                    f"The {self.system.describe} residual does not depend on z, so dF/dz is zero and the implicit "
                    "function theorem cannot be applied. Check that the condition uses its first argument."
                )
            self._graph = (R, Zl, Pl)
        return self._graph

    def vjp_z(self, v: torch.Tensor) -> torch.Tensor:
        """(dF/dz)^T v, row by row (graph)."""
        R, Zl, _ = self.graph()
        (out,) = torch.autograd.grad(R, Zl, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if out is None else out

    def vjp_z_batched(self, V: torch.Tensor) -> torch.Tensor:
        """(dF/dz)^T V[k] for a stack of k cotangents (k, B, n): one batched sweep, else a loop."""
        R, Zl, _ = self.graph()
        try:
            (out,) = torch.autograd.grad(R, Zl, V, retain_graph=True, is_grads_batched=True, allow_unused=True)
            return torch.zeros_like(V) if out is None else out
        except (RuntimeError, NotImplementedError, TypeError):  # an op without a batching rule: loop
            return torch.stack([self.vjp_z(v) for v in V])

    def jvp_z(self, v: torch.Tensor) -> torch.Tensor:
        """(dF/dz) v, row by row: a VJP for symmetric Jacobians, else the double-VJP trick, else dense."""
        if self.system.structure in _SYMMETRIC:
            return self.vjp_z(v)
        if self._double is None:
            R, Zl, _ = self.graph()
            w = torch.zeros_like(R, requires_grad=True)
            try:
                with torch.enable_grad():
                    (JTw,) = torch.autograd.grad(R, Zl, w, create_graph=True, retain_graph=True)
                self._double = (w, JTw) if JTw.requires_grad else False
            except RuntimeError:  # once-differentiable residual
                self._double = False
        if self._double is False:
            return torch.einsum("bij,bj->bi", self.dense(transpose=False), v)
        w, JTw = self._double
        (out,) = torch.autograd.grad(JTw, w, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if out is None else out

    def dense(self, transpose: bool) -> torch.Tensor:
        """(dF/dz)^T (transpose) or dF/dz, materialised (B, n, n) by n batched VJPs."""
        if getattr(self, "_dense_T", None) is None:
            B, n = self.Z.shape
            self._dense_T = linalg.materialize(
                self.vjp_z, n, batch=B, dtype=self.Z.dtype, device=self.Z.device, batched_matvec=self.vjp_z_batched
            )
        return self._dense_T if transpose else self._dense_T.transpose(1, 2)

    def vjp_params_graph(self, u: torch.Tensor, needs: Sequence[bool] | None = None) -> list[torch.Tensor | None]:
        """(dF/dparams)^T u per parameter (graph): None where a parameter needs no gradient."""
        R, _, Pl = self.graph()
        want = [i for i, p in enumerate(Pl) if p.requires_grad and (needs is None or needs[i])]
        out: list[torch.Tensor | None] = [None] * len(Pl)
        if want:
            grads = torch.autograd.grad(R, [Pl[i] for i in want], u, retain_graph=True, allow_unused=True)
            for i, g in zip(want, grads, strict=True):
                out[i] = torch.zeros_like(Pl[i]) if g is None else g
        return out

    def jvp_params_graph(self, tangents: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(dF/dparams) tangent on the graph (first order, plain tensors): the double-VJP trick, one graph."""
        R, _, Pl = self.graph()
        pairs = [(p, t) for p, t in zip(Pl, tangents, strict=True) if t is not None and p.requires_grad]
        if not pairs:
            return torch.zeros_like(R)
        c = torch.zeros_like(R, requires_grad=True)
        with torch.enable_grad():
            grads = torch.autograd.grad(R, [p for p, _ in pairs], c, create_graph=True, retain_graph=True,
                                        allow_unused=True)
            pairing = sum((g * t).sum() for g, (_, t) in zip(grads, pairs, strict=True) if g is not None)
        if not torch.is_tensor(pairing) or not pairing.requires_grad:
            return self._jvp_params_dense(list(tangents))
        (out,) = torch.autograd.grad(pairing, c, allow_unused=True, retain_graph=True)  # R's graph may serve on
        return torch.zeros_like(R) if out is None else out

    # --- functional (differentiable, transform-friendly) -----------------------------------------
    def _F(self, Z: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return self.system(Z, params)

    def vjp_params(self, u: torch.Tensor) -> list[torch.Tensor]:
        """(dF/dparams)^T u, differentiable in u, Z and params."""
        if not self.system.functional:
            return once([g if g is not None else torch.zeros_like(p)
                          for g, p in zip(self.vjp_params_graph(u), self.params, strict=True)], self.system,
                        inputs=[self.Z, *self.params, u])
        _, fn = torch.func.vjp(lambda *P: self._F(self.Z, *P), *self.params)
        return list(fn(u))

    def jvp_params(self, tangents: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(dF/dparams) tangent: the directional derivative of F along the parameters, Z fixed."""
        dots = [torch.zeros_like(p) if t is None else t for p, t in zip(self.params, tangents, strict=True)]
        if not self.system.functional:
            return self._jvp_params_dense(dots)

        def pairing(c: torch.Tensor) -> torch.Tensor:
            _, fn = torch.func.vjp(lambda *P: self._F(self.Z, *P), *self.params)
            return _dot(fn(c), dots)

        # <c, (dF/dp) p'> = <(dF/dp)^T c, p'> is linear in c: its gradient is the tangent (no forward-mode
        # AD inside, so this also runs inside torch.autograd.forward_ad, which does not nest).
        return torch.func.grad(pairing)(torch.zeros_like(self.Z))

    def _jvp_params_dense(self, dots: list[torch.Tensor]) -> torch.Tensor:
        """(dF/dp) p' from VJPs (rows of dF/dp): for residuals torch can differentiate only once.

        A parameter shared by several instances sums their rows in one VJP, so each instance then gets a
        cotangent of its own (B n VJPs instead of n).
        """
        B, n = self.Z.shape
        shared = B > 1 and any(not b for b, d in zip(self.system.batched, dots, strict=True) if bool(d.any()))
        out = torch.zeros_like(self.Z)
        for j in range(n):
            for i in range(B) if shared else [None]:
                e = torch.zeros_like(self.Z)
                if i is None:
                    e[:, j] = 1.0
                else:
                    e[i, j] = 1.0
                grads = self.vjp_params_graph(e)
                for g, d, b in zip(grads, dots, self.system.batched, strict=True):
                    if g is None:
                        continue
                    if b:
                        out[:, j] += (g * d).reshape(B, -1).sum(dim=1)
                    elif i is None:
                        out[:, j] += (g * d).sum()
                    else:
                        out[i, j] += (g * d).sum()
        return out

    def bilinear(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradients of <a, (dF/dz)(Z, params) b> with respect to Z and the params (a, b held fixed)."""
        if not self.system.functional:
            raise BlackBoxDiffError(
                f"Second derivatives through the {self.system.describe} condition are not supported: its residual "
                "is evaluated outside torch (a once-differentiable operator), so torch cannot differentiate it "
                "twice. First-order gradients and forward mode (jvp) work; for Hessians, write the condition in "
                "torch (bbd.Root/Argmin/KKT) or use finite differences of the gradient."
            )

        def pairing(Z: torch.Tensor, *P: torch.Tensor) -> torch.Tensor:
            _, fn = torch.func.vjp(lambda Zv: self._F(Zv, *P), Z)
            return (fn(a)[0] * b).sum()

        grads = torch.func.grad(pairing, argnums=tuple(range(1 + len(self.params))))(self.Z, *self.params)
        return grads[0], list(grads[1:])

    def directional(self, x: torch.Tensor, transpose: bool, Zdot: torch.Tensor | None,
                    Pdots: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """d/de [A(Z + e Z', params + e P') x] with A = (dF/dz)^T or dF/dz: the tangent of a linear solve."""
        dots = [torch.zeros_like(self.Z) if Zdot is None else Zdot]
        dots += [torch.zeros_like(p) if t is None else t for p, t in zip(self.params, Pdots, strict=True)]

        def pairing(c: torch.Tensor) -> torch.Tensor:
            gZ, gP = self.bilinear(x, c) if transpose else self.bilinear(c, x)
            return _dot([gZ, *gP], dots)

        return torch.func.grad(pairing)(torch.zeros_like(x))


class _Once(torch.autograd.Function):
    """x, attached to `anchors`; its derivative raises: marks a gradient torch cannot differentiate again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, message, *anchors):  # noqa: D102
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        raise BlackBoxDiffError(ctx.message)

    @staticmethod
    def jvp(ctx, *tangents):  # noqa: D102
        raise BlackBoxDiffError(ctx.message)


def guard(tensors: list[torch.Tensor], system: System) -> list[torch.Tensor]:
    """`tensors` behind an identity whose derivative raises the "second derivatives not supported" error of
    a condition evaluated outside torch (only if a derivative actually flows through it)."""
    message = (
        f"Second derivatives through the {system.describe} condition are not supported: its residual is "
        "evaluated outside torch (a once-differentiable operator). First-order gradients and forward mode work."
    )
    return [_Once.apply(t, message) if t.requires_grad else t for t in tensors]


def once(grads: list[torch.Tensor], system: System, what: str | None = None,
         inputs: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """`grads` as they are, marked so that differentiating them again raises a clear error.

    Args:
        grads: first-order gradients computed without a differentiable graph.
        system: the system they belong to (its name goes into the message).
        what: what is unsupported; default: a condition evaluated outside torch.
        inputs: the tensors the gradients truly depend on (the answers, the parameters): the mark hangs
            from them, so that differentiating the gradients with respect to them reaches it.
    """
    if not torch.is_grad_enabled():
        return grads
    reason = what or "its residual is evaluated outside torch (a once-differentiable operator)"
    message = (
        f"Second derivatives through the {system.describe} condition with respect to {reason} are not "
        "supported. First-order gradients and forward mode work."
        if what else
        f"Second derivatives through the {system.describe} condition are not supported: {reason}. First-order "
        "gradients and forward mode work."
    )
    return first_order_only(grads, message, inputs)


def first_order_only(grads: list[torch.Tensor], message: str, inputs: Sequence[torch.Tensor] = ()
                     ) -> list[torch.Tensor]:
    """`grads` hung from `inputs` (those that require grad) through a node whose derivative raises
    `BlackBoxDiffError(message)`: for gradients computed outside autograd, under create_graph."""
    anchors = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    return [_Once.apply(g, message, *anchors) for g in grads]
