"""Newton polish of a KKT point on its identified active set (used after scipy's trust-constr).

trust-constr's interior-point loop stops on its gtol while the barrier parameter is still ~1e-5, so an
active inequality is left ~1e-5 inside its bound. With the active set identified from slacks and
multipliers together, the point solves the square system

    grad f + Jh^T nu + Jg_A^T lam_A = 0,   h = 0,   g_A = 0,

and a few Newton steps on it (torch derivatives, least-squares steps) recover the exact KKT point. The
polished point is kept only if it is better and still primal-dual feasible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["polish_kkt"]


def polish_kkt(cond: Any, x: np.ndarray, nu: np.ndarray, lam: np.ndarray, tp: tuple, steps: int = 8):
    """Refine (x, nu, lam); returns the refined triple, or the input when polishing does not help."""
    shape = x.shape
    n, p = x.size, nu.size
    xt = torch.as_tensor(x, dtype=torch.float64)
    g0 = cond.g(xt, *tp).detach().numpy()
    active = (lam > np.maximum(-g0, 0.0)) & (lam > 0)
    idx = torch.as_tensor(np.nonzero(active)[0])

    def kkt(y: torch.Tensor) -> torch.Tensor:
        xv, nuv, lamv = y[:n].reshape(shape), y[n : n + p], y[n + p :]

        def lagrangian(z):
            value = cond.f(z, *tp).reshape(())
            if p:
                value = value + (nuv * cond.h(z, *tp)).sum()
            if idx.numel():
                value = value + (lamv * cond.g(z, *tp)[idx]).sum()
            return value

        parts = [torch.func.grad(lagrangian)(xv).reshape(-1)]
        if p:
            parts.append(cond.h(xv, *tp))
        if idx.numel():
            parts.append(cond.g(xv, *tp)[idx])
        return torch.cat(parts)

    y = torch.as_tensor(np.concatenate([x.reshape(-1), nu, lam[active]]), dtype=torch.float64)
    start = float(kkt(y).abs().max())
    best, best_norm = y, start
    for _ in range(steps):
        r = kkt(y)
        norm = float(r.abs().max())
        if norm < best_norm:
            best, best_norm = y, norm
        if norm <= 1e-15 * (1 + float(y.abs().max())):
            break
        J = torch.func.jacrev(kkt)(y)
        y = y - torch.linalg.lstsq(J, r.unsqueeze(-1)).solution.squeeze(-1)
    r = float(kkt(y).abs().max())
    if r < best_norm:
        best, best_norm = y, r
    if best_norm >= start:
        return x, nu, lam
    xb = best[:n].reshape(shape)
    lam_new = np.zeros_like(lam)
    lam_new[active] = best[n + p :].numpy()
    g = cond.g(xb, *tp).detach().numpy()
    if np.any(g[~active] > 1e-12) or np.any(lam_new < 0):
        return x, nu, lam
    return xb.numpy(), best[n : n + p].numpy(), lam_new
