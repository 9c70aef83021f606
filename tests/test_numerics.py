"""Numerical edge cases: singular and near-singular adjoint systems, degenerate KKT points, and
certification that rejects wrong answers injected on purpose.

Each black box here is a real solver (scipy or a closed form); each gradient is compared with a closed
form or central finite differences of the black box itself.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from zoo import KKT_SIMPLEX, by_name

import blackbox_diff as bbd
from blackbox_diff import linalg
from blackbox_diff.engine import solve_linear

LSTSQ_WARNING = "minimum-norm least-squares"


def solve_adjoint(matvec, g, *, structure, options):
    """The engine's linear-solve policy on an explicit operator v -> A v (a matrix as a matvec)."""
    B, n = g.shape

    def dense():
        return linalg.materialize(matvec, n, batch=B, dtype=g.dtype, device=g.device)

    return solve_linear(matvec, g, structure=structure, options=options, materialize=dense)


def _grad(fn, *params, weights=None):
    leaves = [p.clone().requires_grad_(True) for p in params]
    z = fn(*leaves)
    w = torch.ones_like(z) if weights is None else weights
    (w * z).sum().backward()
    return z.detach(), [leaf.grad for leaf in leaves]


# --- singular and near-singular adjoint systems ------------------------------------------------------
def test_singular_hessian_escalates_cg_to_least_squares_and_keeps_the_determined_gradient():
    # f = 0.5 (z0 - w)^2 + 0 * z1^2: the Hessian diag(1, 0) is singular; z1 is not determined by w.
    cond = bbd.Argmin(lambda z, w: 0.5 * (z[0] - w) ** 2 + 0.0 * z[1] ** 2)
    fn = bbd.implicit(cond)(lambda w: np.array([w, 0.0]))
    with pytest.warns(RuntimeWarning, match=re.escape(LSTSQ_WARNING)):
        _, (gw,) = _grad(fn, torch.tensor(0.7))
    assert torch.isfinite(gw) and gw.item() == pytest.approx(1.0, abs=1e-12)  # dz0/dw = 1, dz1/dw := 0


@pytest.mark.parametrize("solver", ["gmres", "bicgstab", "minres", "dense"])
def test_escalation_path_is_krylov_then_dense_then_least_squares(solver):
    # J^T = [[1, 0], [0, 0]]: singular; g = [1, 1] has no exact solution. Every method ends in lstsq.
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    g = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # instance 1 is consistent: u = [2, anything]

    def matvec(v):
        return v @ J  # (J^T v^T)^T for a batch of rows

    opts = bbd.ImplicitOptions(linear_solver=solver)
    with pytest.warns(RuntimeWarning, match=re.escape("singular or not solvable at batch instances [0")):
        u, history = solve_adjoint(matvec, g, structure="general", options=opts)
    methods = [h.method for h in history]
    assert methods[-1] == "lstsq" and methods[-2] == "dense"
    if solver != "dense":
        assert methods[0] == solver
    if solver in ("bicgstab", "minres"):  # a specialised Krylov method tries GMRES before densifying
        assert methods[1] == "gmres"
    torch.testing.assert_close(u, torch.tensor([[1.0, 0.0], [2.0, 0.0]]), atol=1e-10, rtol=0)


def test_a_diverging_neumann_series_escalates_to_gmres_not_to_a_dense_matrix():
    # T(z) = 2 z - w + 0.1 sin(z): the fixed point is not attracting (|T'| > 1), so the Neumann series for
    # (I - dT/dz)^T u = g diverges. GMRES solves it matrix-free; dz/dw = 1 / (1 + 0.1 cos z).
    cond = bbd.FixedPoint(lambda z, w: 2 * z - w + 0.1 * torch.sin(z))
    w = torch.tensor([0.3, -1.2, 2.0])
    z_star = torch.tensor(scipy.optimize.fsolve(lambda z: z - (2 * z - w.numpy() + 0.1 * np.sin(z)), w.numpy(),
                                                xtol=1e-14))
    fn = bbd.implicit(cond, linear_solver="neumann", dense_max_size=0)(lambda w: z_star.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GMRES converges: no least-squares warning
        _, (gw,) = _grad(fn, w)
    torch.testing.assert_close(gw, 1 / (1 + 0.1 * torch.cos(z_star)), rtol=1e-8, atol=0)


def test_a_stalled_krylov_solve_above_the_densify_cap_raises_instead_of_materialising():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # singular: no Krylov method converges for g = [1, 1]
    opts = bbd.ImplicitOptions(linear_solver="gmres", dense_max_size=0)
    with pytest.raises(bbd.LinearSolveError, match=re.escape("not materialised as a dense fallback")):
        solve_adjoint(lambda v: v @ J, torch.tensor([[1.0, 1.0]]), structure="general", options=opts)


def test_near_singular_but_regular_system_is_solved_exactly_without_warning():
    # F = A z - w with A = diag(1, 1e-9): cond(A) = 1e9, still regular; dz/dw = A^{-1} exactly.
    eps = 1e-9
    cond = bbd.Root(lambda z, w: torch.stack([z[0], eps * z[1]]) - w)
    fn = bbd.implicit(cond, residual_tol=1e-12)(lambda w: np.array([w[0], w[1] / eps]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no escalation warning on a regular system
        _, (gw,) = _grad(fn, torch.tensor([0.5, 2e-9]))
    torch.testing.assert_close(gw, torch.tensor([1.0, 1.0 / eps]), rtol=1e-10, atol=0)


def test_badly_scaled_but_regular_system_is_not_mistaken_for_singular():
    # F = (z0 - w0, 1e-300 (z1 - w1)): a row scaled by 1e-300 is still regular; dz/dw = I exactly.
    eps = 1e-300
    cond = bbd.Root(lambda z, w: torch.stack([z[0] - w[0], eps * (z[1] - w[1])]))
    fn = bbd.implicit(cond)(lambda w: np.array([w[0], w[1]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, (gw,) = _grad(fn, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(gw, torch.tensor([1.0, 1.0]), atol=0, rtol=1e-12)


def test_system_singular_to_working_precision_warns_and_gives_the_minimum_norm_gradient():
    # J = [[1, 1], [1, 1 + 1e-17]] rounds to an exactly singular matrix in float64. The solutions z of
    # J z = w form a line; the black box picks the minimum-norm one. (J^T) u = (1, 1) has the
    # minimum-norm solution u = (1/2, 1/2), so dL/dw = u: finite, never Inf or NaN.
    d = 1e-17
    cond = bbd.Root(lambda z, w: torch.stack([z[0] + z[1] - w[0], z[0] + (1 + d) * z[1] - w[1]]))
    A = np.array([[1.0, 1.0], [1.0, 1.0 + d]])
    fn = bbd.implicit(cond)(lambda w: np.linalg.lstsq(A, w, rcond=None)[0])
    message = "Adjoint system (dF/dz)^T u = dL/dz singular or not solvable at batch instances [0]"
    with pytest.warns(RuntimeWarning, match=re.escape(message)):
        _, (gw,) = _grad(fn, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(gw, torch.tensor([0.5, 0.5]), atol=1e-12, rtol=0)


def test_ridge_regularises_a_singular_system_without_warning():
    cond = bbd.Root(lambda z, w: torch.stack([z[0] - w, 0.0 * z[1]]))
    fn = bbd.implicit(cond, ridge=1e-8)(lambda w: np.array([w, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, (gw,) = _grad(fn, torch.tensor(1.5), weights=torch.tensor([1.0, 0.0]))
    assert gw.item() == pytest.approx(1.0 / (1.0 + 1e-8), rel=1e-12)


def test_batch_with_one_singular_instance_leaves_the_others_exact():
    # F = [z0 - w0, w1 * z1]: instance with w1 = 0 is singular; the others are regular.
    cond = bbd.Root(lambda z, w: torch.stack([z[0] - w[0], w[1] * z[1]]))
    fn = bbd.implicit(cond, in_dims=0, linear_solver="gmres")(lambda w: np.array([w[0], 0.0]))
    W = torch.tensor([[0.5, 2.0], [1.0, 0.0], [-1.0, 3.0]])
    with pytest.warns(RuntimeWarning, match=re.escape("singular or not solvable at batch instances [1]")):
        _, (gW,) = _grad(fn, W)
    assert torch.isfinite(gW).all()
    torch.testing.assert_close(gW[[0, 2]], torch.tensor([[1.0, 0.0], [1.0, 0.0]]), atol=1e-12, rtol=0)


# --- degenerate KKT points ---------------------------------------------------------------------------
def test_duplicated_active_constraint_violates_licq_and_still_gives_the_right_gradient():
    # min (x - w)^2 s.t. x <= 0 and 2x <= 0, at w = 1: x* = 0, both active, multipliers not unique
    # (lam1 + 2 lam2 = 2): the KKT matrix is singular. Each constraint alone gives dx/dw = 0 (x pinned at
    # the bound): the derivative exists, and it is returned without a warning.
    cond = bbd.KKT(lambda x, w: ((x - w) ** 2).sum(), ineq=lambda x, w: torch.cat([x, 2 * x]))
    fn = bbd.implicit(cond)(lambda w: np.minimum(w, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, (gw,) = _grad(fn, torch.tensor([1.0]))
    assert x.item() == 0.0 and gw.item() == pytest.approx(0.0, abs=1e-12)


def test_redundant_equality_constraints_give_the_projection_gradient():
    # Projection of y onto {x0 + x1 = 1} stated twice (2x0 + 2x1 = 2): nu is not unique.
    # x = y - (sum y - 1)/2, so dx/dy = I - 11^T/2 whatever multipliers are chosen.
    cond = bbd.KKT(
        lambda x, y: 0.5 * ((x - y) ** 2).sum(),
        eq=lambda x, y: torch.stack([x.sum() - 1, 2 * x.sum() - 2]),
    )
    fn = bbd.implicit(cond)(lambda y: y - (y.sum() - 1) / 2)
    weights = torch.tensor([1.0, 3.0])
    with warnings.catch_warnings():  # the redundant equality is dropped: a regular system, no warning
        warnings.simplefilter("error")
        _, (gy,) = _grad(fn, torch.tensor([0.3, 0.9]), weights=weights)
    P = torch.eye(2) - 0.5 * torch.ones(2, 2)
    torch.testing.assert_close(gy, P @ weights, atol=1e-12, rtol=0)


def test_weakly_active_simplex_corner_is_finite_and_matches_one_sided_finite_differences():
    # y with y1 - y0 = 1 exactly: x = (0, 1, 0, ...) and constraint 0 is weakly active.
    y = torch.tensor([0.0, 1.0, -2.0])
    fn = bbd.implicit(KKT_SIMPLEX)(by_name("kkt").solve)
    weights = torch.tensor([1.0, 2.0, 5.0])
    with pytest.warns(RuntimeWarning, match="weakly active"):
        x, (gy,) = _grad(fn, y, weights=weights)
    torch.testing.assert_close(x, torch.tensor([0.0, 1.0, 0.0]), atol=1e-15, rtol=0)
    assert torch.isfinite(gy).all()
    # The one-sided derivative that keeps constraint 0 active: moving y0 down keeps x fixed.
    h = 1e-6
    solve = by_name("kkt").solve
    fd = (weights.numpy() @ (solve(y.numpy() - h * np.eye(3)[0]) - solve(y.numpy()))) / -h
    assert gy[0].item() == pytest.approx(fd, abs=1e-8)


def test_scipy_slsqp_kkt_point_with_recovered_multipliers_matches_finite_differences():
    # A real solver at a point where two constraints meet: min ||x - y||^2 s.t. x0 + x1 <= 1, x0 - x1 <= 0.
    cond = bbd.KKT(
        lambda x, y: ((x - y) ** 2).sum(),
        ineq=lambda x, y: torch.stack([x[0] + x[1] - 1, x[0] - x[1]]),
    )

    def slsqp(y):
        cons = [{"type": "ineq", "fun": lambda x: 1 - x[0] - x[1]}, {"type": "ineq", "fun": lambda x: x[1] - x[0]}]
        res = scipy.optimize.minimize(
            lambda x: ((x - y) ** 2).sum(), np.zeros(2), jac=lambda x: 2 * (x - y), constraints=cons,
            method="SLSQP", options={"ftol": 1e-15, "maxiter": 200},
        )
        return res.x

    fn = bbd.implicit(cond, residual_tol=1e-7)(slsqp)
    report = bbd.check_gradients(fn, torch.tensor([1.5, 0.2]), rtol=1e-5)
    assert report.ok, str(report)


# --- certification rejects wrong answers -------------------------------------------------------------
def _zoo_fn(name, solve, **options):
    p = by_name(name)
    return bbd.implicit(p.condition, **{**p.options, **options})(solve), p


@pytest.mark.parametrize("name", ["root", "argmin", "fixed_point"])
def test_an_answer_off_by_1e_4_is_rejected_with_its_residual(name):
    p = by_name(name)
    fn, _ = _zoo_fn(name, lambda *a: p.solve(*a) + 1e-4)
    message = f"does not satisfy the {p.condition.describe()} condition"
    with pytest.raises(bbd.CertificationError, match=re.escape(message)) as info:
        fn(*p.params())
    assert info.value.residual > info.value.tolerance
    assert info.value.tolerance == 1e-5  # relative to the size of each component's terms


def test_an_unconverged_solver_is_rejected_but_a_converged_one_passes():
    p = by_name("fixed_point")

    def iterate(W, x, steps):
        z = np.zeros_like(x)
        for _ in range(steps):
            z = np.tanh(W @ z + x)
        return z

    with pytest.raises(bbd.CertificationError):
        bbd.implicit(p.condition)(lambda W, x: iterate(W, x, 3))(*p.params())
    z = bbd.implicit(p.condition)(lambda W, x: iterate(W, x, 60))(*p.params())
    torch.testing.assert_close(z, torch.as_tensor(p.solve(*[q.numpy() for q in p.params()])), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "answer",
    [
        bbd.KKTSolution(x=[0.7, 0.6, -0.3, 0.0]),  # infeasible: x2 < 0 and sum x != 1
        bbd.KKTSolution(x=[0.5, 0.5, 0.0, 0.0]),  # feasible, not optimal
        bbd.KKTSolution(x=[0.7, 0.3, 0.0, 0.0], eq=[0.5], ineq=[0.0, 0.0, 0.4, 0.1]),  # wrong multipliers
    ],
    ids=["infeasible", "not-optimal", "wrong-multipliers"],
)
def test_wrong_kkt_answers_are_rejected(answer):
    y = torch.tensor([0.9, 0.5, -0.4, 0.1])  # projection: x = (0.7, 0.3, 0, 0), nu = 0.2, lam = (0, 0, .6, .1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # weakly-active notes on the wrong points
        with pytest.raises(bbd.CertificationError, match=re.escape("does not satisfy the KKT condition")):
            bbd.implicit(KKT_SIMPLEX)(lambda y: answer)(y)


def test_a_stationary_point_with_a_negative_multiplier_is_rejected():
    # min (x - w)^2 s.t. x <= 0 at w = -1: x* = -1 (inactive). x = 0 with lam = -2 is stationary
    # (2 (x - w) + lam = 0) and feasible, but dual infeasible: the certificate catches lam < 0.
    cond = bbd.KKT(lambda x, w: (x - w) ** 2, ineq=lambda x, w: x)
    fn = bbd.implicit(cond)(lambda w: bbd.KKTSolution(x=0.0, ineq=[-2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(bbd.CertificationError, match=re.escape("components 3 (2, relative 0.997)")):
            fn(torch.tensor(-1.0))


def test_the_right_kkt_answer_with_its_multipliers_passes():
    y = torch.tensor([0.9, 0.5, -0.4, 0.1])
    answer = bbd.KKTSolution(x=[0.7, 0.3, 0.0, 0.0], eq=[0.2], ineq=[0.0, 0.0, 0.6, 0.1])
    sol = bbd.implicit(KKT_SIMPLEX, return_duals=True)(lambda y: answer)(y)
    torch.testing.assert_close(sol.ineq, torch.tensor([0.0, 0.0, 0.6, 0.1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(sol.eq, torch.tensor([0.2]), atol=1e-12, rtol=0)


def test_injected_wrong_answer_in_a_batch_fails_only_that_instance():
    p = by_name("root")
    A, b = p.params()
    B = torch.stack([b, 2 * b, -b])

    def sabotaged(A, b):
        x = p.solve(A, b)
        return x + 1e-3 if b[0] < 0 else x

    fn = bbd.implicit(p.condition, in_dims=(None, 0), on_failure="nan")(sabotaged)
    with pytest.warns(RuntimeWarning, match=re.escape("at batch index 2 does not satisfy the Root condition")):
        Z, (gA, gB) = _grad(fn, A, B)
    assert torch.isnan(Z[2]).all() and (gB[2] == 0).all()
    Z2, (gA2, gB2) = _grad(bbd.implicit(p.condition, in_dims=(None, 0))(p.solve), A, B[:2])
    torch.testing.assert_close(Z[:2], Z2, atol=0, rtol=0)
    torch.testing.assert_close(gA, gA2, atol=1e-12, rtol=0)


def test_certification_threshold_is_relative_to_the_terms_in_any_units():
    # x**2 - w = 0: a relative error e in z gives |F| / |terms| ~ e, whatever the scale of w or of F.
    for w0, unit in [(1e6, 1.0), (1e-6, 1.0), (4.0, 1e-9), (4.0, 1e9)]:
        cond = bbd.Root(lambda x, w, unit=unit: unit * (x**2 - w))
        w = torch.tensor(w0)
        assert bbd.implicit(cond)(lambda w: np.sqrt(w) * (1 + 1e-9))(w).item() == pytest.approx(np.sqrt(w0))
        with pytest.raises(bbd.CertificationError, match=re.escape("relative to the size of their terms")):
            bbd.implicit(cond)(lambda w: np.sqrt(w) * (1 + 1e-4))(w)


def test_identity_structure_is_checked_by_one_vjp_and_escalates_when_it_does_not_hold():
    g = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    opts = bbd.ImplicitOptions()
    u, history = solve_adjoint(lambda v: v, g, structure="identity", options=opts)
    assert [h.method for h in history] == ["identity"] and torch.equal(u, g)
    J = torch.tensor([[2.0, 1.0], [0.0, 3.0]])  # a preconditioner that is off: dF/dz != I
    u, history = solve_adjoint(lambda v: v @ J, g, structure="identity", options=opts)
    assert [h.method for h in history] == ["identity", "gmres"]
    torch.testing.assert_close(u @ J, g, atol=1e-10, rtol=0)


def test_a_wrong_identity_claim_is_caught_in_forward_mode_too():
    # dF/dz = 2x != I although the condition claims "identity": the tangent system's check (a VJP, as good a
    # test of A = I as a JVP) sends it to an iterative solve, and the JVP is right.
    import torch.autograd.forward_ad as fwAD

    fn = bbd.implicit(bbd.Root(lambda x, w: x**2 - w, structure="identity"), in_dims=0)(np.sqrt)
    w = torch.tensor([4.0, 9.0], dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(w, torch.ones(2, dtype=torch.float64)))).tangent
    torch.testing.assert_close(tangent, torch.tensor([0.25, 1 / 6], dtype=torch.float64), atol=1e-9, rtol=0)
