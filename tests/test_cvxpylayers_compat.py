"""A cvxpylayers user switches to bbd.layer without losing a feature (issue 16).

Every feature of cvxpylayers 1.2 is exercised here on small problems of every cone type, single and
batched, against what is known to be right: cvxpy's own ``dual_value`` and values, closed forms (projections
onto cones, whose duals are 2 (z - p)), ``torch.autograd.gradcheck`` (central differences of the layer
itself, float64, default tolerances) and cvxpylayers side by side on its README examples. cvxpylayers is a
dev dependency; it is run with SCS at eps=1e-10 where its values are compared (its Clarabel path stops ~1e-5
from the solution on these problems).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch

import blackbox_diff as bbd

pytestmark = [
    # cvxpylayers 1.2 trips numpy 2's __array__ deprecation inside its diffcp interface.
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning"),
]

REFERENCE = {"solve_method": "SCS", "eps": 1e-10, "max_iters": 200_000}  # cvxpylayers, accurate


def _t(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def _cvxpylayers(problem, parameters, variables, **kwargs):
    from cvxpylayers.torch import CvxpyLayer

    return CvxpyLayer(problem, parameters=parameters, variables=variables, **kwargs)


def _gradcheck(layer, values, fast_mode=False):
    """torch.autograd.gradcheck with its default tolerances (fast_mode: one random direction, for batches)."""
    inputs = [v.detach().clone().requires_grad_(True) for v in values]
    return torch.autograd.gradcheck(lambda *p: layer(*p), inputs, fast_mode=fast_mode)


def _reference_solve(problem, parameters, values, **kwargs):
    for p, v in zip(parameters, values, strict=True):
        p.value = v.detach().numpy()
    problem.solve(**{"solver": "CLARABEL", "tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10,
                     **kwargs})


def _fd_grads(loss, values, h=1e-6):
    """Central differences of the scalar loss(*values): the black box's own derivative, entry by entry."""
    base = [v.detach().clone() for v in values]
    grads = []
    with torch.no_grad():
        for i, v in enumerate(base):
            g = torch.zeros(v.numel(), dtype=torch.float64)
            for k in range(v.numel()):
                up, dn = [q.clone() for q in base], [q.clone() for q in base]
                up[i].view(-1)[k] += h
                dn[i].view(-1)[k] -= h
                g[k] = (loss(*up) - loss(*dn)) / (2 * h)
            grads.append(g.reshape(v.shape))
    return grads


# --- 1. dual variables of every constraint type -------------------------------------------------------------


def _projection(kind):
    """min ||z - p||^2 s.t. z in K: z = Pi_K(p) and the constraint's dual is 2 (z - p) (in K*)."""
    if kind == "zero":  # a vector equality: z = p + A^T nu / 2, nu the dual
        z, p = cp.Variable(3), cp.Parameter(3)
        con = cp.hstack([z[0] + z[1], z[1] - 2 * z[2]]) == np.array([0.5, -1.0])
        return z, p, con, _t([0.3, -0.4, 1.0])
    if kind == "nonneg":
        z, p = cp.Variable(4), cp.Parameter(4)
        return z, p, z >= 0, _t([0.5, -1.0, 0.3, -0.2])
    if kind == "soc":  # one cone: cp.SOC(t, x) with scalar t
        z, p = cp.Variable(3), cp.Parameter(3)
        return z, p, cp.SOC(z[0], z[1:]), _t([0.5, 1.0, -0.8])
    if kind == "multi-soc":  # cp.SOC with a vector t: one cone per column (axis=0), interleaved in the program
        z, p = cp.Variable((3, 3)), cp.Parameter((3, 3))
        value = _t([[0.5, 2.0, -0.3], [1.0, 0.3, 0.4], [-0.8, 0.1, 0.2]])
        return z, p, cp.SOC(z[0], z[1:], axis=0), value
    if kind == "exp":
        z, p = cp.Variable(3), cp.Parameter(3)
        return z, p, cp.constraints.ExpCone(z[0], z[1], z[2]), _t([1.0, 0.5, 0.8])
    if kind == "pow":
        z, p = cp.Variable(3), cp.Parameter(3)
        return z, p, cp.constraints.PowCone3D(z[0], z[1], z[2], 0.3), _t([0.5, 0.2, 1.0])
    if kind == "psd":
        z, p = cp.Variable((3, 3), symmetric=True), cp.Parameter((3, 3), symmetric=True)
        return z, p, z >> 0, _t([[1.0, 0.5, 0.2], [0.5, -1.0, 0.3], [0.2, 0.3, 0.4]])
    raise ValueError(kind)


KINDS = ["zero", "nonneg", "soc", "multi-soc", "exp", "pow", "psd"]


def _projection_layer(kind, **options):
    z, p, con, value = _projection(kind)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [con])
    layer = bbd.layer(problem, parameters=[p], variables=[z, *con.dual_variables], **options)
    return problem, z, p, con, value, layer


def _stacked(con, duals):
    """The constraint's duals in z's own coordinates (a cone's parts put back together), to set against 2 (z - p)."""
    if isinstance(con, cp.SOC):  # (t, x) per cone; with a vector t, cone j is column j
        t, x = duals
        return torch.cat([t.reshape(1, *x.shape[1:]), x])
    if len(duals) == 3:  # exponential and power cones: one scalar per coordinate
        return torch.stack(duals)
    return duals[0]


@pytest.mark.parametrize("kind", KINDS)
def test_dual_variables_have_cvxpys_values_and_signs(kind):
    problem, z, p, con, value, layer = _projection_layer(kind)
    z_t, *duals = layer(value)
    _reference_solve(problem, [p], [value])
    torch.testing.assert_close(z_t, _t(z.value), atol=2e-6, rtol=0)
    assert len(duals) == len(con.dual_variables)
    for d, dv in zip(duals, con.dual_variables, strict=True):
        assert d.shape == dv.shape
        torch.testing.assert_close(d, _t(np.reshape(dv.value, dv.shape)), atol=5e-6, rtol=0)
    if kind != "zero":  # closed form: the dual of z in K at the projection is 2 (z - p), in z's coordinates
        torch.testing.assert_close(_stacked(con, duals), 2 * (z_t - value), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_dual_variables_pass_gradcheck_single_and_batched(kind):
    *_, value, layer = _projection_layer(kind)
    assert _gradcheck(layer, [value])
    assert _gradcheck(layer, [torch.stack([value, 0.8 * value + 0.05])], fast_mode=True)


def test_duals_in_any_order_mixed_with_variables_and_with_return_duals():
    x, y = cp.Variable(3), cp.Variable(2)
    c, b = cp.Parameter(3), cp.Parameter(2)
    eq = x[:2] + y == b
    ineq = x >= -0.2
    soc = cp.SOC(y[0] + 2, x)
    problem = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x) + cp.sum_squares(y)), [eq, ineq, soc])
    values = [_t([1.0, -0.5, 0.3]), _t([0.4, -0.3])]
    handles = [soc.dual_variables[1], y, eq.dual_variables[0], x, ineq.dual_variables[0], soc.dual_variables[0]]
    out = bbd.layer(problem, parameters=[c, b], variables=handles)(*values)
    _reference_solve(problem, [c, b], values)
    for o, h in zip(out, handles, strict=True):
        torch.testing.assert_close(o, _t(np.reshape(h.value, h.shape)), atol=1e-6, rtol=0)
    x_t, y_t, eq_t, ineq_t, soc_t = bbd.layer(problem, parameters=[c, b], variables=[x, y], return_duals=True)(*values)
    torch.testing.assert_close(eq_t, out[2], atol=1e-12, rtol=0)
    torch.testing.assert_close(ineq_t, out[4], atol=1e-12, rtol=0)
    assert isinstance(soc_t, tuple)  # a second-order cone has two dual variables, as cvxpy's dual_value
    torch.testing.assert_close(soc_t[0], out[5], atol=1e-12, rtol=0)
    torch.testing.assert_close(soc_t[1], out[0], atol=1e-12, rtol=0)
    batched = bbd.layer(problem, parameters=[c, b], variables=[x, y], return_duals=True)(
        values[0].expand(2, 3), values[1])
    torch.testing.assert_close(batched[4][1][1], soc_t[1], atol=1e-12, rtol=0)


# --- 2. log-log convex programs (gp=True) ---------------------------------------------------------------------


def _readme_gp():
    x, y, z = cp.Variable(pos=True), cp.Variable(pos=True), cp.Variable(pos=True)
    a, b, c = cp.Parameter(pos=True, value=2.0), cp.Parameter(pos=True, value=1.0), cp.Parameter(value=0.5)
    problem = cp.Problem(cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y**c])
    assert problem.is_dgp(dpp=True)
    return problem, [a, b, c], [x, y, z]


def test_gp_closed_form_values_and_gradients():
    # min x + y s.t. x y >= k, x <= 4 y: x = y = sqrt(k) (the second constraint inactive); dx/dk = 1/(2 sqrt k).
    x, y = cp.Variable(pos=True), cp.Variable(pos=True)
    k = cp.Parameter(pos=True)
    problem = cp.Problem(cp.Minimize(x + y), [x * y >= k, x <= 4 * y])
    layer = bbd.layer(problem, parameters=[k], variables=[x, y], gp=True)
    k_t = _t([0.5, 2.0, 9.0], grad=True)
    x_t, y_t = layer(k_t)  # a batch of three
    torch.testing.assert_close(x_t, torch.sqrt(k_t), atol=1e-9, rtol=0)
    torch.testing.assert_close(y_t, torch.sqrt(k_t), atol=1e-9, rtol=0)
    (g,) = torch.autograd.grad(x_t.sum(), k_t)
    torch.testing.assert_close(g, 0.5 / torch.sqrt(k_t.detach()), atol=1e-8, rtol=0)


def test_gp_duals_match_cvxpy_and_pass_gradcheck():
    problem, params, variables = _readme_gp()
    duals = [con.dual_variables[0] for con in problem.constraints]
    layer = bbd.layer(problem, parameters=params, variables=variables + duals, gp=True)
    values = [_t(2.0), _t(1.0), _t(0.5)]
    x, y, z, lam1, lam2 = layer(*values)
    problem.solve(gp=True, solver="CLARABEL")
    for o, h in zip((x, y, z, lam1, lam2), variables + duals, strict=True):
        torch.testing.assert_close(o, _t(h.value), atol=3e-5, rtol=0)  # cvxpy's own answer is ~1e-5 off here
    # KKT of the log-space problem (u = log x, ...): min -(u + v + w) s.t. log(a S / b) <= 0, c v - u <= 0 with
    # S = xy + xz + yz; both constraints are active and stationarity gives the multipliers in closed form.
    S = x * y + x * z + y * z
    torch.testing.assert_close(2.0 * S, _t(1.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(x, torch.sqrt(y), atol=1e-12, rtol=0)
    torch.testing.assert_close(lam1, S / (x * z + y * z), atol=1e-10, rtol=0)
    torch.testing.assert_close(lam2, (x * y + x * z) / (x * z + y * z) - 1.0, atol=1e-10, rtol=0)
    assert _gradcheck(layer, values)
    batch = [torch.stack([values[0], 1.5 * values[0]]), values[1], torch.stack([values[2], 0.3 * values[2]])]
    assert _gradcheck(layer, batch, fast_mode=True)


def test_gp_non_positive_parameter_is_an_input_error():
    problem, params, variables = _readme_gp()
    layer = bbd.layer(problem, parameters=params, variables=variables, gp=True)
    message = ("Parameter 1 ('" + params[1].name() + "') must be positive (gp=True solves the problem with its "
               "logarithm); got -1. Pass positive values, e.g. through torch.exp or softplus of an unconstrained "
               "tensor.")
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        layer(_t(2.0), _t(-1.0), _t(0.5))
    # The exponent c is not taken the logarithm of: a negative c is a valid value (y**c with c < 0).
    x_t, *_ = layer(_t(2.0), _t(1.0), _t(-0.5))
    assert bool(torch.isfinite(x_t))


def test_gp_needs_a_dgp_problem_and_a_dgp_problem_needs_gp():
    problem, params, variables = _readme_gp()
    with pytest.raises(bbd.InputError, match=re.escape("It is log-log convex (DGP): pass gp=True.")):
        bbd.layer(problem, parameters=params, variables=variables)
    x, a = cp.Variable(2), cp.Parameter(2)
    convex = cp.Problem(cp.Minimize(cp.sum_squares(x - a)))
    message = "gp=True needs a log-log convex program (DGP) that is also DPP"
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.layer(convex, parameters=[a], variables=[x], gp=True)


def test_declared_parameter_sign_is_checked():
    x, a = cp.Variable(2), cp.Parameter(2, nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) - a @ x))
    layer = bbd.layer(problem, parameters=[a], variables=[x])
    message = "Parameter 0 ('" + a.name() + "') must be non-negative (the parameter is declared nonneg=True); got -0.5 "
    with pytest.raises(bbd.InputError, match=re.escape(message + "at indices [[1]]. Pass non-negative values.")):
        layer(_t([1.0, -0.5]))


# --- 3. symmetric, PSD and diagonal variables; symmetric parameters -------------------------------------------


def _psd_projection(P):
    lam, Q = torch.linalg.eigh(P)
    return (Q * torch.clamp(lam, min=0)) @ Q.mT


@pytest.mark.parametrize("attribute", ["symmetric", "PSD"])
def test_symmetric_and_psd_variables_come_back_full(attribute):
    X = cp.Variable((3, 3), **{attribute: True})
    P = cp.Parameter((3, 3), symmetric=True)
    constraints = [X >> 0] if attribute == "symmetric" else []
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - P)), constraints)
    layer = bbd.layer(problem, parameters=[P], variables=[X])
    P_t = _t([[1.0, 0.5, 0.2], [0.5, -1.0, 0.3], [0.2, 0.3, 0.4]], grad=True)
    (X_t,) = layer(P_t)
    torch.testing.assert_close(X_t, _psd_projection(P_t.detach()), atol=1e-8, rtol=0)
    # Gradient of a non-symmetric weighting: the same as through the closed form (symmetric in P).
    W = _t([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0]])
    (g,) = torch.autograd.grad((W * X_t).sum(), P_t)
    P_ref = P_t.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((W * _psd_projection(0.5 * (P_ref + P_ref.mT))).sum(), P_ref)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(g, g.mT, atol=1e-12, rtol=0)
    assert _gradcheck(layer, [P_t])


def test_diagonal_variable_comes_back_full():
    D = cp.Variable((3, 3), diag=True)
    P = cp.Parameter((3, 3))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(D - P)), [cp.diag(D) >= 0])
    P_t = _t([[1.0, 2.0, 3.0], [4.0, -1.0, 6.0], [7.0, 8.0, 0.5]], grad=True)
    (D_t,) = bbd.layer(problem, parameters=[P], variables=[D])(P_t)
    torch.testing.assert_close(D_t, torch.diag(torch.clamp(torch.diagonal(P_t.detach()), min=0)), atol=1e-9, rtol=0)
    (g,) = torch.autograd.grad(D_t.sum(), P_t)
    torch.testing.assert_close(g, torch.diag(_t([1.0, 0.0, 1.0])), atol=1e-9, rtol=0)


def test_symmetric_parameter_gradient_is_symmetric_and_right_along_symmetric_directions():
    # Perturbing a symmetric parameter along a symmetric direction E changes the solution by <grad, E>.
    X = cp.Variable((2, 2), symmetric=True)
    C = cp.Parameter((2, 2), symmetric=True)
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1])
    layer = bbd.layer(problem, parameters=[C], variables=[X])
    C0 = _t([[0.3, 0.8], [0.8, -0.2]])
    C_t = C0.clone().requires_grad_(True)
    (X_t,) = layer(C_t)
    (g,) = torch.autograd.grad(X_t[0, 1], C_t)
    torch.testing.assert_close(g, g.mT, atol=1e-12, rtol=0)
    E = _t([[0.0, 1.0], [1.0, 0.0]])
    h = 1e-6
    fd = (layer(C0 + h * E)[0][0, 1] - layer(C0 - h * E)[0][0, 1]) / (2 * h)
    torch.testing.assert_close((g * E).sum(), fd, atol=1e-7, rtol=0)


# --- 4. solver_args per call, solver constants ------------------------------------------------------------


def _readme_lad():
    n, m = 2, 3
    x = cp.Variable(n)
    A, b = cp.Parameter((m, n)), cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    return problem, A, b, x


def _lad_values(batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    return (torch.randn(*shape, 3, 2, generator=gen, dtype=torch.float64),
            torch.randn(*shape, 3, generator=gen, dtype=torch.float64))


def test_solver_args_per_call_merge_over_the_construction_time_ones():
    problem, A, b, x = _readme_lad()
    values = _lad_values()
    starved = bbd.layer(problem, parameters=[A, b], variables=[x], solver_args={"max_iter": 1, "tol_feas": 1e-9})
    with pytest.raises(bbd.SolverError, match=re.escape("(status 'user_limit', CLARABEL: 'MaxIterations')")):
        starved(*values)
    (sol,) = starved(*values, solver_args={"max_iter": 200})  # overrides max_iter, keeps tol_feas
    (ref,) = bbd.layer(problem, parameters=[A, b], variables=[x])(*values)
    torch.testing.assert_close(sol, ref, atol=1e-9, rtol=0)
    per_call = starved.compiled.on_call(values, {"solver_args": {"max_iter": 200}})
    assert per_call.solve.args == {"max_iter": 200, "tol_feas": 1e-9}
    with pytest.raises(bbd.SolverError, match=re.escape("MaxIterations")):
        starved(*values)  # the per-call settings do not stick


def test_solver_args_eps_and_solve_method_as_in_cvxpylayers():
    problem, A, b, x = _readme_lad()
    values = _lad_values(batch=2)
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    (ref,) = layer(*values)
    for args in ({"eps": 1e-10}, {"solve_method": "SCS", "eps": 1e-10}, {"solve_method": "ECOS"}):
        (sol,) = layer(*values, solver_args=args)
        torch.testing.assert_close(sol, ref, atol=1e-8, rtol=0)
    # 'eps' sets every tolerance of the solver that runs; 'solve_method' picks it (diffcp's names).
    clarabel = layer.compiled.on_call(values, {"solver_args": {"eps": 1e-10}}).solve
    assert (clarabel.solver, clarabel.args["tol_gap_abs"], clarabel.args["tol_feas"]) == ("CLARABEL", 1e-10, 1e-10)
    scs = layer.compiled.on_call(values, {"solver_args": {"solve_method": "SCS", "eps": 1e-7}}).solve
    assert (scs.solver, scs.args["eps_abs"], scs.args["eps_rel"]) == ("SCS", 1e-7, 1e-7)
    with pytest.raises(bbd.SolverError, match=re.escape("solver SCS did not solve the problem")):
        layer(*values, solver_args={"solve_method": "SCS", "max_iters": 2})


@pytest.mark.parametrize("solver", [cp.CLARABEL, cp.SCS, cp.ECOS, cp.DIFFCP, cp.CUCLARABEL])
def test_solver_accepts_cvxpys_solver_constants(solver):
    problem, A, b, x = _readme_lad()
    values = _lad_values()
    (sol,) = bbd.layer(problem, parameters=[A, b], variables=[x], solver=solver)(*values)
    (ref,) = bbd.layer(problem, parameters=[A, b], variables=[x])(*values)
    torch.testing.assert_close(sol, ref, atol=1e-8, rtol=0)


def test_solver_args_errors():
    problem, A, b, x = _readme_lad()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    values = _lad_values()
    with pytest.raises(bbd.InputError, match=re.escape(
        "solver_args ['acceleration_lookback'] are not settings of CLARABEL, the solver this layer runs (SCS's "
        "settings need solver='SCS' or solver_args={'solve_method': 'SCS'}); CLARABEL's settings are ["
    )):
        layer(*values, solver_args={"acceleration_lookback": 0})
    with pytest.raises(bbd.InputError, match=re.escape(
        "The cvxpy layer takes the keyword argument solver_args at call time, not ['warm_start']."
    )):
        layer(*values, warm_start=True)
    with pytest.raises(bbd.InputError, match=re.escape("solver_args['eps'] must be a positive number")):
        layer(*values, solver_args={"eps": -1.0})
    with pytest.raises(bbd.InputError, match=re.escape("solver_args must be a dict of solver settings; got list.")):
        layer(*values, solver_args=[1e-8])
    with pytest.raises(bbd.InputError, match=re.escape("solver 'MOSEK' is not supported; expected one of")):
        bbd.layer(problem, parameters=[A, b], variables=[x], solver=cp.MOSEK)


# --- 5. batching and broadcasting exactly as cvxpylayers -------------------------------------------------------


def _duals_readme():
    x, c, b = cp.Variable(2), cp.Parameter(2), cp.Parameter()
    eq_con = cp.sum(x) == b
    problem = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)), [eq_con, x >= 0])
    return problem, [c, b], [x, eq_con.dual_variables[0]]


BATCHING = {
    "unbatched": (_t([1.0, 1.5]), _t(1.0)),
    "batch of one": (_t([[1.0, 1.5]]), _t([1.0])),
    "batched vector, shared scalar": (_t([[1.0, 1.5], [0.5, 0.2], [0.0, 0.3]]), _t(1.0)),
    "shared vector, batched scalar": (_t([1.0, 1.5]), _t([1.0, 2.0, 0.8])),
    "batch of one and shared scalar": (_t([[1.0, 1.5]]), _t(1.0)),
}


@pytest.mark.parametrize("case", list(BATCHING))
def test_batching_and_broadcasting_match_cvxpylayers(case):
    problem, params, variables = _duals_readme()
    values = BATCHING[case]
    ours = bbd.layer(problem, parameters=params, variables=variables)
    theirs = _cvxpylayers(problem, params, variables)
    results = []
    for layer, kwargs in ((ours, {}), (theirs, {"solver_args": REFERENCE})):
        inputs = [v.clone().requires_grad_(True) for v in values]
        out = layer(*inputs, **kwargs)
        (out[0].sum() + 2 * out[1].sum()).backward()
        results.append((out, [v.grad for v in inputs]))
    (o1, g1), (o2, g2) = results
    assert [t.shape for t in o1] == [t.shape for t in o2]
    for a, b in zip(o1 + tuple(g1), o2 + tuple(g2), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --- 6. misuse at call time -------------------------------------------------------------------------------------


def test_none_parameter_is_an_input_error_naming_it():
    problem, A, b, x = _readme_lad()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x])
    message = (f"Parameter 1 ('{b.name()}') is None; expected a torch.Tensor of shape (3,) (or with a leading "
               "batch dimension).")
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        layer(torch.zeros(3, 2, dtype=torch.float64), None)


# --- 7. beyond cvxpylayers: gradcheck where its own fails ------------------------------------------------------


def _sdp_symmetric_parameter():
    X, C = cp.Variable((3, 3), symmetric=True), cp.Parameter((3, 3), symmetric=True)
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X) + cp.sum_squares(X)), [X >> 0, cp.trace(X) == 1])
    return problem, [C], [X], [_t([[1.0, 0.5, -0.3], [0.5, -0.4, 0.2], [-0.3, 0.2, 0.7]])]


def _inequality_duals():
    x, p, u = cp.Variable(4), cp.Parameter(4), cp.Parameter(4)
    con = x <= u
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [con])
    return problem, [p, u], [x, con.dual_variables[0]], [_t([1.5, 0.2, 2.0, -1.0]), _t(np.ones(4))]


def _vector_equality_duals():
    x, p, A, b = cp.Variable(3), cp.Parameter(3), cp.Parameter((2, 3)), cp.Parameter(2)
    con = A @ x == b
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [con])
    values = [_t([0.3, -0.5, 1.0]), _t([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]]), _t([0.5, -0.2])]
    return problem, [p, A, b], [x, con.dual_variables[0]], values


@pytest.mark.parametrize("make", [_sdp_symmetric_parameter, _inequality_duals, _vector_equality_duals],
                         ids=["sdp-symmetric-parameter", "inequality-duals", "vector-equality-duals"])
def test_gradcheck_passes_where_cvxpylayers_fails(make):
    # cvxpylayers 1.2 fails torch.autograd.gradcheck on each of these with solve_method="Clarabel" (and on the
    # inequality duals with its default too); see docs/backends/cvxpy.md for the measured errors.
    problem, params, variables, values = make()
    layer = bbd.layer(problem, parameters=params, variables=variables)
    assert _gradcheck(layer, values)
    assert _gradcheck(layer, [torch.stack([v, 1.1 * v]) for v in values], fast_mode=True)


# --- the cvxpylayers README, side by side --------------------------------------------------------------------------


def _side_by_side(problem, params, variables, values, *, gp=False, weights=None):
    """(ours, theirs): outputs and gradients of sum(w_k * output_k) for both layers, and the finite-difference
    gradient of our black box, so that 'agree where cvxpylayers is accurate' can be stated."""
    ours = bbd.layer(problem, parameters=params, variables=variables, gp=gp)
    theirs = _cvxpylayers(problem, params, variables, gp=gp)
    found = []
    for layer, kwargs in ((ours, {}), (theirs, {"solver_args": REFERENCE})):
        inputs = [v.clone().requires_grad_(True) for v in values]
        out = layer(*inputs, **kwargs)
        loss = sum((k + 1.0) * o.sum() for k, o in enumerate(out))
        found.append(([o.detach() for o in out], torch.autograd.grad(loss, inputs)))

    def loss(*v):
        return sum((k + 1.0) * o.sum() for k, o in enumerate(ours(*v)))

    return found[0], found[1], _fd_grads(loss, values)


def _assert_side_by_side(ours, theirs, fd, value_tol=1e-6):
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a, b, atol=value_tol, rtol=0)
    for g_ours, g_theirs, g_fd in zip(ours[1], theirs[1], fd, strict=True):
        torch.testing.assert_close(g_ours, g_fd, atol=1e-6, rtol=1e-6)  # ours: right
        theirs_error = float((g_theirs - g_fd).abs().max())
        # Where cvxpylayers is accurate, the two agree to within its own error.
        assert float((g_ours - g_theirs).abs().max()) <= theirs_error + 1e-6


def test_readme_lad_example_single_and_batched_side_by_side():
    problem, A, b, x = _readme_lad()
    for values in (_lad_values(), _lad_values(batch=4, seed=1)):
        _assert_side_by_side(*_side_by_side(problem, [A, b], [x], list(values)))


def test_readme_dual_variables_example_side_by_side():
    x, c, b = cp.Variable(2), cp.Parameter(2), cp.Parameter()
    eq_con = cp.sum(x) == b
    problem = cp.Problem(cp.Minimize(c @ x), [eq_con, x >= 0])  # the README's LP, as written
    values = [_t([1.0, 2.0]), _t(1.0)]
    ours, theirs, fd = _side_by_side(problem, [c, b], [x, eq_con.dual_variables[0]], values)
    torch.testing.assert_close(ours[0][0], _t([1.0, 0.0]), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours[0][1], _t(-1.0), atol=1e-12, rtol=0)  # cvxpy's sign: -c_0
    _assert_side_by_side(ours, theirs, fd)


def test_readme_gp_example_side_by_side():
    problem, params, variables = _readme_gp()
    ours, theirs, fd = _side_by_side(problem, params, variables, [_t(2.0), _t(1.0), _t(0.5)], gp=True)
    _assert_side_by_side(ours, theirs, fd)


def test_readme_solver_args_example_side_by_side():
    problem, A, b, x = _readme_lad()
    values = _lad_values(seed=2)
    (ours,) = bbd.layer(problem, parameters=[A, b], variables=[x])(*values, solver_args={"eps": 1e-8})
    (theirs,) = _cvxpylayers(problem, [A, b], [x])(*values, solver_args={"eps": 1e-8, "solve_method": "SCS",
                                                                        "max_iters": 200_000})
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_switch_example_runs_with_duals_gp_and_solver_args():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import cvxpylayers_switch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cvxpylayers_switch.main(["--fast"])
    assert result["max_gradient_difference"] < 1e-5
    assert result["dual_error"] < 1e-8
    assert result["gp_error"] < 1e-8
    assert result["per_call_eps_difference"] < 1e-8


def test_verbose_and_canon_backend_as_in_cvxpylayers(capfd):
    problem, A, b, x = _readme_lad()
    values = _lad_values()
    (ref,) = bbd.layer(problem, parameters=[A, b], variables=[x])(*values)
    capfd.readouterr()
    layer = bbd.layer(problem, parameters=[A, b], variables=[x], verbose=True, canon_backend=cp.SCIPY_CANON_BACKEND)
    (sol,) = layer(*values)
    assert "Clarabel" in capfd.readouterr().out  # the solver printed its progress
    torch.testing.assert_close(sol, ref, atol=1e-9, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_duals_gp_and_symmetric_outputs_on_cuda_match_the_cpu():
    cases = [_projection_layer("soc")[-2:], _projection_layer("psd")[-2:]]
    problem, params, variables = _readme_gp()
    cases.append(([_t(2.0), _t(1.0), _t(0.5)], bbd.layer(problem, parameters=params, variables=variables, gp=True)))
    for values, layer in cases:
        values = values if isinstance(values, list) else [values]
        results = []
        for device in ("cpu", "cuda"):
            inputs = [v.detach().to(device).requires_grad_(True) for v in values]
            out = layer(*inputs)
            assert all(o.device.type == device for o in out)
            grads = torch.autograd.grad(sum(o.sum() for o in out), inputs)
            results.append([t.detach().cpu() for t in (*out, *grads)])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, atol=1e-9, rtol=0)
