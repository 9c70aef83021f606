"""The autograd contract (DESIGN 2.7): every differentiable output supports reverse mode, forward mode,
higher order and the torch.func transforms with the right numbers, or says clearly what it does not.

Each case has a closed form or central finite differences of the black box; each is a case where the
easy implementation (black box outside the autograd.Function, detached z*, a once-differentiable
backward) silently returns zeros or a wrong second derivative.
"""

from __future__ import annotations

import re
import warnings

import casadi as ca
import cvxpy as cp
import numpy as np
import pytest
import scipy.optimize
import torch
import torch.autograd.forward_ad as fwAD

import blackbox_diff as bbd
from blackbox_diff.deq import DEQ
from blackbox_diff.ode import odeint

torch.set_default_dtype(torch.float64)


def _cubic_root(w):
    """x with x^3 + x = w, per entry (a legacy scalar root finder)."""
    w = np.asarray(w, dtype=float)
    roots = [scipy.optimize.brentq(lambda x, wi=wi: x**3 + x - wi, -1e3, 1e3, xtol=1e-15) for wi in w.reshape(-1)]
    return np.array(roots).reshape(w.shape)


SQRT = bbd.implicit(bbd.Root(lambda x, w: x**2 - w))(np.sqrt)
CUBIC = bbd.implicit(bbd.Root(lambda x, w: x**3 + x - w))(_cubic_root)
W49 = torch.tensor([4.0, 9.0])


def _cubic_derivatives(x):
    d1 = 1.0 / (3 * x**2 + 1)
    return d1, -6 * x * d1**3


# --- the table of issue 12, row by row ---------------------------------------------------------
def test_functional_jvp_of_a_legacy_sqrt():
    _, tangent = torch.autograd.functional.jvp(SQRT, W49, torch.ones(2))
    torch.testing.assert_close(tangent, 0.5 / W49.sqrt())


def test_hvp_and_hessian_of_sum_sqrt():
    f = lambda w: SQRT(w).sum()  # noqa: E731
    exact = -0.25 * W49**-1.5
    _, hvp = torch.autograd.functional.hvp(f, W49, torch.ones(2))
    torch.testing.assert_close(hvp, exact)
    torch.testing.assert_close(torch.autograd.functional.hessian(f, W49), torch.diag(exact))


def test_forward_ad_dual_numbers():
    with fwAD.dual_level():
        out = SQRT(fwAD.make_dual(W49, torch.ones(2)))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, 0.5 / W49.sqrt())


def test_double_backward_of_abs_through_x2_equals_w2():
    """x = |w| solves x^2 = w^2; x'' = 0 (the easy implementation, differentiating F at a detached z*,
    returns 0.5)."""
    f = bbd.implicit(bbd.Root(lambda x, w: x**2 - w**2))(np.abs)
    w = torch.tensor(3.0, requires_grad=True)
    (g,) = torch.autograd.grad(f(w), w, create_graph=True)
    (h,) = torch.autograd.grad(g, w)
    assert float(g.detach()) == pytest.approx(1.0, abs=1e-12) and float(h) == pytest.approx(0.0, abs=1e-12)


def test_cubic_first_and_second_derivative():
    w = torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(CUBIC(w), w, create_graph=True)
    (h,) = torch.autograd.grad(g, w)
    assert float(g.detach()) == pytest.approx(0.25, abs=1e-12) and float(h) == pytest.approx(-0.09375, abs=1e-12)
    # third order too: x''' = -6 x'^4 - 18 x x'^2 x''
    w3 = torch.tensor(2.0, requires_grad=True)
    (g1,) = torch.autograd.grad(CUBIC(w3), w3, create_graph=True)
    (g2,) = torch.autograd.grad(g1, w3, create_graph=True)
    (g3,) = torch.autograd.grad(g2, w3)
    assert float(g3) == pytest.approx(-6 / 256 - 18 * (1 / 16) * -0.09375, abs=1e-10)


@pytest.mark.parametrize(
    "transform",
    ["grad", "vjp", "jacrev", "jacfwd", "hessian", "jacrev_jacrev", "vmap", "vmap_grad", "grad_vmap_sum"],
)
def test_torch_func_transforms(transform):
    w = torch.tensor([2.0, 10.0])
    x = torch.from_numpy(_cubic_root(w.numpy()))
    d1, d2 = _cubic_derivatives(x)
    total = lambda w: CUBIC(w).sum()  # noqa: E731
    if transform == "grad":
        torch.testing.assert_close(torch.func.grad(total)(w), d1)
    elif transform == "vjp":
        _, fn = torch.func.vjp(CUBIC, w)
        torch.testing.assert_close(fn(torch.tensor([1.0, -2.0]))[0], d1 * torch.tensor([1.0, -2.0]))
    elif transform == "jacrev":
        torch.testing.assert_close(torch.func.jacrev(CUBIC)(w), torch.diag(d1))
    elif transform == "jacfwd":
        torch.testing.assert_close(torch.func.jacfwd(CUBIC)(w), torch.diag(d1))
    elif transform == "hessian":
        torch.testing.assert_close(torch.func.hessian(total)(w), torch.diag(d2))
    elif transform == "jacrev_jacrev":
        torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(total))(w), torch.diag(d2))
    elif transform == "vmap":
        batch = torch.stack([w, w + 1.0])
        expected = torch.from_numpy(_cubic_root(batch.numpy()))
        torch.testing.assert_close(torch.func.vmap(CUBIC)(batch), expected)
    elif transform == "vmap_grad":
        got = torch.func.vmap(torch.func.grad(total))(torch.stack([w, 2 * w]))
        x2 = torch.from_numpy(_cubic_root((2 * w).numpy()))
        torch.testing.assert_close(got, torch.stack([d1, _cubic_derivatives(x2)[0]]))
    else:
        torch.testing.assert_close(torch.func.grad(lambda w: torch.func.vmap(CUBIC)(w).sum())(w[:, None]),
                                   d1[:, None])


def test_vmap_runs_the_black_box_one_instance_at_a_time():
    seen = []

    def solve(w):
        seen.append(np.shape(w))
        return np.sqrt(w)

    f = bbd.implicit(bbd.Root(lambda x, w: x**2 - w))(solve)
    out = torch.func.vmap(f)(torch.tensor([[1.0, 4.0], [9.0, 16.0], [25.0, 36.0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert seen == [(2,), (2,), (2,)]


def test_vmap_over_the_engines_own_batch_folds_both_batch_dimensions():
    f = bbd.implicit(bbd.Root(lambda x, w, s: x**2 - s * w), in_dims=(0, None))(lambda w, s: np.sqrt(s * w))
    w = torch.tensor([[1.0, 4.0], [9.0, 16.0]])
    s = torch.tensor([1.0, 4.0])
    out = torch.func.vmap(f, in_dims=(None, 0))(w, s)  # (2 scales, 2 instances, 2)
    torch.testing.assert_close(out, torch.stack([w.sqrt(), (4 * w).sqrt()]))
    jac = torch.func.jacrev(lambda s: torch.func.vmap(f, in_dims=(None, 0))(w, s).sum())(s)
    torch.testing.assert_close(jac, torch.stack([(0.5 * w / (si * w).sqrt()).sum() for si in s]))


def test_torch_compile_of_a_model_with_a_layer_matches_eager():
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, w):
            return CUBIC(torch.nn.functional.softplus(self.lin(w)) + 0.5).sum()

    model = Model()
    w = torch.tensor([2.0, 10.0])
    eager = model(w)
    eager.backward()
    g_eager = model.lin.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model)
    value = compiled(w)
    value.backward()
    assert float(value) == pytest.approx(float(eager), abs=1e-12)
    torch.testing.assert_close(model.lin.weight.grad, g_eager)


def test_black_box_that_clips_its_input_in_place_never_reaches_the_caller():
    def legacy(w):
        np.clip(w, 0.0, 5.0, out=w)  # legacy code that edits its argument
        return np.sqrt(w)

    w = torch.tensor([4.0, 9.0], requires_grad=True)
    f = bbd.implicit(bbd.Root(lambda x, w: x**2 - w))(legacy)
    # The answer sqrt(5) is not a root at the caller's w = 9: refused, and the caller's tensor is intact.
    with pytest.raises(bbd.CertificationError, match=re.escape("does not satisfy the Root condition")):
        f(w)
    assert w.detach().tolist() == [4.0, 9.0]
    w2 = torch.tensor([4.0, 1.0], requires_grad=True)
    x = f(w2)
    x.sum().backward()
    assert w2.detach().tolist() == [4.0, 1.0]
    torch.testing.assert_close(w2.grad, torch.tensor([0.25, 0.5]))


def test_parameter_changed_in_place_between_forward_and_backward_raises():
    w = torch.tensor(4.0, requires_grad=True)
    x = SQRT(w)
    with torch.no_grad():
        w.add_(5.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_cotangent_gives_non_finite_gradient_without_singular_warning(bad):
    w = torch.tensor([4.0, 9.0], requires_grad=True)
    batched = bbd.implicit(bbd.Root(lambda x, w: x**2 - w), in_dims=0)(np.sqrt)
    x = batched(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(x, w, torch.tensor([bad, 1.0]))
    assert not bool(torch.isfinite(g[0])) and float(g[1]) == pytest.approx(1 / 6)  # instance 1 unaffected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(SQRT(w), w, torch.tensor([bad, 1.0]))  # one instance: all of it
    assert not bool(torch.isfinite(g).any())


# --- every condition type, second order ----------------------------------------------------------
def test_fixed_point_second_derivative():
    """x = cos(x) + w: x' = 1/(1 + sin x), x'' = -cos(x) x'^3."""

    def solve(w):
        return scipy.optimize.brentq(lambda x: x - np.cos(x) - w, -10, 10, xtol=1e-15)

    f = bbd.implicit(bbd.FixedPoint(lambda x, w: torch.cos(x) + w))(solve)
    w = torch.tensor(0.3, requires_grad=True)
    x = f(w)
    (g,) = torch.autograd.grad(x, w, create_graph=True)
    (h,) = torch.autograd.grad(g, w)
    xd = float(x)
    d1 = 1 / (1 + np.sin(xd))
    assert float(g) == pytest.approx(d1, rel=1e-10) and float(h) == pytest.approx(-np.cos(xd) * d1**3, rel=1e-9)


def test_argmin_forward_mode_and_hessian():
    """argmin_x sum(cosh(x - w)) + sum(x^4)/4, solved by scipy; compared with central differences of the
    black box."""

    def f(x, w):
        return torch.cosh(x - w).sum() + 0.25 * (x**4).sum()

    def solve(w):  # Newton on the gradient: accurate to round-off, so that differences of it are exact
        return scipy.optimize.fsolve(lambda x: np.sinh(x - w) + x**3, np.zeros_like(w),
                                     fprime=lambda x: np.diag(np.cosh(x - w) + 3 * x**2), xtol=1e-14)

    fn = bbd.implicit(bbd.Argmin(f))(solve)
    w = torch.tensor([0.3, -0.7])
    t = torch.tensor([1.0, 0.5])
    _, jv = torch.autograd.functional.jvp(fn, w, t)
    eps = 1e-6
    fd = (torch.from_numpy(solve((w + eps * t).numpy())) - torch.from_numpy(solve((w - eps * t).numpy()))) / (2 * eps)
    torch.testing.assert_close(jv, fd, atol=1e-7, rtol=0)
    loss = lambda w: (fn(w) ** 3).sum()  # noqa: E731
    H = torch.autograd.functional.hessian(loss, w)
    Hfd = _fd_hessian(loss, w)
    torch.testing.assert_close(H, Hfd, atol=1e-6, rtol=0)


def _fd_hessian(loss, w, eps=1e-5):
    def grad(v):
        v = v.clone().requires_grad_(True)
        return torch.autograd.grad(loss(v), v)[0]

    cols = []
    for i in range(w.numel()):
        e = torch.zeros_like(w)
        e.view(-1)[i] = eps
        cols.append(((grad(w + e) - grad(w - e)) / (2 * eps)).reshape(-1))
    return torch.stack(cols, dim=1).reshape(*w.shape, *w.shape)


def test_kkt_second_derivative_against_differences_of_the_first():
    """min |x - w|^2 + sum x^4 s.t. sum(x) = 1, x0 >= 0.2 (active for these w); the black box returns x only,
    the multipliers are recovered."""

    def solve(w):  # x0 = 0.2 active, x1 + x2 = 0.8: solved to round-off by Newton, returns x only
        def F(v):
            x1, x2, nu = v
            return [2 * (x1 - w[1]) + 4 * x1**3 + nu, 2 * (x2 - w[2]) + 4 * x2**3 + nu, x1 + x2 - 0.8]

        v = scipy.optimize.fsolve(F, [0.4, 0.4, 0.0], xtol=1e-14)
        return np.array([0.2, v[0], v[1]])

    cond = bbd.KKT(lambda x, w: ((x - w) ** 2).sum() + (x**4).sum(), eq=lambda x, w: x.sum() - 1.0,
                   ineq=lambda x, w: 0.2 - x[:1])
    fn = bbd.implicit(cond)(solve)
    w = torch.tensor([-0.5, 0.8, 0.3])
    assert abs(float(fn(w)[0]) - 0.2) < 1e-9  # the inequality is active
    loss = lambda w: (fn(w) ** 3).sum()  # noqa: E731
    H = torch.autograd.functional.hessian(loss, w)
    torch.testing.assert_close(H, _fd_hessian(loss, w), atol=2e-6, rtol=0)
    _, jv = torch.autograd.functional.jvp(fn, w, torch.tensor([1.0, -1.0, 0.5]))
    eps = 1e-6
    t = np.array([1.0, -1.0, 0.5])
    fd = (solve(w.numpy() + eps * t) - solve(w.numpy() - eps * t)) / (2 * eps)
    np.testing.assert_allclose(jv.numpy(), fd, atol=1e-6)


# --- layers ------------------------------------------------------------------------------------------
def test_cvxpy_layer_jvp_and_second_order():
    """Projection on x <= 1 at q = (0.5, 2): x = (0.5, 1), dx/dq = diag(1, 0)."""
    x = cp.Variable(2)
    q = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - q)), [x <= 1])
    layer = bbd.layer(prob, parameters=[q], variables=[x])
    qt = torch.tensor([0.5, 2.0])
    _, jv = torch.autograd.functional.jvp(lambda q: layer(q)[0], qt, torch.ones(2))
    torch.testing.assert_close(jv, torch.tensor([1.0, 0.0]), atol=1e-7, rtol=0)
    H = torch.autograd.functional.hessian(lambda q: (layer(q)[0] ** 2).sum(), qt)
    torch.testing.assert_close(H, torch.diag(torch.tensor([2.0, 0.0])), atol=1e-6, rtol=0)


def _casadi_identity_layer():
    opti = ca.Opti()
    y = opti.variable(2)
    q = opti.parameter(2)
    opti.minimize(ca.sumsqr(y - q))
    opti.solver("ipopt", {"print_time": False}, {"print_level": 0, "tol": 1e-12})
    return bbd.layer(opti, parameters=[q], variables=[y])


def test_casadi_layer_jvp():
    layer = _casadi_identity_layer()
    _, jv = torch.autograd.functional.jvp(lambda q: layer(q)[0], torch.tensor([0.3, -1.0]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(jv, torch.tensor([1.0, 2.0]), atol=1e-9, rtol=0)


def test_casadi_layer_second_order_raises_clearly():
    layer = _casadi_identity_layer()
    q = torch.tensor([0.3, -1.0], requires_grad=True)
    (g,) = torch.autograd.grad((layer(q)[0] ** 2).sum(), q, create_graph=True)
    torch.testing.assert_close(g, 2 * q.detach())
    with pytest.raises(bbd.BlackBoxDiffError, match=re.escape("Second derivatives through the CasADi KKT condition")):
        torch.autograd.grad(g.sum(), q)


def test_scipy_backend_layer_jvp_and_hessian():
    fit = bbd.layer(bbd.Argmin(lambda x, w: ((x - w) ** 2).sum() + (x**4).sum()), backend="scipy",
                    x0=np.zeros(2), method="BFGS", tol=1e-14)
    w = torch.tensor([0.4, -0.2])
    first = lambda w: fit(w)[0] if isinstance(fit(w), tuple) else fit(w)  # noqa: E731
    _, jv = torch.autograd.functional.jvp(first, w, torch.tensor([1.0, 0.0]))
    eps = 1e-6
    fd = (first(w + torch.tensor([eps, 0.0])) - first(w - torch.tensor([eps, 0.0]))) / (2 * eps)
    torch.testing.assert_close(jv, fd, atol=1e-7, rtol=0)
    loss = lambda w: (first(w) ** 3).sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.hessian(loss, w), _fd_hessian(loss, w), atol=1e-5, rtol=0)


class _Tanh(torch.nn.Module):
    def __init__(self, d, scale, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(scale * torch.randn(d, d, generator=g) / d**0.5)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def test_deq_hessian_in_x_and_second_order_in_its_weights():
    f = _Tanh(4, 0.7)
    layer = DEQ(f, tol=1e-13, max_iter=500)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    loss = lambda x: (layer(x) ** 2).sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.hessian(loss, x), _fd_hessian(loss, x), atol=1e-6, rtol=0)
    # MAML-style: d/dW of a gradient in W (the weights are lifted into the autograd core)
    W0 = f.W.detach().clone()

    def grad_norm(W):
        with torch.no_grad():
            f.W.copy_(W)
        xx = x.clone()
        (g,) = torch.autograd.grad(loss(xx), f.W)
        return (g**2).sum()

    (gW,) = torch.autograd.grad(loss(x), f.W, create_graph=True)
    (meta,) = torch.autograd.grad((gW**2).sum(), f.W)
    eps = 1e-6
    E = torch.zeros_like(W0)
    E[1, 2] = eps
    fd = (grad_norm(W0 + E) - grad_norm(W0 - E)) / (2 * eps)
    with torch.no_grad():
        f.W.copy_(W0)
    assert float(meta[1, 2]) == pytest.approx(float(fd), abs=1e-6)


def test_deq_jvp_and_jacrev_in_x():
    layer = DEQ(_Tanh(4, 0.7), tol=1e-13, max_iter=500)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    t = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    _, jv = torch.autograd.functional.jvp(layer, x, t)
    eps = 1e-6
    torch.testing.assert_close(jv, (layer(x + eps * t) - layer(x - eps * t)) / (2 * eps), atol=1e-8, rtol=0)
    J = torch.func.jacrev(layer)(x)
    torch.testing.assert_close(torch.einsum("bdce,ce->bd", J, t), jv, atol=1e-10, rtol=0)


def _vdp(t, y, mu):
    return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], dim=-1)


def test_odeint_hessian_and_forward_mode():
    y0 = torch.tensor([1.0, 0.5])

    def loss(p):
        Y = odeint(_vdp, p[:2], [0.0, 0.5, 1.0], p[2], method="radau5", substeps=3, newton_tol=1e-13)
        return (Y[-1] ** 2).sum() + Y[1, 0]

    p = torch.cat([y0, torch.tensor([0.8])])
    torch.testing.assert_close(torch.autograd.functional.hessian(loss, p), _fd_hessian(loss, p, eps=1e-4),
                               atol=1e-6, rtol=1e-6)
    _, jv = torch.autograd.functional.jvp(loss, p, torch.tensor([1.0, 0.0, 2.0]))
    eps = 1e-6
    fd = (loss(p + eps * torch.tensor([1.0, 0.0, 2.0])) - loss(p - eps * torch.tensor([1.0, 0.0, 2.0]))) / (2 * eps)
    assert float(jv) == pytest.approx(float(fd), abs=1e-7)


def test_odeint_jacrev_of_the_final_state():
    mu = torch.tensor(0.8)
    J = torch.func.jacrev(lambda y0: odeint(_vdp, y0, [0.0, 1.0], mu, method="radau3", substeps=4)[-1])(
        torch.tensor([1.0, 0.5]))
    eps = 1e-6
    for i in range(2):
        e = torch.zeros(2)
        e[i] = eps
        fd = (odeint(_vdp, torch.tensor([1.0, 0.5]) + e, [0.0, 1.0], mu, method="radau3", substeps=4)[-1]
              - odeint(_vdp, torch.tensor([1.0, 0.5]) - e, [0.0, 1.0], mu, method="radau3", substeps=4)[-1]) / (2 * eps)
        torch.testing.assert_close(J[:, i], fd, atol=1e-7, rtol=0)


def test_executable_black_box_forward_mode(tmp_path):
    """A compiled program (Python here, as a separate process) as the black box: jvp and second order."""
    import sys

    program = tmp_path / "cubic.py"
    program.write_text(
        "import json, sys\n"
        "from scipy.optimize import brentq\n"
        "w = json.load(open(sys.argv[1]))['parameters'][0]\n"
        "w = w[0] if isinstance(w, list) else w\n"
        "json.dump([brentq(lambda x: x**3 + x - w, -100, 100, xtol=1e-15)], open(sys.argv[2], 'w'))\n"
    )
    exe = bbd.Executable([sys.executable, str(program), "{input}", "{output}"], io="json", timeout=60)
    fn = bbd.implicit(bbd.Root(lambda x, w: x**3 + x - w))(exe)
    w = torch.tensor(2.0)
    _, jv = torch.autograd.functional.jvp(fn, w, torch.tensor(1.0))
    assert float(jv) == pytest.approx(0.25, abs=1e-12)
    wg = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(wg), wg, create_graph=True)
    (h,) = torch.autograd.grad(g, wg)
    assert float(h) == pytest.approx(-0.09375, abs=1e-10)


# --- solve_ivp_layer: first derivatives from scipy's own sensitivities -------------------------------------
def _decay(t, y, k):
    return -k * y


def test_solve_ivp_layer_forward_mode_reverse_transforms_and_clear_second_order_errors():
    from blackbox_diff.ode import solve_ivp_layer

    k, y0, t = torch.tensor(0.8), torch.tensor([2.0]), torch.tensor([0.0, 0.5, 1.0])
    tight = {"rtol": 1e-11, "atol": 1e-13}
    d_k = -t * 2 * torch.exp(-0.8 * t)  # y = 2 exp(-k t)
    with fwAD.dual_level():
        out = solve_ivp_layer(_decay, y0, t, fwAD.make_dual(k, torch.tensor(1.0)), **tight)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent.reshape(-1), d_k, atol=1e-8, rtol=0)
    with fwAD.dual_level():
        out = solve_ivp_layer(_decay, y0, fwAD.make_dual(t, torch.tensor([0.0, 1.0, 1.0])), k, **tight)
        d_t = torch.tensor([0.0, -1.6 * np.exp(-0.4), -1.6 * np.exp(-0.8)])
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent.reshape(-1), d_t, atol=1e-8, rtol=0)
    _, jv = torch.autograd.functional.jvp(lambda k: solve_ivp_layer(_decay, y0, t, k, **tight), k, torch.tensor(1.0))
    torch.testing.assert_close(jv.reshape(-1), d_k, atol=1e-8, rtol=0)
    torch.testing.assert_close(torch.func.jacrev(lambda k: solve_ivp_layer(_decay, y0, t, k, **tight))(k).reshape(-1),
                               d_k, atol=1e-8, rtol=0)
    assert float(torch.func.grad(lambda k: solve_ivp_layer(_decay, y0, t, k, **tight)[-1, 0])(k)) == pytest.approx(
        float(d_k[-1]), abs=1e-8)
    kk = k.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(solve_ivp_layer(_decay, y0, t, kk, **tight)[-1, 0], kk, create_graph=True)
    with pytest.raises(bbd.BlackBoxDiffError, match=re.escape("solve_ivp_layer: second derivatives are not supported")):
        torch.autograd.grad(g, kk)
    with fwAD.dual_level(), pytest.raises(bbd.BlackBoxDiffError, match=re.escape("pass sensitivity='forward'")):
        solve_ivp_layer(_decay, y0, t, fwAD.make_dual(k, torch.tensor(1.0)), sensitivity="adjoint")
    with pytest.raises(bbd.BlackBoxDiffError, match=re.escape("under torch.func.vmap")):
        torch.func.jacrev(lambda k: solve_ivp_layer(_decay, y0, t, k, sensitivity="adjoint"))(k)


def test_forward_mode_and_a_backward_on_the_same_output_share_the_forward_graph():
    # The JVP reuses the graph of F the forward kept for a backward, and leaves it for that backward.
    fn = bbd.implicit(bbd.Root(lambda x, w: x**2 - w), in_dims=0)(np.sqrt)
    w = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
    with fwAD.dual_level():
        x = fn(fwAD.make_dual(w, torch.tensor([1.0, 2.0], dtype=torch.float64)))
        tangent = fwAD.unpack_dual(x).tangent
        x.sum().backward()
    torch.testing.assert_close(tangent, torch.tensor([0.25, 2 / 6], dtype=torch.float64))
    torch.testing.assert_close(w.grad, torch.tensor([0.25, 1 / 6], dtype=torch.float64))
