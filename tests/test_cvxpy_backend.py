"""The cvxpy backend: bbd.layer(problem, parameters=[...], variables=[...]) for cvxpy problems.

Gradients are checked against cvxpylayers (README and tutorial problems), central finite differences of
the black box itself with a tight solver tolerance, and closed forms (projections onto boxes).
"""

from __future__ import annotations

import re

import cvxpy as cp
import numpy as np
import pytest
import torch

import blackbox_diff as bbd

# cvxpylayers 1.2 (the reference) trips numpy 2's __array__ deprecation inside its diffcp interface.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

TIGHT = {"eps": 1e-10}


def _t(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def _fd(fn, params, h=1e-6):
    """Central differences of sum(w * fn(*params)) for a fixed random weight w, per parameter."""
    base = [p.detach().clone() for p in params]
    out = fn(*base)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    grads = []
    for i, p in enumerate(base):
        g = torch.zeros_like(p)
        flat = g.view(-1)
        for k in range(p.numel()):
            up = [q.clone() for q in base]
            dn = [q.clone() for q in base]
            up[i].view(-1)[k] += h
            dn[i].view(-1)[k] -= h
            flat[k] = ((w * fn(*up)).sum() - (w * fn(*dn)).sum()) / (2 * h)
        grads.append(g)
    return w, grads


def _check_fd(layer, params, rtol=1e-5, atol=1e-6, h=1e-6):
    """Implicit gradient of sum(w * x) against central differences of the same (tight) layer."""
    with torch.no_grad():
        w, fd = _fd(lambda *p: layer(*p)[0], params, h)
    (x,) = layer(*params)
    grads = torch.autograd.grad((w * x).sum(), params)
    for g, f in zip(grads, fd, strict=True):
        torch.testing.assert_close(g, f, rtol=rtol, atol=atol)
    return x, grads


# --- cvxpylayers parity -----------------------------------------------------------------------------------


def _readme_problem():
    n, m = 2, 3
    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    constraints = [x >= 0]
    objective = cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1))
    problem = cp.Problem(objective, constraints)
    assert problem.is_dpp()
    return problem, A, b, x


def _cvxpylayers_grads(problem, params, variables, values, solver_args=None):
    from cvxpylayers.torch import CvxpyLayer

    ref = CvxpyLayer(problem, parameters=params, variables=variables)
    vals = [v.detach().clone().requires_grad_(True) for v in values]
    (sol,) = ref(*vals, solver_args=solver_args or {"solve_method": "Clarabel"})
    sol.sum().backward()
    return sol.detach(), [v.grad for v in vals]


def test_cvxpylayers_readme_problem_same_gradients():
    problem, A, b, x = _readme_problem()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    assert isinstance(layer, torch.nn.Module)
    torch.manual_seed(0)
    A_t = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b_t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (solution,) = layer(A_t, b_t)
    solution.sum().backward()
    ref_sol, (ref_A, ref_b) = _cvxpylayers_grads(problem, [A, b], [x], [A_t, b_t])
    torch.testing.assert_close(solution.detach(), ref_sol, atol=1e-6, rtol=0)
    torch.testing.assert_close(A_t.grad, ref_A, atol=1e-5, rtol=0)
    torch.testing.assert_close(b_t.grad, ref_b, atol=1e-5, rtol=0)


def test_seed_tutorial_example_batched_same_gradients_as_cvxpylayers():
    # The NeurIPS 2020 "Deep Implicit Layers" tutorial's cvxpylayers snippet, run on a batch of 8.
    problem, A, b, x = _readme_problem()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    torch.manual_seed(3)
    A_tch = torch.randn(8, 3, 2, dtype=torch.float64, requires_grad=True)
    b_tch = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    (solution,) = layer(A_tch, b_tch)
    solution.sum().backward()
    ref_sol, (ref_A, ref_b) = _cvxpylayers_grads(problem, [A, b], [x], [A_tch, b_tch])
    assert solution.shape == (8, 2)
    torch.testing.assert_close(solution.detach(), ref_sol, atol=1e-6, rtol=0)
    torch.testing.assert_close(A_tch.grad, ref_A, atol=1e-5, rtol=0)
    torch.testing.assert_close(b_tch.grad, ref_b, atol=1e-5, rtol=0)


# --- problem classes against finite differences --------------------------------------------------------


def test_lp_gradient_matches_finite_differences():
    # min c^T x s.t. G x <= h, x >= -1: a vertex solution, dx/dh from the active rows.
    rng = np.random.default_rng(0)
    n, m = 3, 6
    x = cp.Variable(n)
    c, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(c @ x), [G @ x <= h, x >= -1])
    layer = bbd.layer(problem, parameters=[c, G, h], variables=[x], **TIGHT)
    params = [_t(rng.uniform(0.5, 1.0, n)), _t(rng.standard_normal((m, n))), _t(rng.uniform(1, 2, m))]
    x_t, grads = _check_fd(layer, params)
    assert float(grads[0].abs().max()) < 1e-9  # a vertex does not move with the cost


def _qp(n=5, m=6, p=2, seed=0):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    P = M @ M.T / n + 0.5 * np.eye(n)
    x = cp.Variable(n)
    q, G, h, A, b = (cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((p, n)),
                     cp.Parameter(p))
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x), [G @ x <= h, A @ x == b])
    x0 = rng.standard_normal(n)
    Gv = rng.standard_normal((m, n))
    Av = rng.standard_normal((p, n))
    values = [rng.standard_normal(n) * 3, Gv, Gv @ x0 + rng.uniform(0.0, 1.0, m), Av, Av @ x0]
    return problem, [q, G, h, A, b], x, [_t(v) for v in values]


def test_qp_gradient_matches_finite_differences():
    problem, params, x, values = _qp()
    layer = bbd.layer(problem, parameters=params, variables=[x], **TIGHT)
    x_t, _ = _check_fd(layer, values)
    x_ref = _solve_ref(problem, params, values, x)
    torch.testing.assert_close(x_t.detach(), x_ref, atol=1e-7, rtol=0)


def _solve_ref(problem, params, values, x):
    for p, v in zip(params, values, strict=True):
        p.value = v.detach().numpy()
    problem.solve(solver="CLARABEL")
    return torch.as_tensor(x.value)


def test_socp_gradient_matches_finite_differences():
    # min ||A x - b||_2 + c^T x s.t. ||x||_2 <= r: two second-order cones.
    rng = np.random.default_rng(1)
    x = cp.Variable(3)
    A, b, c, r = cp.Parameter((4, 3)), cp.Parameter(4), cp.Parameter(3), cp.Parameter()
    problem = cp.Problem(cp.Minimize(cp.norm(A @ x - b, 2) + c @ x), [cp.norm(x, 2) <= r])
    layer = bbd.layer(problem, parameters=[A, b, c, r], variables=[x])
    params = [_t(rng.standard_normal((4, 3))), _t(rng.standard_normal(4)), _t(rng.standard_normal(3)),
              _t(0.8)]
    x_t, _ = _check_fd(layer, params, rtol=1e-4, atol=1e-5)
    assert float(torch.linalg.norm(x_t.detach())) == pytest.approx(0.8, abs=1e-7)  # the norm ball is active


def test_sdp_gradient_matches_finite_differences():
    # min <C, X> s.t. X PSD, trace(X) = 1, X symmetric: X* is the projector on the least eigenvector.
    rng = np.random.default_rng(2)
    X = cp.Variable((3, 3))
    C = cp.Parameter((3, 3))
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.5 * cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1, X == X.T])
    layer = bbd.layer(problem, parameters=[C], variables=[X], **TIGHT)
    M = rng.standard_normal((3, 3))
    Cv = _t(M + M.T)
    X_t, _ = _check_fd(layer, [Cv], rtol=1e-4, atol=1e-5)
    assert float(torch.trace(X_t.detach())) == pytest.approx(1.0, abs=1e-8)
    assert float(torch.linalg.eigvalsh(0.5 * (X_t + X_t.T)).detach().min()) > -1e-8


@pytest.mark.parametrize("solver", ["CLARABEL", "SCS"])
def test_exponential_cone_matches_closed_form(solver):
    # min sum(exp(x)) - a^T x: x* = log(a), dx*/da = diag(1/a).
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.exp(x)) - a @ x))
    layer = bbd.layer(problem, parameters=[a], variables=[x], solver=solver)
    a_t = _t([2.0, 0.5])
    (x_t,) = layer(a_t)
    torch.testing.assert_close(x_t.detach(), torch.log(a_t.detach()), atol=1e-8, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], a_t)
    torch.testing.assert_close(jac, torch.diag(1 / a_t.detach()), atol=1e-8, rtol=0)


def test_entropy_problem_gives_the_softmax_jacobian():
    # min c^T y - entropy(y) s.t. sum(y) = 1: y* = softmax(-c), dy*/dc = -(diag(y) - y y^T).
    y = cp.Variable(3)
    c = cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(c @ y - cp.sum(cp.entr(y))), [cp.sum(y) == 1])
    layer = bbd.layer(problem, parameters=[c], variables=[y])
    c_t = _t([0.3, -0.2, 1.0])
    p = torch.softmax(-c_t.detach(), 0)
    (y_t,) = layer(c_t)
    torch.testing.assert_close(y_t.detach(), p, atol=1e-8, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], c_t)
    torch.testing.assert_close(jac, -(torch.diag(p) - torch.outer(p, p)), atol=1e-8, rtol=0)


def test_exponential_cone_with_ecos_is_refused():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.exp(x)) - a @ x))
    message = "differentiates exponential cones with CLARABEL or SCS, not ECOS"
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.layer(problem, parameters=[a], variables=[x], solver="ECOS")


# --- closed forms: projections onto a box, strongly / weakly / barely active --------------------------------


def _box():
    n = 6
    x = cp.Variable(n)
    p, u = cp.Parameter(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - p)), [x <= u])
    return problem, p, u, x


def test_barely_active_constraints_give_exact_gradients():
    # x = min(p, u): rows with p - u = +-1e-4 are barely active / barely inactive. An interior-point answer
    # has slack and multiplier both ~1e-4 there; the active set must still be identified correctly.
    problem, p, u, x = _box()
    layer = bbd.layer(problem, parameters=[p, u], variables=[x])
    u_t = _t(np.ones(6))
    gap = np.array([1e-4, -1e-4, 2e-4, -2e-4, 0.5, -0.5])
    p_t = _t(1.0 + gap)
    (x_t,) = layer(p_t, u_t)
    torch.testing.assert_close(x_t.detach(), torch.minimum(p_t, u_t).detach(), atol=1e-12, rtol=0)
    jac_p = torch.autograd.functional.jacobian(lambda q: layer(q, u_t)[0], p_t)
    jac_u = torch.autograd.functional.jacobian(lambda v: layer(p_t, v)[0], u_t)
    active = torch.as_tensor(gap > 0, dtype=torch.float64)
    torch.testing.assert_close(jac_p, torch.diag(1 - active), atol=1e-10, rtol=0)
    torch.testing.assert_close(jac_u, torch.diag(active), atol=1e-10, rtol=0)


def test_barely_active_batch_with_scs_gives_exact_gradients():
    problem, p, u, x = _box()
    layer = bbd.layer(problem, parameters=[p, u], variables=[x], solver="SCS")
    rng = np.random.default_rng(4)
    gaps = rng.choice([-1e-4, 1e-4, -0.3, 0.3], size=(5, 6))
    p_t = _t(1.0 + gaps)
    u_t = _t(np.ones(6))
    (x_t,) = layer(p_t, u_t)
    x_t.sum().backward()
    active = torch.as_tensor(gaps > 0, dtype=torch.float64)
    torch.testing.assert_close(p_t.grad, 1 - active, atol=1e-8, rtol=0)
    torch.testing.assert_close(u_t.grad, active.sum(0), atol=1e-8, rtol=0)


def test_weakly_active_constraint_warns_and_keeps_it_active():
    problem, p, u, x = _box()
    layer = bbd.layer(problem, parameters=[p, u], variables=[x])
    p_t = _t([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    u_t = _t(np.ones(6))
    with pytest.warns(RuntimeWarning, match=re.escape("weakly active")):
        (x_t,) = layer(p_t, u_t)
    x_t.sum().backward()
    torch.testing.assert_close(p_t.grad, _t([0.0, 1, 0, 1, 0, 0], grad=False), atol=1e-8, rtol=0)


# --- solvers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["SCS", "ECOS", "OSQP"])
def test_other_solvers_give_clarabels_gradient(solver):
    problem, params, x, values = _qp(seed=5)
    ref = bbd.layer(problem, parameters=params, variables=[x])
    other = bbd.layer(problem, parameters=params, variables=[x], solver=solver)
    grads = []
    for layer in (ref, other):
        (x_t,) = layer(*values)
        grads.append(torch.autograd.grad(x_t.sum(), values))
    for g_ref, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)


def test_solver_args_reach_the_solver():
    problem, params, x, values = _qp(seed=6)
    layer = bbd.layer(problem, parameters=params, variables=[x], solver_args={"max_iter": 1})
    message = "did not solve the problem (status 'user_limit', CLARABEL: 'MaxIterations')"
    with pytest.raises(bbd.SolverError, match=re.escape(message)):
        layer(*values)


def test_unknown_solver_is_rejected():
    problem, p, u, x = _box()
    with pytest.raises(bbd.InputError, match=re.escape("solver 'GUROBI' is not supported; expected one of")):
        bbd.layer(problem, parameters=[p, u], variables=[x], solver="GUROBI")


# --- batching -----------------------------------------------------------------------------------------------


def test_batched_unbatched_and_broadcast_parameters_agree():
    problem, params, x, values = _qp(seed=7)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    B = 3
    rng = np.random.default_rng(8)
    q_batch = _t(values[0].detach().numpy() + 0.3 * rng.standard_normal((B, values[0].numel())))
    shared = [v.detach().clone().requires_grad_(True) for v in values[1:]]
    (x_b,) = layer(q_batch, *shared)
    assert x_b.shape == (B, values[0].numel())
    x_b.sum().backward()
    grads_shared = [s.grad.clone() for s in shared]
    summed = [torch.zeros_like(s) for s in shared]
    for i in range(B):
        q_i = q_batch[i].detach().clone().requires_grad_(True)
        single = [v.detach().clone().requires_grad_(True) for v in values[1:]]
        (x_i,) = layer(q_i, *single)
        torch.testing.assert_close(x_i.detach(), x_b[i].detach(), atol=1e-10, rtol=0)
        x_i.sum().backward()
        torch.testing.assert_close(q_i.grad, q_batch.grad[i], atol=1e-9, rtol=0)
        for acc, s in zip(summed, single, strict=True):
            acc += s.grad
    for g, ref in zip(grads_shared, summed, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-9, rtol=0)


def test_threads_executor_gives_the_serial_answer():
    problem, params, x, values = _qp(seed=9)
    batch = [v.detach().unsqueeze(0).repeat(4, *([1] * v.dim())) for v in values]
    batch[0] = batch[0] + torch.linspace(0, 1, 4)[:, None]
    serial = bbd.layer(problem, parameters=params, variables=[x])(*batch)[0]
    threaded = bbd.layer(problem, parameters=params, variables=[x], executor="threads", max_workers=2)(*batch)[0]
    torch.testing.assert_close(threaded, serial, atol=1e-12, rtol=0)


# --- failures -----------------------------------------------------------------------------------------------


def _infeasible_in_batch():
    x = cp.Variable(2)
    lo, hi = cp.Parameter(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, x <= hi])
    lo_t = _t([[-1.0, 0.2], [2.0, 0.0], [0.5, 0.5]])
    hi_t = _t([1.0, 1.0])
    return problem, lo, hi, x, lo_t, hi_t


def test_infeasible_instance_raises_with_status_and_batch_index():
    problem, lo, hi, x, lo_t, hi_t = _infeasible_in_batch()
    layer = bbd.layer(problem, parameters=[lo, hi], variables=[x])
    message = "did not solve the problem (status 'infeasible', CLARABEL: 'PrimalInfeasible')"
    with pytest.raises(bbd.SolverError, match=re.escape(message)) as info:
        layer(lo_t, hi_t)
    assert info.value.batch_index == 1
    assert info.value.status == "infeasible"  # cvxpy's name for it
    assert info.value.backend == "cvxpy"


def test_infeasible_instance_is_nan_with_on_failure_nan():
    problem, lo, hi, x, lo_t, hi_t = _infeasible_in_batch()
    layer = bbd.layer(problem, parameters=[lo, hi], variables=[x], on_failure="nan")
    with pytest.warns(RuntimeWarning, match=re.escape("(status 'infeasible', CLARABEL: 'PrimalInfeasible')")):
        (x_t,) = layer(lo_t, hi_t)
    assert bool(torch.isnan(x_t[1]).all())
    torch.testing.assert_close(x_t[2].detach(), _t([0.5, 0.5], grad=False), atol=1e-8, rtol=0)
    x_t[[0, 2]].sum().backward()
    torch.testing.assert_close(lo_t.grad, _t([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]], grad=False), atol=1e-7, rtol=0)


def test_unbounded_problem_raises():
    x = cp.Variable(2)
    c = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(c @ x), [x >= 0])
    layer = bbd.layer(problem, parameters=[c], variables=[x])
    message = "did not solve the problem (status 'unbounded', CLARABEL: 'DualInfeasible')"
    with pytest.raises(bbd.SolverError, match=re.escape(message)):
        layer(_t([-1.0, 1.0]))


def test_wrong_parameter_shape_is_an_input_error():
    problem, A, b, x = _readme_problem()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    with pytest.raises(bbd.InputError, match=re.escape("has shape (2, 3); declared shape (3, 2)")):
        layer(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))


def test_wrong_parameter_dtype_is_an_input_error():
    problem, A, b, x = _readme_problem()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    with pytest.raises(bbd.InputError, match=re.escape("has dtype torch.int64; expected a real floating dtype")):
        layer(torch.ones(3, 2, dtype=torch.int64), torch.zeros(3, dtype=torch.float64))


def test_parameters_must_cover_the_problem():
    problem, A, b, x = _readme_problem()
    with pytest.raises(bbd.InputError, match=re.escape("parameters must list every cvxpy.Parameter of the problem")):
        bbd.layer(problem, parameters=[A], variables=[x])


def test_variables_must_belong_to_the_problem():
    problem, A, b, _ = _readme_problem()
    message = "is neither a cvxpy.Variable of the problem nor a dual variable of one of its constraints"
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.layer(problem, parameters=[A, b], variables=[cp.Variable(2)])


def test_non_dcp_problem_is_rejected():
    x = cp.Variable()
    a = cp.Parameter()
    problem = cp.Problem(cp.Maximize(cp.square(x - a)), [x <= 1, x >= -1])
    with pytest.raises(bbd.InputError, match=re.escape("is not DCP (disciplined convex)")):
        bbd.layer(problem, parameters=[a], variables=[x])


def test_unknown_backend_option_is_rejected():
    problem, A, b, x = _readme_problem()
    with pytest.raises(bbd.InputError, match=re.escape("Unknown option(s) ['tolerance']")):
        bbd.layer(problem, parameters=[A, b], variables=[x], tolerance=1e-3)


# --- non-DPP, duals ---------------------------------------------------------------------------------------


def _non_dpp():
    x = cp.Variable(2)
    a, b = cp.Parameter(pos=True), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(a * a * x - b) + cp.sum(x)), [x >= 0.1])
    assert not problem.is_dpp()
    return problem, a, b, x


def test_non_dpp_problem_matches_closed_form():
    problem, a, b, x = _non_dpp()
    layer = bbd.layer(problem, parameters=[a, b], variables=[x])
    a_t, b_t = _t(1.3), _t([2.0, -1.0])
    (x_t,) = layer(a_t, b_t)
    # x0 = b0/a^2 - 1/(2 a^4) (interior), x1 = 0.1 (bound active)
    assert float(x_t[0].detach()) == pytest.approx(2.0 / 1.3**2 - 0.5 / 1.3**4, abs=1e-8)
    assert float(x_t[1].detach()) == pytest.approx(0.1, abs=1e-9)
    ga, gb = torch.autograd.grad(x_t[0], (a_t, b_t))
    assert float(ga) == pytest.approx(-4.0 / 1.3**3 + 2.0 / 1.3**5, rel=1e-6)
    torch.testing.assert_close(gb, _t([1 / 1.3**2, 0.0], grad=False), atol=1e-7, rtol=0)


def test_non_dpp_can_be_refused_like_cvxpylayers():
    problem, a, b, x = _non_dpp()
    message = "is not DPP (disciplined parametrized programming), and allow_non_dpp=False"
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.layer(problem, parameters=[a, b], variables=[x], allow_non_dpp=False)


def test_return_duals_match_cvxpy():
    problem, params, x, values = _qp(seed=10)
    layer = bbd.layer(problem, parameters=params, variables=[x], return_duals=True)
    x_t, ineq, eq = layer(*values)
    _solve_ref(problem, params, values, x)
    torch.testing.assert_close(ineq.detach(), torch.as_tensor(problem.constraints[0].dual_value), atol=1e-7, rtol=0)
    torch.testing.assert_close(eq.detach(), torch.as_tensor(problem.constraints[1].dual_value), atol=1e-7, rtol=0)
    # Duals are differentiable outputs too.
    (g_h,) = torch.autograd.grad(ineq.sum(), [values[2]])
    assert bool(torch.isfinite(g_h).all())


# --- plugin, example ------------------------------------------------------------------------------------


def test_backend_is_registered_and_accepts_only_cvxpy_problems():
    names = {b.name: b for b in bbd.backends()}
    assert names["cvxpy"].available
    from blackbox_diff_cvxpy import CvxpyBackend

    backend = CvxpyBackend()
    problem, *_ = _readme_problem()
    assert backend.accepts(problem)
    assert not backend.accepts(object())
    assert backend.returns_duals


def test_assembled_jacobian_is_the_residuals_derivative():
    # The LU preconditioner and the Newton refinement rely on J = dF/dz assembled by hand; check it
    # against autograd on a problem with every supported cone (zero, nonneg, SOC, PSD, exponential).
    from blackbox_diff import ImplicitOptions

    rng = np.random.default_rng(11)
    x = cp.Variable(3)
    X = cp.Variable((3, 3))
    c, C = cp.Parameter(3), cp.Parameter((3, 3))
    problem = cp.Problem(
        cp.Minimize(c @ x + cp.trace(C @ X) + cp.sum_squares(x) + cp.sum(cp.exp(x))),
        [cp.norm(x, 2) <= 1 + cp.trace(X), X >> 0, X == X.T, cp.trace(X) <= 2, x >= -0.5],
    )
    compiled = bbd.layer(problem, parameters=[c, C], variables=[x, X]).compiled
    M = rng.standard_normal((3, 3))
    values = [rng.standard_normal(3), M + M.T]
    condition = compiled.condition
    answer = compiled.solve(*values)
    params = tuple(torch.as_tensor(v) for v in values)
    z, (active, *_) = condition.prepare(answer, params, ImplicitOptions())
    data = condition._data((), params)
    by_hand = condition.jacobian(z, active, data)
    by_autograd = torch.autograd.functional.jacobian(lambda v: condition.raw_residual(v, active, data), z)
    torch.testing.assert_close(by_hand, by_autograd, atol=1e-12, rtol=0)


def test_polyhedral_fast_path_factors_the_residuals_jacobian():
    # LP/QP answers are refined and factored in numpy; the LU handed to the residual must be J's.
    from blackbox_diff import ImplicitOptions

    problem, params, x, values = _qp(seed=12)
    compiled = bbd.layer(problem, parameters=params, variables=[x]).compiled
    condition = compiled.condition
    raw = [v.detach() for v in values]
    answer = compiled.solve(*[v.numpy() for v in raw])
    z, (active, lu, piv, status) = condition.prepare(answer, tuple(raw), ImplicitOptions())
    J = condition.jacobian(z, active, condition._data((), tuple(raw)))
    v = torch.linspace(-1.0, 1.0, z.numel())
    torch.testing.assert_close(J @ torch.linalg.lu_solve(lu, piv, v[:, None])[:, 0], v, atol=1e-10, rtol=0)
    assert float(condition.certificate(z, active, lu, piv, status, *raw).abs().max()) < 1e-12


@pytest.mark.parametrize("options", [{"precondition": False}, {"refine": False}, {"dense_max": 0}],
                         ids=["no-preconditioner", "no-refinement", "sparse-krylov"])
def test_every_adjoint_path_gives_the_same_gradient(options):
    # Default: refined answer, dense LU preconditioner, GMRES in one step. Without the preconditioner the
    # engine solves the raw KKT system; above dense_max the refinement is a sparse LU and the adjoint
    # system goes to the engine's Krylov solver.
    problem, params, x, values = _qp(seed=13)
    grads = []
    for opts in ({}, options):
        layer = bbd.layer(problem, parameters=params, variables=[x], **TIGHT, **opts)
        (x_t,) = layer(*values)
        grads.append(torch.autograd.grad((x_t * torch.arange(1.0, 6.0)).sum(), values))
    for g_ref, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-7, rtol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_parameters_give_the_cpu_gradient():
    problem, params, x, values = _qp(seed=14)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    (x_cpu,) = layer(*values)
    g_cpu = torch.autograd.grad(x_cpu.sum(), values)
    on_gpu = [v.detach().cuda().requires_grad_(True) for v in values]
    (x_gpu,) = layer(*on_gpu)
    assert x_gpu.device.type == "cuda"
    g_gpu = torch.autograd.grad(x_gpu.sum(), on_gpu)
    for a, b in zip(g_cpu, g_gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=1e-9, rtol=0)


def test_parameter_order_is_the_callers():
    problem, A, b, x = _readme_problem()
    torch.manual_seed(5)
    A_t = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b_t = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (x1,) = bbd.layer(problem, parameters=[A, b], variables=[x])(A_t, b_t)
    (x2,) = bbd.layer(problem, parameters=[b, A], variables=[x])(b_t, A_t)
    torch.testing.assert_close(x1, x2, atol=1e-12, rtol=0)
    g1 = torch.autograd.grad(x1.sum(), (A_t, b_t))
    g2 = torch.autograd.grad(x2.sum(), (A_t, b_t))
    for a, c in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


def test_nonneg_variable_and_maximize_objective():
    # cvxpy replaces a nonneg=True variable by a plain one plus a constraint, and negates a Maximize.
    x = cp.Variable(3, nonneg=True)
    p = cp.Parameter(3)
    problem = cp.Problem(cp.Maximize(-cp.sum_squares(x - p)))
    p_t = _t([1.0, -1.0, 0.5])
    (x_t,) = bbd.layer(problem, parameters=[p], variables=[x])(p_t)
    torch.testing.assert_close(x_t.detach(), _t([1.0, 0.0, 0.5], grad=False), atol=1e-9, rtol=0)
    x_t.sum().backward()
    torch.testing.assert_close(p_t.grad, _t([1.0, 0.0, 1.0], grad=False), atol=1e-9, rtol=0)


# --- outputs cvxpy cannot give: defensive errors (cvxpy drops only empty variables today) ---------------------


def test_empty_variable_comes_back_empty():
    x, a, empty = cp.Variable(2), cp.Parameter(2), cp.Variable((2, 0))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + cp.sum(empty)), [x >= 0])
    x_t, e_t = bbd.layer(problem, parameters=[a], variables=[x, empty])(_t([1.0, -1.0], grad=False))
    assert e_t.shape == (2, 0)
    torch.testing.assert_close(x_t, _t([1.0, 0.0], grad=False), atol=1e-9, rtol=0)


def test_variable_or_dual_missing_from_the_cone_program_is_an_input_error(monkeypatch):
    from blackbox_diff_cvxpy import _outputs, _problem

    x, a = cp.Variable(2), cp.Parameter(2)
    con = x >= 0
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [con])
    monkeypatch.setattr(_outputs, "_invert", lambda *args: {})  # as if cvxpy kept no dual for the constraint
    with pytest.raises(bbd.InputError, match=re.escape(
        "The dual variable 0 of constraint 0 (0.0 <= var"
    )) as info:
        bbd.layer(problem, parameters=[a], variables=[x, con.dual_variables[0]])
    assert "has no counterpart in the cone program cvxpy built" in str(info.value)
    real = _problem.canonicalise

    def without_x(*args, **kwargs):  # as if cvxpy had eliminated the (non-empty) variable x
        canonical = real(*args, **kwargs)
        canonical.var_ids = {x.id: -1}
        return canonical

    monkeypatch.setattr(_problem, "canonicalise", without_x)
    from blackbox_diff_cvxpy import _backend

    monkeypatch.setattr(_backend, "canonicalise", without_x)
    with pytest.raises(bbd.InputError, match=re.escape(
        f"Variable {x.name()} does not appear in the cone program cvxpy built"
    )):
        bbd.layer(problem, parameters=[a], variables=[x])


def _stated_vs_derived_jvp(layer, values):
    """The cvxpy condition's stated (dF/dparams) dparams against torch.func.jvp of its residual."""
    compiled = layer.compiled
    cond = compiled.condition
    params = tuple(torch.as_tensor(v, dtype=torch.float64) for v in values)
    answer = compiled.solve(*[p.numpy() for p in params])
    z, aux = cond.prepare(answer, params, bbd.ImplicitOptions(**compiled.options))
    torch.manual_seed(1)
    tangents = tuple(torch.randn_like(p) for p in params)
    _, expected = torch.func.jvp(lambda *p: cond.residual(z, *aux, *p), params, tangents)
    torch.testing.assert_close(cond.jvp_params(z, *aux, *params, *tangents), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["qp", "lp-large", "soc", "gp", "non-dpp"])
def test_stated_parameter_jvp_is_the_residuals_own_derivative(kind):
    # Forward mode takes (dF/dparams) dparams from the condition (data linear in theta, F linear in the data)
    # instead of two reverse sweeps; it must be the residual's own derivative for every kind of program:
    # preconditioned and raw, conic rows, logged (gp) parameters and the linearised non-DPP data.
    x = cp.Variable(3)
    if kind == "qp":
        q, u = cp.Parameter(3), cp.Parameter(3)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + q @ x), [x <= u, cp.sum(x) == 1])
        layer, values = bbd.layer(prob, parameters=[q, u], variables=[x]), [[1.0, -2.0, 0.5], [0.3, 2.0, 0.2]]
    elif kind == "lp-large":  # dense_max=0: not preconditioned
        q = cp.Parameter(3)
        prob = cp.Problem(cp.Minimize(q @ x), [x >= -1, x <= 1, cp.sum(x) == 0.5])
        layer, values = bbd.layer(prob, parameters=[q], variables=[x], dense_max=0), [[1.0, -2.0, 0.5]]
    elif kind == "soc":
        q, r = cp.Parameter(3), cp.Parameter(pos=True)
        prob = cp.Problem(cp.Minimize(q @ x), [cp.norm(x) <= r])
        layer, values = bbd.layer(prob, parameters=[q, r], variables=[x]), [[1.0, -2.0, 0.5], 2.0]
    elif kind == "gp":
        a = cp.Parameter(pos=True)
        v = cp.Variable(pos=True)
        prob = cp.Problem(cp.Minimize(a / v + v), [])
        layer, values = bbd.layer(prob, parameters=[a], variables=[v], gp=True), [4.0]
    else:
        q = cp.Parameter(3)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - q) + q[0] * q[1] * x[2]), [x >= 0])
        layer, values = bbd.layer(prob, parameters=[q], variables=[x], allow_non_dpp=True), [[1.0, -0.5, 0.3]]
    _stated_vs_derived_jvp(layer, values)


def _lp_quadratic_param():
    """An LP whose cost and a constraint matrix are parameters, plus a parameter-scaled quadratic term
    (P depends on theta: the quadratic's data map is not constant)."""
    x = cp.Variable(3)
    c, G, h, s = cp.Parameter(3), cp.Parameter((2, 3)), cp.Parameter(2), cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(c @ x + s * cp.sum_squares(x)), [G @ x <= h, x >= -1, cp.sum(x) == 0.5])
    rng = np.random.default_rng(5)
    return problem, [c, G, h, s], x, [rng.standard_normal(3), rng.standard_normal((2, 3)), rng.uniform(0.5, 1.0, 2),
                                      np.array(0.7)]


def _symmetric_param():
    """A QP with a symmetric matrix parameter (cvxpy stores its upper triangle: a lowered block of theta)."""
    x = cp.Variable(3)
    c, S, h = cp.Parameter(3), cp.Parameter((3, 3), symmetric=True), cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + c @ x), [S @ x <= h, cp.sum(x) == 0.2])
    rng = np.random.default_rng(9)
    M = rng.standard_normal((3, 3))
    return problem, [c, S, h], x, [rng.standard_normal(3), M + M.T, rng.uniform(0.1, 0.5, 3)]


@pytest.mark.parametrize("path", ["compiled", "numpy"])
@pytest.mark.parametrize("case", ["qp", "lp+param quadratic", "symmetric parameter"])
@pytest.mark.parametrize("batch", [1, 3])
def test_numpy_batch_certificate_is_the_torch_certificate(case, batch, path):
    # Certification of polyhedral programs runs on the condition's numpy `certify`: one compiled pass over
    # the data maps (dense loops for the dense "qp" data, the pattern for the others, a lowered block of
    # theta for the symmetric parameter), or the data rebuilt from theta in numpy. Either must be the torch
    # certificate and term sizes exactly, row for row, shared parameters broadcast.
    from blackbox_diff import ImplicitOptions
    from blackbox_diff.plugin import use_kernels

    if path == "compiled":
        pytest.importorskip("numba")  # the `fast` extra; CI installs it
    problem, params, x, values = {"qp": lambda: _qp(seed=7), "lp+param quadratic": _lp_quadratic_param,
                                  "symmetric parameter": _symmetric_param}[case]()
    compiled = bbd.layer(problem, parameters=params, variables=[x]).compiled
    condition = compiled.condition
    rng = np.random.default_rng(1)
    raw = [torch.as_tensor(v).detach().to(torch.float64) for v in values]
    shared = [k == 1 for k in range(len(raw))]  # the second parameter (a matrix) is shared by the batch
    rows = []
    for i in range(batch):
        inst = [r if shared[k] else r + (0.05 * i * torch.as_tensor(rng.standard_normal(tuple(r.shape)))).abs()
                for k, r in enumerate(raw)]
        z, aux = condition.prepare(compiled.solve(*[t.numpy() for t in inst]), tuple(inst), ImplicitOptions())
        # Off the solution (every part of the certificate nonzero somewhere), so both values are compared.
        rows.append((z + 0.1 * torch.as_tensor(rng.standard_normal(z.numel())), aux, inst))
    Z = torch.stack([r[0] for r in rows])
    aux = tuple(torch.stack([r[1][k] for r in rows]) for k in range(len(rows[0][1])))
    params_b = [raw[k] if shared[k] else torch.stack([r[2][k] for r in rows]) for k in range(len(raw))]
    previous = use_kernels(path == "compiled")
    try:
        C, L, exact, worst = condition.certify(Z, aux, params_b, tuple(not s for s in shared))
    finally:
        use_kernels(previous)
    S = exact()
    assert np.all(L <= S * (1 + 1e-14)) and np.all(L[:, : condition.program.n] > 0)  # a real bound from below
    for i, (z, a, inst) in enumerate(rows):
        torch.testing.assert_close(torch.as_tensor(C[i]), condition.certificate(z, *a, *inst), atol=1e-12, rtol=0)
        torch.testing.assert_close(torch.as_tensor(S[i]), condition.residual_scale(z, *a, *inst), atol=0, rtol=1e-12)
    assert S.shape == (batch, sum(condition.certificate_blocks())) and np.abs(C).min(axis=0).max() > 1e-3
    ratio = np.where(L > 0, np.abs(C) / np.where(L > 0, L, 1.0), np.where(C == 0, 0.0, np.inf))
    assert (worst is None) == (path == "numpy") and (worst is None or worst == pytest.approx(ratio.max(), rel=1e-12))


def test_second_order_cone_programs_keep_the_torch_certificate():
    x, t = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [cp.norm(x - t, 2) <= 1])
    condition = bbd.layer(problem, parameters=[t], variables=[x]).compiled.condition
    assert condition.certify(torch.zeros(1, 5), (torch.ones(1, 0),), [torch.zeros(2)], (False,)) is None
