"""Batched BiCGSTAB for general (nonsymmetric) systems."""

from __future__ import annotations

import torch

from ._krylov import Matvec, bdot, bnorm, finish, safe, setup
from ._result import LinearSolution

__all__ = ["bicgstab"]


def bicgstab(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_steps: int | None = None,
) -> LinearSolution:
    """Solve ``A_i x_i = b_i`` for a batch of general ``A_i`` by BiCGSTAB.

    Algorithm (van der Vorst, 1992), per instance, with the shadow residual ``r_hat = r0``: a BiCG
    step ``p = r + beta (p - omega v)``, ``v = A p``, ``alpha = rho / <r_hat, v>``, ``s = r - alpha v``,
    followed by a one-dimensional residual minimisation ``t = A s``, ``omega = <t, s> / <t, t>``,
    ``x += alpha p + omega s``, ``r = s - omega t``. Invariant: ``r`` is the (recurrence) residual
    ``b - A x``. Memory is ``O(B n)``; no restart parameter; the residual is not monotone.

    Stopping, per instance: ``||s||`` (after the half step, then ``x += alpha p`` only) or ``||r||`` at
    most ``max(rtol * ||b||, atol)``; ``breakdown`` when ``rho = <r_hat, r>`` or ``<r_hat, v>`` vanishes
    relative to the norms involved (cosine below machine epsilon), when ``omega = 0`` (stagnation),
    or on a non-finite value, ``x`` then kept at the last good iterate; or ``max_steps`` iterations.

    Args:
        matvec: batched operator, ``(B, n) -> (B, n)``, row ``i`` is ``A_i @ v_i``.
        b: right-hand sides, shape ``(B, n)``; dtype and device of the computation.
        x0: optional starting point, same shape/dtype/device as ``b``.
        rtol: relative tolerance on the residual norm, ``>= 0``.
        atol: absolute tolerance on the residual norm, ``>= 0``.
        max_steps: iteration cap, ``>= 1``; one iteration applies the operator twice (once if it ends
            at the half step); ``None`` means ``10 * n``.

    Returns:
        A `LinearSolution`; ``iterations`` counts iterations (not operator applications);
        ``converged`` and ``residual_norm`` come from the true residual recomputed once at the end.

    Raises:
        ValueError: an argument has the wrong type, shape or range, or ``matvec`` returns a wrong shape.
    """
    problem = setup(matvec, b, x0, rtol, atol, max_steps)
    x, r, tol, op = problem.x, problem.r, problem.tol, problem.op
    iterations, breakdown = problem.counters()
    eps = torch.finfo(x.dtype).eps
    r_hat = r.clone()
    r_hat_norm = bnorm(r_hat)
    ones = torch.ones_like(tol)
    rho, alpha, omega = ones, ones, ones
    p, v = torch.zeros_like(x), torch.zeros_like(x)
    active = bnorm(r) > tol
    for _ in range(problem.max_steps):
        if not bool(active.any()):
            break
        rho_new = bdot(r_hat, r)
        beta = (rho_new / safe(rho)) * (alpha / safe(omega))
        p = r + beta[:, None] * (p - omega[:, None] * v)
        v = op(p)
        rv = bdot(r_hat, v)
        # `not (>)` also catches NaN; the cosines must not vanish to machine precision.
        lost = ~(rho_new.abs() > eps * r_hat_norm * bnorm(r)) | ~(rv.abs() > eps * r_hat_norm * bnorm(v))
        alpha = rho_new / safe(rv)
        s = r - alpha[:, None] * v
        half = bnorm(s) <= tol
        t = op(s)
        tt = bdot(t, t)
        omega = bdot(t, s) / safe(tt)
        stalled = ~(omega.abs() > 0) | ~torch.isfinite(omega)

        go = active & ~lost
        done_half = go & half
        full = go & ~half & ~stalled
        x_half = x + alpha[:, None] * p
        x = torch.where(done_half[:, None], x_half, x)
        x = torch.where(full[:, None], x_half + omega[:, None] * s, x)
        r = s - omega[:, None] * t
        rho = rho_new
        breakdown |= (active & lost) | (go & ~half & stalled)
        iterations += active.to(torch.int64)
        active = full & (bnorm(r) > tol)
    return finish("bicgstab", problem, x, iterations, breakdown)
