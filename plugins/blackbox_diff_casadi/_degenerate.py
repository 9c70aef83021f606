"""Degenerate CasADi answers: the admissible active sets, each polished onto its own exact KKT point.

An answer is examined when its KKT matrix K (on the settled active set) is singular or has a pivot at
round-off (`Point.suspect`), or when a row is weakly active (`_active.weak_rows`); a regular answer costs
one look at the sparse LU's pivots, which the polish computed anyway. The KKT toolkit
(`blackbox_diff.kkt.active_set_variants`) then lists the admissible active sets on dense Jacobians: the
equality rows (lb == ub) as equalities, every other row as the inequality of the bound it is at or
nearest to, each scaled to unit norm so that one multiplier tolerance, active_tol x the largest
stationarity term, means the same for every row (`_active.tolerances`). Each admissible set is polished
by Newton's method on its own system; with adjoint="sparse_lu" its K is factored when the engine
evaluates the residual there, so the preconditioned residual is exact under every variant.

Constraints are numbered as the rows of c = [g; x with finite simple bounds]: for a `casadi.Opti`, the
scalar rows of its constraints in the order they were added (`opti.g`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from blackbox_diff.engine import Degeneracy
from blackbox_diff.kkt import active_set_variants

from ._active import stationarity_top, weak_rows

__all__ = ["casadi_degeneracy"]


def casadi_degeneracy(kernels, z: np.ndarray, alo: np.ndarray, aup: np.ndarray, p: np.ndarray, tol: float,
                      like: torch.Tensor) -> Degeneracy | None:
    """A `Degeneracy` for an answer whose K is suspect or that has weakly active rows; None otherwise."""
    n = kernels.n
    pt = kernels.at(z, alo, aup, p)
    weak, side_up = weak_rows(kernels, z, alo, aup, p, tol, pt)
    if not pt.suspect and not weak.any():
        return None
    x, lam = z[:n], z[n:]
    lb, ub = pt.lb, pt.ub  # the point's own bounds, as weak_rows read them
    eq = np.isfinite(lb) & (lb == ub)
    grad_f, Jc = kernels.dense_jacobians(x, p)
    norms = np.linalg.norm(Jc, axis=1)
    unit = np.where(norms > 0, norms, 1.0)
    sign = np.where(side_up, 1.0, -1.0)
    held = (alo + aup > 0) & ~eq
    jg = np.where(eq[:, None], 0.0, sign[:, None] * Jc / unit[:, None])
    lam_unit = np.where(held, sign * lam * unit, 0.0)
    stat_top = tol * stationarity_top(kernels, z, alo, aup, p, pt)
    found = active_set_variants(
        *(torch.from_numpy(np.ascontiguousarray(v)) for v in (grad_f, Jc[eq] / unit[eq, None], jg,
                                                             lam[eq] * unit[eq], lam_unit)),
        torch.from_numpy(held | weak), active_tol=stat_top,
    )
    variants, labels = [], []
    eq_rows = np.nonzero(eq)[0]
    for T, nu_t, lam_t in ([] if found is None else zip(found.sets, found.nu, found.lam, strict=True)):
        kept = found.kept.numpy() > 0.5
        rows = np.zeros(kernels.m, dtype=bool)
        rows[T] = True
        v_lam = np.zeros(kernels.m)
        v_lam[eq_rows] = np.where(kept, nu_t.numpy(), 0.0) / unit[eq_rows]
        v_lam[rows] = sign[rows] * lam_t.numpy()[rows] / unit[rows]
        v_lo = (np.isin(np.arange(kernels.m), eq_rows[kept]) | (rows & ~side_up)).astype(np.float64)
        v_up = (rows & side_up).astype(np.float64)
        zv, converged = kernels.newton(np.concatenate([x, v_lam]), v_lo, v_up, p)
        if kernels.at(zv, v_lo, v_up, p).lu is None:
            continue
        t = [torch.as_tensor(a).to(dtype=like.dtype, device=like.device) for a in (zv, v_lo, v_up)]
        variants.append((t[0], (t[1], t[2])))
        dropped = eq_rows[~kept].tolist()
        labels.append(f"active set {T}" + (f" (equality rows {dropped} dropped)" if dropped else ""))
    if not variants:
        if pt.lu is None:
            _warn_not_unique()
        return None
    return Degeneracy(variants=variants, constraints=found.constraints,
                      kind=f"{found.kind} (rows of the constraints [g; bounded x], as opti.g orders them)",
                      outputs=n, main_regular=found.regular and pt.lu is not None, labels=labels)


def _warn_not_unique() -> None:
    warnings.warn(
        "CasADi KKT: the KKT matrix is singular at the solution and no active set makes it regular: the "
        "minimum is not isolated (the solution is not unique). The gradient returned is the minimum-norm "
        "least-squares one. Add a regularising term, or pass adjoint='engine' with ridge=.",
        RuntimeWarning,
        stacklevel=7,
    )
