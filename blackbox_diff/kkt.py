"""The KKT toolkit: active sets, multipliers and degenerate points, for every condition with inequalities.

`bbd.KKT` and the backends (scipy, cvxpy, CasADi, QP) state KKT conditions on an explicitly identified
active set; these functions are what they share, public so that a third-party backend gets the same:

* `classify` decides active / weakly active from slacks and multipliers together (a multiplier's sign
  alone is not enough: interior-point solvers leave ~1e-9 multipliers on inactive constraints);
* `recover_multipliers` finds multipliers from stationarity when a black box returns x only;
* `active_set_variants` lists the admissible one-sided active sets of a degenerate point (dependent active
  rows, weakly active rows, redundant equalities), each a regular system, for a `Degeneracy`;
* `warn_weakly_active` is the one warning for weakly active constraints where no comparison is made;
* `polyhedral_certificate` and `polyhedral_term_sizes` certify a batch of QP/LP answers stated on their
  active sets (numpy; one compiled loop where numba is installed).

Everything works on dense Jacobians of one instance: ``grad_f`` (n,), ``jh`` (p, n), ``jg`` (m, n), with
the Lagrangian L = f + nu^T h + lam^T g, g <= 0, lam >= 0.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from blackbox_diff.linalg import polyhedral_certificate, polyhedral_term_sizes

__all__ = [
    "ActiveSetVariants",
    "active_set_variants",
    "classify",
    "independent_rows",
    "polyhedral_certificate",
    "polyhedral_term_sizes",
    "rank",
    "recover_multipliers",
    "warn_weakly_active",
]

_RANK_RTOL = 1e-8  # singular values below this fraction of the largest (of unit-norm rows) are zero
MAX_ENUMERATED = 12  # weak or dependent active rows beyond this are not enumerated (2^12 subsets)


def classify(g: torch.Tensor, lam: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split inequalities into active / weakly active from g(x) <= 0 and lam >= 0.

    Returns:
        (active, weak): boolean masks. `active` includes the weakly active constraints (slack and
        multiplier both <= tol); `active_set_variants` then considers both sides of them.
    """
    slack = torch.clamp(-g, min=0.0)
    weak = (slack <= tol) & (lam <= tol)
    strong = (lam > slack) & (lam > tol)
    return strong | weak, weak


def warn_weakly_active(subject: str, indices: list, tol: str, returned: str, stacklevel: int = 2) -> None:
    """The one warning for weakly active constraints (`classify`'s `weak`) where no comparison is made.

    Args:
        subject: what the indices number, e.g. "KKT: inequality constraints".
        indices: the weakly active ones.
        tol: the threshold as shown, e.g. "active_tol=1e-07".
        returned: which derivative the gradient is, e.g. "the one-sided derivative that keeps them active".
        stacklevel: as for `warnings.warn`, counted from the caller of this function.
    """
    warnings.warn(
        f"{subject} {indices} are weakly active (slack and multiplier both <= {tol}). The solution map is not "
        f"differentiable there; the gradient returned is {returned}.",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def recover_multipliers(grad_f: torch.Tensor, jh: torch.Tensor, jg: torch.Tensor, candidates: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multipliers from stationarity: min ||grad f + Jh^T nu + Jg_C^T lam_C|| s.t. lam_C >= 0.

    Solved as a bounded linear least-squares problem (non-negative on the candidate inequalities, free on
    the equalities) with scipy's lsq_linear.

    Returns:
        (nu, lam, residual): lam is zero outside `candidates`; residual is the stationarity norm left.
    """
    from scipy.optimize import lsq_linear

    cand = candidates.cpu().numpy()
    A = np.concatenate([jh.detach().cpu().numpy(), jg.detach().cpu().numpy()[cand]], axis=0).T
    p = jh.shape[0]
    lam = np.zeros(jg.shape[0])
    nu = np.zeros(p)
    b = -grad_f.detach().cpu().numpy()
    if A.shape[1]:
        lower = np.concatenate([np.full(p, -np.inf), np.zeros(int(cand.sum()))])
        sol = lsq_linear(A, b, bounds=(lower, np.full(A.shape[1], np.inf)), method="bvls", tol=1e-14)
        nu, lam[cand] = sol.x[:p], sol.x[p:]
        residual = float(np.linalg.norm(A @ sol.x - b))
    else:
        residual = float(np.linalg.norm(b))
    return grad_f.new_tensor(nu), grad_f.new_tensor(lam), residual


def rank(rows: torch.Tensor) -> int:
    """Numerical rank of the rows scaled to unit norm (scale-invariant: a(x - t) <= 0 and b(x - t) <= 0 are
    the same constraint for any a, b > 0)."""
    if rows.shape[0] == 0:
        return 0
    norms = rows.norm(dim=1)
    unit = rows[norms > 0] / norms[norms > 0, None]
    if unit.shape[0] == 0:
        return 0
    s = torch.linalg.svdvals(unit)
    return int((s > _RANK_RTOL * s[0]).sum())


def independent_rows(rows: torch.Tensor) -> list[int]:
    """A maximal set of linearly independent rows, greedily in order (unit-norm, relative rank test)."""
    keep: list[int] = []
    for i in range(rows.shape[0]):
        if rank(rows[keep + [i]]) == len(keep) + 1:
            keep.append(i)
    return keep


@dataclasses.dataclass
class ActiveSetVariants:
    """The admissible one-sided active sets of a degenerate KKT point.

    Attributes:
        sets: the inequality indices held active by each variant (largest first).
        nu: the equality multipliers of each variant (zeros on dropped redundant equalities).
        lam: the inequality multipliers of each variant (zeros outside its set).
        kept: 0/1 per equality: 0 for redundant equalities dropped by every variant.
        regular: whether the answer's own active set is a regular system (independent rows).
        kind: what makes the point degenerate, for messages.
        constraints: the active inequality indices concerned.
    """

    sets: list[list[int]]
    nu: list[torch.Tensor]
    lam: list[torch.Tensor]
    kept: torch.Tensor
    regular: bool
    kind: str
    constraints: list[int]


def active_set_variants(grad_f: torch.Tensor, jh: torch.Tensor, jg: torch.Tensor, nu: torch.Tensor,
                        lam: torch.Tensor, active: torch.Tensor, *, active_tol: float) -> ActiveSetVariants | None:
    """The admissible one-sided active sets at a KKT point, or None when the point is regular.

    A set T (a subset of the active inequalities, with the equalities) is admissible when its rows are
    linearly independent, it leaves out only weakly active or redundant rows, and some multipliers on it
    solve stationarity (as well as the answer's own do, give or take the dropped weak rows' multipliers,
    at most `active_tol` each) and are non-negative (beyond `active_tol` for weak rows). Each admissible set
    is a regular equality-constrained system: its derivative does not depend on any linear solver.

    Args:
        grad_f, jh, jg: gradient of f and Jacobians of h and g at x (one instance).
        nu, lam: the answer's multipliers (lam is zero outside `active`).
        active: boolean mask of the inequalities the answer holds active (weak ones included).
        active_tol: the slack / multiplier threshold of `classify`.
    """
    with torch.no_grad():
        act = torch.nonzero(active).flatten().tolist()
        g_lam = torch.where(active, lam, torch.zeros_like(lam))
        weak_mask = active & (g_lam <= active_tol)
        weak = [j for j in act if bool(weak_mask[j])]
        p = jh.shape[0]
        full = torch.cat([jh, jg[act]]) if act else jh
        regular = rank(full) == full.shape[0]
        if regular and not weak:
            return None
        # A strongly active row outside every dependency is in every admissible set (dropping it is never
        # allowed), so only weak rows and rows in a dependency are enumerated.
        full_rank = rank(full)
        free = [j for j in act if j in weak or (not regular and rank(
            torch.cat([jh, jg[[i for i in act if i != j]]])) == full_rank)]
        fixed = [j for j in act if j not in free]
        if len(free) > MAX_ENUMERATED:
            warnings.warn(
                f"Degenerate point not examined: {len(free)} active inequality constraints are weakly active or "
                f"linearly dependent ({free[:8]}{'...' if len(free) > 8 else ''}), more than the "
                f"{MAX_ENUMERATED} whose one-sided active sets are compared. The derivative returned is that of "
                "the answer's own active set and may be one-sided.", RuntimeWarning, stacklevel=3)
            return None
        keep = independent_rows(jh)  # redundant equalities: any maximal independent subset states the same
        r0 = float((grad_f + jh.mT @ nu + jg.mT @ g_lam).norm()) if grad_f.numel() else 0.0
        found = []
        for mask in range(1 << len(free)):
            T = sorted(fixed + [j for k, j in enumerate(free) if mask >> k & 1])
            dropped = [j for j in act if j not in T]
            slack = 10 * r0 + 2 * active_tol * sum(float(jg[j].norm()) for j in dropped if j in weak)
            mult = _multipliers(grad_f, jh[keep], jg, T, dropped, weak, slack, 2 * active_tol)
            if mult is not None:
                found.append((T, mult))
        if len(found) < 2 and regular:
            return None
        found.sort(key=lambda item: (-len(item[0]), item[0]))
        kept = torch.zeros(p, dtype=grad_f.dtype, device=grad_f.device)
        kept[keep] = 1.0
        nus, lams = [], []
        for T, mult in found:
            v = grad_f.new_zeros(p)
            v[keep] = mult[: len(keep)]
            lt = grad_f.new_zeros(jg.shape[0])
            lt[T] = mult[len(keep):]
            nus.append(v)
            lams.append(lt)
        kinds = []
        if not regular:
            rows = [f"equality constraints {list(range(p))}"] if p and len(keep) < p else []
            rows += [f"active inequality constraints {act}"] if act else []
            kinds.append(f"{' and '.join(rows) or 'the active constraints'} are linearly dependent (LICQ fails)")
        if weak:
            kinds.append(f"inequality constraints {weak} are weakly active (slack and multiplier both <= "
                         f"active_tol={active_tol:g})")
        return ActiveSetVariants([T for T, _ in found], nus, lams, kept, regular, "; ".join(kinds), act)


def _multipliers(grad_f, jh, jg, T: list[int], dropped: list[int], weak: list[int], slack: float,
                 weak_dual: float) -> torch.Tensor | None:
    """(nu, lam_T) of the active set T, or None when T is not admissible."""
    rows = torch.cat([jh, jg[T]]) if T else jh
    r = rank(rows)
    if r != rows.shape[0]:
        return None  # dependent: its multipliers are not unique
    for j in dropped:  # a dropped row must be weakly active or implied by the kept ones
        if j not in weak and rank(torch.cat([rows, jg[j : j + 1]])) != r:
            return None
    if rows.shape[0] == 0:
        mult = grad_f.new_zeros(0)
        residual = grad_f.norm()
        size = grad_f.norm()
    else:
        mult = torch.linalg.lstsq(rows.mT, -grad_f.unsqueeze(-1)).solution.squeeze(-1)
        residual = (rows.mT @ mult + grad_f).norm()
        size = grad_f.norm() + (mult.abs() * rows.norm(dim=1)).sum()
    if float(residual) > 1e-6 * float(size) + slack + torch.finfo(grad_f.dtype).tiny:
        return None  # not stationary on T
    lam = mult[jh.shape[0]:]
    floor = torch.tensor([weak_dual if j in weak else 0.0 for j in T], dtype=lam.dtype, device=lam.device)
    if lam.numel() and bool((lam * jg[T].norm(dim=1) < -1e-8 * float(size) - floor).any()):
        return None  # a negative multiplier (beyond a weakly active row's tolerance): not a KKT point on T
    return mult
