"""`solve_ivp_layer`: gradients reach captured weights and the output times, blow-ups end, bad fields are
named. Every gradient is compared with a closed form or with central differences of a tight scipy
reference (DOP853, rtol 1e-13)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

from blackbox_diff import InputError, SolverError
from blackbox_diff.ode import solve_ivp_layer

SENSITIVITIES = ["forward", "adjoint"]
TIGHT = {"rtol": 1e-11, "atol": 1e-12}


def _reference(f, y0, t):
    """y at the times t from scipy's DOP853 at rtol 1e-13 (numpy field f(t, y))."""
    sol = scipy.integrate.solve_ivp(f, (t[0], t[-1]), y0, t_eval=t, method="DOP853", rtol=1e-13, atol=1e-13)
    return sol.y.T


def _central(fun, x0, eps=1e-6):
    x0 = np.asarray(x0, dtype=np.float64)
    out = np.zeros(x0.shape)
    for i in np.ndindex(x0.shape):
        e = np.zeros(x0.shape)
        e[i] = eps
        out[i] = (fun(x0 + e) - fun(x0 - e)) / (2 * eps)
    return out


# --- gradients reach tensors the field captures ---------------------------------------------------
@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_weights_captured_by_a_closure_get_the_closed_form_gradient(sensitivity):
    # y' = W y + b with lin = Linear(2, 2) used through a lambda: y(T) = e^{WT} y0 + W^-1 (e^{WT} - I) b.
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2)
    y0 = np.array([1.0, -0.5])
    T = 1.0
    Y = solve_ivp_layer(lambda t, y: lin(y), torch.tensor(y0), [0.0, 0.5, T], sensitivity=sensitivity, **TIGHT)
    Y[-1].sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None

    def closed(W, b):
        E = scipy.linalg.expm(W * T)
        return (E @ y0 + np.linalg.solve(W, (E - np.eye(2)) @ b)).sum()

    W0, b0 = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    np.testing.assert_allclose(lin.weight.grad.numpy(), _central(lambda W: closed(W, b0), W0), rtol=1e-7)
    np.testing.assert_allclose(lin.bias.grad.numpy(), _central(lambda b: closed(W0, b), b0), rtol=1e-7)


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_nonlinear_closure_and_explicit_parameter_together(sensitivity):
    torch.manual_seed(1)
    lin = torch.nn.Linear(2, 2)
    k = torch.tensor(0.8, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5])
    t = [0.0, 0.7, 1.5]
    Y = solve_ivp_layer(lambda t, y, k: torch.tanh(lin(y)) - k * y, y0, t, k, sensitivity=sensitivity, **TIGHT)
    (Y[1] * torch.tensor([1.0, -2.0]) + Y[2]).sum().backward()
    W0, b0 = lin.weight.detach().numpy(), lin.bias.detach().numpy()

    def loss(W, b, kk):
        R = _reference(lambda t, y: np.tanh(W @ y + b) - kk * y, y0.numpy(), t)
        return (R[1] * np.array([1.0, -2.0]) + R[2]).sum()

    np.testing.assert_allclose(lin.weight.grad.numpy(), _central(lambda W: loss(W, b0, 0.8), W0), rtol=1e-6)
    np.testing.assert_allclose(lin.bias.grad.numpy(), _central(lambda b: loss(W0, b, 0.8), b0), rtol=1e-6)
    np.testing.assert_allclose(k.grad.item(), _central(lambda kk: loss(W0, b0, kk), 0.8), rtol=1e-6)


class _Decay(torch.nn.Module):
    """A module with no Parameters of its own: its rate comes from outside (another model's output)."""

    def __init__(self, rate: torch.Tensor) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, t, y):
        return -self.rate * y


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_module_without_parameters_using_a_hypernetwork_output(sensitivity):
    # rate = hyper(z) is a non-leaf tensor; y(T) = y0 e^{-rate T}, so dL/drate = -T sum(y0) e^{-rate T}.
    torch.manual_seed(2)
    hyper = torch.nn.Linear(1, 1)
    z = torch.tensor([0.3], requires_grad=True)
    rate = hyper(z).reshape(())
    field = _Decay(rate)
    assert not list(field.parameters())
    y0 = torch.tensor([1.0, 2.0])
    T = 1.5
    Y = solve_ivp_layer(field, y0, [0.0, T], sensitivity=sensitivity, **TIGHT)
    Y[-1].sum().backward()
    dL_drate = -T * 3.0 * np.exp(-rate.item() * T)
    np.testing.assert_allclose(z.grad.item(), dL_drate * hyper.weight.item(), rtol=1e-8)
    np.testing.assert_allclose(hyper.weight.grad.item(), dL_drate * 0.3, rtol=1e-8)
    np.testing.assert_allclose(hyper.bias.grad.item(), dL_drate, rtol=1e-8)


def test_captured_weight_changed_in_place_before_backward_is_refused():
    w = torch.tensor(0.5, requires_grad=True)
    Y = solve_ivp_layer(lambda t, y: -w * y, torch.tensor([1.0]), [0.0, 1.0])
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        Y.sum().backward()


def test_no_grad_call_captures_nothing_and_matches():
    w = torch.tensor(0.5, requires_grad=True)
    with torch.no_grad():
        Y = solve_ivp_layer(lambda t, y: -w * y, torch.tensor([1.0]), [0.0, 1.0], **TIGHT)
    assert not Y.requires_grad
    np.testing.assert_allclose(Y[-1].item(), np.exp(-0.5), rtol=1e-9)


# --- gradients with respect to the output times ------------------------------------------------------
@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_time_gradient_matches_central_differences_of_a_tight_reference(sensitivity):
    t = torch.tensor([0.1, 0.5, 1.3], requires_grad=True)
    y0 = np.array([1.0, -0.5])
    f = lambda t, y, k: torch.stack([y[1], -k * y[0] + 0.3 * torch.sin(t)])  # noqa: E731
    W = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-1.0, 0.5]])  # a loss on every output, t_0's included
    Y = solve_ivp_layer(f, torch.tensor(y0), t, torch.tensor(0.7), sensitivity=sensitivity, **TIGHT)
    (W * Y).sum().backward()

    def loss(times):
        R = _reference(lambda t, y: [y[1], -0.7 * y[0] + 0.3 * np.sin(t)], y0, times)
        return (W.numpy() * R).sum()

    np.testing.assert_allclose(t.grad.numpy(), _central(loss, t.detach().numpy()), rtol=1e-6, atol=1e-9)


def test_time_gradient_closed_form_for_exponential_decay():
    # y(t1) = y0 e^{-k (t1 - t0)}: dy1/dt1 = -k y1, dy1/dt0 = +k y1.
    k, t = 0.6, torch.tensor([0.2, 1.7], requires_grad=True)
    Y = solve_ivp_layer(lambda t, y: -k * y, torch.tensor([2.0]), t, **TIGHT)
    Y[-1].sum().backward()
    y1 = 2.0 * np.exp(-k * 1.5)
    np.testing.assert_allclose(t.grad.numpy(), [k * y1, -k * y1], rtol=1e-8)


# --- blow-ups, step caps and time limits end in a SolverError ----------------------------------------
def test_finite_time_blow_up_with_default_lsoda_is_a_solver_error():
    # y' = y^2, y(0) = 1 blows up at t = 1; scipy's LSODA steps forever there with a zero step size.
    with pytest.raises(SolverError, match=re.escape("solve_ivp_layer (LSODA): the step size fell to zero at t = 1")):
        solve_ivp_layer(lambda t, y: y**2, torch.tensor([1.0]), [0.0, 2.0])


def test_max_steps_caps_the_integration():
    with pytest.raises(SolverError, match=re.escape("solve_ivp_layer (RK45): max_steps=5 steps taken")) as info:
        solve_ivp_layer(lambda t, y: -y, torch.tensor([1.0]), [0.0, 10.0], method="RK45", max_steps=5)
    assert info.value.status == "max_steps"
    Y = solve_ivp_layer(lambda t, y: -y, torch.tensor([1.0]), [0.0, 10.0], method="RK45", max_steps=10_000)
    np.testing.assert_allclose(Y[-1].item(), np.exp(-10.0), rtol=1e-5)


def test_timeout_ends_a_slow_integration():
    def slow(t, y):
        time.sleep(0.02)
        return -y

    with pytest.raises(SolverError, match=re.escape("solve_ivp_layer (RK45): timeout=0.05 s exceeded")) as info:
        solve_ivp_layer(slow, torch.tensor([1.0]), [0.0, 100.0], method="RK45", timeout=0.05)
    assert info.value.status == "timeout"


def test_field_failing_during_the_integration_is_a_solver_error():
    def field(t, y):
        if t > 0.5:
            raise ValueError("table lookup out of range")
        return -y

    with pytest.raises(SolverError, match=re.escape("func raised ValueError at t = ")):
        solve_ivp_layer(field, torch.tensor([1.0]), [0.0, 1.0], method="RK45")


# --- malformed fields and inputs are InputErrors ------------------------------------------------------
@pytest.mark.parametrize(
    ("func", "message"),
    [
        (lambda t, y: (-y).float(), "func returned a torch.float32 tensor; the integration runs in float64"),
        (lambda t, y: [-y[0], -y[1]], "func must return dy/dt as a torch tensor; it returned list"),
        (lambda t, y: -y[:1], "func returned shape (1,); expected 2 values (shape (2,))"),
        (lambda t, y: torch.nn.Linear(2, 2).float()(y), "func(t0, y0, *params) raised RuntimeError"),
        (lambda t, y: y.nonexistent, "func(t0, y0, *params) raised AttributeError"),
        (lambda t, y: y / 0.0, "func(t0, y0, *params) is not finite"),
    ],
    ids=["float32", "list", "wrong-shape", "float32-module", "attribute-error", "inf"],
)
def test_malformed_fields_are_input_errors(func, message):
    with pytest.raises(InputError, match=re.escape(message)):
        solve_ivp_layer(func, torch.tensor([1.0, 2.0]), [0.0, 1.0])


@pytest.mark.parametrize(
    ("y0", "kwargs", "message"),
    [
        (torch.zeros(0), {}, "solve_ivp_layer: y0 is empty; the state needs at least one entry."),
        (torch.tensor([float("nan")]), {}, "solve_ivp_layer: y0 contains NaN or Inf."),
        (torch.ones(1), {"method": "Euler"}, "method must be one of ('RK23', 'RK45', 'DOP853', 'Radau', 'BDF',"),
        (torch.ones(1), {"rtol": 0.0}, "solve_ivp_layer: rtol must be a positive number; got 0.0."),
        (torch.ones(1), {"max_steps": 0}, "max_steps must be a positive integer or None; got 0."),
        (torch.ones(1), {"timeout": -1.0}, "timeout must be a positive number of seconds or None; got -1.0."),
    ],
    ids=["empty", "nan", "method", "rtol", "max_steps", "timeout"],
)
def test_malformed_inputs_are_input_errors(y0, kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        solve_ivp_layer(lambda t, y: -y, y0, [0.0, 1.0], **kwargs)
