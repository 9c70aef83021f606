"""Batch layout (the torch.func.vmap `in_dims` convention) and the fan-out of black-box calls."""

from __future__ import annotations

import concurrent.futures
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from blackbox_diff._errors import InputError

__all__ = ["as_parameters", "batch_layout", "instance_args", "run_instances"]


def as_parameters(params: Sequence[Any]) -> list[torch.Tensor]:
    """Validate the call's parameters: floating tensors (numbers and arrays are converted), one device,
    finite values.

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
            p = torch.as_tensor(np.asarray(p, dtype=np.float64))
        if p.is_complex() or not p.is_floating_point():
            raise InputError(
                f"Parameter {i} has dtype {p.dtype}; expected a real floating dtype (float32 or float64). "
                f"Convert it with .double() (or .float())."
            )
        if not bool(torch.isfinite(p).all()):
            bad = (~torch.isfinite(p)).nonzero()[:5].tolist()
            raise InputError(
                f"Parameter {i} contains NaN or Inf (first entries at indices {bad}); expected finite values. "
                "Check the upstream computation that produced it."
            )
        out.append(p)
    devices = {p.device for p in out}
    if len(devices) > 1:
        raise InputError(
            f"Parameters live on different devices {sorted(map(str, devices))}; expected one device. "
            "Move them with .to(device) first."
        )
    return out


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
    return moved, batched, next(iter(sizes.values()))


def instance_args(
    params: list[torch.Tensor], batched: list[bool], index: int | None, arrays: str
) -> tuple[Any, ...]:
    """The black box's arguments for one instance: detached float64 numpy arrays, or torch tensors."""
    out = []
    for p, b in zip(params, batched, strict=True):
        q = p[index] if (b and index is not None) else p
        q = q.detach()
        out.append(q.to("cpu", torch.float64).numpy() if arrays == "numpy" else q)
    return tuple(out)


def _call(solve: Callable, args: tuple) -> Any:
    return solve(*args)


def _executor(spec: Any, max_workers: int | None) -> tuple[Any, bool]:
    if spec == "threads":
        return concurrent.futures.ThreadPoolExecutor(max_workers=max_workers), True
    if spec == "processes":
        return concurrent.futures.ProcessPoolExecutor(max_workers=max_workers), True
    return spec, False


def run_instances(
    solve: Callable, args: list[tuple], executor: Any, max_workers: int | None
) -> list[tuple[bool, Any]]:
    """Call `solve(*a)` for every a in `args`, serially or through an executor, keeping order.

    Returns:
        one (ok, value) per instance: the solution, or the exception it raised.
    """
    if executor is None or len(args) <= 1 and executor in ("threads", "processes"):
        results = []
        for a in args:
            try:
                results.append((True, solve(*a)))
            except Exception as err:  # noqa: BLE001 - every failure becomes a per-instance result
                results.append((False, err))
        return results
    if executor == "processes":
        try:
            pickle.dumps(solve)
        except Exception as err:
            raise InputError(
                f"executor='processes' needs a picklable black box, but {solve!r} cannot be pickled ({err}). "
                "Define the solver as a module-level function, or use executor='threads'."
            ) from err
    pool, owned = _executor(executor, max_workers)
    try:
        futures = [pool.submit(_call, solve, a) for a in args]
        results = []
        for fut in futures:
            try:
                results.append((True, fut.result()))
            except Exception as err:  # noqa: BLE001
                results.append((False, err))
        return results
    finally:
        if owned:
            pool.shutdown(wait=True)
