"""bbd-brentq: scalar equations F(x, *params) = 0 on a bracket, as differentiable blackbox_diff layers."""

from bbd_brentq.problem import BracketedRoot

__all__ = ["BracketedRoot"]
