"""Degenerate points: where the answer's optimality condition can be stated in more than one way.

At a vertex with more active constraints than unknowns (LICQ fails), at a kink written as two constraints,
or at a weakly active constraint (slack and multiplier both zero), the solution map has one-sided
derivatives, one per admissible active set. A condition reports such a point with a `Degeneracy`: the
variants (unknowns and aux tensors for each admissible active set, each a regular system) and what they
concern. The engine then computes the derivative of the outputs under every variant, which no linear
solver choice can affect:

* where the variants agree, the derivative exists and is returned exactly (the LP vertex's d x1/dp);
* where they differ, it does not exist: the engine warns (or raises, per the `degenerate` option) naming
  the constraints and the outputs concerned, and differentiates the first variant (a one-sided derivative).

A main statement that is itself singular (dependent active rows) is replaced by the first variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from blackbox_diff.engine._system import Linearization, System

__all__ = ["Degeneracy", "output_jacobian", "compare_variants"]


@dataclasses.dataclass
class Degeneracy:
    """A degenerate instance, as its condition sees it.

    Attributes:
        variants: (z, aux) per admissible one-sided statement of the condition, each regular.
        constraints: the constraint indices concerned (in the condition's own numbering).
        kind: what happens there, for the message (e.g. "active constraints [0, 1, 2] are linearly dependent").
        outputs: the number of leading unknowns that are the outputs (x of a KKT point; the multipliers of a
            degenerate point are not unique and are not compared).
        main_regular: whether the answer's own statement is a regular system; if not, variant 0 replaces it.
        labels: a short name per variant (e.g. "active set {0, 1}"), for the message.
    """

    variants: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
    constraints: list[int]
    kind: str
    outputs: int
    main_regular: bool = True
    labels: list[str] = dataclasses.field(default_factory=list)


def output_jacobian(system: System, Z: torch.Tensor, params: Sequence[torch.Tensor], outputs: int
                    ) -> torch.Tensor | None:
    """d z[:outputs] / d params (outputs, total parameter size) of ONE instance, dense; None if dF/dz is
    singular to working precision (its smallest singular value below n eps times its largest)."""
    lin = Linearization(system, Z.detach(), [p.detach() for p in params])
    n = Z.shape[1]
    J = lin.dense(transpose=False)[0]  # (n, n)
    s = torch.linalg.svdvals(J)
    if not bool(torch.isfinite(s).all()) or float(s[-1]) <= n * torch.finfo(J.dtype).eps * float(s[0]):
        return None
    rows = []
    for i in range(n):
        e = torch.zeros_like(Z)
        e[0, i] = 1.0
        grads = lin.vjp_params_graph(e)
        rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                               for g, p in zip(grads, params, strict=True)] or [Z.new_zeros(0)]))
    K = torch.stack(rows)  # (n, P): row i is dF_i/dp
    return -torch.linalg.solve(J, K)[:outputs]


def compare_variants(jacobians: list[torch.Tensor]) -> list[int]:
    """The outputs whose derivative differs between variants (relative to the largest entry)."""
    ref = jacobians[0]
    size = max(float(j.abs().max()) if j.numel() else 0.0 for j in jacobians)
    tol = 1e-6 * max(size, torch.finfo(ref.dtype).tiny)
    differ = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    for j in jacobians[1:]:
        differ |= ((j - ref).abs() > tol).any(dim=1)
    return torch.nonzero(differ).flatten().tolist()
