"""The optimality condition of a cone program, stated on the solver's answer.

For  min 1/2 x^T P x + c^T x  s.t.  s = b - A x in K  with dual y in K*, the unknowns are z = (x, w):

* zero and non-negative rows (the polyhedral part): an indicator a says which rows are stated; the rows
  read  a*(A x - b) + (1-a)*w = 0 with y = a*w, so unstated multipliers are pinned to zero and stated rows
  hold with equality (the KKT system of the equality-constrained QP). Non-negative rows are stated when
  active, identified explicitly from slacks and multipliers together (`blackbox_diff.kkt.classify`); zero
  rows always, except an equality dropped as redundant at a degenerate point;
* second-order, PSD, exponential and power cones: w = y - s (Moreau decomposition), y = Pi_K*(w),
  s = Pi_K(-w), and the rows read  A x + Pi_K(-w) - b = 0.  The SOC and PSD projections have closed forms
  that torch differentiates; the exponential one is numerical with an implicit derivative (`_expcone`),
  the power cone's a torch root-find whose last Newton step carries the derivative (`_powcone`).

Stationarity closes the system:  P x + c + A^T y = 0.  The Jacobian dF/dz is the exact derivative of
the solution map at the returned point, so the adjoint solve reproduces the solution's derivative to the
solver's accuracy.

Certification compares every component with the size of its own terms (`residual_scale`: |P||x| + |c| +
|A^T||y| for stationarity, |A||x| + |b| (+ |s|) for rows). Degenerate answers (dependent active rows, a
weakly active row, a singular KKT matrix) are reported to the engine by `degeneracy` with the admissible
active sets of the polyhedral rows (`blackbox_diff_cvxpy._degenerate`); degeneracy inside SOC, PSD,
exponential or power cones is not examined.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from blackbox_diff import AbstractCondition
from blackbox_diff.kkt import classify, polyhedral_certificate, polyhedral_term_sizes
from blackbox_diff.plugin import answer_dtype_device, float64_numpy

from ._canon import ConeLayout
from ._degenerate import REGULAR, SINGULAR, UNCHECKED, WEAK, cone_degeneracy
from ._expcone import exp_jacobian, project_exp
from ._powcone import project_pow
from ._refine import polyhedral_refine, regular_lu
from ._theta import theta_columns, theta_tangent, theta_torch

__all__ = ["ConeCondition", "project_psd", "project_soc"]


def project_soc(v: torch.Tensor) -> torch.Tensor:
    """Projection onto {(t, u): ||u|| <= t} along the last dimension (any leading batch dims)."""
    t, u = v[..., :1], v[..., 1:]
    nu = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    safe = torch.where(nu > 0, nu, torch.ones_like(nu))
    scale = 0.5 * (1.0 + t / safe)
    boundary = torch.cat([scale * nu, scale * u], dim=-1)
    inside = nu <= t
    polar = nu <= -t
    return torch.where(inside, v, torch.where(polar, torch.zeros_like(v), boundary))


def _svec_maps(k: int, upper: bool, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, S): vec(M) = T @ svec, svec = S @ vec(M) for the solver's scaled triangle convention."""
    pairs = []
    for j in range(k):
        rows = range(j + 1) if upper else range(j, k)
        pairs += [(i, j) for i in rows]
    t = len(pairs)
    T = torch.zeros(k * k, t, dtype=dtype, device=device)
    S = torch.zeros(t, k * k, dtype=dtype, device=device)
    r2 = 2.0**0.5
    for idx, (i, j) in enumerate(pairs):
        if i == j:
            T[i * k + j, idx] = 1.0
            S[idx, i * k + j] = 1.0
        else:
            T[i * k + j, idx] = T[j * k + i, idx] = 1.0 / r2
            S[idx, i * k + j] = r2
    return T, S


def project_psd(v: torch.Tensor, k: int, upper: bool) -> torch.Tensor:
    """Projection of a scaled triangle (last dim) onto the PSD cone, via an eigendecomposition."""
    T, S = _svec_maps(k, upper, v.dtype, v.device)
    M = (v @ T.mT).reshape(*v.shape[:-1], k, k)
    M = 0.5 * (M + M.mT)
    lam, Q = torch.linalg.eigh(M)
    proj = (Q * torch.clamp(lam, min=0.0).unsqueeze(-2)) @ Q.mT
    return proj.reshape(*v.shape[:-1], k * k) @ S.mT


def _cone_parts(w: torch.Tensor, cones: ConeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s) = (Pi_K*(w), Pi_K(-w)) for the SOC, PSD, exponential and power rows (after zero and nonneg).

    SOC and PSD cones are self-dual; for the exponential and power cones y = w + Pi_K(-w) (Moreau).
    """
    ys, ss, off = [], [], 0
    for k in cones.soc:
        blk = w[..., off : off + k]
        ys.append(project_soc(blk))
        ss.append(project_soc(-blk))
        off += k
    for k in cones.psd:
        t = k * (k + 1) // 2
        blk = w[..., off : off + t]
        ys.append(project_psd(blk, k, cones.psd_upper))
        ss.append(project_psd(-blk, k, cones.psd_upper))
        off += t
    if cones.exp:
        blk = w[..., off : off + 3 * cones.exp]
        s_exp = project_exp(-blk)
        ys.append(blk + s_exp)
        ss.append(s_exp)
        off += 3 * cones.exp
    if cones.pow:
        blk = w[..., off : off + 3 * len(cones.pow)]
        s_pow = project_pow(-blk, torch.tensor(cones.pow, dtype=torch.float64))
        ys.append(blk + s_pow)
        ss.append(s_pow)
    if not ys:
        return w[..., :0], w[..., :0]
    return torch.cat(ys, dim=-1), torch.cat(ss, dim=-1)


def _cone_jacobians(w: torch.Tensor, cones: ConeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal dPi_K*(w)/dw and dPi_K(-w)/dw over the conic rows (dense)."""
    dy, ds, off = [], [], 0
    blocks = [(k, "soc") for k in cones.soc] + [(k, "psd") for k in cones.psd]
    for k, kind in blocks:
        t = k if kind == "soc" else k * (k + 1) // 2
        blk = w[off : off + t]
        if kind == "soc":
            proj = project_soc
        else:
            def proj(v, k=k):
                return project_psd(v, k, cones.psd_upper)
        dy.append(torch.func.jacrev(proj)(blk))
        ds.append(torch.func.jacrev(lambda v, proj=proj: proj(-v))(blk))
        off += t
    for _ in range(cones.exp):
        blk = w[off : off + 3].detach().cpu().numpy()
        J = torch.as_tensor(exp_jacobian(-blk)).to(w)
        dy.append(torch.eye(3, dtype=w.dtype, device=w.device) - J)
        ds.append(-J)
        off += 3
    for alpha in cones.pow:
        alphas = torch.tensor([alpha], dtype=torch.float64)
        # Plain autograd, not jacrev: outside a torch.func transform the root is found in numpy (fast).
        J = torch.autograd.functional.jacobian(lambda v, a=alphas: project_pow(-v, a), w[off : off + 3].detach())
        dy.append(torch.eye(3, dtype=w.dtype, device=w.device) + J)
        ds.append(J)
        off += 3
    if not dy:
        empty = w.new_zeros(0, 0)
        return empty, empty
    return torch.block_diag(*dy), torch.block_diag(*ds)


class ConeCondition(AbstractCondition):
    """KKT conditions of the cvxpy problem's cone program (see the module docstring).

    `prepare` assembles the Jacobian J = dF/dz at the solver's answer, takes one Newton step on the
    identified active set (which removes the interior-point error of active rows: their slack becomes
    exactly zero), and LU-factors J. The residual handed to the engine is the preconditioned
    ``J^{-1} F(z, params)``: its z-Jacobian is the identity at the answer, so the engine's Krylov adjoint
    solve converges in one step, and its parameter-Jacobian is the exact ``J^{-1} dF/dparams`` of the
    implicit function theorem. Certification uses the raw F.
    """

    closed = True  # F reaches only its arguments (the problem data, the answer)

    structure = "general"
    raw_solution = True

    def __init__(self, program: Any, *, precondition: bool = True, refine: bool = True,
                 linearization: bool = False, dense_max: int = 2000, with_duals: bool = False) -> None:
        self.program = program
        self.unknowns_shape = (program.n + program.m,)  # z = (x, y), however the solver's answer comes out
        # The result handed to the outputs holds the cone program's dual y too (dual variables requested).
        self.with_duals = with_duals
        # A dense LU per instance costs (n + m)^2 memory: beyond dense_max the engine's Krylov solver runs.
        self.dense = program.n + program.m <= dense_max
        self.precondition = precondition and self.dense
        # Preconditioned: dF/dz = I at a factored answer, so the engine's adjoint is g, checked by one VJP.
        self.structure = "identity" if self.precondition else "general"
        self.refine = refine
        # Non-DPP problems: the data (P, c, A, b) come per instance as aux tensors, linearised in theta.
        self.linearization = linearization

    def describe(self) -> str:
        return f"cvxpy cone program ({self.program.cones.describe()})"

    # --- data --------------------------------------------------------------------------------------
    def _data(self, extra: tuple, params: tuple):
        theta = theta_torch(self.program.pieces, self.program.n_theta, params)
        if not self.linearization:
            return self.program.data_torch(theta)
        data0, jac, theta0 = extra
        return self.program.unflatten_data(data0 + jac @ (theta - theta0))

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z[..., : self.program.n], z[..., self.program.n :]

    def _y_s(self, w: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cones = self.program.cones
        start = cones.conic_start
        y_cone, s_cone = _cone_parts(w[..., start:], cones)
        y = torch.cat([active * w[..., :start], y_cone], dim=-1)
        return y, s_cone

    def _unpack(self, rest: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple, tuple]:
        """rest = (active, LU, pivots, status, [data0, jac, theta0,] *params); `active` covers the zero and
        non-negative rows (1: stated), `status` is what the forward found (`_degenerate.REGULAR`, ...)."""
        k = 7 if self.linearization else 4
        active, lu, piv = rest[:3]
        return active, lu, piv, tuple(rest[4:k]), tuple(rest[k:])

    # --- the condition -------------------------------------------------------------------------------
    @staticmethod
    def _data_terms(x: torch.Tensor, y: torch.Tensor, data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts of F that the data (P, c, A, b) enter, linearly: P x + A^T y + c, and A x - b."""
        P, c, A, b = data
        stationarity = A.mT @ y + c
        if P is not None:
            stationarity = stationarity + P @ x
        return stationarity, A @ x - b

    @staticmethod
    def _preconditioned(F: torch.Tensor, lu: torch.Tensor, piv: torch.Tensor) -> torch.Tensor:
        """J0^{-1} F with the LU of the forward; F itself when not preconditioned (large or singular)."""
        if lu.shape[-1] == 0:
            return F
        return torch.linalg.lu_solve(lu, piv, F.unsqueeze(-1)).squeeze(-1)

    def raw_residual(self, z: torch.Tensor, active: torch.Tensor, data: tuple) -> torch.Tensor:
        x, w = self._split(z)
        y, s_cone = self._y_s(w, active)
        stationarity, r = self._data_terms(x, y, data)
        start = self.program.cones.conic_start
        polyhedral = active * r[:start] + (1 - active) * w[:start]
        return torch.cat([stationarity, polyhedral, r[start:] + s_cone])

    def jvp_params(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        """(dF/dparams) dparams: the data (P, c, A, b) are linear in theta, F is linear in the data, so this
        is F's data part at d(data) = data(d theta); solved with the LU when preconditioned."""
        k = 7 if self.linearization else 4
        n_params = (len(rest) - k) // 2
        active, lu, piv, extra, params = self._unpack(rest[: k + n_params])
        d_theta = theta_tangent(self.program.pieces, self.program.n_theta, params, rest[k + n_params :])
        d_data = (self.program.unflatten_data(extra[1] @ d_theta) if self.linearization
                  else self.program.data_torch(d_theta))
        x, w = self._split(z)
        y, _ = self._y_s(w, active)
        stationarity, r = self._data_terms(x, y, d_data)
        start = self.program.cones.conic_start
        return self._preconditioned(torch.cat([stationarity, active * r[:start], r[start:]]), lu, piv)

    def residual(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        active, lu, piv, extra, params = self._unpack(rest)
        return self._preconditioned(self.raw_residual(z, active, self._data(extra, params)), lu, piv)

    def _feasibility(self, z: torch.Tensor, active: torch.Tensor, data: tuple) -> torch.Tensor:
        """Dropped equalities hold, inactive rows are feasible (slack >= 0), active multipliers y >= 0."""
        _, _, A, b = data
        x, w = self._split(z)
        cones = self.program.cones
        z0, start = cones.zero, cones.conic_start
        r = (A @ x - b)[:start]
        a = active[z0:]
        return torch.cat([(1 - active[:z0]) * r[:z0], (1 - a) * torch.relu(r[z0:]), a * torch.relu(-w[z0:start])])

    def certificate(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        """Raw residual F, plus feasibility of dropped equalities and inactive rows (slack >= 0) and the
        signs of active multipliers (y >= 0)."""
        active, _, _, extra, params = self._unpack(rest)
        data = self._data(extra, params)
        return torch.cat([self.raw_residual(z, active, data), self._feasibility(z, active, data)])

    def certificate_blocks(self) -> tuple[int, ...]:
        """Stationarity, zero and non-negative rows, conic rows, dropped equalities' and inactive rows'
        feasibility, multiplier signs: each part in its own units."""
        cones = self.program.cones
        z0, start = cones.zero, cones.conic_start
        return (self.program.n, start, self.program.m - start, start, start - z0)

    def residual_scale(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        """The size of the terms of each `certificate` component: |P||x| + |c| + |A^T||y| for stationarity,
        |A||x| + |b| (+ |s| for conic rows) for rows, |w| for pinned multipliers, and for a multiplier's sign
        the size a multiplier of that row must have to matter in stationarity (the largest stationarity term
        over the row's 1-norm)."""
        active, _, _, extra, params = self._unpack(rest)
        P, c, A, b = self._data(extra, params)
        x, w = self._split(z)
        y, s_cone = self._y_s(w, active)
        cones = self.program.cones
        z0, start = cones.zero, cones.conic_start
        Aa, ax = A.abs(), x.abs()
        stat = Aa.mT @ y.abs() + c.abs() + (P.abs() @ ax if P is not None else 0.0)
        rows = Aa @ ax + b.abs()
        polyhedral = active * rows[:start] + (1 - active) * w[:start].abs()
        top = stat.amax(dim=-1, keepdim=True)
        dual = top / Aa[z0:start].sum(dim=-1).clamp_min(torch.finfo(z.dtype).tiny)
        return torch.cat([stat, polyhedral, rows[start:] + s_cone.abs(), rows[:start], dual + w[z0:start].abs()])

    def certify(self, Z: torch.Tensor, aux: tuple, params: list, batched: tuple[bool, ...]):
        """`certificate`, term sizes from below and a function for `residual_scale`, of a whole batch in numpy,
        for polyhedral programs (zero and non-negative cones: every QP and LP) with DPP data: the data from
        parameters in one compiled pass over the data maps where numba is installed (`_certify`), else the
        data from theta by one sparse product for the batch and `blackbox_diff.kkt.polyhedral_certificate`
        (the exact sizes, products with |A| and |P|, only when the bound does not suffice). Other programs:
        None (the torch certificate, whose cone projections this does not repeat)."""
        program = self.program
        cones = program.cones
        if cones.nonlinear or self.linearization:
            return None
        B, z0 = Z.shape[0], cones.zero
        z, active = float64_numpy(Z), float64_numpy(aux[0])
        values = [float64_numpy(t) if b else float64_numpy(t)[None] for t, b in zip(params, batched, strict=True)]

        def dense() -> tuple:
            c, b, a_vals, p_vals = program.data_values(theta_columns(program.pieces, program.n_theta, values, B))
            A = program.dense_batch(a_vals, "A")
            P = None if p_vals is None else program.dense_batch(p_vals, "P")
            return z, active[:, :z0], active[:, z0:], P, c, A[:, :z0], b[:, :z0], A[:, z0:], b[:, z0:]

        stated = program.sparse_certificate()(z, active, values)  # one compiled pass; None without numba
        if stated is None:
            stated = polyhedral_certificate(*dense())
        certificate, lower, worst = stated
        return certificate, lower, lambda: polyhedral_term_sizes(*dense()), worst

    def jacobian(self, z: torch.Tensor, active: torch.Tensor, data: tuple) -> torch.Tensor:
        """dF/dz assembled from the data: [[P, A^T Dy], [rows of A, Ds]] (dense, one instance)."""
        P, _, A, _ = data
        n, m = self.program.n, A.shape[0]
        cones = self.program.cones
        start = cones.conic_start
        _, w = self._split(z)
        dy_cone, ds_cone = _cone_jacobians(w[start:], cones)
        Dy = A.new_zeros(m, m)
        Dy[:start, :start] = torch.diag(active)
        Dy[start:, start:] = dy_cone
        J = A.new_zeros(n + m, n + m)
        if P is not None:
            J[:n, :n] = P
        J[:n, n:] = A.mT @ Dy
        rows = A.clone()
        rows[:start] = active[:, None] * A[:start]
        J[n:, :n] = rows
        J[n : n + start, n : n + start] = torch.diag(1 - active)
        J[n + start :, n + start :] = ds_cone
        return J

    # --- answer -> unknowns -> outputs ------------------------------------------------------------
    def prepare(self, solution: Any, params: tuple, options: Any) -> tuple[torch.Tensor, tuple]:
        """(z, aux): the answer refined on its active set (LP/QP exactly, in numpy; other cones by Newton
        steps), with aux = (active, LU and pivots of J (empty when not preconditioned or singular), status,
        *extra); `status` says whether the forward verified the point regular (see `_degenerate`)."""
        answer, extra = (solution, ()) if not isinstance(solution, tuple) else (solution[0], solution[1:])
        dtype, device = answer_dtype_device(params)

        def tensor(a: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float64)).to(dtype=dtype, device=device)

        extra = tuple(tensor(e) for e in extra)
        cones = self.program.cones
        z0, start = cones.zero, cones.conic_start
        y, s = tensor(answer.y), tensor(answer.s)
        active, weak = classify(-s[z0:start], y[z0:start], options.active_tol)
        a = torch.cat([torch.ones(z0, dtype=dtype, device=device), active.to(dtype)])
        x = tensor(answer.x)
        none = (torch.zeros(0, 0, dtype=dtype, device=device), torch.zeros(0, dtype=torch.int32, device=device))

        def out(z, act, factors, status):
            return z, (act, *factors, tensor([status]), *extra)

        unrefined = torch.cat([x, a * y[:start], y[start:] - s[start:]])
        if (not self.refine or (not self.dense and cones.nonlinear)) and not (self.precondition and self.dense):
            return out(unrefined, a, none, UNCHECKED)  # nothing factored: degeneracy() asks the toolkit
        if self.refine and not cones.nonlinear and getattr(answer, "data", None) is not None:
            fast = polyhedral_refine(answer.data, np.asarray(answer.x, dtype=np.float64),
                                      np.asarray(answer.y, dtype=np.float64), np.asarray(answer.s, dtype=np.float64),
                                      z0, cones.nonneg, options.active_tol, dense=self.dense)
            if fast is not None:
                z, a_np, lu, piv, refined_weak = fast
                factors = none
                if lu is not None and self.precondition:
                    factors = (tensor(lu), torch.as_tensor(piv, device=device))
                a_full = np.concatenate([np.ones(z0), a_np])
                return out(tensor(z), tensor(a_full), factors, WEAK if refined_weak.any() else REGULAR)
        if not self.dense:  # no dense Jacobian for large systems: the answer as the solver gave it
            return out(unrefined, a, none, UNCHECKED)
        with torch.no_grad():
            data = self._data(extra, tuple(p.detach() for p in params))
            z, a, lu, piv, refined_weak, regular = self._factor_and_refine(x, y, s, a, data, options.active_tol)
        weak = weak if refined_weak is None else refined_weak
        return out(z, a, (lu, piv), WEAK if bool(weak.any()) and regular else REGULAR if regular else SINGULAR)

    def _factor_and_refine(self, x, y, s, a, data, tol: float, max_swaps: int = 4):
        """LU of J at the answer and (optionally) Newton steps on the active set.

        A Newton step with the active set fixed solves the equality-constrained problem exactly (the
        zero and non-negative rows are linear). If the new point has an inactive row with negative slack
        or an active row with a negative multiplier, the set is corrected and the step retried (a
        primal-dual active-set iteration started at the solver's answer); the refined point is kept only
        when it is feasible and its residual is smaller than the answer's.

        Returns:
            (z, a, LU, pivots, weak rows (None: the answer's own), whether J was factored (regular)).
        """
        cones = self.program.cones
        z0, start = cones.zero, cones.conic_start
        identity = (x.new_zeros(0, 0), torch.zeros(0, dtype=torch.int32, device=x.device))  # not preconditioned

        def unknowns(act):
            return torch.cat([x, act * y[:start], y[start:] - s[start:]])

        def size(v, act):
            return float(torch.cat([self.raw_residual(v, act, data), self._feasibility(v, act, data)]).abs().max())

        def factor(v, act):
            return regular_lu(self.jacobian(v, act, data))

        z = unknowns(a)
        best = (z, a, factor(z, a), None)
        if self.refine:
            base = size(z, a)
            scale = tol * (1.0 + float(z.abs().max()))
            act = a
            weak_pass = False
            n = self.program.n
            for _ in range(max_swaps + 2):
                zs = unknowns(act)
                fac = factor(zs, act)
                if fac is None:
                    break
                z_new = zs - torch.linalg.lu_solve(*fac, self.raw_residual(zs, act, data).unsqueeze(-1)).squeeze(-1)
                if not bool(torch.isfinite(z_new).all()):
                    break
                slack = (data[3] - data[2] @ z_new[:n])[z0:start]
                mult = z_new[n + z0 : n + start]
                on = act[z0:]
                flip_on = (on == 0) & (slack < -scale)
                flip_off = (on == 1) & (mult < -scale)
                if not bool(flip_on.any() or flip_off.any()):
                    if cones.nonlinear:
                        z_new, fac = self._newton(z_new, act, data, fac, size, factor)
                    if size(z_new, act) < base:
                        weak = ((on == 0) & (slack <= scale)) | ((on == 1) & (mult <= scale))
                        best = (z_new, act, fac, weak)
                        if bool(((on == 0) & (slack <= scale)).any()) and not weak_pass:
                            # Weakly active rows taken as inactive: take them as active instead (the
                            # solution is the same; the engine compares both sides of them).
                            act = act.clone()
                            act[z0:] = torch.where((on == 0) & (slack <= scale), torch.ones_like(on), on)
                            weak_pass = True
                            continue
                    break
                act = act.clone()
                act[z0:] = torch.where(flip_on, torch.ones_like(on), torch.where(flip_off, torch.zeros_like(on), on))
        z, a, fac, weak = best
        if not self.precondition:
            return z, a, *identity, weak, fac is not None
        if fac is None:
            # Singular KKT matrix (degenerate problem): the identity as "LU", i.e. the raw F, so that every
            # instance of a batch has aux of one shape; `degeneracy` states the point on a regular active
            # set where there is one, else the engine's adjoint solvers escalate to least squares.
            N = z.numel()
            eye = torch.eye(N, dtype=z.dtype, device=z.device)
            return z, a, eye, torch.arange(1, N + 1, dtype=torch.int32, device=z.device), weak, False
        return z, a, *fac, weak, True

    def _newton(self, z, act, data, fac, size, factor, steps: int = 6):
        """Semismooth Newton steps on the (nonlinear) cone rows, while the residual keeps decreasing."""
        current = size(z, act)
        for _ in range(steps):
            new_fac = factor(z, act)
            if new_fac is None:
                break
            step = torch.linalg.lu_solve(*new_fac, self.raw_residual(z, act, data).unsqueeze(-1)).squeeze(-1)
            candidate = z - step
            value = size(candidate, act) if bool(torch.isfinite(candidate).all()) else float("inf")
            fac = new_fac
            if not value < current:
                break
            z, current = candidate, value
            if current < 1e-14 * (1.0 + float(z.abs().max())):
                break
        return z, factor(z, act) or fac

    def degeneracy(self, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Any:
        """The admissible active sets of the polyhedral rows at a degenerate answer (`_degenerate`)."""
        if aux[3].item() == REGULAR:  # the usual case, decided here: this runs after every instance's solve
            return None
        return cone_degeneracy(self, z, aux, params, options)

    def finish(self, z: torch.Tensor, aux: tuple, options: Any) -> Any:
        """x, or [x, y] when dual variables are among the outputs (y = Pi_K*(w): a torch expression of the
        unknowns, so the duals' gradients come from the engine like the primal's)."""
        x, w = self._split(z)
        if not (self.with_duals or getattr(options, "return_duals", False)):
            return x
        y, _ = self._y_s(w, aux[0])
        return torch.cat([x, y], dim=-1)
