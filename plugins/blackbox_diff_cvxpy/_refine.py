"""Refinement of an LP/QP answer on its active set, in numpy (the fast path of `ConeCondition.prepare`)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sps
import scipy.sparse.linalg as spla
import torch

__all__ = ["lu_regular", "polyhedral_refine", "regular_lu"]


def lu_regular(lu: torch.Tensor) -> bool:
    """Whether an LU factorisation (partial pivoting) of an equilibrated matrix shows it regular: finite,
    and no pivot below N eps times the largest. A singular KKT matrix (dependent active rows) factors
    without error but with a pivot at round-off level, and solving with it would return garbage."""
    d = torch.diagonal(lu, dim1=-2, dim2=-1).abs()
    if d.numel() == 0:
        return True
    top = float(d.max())
    return bool(torch.isfinite(lu).all()) and float(d.min()) > d.numel() * torch.finfo(lu.dtype).eps * top


def regular_lu(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(LU, pivots) of J as torch.linalg.lu_factor gives them, or None when J is numerically singular.

    The pivots are judged on the equilibrated R J C (rows, then columns, scaled to a largest entry of 1), so
    that a problem in badly scaled units is not taken for a singular one; the factors are then unscaled
    into an LU of J itself with the same row pivots: R J C = P L U gives J = P (Rp^-1 L Rp)(Rp^-1 U C^-1),
    Rp the row scaling in pivoted order, the first factor unit lower triangular."""
    if J.shape[-1] == 0:
        return J.clone(), torch.zeros(0, dtype=torch.int32, device=J.device)
    top = J.abs().amax(dim=1)
    r = 1.0 / torch.where(top > 0, top, torch.ones_like(top))
    Jr = r[:, None] * J
    top = Jr.abs().amax(dim=0)
    c = 1.0 / torch.where(top > 0, top, torch.ones_like(top))
    lu, piv, info = torch.linalg.lu_factor_ex(Jr * c)
    if int(info) != 0 or not lu_regular(lu):
        return None
    order = list(range(J.shape[0]))
    for i, p in enumerate((piv - 1).tolist()):  # LAPACK's sequential row swaps -> the permutation
        order[i], order[p] = order[p], order[i]
    rp = r[torch.as_tensor(order, device=J.device)]
    lower = torch.tril(lu, -1) * (rp[None, :] / rp[:, None])
    upper = torch.triu(lu) / rp[:, None] / c[None, :]
    return lower + upper, piv
def polyhedral_refine(data, x, y, s, z0: int, nn: int, tol: float, dense: bool = True, max_swaps: int = 4):
    """The LP/QP case in numpy: active set from slacks and multipliers, exact solve on it, LU of J.

    With zero and non-negative cones only, F is linear in z once the active set a is fixed, so the
    refined point solves  J z = [-c; b_zero; a*b_nonneg]  directly. Rows that come out infeasible
    (inactive with negative slack, active with negative multiplier) are swapped and the solve repeated.

    Returns:
        (z, a, lu, pivots, weak) as numpy arrays (LAPACK LU and 1-based int32 pivots, as
        torch.linalg.lu_factor gives them; both None when `dense` is False: large systems are factored
        sparse and the engine's Krylov solver takes the adjoint), or None when J is singular or the
        refined point is not better than the solver's (the caller then takes the solver's answer and asks
        the KKT toolkit whether it is degenerate).
    """

    P, c, A, b = data
    m, n = A.shape
    start = z0 + nn
    slack, lam = np.maximum(s[z0:start], 0.0), y[z0:start]
    weak = (slack <= tol) & (lam <= tol)
    act = ((lam > slack) & (lam > tol)) | weak
    z_orig = np.concatenate([x, y[:z0], act * lam])
    scale = tol * (1.0 + float(np.abs(z_orig).max(initial=0.0)))

    def size(z, a):
        xx, w = z[:n], z[n:]
        stat = A.T @ np.concatenate([w[:z0], a * w[z0:]]) + c + (P @ xx if P is not None else 0.0)
        r = A @ xx - b
        feas = np.concatenate([(1 - a) * np.maximum(r[z0:], 0.0), a * np.maximum(-w[z0:], 0.0)])
        rows = np.concatenate([stat, r[:z0], a * r[z0:] + (1 - a) * w[z0:], feas])
        return float(np.abs(rows).max(initial=0.0))

    base = size(z_orig, act.astype(float))
    # An exact solver's answer (an active-set QP solver) leaves the refinement nothing to improve: the
    # refined point is kept when its residual is at round-off level, the same point solved on its active set.
    magnitude = 1.0 + max(np.abs(A).max(initial=0.0), np.abs(P).max(initial=0.0) if P is not None else 0.0)

    def roundoff(z):
        return 1e3 * np.finfo(np.float64).eps * magnitude * (1.0 + float(np.abs(z).max(initial=0.0)) +
                                                            float(np.abs(b).max(initial=0.0)) +
                                                            float(np.abs(c).max(initial=0.0)))

    weak_pass = False
    for _ in range(max_swaps + 2):
        a = act.astype(float)
        d = np.concatenate([np.ones(z0), a])
        rhs = np.concatenate([-c, b[:z0], a * b[z0:]])
        lu = piv = None
        if dense:
            J = np.zeros((n + m, n + m))
            if P is not None:
                J[:n, :n] = P
            J[:n, n:] = A.T * d
            J[n:, :n] = A * d[:, None]
            J[n + z0 :, n + z0 :] = np.diag(1 - a)
            # torch's LAPACK, not scipy's: it honours torch.set_num_threads, and scipy's threaded OpenBLAS
            # was 15x slower on a loaded 2-core machine for a 450 x 450 factorisation.
            factors = regular_lu(torch.from_numpy(J))
            if factors is None:
                return None
            lu_t, piv_t = factors
            z = torch.linalg.lu_solve(lu_t, piv_t, torch.from_numpy(rhs)[:, None])[:, 0].numpy()
            lu, piv = lu_t.numpy(), piv_t.numpy()
        else:
            As = sps.csr_matrix(A)
            J = sps.bmat([
                [sps.csr_matrix(P) if P is not None else None, As.T @ sps.diags(d)],
                [sps.diags(d) @ As, sps.diags(np.concatenate([np.zeros(z0), 1 - a]))],
            ], format="csc")
            try:
                z = spla.splu(J).solve(rhs)
            except RuntimeError:  # exactly singular
                return None
        if not np.all(np.isfinite(z)):
            return None
        slack_new = (b - A @ z[:n])[z0:]
        mult = z[n + z0 :]
        flip_on = ~act & (slack_new < -scale)
        flip_off = act & (mult < -scale)
        if flip_on.any() or flip_off.any():
            act = (act | flip_on) & ~flip_off
            continue
        if not size(z, a) <= max(base, roundoff(z)):
            return None
        weak_inactive = ~act & (slack_new <= scale)
        if weak_inactive.any() and not weak_pass:
            # Weakly active rows taken as inactive: take them as active instead (same solution; the
            # derivative returned is the one that keeps them active).
            act, weak_pass = act | weak_inactive, True
            continue
        weak = (act & (mult <= scale)) | weak_inactive
        return z, a, lu, piv, weak
    return None
