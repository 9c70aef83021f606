"""Batched restarted GMRES for general (nonsymmetric) systems."""

from __future__ import annotations

import torch

from ._krylov import KrylovProblem, Matvec, bnorm, check_count, finish, safe, setup
from ._result import LinearSolution

__all__ = ["gmres"]

_DEFAULT_RESTART = 40


def gmres(
    matvec: Matvec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_steps: int | None = None,
    restart: int | None = None,
) -> LinearSolution:
    """Solve ``A_i x_i = b_i`` for a batch of general ``A_i`` by restarted GMRES(m).

    Algorithm (Saad & Schultz, 1986): each cycle starts from the true residual ``r = b - A x``, builds an
    orthonormal basis ``V`` of ``K_m(A, r)`` by Arnoldi with classical Gram-Schmidt applied twice
    (batched, numerically as good as modified Gram-Schmidt), reduces the Hessenberg matrix to
    triangular form with Givens rotations as it grows, and at the end of the cycle sets
    ``x += V y`` with ``y = argmin ||beta e_1 - H y||``. Invariant: within a cycle, the rotated
    right-hand side's last entry ``|g_{j+1}|`` is the residual norm of the best iterate in
    ``x + K_j(A, r)`` (in exact arithmetic).

    Stopping, per instance: inside a cycle when ``|g_{j+1}| <= max(rtol * ||b||, atol)`` (an invariant
    subspace, "happy breakdown", gives ``g_{j+1} = 0``); at each restart the true residual is checked
    again, so an instance whose recurrence over-promised continues with a new cycle. A pivot of the
    triangular factor at round-off level (``A`` singular to working precision on the Krylov space) or
    a non-finite value is a ``breakdown``; the instance keeps the columns it had. ``max_steps`` caps
    the operator applications.

    Args:
        matvec: batched operator, ``(B, n) -> (B, n)``, row ``i`` is ``A_i @ v_i``.
        b: right-hand sides, shape ``(B, n)``; dtype and device of the computation.
        x0: optional starting point, same shape/dtype/device as ``b``.
        rtol: relative tolerance on the residual norm, ``>= 0``.
        atol: absolute tolerance on the residual norm, ``>= 0``.
        max_steps: cap on the Arnoldi operator applications per instance, ``>= 1``; ``None`` means
            ``10 * n``.
        restart: Krylov dimension ``m`` of a cycle, ``>= 1``; ``None`` means ``min(n, 40)``; values above
            ``n`` are clipped to ``n``. Memory is ``O(B m n)``.

    Returns:
        A `LinearSolution`; ``iterations`` counts Arnoldi operator applications (the one residual
        application per restart is not counted); ``converged`` and ``residual_norm`` come from the true
        residual of the returned ``x``.

    Raises:
        ValueError: an argument has the wrong type, shape or range, or ``matvec`` returns a wrong shape.
    """
    problem = setup(matvec, b, x0, rtol, atol, max_steps)
    n = problem.b.shape[1]
    m = min(check_count(restart, "restart", min(n, _DEFAULT_RESTART)), n)
    x, r, tol = problem.x, problem.r, problem.tol
    iterations, breakdown = problem.counters()
    while True:
        beta = bnorm(r)
        active = (beta > tol) & (iterations < problem.max_steps) & ~breakdown
        if not bool(active.any()):
            break
        x, broke = _cycle(problem, x, r, beta, active, iterations, m)
        breakdown |= broke
        r = problem.b - problem.op(x)
    return finish("gmres", problem, x, iterations, breakdown, residual=r)


def _cycle(
    problem: KrylovProblem,
    x: torch.Tensor,
    r: torch.Tensor,
    beta: torch.Tensor,
    active: torch.Tensor,
    iterations: torch.Tensor,
    m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GMRES(m) cycle from ``x`` with residual ``r``; updates ``iterations`` in place.

    Returns the new iterate and the instances that broke down in this cycle.
    """
    B = r.shape[0]
    eps = torch.finfo(r.dtype).eps
    # Built out of place (lists, products, concatenations) so that autograd can run through a cycle,
    # e.g. when the engine differentiates its own backward.
    basis = [r / safe(beta)[:, None]]  # orthonormal Krylov vectors, each (B, n)
    columns: list[torch.Tensor] = []  # columns of the triangular factor R, column j of length j+1
    # Product of the Givens rotations so far, kept explicitly so that rotating a new Hessenberg column
    # is one batched product rather than a Python loop over the earlier rotations.
    Qt = torch.eye(m + 1, dtype=r.dtype, device=r.device).expand(B, m + 1, m + 1)
    g: list[torch.Tensor] = []  # rotated right-hand side beta * Qt e_1, entries 0..j
    g_next = beta  # its entry j+1: the residual norm of the current iterate, up to sign
    used = torch.zeros(B, dtype=torch.int64, device=r.device)  # columns of R that count, per instance
    broke = torch.zeros_like(active)
    run = active.clone()
    for j in range(m):
        if j > 0 and not bool(run.any()):
            break
        h, w, happy, size = _arnoldi_step(problem.op, torch.stack(basis, dim=1), eps)
        hn = torch.where(happy, torch.zeros_like(beta), bnorm(w))
        # Earlier rotations act on rows 0..j only; row j+1 (the entry hn) is untouched by them.
        h = (Qt[:, : j + 1, : j + 1] @ h.unsqueeze(-1)).squeeze(-1)
        gamma = torch.hypot(h[:, j], hn)
        # gamma >= sigma_min(A) in exact arithmetic: at round-off level of ||A v_j|| it means A is
        # singular to working precision (or the operator returned NaN: `not (>)` catches it).
        singular = ~(gamma > 10 * eps * size) | ~torch.isfinite(h).all(dim=-1)
        c = torch.where(singular, torch.ones_like(gamma), h[:, j] / safe(gamma))
        s = torch.where(singular, torch.zeros_like(gamma), hn / safe(gamma))
        columns.append(torch.cat([h[:, :j], gamma[:, None]], dim=1))
        Qt = _rotate_rows(Qt, j, c, s)
        g.append(c * g_next)
        g_next = -s * g_next
        ok = run & ~singular
        basis.append(torch.where((ok & ~happy)[:, None], w / safe(hn)[:, None], torch.zeros_like(w)))
        used = torch.where(ok, torch.full_like(used, j + 1), used)
        broke = broke | (run & singular)
        iterations += run.to(torch.int64)
        run = ok & (g_next.abs() > problem.tol) & (iterations < problem.max_steps)
    k = len(columns)
    R = torch.stack([torch.nn.functional.pad(col, (0, k - col.shape[1])) for col in columns], dim=-1)
    y = _triangular_least_squares(R, torch.stack(g, dim=1), used)
    update = torch.einsum("bk,bkn->bn", y, torch.stack(basis[:k], dim=1))
    return torch.where((used > 0)[:, None], x + update, x), broke


def _rotate_rows(Qt: torch.Tensor, j: int, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Apply the Givens rotation ``[[c, s], [-s, c]]`` (per instance) to rows ``j, j+1`` of ``Qt``."""
    row_j, row_k = Qt[:, j], Qt[:, j + 1]
    new_j = c[:, None] * row_j + s[:, None] * row_k
    new_k = -s[:, None] * row_j + c[:, None] * row_k
    return torch.cat([Qt[:, :j], new_j[:, None], new_k[:, None], Qt[:, j + 2 :]], dim=1)


def _arnoldi_step(
    op: Matvec, basis: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthogonalise ``A v_j`` against ``basis`` (B, j+1, n) by classical Gram-Schmidt, twice.

    Returns the Hessenberg column ``h`` (B, j+1), the orthogonalised vector ``w``, a flag for an
    invariant subspace (``w`` is round-off relative to ``A v_j``) and ``||A v_j||``.
    """
    w = op(basis[:, -1])
    size0 = bnorm(w)
    h = torch.einsum("bkn,bn->bk", basis, w)
    w = w - torch.einsum("bkn,bk->bn", basis, h)
    correction = torch.einsum("bkn,bn->bk", basis, w)
    w = w - torch.einsum("bkn,bk->bn", basis, correction)
    happy = bnorm(w) <= 4 * eps * size0
    return h + correction, w, happy, size0


def _triangular_least_squares(R: torch.Tensor, g: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Solve ``R[:k, :k] y = g[:k]`` with a per-instance ``k = used``; entries past ``k`` are zero.

    The unused block is replaced by the identity (and ``g`` by zeros) so that one batched triangular
    solve serves instances of different lengths; ``where`` keeps garbage of frozen columns out.
    """
    k = R.shape[-1]
    keep = torch.arange(k, device=R.device)[None, :] < used[:, None]
    block = keep[:, :, None] & keep[:, None, :]
    eye = torch.eye(k, dtype=R.dtype, device=R.device).expand_as(R)
    R = torch.where(block, R, eye)
    rhs = torch.where(keep, g, torch.zeros_like(g))
    return torch.linalg.solve_triangular(R, rhs.unsqueeze(-1), upper=True).squeeze(-1)
