"""Batch layout (the torch.func.vmap `in_dims` convention) and the fan-out of black-box calls."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import math
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from blackbox_diff._errors import InputError

__all__ = ["as_parameters", "batch_layout", "check_finite", "instance_args", "run_instances"]



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


def _call_chunk(solve: Callable, chunk: list[tuple]) -> list[tuple[bool, Any]]:
    """Run a chunk of instances inside one task; a failure stays with its instance."""
    out: list[tuple[bool, Any]] = []
    for a in chunk:
        try:
            out.append((True, solve(*a)))
        except Exception as err:  # noqa: BLE001 - every failure becomes a per-instance result
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - it could not travel back from a worker process as it is
                import multiprocessing

                text = f"{type(err).__name__}: {err}"
                if multiprocessing.parent_process() is not None:  # a pool worker: the result goes back pickled
                    err = RuntimeError(text)
                else:  # the calling process: it keeps its type; pickled after all (a remote executor that is
                    # not a multiprocessing child), it becomes the RuntimeError (pickle looks __reduce_ex__ up
                    # on the instance, unless a copyreg reducer registered for its class comes first)
                    err.__reduce_ex__ = lambda _protocol, portable=(RuntimeError, (text,)): portable
            out.append((False, err))
    return out


class WorkerDied(RuntimeError):
    """The worker process running a black-box call died (os._exit, a signal, the OOM killer)."""


def _executor(spec: Any, max_workers: int | None) -> tuple[Any, bool]:
    if spec == "threads":
        return concurrent.futures.ThreadPoolExecutor(max_workers=max_workers), True
    if spec == "processes":
        return concurrent.futures.ProcessPoolExecutor(max_workers=max_workers), True
    return spec, False


def _workers(pool: Any, max_workers: int | None) -> int:
    if max_workers:
        return max_workers
    known = getattr(pool, "_max_workers", None)  # concurrent.futures pools
    return int(known) if isinstance(known, int) and known > 0 else (os.cpu_count() or 1)


def chunk_size_for(n: int, workers: int, spec: Any) -> int:
    """Instances per submitted task: one for threads (no per-task overhead worth amortising), else about
    four tasks per worker, which amortises pickling and scheduling and still balances uneven solves."""
    if spec == "threads" or isinstance(spec, concurrent.futures.ThreadPoolExecutor):
        return 1
    return max(1, math.ceil(n / (4 * workers)))


def _submit_all(pool: Any, solve: Callable, args: list[tuple], indices: list[int], k: int) -> dict[int, Any]:
    """Submit the instances `indices` in chunks of k; return {instance: (ok, value)} with lost chunks
    marked by the exception that lost them (None ok flag)."""
    chunks = [indices[i : i + k] for i in range(0, len(indices), k)]
    futures = [pool.submit(_call_chunk, solve, [args[j] for j in ch]) for ch in chunks]
    results: dict[int, Any] = {}
    for fut, ch in zip(futures, chunks, strict=True):
        try:
            for j, r in zip(ch, fut.result(), strict=True):
                results[j] = r
        except Exception as err:  # noqa: BLE001 - the task itself was lost (dead worker, cancelled, ...)
            for j in ch:
                results[j] = (None, err)
    return results


def _lost_to_dead_worker(err: BaseException) -> bool:
    return isinstance(err, concurrent.futures.process.BrokenProcessPool)


def run_instances(
    solve: Callable, args: list[tuple], executor: Any, max_workers: int | None, chunk_size: int | None = None
) -> list[tuple[bool, Any]]:
    """Call `solve(*a)` for every a in `args`, serially or through an executor, keeping order.

    Instances go to the executor in chunks (`chunk_size_for`). A chunk whose task is lost as a whole (its
    worker died, Dask's KilledWorker, ...) is re-run one instance per task, so that only the instance that
    takes a worker down fails. A dead worker breaks a whole process pool: the instances lost with it are
    re-run in a fresh pool, and, if that breaks too, each in a pool of its own.

    Returns:
        one (ok, value) per instance: the solution, or the exception it raised.
    """
    if executor is None or len(args) <= 1 and executor in ("threads", "processes"):
        return _call_chunk(solve, args)
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
        k = chunk_size or chunk_size_for(len(args), _workers(pool, max_workers), executor)
        results = _submit_all(pool, solve, args, list(range(len(args))), k)
        lost = [j for j, (ok, _) in results.items() if ok is None]
        if lost and any(_lost_to_dead_worker(results[j][1]) for j in lost):
            results.update(_recover_process_pool(solve, args, sorted(lost), max_workers))
        elif lost and k > 1:
            try:
                results.update(_submit_all(pool, solve, args, sorted(lost), 1))
            except RuntimeError:  # the executor refuses new work (shut down): keep the first errors
                pass
        out = []
        for j in range(len(args)):
            ok, value = results[j]
            out.append((bool(ok), value))
        return out
    finally:
        if owned:
            pool.shutdown(wait=True)


def _recover_process_pool(solve: Callable, args: list[tuple], lost: list[int], max_workers: int | None) -> dict:
    """Re-run instances lost with a dead process-pool worker: first together in one fresh pool, then the
    ones lost again each in a pool of its own, so that a healthy instance is never charged for a killer."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=max_workers) as pool:
        again = _submit_all(pool, solve, args, lost, 1)
    for j, (ok, _) in list(again.items()):
        if ok is not None:
            continue
        with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
            alone = _submit_all(pool, solve, args, [j], 1)[j]
        if alone[0] is None:
            alone = (False, WorkerDied(
                f"The worker process running the black box died (raised {type(alone[1]).__name__}: {alone[1]}), "
                "even when it ran this instance alone: the solver exits or crashes on these inputs."
            ))
        again[j] = alone
    return again
