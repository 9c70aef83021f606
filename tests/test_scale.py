"""Scaling out: Dask (LocalCluster on loopback), process pools, dying workers, and threads calling one layer.

The executor option runs the per-instance black-box calls; these tests check that every executor gives
the serial result in batch order, that a worker process dying mid-batch becomes a SolverError (or NaN
under on_failure="nan") instead of a hang, and that one `bbd.implicit` function is safe to call from many
threads at once.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from zoo import KKT_SIMPLEX, by_name

import blackbox_diff as bbd

distributed = pytest.importorskip("distributed")  # the dev extra installs dask[distributed]
dask = pytest.importorskip("dask")

ROOT = by_name("root")
SQRT = bbd.Root(lambda x, w: x**2 - w)


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    A, b = ROOT.params()
    scales = torch.linspace(-2.0, 2.0, n)
    return A, b[None, :] * scales[:, None] + 0.01 * torch.arange(n, dtype=b.dtype)[:, None]


def jittery_sqrt(w):
    """Finishes in a random order, so results come back out of order unless the engine restores it."""
    time.sleep(float(np.random.default_rng(int(w * 1000)).uniform(0, 0.02)))
    return np.sqrt(w)


def die_on_negative(w):
    """A solver that takes its worker process down: os._exit skips every exception handler."""
    if w < 0:
        os._exit(3)
    return np.sqrt(w)


def _grads(fn, A, B):
    A1, B1 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    Z = fn(A1, B1)
    (Z * torch.arange(1.0, Z.numel() + 1).reshape(Z.shape)).sum().backward()
    return Z.detach(), A1.grad, B1.grad


# --- Dask ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_dask_executor_gives_the_serial_values_and_gradients(dask_client):
    A, B = _batch(24)
    serial = _grads(bbd.implicit(ROOT.condition, in_dims=(None, 0))(ROOT.solve), A, B)
    fn = bbd.implicit(ROOT.condition, in_dims=(None, 0), executor=dask_client.get_executor())(ROOT.solve)
    got = _grads(fn, A, B)
    for a, b in zip(got, serial, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("executor", ["dask", "threads", "processes"])
def test_results_keep_batch_order_when_solves_finish_out_of_order(executor, request):
    w = torch.linspace(0.5, 8.0, 16)
    if executor == "dask":
        executor = request.getfixturevalue("dask_client").get_executor()
    z = bbd.implicit(SQRT, in_dims=0, executor=executor, max_workers=None if executor != "threads" else 4)(
        jittery_sqrt
    )(w)
    torch.testing.assert_close(z, torch.sqrt(w), atol=1e-15, rtol=0)


def test_dask_failing_instance_gives_solver_error_with_its_index(dask_client):
    def picky(w):
        if w > 3:
            raise ArithmeticError(f"diverged at w={w}")
        return np.sqrt(w)

    fn = bbd.implicit(SQRT, in_dims=0, executor=dask_client.get_executor())(picky)
    with pytest.raises(bbd.SolverError, match=re.escape("raised ArithmeticError: diverged at w=4.0 at batch index 2")):
        fn(torch.tensor([1.0, 2.0, 4.0]))
    with pytest.warns(RuntimeWarning, match="diverged at w=4.0"):
        z = fn.with_options(on_failure="nan")(torch.tensor([1.0, 2.0, 4.0]))
    assert torch.isnan(z[2]) and z[:2].tolist() == [1.0, np.sqrt(2.0)]


def test_dask_process_worker_that_dies_fails_only_its_instance():
    # Dask reschedules the tasks of a dead worker and gives up on a task that killed more than
    # `allowed-failures` workers (KilledWorker); the others still get their answers. Two threads per worker
    # and a 1 s delay before dying let the healthy solves finish first, so only the killer is charged.
    def dies_on_negative(w):  # a closure: cloudpickle ships it by value, the workers never import tests
        import os
        import time

        import numpy as np

        if w < 0:
            time.sleep(1.0)
            os._exit(3)
        return np.sqrt(w)

    w = torch.tensor([1.0, 4.0, -1.0, 9.0, 16.0])
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), distributed.LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        fn = bbd.implicit(SQRT, in_dims=0, executor=client.get_executor(), on_failure="nan")(dies_on_negative)
        with pytest.warns(RuntimeWarning, match="raised KilledWorker"):
            z = fn(w)
        assert torch.isnan(z[2])
        torch.testing.assert_close(z[[0, 1, 3, 4]], torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=1e-15, rtol=0)
        with pytest.raises(bbd.SolverError, match=re.escape("raised KilledWorker")) as info:
            fn.with_options(on_failure="raise")(torch.tensor([-4.0]))
        assert info.value.batch_index == 0


# --- process pools -----------------------------------------------------------------------------------
# A dead worker breaks the whole pool; run_instances re-runs the lost instances in fresh pools, so the
# instance that killed its worker gets a SolverError saying so and the others their answers.
DIED = "|".join(map(re.escape, ["raised BrokenProcessPool", "The worker process running the black box died"]))


def die_late_or_sleep(w):
    """Negative: kill the worker after 0.3 s. Above 5: a slow solve (1 s), still running at that moment."""
    if w < 0:
        time.sleep(0.3)
        os._exit(3)
    if w > 5:
        time.sleep(1.0)
    return np.sqrt(w)


def test_process_pool_worker_death_is_a_solver_error_not_a_hang():
    fn = bbd.implicit(SQRT, in_dims=0, executor="processes", max_workers=2)(die_on_negative)
    with pytest.raises(bbd.SolverError, match=DIED) as info:
        fn(torch.tensor([-1.0, 4.0, 9.0]))
    assert info.value.batch_index == 0


def test_process_pool_worker_death_under_nan_policy():
    # Worker A answers w=4 at once, worker B dies on w=-1 at 0.3 s while A is busy with w=9 (1 s).
    # A dead worker breaks the whole pool: the instance that killed it is NaN; the one still running (w=9)
    # is lost with the pool and re-run in a fresh one; what finished is exact.
    w = torch.tensor([4.0, -1.0, 9.0])
    fn = bbd.implicit(SQRT, in_dims=0, executor="processes", max_workers=2, on_failure="nan")(die_late_or_sleep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = fn(w)
    assert z[0].item() == 2.0 and torch.isnan(z[1])
    assert z[2].item() == 3.0
    assert sum(bool(re.search(DIED, str(c.message))) for c in caught) == int(torch.isnan(z).sum())


def test_process_pool_worker_death_fails_only_its_instance():
    w = torch.tensor([4.0, -1.0, 9.0])
    fn = bbd.implicit(SQRT, in_dims=0, executor="processes", max_workers=2, on_failure="nan")(die_late_or_sleep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = fn(w)
    assert z[2].item() == 3.0


def test_a_user_owned_process_pool_survives_other_calls():
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        z = bbd.implicit(SQRT, in_dims=0, executor=pool)(die_on_negative)(torch.tensor([1.0, 4.0]))
        assert z.tolist() == [1.0, 2.0]


# --- one layer, many threads -------------------------------------------------------------------------
def _serial_and_threaded(fn, inputs, n_threads=8):
    """fn(x) -> tuple of tensors, for every x: serially, then from n_threads threads released at once."""
    serial = [fn(x) for x in inputs]
    barrier = threading.Barrier(n_threads)
    results: list = [None] * len(inputs)
    errors: list = []

    def work(k):
        barrier.wait()
        try:
            for i in range(k, len(inputs), n_threads):
                results[i] = fn(inputs[i])
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return serial, results


@pytest.mark.parametrize("executor", [None, "threads"])
def test_one_root_layer_called_from_eight_threads_equals_serial_calls(executor):
    A, b = ROOT.params()
    layer = bbd.implicit(ROOT.condition, in_dims=(None, 0), executor=executor, max_workers=2)(ROOT.solve)

    def call(scale):
        A1 = A.clone().requires_grad_(True)
        B1 = (b * scale + torch.arange(3.0)[:, None] * 0.1).requires_grad_(True)
        Z = layer(A1, B1)
        (Z**2).sum().backward()
        return Z.detach(), A1.grad, B1.grad

    serial, threaded = _serial_and_threaded(call, [0.5 + 0.1 * k for k in range(16)])
    for s, t in zip(serial, threaded, strict=True):
        for a, b_ in zip(s, t, strict=True):
            torch.testing.assert_close(a, b_, atol=0, rtol=0)


def test_one_kkt_layer_called_from_eight_threads_equals_serial_calls():
    # KKT keeps per-call sizes and active sets: each call must work on its own copy of the condition.
    layer = bbd.implicit(KKT_SIMPLEX, return_duals=True)(by_name("kkt").solve)
    sizes = [3, 4, 5, 6]

    def call(k):
        y = (torch.linspace(-0.7, 0.9, sizes[k % 4]) * (1 + 0.13 * k) + 0.0371).requires_grad_(True)
        sol = layer(y)
        (sol.x * torch.arange(1.0, y.numel() + 1)).sum().backward()
        return sol.x.detach(), sol.eq.detach(), sol.ineq.detach(), y.grad

    serial, threaded = _serial_and_threaded(call, list(range(16)))
    for s, t in zip(serial, threaded, strict=True):
        for a, b_ in zip(s, t, strict=True):
            torch.testing.assert_close(a, b_, atol=0, rtol=0)


# --- chunking ----------------------------------------------------------------------------------------
class CountingExecutor(concurrent.futures.Executor):
    """A foreign executor (not a thread pool, so chunking applies) that counts tasks and can lose the first."""

    def __init__(self, lose_first: bool = False):
        self.inner = concurrent.futures.ThreadPoolExecutor(2)
        self._max_workers = 2
        self.submits = 0
        self.lose_first = lose_first

    def submit(self, fn, /, *args, **kwargs):
        self.submits += 1
        if self.lose_first and self.submits == 1:
            fut = concurrent.futures.Future()
            fut.set_exception(ConnectionResetError("the worker holding this task went away"))
            return fut
        return self.inner.submit(fn, *args, **kwargs)

    def shutdown(self, wait=True, **kwargs):
        self.inner.shutdown(wait)


def test_instances_go_to_a_foreign_executor_in_chunks_in_batch_order():
    w = torch.linspace(0.5, 8.0, 40)
    ex = CountingExecutor()
    z = bbd.implicit(SQRT, in_dims=0, executor=ex)(jittery_sqrt)(w)
    torch.testing.assert_close(z, torch.sqrt(w), atol=1e-15, rtol=0)
    assert ex.submits == 8  # ceil(40 / (4 tasks x 2 workers)) = 5 instances per task
    ex.shutdown()


def test_a_lost_chunk_is_rerun_one_instance_per_task():
    w = torch.linspace(0.5, 8.0, 40)
    ex = CountingExecutor(lose_first=True)
    z = bbd.implicit(SQRT, in_dims=0, executor=ex)(np.sqrt)(w)
    torch.testing.assert_close(z, torch.sqrt(w), atol=1e-15, rtol=0)
    assert ex.submits == 8 + 5  # the lost chunk's five instances, resubmitted one by one
    ex.shutdown()
