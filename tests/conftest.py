"""Shared test settings: float64 everywhere (gradient checks need it)."""

import torch

torch.set_default_dtype(torch.float64)


import pytest  # noqa: E402


@pytest.fixture(params=["compiled", "numpy"])
def check_path(request):
    """Run a test with the answer checks compiled (numba, the `fast` extra CI installs) and in numpy: a
    refusal or an acceptance must not depend on which ran."""
    from blackbox_diff.plugin import use_kernels

    if request.param == "compiled":
        pytest.importorskip("numba")
    previous = use_kernels(request.param == "compiled")
    yield request.param
    use_kernels(previous)
