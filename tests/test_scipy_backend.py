"""The scipy backend: bbd conditions solved by scipy.optimize, against closed forms and finite differences."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

import blackbox_diff as bbd

pytest.importorskip("blackbox_diff_scipy")
from blackbox_diff_scipy import ScipyBackend  # noqa: E402


def fd_jacobian(fn, w: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of a numpy black box fn(w) -> array."""
    cols = [(np.asarray(fn(w + h * e)) - np.asarray(fn(w - h * e))) / (2 * h) for e in np.eye(w.size)]
    return np.stack(cols, axis=-1)


# --- the seed examples, closed forms ----------------------------------------------------------------------
def test_root_of_square_batched():
    layer = bbd.layer(bbd.Root(lambda x, w: x**2 - w), backend="scipy", x0=np.array(1.0), parameters=[()])
    w = torch.tensor([4.0, 9.0, 2.0], requires_grad=True)
    x = layer(w)
    np.testing.assert_allclose(x.detach().numpy(), np.sqrt([4.0, 9.0, 2.0]), rtol=1e-13)
    x.sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), 1 / (2 * np.sqrt([4.0, 9.0, 2.0])), rtol=1e-12)


def test_argmin_of_sine():
    layer = bbd.layer(bbd.Argmin(lambda x, w: torch.sin(x * w)), backend="scipy", x0=np.array(0.0))
    w = torch.tensor(2.0, requires_grad=True)
    x = layer(w)
    assert x.item() == pytest.approx(-math.pi / 4, abs=1e-10)
    x.backward()
    assert w.grad.item() == pytest.approx(math.pi / (2 * 2.0**2), abs=1e-9)


@pytest.mark.parametrize("method", ["SLSQP", "trust-constr"])
def test_constrained_seed_example(method):
    kkt = bbd.KKT(lambda x, w: (x * w).sum(), ineq=lambda x, w: x**2 - 1)
    layer = bbd.layer(kkt, backend="scipy", x0=np.array([0.5]), method=method, return_duals=True)
    w = torch.tensor(2.0, requires_grad=True)
    sol = layer(w)
    assert sol.x.item() == pytest.approx(-1.0, abs=1e-10)
    assert sol.ineq.item() == pytest.approx(1.0, abs=1e-8)
    (dx,) = torch.autograd.grad(sol.x.sum(), w, retain_graph=True)
    (dlam,) = torch.autograd.grad(sol.ineq.sum(), w)
    assert dx.item() == pytest.approx(0.0, abs=1e-12)
    assert dlam.item() == pytest.approx(0.5, abs=1e-8)


def test_fixed_point_matches_dense_ift():
    layer = bbd.layer(bbd.FixedPoint(lambda x, w: w * torch.cos(x)), backend="scipy", x0=np.zeros(2),
                      parameters=[(2,)])
    w = torch.tensor([0.5, 0.7], requires_grad=True)
    x = layer(w)
    np.testing.assert_allclose(x.detach().numpy(), w.detach().numpy() * np.cos(x.detach().numpy()), atol=1e-12)
    x.sum().backward()
    xs = x.detach().numpy()
    # x = w cos x  =>  dx/dw = cos x / (1 + w sin x), componentwise
    np.testing.assert_allclose(w.grad.numpy(), np.cos(xs) / (1 + w.detach().numpy() * np.sin(xs)), rtol=1e-8)


# --- every minimize method, one strongly convex problem ---------------------------------------------------
A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]])


def quartic(x, w):
    return 0.5 * x @ A @ x - w @ x + 0.1 * (x**4).sum()


@pytest.mark.parametrize(
    "method", ["BFGS", "L-BFGS-B", "Newton-CG", "CG", "trust-ncg", "trust-exact"]
)
def test_minimize_methods_match_finite_differences(method):
    layer = bbd.layer(bbd.Argmin(quartic), backend="scipy", x0=np.zeros(3), method=method, parameters=[(3,)])
    w0 = np.array([1.0, -0.5, 2.0])
    w = torch.tensor(w0, requires_grad=True)
    x = layer(w)
    J = torch.autograd.functional.jacobian(layer, w)
    # Line-search methods stop at |grad f| ~ 1e-9 (f's own rounding), so the black box is accurate to ~1e-9
    # and its finite differences need a large step; the closed form checks the IFT gradient tightly.
    fd = fd_jacobian(lambda v: layer.compiled.solve(v), w0, h=1e-3)
    np.testing.assert_allclose(J.numpy(), fd, atol=1e-5)
    H = torch.func.hessian(quartic)(x.detach(), w.detach())
    np.testing.assert_allclose(J.numpy(), torch.linalg.inv(H).numpy(), atol=1e-8)  # dx/dw = H^-1


@pytest.mark.parametrize("method", ["hybr", "lm", "krylov", "df-sane"])
def test_root_methods_agree(method):
    def F(x, w):
        return x + 0.5 * torch.tanh(x) - w

    layer = bbd.layer(bbd.Root(F), backend="scipy", x0=np.zeros(3), method=method, parameters=[(3,)])
    w = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    x = layer(w)
    x.sum().backward()
    xs = x.detach()
    np.testing.assert_allclose(w.grad.numpy(), (1 / (1 + 0.5 / torch.cosh(xs) ** 2)).numpy(), rtol=1e-9)


# --- bounds: an active bound has a zero gradient --------------------------------------------------------------
def test_lbfgsb_active_bound_has_zero_gradient():
    f = bbd.Argmin(lambda x, w: ((x - w) ** 2).sum() + 0.5 * x[0] * x[1])
    layer = bbd.layer(f, backend="scipy", x0=np.zeros(3), bounds=(0.0, 1.0), parameters=[(3,)])
    assert layer.compiled.solve.method == "L-BFGS-B"
    w0 = np.array([0.5, 2.0, 0.3])
    w = torch.tensor(w0, requires_grad=True)
    x = layer(w)
    assert x[1].item() == 1.0  # held at its upper bound
    J = torch.autograd.functional.jacobian(layer, w).numpy()
    np.testing.assert_array_equal(J[1], np.zeros(3))  # the active component does not move
    np.testing.assert_allclose(J, fd_jacobian(lambda v: layer.compiled.solve(v), w0, h=1e-3), atol=1e-5)
    # free components: x0 = w0 - x1/4 with x1 = 1 fixed, x2 = w2
    np.testing.assert_allclose(J[[0, 2]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], atol=1e-9)


def _box_qp(n_trial: int):
    """Q, theta with the unbounded minimiser of 1/2 x'Qx - theta'x at x1 = 1e-10 (bound x >= 0 inactive)."""
    rng = np.random.default_rng(0)
    for _ in range(n_trial + 1):
        A = rng.normal(size=(3, 3))
        Q = A @ A.T + 3 * np.eye(3)
        xstar = np.r_[1e-10, rng.uniform(0.5, 2, 2)]
    return Q, Q @ xstar


def _exact_box_qp(Q: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """min 1/2 x'Qx - theta'x s.t. x >= 0 by enumerating the active sets: exact to round-off."""
    import itertools

    for held in itertools.chain.from_iterable(itertools.combinations(range(3), k) for k in range(4)):
        free = [i for i in range(3) if i not in held]
        x = np.zeros(3)
        x[free] = np.linalg.solve(Q[np.ix_(free, free)], theta[free]) if free else []
        lam = Q @ x - theta
        if np.all(x[free] >= 0) and np.all(lam[list(held)] >= 0):
            return x
    raise AssertionError("no KKT point")


def _box_layer(Q: np.ndarray, method: str):
    Qt = torch.tensor(Q)
    f = bbd.Argmin(lambda x, th: 0.5 * x @ Qt @ x - th @ x)
    return bbd.layer(f, backend="scipy", x0=np.ones(3), bounds=(0.0, None), method=method, parameters=[(3,)])


def test_bound_within_tolerance_of_an_inactive_optimum_gets_the_unbounded_derivative():
    # x1* = 1e-10 > 0: the bound is inactive and the derivative is the unbounded problem's, Q^-1. L-BFGS-B
    # stops at x1 = 6.5e-10 with d f/d x1 = 1.2e-9 > x1, which the projection residual alone took for an
    # active bound: a one-sided Jacobian off by 0.30, silently. Now the bound is weakly active (warned,
    # as bbd.KKT warns) and the answer, strictly inside the box, is differentiated as free.
    Q, theta0 = _box_qp(0)
    layer = _box_layer(Q, "L-BFGS-B")
    theta = torch.tensor(theta0)
    with pytest.warns(RuntimeWarning, match=re.escape("scipy backend: bounds on entries [0] are weakly active")):
        x = layer(theta)
        J = torch.autograd.functional.jacobian(layer, theta).numpy()
    assert 0.0 < x[0].item() < 1e-8
    # central differences of an exact re-solve, with a step small enough not to cross the kink at 1e-10
    fd = fd_jacobian(lambda th: _exact_box_qp(Q, th), theta0, h=2e-11)
    np.testing.assert_allclose(J, fd, atol=1e-4)
    np.testing.assert_allclose(J, np.linalg.inv(Q), atol=1e-12)
    # the same problem as a KKT: the same warning family
    kkt = bbd.KKT(lambda x, th: 0.5 * x @ torch.tensor(Q) @ x - th @ x, ineq=lambda x, th: -x)
    with pytest.warns(RuntimeWarning, match=re.escape("inequality constraints [0] are weakly active")):
        bbd.layer(kkt, backend="scipy", x0=np.ones(3))(theta)


def test_weakly_active_bound_the_answer_sits_on_is_held_and_warned():
    # TNC returns x1 = 0 exactly with the gradient pushing outward (5.6e-9): the answer says "active";
    # the gradient is the one-sided derivative that keeps x1 = 0, and the warning says so.
    Q, theta0 = _box_qp(5)
    layer = _box_layer(Q, "TNC")
    theta = torch.tensor(theta0)
    message = ("the one-sided derivatives of the answer's active set, weakly active bounds [] held, [0] free "
               "differ; the gradient returned is that of the answer's active set")
    with pytest.warns(RuntimeWarning, match=re.escape(message)):
        x = layer(theta)
        J = torch.autograd.functional.jacobian(layer, theta).numpy()
    assert x[0].item() == 0.0
    held = np.zeros((3, 3))
    held[1:, 1:] = np.linalg.inv(Q[1:, 1:])
    np.testing.assert_allclose(J, held, atol=1e-12)


def test_clearly_active_and_inactive_bounds_are_not_warned():
    Q, _ = _box_qp(0)
    theta0 = Q @ np.array([0.5, 1.0, 0.8]) + np.array([0.0, 0.0, 0.0])
    theta0[0] = Q[0, 1:] @ np.array([1.0, 0.8]) - 2.0  # pushes x1 below its bound: active, multiplier 2
    layer = _box_layer(Q, "L-BFGS-B")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = layer(torch.tensor(theta0))
        J = torch.autograd.functional.jacobian(layer, torch.tensor(theta0)).numpy()
    np.testing.assert_allclose(x.numpy(), _exact_box_qp(Q, theta0), atol=1e-6)
    np.testing.assert_allclose(J, fd_jacobian(lambda th: _exact_box_qp(Q, th), theta0, h=1e-6), atol=1e-6)


# --- KKT: SLSQP and trust-constr agree ------------------------------------------------------------------------
def kkt_problem() -> bbd.KKT:
    Q = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 1.5]])
    return bbd.KKT(
        lambda x, w: 0.5 * (x - w) @ Q @ (x - w) + 0.05 * (x**4).sum(),
        eq=lambda x, w: (x.sum() - 1.0).reshape(1),
        ineq=lambda x, w: torch.stack([x[0] ** 2 + x[1] ** 2 - 0.5, x[2] - 0.9]),
    )


def test_slsqp_and_trust_constr_give_the_same_gradients():
    w0 = torch.tensor([1.2, 0.8, -0.4])
    jacs = {}
    for method in ("SLSQP", "trust-constr"):
        layer = bbd.layer(kkt_problem(), backend="scipy", x0=np.array([0.3, 0.3, 0.3]), method=method,
                          return_duals=True)

        def outputs(w, layer=layer):
            sol = layer(w)
            return torch.cat([sol.x, sol.eq, sol.ineq])

        jacs[method] = (outputs(w0).detach(), torch.autograd.functional.jacobian(outputs, w0))
    (v1, J1), (v2, J2) = jacs["SLSQP"], jacs["trust-constr"]
    assert v1[4].item() > 0.1 and v2[5].item() == 0.0  # first inequality active, second inactive
    np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-7)
    np.testing.assert_allclose(J1.numpy(), J2.numpy(), atol=1e-6)


def test_trust_constr_multiplier_signs_follow_our_convention():
    """scipy's res.v is read as L = f + v^T (h, g); check it on problems with known multipliers."""
    # min x^2 s.t. x - 1 = 0: 2x + nu = 0 => nu = -2.   min x*w s.t. x^2 - 1 <= 0 at w=2: lam = +1.
    eq = bbd.KKT(lambda x: (x**2).sum(), eq=lambda x: x - 1.0)
    ineq = bbd.KKT(lambda x, w: (x * w).sum(), ineq=lambda x, w: x**2 - 1)
    for problem, params, field, expected in ((eq, (), "eq", -2.0), (ineq, (np.array(2.0),), "ineq", 1.0)):
        for polish in (False, True):
            compiled = ScipyBackend().compile(problem, None, None, {"x0": np.array([0.5]), "method": "trust-constr",
                                                                   "polish": polish})
            sol = compiled.solve(*params)
            assert getattr(sol, field)[0] == pytest.approx(expected, rel=1e-4 if not polish else 1e-12)


# --- starts, warm starts, failures ----------------------------------------------------------------------------
def test_per_instance_x0_selects_the_local_minimum():
    # sin(x*w) has minima at -pi/(2w) and 3pi/(2w); start each instance near a different one
    layer = bbd.layer(bbd.Argmin(lambda x, w: torch.sin(x * w)), backend="scipy", parameters=[()],
                      x0=lambda w: np.array(-0.5 if w < 1.5 else 2.0))
    w = torch.tensor([1.0, 2.0])
    np.testing.assert_allclose(layer(w).numpy(), [-math.pi / 2, 3 * math.pi / 4], rtol=1e-10)


def test_warm_start_reuses_the_previous_solution():
    calls = []

    def f(x, w):
        calls.append(1)
        return ((x - w) ** 2).sum() + (x**4).sum()

    cold = bbd.layer(bbd.Argmin(f), backend="scipy", x0=np.zeros(2), parameters=[(2,)])
    warm = bbd.layer(bbd.Argmin(f), backend="scipy", x0=np.zeros(2), parameters=[(2,)], warm_start=True)
    w = np.array([1.0, 2.0])
    counts = {}
    for name, layer in (("cold", cold), ("warm", warm)):
        layer.compiled.solve(w)
        calls.clear()
        layer.compiled.solve(w)
        counts[name] = len(calls)
    assert counts["warm"] < counts["cold"]
    np.testing.assert_allclose(warm.compiled.solve._last, cold.compiled.solve(w), atol=1e-9)


def test_solver_failure_names_scipy_message_and_batch_index():
    layer = bbd.layer(bbd.Root(lambda x, w: x**2 - w), backend="scipy", x0=np.array(1.0), parameters=[()])
    w = torch.tensor([4.0, -1.0, 9.0])
    with pytest.raises(bbd.SolverError, match=re.escape("scipy root (method='hybr') failed: ")) as info:
        layer(w)
    assert info.value.batch_index == 1
    assert "(batch index 1)" in str(info.value)
    assert info.value.backend == "scipy"


def test_solver_failure_with_nan_keeps_the_rest():
    layer = bbd.layer(bbd.Root(lambda x, w: x**2 - w), backend="scipy", x0=np.array(1.0), parameters=[()],
                      on_failure="nan")
    w = torch.tensor([4.0, -1.0, 9.0], requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("scipy root (method='hybr') failed")):
        x = layer(w)
    assert torch.isnan(x[1])
    x[[0, 2]].sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), [0.25, 0.0, 1 / 6], rtol=1e-12)


def test_fixed_point_failure_is_a_solver_error():
    layer = bbd.layer(bbd.FixedPoint(lambda x, w: w * torch.cos(x)), backend="scipy", x0=np.zeros(1), maxiter=2)
    with pytest.raises(bbd.SolverError, match=re.escape("scipy fixed_point (method='del2') failed: Failed to "
                                                        "converge after 2 iterations")):
        layer(torch.tensor(0.5))


def test_minimize_failure_is_a_solver_error():
    rosen = bbd.Argmin(lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2)
    layer = bbd.layer(rosen, backend="scipy", x0=np.array([-1.2, 1.0]), maxiter=3)
    with pytest.raises(bbd.SolverError, match=re.escape("scipy minimize (method='BFGS') failed: Maximum number "
                                                        "of iterations has been exceeded. (status 1)")):
        layer()


@pytest.mark.parametrize(
    ("problem", "options", "message"),
    [
        (bbd.Root(lambda x, w: x - w), {"x0": np.zeros(1), "method": "BFGS"},
         "scipy backend: method 'BFGS' is not supported for Root; expected one of ('hybr', 'lm', "),
        (bbd.Root(lambda x, w: x - w), {"x0": np.zeros(1), "bounds": (0, 1)},
         "scipy backend: bounds= applies to bbd.Argmin only; for Root state the bounds in the problem"),
        (bbd.Root(lambda x, w: x - w), {},
         "The scipy backend needs a starting point: pass x0=array (or a callable x0(*params) for "),
        (bbd.Argmin(lambda x: (x**2).sum()), {"x0": np.zeros(2), "bounds": (1.0, 0.0)},
         "scipy backend: bounds have lb > ub at indices [0, 1]."),
        (bbd.Argmin(lambda x: (x**2).sum()), {"x0": np.zeros(2), "bounds": 3},
         "scipy backend: bounds must be a pair (lb, ub) of floats or arrays broadcastable"),
        (bbd.Argmin(lambda x: (x**2).sum()), {"x0": np.zeros(2), "tol": -1.0},
         "Invalid options for ScipyOptions: option 'tol': Input should be greater than 0"),
        (bbd.Argmin(lambda x: (x**2).sum()), {"x0": np.zeros(2), "variables": [(3,)]},
         "scipy backend: x0 has shape (2,) but variables declares (3,); make them agree."),
        (bbd.Argmin(lambda x: (x**2).sum()), {"x0": np.zeros(2), "variables": [(2,), (1,)]},
         "The scipy backend solves for one unknown; variables declares 2 shapes. Stack them into one vector."),
    ],
    ids=["method", "bounds-kind", "no-x0", "lb>ub", "bounds-shape", "tol", "x0-shape", "two-variables"],
)
def test_option_errors(problem, options, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.layer(problem, backend="scipy", **options)


def test_declared_parameter_shapes_are_checked():
    layer = bbd.layer(bbd.Argmin(quartic), backend="scipy", x0=np.zeros(3), parameters=[(3,)])
    with pytest.raises(bbd.InputError, match=re.escape("Parameter 0 has shape (2,); declared shape (3,)")):
        layer(torch.zeros(2))
    with pytest.raises(bbd.InputError, match=re.escape("parameters[0] = 'a' is not a shape; expected a tuple")):
        bbd.layer(bbd.Argmin(quartic), backend="scipy", x0=np.zeros(3), parameters=["a"])


def test_variables_declare_the_unknown_and_return_a_tuple():
    layer = bbd.layer(bbd.Argmin(quartic), backend="scipy", parameters=[(3,)], variables=[(3,)])  # x0 = zeros
    (x,) = layer(torch.tensor([1.0, -0.5, 2.0]))
    assert x.shape == (3,)
    assert torch.func.grad(quartic)(x, torch.tensor([1.0, -0.5, 2.0])).abs().max() < 1e-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parameters_keep_their_device():
    layer = bbd.layer(bbd.Argmin(lambda x, w: ((x - w) ** 2).sum()), backend="scipy", x0=np.zeros(2),
                      bounds=(0.0, 1.0), parameters=[(2,)])
    w = torch.tensor([[0.5, 2.0], [0.25, -1.0]], device="cuda", requires_grad=True)
    x = layer(w)
    assert x.device == w.device
    x.sum().backward()
    np.testing.assert_allclose(w.grad.cpu().numpy(), [[1.0, 0.0], [1.0, 0.0]], atol=1e-12)


def test_layers_run_under_no_grad_and_pass_check_gradients():
    # scipy is fed autograd gradients of f: they must be available inside a caller's torch.no_grad().
    layer = bbd.layer(bbd.Argmin(lambda x, t: ((x - t) ** 2).sum() + 0.1 * (x**4).sum()), backend="scipy",
                      x0=np.zeros(2))
    t = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        x = layer(t)
    assert not x.requires_grad
    torch.testing.assert_close(x, layer(t).detach(), atol=1e-8, rtol=0)
    report = bbd.check_gradients(layer, t)
    assert report.ok, report
