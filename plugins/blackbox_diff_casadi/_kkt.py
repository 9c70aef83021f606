"""The KKT conditions of a canonical NLP as CasADi Functions, built once with CasADi's own AD.

Unknowns z = (x, lam), lam in CasADi's sign convention (one per row of c = [g; x_bounded]). On an active
set given by the indicators a_lo (row at its lower bound, or an equality) and a_up (row at its upper
bound), a = a_lo + a_up, the residual is

    F(z) = [ grad_x (f + (a*lam)^T c) ;  a_lo*(c - lb) + a_up*(c - ub) + (1 - a)*lam ].

Inactive multipliers are pinned to zero and active rows hold with equality, so K = dF/dz is the symmetric
(sparse, for MPC banded) KKT matrix of the equality-constrained problem on the active set.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from blackbox_diff_casadi._nlp import CanonicalNLP

__all__ = ["KKTKernels"]

_CACHE_SIZE = 512


class KKTKernels:
    """Numeric CasADi Functions for the residual, its sparse Jacobian and its VJPs (numpy in, numpy out)."""

    def __init__(self, nlp: CanonicalNLP, expand: bool | None = None) -> None:
        import casadi as ca

        self.n, self.m = nlp.n, nlp.m
        self.n_p = int(nlp.p.numel())
        self.bounded_x = nlp.bounded_x
        base = ca.Function("nlp", [nlp.x, nlp.p], [nlp.f, nlp.g, nlp.lbg, nlp.ubg])
        sym = ca.MX
        if expand is not False:
            try:
                base = base.expand()
                sym = ca.SX
            except RuntimeError:
                if expand:
                    raise
        self.symbolic = sym.__name__
        n, m = self.n, self.m
        x, p = sym.sym("x", n), sym.sym("p", self.n_p)
        lam, alo, aup = sym.sym("lam", m), sym.sym("alo", m), sym.sym("aup", m)
        f, g, lbg, ubg = base(x, p)
        # The solver is handed the same (expanded) graph the gradients are built from.
        self.solver_problem = {"x": x, "p": p, "f": f, "g": g}
        self.bounds_g = ca.Function("bounds_g", [p], [lbg, ubg])
        xb = x[list(map(int, nlp.bounded_x))] if len(nlp.bounded_x) else sym(0, 1)
        c = ca.vertcat(g, xb)
        lb = ca.vertcat(lbg, ca.DM(nlp.lbx[nlp.bounded_x]))
        ub = ca.vertcat(ubg, ca.DM(nlp.ubx[nlp.bounded_x]))
        finite = lambda b: ca.if_else(ca.fabs(b) < ca.inf, b, 0)  # noqa: E731 - 0*inf would poison rows
        a = alo + aup
        stat = ca.gradient(f + ca.dot(a * lam, c), x)
        prim = alo * (c - finite(lb)) + aup * (c - finite(ub)) + (1 - a) * lam
        z = ca.vertcat(x, lam)
        F = ca.vertcat(stat, prim)
        args = [x, lam, alo, aup, p]
        K = ca.jacobian(F, z)
        sp = K.sparsity()
        # scipy's CSC == CasADi's CCS: the pattern is fixed, only the nonzeros travel per call.
        self._pattern = (np.asarray(sp.row(), dtype=np.int32), np.asarray(sp.colind(), dtype=np.int32), sp.shape)
        self.F = ca.Function("F", args, [F])
        Jp = ca.jacobian(F, p)
        spp = Jp.sparsity()
        cols = np.repeat(np.arange(spp.size2()), np.diff(np.asarray(spp.colind())))
        self._p_pattern = (np.asarray(spp.row(), dtype=np.int64), cols.astype(np.int64), self.n_p)
        nz = lambda A: A.nz[:] if A.nnz() else sym(0, 1)  # noqa: E731
        # One sweep per point gives everything forward and backward need: dF/dp is small (n_p columns),
        # so carrying its nonzeros makes the backward's parameter VJP a scatter-add instead of a CasADi call.
        self.point = ca.Function("point", args, [F, nz(K), c, lb, ub, nz(Jp)])
        # Sizes of the terms of the constraint rows and of grad f (certification, active-set tolerances), and
        # the dense gradient and constraint Jacobian a degenerate point's active sets are examined with.
        Jc, gf = ca.jacobian(c, x), ca.gradient(f, x)
        row_terms = ca.mtimes(ca.fabs(Jc), ca.fabs(x)) + ca.mtimes(ca.fabs(ca.jacobian(c, p)), ca.fabs(p))
        row_norms = ca.mtimes(ca.fabs(Jc), ca.DM.ones(n, 1))
        self.primal = ca.Function("primal", [x, p], [c, lb, ub, row_terms, row_norms, ca.fabs(gf)])
        self.dense = ca.Function("dense", [x, p], [gf, Jc])
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    # --- numeric helpers ------------------------------------------------------------------------
    def _args(self, z: np.ndarray, alo: np.ndarray, aup: np.ndarray, p: np.ndarray) -> list:
        return [z[: self.n], z[self.n :], alo, aup, p]

    def residual(self, z, alo, aup, p) -> np.ndarray:
        return self.F(*self._args(z, alo, aup, p)).full().reshape(-1)

    def at(self, z, alo, aup, p) -> Point:
        """Everything about one point (F, K, constraint values; LU on demand), cached by value: the engine
        and the polish step come back to the same point several times per call."""
        key = (z.tobytes(), alo.tobytes(), aup.tobytes(), p.tobytes())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        F, K, c, lb, ub, Jp = (v.full().reshape(-1) for v in self.point(*self._args(z, alo, aup, p)))
        out = Point(F, K, c, lb, ub, self._pattern, Jp, self._p_pattern)
        with self._lock:
            self._cache[key] = out
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return out

    def factor(self, z, alo, aup, p) -> tuple[np.ndarray, Any]:
        """(F, LU of K) at the point (LU None when K is exactly singular)."""
        pt = self.at(z, alo, aup, p)
        return pt.F, pt.lu

    def kkt_matrix(self, z, alo, aup, p):
        return self.at(z, alo, aup, p).matrix()

    def memo(self, key: tuple, compute) -> Any:
        """compute(), cached under `key` (by value; the least recently stored beyond _CACHE_SIZE dropped)."""
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = compute()
            with self._lock:
                self._cache[key] = hit
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return hit

    def _primal(self, x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
        """(c, lb, ub, row terms, row norms, |grad f|) at x, cached by value (the active-set iteration, the
        degeneracy check and certification all come back to the same x)."""
        return self.memo(("primal", x.tobytes(), p.tobytes()),
                          lambda: tuple(v.full().reshape(-1) for v in self.primal(x, p)))

    def constraint_values(self, x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._primal(x, p)[:3]

    def vjp_params(self, z, alo, aup, p, w) -> np.ndarray:
        """(dF/dp)^T w at the point."""
        return self.at(z, alo, aup, p).vjp_params(w)

    def newton(self, z, alo, aup, p, steps: int = 6) -> tuple[np.ndarray, bool]:
        """Newton steps on F(z) = 0 for the active set (alo, aup): moves an interior-point answer onto its
        active constraints exactly, so that the IFT is applied at a KKT point, not near one. The Jacobian is
        factored once, at the start (chord steps: the answer is close, and F is linear in the multipliers
        and in the constraints' linear parts); the final point is factored when the residual needs it.

        Returns:
            (z, converged): the point with the smallest residual, and whether its residual is at round-off
            relative to the size of F's terms (or, all terms ~0, reduced by 12 orders of magnitude).
        """
        first = self.at(z, alo, aup, p)
        best, best_z, best_err = first, z, first.error
        lu = first.lu
        for _ in range(steps):
            if lu is None or best.converged(best_z, p):
                break
            step = lu.solve(best.F)
            trial_z = best_z - step
            # Entries that cancelled to round-off are zero: what is left is the subtraction's rounding, and a
            # solution at 0 (with data 0 there) is otherwise never exact relative to its own terms.
            trial_z[np.abs(trial_z) <= 16 * np.finfo(np.float64).eps * np.maximum(np.abs(best_z), np.abs(step))] = 0.0
            trial = self.at(trial_z, alo, aup, p)
            if not trial.error < best_err:
                break
            best, best_z, best_err = trial, trial_z, trial.error
        return best_z, lu is not None and (best.converged(best_z, p) or best_err <= 1e-12 * first.error)

    def row_sizes(self, x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(|dc/dx||x| + |dc/dp||p| + |finite bounds|, row 1-norms of dc/dx, |grad f|) at x, cached by value
        with the values they come from (certification, the active-set tolerances and the degeneracy test
        all ask for them at the same x)."""
        def compute():
            _, lb, ub, terms, norms, gf = self._primal(x, p)
            bounds = np.maximum(np.where(np.isfinite(lb), np.abs(lb), 0.0), np.where(np.isfinite(ub), np.abs(ub), 0.0))
            return terms + bounds, norms, gf

        return self.memo(("rows", x.tobytes(), p.tobytes()), compute)

    def dense_jacobians(self, x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(grad f, dc/dx) at x, dense."""
        gf, Jc = self.dense(x, p)
        return np.asarray(gf.full()).reshape(-1), np.asarray(Jc.full()).reshape(self.m, self.n)


class Point:
    """F, the nonzeros of K and the constraint values at one point; the sparse LU is built on first use."""

    __slots__ = ("F", "K", "c", "lb", "ub", "_pattern", "_Jp", "_p_pattern", "_lu", "_done", "_pinv", "_terms",
                 "_memo")

    # A pivot of the equilibrated K below this fraction of the largest makes the point suspect of degeneracy
    # (the KKT toolkit's rank test then decides); SuperLU does not fail on a numerically singular matrix.
    PIVOT_RTOL = 1e-10

    def __init__(self, F, K, c, lb, ub, pattern, Jp, p_pattern) -> None:
        self.F, self.K, self.c, self.lb, self.ub, self._pattern = F, K, c, lb, ub, pattern
        self._Jp, self._p_pattern = Jp, p_pattern
        self._lu, self._done, self._pinv, self._terms = None, False, None, None
        self._memo: dict | None = None

    def memo(self, key: Any, compute) -> Any:
        """compute(), kept with the point (a function of the point only): what the polish's last check asks
        there (row sizes, tolerances), certification and the degeneracy test find without another lookup."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = compute()
        return hit

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        """K^{-1} b (or K^{-T} b) by the sparse LU; the minimum-norm least-squares solution when K is
        singular. Only a point no regular active set can state reaches the backward singular, and
        `CasadiKKT.degeneracy` warns about it."""
        lu = self.lu
        if lu is not None:
            return lu.solve(b, trans=trans)
        if self._pinv is None:
            self._pinv = np.linalg.pinv(self.matrix().toarray())
        return (self._pinv.T if trans == "T" else self._pinv) @ b

    def vjp_params(self, w: np.ndarray) -> np.ndarray:
        rows, cols, n_p = self._p_pattern
        return np.bincount(cols, weights=self._Jp * w[rows], minlength=n_p).astype(np.float64)

    @property
    def error(self) -> float:
        err = np.abs(self.F).max(initial=0.0)
        return float(err) if np.isfinite(err) else np.inf

    def terms(self, z: np.ndarray, p: np.ndarray) -> np.ndarray:
        """|dF/dz||z| + |dF/dp||p| per component of F: the size of the terms it is made of (exact, sparse;
        z and p are the point's own, so it is computed once)."""
        if self._terms is None:
            row, colind, shape = self._pattern
            cols_k = np.repeat(np.arange(shape[1]), np.diff(colind))
            out = np.bincount(row, weights=np.abs(self.K) * np.abs(z[cols_k]), minlength=shape[0])
            rows, cols, _ = self._p_pattern
            if rows.size:
                out = out + np.bincount(rows, weights=np.abs(self._Jp) * np.abs(p[cols]), minlength=shape[0])
            self._terms = out
        return self._terms

    def converged(self, z: np.ndarray, p: np.ndarray, rtol: float = 1e-11) -> bool:
        """Every |F_i| at round-off relative to its terms (floor: rtol^(1/2) x the largest term)."""
        if not np.all(np.isfinite(self.F)):
            return False
        terms = self.terms(z, p)
        floor = np.sqrt(rtol) * terms.max(initial=0.0) + np.finfo(np.float64).tiny
        return bool(np.all(np.abs(self.F) <= rtol * terms + floor * rtol))

    def matrix(self):
        from scipy.sparse import csc_matrix

        row, colind, shape = self._pattern
        return csc_matrix((self.K, row, colind), shape=shape)

    @property
    def lu(self):
        """A sparse LU of K (`_ScaledLU`), or None when K is singular: exactly (SuperLU fails) or numerically
        (a pivot of the equilibrated D K D at round-off relative to the largest)."""
        if not self._done:
            row, colind, shape = self._pattern
            self._lu, self._done = _ScaledLU.factor(self.K, row, colind, shape), True
        return self._lu

    @property
    def suspect(self) -> bool:
        """K is singular or has a pivot of D K D below PIVOT_RTOL of the largest (possibly singular)."""
        lu = self.lu
        return lu is None or lu.pivot_ratio <= self.PIVOT_RTOL


class _ScaledLU:
    """SuperLU of the symmetrically equilibrated D K D (D = 1/sqrt of each row's largest entry), solving with
    K itself: K^{-1} b = D (D K D)^{-1} D b. The pivots are judged on D K D, so that a problem in badly scaled
    units (a Hessian ~1e10 beside constraint rows ~1) is not taken for a singular one."""

    def __init__(self, lu, d: np.ndarray, pivot_ratio: float) -> None:
        self._lu, self._d, self.pivot_ratio = lu, d, pivot_ratio

    @classmethod
    def factor(cls, values: np.ndarray, row: np.ndarray, colind: np.ndarray, shape) -> _ScaledLU | None:
        """Factor the CSC matrix (values, row, colind) of the given shape, equilibrated."""
        from scipy.sparse import csc_matrix
        from scipy.sparse.linalg import splu

        magnitude = np.abs(values)
        top = np.zeros(shape[0])
        np.maximum.at(top, row, magnitude)
        d = 1.0 / np.sqrt(np.where(top > 0, top, 1.0))
        col = np.repeat(np.arange(shape[1]), np.diff(colind))
        try:
            lu = splu(csc_matrix((values * d[row] * d[col], row, colind), shape=shape), permc_spec="COLAMD")
        except RuntimeError:  # exactly singular: the caller decides (error, or the engine's lstsq)
            return None
        pivots = np.abs(lu.U.diagonal())
        if pivots.size == 0:
            return cls(lu, d, 1.0)
        ratio = float(pivots.min() / pivots.max()) if pivots.max() > 0 else 0.0
        if not ratio > pivots.size * np.finfo(np.float64).eps:  # numerically singular, as unusable
            return None
        return cls(lu, d, ratio)

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        d = self._d if b.ndim == 1 else self._d[:, None]
        return d * self._lu.solve(d * b, trans=trans)
