"""Batched Neumann-series (Richardson) iteration for systems close to the identity."""

from __future__ import annotations

import torch

from ._krylov import Matvec, bnorm, check_count, finish, setup
from ._result import LinearSolution

__all__ = ["neumann"]

_DEFAULT_PATIENCE = 10
# The contraction rate, not n, sets the work: rate 0.95 needs about 450 steps to gain 1e-10.
_MIN_DEFAULT_STEPS = 500


def neumann(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_steps: int | None = None,
    patience: int = _DEFAULT_PATIENCE,
) -> LinearSolution:
    """Solve ``A_i x_i = b_i`` by the Richardson iteration ``x <- x + (b - A x)``.

    From ``x0 = 0`` the iterates are the partial sums of the Neumann series
    ``x_k = sum_{j<k} (I - A)^j b``; the residual obeys ``r_{k+1} = (I - A) r_k``, so the iteration
    converges for every start exactly when the spectral radius of ``I - A`` is below one (typical of
    fixed points ``z = T(z)`` with ``A = I - dT/dz`` and a contractive ``T``). Invariant: ``r`` is the
    true residual ``b - A x``, recomputed with one operator application per iteration.

    Stopping, per instance: ``||r|| <= max(rtol * ||b||, atol)``; divergence, i.e. a non-finite
    residual or a residual that grew for ``patience`` consecutive iterations (``breakdown``); or
    ``max_steps`` iterations. Every instance returns its best iterate (smallest residual seen).

    Args:
        matvec: batched operator, ``(B, n) -> (B, n)``, row ``i`` is ``A_i @ v_i``.
        b: right-hand sides, shape ``(B, n)``; dtype and device of the computation.
        x0: optional starting point, same shape/dtype/device as ``b``.
        rtol: relative tolerance on the residual norm, ``>= 0``.
        atol: absolute tolerance on the residual norm, ``>= 0``.
        max_steps: iteration cap (one operator application each), ``>= 1``; ``None`` means
            ``max(10 * n, 500)`` (the rate of contraction, not ``n``, sets the work here).
        patience: consecutive residual increases that count as divergence, ``>= 1``. Non-normal
            contractions can grow transiently, hence more than one.

    Returns:
        A `LinearSolution`; ``residual_norm`` is the true residual of the returned iterate (no
        extra application is needed: each iteration computes it).

    Raises:
        ValueError: an argument has the wrong type, shape or range, or ``matvec`` returns a wrong shape.
    """
    problem = setup(matvec, b, x0, rtol, atol, max_steps, min_default_steps=_MIN_DEFAULT_STEPS)
    patience = check_count(patience, "patience", _DEFAULT_PATIENCE)
    x, r, tol, op = problem.x, problem.r, problem.tol, problem.op
    iterations, breakdown = problem.counters()
    rn = bnorm(r)
    breakdown |= ~torch.isfinite(rn)
    best_x, best_r, best_rn = x, r, rn
    growth = torch.zeros_like(iterations)
    active = rn > tol
    for _ in range(problem.max_steps):
        if not bool(active.any()):
            break
        x_new = x + r
        r_new = problem.b - op(x_new)
        rn_new = bnorm(r_new)
        finite = torch.isfinite(rn_new) & torch.isfinite(x_new).all(dim=-1)
        growth = torch.where(rn_new > rn, growth + 1, torch.zeros_like(growth))
        diverged = active & (~finite | (growth >= patience))
        step = active & finite
        x = torch.where(step[:, None], x_new, x)
        r = torch.where(step[:, None], r_new, r)
        rn = torch.where(step, rn_new, rn)
        better = step & (rn_new < best_rn)
        best_x = torch.where(better[:, None], x_new, best_x)
        best_r = torch.where(better[:, None], r_new, best_r)
        best_rn = torch.where(better, rn_new, best_rn)
        breakdown |= diverged
        iterations += active.to(torch.int64)
        active = step & ~diverged & (rn > tol)
    return finish("neumann", problem, best_x, iterations, breakdown, residual=best_r)
