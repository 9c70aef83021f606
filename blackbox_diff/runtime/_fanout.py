"""The fan-out of black-box calls: one instance after another, or in chunks through an executor.

A failure stays with its instance (it comes back as ``(False, error)``); a worker process that dies takes
only the instances it held, which are re-run in fresh pools.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import math
import os
import pickle
from collections.abc import Callable
from typing import Any

from blackbox_diff._errors import InputError

__all__ = ["WorkerDied", "chunk_size_for", "run_instances"]


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
