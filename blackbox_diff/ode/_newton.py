"""Per-step root finders of `odeint`: batched simplified Newton in torch, and scipy's `root`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from blackbox_diff._errors import SolverError

__all__ = ["newton", "scipy_root"]

_TINY = 1e3  # a root at exactly 0 converges at this many denormal-free tiny units


def newton(
    residual: Callable[[torch.Tensor], torch.Tensor],
    jacobian: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    tol: float,
    max_iter: int = 20,
    lu: tuple[torch.Tensor, torch.Tensor] | None = None,
    refresh: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
    """Batched, safeguarded (simplified) Newton for ``residual(z) == 0``, z (B, n), Jacobians (B, n, n).

    Starts from the LU factors `lu` when given (e.g. the previous step's) or of ``jacobian(z0)``, and
    re-factors ``refresh(z)`` (default: ``jacobian``; e.g. an exact Jacobian where `jacobian` is a cheap
    approximation) at the current iterate whenever the residual contracted by less than 4x, so easy steps
    cost no Jacobian and hard ones converge quadratically.

    Safeguard: a step that does not decrease an instance's max|F| is not taken. With stale factors, the
    Jacobian is refreshed at the current iterate and the step recomputed; with fresh ones, the step is
    halved (up to 10 times) for that instance. Stage equations of stiff problems have several roots, and an
    undamped step from y_n can jump into the basin of a non-physical one (Robertson's y2 < 0); descent keeps
    the iteration on the root it starts near.

    Returns:
        (z, lu, iterations): the root, the factors last used (to pass to the next call), the count.

    Raises:
        SolverError: no convergence to ``max|F| <= tol max|z|`` within ``max_iter`` iterations (a residual
            stuck within 1e3 x that bound after an exact-Jacobian step counts as converged). Relative to the
            instance's own size, not ``tol (1 + max|z|)``: a solution decaying to 1e-7 is solved to its own
            accuracy, as certification then judges it.
    """
    z = z0
    r = residual(z)
    err = r.abs().amax(dim=1)
    fresh = False
    prev = None
    for k in range(max_iter + 1):
        if not bool(torch.isfinite(err).all()):
            break
        bound = tol * z.abs().amax(dim=1) + _TINY * torch.finfo(z.dtype).tiny
        if bool((err <= bound).all()):
            return z, lu, k
        # Round-off floor: an exact-Jacobian step that no longer reduces a residual already within
        # 1e3 x tolerance cannot do better in this arithmetic (large |h f| terms); accept it.
        if fresh and prev is not None and bool((err <= 1e3 * bound).all()) and bool((err > 0.5 * prev).any()):
            return z, lu, k
        if k == max_iter:
            break
        if lu is None or (prev is not None and not fresh and bool((err > 0.25 * prev).any())):
            lu = _lu((refresh or jacobian)(z) if lu is not None else jacobian(z))
            fresh = True
        else:
            fresh = False
        step = torch.linalg.lu_solve(lu[0], lu[1], r.unsqueeze(-1)).squeeze(-1)
        z_new, r_new, err_new = _descend(residual, z, step, err, bound)
        worse = ~(err_new < err) & (err > bound)
        if bool(worse.any()) and not fresh:
            # Stale factors gave a step that does not descend: refresh them here and redo the step.
            lu = _lu((refresh or jacobian)(z))
            fresh = True
            step = torch.linalg.lu_solve(lu[0], lu[1], r.unsqueeze(-1)).squeeze(-1)
            z_new, r_new, err_new = _descend(residual, z, step, err, bound)
        prev = err
        z, r, err = z_new, r_new, err_new
    raise SolverError(
        f"Newton did not converge in {max_iter} iterations (max|F| = {err.max().item():.3g}, tolerance "
        f"{tol:.3g}). Use a smaller step_size (or more substeps), more newton_max_iter, or a looser newton_tol."
    )


def _descend(residual: Callable, z: torch.Tensor, step: torch.Tensor, err: torch.Tensor, bound: torch.Tensor):
    """z - a step, with a per-instance step length 1, 1/2, 1/4, ... (at most 10 halvings) chosen so that
    max|F| decreases; instances where no length decreases it take the full step, and so do instances
    already within `bound` (converged rows at round-off need not decrease: halving them costs residual
    evaluations for nothing)."""
    alpha = torch.ones_like(err)
    z_new = z - step
    r_new = residual(z_new)
    err_new = r_new.abs().amax(dim=1)
    for _ in range(10):
        bad = ~(err_new < err) & ~(err <= bound)
        if not bool(bad.any()):
            break
        alpha = torch.where(bad, 0.5 * alpha, alpha)
        trial = z - alpha[:, None] * step
        r_trial = residual(trial)
        e_trial = r_trial.abs().amax(dim=1)
        take = bad & (e_trial < err)
        z_new = torch.where(take[:, None], trial, z_new)
        r_new = torch.where(take[:, None], r_trial, r_new)
        err_new = torch.where(take, e_trial, err_new)
        if not bool((bad & ~take).any()):
            break
    return z_new, r_new, err_new


def _lu(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    LU, piv, info = torch.linalg.lu_factor_ex(J)
    if bool((info != 0).any()) or not bool(torch.isfinite(LU).all()):
        raise SolverError(
            "Newton: the step's Jacobian I - h A (x) df/dy is singular or not finite at batch instances "
            f"{torch.nonzero(info).flatten().tolist()}. Use a smaller step_size (or more substeps)."
        )
    return LU, piv


def scipy_root(residual: Callable, jacobian: Callable, z0: torch.Tensor, tol: float) -> torch.Tensor:
    """scipy.optimize.root (hybr) on the flattened step system.

    Judged by its residual, not its status flag alone: hybr reports "not making good progress" (status 5)
    at points where max|F| is already at round-off, and such an answer is accepted.
    """
    import scipy.linalg
    import scipy.optimize

    shape, like = z0.shape, z0

    def fun(x: np.ndarray) -> np.ndarray:
        z = torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(shape)
        return residual(z).reshape(-1).detach().cpu().double().numpy()

    def jac(x: np.ndarray) -> np.ndarray:
        z = torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(shape)
        return scipy.linalg.block_diag(*jacobian(z).detach().cpu().double().numpy())

    sol = scipy.optimize.root(fun, z0.reshape(-1).cpu().double().numpy(), jac=jac, method="hybr", tol=tol)
    x = sol.x
    bound = tol * np.abs(x).max(initial=0.0)
    if not sol.success and not np.abs(fun(x)).max(initial=0.0) <= bound:
        raise SolverError(
            f"scipy.optimize.root (hybr) failed on an ODE step: {sol.message} (max|F| = "
            f"{np.abs(sol.fun).max(initial=0.0):.3g} > tolerance {bound:.3g}). Use a smaller step_size or the "
            "default solver='newton'."
        )
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(shape)
