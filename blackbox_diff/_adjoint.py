"""Adjoint solve policy: which linear solver, when to escalate, how to regularise.

Solves, per instance of a batch, ``(J + ridge*I)^T u = g`` where J = dF/dz at the black box's answer.
Only the transposed operator ``v -> J^T v`` (one VJP of the residual) is available; it is built once per
backward by the caller. The kernels in `blackbox_diff.linalg` do the arithmetic; this module chooses
among them and escalates Krylov -> dense -> least squares when a solve stalls or the system is singular.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from blackbox_diff import linalg
from blackbox_diff._errors import LinearSolveError
from blackbox_diff.linalg._result import make_solution

__all__ = ["choose_solver", "solve_adjoint"]

_KRYLOV = {
    "cg": linalg.cg,
    "minres": linalg.minres,
    "gmres": linalg.gmres,
    "bicgstab": linalg.bicgstab,
    "neumann": linalg.neumann,
}
# A Krylov solve that stalls escalates to a dense solve only up to this multiple of dense_max_size:
# beyond it, materialising J (n VJPs, n^2 memory per instance) would cost more than the user asked for.
DENSIFY_FACTOR = 4
_BY_STRUCTURE = {"spd": "cg", "symmetric": "minres", "fixed_point": "neumann", "general": "gmres", "identity": "gmres"}


def choose_solver(requested: str, structure: str, n: int, dense_max_size: int) -> str:
    """The solver 'auto' stands for: dense for small systems, else by the Jacobian's structure.

    A dense batched solve beats unpreconditioned Krylov methods on small and medium systems on CPU
    (measured in benchmarks/bench_adjoint.py), except for SPD Hessians, where CG on HVPs converges in
    few steps and never forms the matrix, and contractive fixed points, where Neumann needs a handful.
    """
    if requested != "auto":
        return requested
    if structure == "identity":
        return "identity"
    if structure in ("spd", "fixed_point"):
        return _BY_STRUCTURE[structure]
    return "dense" if n <= dense_max_size else _BY_STRUCTURE[structure]


def _dense_operator(
    matvec: Callable, batched_matvec: Callable | None, g: torch.Tensor, ridge: float
) -> torch.Tensor:
    B, n = g.shape
    A = linalg.materialize(matvec, n, batch=B, dtype=g.dtype, device=g.device, batched_matvec=batched_matvec)
    if ridge:
        A = A + ridge * torch.eye(n, dtype=g.dtype, device=g.device)
    return A


def solve_adjoint(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    *,
    structure: str,
    options,
    batched_matvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[linalg.LinearSolution]]:
    """Solve (J + ridge I)^T u = g for every row of g.

    Args:
        matvec: v (B, n) -> J^T v (B, n).
        g: right-hand sides (B, n).
        structure: the condition's structure hint ("spd", "symmetric", "fixed_point", "general").
        options: the `ImplicitOptions` (linear_solver, rtol, max_steps, ridge, fallback, dense_max_size).
        batched_matvec: optional V (k, B, n) -> J^T V, used to materialise J for a dense solve.

    Returns:
        (u, history): the solution and the `LinearSolution` of every attempt, in order.

    Raises:
        LinearSolveError: an instance did not converge and `options.fallback` is False.
    """
    B, n = g.shape
    if n == 0:
        return torch.zeros_like(g), []
    ridge = options.ridge
    op = (lambda v: matvec(v) + ridge * v) if ridge else matvec
    method = choose_solver(options.linear_solver, structure, n, options.dense_max_size)
    history: list[linalg.LinearSolution] = []
    if method == "identity":
        # The condition is preconditioned so that dF/dz = I at the answer: u = g, verified with one VJP.
        sol = make_solution(
            "identity", g, g - op(g), options.rtol * torch.linalg.vector_norm(g, dim=-1),
            torch.ones(B, dtype=torch.int64, device=g.device), torch.zeros(B, dtype=torch.bool, device=g.device),
        )
        A = None
    elif method in _KRYLOV:
        sol = _KRYLOV[method](op, g, rtol=options.rtol, max_steps=options.max_steps)
        A = None
    else:
        A = _dense_operator(matvec, batched_matvec, g, ridge)
        sol = linalg.dense_solve(A, g) if method == "dense" else linalg.lstsq_solve(A, g)
    history.append(sol)
    u, bad = sol.x, ~sol.converged
    if not bool(bad.any()):
        return u, history
    if not options.fallback:
        raise LinearSolveError(
            f"The adjoint system (dF/dz)^T u = dL/dz was not solved: {_failure_message(history, bad)}. "
            f"Expected a converged solve with rtol={options.rtol:g}. Allow escalation (fallback=True), pick "
            "linear_solver='dense', raise max_steps, or add ridge= if the system is singular."
        )
    if A is None and method != "gmres":
        # Neumann diverges on a non-contractive map, CG/MINRES on a system that is not SPD/symmetric:
        # GMRES assumes nothing and still never forms the matrix.
        sol = linalg.gmres(op, g, rtol=options.rtol, max_steps=options.max_steps)
        history.append(sol)
        u = torch.where(bad[:, None], sol.x, u)
        bad = bad & ~sol.converged
        if not bool(bad.any()):
            return u, history
    if A is None and n > DENSIFY_FACTOR * options.dense_max_size:
        raise LinearSolveError(
            f"The adjoint system (dF/dz)^T u = dL/dz was not solved: {_failure_message(history, bad)}. It has "
            f"n = {n} unknowns, more than {DENSIFY_FACTOR} x dense_max_size = "
            f"{DENSIFY_FACTOR * options.dense_max_size}, so it is not materialised as a dense fallback. Add "
            "ridge= if the system is singular, raise max_steps, or raise dense_max_size to allow a dense solve."
        )
    if A is None:
        A = _dense_operator(matvec, batched_matvec, g, ridge)
        dense = linalg.dense_solve(A, g)
        history.append(dense)
        u = torch.where(bad[:, None], dense.x, u)
        bad = bad & ~dense.converged
        if not bool(bad.any()):
            return u, history
    ls = linalg.lstsq_solve(A, g)
    history.append(ls)
    u = torch.where(bad[:, None], ls.x, u)
    idx = torch.nonzero(bad).flatten().tolist()
    warnings.warn(
        f"Adjoint system singular or not solvable at batch instances {idx} "
        f"({_failure_message(history, bad)}). Used the minimum-norm least-squares solution: the gradient "
        "there is not unique (degenerate or non-isolated solution). Add `ridge=` to regularise.",
        RuntimeWarning,
        stacklevel=4,
    )
    return u, history


def _failure_message(history: list[linalg.LinearSolution], bad: torch.Tensor) -> str:
    idx = torch.nonzero(bad).flatten().tolist()
    parts = []
    for sol in history:
        res = sol.residual_norm[bad].max().item() if bool(bad.any()) else 0.0
        its = int(sol.iterations[bad].max().item()) if bool(bad.any()) else 0
        parts.append(f"{sol.method}: residual {res:.3g} after {its} iterations")
    return f"instances {idx} failed; " + "; ".join(parts)
