"""Batched conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import torch

from ._krylov import Matvec, bdot, bnorm, finish, safe, setup
from ._result import LinearSolution

__all__ = ["cg"]


def cg(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_steps: int | None = None,
) -> LinearSolution:
    """Solve ``A_i x_i = b_i`` for a batch of symmetric positive definite ``A_i`` by conjugate gradients.

    Algorithm (Hestenes-Stiefel), per instance: ``r = b - A x``, ``p = r``; then repeatedly
    ``alpha = <r, r> / <p, A p>``, ``x += alpha p``, ``r -= alpha A p``,
    ``p = r + (<r_new, r_new> / <r, r>) p``. Invariant: ``r`` is the (recurrence) residual ``b - A x``
    and ``x`` minimises the ``A``-norm of the error over ``x0 + K_k(A, r0)``.

    Stopping, per instance: the recurrence residual satisfies ``||r|| <= max(rtol * ||b||, atol)``, or
    the curvature ``<p, A p>`` is not positive beyond round-off, i.e. ``<= eps ||p|| ||A p||`` (``A`` is
    not positive definite on the Krylov space, or the
    operator produced a non-finite value: reported as ``breakdown``, ``x`` kept at the last good iterate),
    or ``max_steps`` iterations. Finished instances are frozen while the others continue.

    Args:
        matvec: batched operator, ``(B, n) -> (B, n)``, row ``i`` is ``A_i @ v_i``; must be symmetric
            positive definite for CG's guarantees.
        b: right-hand sides, shape ``(B, n)``; dtype and device of the computation.
        x0: optional starting point, same shape/dtype/device as ``b``.
        rtol: relative tolerance on the residual norm, ``>= 0``.
        atol: absolute tolerance on the residual norm, ``>= 0``.
        max_steps: iteration cap (one operator application each), ``>= 1``; ``None`` means ``10 * n``.

    Returns:
        A `LinearSolution` whose ``converged`` and ``residual_norm`` come from the true residual
        ``b - A x`` recomputed once at the end (one extra application, not counted in ``iterations``;
        neither is the initial residual when ``x0`` is given).

    Raises:
        ValueError: an argument has the wrong type, shape or range, or ``matvec`` returns a wrong shape.
    """
    problem = setup(matvec, b, x0, rtol, atol, max_steps)
    x, r, tol, op = problem.x, problem.r, problem.tol, problem.op
    iterations, breakdown = problem.counters()
    eps = torch.finfo(x.dtype).eps
    p = r.clone()
    rs = bdot(r, r)
    tol_sq = tol * tol
    active = rs > tol_sq
    for _ in range(problem.max_steps):
        if not bool(active.any()):
            break
        Ap = op(p)
        curvature = bdot(p, Ap)
        # Curvature at round-off level relative to ||p|| ||Ap|| (Cauchy-Schwarz) is no curvature: A is
        # indefinite or singular along p. `not (>)` also catches NaN produced by the operator.
        bad = active & ~(curvature > eps * bnorm(p) * bnorm(Ap))
        step = active & ~bad
        iterations += active.to(torch.int64)
        if bool(step.all()):  # every instance takes the step: no masks (the common case, and B = 1)
            alpha = (rs / curvature)[:, None]
            x = x.addcmul(alpha, p)
            r = r.addcmul(alpha, Ap, value=-1.0)
            rs_new = bdot(r, r)
            p = r.addcmul((rs_new / rs)[:, None], p)
            rs = rs_new
            active = rs > tol_sq
            continue
        breakdown |= bad
        alpha = rs / safe(torch.where(step, curvature, torch.zeros_like(curvature)))
        mask = step[:, None]
        x = torch.where(mask, x + alpha[:, None] * p, x)
        r = torch.where(mask, r - alpha[:, None] * Ap, r)
        rs_new = bdot(r, r)
        beta = rs_new / safe(rs)
        p = torch.where(mask, r + beta[:, None] * p, p)
        rs = torch.where(step, rs_new, rs)
        active = step & (rs > tol_sq)
    return finish("cg", problem, x, iterations, breakdown)
