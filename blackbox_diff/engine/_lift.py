"""Trainable weights of an nn.Module field, lifted into explicit parameters of the IFT core.

A condition such as ``z - f(z, x)`` with f an `nn.Module` reaches f's weights by closure. The engine
gives closure captures exact first derivatives (`_ClosureLink`), but forward mode over them, second
derivatives in them and torch.func transforms (e.g. `functional_call` + `grad` in meta-learning) need
them as explicit inputs of the autograd core. `lift(fn)` finds the module behind `fn` (the module itself
or the owner of a bound method), and returns its trainable parameters with a way to call `fn` with
other tensors in their place (`torch.func.functional_call`, public API only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Lifted", "lift"]


class _Method(torch.nn.Module):
    """A bound method of a module as a module of its own, so that functional_call can reparametrise it."""

    def __init__(self, owner: torch.nn.Module, func: Callable) -> None:
        super().__init__()
        self.owner = owner
        self._func = func

    def forward(self, *args: Any) -> Any:  # noqa: D102
        return self._func(self.owner, *args)


class Lifted:
    """A callable whose module weights can be substituted.

    Attributes:
        names: the dotted names of the lifted weights (trainable parameters of the module).
        tensors: the module's current tensors for those names (what a call passes to the engine).
    """

    def __init__(self, fn: Callable, module: torch.nn.Module, prefix: str, holder: torch.nn.Module) -> None:
        self.fn, self._holder, self._prefix = fn, holder, prefix
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.tensors = [p for _, p in named]

    def __call__(self, weights: list[torch.Tensor], *args: Any) -> Any:
        """fn(*args) with the lifted weights replaced by `weights` (the module's own ones: a plain call)."""
        if all(w is p for w, p in zip(weights, self.tensors, strict=True)):
            return self.fn(*args)
        mapping = {self._prefix + n: w for n, w in zip(self.names, weights, strict=True)}
        return torch.func.functional_call(self._holder, mapping, args)


def lift(fn: Callable) -> Lifted | None:
    """`Lifted` for a module or a module's bound method with trainable parameters; None otherwise."""
    if isinstance(fn, torch.nn.Module):
        lifted = Lifted(fn, fn, "", fn)
    else:
        owner = getattr(fn, "__self__", None)
        func = getattr(fn, "__func__", None)
        if not isinstance(owner, torch.nn.Module) or func is None:
            return None
        lifted = Lifted(fn, owner, "owner.", _Method(owner, func))
    return lifted if lifted.names else None
