"""Implicit ODE layers: orders of convergence, gradients vs finite differences of the same discretisation,
adjoint linear solvers, per-step black boxes, memory, errors; scipy solve_ivp sensitivities (Lorenz)."""

import copy
import math
import re
import sys

import numpy as np
import pytest
import scipy.integrate
import torch

from blackbox_diff import InputError, SolverError, saved_tensor_bytes
from blackbox_diff.ode import METHODS, newton, odeint, solve_ivp_layer

ORDERS = sorted(METHODS.items())


def vdp(t, y, mu):
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, mu * (1 - x**2) * v - x + 0.1 * torch.sin(t)], dim=-1)


def reference_vdp(y0, mu, T):
    sol = scipy.integrate.solve_ivp(
        lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0] + 0.1 * np.sin(t)],
        (0.0, T), y0, method="DOP853", rtol=1e-13, atol=1e-13,
    )
    return sol.y[:, -1]


@pytest.mark.parametrize(("method", "order"), ORDERS, ids=[m for m, _ in ORDERS])
def test_order_of_convergence(method, order):
    y0, mu, T = [1.0, 0.5], 0.8, 1.0
    exact = reference_vdp(y0, mu, T)
    steps = [8, 16] if order < 5 else [4, 8]
    errors = []
    for n in steps:
        y = odeint(vdp, torch.tensor(y0), [0.0, T], torch.tensor(mu), method=method, substeps=n)[-1]
        errors.append(np.abs(y.numpy() - exact).max())
    observed = math.log2(errors[0] / errors[1])
    assert abs(observed - order) < 0.35, (method, errors, observed)


@pytest.mark.parametrize(("method", "order"), ORDERS, ids=[m for m, _ in ORDERS])
def test_dense_output_order(method, order):
    """Outputs between grid points come from the collocation polynomial, of order min(p, s + 1)."""
    y0, mu = [1.0, 0.5], 0.8
    exact = reference_vdp(y0, mu, 0.7)
    errors = []
    for h in [0.2, 0.1]:  # 0.7 falls mid-step
        y = odeint(vdp, torch.tensor(y0), [0.0, 0.7, 1.0], torch.tensor(mu), method=method, step_size=h,
                   newton_tol=1e-14)[1]
        errors.append(np.abs(y.numpy() - exact).max())
    expected = {"backward_euler": 1, "trapezoid": 2, "radau3": 3, "radau5": 4}[method]
    assert math.log2(errors[0] / errors[1]) > expected - 0.4, errors


def _loss(method, y0, mu, **kw):
    Y = odeint(vdp, y0, torch.linspace(0.0, 1.0, 4), mu, method=method, batch_dims=1, **kw)
    w = torch.arange(1.0, Y.numel() + 1).reshape(Y.shape) / Y.numel()
    return (w * Y).sum() + (Y[-1] ** 2).sum()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("grid", [{"substeps": 3}, {"step_size": 0.15}], ids=["substeps", "dense-output"])
def test_gradient_matches_finite_differences_of_discretisation(method, grid):
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], requires_grad=True)
    mu = torch.tensor(0.9, requires_grad=True)
    g_y0, g_mu = torch.autograd.grad(_loss(method, y0, mu, **grid), (y0, mu))
    eps = 1e-6
    with torch.no_grad():
        fd_mu = (_loss(method, y0, mu + eps, **grid) - _loss(method, y0, mu - eps, **grid)) / (2 * eps)
        fd_y0 = torch.zeros_like(y0)
        for i in range(2):
            for j in range(2):
                e = torch.zeros_like(y0)
                e[i, j] = eps
                fd_y0[i, j] = (_loss(method, y0 + e, mu, **grid) - _loss(method, y0 - e, mu, **grid)) / (2 * eps)
    assert abs(g_mu - fd_mu) <= 1e-6 * (1 + abs(fd_mu))
    torch.testing.assert_close(g_y0, fd_y0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("linear_solver", ["dense", "gmres", "cg"])
def test_adjoint_linear_solvers_agree(linear_solver):
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]])
    mu = torch.tensor(0.9, requires_grad=True)
    (ref,) = torch.autograd.grad(_loss("radau5", y0, mu, substeps=2), mu)
    (got,) = torch.autograd.grad(_loss("radau5", y0, mu, substeps=2, linear_solver=linear_solver), mu)
    assert abs(got - ref) <= 1e-8 * abs(ref)


def test_whole_state_as_one_system_matches_row_batching():
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]])
    mu = torch.tensor(0.9, requires_grad=True)
    (a,) = torch.autograd.grad(_loss("radau3", y0, mu, substeps=2), mu)
    Y = odeint(vdp, y0, torch.linspace(0.0, 1.0, 4), mu, method="radau3", substeps=2, batch_dims=0)
    w = torch.arange(1.0, Y.numel() + 1).reshape(Y.shape) / Y.numel()
    (b,) = torch.autograd.grad((w * Y).sum() + (Y[-1] ** 2).sum(), mu)
    assert abs(a - b) <= 1e-9 * abs(a)


def test_scipy_and_user_step_solvers_give_the_same_trajectory_and_gradient():
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]])
    mu = torch.tensor(0.9, requires_grad=True)
    (ref,) = torch.autograd.grad(_loss("trapezoid", y0, mu, substeps=2), mu)

    def fixed_point(F, z0):  # a user black box: damped residual iteration, no Jacobian at all
        z = z0
        for _ in range(200):
            z = z - F(z)
        return z

    for solver in ["scipy", fixed_point]:
        (got,) = torch.autograd.grad(_loss("trapezoid", y0, mu, substeps=2, solver=solver), mu)
        assert abs(got - ref) <= 1e-7 * abs(ref)


def test_module_weights_captured_by_closure_get_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def func(t, y):
        return net(y)

    y0 = torch.tensor([[0.5, -0.2], [0.1, 0.3]])

    def loss():
        return (odeint(func, y0, [0.0, 0.5, 1.0], method="radau5", batch_dims=1) ** 2).sum()

    loss().backward()
    w = net[2].weight
    eps = 1e-6
    with torch.no_grad():
        w[0, 3] += eps
        up = loss()
        w[0, 3] -= 2 * eps
        down = loss()
        w[0, 3] += eps
    assert abs(w.grad[0, 3] - (up - down) / (2 * eps)) <= 1e-6


def test_gradcheck_backward_euler():
    y0 = torch.tensor([0.4, -0.1], requires_grad=True)
    mu = torch.tensor(0.7, requires_grad=True)

    def fn(y0, mu):
        return odeint(vdp, y0, [0.0, 0.3, 0.6], mu, method="backward_euler", substeps=2, newton_tol=1e-13)

    assert torch.autograd.gradcheck(fn, (y0, mu), eps=1e-6, atol=1e-6)


def test_memory_does_not_depend_on_newton_iterations():
    y0 = torch.tensor([[1.0, 0.5]], requires_grad=True)
    mu = torch.tensor(0.9)
    loose = saved_tensor_bytes(lambda: odeint(vdp, y0, [0.0, 1.0], mu, method="radau5", substeps=4, newton_tol=1e-4))
    tight = saved_tensor_bytes(lambda: odeint(vdp, y0, [0.0, 1.0], mu, method="radau5", substeps=4, newton_tol=1e-13))
    assert loose == tight > 0


def test_decreasing_times_integrate_backwards():
    y0 = torch.tensor([1.0])
    k = torch.tensor(0.5)
    y = odeint(lambda t, y, k: -k * y, y0, [1.0, 0.0], k, method="radau5", substeps=8)
    assert abs(y[-1].item() - math.exp(0.5)) < 1e-8


def test_newton_reports_failure():
    with pytest.raises(SolverError, match=re.escape("Newton did not converge in 1 iterations")):
        newton(lambda z: z**3 - 2.0, lambda z: torch.diag_embed(3 * z**2), torch.ones(1, 1), tol=1e-14, max_iter=1)


def test_step_failure_is_a_solver_error_after_halvings():
    with pytest.raises(SolverError, match=re.escape("failed even after halving it 6 times")):
        odeint(lambda t, y: y**2, torch.tensor([1.0]), [0.0, 2.0], method="backward_euler")


def test_failed_steps_are_halved_and_keep_outputs_and_gradients_exact():
    """One big step whose Newton fails is replaced by half steps; the result equals the fine grid."""
    y0 = torch.tensor([[1.0, 0.5]])
    mu = torch.tensor(0.9, requires_grad=True)
    times = [0.0, 0.3, 1.0]
    big = odeint(vdp, y0, times, mu, method="radau5", step_size=1.0, newton_max_iter=2, batch_dims=1)
    (g_big,) = torch.autograd.grad(big.sum(), mu)
    assert torch.isfinite(big).all() and torch.isfinite(g_big)
    eps = 1e-6
    with torch.no_grad():
        up = odeint(vdp, y0, times, mu + eps, method="radau5", step_size=1.0, newton_max_iter=2, batch_dims=1)
        down = odeint(vdp, y0, times, mu - eps, method="radau5", step_size=1.0, newton_max_iter=2, batch_dims=1)
    assert abs(g_big - (up.sum() - down.sum()) / (2 * eps)) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "rk4"}, "option 'method'"),
        ({"stepsize": 0.1}, "unknown option 'stepsize'"),
        ({"solver": "lbfgs"}, "solver must be 'newton', 'scipy' or a callable"),
        ({"batch_dims": 3}, "batch_dims=3 but y0 has only 1 dimensions"),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        odeint(vdp, torch.tensor([1.0, 0.5]), [0.0, 1.0], torch.tensor(0.9), **kwargs)


def test_input_errors():
    mu = torch.tensor(0.9)
    with pytest.raises(InputError, match=re.escape("y0 must be a floating-point torch.Tensor; got list")):
        odeint(vdp, [1.0, 0.5], [0.0, 1.0], mu)
    with pytest.raises(InputError, match=re.escape("t must be strictly increasing or strictly decreasing")):
        odeint(vdp, torch.tensor([1.0, 0.5]), [0.0, 1.0, 0.5], mu)
    with pytest.raises(InputError, match=re.escape("t must be a non-empty 1-D sequence of finite times")):
        odeint(vdp, torch.tensor([1.0, 0.5]), [0.0, float("nan")], mu)
    with pytest.raises(InputError, match=re.escape("func(t, y, *params) returned shape (1,); expected")):
        odeint(lambda t, y: y[:1], torch.tensor([1.0, 0.5]), [0.0, 1.0])


def test_func_coupling_the_rows_is_detected_in_the_backward():
    def coupled(t, y):
        return -y + y.mean(dim=0, keepdim=True)

    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], requires_grad=True)
    out = odeint(coupled, y0, [0.0, 1.0], method="radau3", substeps=2, batch_dims=1)
    with pytest.raises(InputError, match=re.escape("func couples the rows. Use batch_dims=0 (one system)")):
        out[-1, 0, 0].backward()
    # As one system (batch_dims=0) the same field is differentiated exactly: matches finite differences.
    (g,) = torch.autograd.grad(odeint(coupled, y0, [0.0, 1.0], method="radau3", substeps=2)[-1, 0, 0], y0)
    eps = 1e-6
    e = torch.zeros_like(y0)
    e[1, 0] = eps
    with torch.no_grad():
        fd = (odeint(coupled, y0 + e, [0.0, 1.0], method="radau3", substeps=2)[-1, 0, 0]
              - odeint(coupled, y0 - e, [0.0, 1.0], method="radau3", substeps=2)[-1, 0, 0]) / (2 * eps)
    assert abs(g[1, 0] - fd) <= 1e-7


def test_user_solver_errors():
    y0, mu = torch.tensor([1.0, 0.5]), torch.tensor(0.9)
    with pytest.raises(SolverError, match=re.escape("The user's ODE step solver returned shape (3,)")):
        odeint(vdp, y0, [0.0, 1.0], mu, solver=lambda F, z0: torch.zeros(3))

    def broken(F, z0):
        raise RuntimeError("boom")

    with pytest.raises(SolverError, match=re.escape("raised RuntimeError: boom")):
        odeint(vdp, y0, [0.0, 1.0], mu, solver=broken)


# --- scipy solve_ivp black box: the Lorenz sensitivities dx/dsigma, dx/drho, dx/dbeta --------------------
def lorenz(t, y, sigma, rho, beta):
    return torch.stack([sigma * (y[1] - y[0]), y[0] * (rho - y[2]) - y[1], y[0] * y[1] - beta * y[2]])


def _lorenz_fd(p0, y0, t):
    def final(p):
        sol = scipy.integrate.solve_ivp(
            lambda _, y: [p[0] * (y[1] - y[0]), y[0] * (p[1] - y[2]) - y[1], y[0] * y[1] - p[2] * y[2]],
            (t[0], t[-1]), y0, method="DOP853", rtol=1e-13, atol=1e-13,
        )
        return sol.y[:, -1]

    eps = 1e-6
    cols = []
    for i in range(3):
        e = np.zeros(3)
        e[i] = eps
        cols.append((final(p0 + e) - final(p0 - e)) / (2 * eps))
    return np.stack(cols, axis=1)  # J[i, j] = d x_i(T) / d p_j


@pytest.mark.parametrize(
    ("method", "sensitivity"), [("LSODA", "forward"), ("RK45", "adjoint"), ("BDF", "forward")]
)
def test_lorenz_sensitivities_match_finite_differences(method, sensitivity):
    p0 = np.array([10.0, 28.0, 8.0 / 3.0])
    y0 = [1.0, 1.0, 1.0]
    t = np.linspace(0.0, 0.5, 3)
    fd = _lorenz_fd(p0, y0, t)
    params = [torch.tensor(v, requires_grad=True) for v in p0]
    Y = solve_ivp_layer(lorenz, torch.tensor(y0), t, *params, method=method, sensitivity=sensitivity,
                        rtol=1e-9, atol=1e-11)
    w = torch.tensor([1.0, -0.5, 0.25])  # one backward: the weighted sum of the three rows of dx/dp
    grads = torch.autograd.grad((w * Y[-1]).sum(), params)
    np.testing.assert_allclose([g.item() for g in grads], w.numpy() @ fd, rtol=2e-5, atol=2e-5)


def test_solve_ivp_layer_gradient_in_y0_forward_equals_adjoint():
    p = [torch.tensor(10.0), torch.tensor(28.0), torch.tensor(8.0 / 3.0)]
    grads = []
    for sensitivity in ["forward", "adjoint"]:
        y0 = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
        Y = solve_ivp_layer(lorenz, y0, [0.0, 0.2, 0.4], *p, sensitivity=sensitivity, rtol=1e-10, atol=1e-12)
        (g,) = torch.autograd.grad((Y**2).sum(), y0)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_solve_ivp_layer_errors():
    p = torch.tensor(1.0)
    f = lambda t, y, p: -p * y  # noqa: E731
    with pytest.raises(InputError, match=re.escape("y0 must be a 1-D floating-point tensor; got (2, 2)")):
        solve_ivp_layer(f, torch.ones(2, 2), [0.0, 1.0], p)
    with pytest.raises(InputError, match=re.escape("t must be 1-D, strictly increasing, with at least two")):
        solve_ivp_layer(f, torch.ones(2), [1.0, 0.0], p)
    with pytest.raises(InputError, match=re.escape("sensitivity must be 'forward' or 'adjoint'; got 'fd'")):
        solve_ivp_layer(f, torch.ones(2), [0.0, 1.0], p, sensitivity="fd")
    with pytest.raises(InputError, match=re.escape("parameter 0 must be a floating-point tensor; got int")):
        solve_ivp_layer(f, torch.ones(2), [0.0, 1.0], 3)
    with pytest.raises(SolverError, match=re.escape("scipy.integrate.solve_ivp (RK45) failed")):
        solve_ivp_layer(lambda t, y, p: p * y**2, torch.ones(2), [0.0, 2.0], p, method="RK45", sensitivity="adjoint")


def test_float32_runs_with_float32_tolerances():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).float()
    y0 = torch.randn(4, 2, dtype=torch.float32)
    Y = odeint(lambda t, y: net(y), y0, torch.linspace(0, 1, 5), method="radau5", batch_dims=1, step_size=0.3)
    Y.sum().backward()
    assert Y.dtype == torch.float32 and torch.isfinite(net[0].weight.grad).all()
    net64 = copy.deepcopy(net).double()
    Y64 = odeint(lambda t, y: net64(y), y0.double(), torch.linspace(0, 1, 5), method="radau5", batch_dims=1,
                 step_size=0.3)
    assert (Y.double() - Y64).abs().max() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]])
    mu = torch.tensor(0.9, requires_grad=True)
    (cpu,) = torch.autograd.grad(_loss("radau5", y0, mu, substeps=2), mu)
    mu_c = mu.detach().cuda().requires_grad_(True)
    (gpu,) = torch.autograd.grad(_loss("radau5", y0.cuda(), mu_c, substeps=2), mu_c)
    assert abs(gpu.item() - cpu.item()) <= 1e-9 * abs(cpu.item())


@pytest.mark.slow
def test_neural_ode_example_runs_fast(capsys, monkeypatch):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "neural_ode.py"
    spec = importlib.util.spec_from_file_location("neural_ode_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "neural_ode_example", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        rows = module.main(["--fast"])
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 8 and "extrap MSE" in capsys.readouterr().out
    radau = [r for r in rows if r["method"] == "radau5 + IFT"]
    assert all(r["grad_rel_err"] < 1e-4 for r in radau)
