"""bbd.KKT's answers: the unknowns (x, nu, a*lam) and aux of one answer, and its degenerate variants, by the
KKT toolkit (`blackbox_diff.kkt`) on the condition's own torch functions."""

from __future__ import annotations

from typing import Any

import torch

from blackbox_diff._errors import SolverError
from blackbox_diff.conditions._solution import KKTSolution
from blackbox_diff.engine import Degeneracy, answer_dtype_device, owned_tensor
from blackbox_diff.kkt import active_set_variants, classify, recover_multipliers

__all__ = ["kkt_degeneracy", "kkt_unknowns"]

# A constraint is a candidate for the active set during multiplier recovery when its slack is below this
# (relative to 1 + max|x|). Generous on purpose: the bounded least squares decides which candidates carry
# a positive multiplier, so a loose candidate set costs nothing when stationarity pins the multipliers.
CANDIDATE_SLACK = 1e-5


def _as_tensor(value: Any, fmt: tuple[torch.dtype, torch.device], what: str) -> torch.Tensor:
    try:
        return owned_tensor(value, *fmt)
    except (TypeError, ValueError) as err:
        raise SolverError(f"The black box returned {what} that is not numeric: {value!r}.") from err


def _jacobians(cond, x: torch.Tensor, params: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_f = torch.func.grad(lambda y: cond.f(y, *params).reshape(()))(x).reshape(-1)
    n = x.numel()

    def jac(fn, count):
        if count == 0:
            return x.new_zeros(0, n)
        return torch.func.jacrev(lambda y: fn(y, *params))(x).reshape(count, n)

    return grad_f, jac(cond.h, cond._sizes[1]), jac(cond.g, cond._sizes[2])


def _recover(cond, x: torch.Tensor, params: tuple, candidates: torch.Tensor):
    grad_f, jh, jg = _jacobians(cond, x, params)
    return recover_multipliers(grad_f, jh, jg, candidates)


def kkt_unknowns(cond, solution: Any, params: tuple, options: Any) -> tuple[torch.Tensor, tuple]:
    """One black-box answer -> (z = [x, nu, a*lam], (a,)) with a the active-set indicator."""
    fmt = answer_dtype_device(params)
    sol = solution if isinstance(solution, KKTSolution) else KKTSolution(x=solution)
    x = _as_tensor(sol.x, fmt, "x")
    h, g = cond.h(x, *params), cond.g(x, *params)
    sizes = (x.shape, h.numel(), g.numel())
    if cond._sizes is None:
        cond.set_sizes(*sizes)
    elif cond._sizes != sizes:
        raise SolverError(
            f"KKT sizes differ between batch instances: x shape, #eq, #ineq = {cond._sizes} before, "
            f"{sizes} now. Every instance of a batch must have the same problem dimensions."
        )
    nu = None if sol.eq is None else _as_tensor(sol.eq, fmt, "eq multipliers").reshape(-1)
    lam = None if sol.ineq is None else _as_tensor(sol.ineq, fmt, "ineq multipliers").reshape(-1)
    for name, val, count in (("eq", nu, sizes[1]), ("ineq", lam, sizes[2])):
        if val is not None and val.numel() != count:
            raise SolverError(
                f"The black box returned {val.numel()} {name} multipliers but the problem has {count} "
                f"{name} constraints. Return one multiplier per constraint, or None to recover them."
            )
    if (nu is None and sizes[1]) or (lam is None and sizes[2]):
        scale = 1.0 + float(x.abs().max()) if x.numel() else 1.0
        candidates = g >= -CANDIDATE_SLACK * scale
        nu, lam, _ = _recover(cond, x, params, candidates)
    nu = x.new_zeros(0) if nu is None else nu
    lam = x.new_zeros(0) if lam is None else lam
    # Weakly active constraints are kept active here; `kkt_degeneracy` compares both sides of them.
    active, _ = classify(g, lam, options.active_tol)
    a = active.to(x.dtype)
    z = torch.cat([x.reshape(-1), nu, a * lam])
    return z, (a, torch.ones_like(nu))



def kkt_degeneracy(cond, z: torch.Tensor, aux: tuple, params: tuple, options: Any):
    """A `Degeneracy` for a bbd.KKT point with dependent or weakly active constraints, else None."""
    with torch.no_grad():
        x, nu, lam = cond.split(z)
        grad_f, jh, jg = _jacobians(cond, x, params)
        found = active_set_variants(grad_f, jh, jg, nu, lam, aux[0] > 0.5, active_tol=options.active_tol)
    if found is None:
        return None
    variants = []
    for T, v_nu, v_lam in zip(found.sets, found.nu, found.lam, strict=True):
        a = torch.zeros_like(lam)
        a[T] = 1.0
        variants.append((torch.cat([x.reshape(-1), v_nu, v_lam]), (a, found.kept)))
    return Degeneracy(variants=variants, constraints=found.constraints, kind=found.kind, outputs=x.numel(),
                      main_regular=found.regular, labels=[f"active set {T}" for T in found.sets])
