"""The active set of a CasADi NLP answer: classified from slacks and multipliers, settled by polishing.

An interior-point answer sits off its active constraints by ~sqrt(barrier): IPOPT's accurate answer to
min (x - p)^2 s.t. x <= 0 at p = -1e-6 has x ~ -4e-5 and a multiplier ~8e-5, both at the level of its
complementarity tolerance. Neither the slack nor the multiplier alone decides such a row, and a wrong guess
stated exactly is not a KKT point at all (x = 0 with a negative multiplier). So the set is settled the
way an active-set method would: classify (`blackbox_diff.kkt.classify`), polish by Newton steps on that
set (exact to round-off), and move rows whose polished point is infeasible (inactive row beyond its bound)
or has a multiplier of the wrong sign (active row) to the other side, until the polished point is a KKT
point. The tolerances are relative to the size of each row's terms (`tolerances`), so they hold in any
units. Rows left with slack and multiplier both within them are weakly active (`weak_rows`).
"""

from __future__ import annotations

import numpy as np
import torch

from blackbox_diff.kkt import classify
from blackbox_diff.plugin import Kernel

__all__ = ["classify_rows", "point_rows", "settle", "stationarity_top", "tolerances", "weak_rows"]

MAX_SWAPS = 6


def classify_rows(kernels, x: np.ndarray, lam: np.ndarray, p: np.ndarray, tol: float):
    """Indicators (a_lo, a_up) of rows held at their lower / upper bound, from the solver's answer;
    equalities count as lower (`classify`: slack and multiplier together, never the multiplier's sign alone)."""
    c, lb, ub = kernels.constraint_values(x, p)
    eq = np.isfinite(lb) & (lb == ub)
    with np.errstate(invalid="ignore"):
        up, _ = classify(torch.as_tensor(c - ub), torch.as_tensor(np.maximum(lam, 0)), tol)
        lo, _ = classify(torch.as_tensor(lb - c), torch.as_tensor(np.maximum(-lam, 0)), tol)
    up, lo = up.numpy() & np.isfinite(ub) & ~eq, lo.numpy() & np.isfinite(lb) & ~eq
    both = up & lo  # only for lb ~= ub: keep the side the multiplier points to
    up &= ~(both & (lam < 0))
    lo &= ~(both & (lam >= 0))
    return (lo | eq).astype(np.float64), up.astype(np.float64)


def tolerances(kernels, z: np.ndarray, alo, aup, p: np.ndarray, tol: float,
               pt=None) -> tuple[np.ndarray, np.ndarray]:
    """(slack, multiplier) thresholds per row: `tol` times the size of the row's terms (|dc/dx||x| +
    |dc/dp||p| + |bounds|), and times the size a multiplier of the row must have to matter in stationarity
    (the largest stationarity term over the row's norm); floors of sqrt(tol) x the largest of each. Cached by
    value: the polish's last check and the degeneracy test ask at the same point (`pt`: that point, when the
    caller has it)."""
    pt = kernels.at(z, alo, aup, p) if pt is None else pt

    def compute():
        rows, norms, _ = point_rows(kernels, pt, z, p)
        top = stationarity_top(kernels, z, alo, aup, p, pt)
        dual = np.where(norms > 0, top / np.where(norms > 0, norms, 1.0), 0.0)
        root = np.sqrt(tol)
        return (tol * np.maximum(rows, root * rows.max(initial=0.0)),
                tol * np.maximum(dual, root * dual.max(initial=0.0)))

    return pt.memo(("tolerances", float(tol)), compute)


def point_rows(kernels, pt, z: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`KKTKernels.row_sizes` at the point `pt` (its z and p), kept with the point."""
    return pt.memo("rows", lambda: kernels.row_sizes(z[: kernels.n], p))


def stationarity_top(kernels, z: np.ndarray, alo, aup, p: np.ndarray, pt=None) -> float:
    """The largest term of the stationarity rows: |d2L/dx2||x| + |grad f| + |dc/dx^T||lam| + |d2L/dxdp||p|."""
    pt = kernels.at(z, alo, aup, p) if pt is None else pt

    def compute():
        _, _, gf = point_rows(kernels, pt, z, p)
        return float((pt.terms(z, p)[: kernels.n] + gf).max(initial=0.0))

    return pt.memo("top", compute)


def _violations(kernels, z, alo, aup, p, tol):
    """Rows to move: inactive ones beyond a bound (to that bound), active ones with a multiplier of the
    wrong sign (to inactive). The compiled scan finds the weakly active rows in the same pass over the rows
    and keeps them with the point, where the degeneracy test of the settled point reads them."""
    n = kernels.n
    pt = kernels.at(z, alo, aup, p)
    c, lb, ub = pt.c, pt.lb, pt.ub
    lam = z[n:]
    slack_tol, dual_tol = tolerances(kernels, z, alo, aup, p, tol, pt)
    if _SCAN.compiled() is not None:
        to_lo, to_up, off, weak, side_up = _SCAN(*map(np.asarray, (c, lb, ub, lam, alo, aup, slack_tol, dual_tol)))
        pt.memo(("weak", float(tol)), lambda: (weak, side_up))
        return to_lo, to_up, off
    eq = np.isfinite(lb) & (lb == ub)
    free = (alo + aup == 0) & ~eq
    with np.errstate(invalid="ignore"):
        to_up = free & np.isfinite(ub) & (c - ub > slack_tol)
        to_lo = free & np.isfinite(lb) & (lb - c > slack_tol)
    off = ((aup > 0) & (lam < -dual_tol)) | ((alo > 0) & ~eq & (lam > dual_tol))
    return to_lo, to_up, off


def settle(kernels, x: np.ndarray, lam: np.ndarray, p: np.ndarray, tol: float, polish: bool = True):
    """(z, a_lo, a_up): the answer polished on the active set it settles on (see the module docstring).

    Without `polish`, or when Newton's method does not converge on the first set (a singular KKT matrix:
    degenerate), the solver's answer on its classified set; when the moves do not settle, the first set's
    polished point."""
    alo, aup = classify_rows(kernels, x, lam, p, tol)
    z = np.concatenate([x, np.where(alo + aup > 0, lam, 0.0)])
    if not polish:
        return z, alo, aup
    first = None
    for _ in range(MAX_SWAPS + 1):
        polished, converged = kernels.newton(z, alo, aup, p)
        if not converged:
            break
        first = first or (polished, alo, aup)
        to_lo, to_up, off = _violations(kernels, polished, alo, aup, p, tol)
        if not (to_lo.any() or to_up.any() or off.any()):
            return polished, alo, aup
        alo = np.where(off, 0.0, np.where(to_lo, 1.0, alo))
        aup = np.where(off, 0.0, np.where(to_up, 1.0, aup))
        z = polished.copy()
        z[kernels.n :][(alo + aup) == 0] = 0.0
    return first if first is not None else (z, alo, aup)


def weak_rows(kernels, z: np.ndarray, alo, aup, p: np.ndarray, tol: float, pt=None) -> tuple[np.ndarray, np.ndarray]:
    """(weak, side_up): rows with slack and multiplier both within `tolerances` (active with a multiplier
    ~0, or inactive with a slack ~0; equalities never), and which bound each row is at or nearest to (`pt`:
    the point, when the caller has it). Kept with the point: at a settled answer, found by the polish's last
    scan of the rows (`_violations`)."""
    pt = kernels.at(z, alo, aup, p) if pt is None else pt
    return pt.memo(("weak", float(tol)), lambda: _weak_rows(kernels, pt, z, alo, aup, p, tol))


def _weak_rows(kernels, pt, z, alo, aup, p, tol):
    n = kernels.n
    c, lb, ub = pt.c, pt.lb, pt.ub
    lam = z[n:]
    slack_tol, dual_tol = tolerances(kernels, z, alo, aup, p, tol, pt)
    if _SCAN.compiled() is not None:
        return _SCAN(*map(np.asarray, (c, lb, ub, lam, alo, aup, slack_tol, dual_tol)))[3:]
    eq = np.isfinite(lb) & (lb == ub)
    with np.errstate(invalid="ignore"):
        up_gap = np.where(np.isfinite(ub), ub - c, np.inf)
        lo_gap = np.where(np.isfinite(lb), c - lb, np.inf)
    side_up = (aup > 0) | ((alo == 0) & (up_gap <= lo_gap))
    free = (alo + aup == 0) & ~eq
    weak = ((aup > 0) & (lam <= dual_tol)) | ((alo > 0) & ~eq & (-lam <= dual_tol))
    weak |= free & (np.minimum(up_gap, lo_gap) <= slack_tol)
    return weak & ~eq, side_up


def _scan_loop(c, lb, ub, lam, alo, aup, slack_tol, dual_tol):
    """`_violations` (to_lo, to_up, off) and `weak_rows` (weak, side_up) in one pass over the rows (NaN
    compares false, as in numpy)."""
    m = c.shape[0]
    to_lo, to_up, off = np.zeros(m, dtype=np.bool_), np.zeros(m, dtype=np.bool_), np.zeros(m, dtype=np.bool_)
    weak, side_up = np.zeros(m, dtype=np.bool_), np.zeros(m, dtype=np.bool_)
    for r in range(m):
        eq = np.isfinite(lb[r]) and lb[r] == ub[r]
        up_gap = ub[r] - c[r] if np.isfinite(ub[r]) else np.inf
        lo_gap = c[r] - lb[r] if np.isfinite(lb[r]) else np.inf
        side_up[r] = aup[r] > 0 or (alo[r] == 0 and up_gap <= lo_gap)
        if eq:
            continue
        free = alo[r] + aup[r] == 0
        if free:
            to_up[r] = np.isfinite(ub[r]) and c[r] - ub[r] > slack_tol[r]
            to_lo[r] = np.isfinite(lb[r]) and lb[r] - c[r] > slack_tol[r]
            gap = up_gap if up_gap <= lo_gap else lo_gap
            if up_gap != up_gap or lo_gap != lo_gap:  # np.minimum keeps NaN
                gap = np.nan
            weak[r] = gap <= slack_tol[r]
        off[r] = (aup[r] > 0 and lam[r] < -dual_tol[r]) or (alo[r] > 0 and lam[r] > dual_tol[r])
        weak[r] |= (aup[r] > 0 and lam[r] <= dual_tol[r]) or (alo[r] > 0 and -lam[r] <= dual_tol[r])
    return to_lo, to_up, off, weak, side_up


_F, _B = "float64[::1]", "boolean[::1]"
_SCAN = Kernel(_scan_loop, f"Tuple(({_B}, {_B}, {_B}, {_B}, {_B}))({_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F})")
