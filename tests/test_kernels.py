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


@pytest.fixture(autouse=True)
def _kernels_on():
    """These tests are about the compiled code: on even where BLACKBOX_DIFF_KERNELS=0 runs the rest in numpy."""
    previous = use_kernels(True)
    yield
    use_kernels(previous)


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
    (C, L, worst), (C0, L0, none) = _both(args, symmetric)
    assert C.shape == L.shape == (B, n + 2 * pe + 3 * m) and none is None
    ratio = np.where(L > 0, np.abs(C) / np.where(L > 0, L, 1.0), np.where(C == 0, 0.0, np.inf))
    assert worst == pytest.approx(ratio.max(), rel=1e-12)  # the largest |C| / size, for the engine's test
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
    (C, L, _), (C0, L0, _) = _both(args, True)
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
    (C, L, worst), (C0, _, _) = _both((Z, on_E, on_G, P, c, E, e, G, h), True)
    assert np.array_equal(np.isnan(C), np.isnan(C0)) and np.isnan(C[1]).any() and not np.isnan(C[0]).any()
    assert worst == np.inf  # NaN counts as infinitely far: the engine's shortcut never passes it
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


def _total(a):
    s = 0.0
    for i in range(a.shape[0]):
        s += a[i]
    return s


def test_kernel_call_copies_arrays_its_signature_does_not_take():
    # One signature (C-contiguous, writable): a strided view or a read-only broadcast is copied and the
    # call retried, instead of numba's "no matching definition".
    kernel = Kernel(_total, "float64(float64[::1])")
    a = np.arange(10.0)
    assert kernel.compiled() is not None
    assert kernel(a) == 45.0 and kernel(a[::2]) == 20.0 and kernel(np.broadcast_to(np.float64(2.0), (3,))) == 6.0


@pytest.mark.parametrize("point", ["answer", "perturbed", "nan multiplier"])
def test_casadi_certificate_and_row_scan_kernels_are_the_numpy_ones(point):
    # The CasADi checks (certificate of one answer; the polish's row scan that finds rows to move and weakly
    # active rows) on an MPC with active control bounds, at its answer and off it: compiled == numpy.
    import sys
    from pathlib import Path

    import torch
    from blackbox_diff_casadi import _active

    import blackbox_diff as bbd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import mpc_imitation

    layer = mpc_imitation.mpc_layer(10, 0.05)
    cond, k = layer.compiled.condition, layer.compiled.condition.kernels
    values = [np.array([0.3, 0.5, 0.6, 0.8]), np.asarray(mpc_imitation.TRUE_WEIGHTS, dtype=float), np.array(0.6)]
    params = tuple(torch.as_tensor(v) for v in values)
    z_t, (lo_t, up_t) = cond.prepare(layer.compiled.solve(*values), params, bbd.ImplicitOptions())
    z, lo, up = z_t.numpy().copy(), lo_t.numpy(), up_t.numpy()
    assert up.any() or lo[k.n:].any()  # some bound is held
    rng = np.random.default_rng(4)
    if point == "perturbed":
        z = z + 1e-3 * rng.standard_normal(z.size)
    elif point == "nan multiplier":
        z[k.n + int(np.flatnonzero(lo + up)[0])] = np.nan
    p = np.concatenate([v.reshape(-1, order="F") for v in values])
    C, S, worst = cond.certify_one(z, lo, up, p)
    scan = _active._violations(k, z, lo, up, p, 1e-7)
    weak = _active._weak_rows(k, k.at(z, lo, up, p), z, lo, up, p, 1e-7)
    previous = use_kernels(False)
    try:
        C0, S0, none = cond.certify_one(z, lo, up, p)
        scan0 = _active._violations(k, z, lo, up, p, 1e-7)
        weak0 = _active._weak_rows(k, k.at(z, lo, up, p), z, lo, up, p, 1e-7)
    finally:
        use_kernels(previous)
    assert none is None
    np.testing.assert_array_equal(np.isnan(C), np.isnan(C0))
    np.testing.assert_allclose(C, C0, rtol=1e-13, atol=0)
    np.testing.assert_allclose(S, S0, rtol=1e-13, atol=0)
    for a, b in zip((*scan, *weak), (*scan0, *weak0), strict=True):
        np.testing.assert_array_equal(a, b)
    ratio = np.where(S > 0, np.abs(C) / np.where(S > 0, S, 1.0), np.where(C == 0, 0.0, np.inf))
    ratio[np.isnan(C)] = np.inf
    assert worst == pytest.approx(ratio.max(), rel=1e-12)
    assert (worst == np.inf) == (point == "nan multiplier") and (worst < 1e-9) == (point == "answer")


def test_a_kernel_numba_cannot_compile_falls_back_to_numpy_with_a_warning():
    # A broken numba/LLVM (here: a signature numba rejects) must not break a forward: warn once, numpy path.
    kernel = Kernel(_identity, "not_a_type(float64)")
    with pytest.warns(RuntimeWarning, match="runs in numpy instead"):
        assert kernel.compiled() is None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernel.compiled() is None  # tried once: no second warning, no second attempt
    assert not caught
