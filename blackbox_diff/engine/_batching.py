"""Batch layout (the torch.func.vmap `in_dims` convention): the call's parameters, checked and split into
instances, and the black box's answers taken back as tensors of their own. (The fan-out of the calls
themselves is `blackbox_diff.runtime`'s.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from blackbox_diff._errors import InputError

__all__ = ["answer_dtype_device", "as_parameters", "batch_layout", "check_finite", "instance_args", "owned_tensor"]


def answer_dtype_device(params: Sequence[Any]) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the tensors made from a black box's answer, given the call's parameters.

    Those of the first floating-point tensor among `params`; where there is none, float64 on the device
    of the first tensor, or on the CPU. (A condition's ``prepare`` receives the parameters of one
    instance; its unknowns must match them, in float32 as in float64, on CUDA as on the CPU.)
    """
    tensors = [p for p in params if torch.is_tensor(p)]
    like = next((p for p in tensors if p.is_floating_point()), None)
    if like is not None:
        return like.dtype, like.device
    return torch.float64, tensors[0].device if tensors else torch.device("cpu")


def float64_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a float64 numpy array on the CPU, for a condition's numpy `certify`: the tensor's
    own memory when it already is one (no copy, no autograd), else a converted copy."""
    try:
        a = t.numpy()  # raises for a tensor on a GPU or one that requires grad
    except (TypeError, RuntimeError):
        return t.detach().to("cpu", torch.float64).numpy()
    return a if a.dtype == np.float64 else a.astype(np.float64)


def owned_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A black-box answer (tensor, array, number) as a tensor of its own: always a copy.

    A black box may hand back its own workspace and overwrite it on the next call, or a read-only buffer
    (Ray's object store, a memory map) that torch must not share.

    Raises:
        TypeError, ValueError: the value is not numeric (callers turn it into their `SolverError`).
    """
    if torch.is_tensor(value):
        return value.detach().to(dtype=dtype, device=device, copy=True)
    return torch.from_numpy(np.array(value, dtype=np.float64)).to(dtype=dtype, device=device)

def as_parameters(params: Sequence[Any]) -> list[torch.Tensor]:
    """Validate the call's parameters: floating tensors (numbers and arrays are converted), one device.
    (Their values are checked by `check_finite` inside the engine's forward.)

    Raises:
        InputError: naming the parameter position, what it is and what was expected.
    """
    out: list[torch.Tensor] = []
    for i, p in enumerate(params):
        if isinstance(p, bool) or not (torch.is_tensor(p) or isinstance(p, (int, float, np.ndarray, np.number))):
            raise InputError(
                f"Parameter {i} is a {type(p).__name__}; expected a torch.Tensor, a float or a numpy array. "
                "Pass non-numeric settings through a closure instead of as a parameter."
            )
        if not torch.is_tensor(p):
            kind = np.asarray(p).dtype.kind if isinstance(p, (np.ndarray, np.number)) else "f"
            if kind not in "iufc":
                raise InputError(
                    f"Parameter {i} is a numpy array of dtype {np.asarray(p).dtype} (kind {kind!r}); expected numbers "
                    "(a real floating dtype). Convert text or booleans explicitly, e.g. np.asarray(p, dtype=float)."
                )
            if np.iscomplexobj(p):
                raise InputError(
                    f"Parameter {i} is complex ({np.asarray(p).dtype}); expected a real floating dtype (float32 or "
                    "float64). Split it into real and imaginary parts, or pass .real."
                )
            try:
                p = torch.as_tensor(np.asarray(p, dtype=np.float64))
            except (TypeError, ValueError, OverflowError) as err:
                raise InputError(
                    f"Parameter {i} ({type(p).__name__}"
                    f"{' of dtype ' + str(p.dtype) if isinstance(p, np.ndarray) else ''}) cannot be converted to "
                    f"float64 ({err}); expected a real floating dtype (float32 or float64) holding numbers."
                ) from err
        if p.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"Parameter {i} has dtype {p.dtype}; expected a real floating dtype (float32 or float64). "
                f"Convert it with .double() (or .float())"
                + ("; half precision is too coarse for certification and adjoint solves." if p.is_floating_point()
                   else ".")
            )
        if p.device.type == "meta":
            raise InputError(
                f"Parameter {i} is on the meta device, which holds no data; expected parameters holding data "
                "(cpu or cuda). Materialise it (e.g. torch.empty_like(p, device='cpu')) before the call."
            )
        out.append(p)
    devices = {p.device for p in out}
    if len(devices) > 1:
        raise InputError(
            f"Parameters live on different devices {sorted(map(str, devices))}; expected one device. "
            "Move them with .to(device) first."
        )
    return out


def check_finite(params: Sequence[torch.Tensor]) -> None:
    """Raise `InputError` naming the first parameter that holds NaN or Inf (checked on plain tensors,
    inside the engine's forward, where torch.func transforms have handed over real values)."""
    for i, p in enumerate(params):
        if not bool(torch.isfinite(p).all()):
            bad = (~torch.isfinite(p)).nonzero()[:5].tolist()
            raise InputError(
                f"Parameter {i} contains NaN or Inf (first entries at indices {bad}); expected finite values. "
                "Check the upstream computation that produced it."
            )


def batch_layout(params: list[torch.Tensor], in_dims: Any) -> tuple[list[torch.Tensor], list[bool], int | None]:
    """Move each batched parameter's batch dimension to the front.

    Returns:
        (params, batched, B): params with batch dims at 0, which of them are batched, the batch size
        (None when nothing is batched: an unbatched call).
    """
    if in_dims is None:
        return params, [False] * len(params), None
    dims = (in_dims,) * len(params) if isinstance(in_dims, int) else tuple(in_dims)
    if len(dims) != len(params):
        raise InputError(
            f"in_dims has {len(dims)} entries but the call has {len(params)} parameters; expected one "
            "int or None per parameter (or a single int for all)."
        )
    moved, batched, sizes = [], [], {}
    for i, (p, d) in enumerate(zip(params, dims, strict=True)):
        if d is None:
            moved.append(p)
            batched.append(False)
            continue
        if not -p.dim() <= d < max(p.dim(), 1) or p.dim() == 0:
            raise InputError(
                f"in_dims[{i}] = {d} but parameter {i} has shape {tuple(p.shape)}; expected a dimension "
                f"index in [-{p.dim()}, {p.dim() - 1}] (or None for an unbatched parameter)."
            )
        moved.append(p.movedim(d, 0))
        batched.append(True)
        sizes[i] = p.shape[d]
    if not sizes:
        return moved, batched, None
    if len(set(sizes.values())) > 1:
        raise InputError(
            f"Batched parameters disagree on the batch size: {sizes} (parameter: size). Expected the same "
            "size along every in_dims dimension."
        )
    size = next(iter(sizes.values()))
    if size == 0:
        raise InputError(
            f"in_dims selects a batch of size 0 (parameter sizes {sizes}); expected at least one instance. "
            "Skip the call for an empty batch, or pass in_dims=None for an unbatched call."
        )
    return moved, batched, size


def instance_args(
    params: list[torch.Tensor], batched: list[bool], index: int | None, arrays: str
) -> tuple[Any, ...]:
    """The black box's arguments for one instance: float64 numpy arrays, or torch tensors, always copies.

    A legacy solver may write into its inputs (clip them in place); it must never reach the caller's
    tensors or the values the backward differentiates at.
    """
    out = []
    for p, b in zip(params, batched, strict=True):
        q = p[index] if (b and index is not None) else p
        q = q.detach()
        out.append(np.array(q.to("cpu", torch.float64).numpy(), copy=True) if arrays == "numpy" else q.clone())
    return tuple(out)
