"""The result type shared by every linear solver in `blackbox_diff.linalg`."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["LinearSolution", "make_solution"]

_MAX_LISTED = 8


@dataclasses.dataclass(frozen=True)
class LinearSolution:
    """Outcome of the batched linear solve ``A_i x_i = b_i`` for ``i = 0 .. B-1``.

    Every solver returns one, whatever happened: a failing instance is reported through
    ``converged`` / ``breakdown`` rather than by raising, so that one bad instance never hides
    the others. Deciding what to do about a failure (escalate, regularise, raise) is the caller's job.

    Attributes:
        x: ``(B, n)`` solution. For an instance that did not converge this is the solver's last
            (or, for ``neumann``, best) iterate; a direct solve that failed leaves zeros there. Never
            silently non-finite: a non-finite ``x`` row is always flagged with ``breakdown``.
        converged: ``(B,)`` bool, ``||b_i - A_i x_i||_2 <= max(rtol * ||b_i||_2, atol)``, evaluated on
            ``residual_norm`` (the true residual of the returned ``x``).
        iterations: ``(B,)`` int64 count of work per instance; the solver's docstring says what one
            unit is (operator applications for ``cg``/``minres``/``gmres``/``neumann``, iterations of
            two applications for ``bicgstab``, 0 for the direct solvers).
        residual_norm: ``(B,)`` *true* residual norm ``||b_i - A_i x_i||_2`` recomputed once from the
            returned ``x`` (not the recurrence estimate, which can drift).
        breakdown: ``(B,)`` bool, the method met a breakdown for this instance (non-positive curvature
            in CG, a vanishing inner product in BiCGSTAB, a singular pivot, a diverging Neumann series,
            or a non-finite value) and stopped it early.
        method: name of the solver that produced this result, e.g. ``"cg"``.
    """

    x: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    residual_norm: torch.Tensor
    breakdown: torch.Tensor
    method: str

    @property
    def all_converged(self) -> bool:
        """Whether every instance of the batch converged (one host synchronisation)."""
        return bool(self.converged.all())

    @property
    def batch_size(self) -> int:
        """Number of instances ``B``."""
        return int(self.x.shape[0])

    def summary(self) -> str:
        """One line for logs and error messages, e.g. ``"cg: 4/5 converged, ..., failed: [3]"``."""
        B = self.batch_size
        n_conv = int(self.converged.sum())
        parts = [f"{self.method}: {n_conv}/{B} converged"]
        if B:
            its = self.iterations
            parts.append(f"iterations {int(its.min())}..{int(its.max())}")
            parts.append(f"max residual {float(self.residual_norm.detach().max()):.3e}")
        failed = torch.nonzero(~self.converged).flatten().tolist()
        broken = torch.nonzero(self.breakdown).flatten().tolist()
        if failed:
            parts.append(f"not converged: {_short_list(failed)}")
        if broken:
            parts.append(f"breakdown: {_short_list(broken)}")
        return ", ".join(parts)


def _short_list(indices: list[int]) -> str:
    if len(indices) <= _MAX_LISTED:
        return str(indices)
    head = ", ".join(str(i) for i in indices[:_MAX_LISTED])
    return f"[{head}, ... ({len(indices)} in all)]"


def make_solution(
    method: str,
    x: torch.Tensor,
    residual: torch.Tensor,
    tol: torch.Tensor,
    iterations: torch.Tensor,
    breakdown: torch.Tensor,
) -> LinearSolution:
    """Build a `LinearSolution` from the true residual ``residual = b - A x`` of the returned ``x``.

    ``converged`` is ``||residual_i|| <= tol_i`` for finite rows; a non-finite ``x`` or residual row is
    never converged and is flagged as a breakdown.
    """
    residual_norm = torch.linalg.vector_norm(residual, dim=-1)
    finite = torch.isfinite(x).all(dim=-1) & torch.isfinite(residual_norm)
    converged = finite & (residual_norm <= tol)
    return LinearSolution(
        x=x,
        converged=converged,
        iterations=iterations.to(torch.int64),
        residual_norm=residual_norm,
        breakdown=breakdown | ~finite,
        method=method,
    )
