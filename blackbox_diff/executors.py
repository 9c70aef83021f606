"""Executors for the `executor=` option beyond threads, processes and Dask.

Dask needs no adapter (`distributed.Client.get_executor(pure=False)` is a `concurrent.futures.Executor`);
Ray has none of its own, so `RayExecutor` supplies one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

__all__ = ["RayExecutor"]


def _call(fn: Callable, args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


class RayExecutor(concurrent.futures.Executor):
    """Run each submitted call as a Ray task; its `ObjectRef` comes back as a `concurrent.futures.Future`.

    Call `ray.init(...)` first (a local instance, or `address="auto"` on a cluster). The engine sends
    instances in chunks, about four tasks per worker, and keeps the batch order. An exception raised by
    the solver comes back as `ray.exceptions.RayTaskError` and becomes that instance's `SolverError` (or
    NaN under `on_failure="nan"`); a worker that dies is retried by Ray (`max_retries`) and then reported
    as `WorkerCrashedError` for that instance only. Answers come from Ray's object store read-only; the
    engine copies them.

    Args:
        **options: Ray task options (`num_cpus`, `max_retries`, `resources`, `runtime_env`, ...),
            passed to `ray.remote`; `num_cpus` defaults to 1.

    Raises:
        ImportError: Ray is not installed (`pip install ray`).
    """

    def __init__(self, **options: Any) -> None:
        try:
            import ray
        except ImportError as err:
            raise ImportError("RayExecutor needs Ray, which is not installed: pip install ray") from err
        self._remote = ray.remote(**{"num_cpus": 1, **options})(_call)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Schedule `fn(*args, **kwargs)` as one Ray task."""
        return self._remote.remote(fn, args, kwargs).future()
