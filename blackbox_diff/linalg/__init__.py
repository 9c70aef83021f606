"""Batched linear-solver kernels: a pure-math core that imports only torch.

Every solver takes a batch of ``B`` independent systems ``A_i x_i = b_i`` of size ``n`` (right-hand
sides ``b`` of shape ``(B, n)``; iterative solvers see ``A`` only through ``matvec``, mapping ``(B, n)``
to ``(B, n)`` with row ``i`` equal to ``A_i @ v_i``) and returns a `LinearSolution` with
per-instance convergence, iteration counts, true residual norms and breakdown flags. The solvers never
raise because an instance failed; choosing a solver, escalating and regularising is the caller's policy.

| solver | for | iteration |
|---|---|---|
| `cg` | symmetric positive definite | conjugate gradients |
| `minres` | symmetric, possibly indefinite | Lanczos + Givens (Paige-Saunders) |
| `gmres` | general | restarted Arnoldi + Givens |
| `bicgstab` | general | BiCG + local residual minimisation |
| `neumann` | ``I - A`` contractive | Richardson / Neumann series |
| `dense_solve` | small, square | LU with partial pivoting |
| `lstsq_solve` | rank-deficient, rectangular | SVD pseudo-inverse (minimum norm) |

`materialize` turns a ``matvec`` into dense matrices for the two direct solvers; `make_solution` builds a
`LinearSolution` from a solution and its true residual (for solvers written outside this package).

Besides, in numpy, for the answer checks that run after every forward: `Kernel` (a loop compiled by numba
when it is installed, the ``fast`` extra; `use_kernels` switches kernels off) and the batched certificate
of polyhedral KKT answers (`polyhedral_certificate`, `polyhedral_term_sizes`: every QP and LP).
"""

from ._bicgstab import bicgstab
from ._cg import cg
from ._dense import dense_solve, lstsq_solve, materialize
from ._gmres import gmres
from ._kernels import KERNELS_ENV, Kernel, describe_kernels, kernels_enabled, use_kernels
from ._krylov import Matvec
from ._minres import minres
from ._neumann import neumann
from ._polyhedral import polyhedral_certificate, polyhedral_term_sizes
from ._result import LinearSolution, make_solution

__all__ = [
    "KERNELS_ENV",
    "Kernel",
    "LinearSolution",
    "Matvec",
    "bicgstab",
    "cg",
    "dense_solve",
    "describe_kernels",
    "gmres",
    "kernels_enabled",
    "lstsq_solve",
    "make_solution",
    "materialize",
    "minres",
    "neumann",
    "polyhedral_certificate",
    "polyhedral_term_sizes",
    "use_kernels",
]
