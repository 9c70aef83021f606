"""odeint where the easy implementation is wrong: stiff problems with several roots of the stage
equations (Robertson), Van der Pol at mu = 1000, gradients that reach tensors the field captures, row
coupling seen only at an intermediate time, the output times as parameters, user step solvers that stop
early. References are independent: scipy's Radau at rtol 1e-12, closed forms, central differences."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.integrate
import torch

import blackbox_diff as bbd
from blackbox_diff.ode import METHODS, odeint

torch.set_default_dtype(torch.float64)


def robertson(t, y, k):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[2] * y2 * y3 - k[1] * y2**2, k[1] * y2**2], -1)


def _robertson_reference(k, T=3.0):
    def f(t, y):
        return [-k[0] * y[0] + k[2] * y[1] * y[2], k[0] * y[0] - k[2] * y[1] * y[2] - k[1] * y[1] ** 2,
                k[1] * y[1] ** 2]

    return scipy.integrate.solve_ivp(f, (0.0, T), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-14).y[:, -1]


K_ROB = np.array([0.04, 3e7, 1e4])
# Global error of each method at h = 0.01 on [0, 3] (observed order of accuracy, with margin).
ROB_TOL = {"backward_euler": 3e-3, "trapezoid": 1e-4, "radau3": 1e-6, "radau5": 1e-6}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_robertson_stays_on_the_physical_root_with_every_method(method):
    """Undamped (simplified) Newton from y_n, or from the extrapolated stage polynomial, converges to a root
    of the stage equations with y2 < 0 here (y1(3) = 0.63 or 0.86 instead of 0.922)."""
    ref = _robertson_reference(K_ROB)
    eps = 1e-7
    d_ref = (_robertson_reference(K_ROB + [eps, 0, 0])[0] - _robertson_reference(K_ROB - [eps, 0, 0])[0]) / (2 * eps)
    k = torch.tensor(K_ROB, requires_grad=True)
    Y = odeint(robertson, torch.tensor([1.0, 0.0, 0.0]), torch.linspace(0.0, 3.0, 7), k, method=method,
               step_size=0.01)
    assert float(Y[:, 1].min()) >= 0.0  # the concentration y2 never goes negative
    assert abs(float(Y[-1, 0]) - ref[0]) <= ROB_TOL[method]
    (g,) = torch.autograd.grad(Y[-1, 0], k)
    assert abs(float(g[0]) - d_ref) <= 10 * ROB_TOL[method] * abs(d_ref)


def test_robertson_large_steps_with_substeps_and_step_size():
    k = torch.tensor(K_ROB)
    Y = odeint(robertson, torch.tensor([1.0, 0.0, 0.0]), [0.0, 3.0], k, method="radau5", substeps=10, step_size=0.1)
    assert abs(float(Y[-1, 0]) - _robertson_reference(K_ROB)[0]) < 1e-5


def _vdp(t, y, mu):
    return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], dim=-1)


def _vdp_reference(mu, T):
    f = lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]  # noqa: E731
    return scipy.integrate.solve_ivp(f, (0.0, T), [2.0, 0.0], method="Radau", rtol=1e-12, atol=1e-12).y[:, -1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_van_der_pol_mu_1000_with_every_method(method):
    T, mu0 = 100.0, 1000.0
    ref = _vdp_reference(mu0, T)
    d_ref = (_vdp_reference(mu0 + 1e-3, T)[0] - _vdp_reference(mu0 - 1e-3, T)[0]) / 2e-3
    mu = torch.tensor(mu0, requires_grad=True)
    Y = odeint(_vdp, torch.tensor([2.0, 0.0]), [0.0, T], mu, method=method, step_size=0.5)
    (g,) = torch.autograd.grad(Y[-1, 0], mu)
    tol = {"backward_euler": 1e-4, "trapezoid": 1e-6}.get(method, 1e-8)
    assert abs(float(Y[-1, 0]) - ref[0]) <= tol
    assert abs(float(g) - d_ref) <= 0.01 * abs(d_ref) if method in ("backward_euler", "trapezoid") else \
        abs(float(g) - d_ref) <= 1e-4 * abs(d_ref)


# --- what gets gradients ----------------------------------------------------------------------------------
class _Rate(torch.nn.Module):
    """A field with no Parameters of its own: its rate comes from outside (another model's output)."""

    def __init__(self, rate: torch.Tensor) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, t, y):
        return -self.rate * y


def test_a_trainable_tensor_from_outside_gets_its_gradient():
    raw = torch.tensor(0.3, requires_grad=True)
    hyper = torch.nn.Linear(1, 1)
    with torch.no_grad():
        hyper.weight.fill_(2.0)
        hyper.bias.fill_(0.1)
    rate = hyper(raw.reshape(1, 1)).reshape(())  # 0.7, produced by another model
    field = _Rate(rate)
    assert not list(field.parameters())
    Y = odeint(field, torch.tensor([1.0]), [0.0, 1.0], method="radau5", substeps=20)
    assert Y.requires_grad
    Y[-1, 0].backward()
    # y(1) = exp(-rate): d/draw = -exp(-rate) * 2, d/dw = -exp(-rate) * raw (discretisation error ~1e-9)
    assert float(raw.grad) == pytest.approx(-2 * np.exp(-0.7), rel=1e-7)
    assert float(hyper.weight.grad) == pytest.approx(-0.3 * np.exp(-0.7), rel=1e-7)


def test_a_closure_over_a_module_gets_gradients():
    lin = torch.nn.Linear(2, 2)
    y0 = torch.tensor([0.5, -0.2])
    Y = odeint(lambda t, y: torch.tanh(lin(y)), y0, [0.0, 0.5], method="radau5", substeps=5)
    Y[-1].sum().backward()
    w = lin.weight
    eps = 1e-6
    with torch.no_grad():
        w[0, 1] += eps
        up = odeint(lambda t, y: torch.tanh(lin(y)), y0, [0.0, 0.5], method="radau5", substeps=5)[-1].sum()
        w[0, 1] -= 2 * eps
        down = odeint(lambda t, y: torch.tanh(lin(y)), y0, [0.0, 0.5], method="radau5", substeps=5)[-1].sum()
        w[0, 1] += eps
    assert float(w.grad[0, 1]) == pytest.approx(float((up - down) / (2 * eps)), abs=1e-8)


def test_row_coupling_is_caught_when_the_loss_sits_at_an_intermediate_time():
    """A mean-field term couples the rows; with the loss on an intermediate time the last step's cotangent
    is zero, so a check made once at the last step passes and the gradient is silently wrong (0.2522 vs
    0.2201). Every step's solve is verified."""

    def mean_field(t, y):
        return -y + 0.5 * y.mean(dim=0, keepdim=True)

    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], requires_grad=True)
    Y = odeint(mean_field, y0, [0.0, 0.5, 1.0], method="radau3", substeps=2, batch_dims=1)
    with pytest.raises(bbd.InputError, match=re.escape("func couples the rows. Use batch_dims=0 (one system)")):
        Y[1, 0, 0].backward()


def test_gradient_with_respect_to_the_output_times():
    """y' = -k y: y(t) = exp(-k t); dL/dt_k = g_k . f(t_k, y(t_k)) for the discretised solution."""
    k = torch.tensor(0.8)
    t = torch.tensor([0.0, 0.4, 1.1], requires_grad=True)
    for grid in ({"substeps": 8}, {"step_size": 0.05}):
        Y = odeint(lambda s, y, k: -k * y, torch.tensor([2.0]), t, k, method="radau5", **grid)
        (g,) = torch.autograd.grad(Y[1, 0] + 3 * Y[2, 0], t)
        exact = torch.tensor([0.0, -0.8 * 2 * np.exp(-0.32), -3 * 0.8 * 2 * np.exp(-0.88)])
        exact[0] = -(exact[1] + exact[2])  # moving t0 shifts the whole solution
        torch.testing.assert_close(g, exact, atol=1e-7, rtol=1e-6)


def test_a_user_step_solver_that_stops_early_is_refused():
    def sloppy(F, z0):  # three damped residual iterations: leaves max|F| ~ 1e-3
        z = z0
        for _ in range(3):
            z = z - F(z)
        return z

    with pytest.raises(bbd.CertificationError, match=re.escape("does not satisfy the ODE step (radau5) condition")):
        odeint(lambda t, y: -3.0 * y, torch.tensor([1.0]), [0.0, 1.0], method="radau5", solver=sloppy, substeps=4)


def test_scipy_step_solver_accepts_an_answer_at_round_off():
    """hybr reports status 5 ('not making good progress') on y' = -k y with max|F| ~ 1e-16."""
    k = torch.tensor(0.7, requires_grad=True)
    Y = odeint(lambda t, y, k: -k * y, torch.tensor([1.0]), [0.0, 1.0], k, solver="scipy", substeps=4)
    (g,) = torch.autograd.grad(Y[-1, 0], k)
    ref = odeint(lambda t, y, k: -k * y, torch.tensor([1.0]), [0.0, 1.0], k.detach(), substeps=4)
    assert float(Y[-1, 0]) == pytest.approx(float(ref[-1, 0]), abs=1e-12)
    assert float(g) == pytest.approx(-float(ref[-1, 0]), rel=1e-6)


@pytest.mark.parametrize(
    ("func", "y0", "message"),
    [
        (lambda t, y: (-y).float(), torch.tensor([1.0]), "returned dtype torch.float32 for y of dtype torch.float64"),
        (lambda t, y: [-y[0]], torch.tensor([1.0]), "returned a list; expected a tensor"),
        (lambda t, y: -y, torch.zeros(0), "y0 is empty (shape (0,))"),
    ],
    ids=["float32", "list", "empty"],
)
def test_malformed_fields_are_input_errors(func, y0, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        odeint(func, y0, [0.0, 1.0])


# --- solutions decaying towards 0, and stage roots not connected to y_n ---------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_solution_decaying_to_1e_minus_7_is_solved_to_its_own_accuracy(method):
    # Newton used to stop at the absolute level 1e-10 (1 + max|Y|), which certification (relative to each
    # component's terms) rightly refused once y ~ 1e-7: y' = -y to t = 15 failed with the default method.
    y = odeint(lambda t, y: -y, torch.tensor([1.0]), [0.0, 15.0], method=method, step_size=0.1)
    exact = (1 / 1.1) ** 150 if method == "backward_euler" else math.exp(-15.0)  # BE: its own discrete flow
    assert abs(float(y[-1, 0]) - exact) <= {"backward_euler": 1e-8, "trapezoid": 0.02}.get(method, 1e-3) * exact


def test_gradient_of_a_fast_decay_is_the_discrete_flows_own():
    # y' = -50 y is linear: the discretised y(1) is y0 times the method's amplification, so dy(1)/dy0 = y(1)/y0
    # exactly, at ~1e-22, far below any absolute tolerance.
    y0 = torch.tensor([0.9], requires_grad=True)
    y = odeint(lambda t, y: -50 * y, y0, torch.linspace(0, 1, 5), step_size=0.05)
    (g,) = torch.autograd.grad(y[-1, 0], y0)
    assert 1e-23 < float(y[-1, 0]) < 1e-21
    assert float(g) == pytest.approx(float(y[-1, 0]) / 0.9, rel=1e-9)


def test_a_stage_root_on_the_wrong_equilibrium_is_caught_by_step_doubling():
    # y' = -50 y (y - 1)(y - 2) from 0.9 decays to 0 (1 is unstable, 2 stable). Trapezoid's stage equation at
    # h = 0.1 has a root near 2: taken, the solution ends at 1.999. Two half steps disagree with that step, so
    # it is halved until they agree.
    field = lambda t, y, k: -k * y * (y - 1) * (y - 2)  # noqa: E731
    k = torch.tensor(50.0)
    y = odeint(field, torch.tensor([0.9]), [0.0, 1.0], k, method="trapezoid", step_size=0.1)
    assert abs(float(y[-1, 0])) < 1e-6
    wrong = odeint(field, torch.tensor([0.9]), [0.0, 1.0], k, method="trapezoid", step_size=0.1, step_check="none")
    assert float(wrong[-1, 0]) > 1.9  # what the residual checks alone accept
