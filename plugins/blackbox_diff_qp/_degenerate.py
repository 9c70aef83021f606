"""Degenerate QP answers: the admissible active sets, each an exact point with its own K_S^{-1}.

The forward (`_kkt.refine`) marks an answer WEAK (a row with slack and multiplier both ~0) or SINGULAR
(K_S could not be inverted: dependent active rows, or Q singular on their null space). Only such answers
come here. The KKT toolkit (`blackbox_diff.kkt.active_set_variants`) lists the admissible one-sided active
sets (independent rows, stationary with non-negative multipliers, leaving out only weakly active or
implied rows); each is solved exactly on its own reduced KKT system and carries its own inverse, so the
preconditioned residual is exact under every variant and the engine compares the outputs' derivatives.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from blackbox_diff.engine import Degeneracy
from blackbox_diff.kkt import active_set_variants

from ._kkt import factor

__all__ = ["REGULAR", "SINGULAR", "WEAK", "qp_degeneracy"]

# What the forward found about an answer (the condition's `status` aux entry): the condition looks further
# (`qp_degeneracy`) only when it is not REGULAR, so a regular instance costs nothing here.
REGULAR, WEAK, SINGULAR = 0.0, 1.0, 2.0


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def qp_degeneracy(cond: Any, z: torch.Tensor, aux: tuple, params: tuple) -> Degeneracy | None:
    """A `Degeneracy` for a QP answer the forward marked WEAK or SINGULAR; None when the toolkit finds it
    regular. A singular answer with no regular active set (a non-unique solution) is warned about and left
    to the engine's least-squares escalation."""
    active_t, _, status_t, _, data = cond.unpack(aux + tuple(params))
    Q, p, G, h, A, b = (_numpy(t) for t in data)
    Q = 0.5 * (Q + Q.T)
    zn = _numpy(z)
    n, pe = cond.n, cond.p
    x, nu, lam = zn[:n], zn[n : n + pe], zn[n + pe :]
    active = _numpy(active_t) > 0.5
    tol = cond.active_tol
    slack = h - G @ x
    near = ~active & (slack <= tol * (1.0 + np.abs(h) + np.abs(G) @ np.abs(x)))
    lam_scale = tol * (1.0 + float(np.abs(lam).max(initial=0.0)))
    found = active_set_variants(
        *(torch.from_numpy(v) for v in (Q @ x + p, A, G, nu, np.where(active, lam, 0.0))),
        torch.from_numpy(active | near), active_tol=lam_scale,
    )
    singular = float(status_t.reshape(-1)[0]) == SINGULAR
    variants, labels = [], []
    kept = np.ones(pe, dtype=bool) if found is None else _numpy(found.kept) > 0.5
    for T in [] if found is None else found.sets:
        a = np.zeros(G.shape[0], dtype=bool)
        a[T] = True
        point = _exact(cond, Q, p, G, h, A, b, a, kept)
        if point is None:
            continue
        zv, inverse = point
        parts = [a.astype(float), kept.astype(float), np.zeros(1)]
        if cond.precondition:
            parts.append(cond.full_inverse(inverse, a, kept))
        aux_v = tuple(torch.as_tensor(v).to(dtype=z.dtype, device=z.device) for v in parts)
        variants.append((torch.as_tensor(zv).to(dtype=z.dtype, device=z.device), aux_v))
        labels.append(f"active set {T}" + ("" if kept.all() else f" (equalities {np.nonzero(kept)[0].tolist()})"))
    if not variants:
        if singular:
            _warn_not_unique()
        return None
    return Degeneracy(variants=variants, constraints=found.constraints, kind=found.kind, outputs=n,
                      main_regular=found.regular and not singular, labels=labels)


def _exact(cond, Q, p, G, h, A, b, active: np.ndarray, kept: np.ndarray):
    """(z, K_T^{-1}) of the exact KKT point on the active set T (None when K_T is singular)."""
    Ak = A[kept]
    fac = factor(Q, G, Ak, active, dense=True)
    if fac is None:
        return None
    sol = fac.solve(np.concatenate([-p, b[kept], h[active]]))
    if not np.all(np.isfinite(sol)):
        return None
    n, k = cond.n, int(kept.sum())
    nu = np.zeros(cond.p)
    nu[kept] = sol[n : n + k]
    lam = np.zeros(cond.m)
    lam[active] = sol[n + k :]
    return np.concatenate([sol[:n], nu, lam]), fac.inverse


def _warn_not_unique() -> None:
    warnings.warn(
        "QP layer: the reduced KKT matrix is singular and no active set makes it regular: Q is singular on the "
        "null space of the active constraints, so the solution is not unique (e.g. an LP with a face of optima). "
        "The gradient returned is the minimum-norm one (least squares).",
        RuntimeWarning,
        stacklevel=7,
    )
