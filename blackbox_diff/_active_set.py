"""KKT points: active-set identification and multiplier recovery.

The active set is decided from slacks and multipliers together. A multiplier's sign alone is not enough:
interior-point solvers return ~1e-9 multipliers for inactive constraints, and taking those constraints as
active (or differentiating lam*g = 0 at such a point) biases the gradient.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from blackbox_diff._batching import owned_tensor
from blackbox_diff._conditions import KKTSolution
from blackbox_diff._errors import SolverError

__all__ = ["classify", "kkt_unknowns", "recover_multipliers", "warn_weakly_active"]

# A constraint is a candidate for the active set during multiplier recovery when its slack is below this
# (relative to 1 + max|x|). Generous on purpose: the bounded least squares decides which candidates carry
# a positive multiplier, so a loose candidate set costs nothing when stationarity pins the multipliers.
CANDIDATE_SLACK = 1e-5


def _as_tensor(value: Any, like: torch.Tensor, what: str) -> torch.Tensor:
    try:
        return owned_tensor(value, like.dtype, like.device)
    except (TypeError, ValueError) as err:
        raise SolverError(f"The black box returned {what} that is not numeric: {value!r}.") from err


def classify(g: torch.Tensor, lam: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split inequalities into active / weakly active from g(x) <= 0 and lam >= 0.

    Returns:
        (active, weak): boolean masks. `active` includes the weakly active constraints (slack and
        multiplier both <= tol), which the engine treats as active and warns about.
    """
    slack = torch.clamp(-g, min=0.0)
    weak = (slack <= tol) & (lam <= tol)
    strong = (lam > slack) & (lam > tol)
    return strong | weak, weak


def warn_weakly_active(subject: str, indices: list, tol: str, returned: str, stacklevel: int = 2) -> None:
    """The one warning for weakly active constraints (`classify`'s `weak`), shared by every active-set user.

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


def _jacobians(cond, x: torch.Tensor, params: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_f = torch.func.grad(lambda y: cond.f(y, *params).reshape(()))(x).reshape(-1)
    n = x.numel()

    def jac(fn, count):
        if count == 0:
            return x.new_zeros(0, n)
        return torch.func.jacrev(lambda y: fn(y, *params))(x).reshape(count, n)

    return grad_f, jac(cond.h, cond._sizes[1]), jac(cond.g, cond._sizes[2])


def recover_multipliers(
    cond, x: torch.Tensor, params: tuple, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multipliers from stationarity: min ||grad f + Jh^T nu + Jg_C^T lam_C|| s.t. lam_C >= 0.

    Solved as a bounded linear least-squares problem (non-negative on the candidate inequalities, free on
    the equalities) with scipy's lsq_linear.

    Returns:
        (nu, lam, residual): lam is zero outside `candidates`; residual is the stationarity norm left.
    """
    from scipy.optimize import lsq_linear

    grad_f, jh, jg = _jacobians(cond, x, params)
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
    return x.new_tensor(nu), x.new_tensor(lam), residual


def kkt_unknowns(cond, solution: Any, params: tuple, options: Any) -> tuple[torch.Tensor, tuple]:
    """One black-box answer -> (z = [x, nu, a*lam], (a,)) with a the active-set indicator."""
    like = next((p for p in params if torch.is_tensor(p)), torch.zeros((), dtype=torch.float64))
    if not torch.is_floating_point(like):
        like = torch.zeros((), dtype=torch.float64, device=like.device)
    sol = solution if isinstance(solution, KKTSolution) else KKTSolution(x=solution)
    x = _as_tensor(sol.x, like, "x")
    h, g = cond.h(x, *params), cond.g(x, *params)
    sizes = (x.shape, h.numel(), g.numel())
    if cond._sizes is None:
        cond.set_sizes(*sizes)
    elif cond._sizes != sizes:
        raise SolverError(
            f"KKT sizes differ between batch instances: x shape, #eq, #ineq = {cond._sizes} before, "
            f"{sizes} now. Every instance of a batch must have the same problem dimensions."
        )
    nu = None if sol.eq is None else _as_tensor(sol.eq, like, "eq multipliers").reshape(-1)
    lam = None if sol.ineq is None else _as_tensor(sol.ineq, like, "ineq multipliers").reshape(-1)
    for name, val, count in (("eq", nu, sizes[1]), ("ineq", lam, sizes[2])):
        if val is not None and val.numel() != count:
            raise SolverError(
                f"The black box returned {val.numel()} {name} multipliers but the problem has {count} "
                f"{name} constraints. Return one multiplier per constraint, or None to recover them."
            )
    if (nu is None and sizes[1]) or (lam is None and sizes[2]):
        scale = 1.0 + float(x.abs().max()) if x.numel() else 1.0
        candidates = g >= -CANDIDATE_SLACK * scale
        nu, lam, _ = recover_multipliers(cond, x, params, candidates)
    nu = x.new_zeros(0) if nu is None else nu
    lam = x.new_zeros(0) if lam is None else lam
    # Weakly active constraints are kept active here; `kkt_degeneracy` compares both sides of them.
    active, _ = classify(g, lam, options.active_tol)
    a = active.to(x.dtype)
    z = torch.cat([x.reshape(-1), nu, a * lam])
    return z, (a, torch.ones_like(nu))



# --- degenerate points: dependent active constraints, weakly active ones ---------------------------------
_RANK_RTOL = 1e-8  # singular values below this fraction of the largest (of unit-norm rows) are zero
_MAX_ENUMERATED = 12  # active constraints beyond this are not enumerated (2^12 subsets)


def _rank(rows: torch.Tensor) -> int:
    """Numerical rank of the rows scaled to unit norm (scale-invariant: a(x - t) <= 0 and b(x - t) <= 0 are
    the same constraint for any a, b > 0)."""
    if rows.shape[0] == 0:
        return 0
    norms = rows.norm(dim=1, keepdim=True)
    unit = rows[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    if unit.shape[0] == 0:
        return 0
    s = torch.linalg.svdvals(unit)
    return int((s > _RANK_RTOL * s[0]).sum())


def kkt_degeneracy(cond, z: torch.Tensor, aux: tuple, params: tuple, options: Any):
    """A `Degeneracy` for a KKT point whose active constraints are dependent or weakly active, else None.

    The variants are the admissible one-sided active sets T: the equalities plus a subset of the active
    inequalities that is linearly independent, leaves out only weakly active or redundant rows, and carries
    non-negative multipliers solving stationarity. Each gives a regular KKT system.
    """
    from blackbox_diff.engine import Degeneracy

    with torch.no_grad():
        x, nu, lam = cond.split(z)
        a = aux[0] > 0.5
        grad_f, jh, jg = _jacobians(cond, x, params)
        g = cond.g(x, *params)
        active = torch.nonzero(a).flatten().tolist()
        _, weak_mask = classify(g, torch.where(a, lam, torch.zeros_like(lam)), options.active_tol)
        weak = [j for j in active if bool(weak_mask[j])]
        p = jh.shape[0]
        full = torch.cat([jh, jg[active]]) if active else jh
        regular = _rank(full) == full.shape[0]
        if regular and not weak:
            return None
        if len(active) > _MAX_ENUMERATED:
            return None
        keep = _independent_rows(jh)  # redundant equalities: any maximal independent subset states the same
        jh_kept = jh[keep]
        # A variant must be as stationary as the answer itself, give or take the multipliers of the weakly
        # active rows it drops (at most active_tol each).
        lam_a = torch.where(a, lam, torch.zeros_like(lam))
        r0 = float((grad_f + jh.mT @ nu + jg.mT @ lam_a).norm()) if grad_f.numel() else 0.0
        variants = []
        for mask in range(1 << len(active)):
            T = [j for k, j in enumerate(active) if mask >> k & 1]
            dropped = [j for j in active if j not in T]
            slack = 10 * r0 + 2 * options.active_tol * sum(float(jg[j].norm()) for j in dropped if j in weak)
            v = _variant(x, grad_f, jh_kept, jg, T, dropped, weak, slack, 2 * options.active_tol)
            if v is not None:
                nu = x.new_zeros(p)
                nu[keep] = v[: len(keep)]
                variants.append((len(T), T, torch.cat([nu, v[len(keep):]])))
        if len(variants) < 2 and regular:
            return None
        variants.sort(key=lambda item: (-item[0], item[1]))
        kinds = []
        if not regular:
            rows = [f"equality constraints {list(range(p))}"] if p else []
            rows += [f"active inequality constraints {active}"] if active else []
            kinds.append(f"{' and '.join(rows)} are linearly dependent (LICQ fails)")
        if weak:
            kinds.append(f"inequality constraints {weak} are weakly active (slack and multiplier both <= "
                         f"active_tol={options.active_tol:g})")
        n = x.numel()
        kept = torch.zeros(p, dtype=x.dtype, device=x.device)
        kept[keep] = 1.0
        zs = [(torch.cat([x.reshape(-1), mult[:p], _scatter(mult[p:], T, jg.shape[0], x)]),
               (_indicator(T, jg, x), kept)) for _, T, mult in variants]
        return Degeneracy(
            variants=zs, constraints=sorted(set(active)), kind="; ".join(kinds), outputs=n, main_regular=regular,
            labels=[f"active set {T}" for _, T, _ in variants],
        )


def _independent_rows(rows: torch.Tensor) -> list[int]:
    """A maximal set of linearly independent rows, greedily in order (unit-norm, relative rank test)."""
    keep: list[int] = []
    for i in range(rows.shape[0]):
        if _rank(rows[keep + [i]]) == len(keep) + 1:
            keep.append(i)
    return keep


def _indicator(T: list[int], jg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = like.new_zeros(jg.shape[0])
    a[T] = 1.0
    return a


def _scatter(values: torch.Tensor, T: list[int], m: int, like: torch.Tensor) -> torch.Tensor:
    out = like.new_zeros(m)
    out[T] = values
    return out


def _variant(x, grad_f, jh, jg, T: list[int], dropped: list[int], weak: list[int], slack: float,
             weak_dual: float) -> torch.Tensor | None:
    """The multipliers (nu, lam_T) of the active set T, or None when T is not admissible."""
    rows = torch.cat([jh, jg[T]]) if T else jh
    r = _rank(rows)
    if r != rows.shape[0]:
        return None  # dependent: its multipliers are not unique
    for j in dropped:  # a dropped row must be weakly active or implied by the kept ones
        if j not in weak and _rank(torch.cat([rows, jg[j : j + 1]])) != r + 0:
            return None
    if rows.shape[0] == 0:
        mult = x.new_zeros(0)
        residual = grad_f.norm()
    else:
        mult = torch.linalg.lstsq(rows.mT, -grad_f.unsqueeze(-1)).solution.squeeze(-1)
        residual = (rows.mT @ mult + grad_f).norm()
    size = grad_f.norm() + (mult.abs() * rows.norm(dim=1)).sum() if rows.shape[0] else grad_f.norm()
    if float(residual) > 1e-6 * float(size) + slack + torch.finfo(x.dtype).tiny:
        return None  # not stationary on T
    lam = mult[jh.shape[0]:]
    floor = torch.tensor([weak_dual if j in weak else 0.0 for j in T], dtype=lam.dtype, device=lam.device)
    if lam.numel() and bool((lam * jg[T].norm(dim=1) < -1e-8 * float(size) - floor).any()):
        return None  # a negative multiplier (beyond a weakly active row's tolerance): not a KKT point on T
    return mult
