"""What the checks share: the layer under test, reference answers and gradients, and comparisons."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from blackbox_diff.api import Layer, layer
from blackbox_diff.conditions import KKTSolution
from blackbox_diff.plugin import AbstractBackend

__all__ = ["Context", "Failed", "Reference", "Skipped", "compare", "difference", "flatten", "grads", "project"]


class Failed(Exception):  # noqa: N818 - control flow of the kit, not an error users see
    """A check found a violation; the message says what is wrong and what to do."""


class Skipped(Exception):  # noqa: N818
    """A check cannot run on this sample (the reason is reported)."""


def flatten(out: Any) -> list[torch.Tensor]:
    """The tensors of a layer's result: a tensor, a tuple of them, a `KKTSolution` (None fields dropped)."""
    if out is None:
        return []
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, KKTSolution):
        return [t for t in (out.x, out.eq, out.ineq) if t is not None]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    raise Failed(f"the layer returned a {type(out).__name__}; expected a tensor or a tuple of tensors.")


@dataclasses.dataclass
class Reference:
    """One instance solved alone by a fresh layer: its outputs, and the gradients of <weights, outputs>."""

    outputs: list[torch.Tensor]
    grads: list[torch.Tensor]


class Context:
    """The backend and one sample, with the references every check compares with (computed once)."""

    def __init__(self, backend: AbstractBackend, sample: Any, instances: list[tuple[torch.Tensor, ...]]) -> None:
        self.backend, self.sample, self.instances = backend, sample, instances
        self.layer_: Layer | None = None
        self.references: list[Reference] | None = None
        self._weights: list[torch.Tensor] | None = None

    # --- layers -------------------------------------------------------------------------------------------
    def layer(self, **extra: Any) -> Layer:
        """A new layer of the sample, with `extra` options over the sample's."""
        s = self.sample
        return layer(s.problem, parameters=s.parameters, variables=s.variables, backend=self.backend,
                     **{**s.options, **extra})

    @property
    def batched_dims(self) -> dict[str, Any]:
        """Options that make a call with stacked instances a batch: none under the cvxpylayers convention
        (declared parameter shapes), in_dims=0 when the backend declares none."""
        shapes = self.layer_.compiled.parameter_shapes if self.layer_ is not None else None
        return {} if shapes is not None else {"in_dims": 0}

    # --- references ---------------------------------------------------------------------------------------
    def weights(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Fixed random weights, one tensor per output (shape of one instance's output)."""
        if self._weights is None:
            gen = torch.Generator().manual_seed(1234)
            self._weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
        return self._weights

    def solve(self, fn: Any, params: Sequence[torch.Tensor]) -> Reference:
        """`fn(*params)` and the gradients of <weights, outputs> with respect to every parameter."""
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        outputs = flatten(fn(*leaves))
        weights = self.weights([o.detach() for o in outputs])
        return Reference([o.detach() for o in outputs], grads(project(outputs, weights), leaves))

    def reference(self) -> list[Reference]:
        if self.references is None:
            raise Skipped("the forward check failed, so there is nothing to compare with")
        return self.references


def project(outputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_j <w_j, output_j>, the weights broadcast over a leading batch dimension; NaN rows excluded."""
    total = torch.zeros((), dtype=torch.float64)
    for o, w in zip(outputs, weights, strict=True):
        term = o * w.to(dtype=o.dtype, device=o.device)
        total = total + torch.where(torch.isnan(o), torch.zeros_like(term), term).sum().to("cpu", torch.float64)
    return total


def grads(loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in leaves]
    grads = torch.autograd.grad(loss, list(leaves), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, leaves, strict=True)]


def difference(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, the scale it is judged at: max |want|, or 1e-300 for a zero output)."""
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        return float("inf"), 1.0
    if not got.numel():
        return 0.0, 1.0
    diff = (got - want).abs()
    both_nan = torch.isnan(got) & torch.isnan(want)
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()), max(float(want.abs().max()), 1e-300)


def compare(what: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], rtol: float) -> None:
    """Raise `Failed` naming `what` and the first output that differs by more than rtol x its size."""
    if len(got) != len(want):
        raise Failed(f"{what}: {len(got)} output tensor(s), expected {len(want)}.")
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        if tuple(g.shape) != tuple(w.shape):
            raise Failed(f"{what}: output {j} has shape {tuple(g.shape)}, expected {tuple(w.shape)}.")
        err, scale = difference(g, w)
        if err > rtol * scale:
            raise Failed(
                f"{what}: output {j} differs by {err:.3g} (relative {err / scale:.3g} > {rtol:g}); got "
                f"{_short(g)}, expected {_short(w)}."
            )


def _short(t: torch.Tensor) -> str:
    flat = t.detach().to("cpu", torch.float64).reshape(-1)
    values = ", ".join(f"{float(v):.6g}" for v in flat[:4])
    return f"[{values}{', ...' if flat.numel() > 4 else ''}]"
