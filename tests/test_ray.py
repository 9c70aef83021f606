"""Ray as the executor, through `blackbox_diff.executors.RayExecutor` (the docs/scaling.md recipe):
values, gradients and batch order as in the serial loop, a failing solve fails only its instance, and a
worker that dies is retried by Ray and then reported for its instance only. Ray is a dev dependency:
CI runs these."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import ray
import torch

import blackbox_diff as bbd
from blackbox_diff.executors import RayExecutor

SQRT = bbd.Root(lambda x, w: x**2 - w)


@pytest.fixture(scope="module")
def executor():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield RayExecutor(max_retries=1)  # one retry of a dead worker's task, then WorkerCrashedError
    ray.shutdown()


def test_ray_executor_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=re.escape("pip install ray")):
        RayExecutor()


def _solvers():
    """Closures, so that Ray ships them by value (its workers do not import the tests)."""

    def jittery_sqrt(w):
        import time

        import numpy as np

        time.sleep(float(np.random.default_rng(int(abs(w) * 1000)).uniform(0, 0.01)))
        if w < 0:
            raise ValueError(f"negative input {w}")
        return np.sqrt(w)

    def dies_on_negative(w):
        import os

        import numpy as np

        if w < 0:
            os._exit(3)
        return np.sqrt(w)

    return jittery_sqrt, dies_on_negative


def test_ray_gives_the_serial_values_gradients_and_order(executor):
    jittery, _ = _solvers()
    w = torch.linspace(0.5, 20.0, 40, dtype=torch.float64)
    results = []
    for ex in (executor, None):
        wr = w.clone().requires_grad_(True)
        z = bbd.implicit(SQRT, in_dims=0, executor=ex)(jittery)(wr)
        (z * torch.arange(1.0, 41.0, dtype=torch.float64)).sum().backward()
        results.append((z.detach(), wr.grad))
    (z_ray, g_ray), (z_serial, g_serial) = results
    assert torch.equal(z_ray, z_serial) and torch.equal(g_ray, g_serial)
    torch.testing.assert_close(z_ray, w.sqrt(), rtol=0, atol=1e-15)


def test_ray_failing_solve_is_a_solver_error_for_its_instance(executor):
    jittery, _ = _solvers()
    w = torch.tensor([1.0, 4.0, -1.0, 9.0], dtype=torch.float64)
    fn = bbd.implicit(SQRT, in_dims=0, executor=executor)(jittery)
    with pytest.raises(bbd.SolverError, match=re.escape("negative input -1.0")) as info:
        fn(w)
    assert info.value.batch_index == 2
    with pytest.warns(RuntimeWarning, match="batch index 2"):
        z = fn.with_options(on_failure="nan")(w)
    assert torch.isnan(z[2]) and z[[0, 1, 3]].tolist() == [1.0, 2.0, 3.0]


def test_ray_worker_that_dies_is_retried_then_fails_only_its_instance(executor):
    _, dies = _solvers()
    w = torch.tensor([1.0, -1.0, 16.0], dtype=torch.float64)
    fn = bbd.implicit(SQRT, in_dims=0, executor=executor, on_failure="nan")(dies)
    with pytest.warns(RuntimeWarning, match="raised WorkerCrashedError"):
        z = fn(w)
    assert torch.isnan(z[1])
    assert z[[0, 2]].tolist() == [1.0, 4.0]
    assert np.isfinite(fn(torch.tensor([25.0], dtype=torch.float64)).item())  # the pool of workers recovered
