"""`bbd.check_gradients`: audit an implicit gradient against central finite differences of the black box."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from blackbox_diff._errors import InputError

__all__ = ["GradientReport", "check_gradients", "saved_tensor_bytes"]


@dataclasses.dataclass
class GradientReport:
    """Implicit vs finite-difference gradients of the projected output <w, fn(params)>.

    Attributes:
        implicit: one gradient tensor per parameter, from autograd through the implicit layer.
        finite_difference: the same gradients by central differences of the black box itself.
        abs_error / rel_error: per parameter, max |implicit - fd| and that over max(1, max|fd|) (a
            relative error for gradients of magnitude >= 1, absolute below, where FD noise dominates).
        step: the finite-difference step.
        rtol: the tolerance `ok` compares rel_error with.
    """

    implicit: list[torch.Tensor]
    finite_difference: list[torch.Tensor]
    abs_error: list[float]
    rel_error: list[float]
    step: float
    rtol: float

    @property
    def ok(self) -> bool:
        return all(e <= self.rtol for e in self.rel_error)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error, default=0.0)

    def __str__(self) -> str:
        lines = [f"{'param':>5} {'max|implicit|':>14} {'abs error':>11} {'rel error':>11}  ok"]
        for i, (g, a, r) in enumerate(zip(self.implicit, self.abs_error, self.rel_error, strict=True)):
            mag = float(g.abs().max()) if g.numel() else 0.0
            lines.append(f"{i:>5} {mag:>14.6g} {a:>11.3g} {r:>11.3g}  {'yes' if r <= self.rtol else 'NO'}")
        lines.append(f"finite-difference step {self.step:g}; tolerance {self.rtol:g}: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def _flat_output(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out.reshape(-1)
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat_output(o) for o in out if o is not None])
    raise InputError(f"check_gradients expects fn to return tensors; it returned {type(out).__name__}.")


def check_gradients(
    fn: Callable[..., Any], *params: torch.Tensor, step: float = 1e-6, rtol: float = 1e-5, seed: int = 0
) -> GradientReport:
    """Compare the gradient of a random projection of ``fn(*params)`` with central finite differences.

    The finite differences call `fn` itself, so they differentiate the black box (its own accuracy
    included), not the optimality condition: a mismatch means the condition does not describe the solver,
    the solver is not accurate enough for the step, or the solution map is not differentiable there.

    Args:
        fn: a callable on tensors, e.g. a `bbd.implicit` function or a `bbd.layer`.
        *params: float64 tensors (the point of the check). They are not modified.
        step: central-difference step (relative to 1 + |param entry|).
        rtol: tolerance on the relative error for `GradientReport.ok`.
        seed: seed of the random projection vector.

    Returns:
        A `GradientReport`; print it for a table.

    Raises:
        InputError: a parameter is not a floating tensor.
    """
    for i, p in enumerate(params):
        if not torch.is_tensor(p) or not p.is_floating_point():
            raise InputError(f"check_gradients: parameter {i} must be a floating tensor; got {type(p).__name__}.")
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    out = _flat_output(fn(*leaves))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((w * out).sum(), leaves, allow_unused=True)
    implicit = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, leaves, strict=True)]

    def projected(values: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return float((w * _flat_output(fn(*values))).sum())

    fds, abs_err, rel_err = [], [], []
    base = [p.detach().clone() for p in params]
    for i, p in enumerate(base):
        fd = torch.zeros_like(p).reshape(-1)
        flat = p.reshape(-1)
        for j in range(flat.numel()):
            h = step * (1.0 + abs(float(flat[j])))
            plus, minus = [b.clone() for b in base], [b.clone() for b in base]
            plus[i].reshape(-1)[j] += h
            minus[i].reshape(-1)[j] -= h
            fd[j] = (projected(plus) - projected(minus)) / (2 * h)
        fd = fd.reshape(p.shape)
        fds.append(fd)
        diff = float((implicit[i] - fd).abs().max()) if fd.numel() else 0.0
        abs_err.append(diff)
        rel_err.append(diff / max(1.0, float(fd.abs().max()) if fd.numel() else 0.0))
    return GradientReport(implicit, fds, abs_err, rel_err, step, rtol)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for the backward while `fn()` runs, beyond the
    caller's own leaf tensors.

    The memory an implicit layer keeps for its backward should not grow with the solver's iteration
    count; this measures it (e.g. ``saved_tensor_bytes(lambda: layer(x))`` with few and many iterations).
    Leaf tensors that require grad (module parameters, inputs the caller created) and views of them live
    whether or not a backward is pending, so references to them are not counted; a tensor saved by several
    operations is counted once (one allocation).
    """
    total = 0
    seen: set[tuple[int, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t if t._base is None else t._base  # a view of a parameter (W.T) is that parameter
        if base.is_leaf and base.requires_grad:
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
