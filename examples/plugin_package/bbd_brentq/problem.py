"""The problem type this plugin adds."""

from __future__ import annotations

from collections.abc import Callable

import torch


class BracketedRoot:
    """A scalar equation ``F(x, *params) = 0`` with ``F(lo)`` and ``F(hi)`` of opposite signs.

    Args:
        F: the residual, written in torch (it is also the optimality condition blackbox_diff differentiates).
        lo, hi: the bracket searched by brentq.
    """

    def __init__(self, F: Callable[..., torch.Tensor], lo: float, hi: float) -> None:
        if not lo < hi:
            raise ValueError(f"BracketedRoot needs lo < hi; got lo={lo}, hi={hi}.")
        self.F, self.lo, self.hi = F, float(lo), float(hi)
