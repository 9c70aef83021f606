"""`BoxArgmin`: a minimiser under box bounds, with its active bounds identified like KKT constraints."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from blackbox_diff import AbstractCondition, Argmin
from blackbox_diff.engine import Degeneracy
from blackbox_diff.kkt import classify, warn_weakly_active

__all__ = ["BoxArgmin"]

# Weakly active bounds beyond this many are warned about without comparing their 2^k one-sided derivatives.
MAX_WEAK = 10

# The multipliers of the bounds are read off the gradient at the solver's answer, so they carry the
# solver's stationarity error: a bound counts as weakly active below this many times that error too.
STATIONARITY_FACTOR = 10.0


class BoxArgmin(AbstractCondition):
    """z minimises ``f(z, *params)`` subject to ``lb <= z <= ub``.

    The bounds are the inequalities ``lb - z <= 0`` and ``z - ub <= 0`` with multipliers ``max(+-grad f,
    0)``, and `prepare` splits them as the KKT machinery does (`classify`: slack and multiplier together)
    into held at a bound / free. The residual is then ``z - bound`` on held components (their derivative
    in the parameters is zero) and ``grad f`` on free ones. A weakly active bound (slack and multiplier
    both within tolerance: the solution map may have a kink there) is reported to the engine as a
    degenerate point (`degeneracy`): the derivatives with it held and free are compared, and where they
    differ the engine warns and returns the derivative of the solver's answer: free when the answer is
    strictly inside the box (a minimiser at 1e-10 above its bound is inactive) or on the bound with the
    gradient pointing inward, held when it sits on the bound with the gradient pushing outward.

    The tolerance is the engine's ``active_tol``, raised to ``STATIONARITY_FACTOR`` times the largest
    gradient on components away from their bounds: a multiplier read off a gradient is only as accurate
    as the solver's stationarity (L-BFGS-B's relative-decrease test leaves ~1e-7 where ``tol=1e-12``).
    """

    structure = "general"

    def __init__(self, f: Any, lb: np.ndarray, ub: np.ndarray) -> None:
        self.argmin = Argmin(f)
        self.f = f
        self.lb = torch.as_tensor(np.asarray(lb, dtype=np.float64))
        self.ub = torch.as_tensor(np.asarray(ub, dtype=np.float64))

    def _bounds(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lb = self.lb.to(dtype=z.dtype, device=z.device).reshape(z.shape)
        ub = self.ub.to(dtype=z.dtype, device=z.device).reshape(z.shape)
        return lb, ub

    def _classify(self, z: torch.Tensor, params: tuple, options: Any):
        """(held at lb, held at ub, weak at lb, weak at ub, tolerance) for the answer z (see the class)."""
        grad = self.argmin.residual(z, *params).detach()
        lb, ub = self._bounds(z)
        has_lb, has_ub = torch.isfinite(lb), torch.isfinite(ub)
        lo_slack = torch.where(has_lb, z - lb, torch.full_like(z, torch.inf))
        up_slack = torch.where(has_ub, ub - z, torch.full_like(z, torch.inf))
        away = (lo_slack > options.active_tol) & (up_slack > options.active_tol)
        stationarity = float(grad[away].abs().max()) if bool(away.any()) else 0.0
        tol = max(options.active_tol, STATIONARITY_FACTOR * stationarity)
        lo, lo_weak = classify(-lo_slack, grad.clamp(min=0.0), tol)
        up, up_weak = classify(-up_slack, (-grad).clamp(min=0.0), tol)
        lo_weak, up_weak = lo_weak & has_lb, up_weak & has_ub & ~lo_weak
        # A weakly active bound is held only where the solver's answer is on it with the gradient pushing
        # outward; on it with the gradient pointing inward, the answer itself says the bound is not active.
        lo = lo & has_lb & (~lo_weak | ((lo_slack <= 0) & (grad > 0)))
        up = up & has_ub & (~up_weak | ((up_slack <= 0) & (grad < 0))) & ~lo
        return lo, up, lo_weak, up_weak, tol

    def prepare(self, solution: Any, params: tuple[Any, ...], options: Any) -> tuple[torch.Tensor, tuple]:
        """(z, (held at lb, held at ub)) from the solver's answer."""
        z = solution
        lo, up, *_ = self._classify(z, params, options)
        return z, (lo.to(z.dtype), up.to(z.dtype))

    def degeneracy(self, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Any:
        """Weakly active bounds: every held / free choice of them is an admissible statement (bounds on
        distinct entries are always independent), so the engine compares the derivatives under each and
        warns where they differ. Beyond MAX_WEAK weakly active bounds, the one warning without comparison."""
        _, _, lo_weak, up_weak, tol = self._classify(z, params, options)
        weak = torch.nonzero((lo_weak | up_weak).reshape(-1)).flatten().tolist()
        if not weak:
            return None
        shown = f"max(active_tol, {STATIONARITY_FACTOR:g} x the stationarity error)={tol:.3g}"
        if len(weak) > MAX_WEAK:
            warn_weakly_active(
                "scipy backend: bounds on entries", weak, shown,
                "the derivative of the solver's answer (entries strictly inside the box free, entries on a bound "
                "with the gradient pushing outward held there)", stacklevel=5,
            )
            return None
        at_lb, at_ub = (a.reshape(-1) for a in aux)
        on_lb = lo_weak.reshape(-1)
        variants, labels = [], []
        for mask in range(1 << len(weak)):
            lo, up = at_lb.clone(), at_ub.clone()
            for k, j in enumerate(weak):
                held = float(mask >> k & 1)
                lo[j], up[j] = (held, 0.0) if bool(on_lb[j]) else (0.0, held)
            if torch.equal(lo, at_lb) and torch.equal(up, at_ub):
                continue  # the answer's own statement: the engine differentiates it anyway
            variants.append((z.reshape(-1), (lo.reshape(at_lb.shape), up.reshape(at_ub.shape))))
            held = [j for k, j in enumerate(weak) if mask >> k & 1]
            labels.append(f"weakly active bounds {held} held, {[j for j in weak if j not in held]} free")
        return Degeneracy(variants=variants, constraints=weak, outputs=z.numel(), labels=labels,
                          kind=f"scipy backend: bounds on entries {weak} are weakly active (slack and multiplier "
                          f"both <= {shown})")

    def residual(self, z: torch.Tensor, at_lb: torch.Tensor, at_ub: torch.Tensor, *params: Any) -> torch.Tensor:
        grad = self.argmin.residual(z, *params)
        lb, ub = self._bounds(z)
        lb, ub = torch.nan_to_num(lb, posinf=0.0, neginf=0.0), torch.nan_to_num(ub, posinf=0.0, neginf=0.0)
        return at_lb * (z - lb) + at_ub * (z - ub) + (1 - at_lb - at_ub) * grad

    def describe(self) -> str:
        return "BoxArgmin"
