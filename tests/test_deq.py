"""Deep equilibrium layers: forward solvers, IFT gradients vs the dense IFT, solver choice, memory, errors."""

import re
import sys

import pytest
import torch

from blackbox_diff import CertificationError, InputError, SolverError, saved_tensor_bytes
from blackbox_diff.deq import DEQ, FixedPointResult, anderson, fixed_point_iteration, fixed_point_layer


class TanhLayer(torch.nn.Module):
    """The NeurIPS 2020 tutorial's layer: z = tanh(W z + x)."""

    def __init__(self, d, scale, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(scale * torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def dense_ift(f, x, z, g):
    """dL/dx and dL/dW for L = <g, z*> by the explicit IFT, per instance with dense Jacobians."""
    gx, gW = torch.zeros_like(x), torch.zeros_like(f.W)
    for b in range(x.shape[0]):
        D = 1 - torch.tanh(f.W @ z[b] + x[b]) ** 2
        J = D[:, None] * f.W  # dT/dz
        u = torch.linalg.solve((torch.eye(len(D)) - J).T, g[b])
        gx[b] = u * D
        gW += torch.outer(u * D, z[b])
    return gx, gW


@pytest.mark.parametrize("solver", ["anderson", "iteration"])
def test_forward_solvers_find_the_fixed_point(solver):
    f = TanhLayer(30, 0.8)
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    fn = anderson if solver == "anderson" else fixed_point_iteration
    res = fn(lambda z: f(z, x), torch.zeros_like(x), tol=1e-12, max_iter=300)
    assert bool(res.converged.all())
    assert (f(res.z, x) - res.z).abs().max() < 1e-11
    assert 0.0 < res.rate < 1.0


def test_anderson_needs_fewer_evaluations_than_plain_iteration():
    f = TanhLayer(40, 0.95)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    T = lambda z: f(z, x)  # noqa: E731
    a = anderson(T, torch.zeros_like(x), tol=1e-10, max_iter=500)
    p = fixed_point_iteration(T, torch.zeros_like(x), tol=1e-10, max_iter=500)
    assert bool(a.converged.all()) and bool(p.converged.all())
    assert a.iterations < p.iterations
    torch.testing.assert_close(a.z, p.z, atol=1e-9, rtol=0)


@pytest.mark.parametrize("linear_solver", ["auto", "neumann", "gmres"])
@pytest.mark.parametrize("solver", ["anderson", "iteration"])
def test_deq_gradient_matches_dense_ift(solver, linear_solver):
    f = TanhLayer(20, 0.7)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(3), requires_grad=True)
    g = torch.randn(4, 20, generator=torch.Generator().manual_seed(4))
    layer = DEQ(f, solver=solver, linear_solver=linear_solver, tol=1e-12, max_iter=500)
    z = layer(x)
    gx, gW = torch.autograd.grad((g * z).sum(), (x, f.W))
    rx, rW = dense_ift(f, x.detach(), z.detach(), g)
    torch.testing.assert_close(gx, rx, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(gW, rW, rtol=1e-8, atol=1e-9)


def test_auto_picks_neumann_when_the_forward_measured_a_contraction_and_gmres_otherwise():
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(5))
    plain = DEQ(TanhLayer(20, 0.5), solver="iteration", tol=1e-10)
    plain(x)
    assert plain.last.rate < 0.9 and plain.last_linear_solver == "neumann"
    accelerated = DEQ(TanhLayer(20, 0.3), tol=1e-10)
    accelerated(x)
    assert accelerated.last.rate < 0.5 and accelerated.last_linear_solver == "neumann"
    # |W| large: plain iteration barely contracts; Anderson still converges, GMRES differentiates it.
    slow = DEQ(TanhLayer(20, 2.5, seed=1), tol=1e-10, max_iter=400, solver_options={"m": 10})
    xx = x.clone().requires_grad_(True)
    z = slow(xx)
    assert slow.last.rate >= 0.5 and slow.last_linear_solver == "gmres"
    (gx,) = torch.autograd.grad(z.sum(), xx)
    rx, _ = dense_ift(slow.f, x, z.detach(), torch.ones_like(x))
    torch.testing.assert_close(gx, rx, rtol=1e-7, atol=1e-8)
    # A user solver reports no rate: GMRES.
    mine = DEQ(TanhLayer(20, 0.3), solver=lambda T, z0: anderson(T, z0, tol=1e-12).z)
    mine(x)
    assert mine.last_linear_solver == "gmres"


def test_anderson_rate_estimates_the_contraction():
    """The secant gain is close to the spectral norm of dT/dz = D W at z* (D = 1 - z*^2) here."""
    f = TanhLayer(30, 0.6)
    x = torch.randn(1, 30, generator=torch.Generator().manual_seed(12))
    res = anderson(lambda z: f(z, x), torch.zeros_like(x), tol=1e-12, max_iter=200)
    J = (1 - res.z[0] ** 2)[:, None] * f.W.detach()
    radius = torch.linalg.eigvals(J).abs().max().item()
    norm = torch.linalg.matrix_norm(J, ord=2).item()
    assert 0.3 * radius <= res.rate <= 1.01 * norm


def test_gradcheck_small_deq():
    f = TanhLayer(6, 0.7)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fixed_point_layer(f, x, tol=1e-13, max_iter=500), (x,), atol=1e-6)


def test_memory_is_independent_of_the_number_of_iterations():
    f = TanhLayer(50, 0.7)
    x = torch.randn(8, 50, generator=torch.Generator().manual_seed(7), requires_grad=True)
    few = DEQ(f, solver="iteration", tol=1e-4)
    many = DEQ(f, solver="iteration", tol=1e-12, max_iter=500)
    b_few = saved_tensor_bytes(lambda: few(x))
    b_many = saved_tensor_bytes(lambda: many(x))
    assert many.last.iterations > 2 * few.last.iterations
    assert b_few == b_many > 0


def test_user_solver_and_its_errors():
    f = TanhLayer(10, 0.5)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(8), requires_grad=True)

    def mine(T, z0):
        z = z0
        for _ in range(200):
            z = T(z)
        return z

    z = DEQ(f, solver=mine)(x)
    ref = DEQ(f)(x)
    torch.testing.assert_close(z, ref, atol=1e-8, rtol=0)
    z.sum().backward()
    assert x.grad is not None
    with pytest.raises(SolverError, match=re.escape("expected a tensor of shape (3, 10) (the shape of z0)")):
        DEQ(f, solver=lambda T, z0: z0[0])(x)
    result = DEQ(f, solver=lambda T, z0: anderson(T, z0, tol=1e-12))
    assert isinstance(result.solve(x.detach()), FixedPointResult)


def test_unconverged_forward_is_refused():
    f = TanhLayer(10, 0.9)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(9))
    with pytest.raises(CertificationError, match=re.escape("does not satisfy the FixedPoint condition")):
        DEQ(f, solver="iteration", max_iter=2, tol=1e-12)(x)


def test_input_errors():
    with pytest.raises(InputError, match=re.escape("DEQ: unknown solver 'broyden'")):
        DEQ(TanhLayer(3, 0.5), solver="broyden")
    with pytest.raises(InputError, match=re.escape("DEQ expects f to be a callable f(z, x) -> z")):
        DEQ(3)
    with pytest.raises(InputError, match=re.escape("unknown option 'bogus'")):
        DEQ(TanhLayer(3, 0.5), bogus=1)
    with pytest.raises(InputError, match=re.escape("anderson: m (history size) must be an integer >= 1")):
        anderson(lambda z: z, torch.zeros(2, 3), m=0)
    with pytest.raises(InputError, match=re.escape("anderson: z0 must be a floating-point tensor of shape (B, ...)")):
        anderson(lambda z: z, [0.0])
    with pytest.raises(InputError, match=re.escape("expected tol > 0 and an integer max_iter >= 1")):
        fixed_point_iteration(lambda z: z, torch.zeros(2, 3), tol=0.0)


def test_float32_uses_float32_tolerances():
    f = TanhLayer(10, 0.5).float()
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(10)).float().requires_grad_(True)
    z = DEQ(f)(x)
    z.sum().backward()
    assert z.dtype == torch.float32 and (f(z, x) - z).abs().max() < 1e-4
    assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    f = TanhLayer(20, 0.7)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(11), requires_grad=True)
    (cpu,) = torch.autograd.grad(DEQ(f, tol=1e-12)(x).sum(), x)
    fc = TanhLayer(20, 0.7).cuda()
    xc = x.detach().cuda().requires_grad_(True)
    (gpu,) = torch.autograd.grad(DEQ(fc, tol=1e-12)(xc).sum(), xc)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_deq_example_runs_fast(capsys, monkeypatch):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "deq_tanh.py"
    spec = importlib.util.spec_from_file_location("deq_tanh_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "deq_tanh_example", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)  # the example's classifier is float32, as a user's would be
        accuracy = module.main(["--fast"])
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    assert accuracy > 0.5 and "IFT gradient vs dense IFT" in capsys.readouterr().out
