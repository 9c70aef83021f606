"""The compiled answer checks (numba, the `fast` extra) compute what their numpy paths compute.

Every check that runs after a forward has a compiled loop and a vectorised numpy path (`blackbox_diff.linalg.
Kernel`); certification must not depend on which ran. The cases that an easy kernel gets wrong: NaN (a
``max(0.0, v)`` in compiled code turns NaN into 0 and would pass a NaN answer), shared data broadcast over the
batch, strided and read-only inputs (the kernel's one signature takes C-contiguous, writable arrays), empty
row blocks, and a non-symmetric quadratic term (the QP sees only its symmetric part).
"""

from __future__ import annotations

import numpy as np
import pytest

from blackbox_diff.engine._certify import passes
from blackbox_diff.kkt import polyhedral_certificate, polyhedral_term_sizes
from blackbox_diff.linalg import Kernel, kernels_enabled, use_kernels

numba = pytest.importorskip("numba")  # the `fast` extra; CI installs it (make install: .[all,...])


@pytest.fixture
def numpy_path():
    """Run the block with the compiled kernels off (the numpy path), then restore."""
    previous = use_kernels(False)
    yield
    use_kernels(previous)


def _case(rng, B, n, pe, m, shared, quad):
    Bd = 1 if shared else B
    Z = rng.standard_normal((B, n + pe + m))
    on_E = (rng.random((B, pe)) > 0.3).astype(float)
    on_G = (rng.random((B, m)) > 0.4).astype(float)
    P = rng.standard_normal((Bd, n, n)) if quad else None  # not symmetric: 1/2 (P + P^T) is what counts
    return (Z, on_E, on_G, P, rng.standard_normal((B, n)), rng.standard_normal((Bd, pe, n)),
            rng.standard_normal((Bd, pe)), rng.standard_normal((Bd, m, n)), rng.standard_normal((B, m)))


def _both(args, symmetric):
    compiled = polyhedral_certificate(*args, symmetric=symmetric)
    previous = use_kernels(False)
    try:
        reference = polyhedral_certificate(*args, symmetric=symmetric)
    finally:
        use_kernels(previous)
    return compiled, reference


@pytest.mark.parametrize("B,n,pe,m", [(1, 6, 2, 5), (7, 4, 0, 3), (3, 5, 3, 0), (2, 3, 0, 0), (16, 30, 7, 30)])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("quad,symmetric", [(True, True), (True, False), (False, False)])
def test_polyhedral_certificate_kernel_is_the_numpy_one(B, n, pe, m, shared, quad, symmetric):
    rng = np.random.default_rng(B * 100 + n + pe + m)
    args = _case(rng, B, n, pe, m, shared, quad)
    (C, L), (C0, L0) = _both(args, symmetric)
    assert C.shape == L.shape == (B, n + 2 * pe + 3 * m)
    np.testing.assert_allclose(C, C0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L, L0, rtol=1e-12, atol=1e-12)
    S = polyhedral_term_sizes(*args, symmetric=symmetric)
    assert np.all(L <= S * (1 + 1e-12) + 1e-300)  # from below, as the engine's test assumes
    if quad and symmetric:  # the certificate's stationarity is 1/2 (P + P^T) x + ..., not P x
        x, P = args[0][:, :n], np.broadcast_to(args[3], (B, n, n))
        P_sym = 0.5 * (P + P.swapaxes(1, 2))
        Px = np.einsum("bij,bj->bi", P_sym, x)
        rest = np.einsum("bi,bij->bj", args[0][:, n:n + pe] * args[1], np.broadcast_to(args[5], (B, pe, n))) + \
            np.einsum("bi,bij->bj", args[0][:, n + pe:] * args[2], np.broadcast_to(args[7], (B, m, n)))
        np.testing.assert_allclose(C[:, :n], Px + args[4] + rest, rtol=1e-11, atol=1e-11)


def test_kernel_takes_strided_and_read_only_inputs():
    rng = np.random.default_rng(3)
    Z, on_E, on_G, P, c, E, e, G, h = _case(rng, 4, 5, 2, 6, False, True)
    G_strided = np.ascontiguousarray(G.swapaxes(1, 2)).swapaxes(1, 2)  # same values, Fortran-ordered blocks
    c_readonly = np.broadcast_to(c[:1], c.shape)  # a broadcast view: read-only
    args = (Z, on_E, on_G, P, c_readonly, E, e, G_strided, h)
    (C, L), (C0, L0) = _both(args, True)
    np.testing.assert_allclose(C, C0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(L, L0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["x", "active multiplier", "inactive multiplier"])
def test_nan_answers_give_nan_certificates_and_fail(where):
    # max(0.0, NaN) is 0 (max keeps its first argument unless another is larger): a kernel written that way
    # would certify a NaN answer (checked: this test fails with it).
    rng = np.random.default_rng(11)
    Z, on_E, on_G, P, c, E, e, G, h = _case(rng, 2, 4, 1, 3, True, True)
    on_G[1] = [1.0, 0.0, 1.0]
    col = {"x": 0, "active multiplier": 4 + 1 + 0, "inactive multiplier": 4 + 1 + 1}[where]
    Z[1, col] = np.nan
    (C, L), (C0, _) = _both((Z, on_E, on_G, P, c, E, e, G, h), True)
    assert np.array_equal(np.isnan(C), np.isnan(C0)) and np.isnan(C[1]).any() and not np.isnan(C[0]).any()
    S = np.abs(np.nan_to_num(C)) / 1e-3 + 1.0  # sizes every finite component passes against
    assert passes(np.nan_to_num(C), S, 1e-3) and not passes(C, S, 1e-3)  # only the NaN fails


def test_passes_kernel_agrees_with_numpy(numpy_path):
    rng = np.random.default_rng(2)
    C = rng.standard_normal((5, 9))
    S = np.abs(C) * 1e3
    reference = [passes(C, S, 1e-3), passes(C, S, 9e-4), passes(np.where(C > 2, np.nan, C), S, 1.0)]
    use_kernels(True)
    assert [passes(C, S, 1e-3), passes(C, S, 9e-4), passes(np.where(C > 2, np.nan, C), S, 1.0)] == reference
    assert reference[0] and not reference[1] and not reference[2]


def _identity(a):
    return a


def test_use_kernels_switches_the_compiled_code_off_and_back():
    kernel = Kernel(_identity, "float64(float64)")
    previous = use_kernels(False)
    try:
        assert not kernels_enabled() and kernel.compiled() is None
        use_kernels(True)
        compiled = kernel.compiled()
        assert compiled is not None and compiled(2.5) == 2.5
    finally:
        use_kernels(previous)
