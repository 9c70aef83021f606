"""The answer of a KKT black box: a primal point and, where the solver exposes them, its multipliers."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["KKTSolution"]


@dataclasses.dataclass
class KKTSolution:
    """A primal-dual point of ``min f(x) s.t. h(x) = 0, g(x) <= 0``.

    Lagrangian convention: L = f + eq^T h + ineq^T g, with ineq >= 0.

    Attributes:
        x: the primal solution.
        eq: multipliers of the equality constraints (None: recover them).
        ineq: multipliers of the inequality constraints (None: recover them).
    """

    x: Any
    eq: Any = None
    ineq: Any = None
