"""The worked examples of the seed documents, as exact tests (float64, to 1e-8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

import blackbox_diff as bbd


# --- Zimmermann lecture: root finder as a black box ---------------------------------------------
@bbd.implicit(bbd.Root(lambda x, w: x**2 - w))
def legacy_sqrt(w):
    return scipy.optimize.brentq(lambda x: x * x - w, 0.0, 1e6, xtol=1e-15)


@bbd.implicit(bbd.Root(lambda x, w: x**2 - w))
def legacy_negative_sqrt(w):
    return scipy.optimize.brentq(lambda x: x * x - w, -1e6, 0.0, xtol=1e-15)


def test_root_of_square_gives_one_over_two_x():
    w = torch.tensor(4.0, requires_grad=True)
    x = legacy_sqrt(w)
    x.backward()
    assert x.item() == pytest.approx(2.0, abs=1e-12)
    assert w.grad.item() == pytest.approx(0.25, abs=1e-8)


def test_root_of_square_at_the_negative_root():
    w = torch.tensor(4.0, requires_grad=True)
    x = legacy_negative_sqrt(w)
    x.backward()
    assert x.item() == pytest.approx(-2.0, abs=1e-12)
    assert w.grad.item() == pytest.approx(-0.25, abs=1e-8)


def test_root_of_sine_has_derivative_minus_one():
    @bbd.implicit(bbd.Root(lambda x, w: torch.sin(x + w)))
    def solve(w):
        return scipy.optimize.brentq(lambda x: math.sin(x + w), -w - 1.0, -w + 1.0, xtol=1e-15)

    w = torch.tensor(0.7, requires_grad=True)
    x = solve(w)
    x.backward()
    assert x.item() == pytest.approx(-0.7, abs=1e-12)
    assert w.grad.item() == pytest.approx(-1.0, abs=1e-8)


def test_linear_system_gradients_match_the_lecture():
    @bbd.implicit(bbd.Root(lambda x, A, b: A @ x - b))
    def solve(A, b):
        return np.linalg.solve(A, b)

    b = torch.tensor([1.0, 0.0])
    expected = {0: [0.0, 0.0, 0.0, -0.25], 1: [0.0, -0.25, 0.0, -0.25]}
    for k, want in expected.items():
        A = torch.tensor([[2.0, -2.0], [-2.0, 0.0]], requires_grad=True)
        x = solve(A, b)
        torch.testing.assert_close(x, torch.tensor([0.0, -0.5]), atol=1e-12, rtol=0)
        (grad,) = torch.autograd.grad(x[k], A)
        torch.testing.assert_close(grad.reshape(4), torch.tensor(want), atol=1e-8, rtol=0)


# --- Zimmermann lecture: unconstrained optimiser (25 gradient steps) ----------------------------
def test_argmin_of_sine_by_25_gradient_steps():
    @bbd.implicit(bbd.Argmin(lambda x, w: torch.sin(x * w)), residual_tol=1e-3)
    def gradient_descent(w):
        x = 0.0
        for _ in range(25):
            x -= 0.1 * w * math.cos(x * w)
        return x

    w = torch.tensor(2.0, requires_grad=True)
    x = gradient_descent(w)
    x.backward()
    xs, ws = x.item(), 2.0
    # The lecture's closed form, evaluated at the black box's answer.
    closed = -(-math.sin(ws * xs) * ws * xs + math.cos(ws * xs)) / (-math.sin(ws * xs) * ws**2)
    assert w.grad.item() == pytest.approx(closed, abs=1e-8)
    assert round(w.grad.item(), 4) == 0.3927


# --- Zimmermann lecture: constrained optimiser ------------------------------------------------
KKT_SEED = bbd.KKT(lambda x, w: x * w, ineq=lambda x, w: x**2 - 1)


@pytest.mark.parametrize("duals", ["given", "recovered"])
def test_constrained_example_primal_and_dual_derivatives(duals):
    @bbd.implicit(KKT_SEED, return_duals=True)
    def solve(w):
        x = -1.0  # argmin of x*w on [-1, 1] for w > 0
        return bbd.KKTSolution(x=x, ineq=[w / 2]) if duals == "given" else x

    w = torch.tensor(2.0, requires_grad=True)
    sol = solve(w)
    assert sol.x.item() == pytest.approx(-1.0)
    assert sol.ineq.item() == pytest.approx(1.0, abs=1e-10)
    (dx,) = torch.autograd.grad(sol.x, w, retain_graph=True)
    (dlam,) = torch.autograd.grad(sol.ineq.sum(), w)
    assert dx.item() == pytest.approx(0.0, abs=1e-8)
    assert dlam.item() == pytest.approx(0.5, abs=1e-8)


# --- NeurIPS tutorial: fixed-point layer z = tanh(Wz + x) ------------------------------------
def test_tanh_fixed_point_layer_matches_the_closed_form():
    torch.manual_seed(0)
    n = 6
    W = 0.3 * torch.randn(n, n) / math.sqrt(n)

    @bbd.implicit(bbd.FixedPoint(lambda z, W, x: torch.tanh(W @ z + x)))
    def iterate(W, x):
        z = np.zeros_like(x)
        for _ in range(500):
            z = np.tanh(W @ z + x)
        return z

    x = torch.randn(n, requires_grad=True)
    Wp = W.clone().requires_grad_(True)
    z = iterate(Wp, x)
    J = torch.autograd.functional.jacobian(lambda x_: iterate(W, x_), x)
    D = torch.diag(1 - z.detach() ** 2)
    closed = torch.linalg.solve(torch.eye(n) - D @ W, D)
    torch.testing.assert_close(J, closed, atol=1e-10, rtol=0)
    # Gradient w.r.t. W as well: dz/dW_ij = (I - D W)^{-1} D e_i z_j.
    (gW,) = torch.autograd.grad(z.sum(), Wp)
    v = torch.linalg.solve((torch.eye(n) - D @ W).T, torch.ones(n))
    torch.testing.assert_close(gW, torch.outer(D @ v, z.detach()), atol=1e-10, rtol=0)
