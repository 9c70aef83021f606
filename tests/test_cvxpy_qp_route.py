"""The cvxpy backend's default route (issue 17): LP/QP-class problems go to DAQP.

A cvxpy layer on its defaults (no solver=, solver_args or eps) whose cone program has only zero and
non-negative cones is solved as a QP by DAQP, a dense active-set solver, with Clarabel where DAQP fails. The
answer goes through the condition, certification, refinement and degeneracy test every solver's answer goes
through. Checked here: which solver ran (the black box's `solver_counts`), gradients against central
differences of the black box itself (float64, DAQP is exact) and closed forms (projections onto boxes,
LP vertices), duals against Clarabel's and cvxpy's, a failing instance in a batch, conic problems and named
solvers on Clarabel, and the degenerate LP vertex where DAQP's working set alone would look regular.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
import warnings
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch

import blackbox_diff as bbd

pytest.importorskip("daqp")
pytest.importorskip("qpsolvers")

from blackbox_diff_cvxpy import _qp_route  # noqa: E402
from blackbox_diff_cvxpy._backend import DPPSolve  # noqa: E402


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def _counts(layer) -> dict[str, int]:
    return dict(layer.compiled.solve.solver_counts)


def _qp(n=4, m=5, p=1, seed=0):
    """min 1/2 x'Px + q'x s.t. Gx <= h, Ax = b (q, G, h, A, b parameters), feasible at x0 with some rows active."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    P = M @ M.T / n + 0.5 * np.eye(n)
    x = cp.Variable(n)
    q, G, h, A, b = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((p, n)), cp.Parameter(p)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x), [G @ x <= h, A @ x == b])
    x0 = rng.standard_normal(n)
    Gv, Av = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    values = [3 * rng.standard_normal(n), Gv, Gv @ x0 + rng.uniform(0.0, 1.0, m), Av, Av @ x0]
    return problem, [q, G, h, A, b], x, [_t(v) for v in values]


def _lp(n=4, m=8, p=1, seed=0):
    """min q'x s.t. Gx <= h, Ax = b, bounded (q = -(G'lam + A'nu), lam > 0): a vertex with n active rows."""
    rng = np.random.default_rng(seed)
    x = cp.Variable(n)
    q, G, h, A, b = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((p, n)), cp.Parameter(p)
    problem = cp.Problem(cp.Minimize(q @ x), [G @ x <= h, A @ x == b])
    x0 = rng.standard_normal(n)
    Gv, Av = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    qv = -(Gv.T @ rng.uniform(0.1, 1.0, m) + Av.T @ rng.standard_normal(p))
    values = [qv, Gv, Gv @ x0 + rng.uniform(0.0, 1.0, m), Av, Av @ x0]
    return problem, [q, G, h, A, b], x, [_t(v) for v in values]


def _fd_check(layer, values, h=1e-6, atol=1e-7):
    """The implicit gradient of sum(w * x) against central differences of the layer's own forward (the
    black box re-solved, float64), every entry of every parameter."""
    out = layer(*values)[0]
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64)
    theta = [v.detach().clone().requires_grad_(True) for v in values]
    grads = torch.autograd.grad((w * layer(*theta)[0]).sum(), theta)
    with torch.no_grad():
        for i, v in enumerate(values):
            fd = torch.zeros(v.numel(), dtype=torch.float64)
            for k in range(v.numel()):
                up, dn = [u.detach().clone() for u in values], [u.detach().clone() for u in values]
                up[i].view(-1)[k] += h
                dn[i].view(-1)[k] -= h
                fd[k] = ((w * layer(*up)[0]).sum() - (w * layer(*dn)[0]).sum()) / (2 * h)
            torch.testing.assert_close(grads[i].reshape(-1), fd, atol=atol, rtol=1e-6)
    return grads


# --- which solver runs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_qp, _lp], ids=["qp", "lp"])
def test_lp_and_qp_on_defaults_are_solved_by_daqp_with_clarabels_answer(make):
    problem, params, x, values = make()
    batch = [torch.stack([v, v * 1.01]) for v in values]
    routed = bbd.layer(problem, parameters=params, variables=[x])
    named = bbd.layer(problem, parameters=params, variables=[x], solver="CLARABEL")
    (x_routed,), (x_named,) = routed(*batch), named(*batch)
    assert _counts(routed) == {"DAQP": 2}
    assert routed.compiled.solve.__name__ == "cvxpy[DAQP, CLARABEL fallback]"
    assert isinstance(named.compiled.solve, DPPSolve) and _counts(named) == {"CLARABEL": 2}
    torch.testing.assert_close(x_routed, x_named, atol=1e-8, rtol=0)


def test_conic_problem_keeps_clarabel():
    x, r, c = cp.Variable(3), cp.Parameter(nonneg=True), cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(c @ x), [cp.norm(x, 2) <= r])
    layer = bbd.layer(problem, parameters=[r, c], variables=[x])
    c_t = _t([1.0, -2.0, 2.0], grad=True)
    (x_t,) = layer(_t(2.0), c_t)
    assert _counts(layer) == {"CLARABEL": 1} and isinstance(layer.compiled.solve, DPPSolve)
    torch.testing.assert_close(x_t.detach(), -2.0 * c_t.detach() / 3.0, atol=1e-7, rtol=0)  # x = -r c / |c|


@pytest.mark.parametrize("options", [{"solver": "CLARABEL"}, {"solver": cp.CLARABEL}, {"solver_args": {"max_iter": 80}},
                                     {"eps": 1e-9}, {"solver": "DIFFCP"}, {"verbose": True}],
                         ids=["named", "cvxpy-constant", "solver_args", "eps", "cvxpylayers-diffcp", "verbose"])
def test_a_named_solver_or_its_settings_keep_clarabel(options):
    problem, params, x, values = _qp(seed=1)
    layer = bbd.layer(problem, parameters=params, variables=[x], **options)
    layer(*values)
    assert _counts(layer) == {"CLARABEL": 1}


def test_per_call_solver_args_take_clarabel_for_that_call_only():
    problem, params, x, values = _qp(seed=2)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    (a,) = layer(*values, solver_args={"tol_gap_abs": 1e-10})
    (b,) = layer(*values)
    per_call = layer.compiled.on_call(tuple(values), {"solver_args": {"tol_gap_abs": 1e-10}})
    assert dict(per_call.solve.solver_counts) == {"CLARABEL": 1}
    assert _counts(layer) == {"DAQP": 1}
    torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


def test_without_daqp_the_default_is_clarabel(monkeypatch):
    monkeypatch.setattr(_qp_route, "_qp_solver_installed", lambda: False)
    problem, params, x, values = _qp(seed=3)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    layer(*values)
    assert _counts(layer) == {"CLARABEL": 1}


def test_an_instance_daqp_fails_on_is_solved_by_clarabel(monkeypatch):
    """DAQP stopped after one iteration (its iteration limit, a real failure of the real solver): that instance
    goes to Clarabel, whose answer and gradient are the ones the route gives otherwise."""
    problem, params, x, values = _qp(seed=13)
    reference = bbd.layer(problem, parameters=params, variables=[x])
    theta = [v.detach().clone().requires_grad_(True) for v in values]
    (x_ref,) = reference(*theta)
    g_ref = torch.autograd.grad(x_ref.sum(), theta)
    monkeypatch.setattr(_qp_route, "QP_SETTINGS", {**_qp_route.QP_SETTINGS, "iter_limit": 1})
    layer = bbd.layer(problem, parameters=params, variables=[x])
    (x_t,) = layer(*theta)
    assert _counts(reference) == {"DAQP": 1} and _counts(layer) == {"CLARABEL": 1}
    torch.testing.assert_close(x_t.detach(), x_ref.detach(), atol=1e-8, rtol=0)
    for g, r in zip(torch.autograd.grad(x_t.sum(), theta), g_ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-7, rtol=0)


def test_an_answer_off_the_kkt_conditions_is_not_taken_from_daqp():
    """The route's guard: DAQP's own answer passes, the same answer moved off (x by 1e-5, a multiplier's sign)
    does not, so such an instance would go to Clarabel."""
    problem, params, x, values = _qp(seed=11)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    program = layer.compiled.condition.program
    from blackbox_diff_cvxpy._theta import theta_numpy

    P, c, A, b = program.dense(*program.data(theta_numpy(program.pieces, program.n_theta,
                                                         [v.numpy() for v in values])))
    z0 = program.cones.zero
    answer = _qp_route.solve_qp((P, c, A, b), z0)
    assert answer is not None and answer.solver == "DAQP"
    assert _qp_route._kkt_close(P, c, A, b, z0, answer.x, answer.y)
    assert not _qp_route._kkt_close(P, c, A, b, z0, answer.x + 1e-5, answer.y)
    flipped = answer.y.copy()
    k = z0 + int(np.argmax(answer.y[z0:]))
    flipped[k] = -flipped[k]
    assert answer.y[k] > 1e-3 and not _qp_route._kkt_close(P, c, A, b, z0, answer.x, flipped)


def test_the_routed_black_box_pickles_for_process_executors():
    problem, params, x, values = _qp(seed=12)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    layer(*values)
    clone = pickle.loads(pickle.dumps(layer.compiled.solve))
    answer = clone(*[v.numpy() for v in values])
    assert answer.solver == "DAQP" and dict(clone.solver_counts) == {"DAQP": 2}
    np.testing.assert_allclose(answer.x, layer.compiled.solve(*[v.numpy() for v in values]).x, atol=1e-12)


# --- gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_qp, _lp], ids=["qp", "lp"])
def test_gradients_match_central_differences_of_the_black_box(make):
    problem, params, x, values = make(seed=4)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    grads = _fd_check(layer, values)
    assert set(_counts(layer)) == {"DAQP"}
    if make is _lp:
        assert float(grads[0].abs().max()) < 1e-9  # a vertex does not move with the cost


def test_box_projection_gives_the_closed_form_jacobians_with_barely_active_rows():
    """x = clip(p, l, u): dx/dp = 1 strictly inside, dx/dl = 1 below, dx/du = 1 above; rows 1e-6 from
    their bound are not degenerate and get the exact 0/1 entries."""
    n = 8
    x, p, lo, hi = cp.Variable(n), cp.Parameter(n), cp.Parameter(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - p)), [x >= lo, x <= hi])
    layer = bbd.layer(problem, parameters=[p, lo, hi], variables=[x])
    p_t = _t([-2.0, -1.0 - 1e-6, -1.0 + 1e-6, 0.3, 1.0 - 1e-6, 1.0 + 1e-6, 2.0, 0.0], grad=True)
    lo_t, hi_t = _t(-np.ones(n), grad=True), _t(np.ones(n), grad=True)
    (x_t,) = layer(p_t, lo_t, hi_t)
    assert _counts(layer) == {"DAQP": 1}
    torch.testing.assert_close(x_t.detach(), p_t.detach().clamp(-1.0, 1.0), atol=1e-12, rtol=0)
    w = torch.arange(1.0, n + 1, dtype=torch.float64)
    gp, gl, gh = torch.autograd.grad((w * x_t).sum(), [p_t, lo_t, hi_t])
    below, above = p_t.detach() < -1.0, p_t.detach() > 1.0
    inside = ~(below | above)
    torch.testing.assert_close(gp, w * inside, atol=1e-10, rtol=0)
    torch.testing.assert_close(gl, w * below, atol=1e-10, rtol=0)
    torch.testing.assert_close(gh, w * above, atol=1e-10, rtol=0)


def test_lp_on_a_box_gives_the_vertex_and_its_jacobian():
    """min c'x s.t. l <= x <= u: x_i = l_i where c_i > 0, u_i where c_i < 0; an LP (P = 0) through DAQP."""
    c = np.array([1.0, -2.0, 0.5, -0.1])
    x, lo, hi = cp.Variable(4), cp.Parameter(4), cp.Parameter(4)
    layer = bbd.layer(cp.Problem(cp.Minimize(c @ x), [x >= lo, x <= hi]), parameters=[lo, hi], variables=[x])
    lo_t, hi_t = _t([-1.0, -2.0, 0.0, 1.0], grad=True), _t([1.0, 3.0, 0.5, 4.0], grad=True)
    (x_t,) = layer(lo_t, hi_t)
    assert _counts(layer) == {"DAQP": 1}
    torch.testing.assert_close(x_t.detach(), _t([-1.0, 3.0, 0.0, 4.0]), atol=1e-12, rtol=0)
    gl, gh = torch.autograd.grad(x_t.sum(), [lo_t, hi_t])
    torch.testing.assert_close(gl, _t(c > 0), atol=1e-12, rtol=0)
    torch.testing.assert_close(gh, _t(c < 0), atol=1e-12, rtol=0)


def test_singular_objective_is_exact_even_without_refinement():
    """cvxpy writes s (1e4 (x1 - 3)^2 + (x2 - 1)^2) with epigraph variables: P is singular, so DAQP runs
    proximal-point iterations, which stop 10 % off x2 at DAQP's default eta_prox when s = 1e-6. The route runs
    them to round-off: the unrefined answer is exact (certified as it is)."""
    x, h = cp.Variable(2), cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(1e-6 * (1e4 * cp.square(x[0] - 3) + cp.square(x[1] - 1))), [x[0] <= h[0]])
    layer = bbd.layer(problem, parameters=[h], variables=[x], refine=False)
    h_t = _t([2.0], grad=True)
    (x_t,) = layer(h_t)
    assert _counts(layer) == {"DAQP": 1}
    torch.testing.assert_close(x_t.detach(), _t([2.0, 1.0]), atol=1e-9, rtol=0)
    (g,) = torch.autograd.grad(x_t[0], h_t)
    torch.testing.assert_close(g, _t([1.0]), atol=1e-9, rtol=0)


def test_float32_parameters_on_the_route():
    problem, params, x, values = _qp(seed=6)
    layer = bbd.layer(problem, parameters=params, variables=[x])
    (x64,) = layer(*values)
    theta = [v.float().requires_grad_(True) for v in values]
    (x32,) = layer(*theta)
    assert x32.dtype == torch.float32 and _counts(layer) == {"DAQP": 2}
    torch.testing.assert_close(x32.double().detach(), x64, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(x32.sum(), theta)
    assert all(bool(torch.isfinite(g).all()) for g in grads)


# --- duals ------------------------------------------------------------------------------------------------------


def test_duals_have_clarabels_and_cvxpys_signs():
    """Inequalities both ways (<= and >=), an equality and a maximised objective: every dual as Clarabel's and
    as cvxpy's constraint.dual_value."""
    rng = np.random.default_rng(7)
    n = 4
    x, q, lo, a = cp.Variable(n), cp.Parameter(n), cp.Parameter(n), cp.Parameter(n)
    cons = [x >= lo, cp.sum(x) <= 1.0, a @ x == 0.5]
    problem = cp.Problem(cp.Maximize(-cp.sum_squares(x) + q @ x), cons)
    values = [_t(rng.standard_normal(n) * 2), _t(rng.uniform(-0.5, 0.2, n)), _t(rng.uniform(0.5, 1.5, n))]
    routed = bbd.layer(problem, parameters=[q, lo, a], variables=[x], return_duals=True)
    named = bbd.layer(problem, parameters=[q, lo, a], variables=[x], return_duals=True, solver="CLARABEL")
    out_routed, out_named = routed(*values), named(*values)
    assert _counts(routed) == {"DAQP": 1}
    for p, v in zip([q, lo, a], values, strict=True):
        p.value = v.numpy()
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert any(float(np.abs(c.dual_value).max()) > 1e-3 for c in cons)  # some duals are nonzero
    for r, c_out, con in zip(out_routed[1:], out_named[1:], cons, strict=True):
        torch.testing.assert_close(r.detach(), c_out.detach(), atol=1e-7, rtol=0)
        torch.testing.assert_close(r.detach(), torch.as_tensor(con.dual_value, dtype=torch.float64).reshape(r.shape),
                                   atol=1e-7, rtol=0)


def test_dual_variable_outputs_match_finite_differences():
    """A dual as an output (cvxpylayers' variables=[x, con.dual_variables[0]]): its gradient is the black box's."""
    problem, params, x, values = _qp(seed=8)
    dual = problem.constraints[0].dual_variables[0]
    layer = bbd.layer(problem, parameters=params, variables=[dual])
    _fd_check(layer, values, atol=1e-6)
    assert set(_counts(layer)) == {"DAQP"}


# --- failures ---------------------------------------------------------------------------------------------------


def test_infeasible_instance_fails_only_its_own_row_under_on_failure_nan():
    x, lo, hi = cp.Variable(2), cp.Parameter(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, x <= hi])
    layer = bbd.layer(problem, parameters=[lo, hi], variables=[x], on_failure="nan")
    lo_t, hi_t = _t([[-1.0, 0.2], [2.0, 0.0], [0.5, 0.5]], grad=True), _t([1.0, 1.0])
    with pytest.warns(RuntimeWarning, match=re.escape("(status 'infeasible', CLARABEL: 'PrimalInfeasible')")):
        (x_t,) = layer(lo_t, hi_t)
    assert _counts(layer) == {"DAQP": 2, "CLARABEL": 1}  # DAQP failed on row 1, Clarabel said why
    assert bool(torch.isnan(x_t[1]).all()) and bool(torch.isfinite(x_t[[0, 2]]).all())
    torch.testing.assert_close(x_t[[0, 2]].detach(), _t([[0.0, 0.2], [0.5, 0.5]]), atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(x_t[[0, 2]].sum(), lo_t)
    torch.testing.assert_close(g, _t([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]), atol=1e-10, rtol=0)


def test_infeasible_instance_raises_clarabels_error():
    x, lo = cp.Variable(2), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo, x <= 1.0])
    layer = bbd.layer(problem, parameters=[lo], variables=[x])
    with pytest.raises(bbd.SolverError, match=re.escape("(status 'infeasible', CLARABEL: 'PrimalInfeasible')")):
        layer(_t([2.0, 0.0]))


# --- degeneracy -------------------------------------------------------------------------------------------------


def test_degenerate_lp_vertex_is_flagged_though_daqps_working_set_looks_regular():
    """max 1.1 x1 + x2 s.t. x1 <= p1, x2 <= p2, x1 + x2 <= p3 at p = (1, 1, 2): three rows active in 2-D.

    DAQP's working set holds two of them (a regular system, the easy implementation's answer: one of the
    one-sided derivatives, silently). The route reads the third as weakly active (zero slack, zero
    multiplier), so the degeneracy test runs: d x1/dp = (1, 0, 0) exactly, and x2 = min(p2, p3 - p1) is flagged."""
    x, p = cp.Variable(2), cp.Parameter(3)
    problem = cp.Problem(cp.Maximize(1.1 * x[0] + x[1]), [x[0] <= p[0], x[1] <= p[1], x[0] + x[1] <= p[2]])
    layer = bbd.layer(problem, parameters=[p], variables=[x])
    theta = np.array([1.0, 1.0, 2.0])

    # DAQP's own answer at this point: two multipliers on, three slacks at zero (to its proximal iterations'
    # ~1e-10 on an LP).
    program = layer.compiled.condition.program
    from blackbox_diff_cvxpy._theta import theta_numpy

    data = program.dense(*program.data(theta_numpy(program.pieces, program.n_theta, [theta])))
    answer = _qp_route.solve_qp(data, program.cones.zero)
    rows = slice(program.cones.zero, program.cones.conic_start)
    assert int((answer.y[rows] > 1e-9).sum()) == 2 and int((answer.s[rows] < 1e-8).sum()) == 3

    t = _t(theta, grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (x_t,) = layer(t)
        J = torch.stack([torch.autograd.grad(x_t[i], t, retain_graph=True)[0] for i in range(2)])
    assert _counts(layer) == {"DAQP": 1}
    torch.testing.assert_close(x_t.detach(), _t([1.0, 1.0]), atol=1e-10, rtol=0)
    torch.testing.assert_close(J[0], _t([1.0, 0.0, 0.0]), atol=1e-10, rtol=0)
    assert any(np.allclose(J[1].numpy(), side, atol=1e-10) for side in ([0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]))
    messages = [str(w.message) for w in caught if str(w.message).startswith("Degenerate point")]
    assert len(messages) == 1
    assert "active inequality constraints [0, 1, 2] are linearly dependent (LICQ fails)" in messages[0]
    assert "The derivative of outputs [1] does not exist there" in messages[0]


# --- the benchmark's table (issue 17's targets), in --fast mode -----------------------------------------------------


def test_bench_qp_defaults_table_fast(capsys, tmp_path):
    pytest.importorskip("cvxpylayers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_qp

    rows = bench_qp.main(["--defaults", "--fast", "--json", str(tmp_path / "defaults.json")])
    out = capsys.readouterr().out
    assert [(r["kind"], r["n"]) for r in rows] == [("LP", 10), ("LP", 20), ("QP", 10), ("QP", 20)]
    assert json.loads((tmp_path / "defaults.json").read_text())["defaults"] == rows
    for r in rows:
        assert set(r["bbd_solvers"]) == {"DAQP"}  # the default route, in the benchmark too
        assert r["bbd_grad_error"] < 1e-6 and math.isfinite(r["cvxpylayers_grad_error"])
        assert all(r[k] > 0 for k in ("bbd_forward_ms", "bbd_backward_ms", "cvxpylayers_forward_ms",
                                      "cvxpylayers_backward_ms"))  # times are printed, never asserted
    assert "fwd cvxl" in out and "DAQP" in out
