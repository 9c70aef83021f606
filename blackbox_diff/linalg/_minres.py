"""Batched MINRES (Paige-Saunders) for symmetric, possibly indefinite, systems."""

from __future__ import annotations

import torch

from ._krylov import Matvec, bdot, bnorm, finish, safe, setup
from ._result import LinearSolution

__all__ = ["minres"]


def minres(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_steps: int | None = None,
) -> LinearSolution:
    """Solve ``A_i x_i = b_i`` for a batch of symmetric (possibly indefinite) ``A_i`` by MINRES.

    Algorithm (Paige & Saunders, 1975): the Lanczos process ``A V_k = V_{k+1} T_k`` builds an orthonormal
    basis of the Krylov space ``K_k(A, r0)`` with a tridiagonal ``T_k``; Givens rotations reduce ``T_k``
    to upper-triangular form as it grows, so that the iterate ``x_k = x0 + V_k y_k`` with
    ``y_k = argmin ||beta_1 e_1 - T_k y||`` is updated by a three-term recurrence of search directions
    ``w``. Invariant: ``x_k`` minimises ``||b - A x||`` over ``x0 + K_k(A, r0)`` and ``|phibar_k|`` equals
    that minimal residual norm (in exact arithmetic).

    Stopping, per instance: the recurrence residual ``|phibar| <= max(rtol * ||b||, atol)``; a singular
    projected system (a rotation with ``gamma <= eps * ||T||``: ``A`` singular to working precision and
    ``b`` not in its range, or a non-finite value from the operator), reported
    as ``breakdown`` with ``x`` kept at the last good iterate; or ``max_steps`` iterations. A Lanczos
    vector of norm zero (invariant subspace found) is the lucky case and ends with a zero residual.

    Args:
        matvec: batched operator, ``(B, n) -> (B, n)``, row ``i`` is ``A_i @ v_i``; must be symmetric.
        b: right-hand sides, shape ``(B, n)``; dtype and device of the computation.
        x0: optional starting point, same shape/dtype/device as ``b``.
        rtol: relative tolerance on the residual norm, ``>= 0``.
        atol: absolute tolerance on the residual norm, ``>= 0``.
        max_steps: iteration cap (one operator application each), ``>= 1``; ``None`` means ``10 * n``.

    Returns:
        A `LinearSolution`; ``converged`` and ``residual_norm`` come from the true residual
        ``b - A x`` recomputed once at the end (that application and the initial residual with ``x0``
        are not counted in ``iterations``).

    Raises:
        ValueError: an argument has the wrong type, shape or range, or ``matvec`` returns a wrong shape.
    """
    problem = setup(matvec, b, x0, rtol, atol, max_steps)
    x, tol, op = problem.x, problem.tol, problem.op
    iterations, breakdown = problem.counters()
    eps = torch.finfo(x.dtype).eps

    beta1 = bnorm(problem.r)
    active = beta1 > tol
    v_old = torch.zeros_like(x)
    v = problem.r / safe(beta1)[:, None]
    beta = torch.zeros_like(beta1)  # coupling of v_old and v in T (zero for the first column)
    ones, zeros = torch.ones_like(beta1), torch.zeros_like(beta1)
    c_old2, s_old2, c_old, s_old = ones, zeros, ones, zeros  # rotations k-2 and k-1
    w_old2, w_old = torch.zeros_like(x), torch.zeros_like(x)
    phibar = beta1.clone()
    anorm = torch.zeros_like(beta1)  # running estimate of ||A||: the largest column norm of T seen

    for _ in range(problem.max_steps):
        if not bool(active.any()):
            break
        # Lanczos step: column k of T is (beta, alpha, beta_next) in rows k-1, k, k+1.
        z = op(v) - beta[:, None] * v_old
        alpha = bdot(v, z)
        z = z - alpha[:, None] * v
        beta_next = bnorm(z)

        # Apply the two previous rotations to the new column, then build rotation k.
        epsilon = s_old2 * beta
        dbar = c_old2 * beta
        delta = c_old * dbar + s_old * alpha
        gbar = -s_old * dbar + c_old * alpha
        gamma = torch.hypot(gbar, beta_next)
        anorm = torch.maximum(anorm, torch.sqrt(beta**2 + alpha**2 + beta_next**2))
        # gamma >= sigma_min(A) in exact arithmetic, so gamma at round-off level of ||A|| means A is
        # singular to working precision; `not (>)` also catches NaN from the operator.
        singular = ~(gamma > 10 * eps * anorm)
        c = gbar / safe(gamma)
        s = beta_next / safe(gamma)

        w = (v - delta[:, None] * w_old - epsilon[:, None] * w_old2) / safe(gamma)[:, None]
        step = active & ~singular
        x = torch.where(step[:, None], x + (c * phibar)[:, None] * w, x)
        phibar = torch.where(step, -s * phibar, phibar)
        breakdown |= active & singular
        iterations += active.to(torch.int64)
        active = step & (phibar.abs() > tol)

        # Shift the recurrences; values of frozen instances are never read back into x.
        w_old2, w_old = w_old, w
        c_old2, s_old2, c_old, s_old = c_old, s_old, c, s
        v_old, v = v, z / safe(beta_next)[:, None]
        beta = beta_next
    return finish("minres", problem, x, iterations, breakdown)
