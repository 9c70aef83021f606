"""The optimality condition of a QP, preconditioned by the inverse of its reduced KKT matrix.

Unknowns z = (x, nu, lam) with lam pinned to zero off the active set S (a 0/1 indicator `a`) and nu pinned
to zero on equalities dropped at a degenerate point (a 0/1 indicator `kept`, all ones otherwise):

    F(z; Q, p, G, h, A, b) = [ Q x + p + A^T (kept*nu) + G^T (a*lam) ;
                               kept*(A x - b) + (1-kept)*nu ;  a*(G x - h) + (1-a)*lam ].

F is the explicit-active-set KKT residual (as `bbd.KKT` states it), linear in z, with the symmetric
Jacobian K = dF/dz. After a symmetric permutation that puts the kept multipliers before the pinned ones,
K = blockdiag(K_S, I), and the black box has already inverted K_S (`_kkt.factor`). The residual handed to
the engine is

    R(z; theta) = K0^{-1} F(z; theta),   K0 = K at the answer (a constant: its inverse is aux data),

which vanishes exactly where F does, has dR/dz = I at the answer (structure "identity": the engine's
adjoint is the cotangent itself, checked by one product) and dR/dtheta = K0^{-1} dF/dtheta, the implicit
function theorem's. So the backward is one batched vector-matrix product with K0^{-1} and one with
dF/dtheta (outer products with x and the multipliers); no per-instance Python loop and no factorisation.

Certification compares each component of F (and of the sign conditions) with the size of its own terms,
both computed for the whole batch in numpy (`certify`). A degenerate instance (dependent active rows, a
weakly active row, or K_S singular) is reported to the engine by `degeneracy` with its admissible active
sets, each with its own exact point and inverse (`blackbox_diff_qp._degenerate`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from blackbox_diff import AbstractCondition, KKTSolution
from blackbox_diff.kkt import polyhedral_certificate, polyhedral_term_sizes
from blackbox_diff.plugin import answer_dtype_device, float64_numpy, owned_tensor

from ._degenerate import REGULAR, SINGULAR, WEAK, qp_degeneracy

__all__ = ["QPCondition", "REGULAR", "SINGULAR", "WEAK"]


class QPCondition(AbstractCondition):
    """KKT conditions of min 1/2 x^T Q x + p^T x s.t. Gx <= h, Ax = b on the identified active set.

    aux per instance: (active (m,), kept (p,), status (1,)[, K0^{-1} (N, N) when preconditioned]).
    """

    closed = True  # F reaches only its arguments (the problem data, the answer)
    batched_jvp_params = True  # jvp_params takes the whole batch at once (no vmap around it)

    raw_solution = True

    def __init__(self, n: int, n_ineq: int, n_eq: int, *, precondition: bool = True, active_tol: float = 1e-7) -> None:
        self.n, self.m, self.p = n, n_ineq, n_eq
        self.precondition = precondition
        self.active_tol = active_tol
        self.structure = "identity" if precondition else "symmetric"

    def describe(self) -> str:
        return f"QP KKT (n={self.n}, {self.m} inequalities, {self.p} equalities)"

    # --- the residual ------------------------------------------------------------------------------
    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, p = self.n, self.p
        return z[..., :n], z[..., n : n + p], z[..., n + p :]

    def unpack(self, rest: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple]:
        """rest = (active, kept, status[, inverse], Q, p, G, h, A, b)."""
        k = 4 if self.precondition else 3
        inverse = rest[3] if self.precondition else None
        return rest[0], rest[1], rest[2], inverse, tuple(rest[k:])

    def raw_residual(self, z, active, kept, Q, p, G, h, A, b) -> torch.Tensor:
        x, nu, lam = self.split(z)
        # Row-vector products (v @ M, v @ M.mT), never M @ v: under vmap the latter is a batched
        # matrix-vector bmm, which torch runs 3-5x slower on CPU than the batched vector-matrix one.
        # The symmetric part of Q (the QP only sees it): one product with x, and for a Q shared by the batch
        # the symmetrisation runs once, outside vmap's batching.
        stationarity = x @ (0.5 * (Q + Q.mT)) + p + (kept * nu) @ A + (active * lam) @ G
        equalities = kept * (x @ A.mT - b) + (1 - kept) * nu
        return torch.cat([stationarity, equalities, active * (x @ G.mT - h) + (1 - active) * lam])

    def residual(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        active, kept, _, inverse, params = self.unpack(rest)
        F = self.raw_residual(z, active, kept, *params)
        # K0^{-1} F as F @ K0^{-1} (K0 symmetric): a vector-matrix product in both directions of autograd.
        return F if inverse is None else F @ inverse

    def jvp_params(self, z: torch.Tensor, *rest: Any) -> torch.Tensor:
        """(dF/d(Q, p, G, h, A, b)) (dQ, dp, dG, dh, dA, db): F is linear in the data, so this is F's data
        part at the tangents (pinned multipliers' rows do not depend on the data), times K0^{-1} when
        preconditioned. Batch-agnostic (`batched_jvp_params`): every argument may carry a leading batch
        dimension or not (shared data)."""
        active, kept, _, inverse, _ = self.unpack(rest[:-6])
        dQ, dp, dG, dh, dA, db = rest[-6:]
        x, nu, lam = self.split(z)
        vm = "...i,...ij->...j"  # row vector times matrix, broadcasting over a batch
        stationarity = (torch.einsum(vm, x, 0.5 * (dQ + dQ.mT)) + dp + torch.einsum(vm, kept * nu, dA)
                        + torch.einsum(vm, active * lam, dG))
        rows = torch.einsum("...j,...ij->...i", x, torch.cat([dA, dG], dim=-2)) - torch.cat([db, dh], dim=-1)
        p = self.p
        dF = torch.cat([stationarity, kept * rows[..., :p], active * rows[..., p:]], dim=-1)
        return dF if inverse is None else torch.einsum(vm, dF, inverse)

    def certificate_blocks(self) -> tuple[int, ...]:
        """Stationarity, equality rows, inequality rows, dropped equalities' and inactive rows' feasibility,
        multiplier signs: each part in its own units."""
        n, pe, m = self.n, self.p, self.m
        return (n, pe, m, pe, m, m)

    def certify(self, Z: torch.Tensor, aux: tuple, params: list, batched: tuple[bool, ...]) -> tuple:
        """(certificate, term sizes from below, exact term sizes) of a whole batch, in numpy
        (`blackbox_diff.kkt.polyhedral_certificate`: one compiled loop where numba is installed): a small
        fraction of a backward. The exact sizes (products with |Q| and |[A; G]|) are computed only for a batch
        that does not pass against the sizes from below.

        The certificate: F, the feasibility of dropped equalities and of inactive rows, the signs of active
        multipliers. The size of each component's terms: 1/2 (|Q||x| + |Q^T||x|) + |p| + |A^T||nu| + |G^T||lam|
        for stationarity (the QP sees only Q's symmetric part), |A||x| + |b| and |G||x| + |h| for constraint
        rows, |y| for pinned multipliers, and for a multiplier's sign the size a multiplier of that row must
        have to matter in stationarity.
        """
        z, active, kept = (float64_numpy(t) for t in (Z, aux[0], aux[1]))
        Q, p, G, h, A, b = (float64_numpy(t) if bt else float64_numpy(t)[None]
                            for t, bt in zip(params, batched, strict=True))
        data = (z, kept, active, Q, p, A, b, G, h)
        certificate, lower, worst = polyhedral_certificate(*data, symmetric=True)
        return certificate, lower, lambda: polyhedral_term_sizes(*data, symmetric=True), worst

    # --- answer -> unknowns -> outputs ------------------------------------------------------------
    def prepare(self, solution: Any, params: tuple, options: Any) -> tuple[torch.Tensor, tuple]:
        fmt = answer_dtype_device(params)
        active = np.asarray(solution.active, dtype=bool)
        z = np.concatenate([solution.x, solution.eq, np.where(active, solution.ineq, 0.0)])
        status = SINGULAR if solution.singular else WEAK if np.any(solution.weak) else REGULAR

        def tensor(a: Any) -> torch.Tensor:
            return owned_tensor(a, *fmt)

        kept = np.ones(self.p)
        aux = (tensor(active), tensor(kept), tensor([status]))
        if self.precondition:
            aux += (tensor(self.full_inverse(solution.kkt_inverse, active, kept.astype(bool))),)
        return tensor(z), aux

    def full_inverse(self, inverse: np.ndarray | None, active: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """K0^{-1} in the unknowns' order: K_S^{-1} on (x, kept nu, lam_S), the identity on pinned multipliers.
        No K_S^{-1} (singular): the identity, i.e. the raw F (the engine's adjoint escalates on it)."""
        N = self.n + self.p + self.m
        out = np.eye(N)
        if inverse is None:
            return out
        keep = np.concatenate([np.ones(self.n, dtype=bool), kept, active])
        idx = np.nonzero(keep)[0]
        out[np.ix_(idx, idx)] = inverse
        return out

    def degeneracy(self, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Any:
        """The admissible active sets of a degenerate answer (see `blackbox_diff_qp._degenerate`)."""
        if aux[2].item() == REGULAR:
            return None
        return qp_degeneracy(self, z, aux, params)

    def finish(self, z: torch.Tensor, aux: tuple, options: Any) -> Any:
        x, nu, lam = self.split(z)
        if not getattr(options, "return_duals", False):
            return x
        return KKTSolution(x=x, eq=nu, ineq=lam)
