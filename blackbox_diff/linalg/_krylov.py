"""Plumbing shared by the batched iterative solvers: argument checks, the checked operator, helpers.

Every iterative solver works on a batch of ``B`` independent systems ``A_i x_i = b_i`` of size ``n``,
given only through ``matvec``, which maps a ``(B, n)`` tensor to a ``(B, n)`` tensor whose row ``i``
is ``A_i @ v_i``. Scalars of the recurrences are ``(B,)`` tensors; an instance that has converged
or broken down is frozen by masking (``torch.where``) while the others go on, so the whole batch
advances in one vectorised step per iteration with a single host synchronisation (``active.any()``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import torch

from ._result import LinearSolution, make_solution

__all__ = [
    "KrylovProblem",
    "Matvec",
    "bdot",
    "bnorm",
    "check_count",
    "check_rhs",
    "check_tolerance",
    "check_x0",
    "finish",
    "safe",
    "setup",
]

Matvec = Callable[[torch.Tensor], torch.Tensor]
"""A batched linear operator: maps ``v`` of shape ``(B, n)`` to ``(B, n)`` with row ``i`` = ``A_i @ v_i``."""

# Half precision cannot reach the tolerances these recurrences are tuned for; say so up front.
_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass
class KrylovProblem:
    """A validated batched problem, ready for an iteration.

    Attributes:
        op: the user's ``matvec`` wrapped with an output shape/dtype check.
        b: right-hand sides ``(B, n)``.
        x: starting point ``(B, n)`` (``x0`` or zeros).
        r: initial residual ``b - A x`` (``b`` itself without ``x0``: no operator application).
        tol: per-instance threshold ``max(rtol * ||b_i||, atol)`` of shape ``(B,)``.
        max_steps: the iteration cap.
    """

    op: Matvec
    b: torch.Tensor
    x: torch.Tensor
    r: torch.Tensor
    tol: torch.Tensor
    max_steps: int

    def counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh ``(iterations, breakdown)`` tensors, zero / False for every instance."""
        B = self.b.shape[0]
        device = self.b.device
        return (
            torch.zeros(B, dtype=torch.int64, device=device),
            torch.zeros(B, dtype=torch.bool, device=device),
        )


def check_rhs(b: object, name: str = "b") -> torch.Tensor:
    """Check that ``b`` is a float32/float64 tensor of shape ``(B, n)``.

    Empty batches (``B = 0``) and empty systems (``n = 0``) are allowed, as in ``torch.linalg.solve``:
    they are solved trivially.
    """
    if not isinstance(b, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape (B, n), got {type(b).__name__}")
    if b.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a real floating-point tensor (float32 or float64), got {b.dtype}")
    if b.ndim != 2:
        raise ValueError(
            f"{name}: expected shape (B, n), one row per instance (use b.unsqueeze(0) for a single "
            f"system), got {tuple(b.shape)}"
        )
    return b


def check_x0(x0: object, b: torch.Tensor) -> torch.Tensor:
    """Check that ``x0`` matches ``b`` in shape, dtype and device."""
    if not isinstance(x0, torch.Tensor):
        raise ValueError(
            f"x0: expected None or a torch.Tensor of shape {tuple(b.shape)}, got {type(x0).__name__}"
        )
    if x0.shape != b.shape:
        raise ValueError(f"x0: expected shape {tuple(b.shape)} (the shape of b), got {tuple(x0.shape)}")
    if x0.dtype != b.dtype or x0.device != b.device:
        raise ValueError(
            f"x0: expected dtype {b.dtype} on {b.device} (those of b), got {x0.dtype} on {x0.device}"
        )
    return x0


def check_tolerance(value: object, name: str) -> float:
    """Check that a tolerance is a finite real number ``>= 0``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name}: expected a finite real number >= 0, got {value!r}")
    return float(value)


def check_count(value: object, name: str, default: int) -> int:
    """Check an optional integer setting ``>= 1``; ``None`` gives ``default``."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1 or None, got {value!r}")
    return int(value)


def _checked(matvec: Matvec, like: torch.Tensor) -> Matvec:
    """Wrap ``matvec`` so that a wrong output shape, dtype or device fails loudly at the first call."""
    if not callable(matvec):
        raise ValueError(f"matvec: expected a callable mapping (B, n) -> (B, n), got {type(matvec).__name__}")
    shape, dtype, device = like.shape, like.dtype, like.device

    def op(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v)
        if not isinstance(out, torch.Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"matvec: expected an output of shape {tuple(shape)} (row i = A_i @ v_i), got {got}"
            )
        if out.dtype != dtype or out.device != device:
            raise ValueError(
                f"matvec: expected an output of dtype {dtype} on {device} (those of b), "
                f"got {out.dtype} on {out.device}"
            )
        return out

    return op


def setup(
    matvec: Matvec,
    b: object,
    x0: object,
    rtol: object,
    atol: object,
    max_steps: object,
    *,
    min_default_steps: int = 1,
) -> KrylovProblem:
    """Validate the common arguments and build the starting state.

    ``max_steps=None`` becomes ``max(10 * n, min_default_steps)``.

    Raises:
        ValueError: naming the offending argument, with the expected and the received value.
    """
    b = check_rhs(b)
    rtol = check_tolerance(rtol, "rtol")
    atol = check_tolerance(atol, "atol")
    steps = check_count(max_steps, "max_steps", max(10 * b.shape[1], min_default_steps))
    op = _checked(matvec, b)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = check_x0(x0, b).clone()
        r = b - op(x)
    tol = torch.clamp(rtol * bnorm(b), min=atol)
    return KrylovProblem(op=op, b=b, x=x, r=r, tol=tol, max_steps=steps)


def finish(
    method: str,
    problem: KrylovProblem,
    x: torch.Tensor,
    iterations: torch.Tensor,
    breakdown: torch.Tensor,
    residual: torch.Tensor | None = None,
) -> LinearSolution:
    """Recompute the true residual of ``x`` (unless given) and package the result."""
    if residual is None:
        residual = problem.b - problem.op(x)
    return make_solution(method, x, residual, problem.tol, iterations, breakdown)


def bdot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products ``<u_i, v_i>`` of two ``(B, n)`` tensors, shape ``(B,)``."""
    return (u * v).sum(dim=-1)


def bnorm(u: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean norms of a ``(B, n)`` tensor, shape ``(B,)``."""
    return torch.linalg.vector_norm(u, dim=-1)


def safe(den: torch.Tensor) -> torch.Tensor:
    """``den`` with zeros replaced by ones, for divisions whose result is masked out where ``den == 0``."""
    return torch.where(den == 0, torch.ones_like(den), den)
