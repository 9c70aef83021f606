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
    active, weak = classify(g, lam, options.active_tol)
    if bool(weak.any()):
        warn_weakly_active("KKT: inequality constraints", torch.nonzero(weak).flatten().tolist(),
                           f"active_tol={options.active_tol:g}", "the one-sided derivative that keeps them active",
                           stacklevel=6)
    a = active.to(x.dtype)
    z = torch.cat([x.reshape(-1), nu, a * lam])
    return z, (a,)

