"""`BoxArgmin`: a minimiser under box bounds, stated as projected-gradient stationarity."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from blackbox_diff import AbstractCondition, Argmin

__all__ = ["BoxArgmin"]


class BoxArgmin(AbstractCondition):
    """z minimises ``f(z, *params)`` subject to ``lb <= z <= ub``.

    Residual (box stationarity): ``z - clip(z - grad_z f(z), lb, ub)``. On a free component it is the
    gradient; on a component held at a bound (gradient pushing outward) it is ``z - bound``, whose
    derivative in the parameters is zero: an active bound's component of dz/dparams is exactly zero,
    as it should be. The Jacobian mixes identity rows and Hessian rows, so it is not symmetric.
    """

    structure = "general"

    def __init__(self, f: Any, lb: np.ndarray, ub: np.ndarray) -> None:
        self.argmin = Argmin(f)
        self.f = f
        self.lb = torch.as_tensor(np.asarray(lb, dtype=np.float64))
        self.ub = torch.as_tensor(np.asarray(ub, dtype=np.float64))

    def residual(self, z: torch.Tensor, *params: Any) -> torch.Tensor:
        grad = self.argmin.residual(z, *params)
        lb = self.lb.to(dtype=z.dtype, device=z.device).reshape(z.shape)
        ub = self.ub.to(dtype=z.dtype, device=z.device).reshape(z.shape)
        return z - torch.clamp(z - grad, lb, ub)

    def describe(self) -> str:
        return "BoxArgmin"
