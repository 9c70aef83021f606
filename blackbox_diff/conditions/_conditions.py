"""Optimality conditions: one small residual type per problem class.

Each condition states an invariant ``residual(z, *params) == 0`` that the black box's answer satisfies,
and a structure hint that tells the adjoint solver what kind of Jacobian ``dF/dz`` to expect. Residuals are
written per instance with torch.func so the engine can vmap them over a batch and differentiate them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch

from blackbox_diff._errors import InputError
from blackbox_diff.conditions._active_set import kkt_degeneracy, kkt_unknowns
from blackbox_diff.conditions._solution import KKTSolution

__all__ = ["AbstractCondition", "Argmin", "FixedPoint", "KKT", "KKTSolution", "Root", "Structure"]

Structure = Literal["general", "symmetric", "spd", "fixed_point", "identity"]


class AbstractCondition(abc.ABC):
    """An optimality condition F(z, *params) = 0 that holds at the black box's answer.

    Subclasses define `residual`, and may override `prepare`/`finish` when the black box's answer is
    not the unknown vector itself (KKT multipliers, active sets).
    """

    structure: ClassVar[Structure] = "general"
    # True when `prepare` wants the black box's raw answer (e.g. a KKTSolution) rather than a tensor.
    raw_solution: ClassVar[bool] = False
    # False when `residual` cannot run under torch.func.vmap (calls into numpy, CasADi, .item(), ...):
    # the batch is then evaluated in a loop without a failed vmap attempt first.
    vmappable: ClassVar[bool] = True
    # False when `residual` goes through code torch differentiates only once (an external library inside
    # a once-differentiable torch.autograd.Function): the engine then gives first derivatives and forward
    # mode through plain autograd, and a clear BlackBoxDiffError for second derivatives and torch.func.
    functional: ClassVar[bool] = True
    # True when `residual` reaches no tensor but its arguments (a backend's own condition, not a user's
    # closure): forward mode then skips the evaluation of F that looks for captured tensors' tangents.
    closed: ClassVar[bool] = False
    # True when `jvp_params` also takes a whole batch (leading dimension on z, aux and batched parameters;
    # shared parameters without one): the engine then calls it once instead of under torch.func.vmap.
    batched_jvp_params: ClassVar[bool] = False

    @abc.abstractmethod
    def residual(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        """F(z, *params) for one instance: a tensor with as many elements as z."""

    def certificate(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        """The vector whose largest magnitude certifies the answer (default: the residual)."""
        return self.residual(z, *params)

    def residual_scale(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        """The size of the terms each `certificate` component is made of (nonnegative, its shape).

        Certification compares every component with its own terms, so that units and large unknowns elsewhere
        cannot loosen or tighten the test. The default is estimated by the engine from the certificate's
        derivatives (a few forward-mode products); override it when the terms are known and cheap (e.g.
        ``|Q| |x| + |p| + |A^T| |y|`` for a QP's stationarity rows).
        """
        raise NotImplementedError  # never called: the engine checks whether a subclass overrides it

    def certify(self, Z: torch.Tensor, aux: tuple, params: list, batched: tuple[bool, ...]) -> tuple[Any, Any]:
        """Optional: `certificate` and `residual_scale` for a whole batch at once, as numpy arrays (B, m).

        Z is (B, n) (the flattened unknowns), each aux tensor has a leading batch dimension, and params[i] has
        one where batched[i]. Certification then costs no torch operations and no vmap: for a backend whose
        condition is a few products of its data (a QP), or whose solver already evaluated everything at the
        answer (CasADi's polish), this is a small fraction of a backward.

        It may return a third element: then the second is the term sizes from below (e.g. the magnitudes of
        the partial sums each component is made of, free once the certificate is computed) and the third a
        function returning the exact ones, which certification calls only when the certificate does not pass
        against the bound (a bound from below only makes the test stricter: what passes against it passes),
        and a fourth: the largest |certificate| / size over the batch (0 where both vanish, inf where only
        the size does or for NaN), when the code that computed them found it on the way; the engine then
        compares it with the tolerance instead of scanning the arrays again (None: it scans).
        Not overridden, or returning None (a kind of problem it does not cover): the engine evaluates
        `certificate` and `residual_scale` (or estimates the term sizes).
        """
        raise NotImplementedError  # never called: the engine checks whether a subclass overrides it

    def jvp_params(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        """(dF/dparams) dparams for one instance: ``rest`` is (*aux, *params, *tangents), one tangent per
        parameter (zeros where it has none), flattened like `residual`.

        Optional: where F is linear in its parameters (a QP's KKT conditions) this is F's own parameter part
        evaluated at the tangents, one cheap pass; otherwise the engine derives it from F's graph (two
        reverse sweeps), which is what forward mode then costs beyond a backward.
        """
        raise NotImplementedError  # never called: the engine checks whether a subclass overrides it

    def certificate_blocks(self) -> Sequence[int] | None:
        """Sizes of the consecutive parts of one instance's flattened `certificate` that are in their own
        units (e.g. stationarity rows, then equality rows, then inequality rows), or None (the default: one
        part). Certification's floor for components whose terms all vanish is taken per part, so a part in
        units of 1e-6 beside one in units of 1 is not loosened by it. Called after `prepare`."""
        return None

    def prepare(self, solution: Any, params: tuple[Any, ...], options: Any) -> tuple[torch.Tensor, tuple]:
        """Turn one black-box answer (already a tensor for this base) into (z, aux).

        `aux` holds per-instance tensors that `residual` receives after z and before the parameters.
        """
        return solution, ()

    def finish(self, z: torch.Tensor, aux: tuple, options: Any) -> Any:
        """Map the batched unknowns z (B, *shape) back to what the user receives."""
        return z

    def degeneracy(self, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Any:
        """A `blackbox_diff.engine.Degeneracy` when one prepared answer (z, aux) sits at a degenerate point
        (dependent active constraints, a weakly active one), listing the admissible one-sided statements of
        the condition; None (the default) for a regular point. The engine compares the derivatives of the
        outputs under every variant (see the `degenerate` option)."""
        return None

    def describe(self) -> str:
        return type(self).__name__


def _check_callable(fn: Any, what: str, cls: str) -> None:
    if not callable(fn):
        raise InputError(
            f"{cls} expects {what} to be a callable taking (z, *params) and returning a tensor; "
            f"got {type(fn).__name__}. Pass a function, e.g. {cls}(lambda z, w: z**2 - w)."
        )


class Root(AbstractCondition):
    """The black box returns z with ``F(z, *params) == 0`` (F square: as many outputs as z).

    Args:
        F: the residual, per instance.
        structure: what is known of dF/dz: "general" (default), "symmetric" (e.g. F is a gradient or a
            KKT system: MINRES), "spd" (F is the gradient of a strictly convex function: CG), or
            "identity" (F is preconditioned, e.g. J(z*)^{-1} G(z, params) with J factored at the answer,
            so dF/dz = I there: the adjoint is g itself, checked with one VJP, escalating if it is not).
    """

    structure = "general"

    def __init__(self, F: Callable[..., torch.Tensor], structure: Structure = "general") -> None:
        _check_callable(F, "F", "Root")
        if structure not in ("general", "symmetric", "spd", "fixed_point", "identity"):
            raise InputError(
                "Root(structure=...) must be 'general', 'symmetric', 'spd', 'fixed_point' or 'identity'; "
                f"got {structure!r}."
            )
        self.F = F
        self.structure = structure

    def residual(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        return self.F(z, *params)


class FixedPoint(AbstractCondition):
    """The black box returns z with ``z == T(z, *params)``; residual z - T(z, *params)."""

    structure = "fixed_point"

    def __init__(self, T: Callable[..., torch.Tensor]) -> None:
        _check_callable(T, "T", "FixedPoint")
        self.T = T

    def residual(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        return z - self.T(z, *params)


class Argmin(AbstractCondition):
    """The black box returns a (local) minimiser z of the scalar ``f(z, *params)``; residual grad_z f.

    The adjoint system is the Hessian, symmetric positive definite at a strict local minimum, so the
    default adjoint solver is CG on Hessian-vector products (no Hessian is formed).
    """

    structure = "spd"
    # The answer should be a minimiser: the engine warns when the Hessian there has negative curvature.
    minimises = True

    def __init__(self, f: Callable[..., torch.Tensor]) -> None:
        _check_callable(f, "f", "Argmin")
        self.f = f

    def _scalar(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        value = self.f(z, *params)
        if value.numel() != 1:
            raise InputError(
                f"Argmin expects f to return a scalar; it returned shape {tuple(value.shape)}. "
                "Sum or reduce the objective inside f."
            )
        return value.reshape(())

    def residual(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        return torch.func.grad(self._scalar)(z, *params)


def _flat(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return like.new_zeros(0)
    return t.reshape(-1)


class KKT(AbstractCondition):
    """x solves ``min f(x, *params) s.t. eq(x, *params) == 0, ineq(x, *params) <= 0``.

    The unknowns are z = (x, nu, lam). The residual is stated on the active set A identified at the
    black box's answer (from slacks and multipliers together):

        grad_x [f + nu^T h + (a*lam)^T g] = 0,   h = 0,   a*g + (1-a)*lam = 0,

    with a the 0/1 indicator of A. Inactive multipliers are pinned to zero, active constraints hold with
    equality, so the Jacobian is the symmetric KKT matrix of the equality-constrained problem on A. This
    is the explicit-active-set form; the complementarity form lam*g = 0 at an interior-point iterate is
    biased when a constraint is weakly active, and is not used.
    """

    structure = "symmetric"
    raw_solution = True

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        eq: Callable[..., torch.Tensor] | None = None,
        ineq: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        _check_callable(f, "f", "KKT")
        if eq is not None:
            _check_callable(eq, "eq", "KKT")
        if ineq is not None:
            _check_callable(ineq, "ineq", "KKT")
        self.f, self.eq, self.ineq = f, eq, ineq
        # Set by `prepare` on the engine's per-call copy of the condition, never on the user's object.
        self._sizes: tuple[torch.Size, int, int] | None = None

    # --- sizes -------------------------------------------------------------------------------
    def h(self, x: torch.Tensor, *params: Any) -> torch.Tensor:
        return _flat(None if self.eq is None else self.eq(x, *params), x)

    def g(self, x: torch.Tensor, *params: Any) -> torch.Tensor:
        return _flat(None if self.ineq is None else self.ineq(x, *params), x)

    def set_sizes(self, x_shape: torch.Size, n_eq: int, n_ineq: int) -> None:
        self._sizes = (torch.Size(x_shape), n_eq, n_ineq)

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape, p, m = self._sizes  # type: ignore[misc]
        n = shape.numel()
        return z[:n].reshape(shape), z[n : n + p], z[n + p : n + p + m]

    # --- residual ------------------------------------------------------------------------------
    def lagrangian(self, x, nu, lam, active, kept, *params):
        value = self.f(x, *params).reshape(())
        if nu.numel():
            value = value + (kept * nu * self.h(x, *params)).sum()
        if lam.numel():
            value = value + (active * lam * self.g(x, *params)).sum()
        return value

    def residual(self, z: torch.Tensor, active: torch.Tensor, kept: torch.Tensor, *params: Any) -> torch.Tensor:
        """KKT on the active set: `active` marks the inequalities held with equality, `kept` the equalities
        stated (1 except for redundant ones dropped at a degenerate point, whose multipliers are pinned)."""
        x, nu, lam = self.split(z)
        stationarity = torch.func.grad(self.lagrangian)(x, nu, lam, active, kept, *params).reshape(-1)
        parts = [stationarity]
        if nu.numel():
            parts.append(kept * self.h(x, *params) + (1 - kept) * nu)
        if lam.numel():
            parts.append(active * self.g(x, *params) + (1 - active) * lam)
        return torch.cat(parts)

    def certificate_blocks(self) -> Sequence[int] | None:
        """Stationarity, equality rows, inequality rows, then the dropped equalities', inactive rows' and
        multiplier signs' parts."""
        if self._sizes is None:
            return None
        shape, p, m = self._sizes
        return (shape.numel(), p, m, p, m, m)

    def certificate(self, z: torch.Tensor, active: torch.Tensor, kept: torch.Tensor, *params: Any) -> torch.Tensor:
        """Residual plus feasibility of dropped equalities and inactive inequalities, and dual feasibility of
        active ones."""
        r = self.residual(z, active, kept, *params)
        x, nu, lam = self.split(z)
        parts = [r]
        if nu.numel():
            parts.append((1 - kept) * self.h(x, *params))
        if lam.numel():
            g = self.g(x, *params)
            parts += [(1 - active) * torch.relu(g), active * torch.relu(-lam)]
        return torch.cat(parts)

    # --- black-box answer -> unknowns ----------------------------------------------------------
    def prepare(self, solution: Any, params: tuple[Any, ...], options: Any) -> tuple[torch.Tensor, tuple]:
        return kkt_unknowns(self, solution, params, options)

    def degeneracy(self, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Any:
        return kkt_degeneracy(self, z, aux, params, options)

    def finish(self, z: torch.Tensor, aux: tuple, options: Any) -> Any:
        shape, p, m = self._sizes  # type: ignore[misc]
        n = shape.numel()
        x = z[..., :n].reshape(*z.shape[:-1], *shape)
        if not options.return_duals:
            return x
        return KKTSolution(x=x, eq=z[..., n : n + p], ineq=z[..., n + p : n + p + m])
