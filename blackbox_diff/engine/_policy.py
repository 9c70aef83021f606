"""Linear-solve policy of the IFT core: which solver, when to escalate, how to regularise.

Solves, per instance of a batch, ``(A + ridge*I) x = b`` where A is ``(dF/dz)^T`` (the adjoint system of a
backward pass) or ``dF/dz`` itself (the tangent system of forward mode), seen through ``op: v -> A v``.
The kernels in `blackbox_diff.linalg` do the arithmetic; this module chooses among them and escalates
Krylov -> GMRES -> dense -> least squares when a solve stalls or the system is singular.

Right-hand sides that are not finite (a NaN or Inf cotangent) are not solved: their solution is NaN, so a
non-finite upstream gradient comes out as a non-finite gradient, without a "singular" warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from blackbox_diff import linalg
from blackbox_diff._errors import InputError, LinearSolveError

__all__ = ["DENSIFY_FACTOR", "choose_solver", "solve_linear"]

_KRYLOV = {
    "cg": linalg.cg,
    "minres": linalg.minres,
    "gmres": linalg.gmres,
    "bicgstab": linalg.bicgstab,
    "neumann": linalg.neumann,
}
# A Krylov solve that stalls escalates to a dense solve only up to this multiple of dense_max_size:
# beyond it, materialising A (n products, n^2 memory per instance) would cost more than the user asked for.
DENSIFY_FACTOR = 4
_BY_STRUCTURE = {"spd": "cg", "symmetric": "minres", "fixed_point": "neumann", "general": "gmres"}


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


def solve_linear(
    op: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    structure: str,
    options,
    materialize: Callable[[], torch.Tensor],
    what: str = "adjoint system (dF/dz)^T u = dL/dz",
    op_t: Callable[[torch.Tensor], torch.Tensor] | None = None,
    verify: str | None = None,
    identity_check: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[linalg.LinearSolution]]:
    """Solve (A + ridge I) x = b for every row of b.

    Args:
        op: v (B, n) -> A v (B, n), row by row.
        b: right-hand sides (B, n).
        structure: what is known of A ("spd", "symmetric", "fixed_point", "general", "identity").
        options: the `ImplicitOptions` (linear_solver, rtol, max_steps, ridge, fallback, dense_max_size).
        materialize: () -> A (B, n, n) dense, called only when a dense solve is needed.
        what: the system's name in messages.
        op_t: v -> A^T v, needed only by 'cgne' (CG on the normal equations A A^T y = b, x = A^T y).
        identity_check: for structure "identity", the product that checks A = I on b (default A_op; A^T is
            as good a check of A = I, and the cheaper one for a tangent system: one VJP, not two).
        verify: when the instances' independence is only claimed (a batched field), the hint to give if a
            dense solution (built from per-instance blocks) does not solve the system under `op` itself;
            None: independent by construction, nothing to verify.

    Returns:
        (x, history): the solution and the `LinearSolution` of every attempt, in order.

    Raises:
        LinearSolveError: an instance did not converge and `options.fallback` is False (or the system is
            too large to densify).
        InputError: `verify` is set and the instances turn out to be coupled.
    """
    B, n = b.shape
    if n == 0 or B == 0:
        return torch.zeros_like(b), []
    finite = torch.isfinite(b).all(dim=1)
    safe = b if bool(finite.all()) else torch.where(finite[:, None], b, torch.zeros_like(b))
    ridge = options.ridge
    A_op = (lambda v: op(v) + ridge * v) if ridge else op
    x, history = _solve(A_op, safe, structure, options, materialize, what, op_t, identity_check)
    if verify is not None and any(h.method in ("dense", "lstsq") for h in history):
        _verify(A_op, x, safe, verify, what)
    if not bool(finite.all()):
        x = torch.where(finite[:, None], x, torch.full_like(b, float("nan")))
    return x, history


def _verify(A_op, x: torch.Tensor, b: torch.Tensor, hint: str, what: str) -> None:
    """A dense solution assembled from per-instance blocks must solve the system under the exact operator."""
    Ax = A_op(x)
    err = torch.linalg.vector_norm(Ax - b, dim=1)
    tol = (1e-6 if b.dtype == torch.float64 else 1e-3) * (torch.linalg.vector_norm(b, dim=1)
                                                          + torch.linalg.vector_norm(Ax, dim=1))
    bad = err > tol
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise InputError(
            f"The {what} was solved instance by instance, but the solution does not satisfy the exact batched "
            f"operator (residual {float(err[i]):.3g} > {float(tol[i]):.3g} at instance {i}): the instances are "
            f"not independent. {hint}"
        )


def _solve(A_op, b, structure, options, materialize, what, op_t, identity_check=None):
    B, n = b.shape
    ridge = options.ridge
    method = choose_solver(options.linear_solver, structure, n, options.dense_max_size)
    history: list[linalg.LinearSolution] = []
    A = None

    def dense() -> torch.Tensor:
        nonlocal A
        if A is None:
            A = materialize()
            if ridge:
                A = A + ridge * torch.eye(n, dtype=A.dtype, device=A.device)
        return A

    if method == "identity":
        # The condition is preconditioned so that A = I at the answer: x = b, verified with one product.
        sol = linalg.make_solution(
            "identity", b, b - (identity_check or A_op)(b), options.rtol * torch.linalg.vector_norm(b, dim=-1),
            torch.ones(B, dtype=torch.int64, device=b.device), torch.zeros(B, dtype=torch.bool, device=b.device),
        )
    elif method in _KRYLOV:
        sol = _KRYLOV[method](A_op, b, rtol=options.rtol, max_steps=options.max_steps)
    elif method == "cgne":
        sol = _cgne(A_op, op_t, ridge, b, options)
    elif method == "dense":
        sol = linalg.dense_solve(dense(), b)
    else:
        sol = linalg.lstsq_solve(dense(), b)
    history.append(sol)
    x, bad = sol.x, ~sol.converged
    if not bool(bad.any()):
        return x, history
    if not options.fallback:
        raise LinearSolveError(
            f"The {what} was not solved: {failure_message(history, bad)}. Expected a converged solve with "
            f"rtol={options.rtol:g}. Allow escalation (fallback=True), pick linear_solver='dense', raise "
            "max_steps, or add ridge= if the system is singular."
        )
    if A is None and method not in ("gmres", "lstsq"):
        # Neumann diverges on a non-contractive map, CG/MINRES on a system that is not SPD/symmetric:
        # GMRES assumes nothing and still never forms the matrix.
        sol = linalg.gmres(A_op, b, rtol=options.rtol, max_steps=options.max_steps)
        history.append(sol)
        x = torch.where(bad[:, None], sol.x, x)
        bad = bad & ~sol.converged
        if not bool(bad.any()):
            return x, history
    if A is None and n > DENSIFY_FACTOR * options.dense_max_size:
        raise LinearSolveError(
            f"The {what} was not solved: {failure_message(history, bad)}. It has n = {n} unknowns, more "
            f"than {DENSIFY_FACTOR} x dense_max_size = {DENSIFY_FACTOR * options.dense_max_size}, so it is "
            "not materialised as a dense fallback. Add ridge= if the system is singular, raise max_steps, or "
            "raise dense_max_size to allow a dense solve."
        )
    if method != "dense" and method != "lstsq":
        sol = linalg.dense_solve(dense(), b)
        history.append(sol)
        x = torch.where(bad[:, None], sol.x, x)
        bad = bad & ~sol.converged
        if not bool(bad.any()):
            return x, history
    ls = linalg.lstsq_solve(dense(), b)
    history.append(ls)
    x = torch.where(bad[:, None], ls.x, x)
    idx = torch.nonzero(bad).flatten().tolist()
    warnings.warn(
        f"{what[0].upper()}{what[1:]} singular or not solvable at batch instances {idx} "
        f"({failure_message(history, bad)}). "
        "Used the minimum-norm least-squares solution: the derivative there is not unique (degenerate or "
        "non-isolated solution). Add `ridge=` to regularise.",
        RuntimeWarning,
        stacklevel=2,
    )
    return x, history


def _cgne(A_op, op_t, ridge: float, b: torch.Tensor, options) -> linalg.LinearSolution:
    """CG on the normal equations A A^T y = b, x = A^T y (Craig's method): any nonsingular A, two
    products per step, as in the Differentiable Implicit Layers poster."""
    if op_t is None:
        raise InputError("linear_solver 'cgne' needs the transposed operator; this system does not provide it.")
    At = (lambda v: op_t(v) + ridge * v) if ridge else op_t
    y = linalg.cg(lambda v: A_op(At(v)), b, rtol=options.rtol, max_steps=options.max_steps)
    x = At(y.x)
    return linalg.make_solution("cgne", x, b - A_op(x), options.rtol * torch.linalg.vector_norm(b, dim=-1),
                         y.iterations, y.breakdown)


def failure_message(history: list[linalg.LinearSolution], bad: torch.Tensor) -> str:
    """'instances [..] failed; method: residual r after k iterations; ...' for the failed rows."""
    idx = torch.nonzero(bad).flatten().tolist()
    parts = []
    for sol in history:
        res = sol.residual_norm[bad].max().item() if bool(bad.any()) else 0.0
        its = int(sol.iterations[bad].max().item()) if bool(bad.any()) else 0
        parts.append(f"{sol.method}: residual {res:.3g} after {its} iterations")
    return f"instances {idx} failed; " + "; ".join(parts)
