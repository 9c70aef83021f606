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
import warnings
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
        self.constraints = ca.Function("c", [x, p], [c, lb, ub])
        finite = lambda b: ca.if_else(ca.fabs(b) < ca.inf, b, 0)  # noqa: E731 - 0*inf would poison rows
        a = alo + aup
        stat = ca.gradient(f + ca.dot(a * lam, c), x)
        prim = alo * (c - finite(lb)) + aup * (c - finite(ub)) + (1 - a) * lam
        z = ca.vertcat(x, lam)
        F = ca.vertcat(stat, prim)
        w = sym.sym("w", n + m)
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
        self.vjp = ca.Function("vjp", [*args, w], [ca.jtimes(F, z, w, True), ca.jtimes(F, p, w, True)])
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

    def constraint_values(self, x: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, lb, ub = self.constraints(x, p)
        return (c.full().reshape(-1), lb.full().reshape(-1), ub.full().reshape(-1))

    def vjps(self, z, alo, aup, p, w) -> tuple[np.ndarray, np.ndarray]:
        jz, jp = self.vjp(*self._args(z, alo, aup, p), w)
        return jz.full().reshape(-1), jp.full().reshape(-1)

    def vjp_params(self, z, alo, aup, p, w) -> np.ndarray:
        """(dF/dp)^T w at the point."""
        return self.at(z, alo, aup, p).vjp_params(w)

    def polish(self, z, alo, aup, p, steps: int = 2) -> np.ndarray:
        """Newton steps on F(z) = 0 for the identified active set: moves an interior-point answer onto
        its active constraints exactly, so that the IFT is applied at a KKT point, not near one."""
        best = self.at(z, alo, aup, p)
        best_z, best_err = z, best.error
        for _ in range(steps):
            if best_err < 1e-13 or best.lu is None:
                break
            trial_z = best_z - best.lu.solve(best.F)
            trial = self.at(trial_z, alo, aup, p)
            if not trial.error < best_err or not self._consistent(trial, trial_z[self.n :], alo, aup):
                break
            best, best_z, best_err = trial, trial_z, trial.error
        return best_z

    @staticmethod
    def _consistent(pt: Point, lam, alo, aup, tol: float = 1e-7) -> bool:
        """The polished point keeps inactive rows feasible and active multipliers of the right sign."""
        c, lb, ub = pt.c, pt.lb, pt.ub
        free = (alo + aup) == 0
        scale = 1.0 + np.abs(c)
        feasible = np.all((c[free] <= ub[free] + tol * scale[free]) & (c[free] >= lb[free] - tol * scale[free]))
        eq = lb == ub
        signs = np.all(lam[(aup > 0)] >= -tol) and np.all(lam[(alo > 0) & ~eq] <= tol)
        return bool(feasible and signs)


class Point:
    """F, the nonzeros of K and the constraint values at one point; the sparse LU is built on first use."""

    __slots__ = ("F", "K", "c", "lb", "ub", "_pattern", "_Jp", "_p_pattern", "_lu", "_done", "_pinv")

    def __init__(self, F, K, c, lb, ub, pattern, Jp, p_pattern) -> None:
        self.F, self.K, self.c, self.lb, self.ub, self._pattern = F, K, c, lb, ub, pattern
        self._Jp, self._p_pattern = Jp, p_pattern
        self._lu, self._done, self._pinv = None, False, None

    def solve(self, b: np.ndarray, trans: str = "N") -> np.ndarray:
        """K^{-1} b (or K^{-T} b) by the sparse LU; the minimum-norm least-squares solution, with a warning,
        when K is singular (a degenerate active set, e.g. two identical active constraints)."""
        lu = self.lu
        if lu is not None:
            return lu.solve(b, trans=trans)
        if self._pinv is None:
            warnings.warn(
                "The KKT matrix of the CasADi problem is singular at the solution (degenerate active set, "
                "dependent active constraints, or a non-isolated minimum). Used the minimum-norm least-squares "
                "solution: the multipliers, and so the gradient, are not unique there. Remove redundant "
                "constraints, or pass adjoint='engine' with ridge= to regularise.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._pinv = np.linalg.pinv(self.matrix().toarray())
        return (self._pinv.T if trans == "T" else self._pinv) @ b

    def vjp_params(self, w: np.ndarray) -> np.ndarray:
        rows, cols, n_p = self._p_pattern
        return np.bincount(cols, weights=self._Jp * w[rows], minlength=n_p).astype(np.float64)

    @property
    def error(self) -> float:
        err = np.abs(self.F).max(initial=0.0)
        return float(err) if np.isfinite(err) else np.inf

    def matrix(self):
        from scipy.sparse import csc_matrix

        row, colind, shape = self._pattern
        return csc_matrix((self.K, row, colind), shape=shape)

    @property
    def lu(self):
        if not self._done:
            from scipy.sparse.linalg import splu

            try:
                self._lu = splu(self.matrix(), permc_spec="COLAMD")
            except RuntimeError:  # exactly singular: the caller decides (error, or the engine's lstsq)
                self._lu = None
            self._done = True
        return self._lu
