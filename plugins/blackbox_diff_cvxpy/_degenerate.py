"""Degenerate cone-program answers: the admissible active sets of the polyhedral rows, each with its own LU.

`ConeCondition.prepare` marks each answer with what the forward verified (the `status` aux entry):
REGULAR (J factored with no round-off pivot and no weakly active row: nothing more to do here), WEAK (a
row with slack and multiplier both ~0), SINGULAR (J had a round-off pivot: dependent active rows, or a
non-unique solution) or UNCHECKED (nothing was factored: large or unrefined problems). For all but REGULAR,
the KKT toolkit (`blackbox_diff.kkt.active_set_variants`) examines the zero-cone rows (equalities) and the
non-negative rows (inequalities A x - b <= 0 with multipliers y >= 0); the rows of other cones enter
through their fixed contribution A^T y to stationarity. Each admissible set is a regular statement of the
condition: the LP/QP point solved exactly on it, and J's LU on it, so the preconditioned residual is exact
under every variant. Degeneracy inside second-order, PSD, exponential or power cones (a projection at a
cone's kink) is not examined.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from blackbox_diff.engine import Degeneracy
from blackbox_diff.kkt import active_set_variants

from ._refine import regular_lu

__all__ = ["REGULAR", "SINGULAR", "UNCHECKED", "WEAK", "cone_degeneracy"]

REGULAR, WEAK, SINGULAR, UNCHECKED = 0.0, 1.0, 2.0, 3.0


def cone_degeneracy(cond: Any, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Degeneracy | None:
    """A `Degeneracy` for an answer the forward did not verify regular; None when the toolkit finds it
    regular (or the program has no polyhedral rows)."""
    status = aux[3].item()
    if status == REGULAR:  # the usual case, decided first: this runs after every instance's solve
        return None
    cones = cond.program.cones
    z0, start = cones.zero, cones.conic_start
    if start == 0:
        return None
    active, _, _, extra, prm = cond._unpack(tuple(aux) + tuple(params))
    with torch.no_grad():
        data = cond._data(extra, tuple(p.detach() for p in prm))
        P, c, A, b = data
        x, w = cond._split(z)
        y, _ = cond._y_s(w, active)
        grad_f = c + A[start:].mT @ y[start:] + (P @ x if P is not None else 0.0)
        on = active[z0:] > 0.5
        lam = torch.where(on, w[z0:start], torch.zeros_like(w[z0:start]))
        tol = options.active_tol
        slack = (b - A @ x)[z0:start]
        near = ~on & (slack <= tol * (1.0 + (A.abs() @ x.abs() + b.abs())[z0:start]))
        lam_scale = tol * (1.0 + float(lam.abs().max())) if lam.numel() else tol
        found = active_set_variants(grad_f, A[:z0], A[z0:start], w[:z0], lam, on | near, active_tol=lam_scale)
        variants, labels = [], []
        for T, nu_t, lam_t in ([] if found is None else zip(found.sets, found.nu, found.lam, strict=True)):
            a = torch.cat([found.kept, torch.zeros_like(lam)])
            a[[z0 + j for j in T]] = 1.0
            variant = _variant(cond, x, torch.cat([nu_t, lam_t, w[start:]]), a, data)
            if variant is None:
                continue
            zv, factors = variant
            variants.append((zv, (a, *factors, torch.zeros_like(aux[3]), *aux[4:])))
            dropped = torch.nonzero(found.kept < 0.5).flatten().tolist()
            labels.append(f"active set {T}" + (f" (equalities {dropped} dropped)" if dropped else ""))
    if not variants:
        if status == SINGULAR:
            _warn_not_unique()
        return None
    return Degeneracy(variants=variants, constraints=found.constraints,
                      kind=f"{found.kind} (rows of the cone program's non-negative cone, in the order of "
                      "problem.constraints)", outputs=cond.program.n,
                      main_regular=found.regular and status != SINGULAR, labels=labels)


def _variant(cond: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, data: tuple):
    """(z, (LU, pivots)) of one active set: for an LP/QP the exact point on it (J z = [-c; a*b]), else the
    answer with the set's multipliers; None when J is singular on it."""
    z = torch.cat([x, w])
    factors = regular_lu(cond.jacobian(z, a, data))
    if factors is None:
        return None
    lu, piv = factors
    if not cond.program.cones.nonlinear:
        _, c, _, b = data
        start = cond.program.cones.conic_start
        rhs = torch.cat([-c, a * b[:start]])
        z = torch.linalg.lu_solve(lu, piv, rhs.unsqueeze(-1)).squeeze(-1)
        if not bool(torch.isfinite(z).all()):
            return None
    if not cond.precondition:
        lu, piv = z.new_zeros(0, 0), torch.zeros(0, dtype=torch.int32, device=z.device)
    return z, (lu, piv)


def _warn_not_unique() -> None:
    warnings.warn(
        "cvxpy backend: the KKT matrix of the cone program is singular at the answer and no active set of its "
        "linear rows makes it regular: the solution is not unique (e.g. an LP with a face of optima), or the "
        "degeneracy is inside a second-order, PSD, exponential or power cone. The gradient returned is the "
        "engine's least-squares one.",
        RuntimeWarning,
        stacklevel=7,
    )
