"""Certification at any scale and degenerate points in the engine (bbd.implicit with bbd.Root / bbd.KKT /
bbd.Argmin black boxes). Each case is one where the easy implementation returns a wrong number silently:
a global ``1 + max|z|`` threshold, a Krylov solve that "converges" on a singular KKT system, a least-squares
split of a kink. Backends (cvxpy, QP, CasADi) have their own cases in test_degenerate.py."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import blackbox_diff as bbd

torch.set_default_dtype(torch.float64)
SOLVERS = ["auto", "dense", "minres", "gmres", "bicgstab", "lstsq"]


# --- certification: wrong answers refused in any units, right ones accepted ------------------------------
@pytest.mark.parametrize("unit", [1e-6, 1.0, 1e6])
def test_a_scaled_residual_cannot_hide_a_wrong_answer(unit):
    """F = unit (x^2 - w) with x off by 1e-2: accepted by max|F| <= tol (1 + max|z|) when unit = 1e-6."""
    f = bbd.implicit(bbd.Root(lambda x, w: unit * (x**2 - w)))(lambda w: np.sqrt(w) + 1e-2)
    with pytest.raises(bbd.CertificationError, match=re.escape("components 0 (")):
        f(torch.tensor(4.0))


def test_one_large_unknown_cannot_loosen_the_others():
    """z = (1e6, x2) with x2 off by 10%: a threshold scaled by max|z| = 1e6 accepted it."""
    f = bbd.implicit(bbd.Root(lambda z, w: torch.stack([z[0] - 1e6, z[1] ** 2 - w])))(
        lambda w: np.array([1e6, 1.1 * np.sqrt(w)]))
    with pytest.raises(bbd.CertificationError, match=re.escape("components 1 (")):
        f(torch.tensor(4.0))


@pytest.mark.parametrize("unit", [1.0, 1e4])
def test_a_large_multiplier_cannot_loosen_the_primal_rows(unit):
    """min (x1 - 1)^2 + (x2 - 2)^2 s.t. unit * 2e4 x1 <= 0: the multiplier ~ 1e-4 / unit... scaled so that it
    is 2e4 at unit = 1e4 (in other units, the same point); x2 off by 0.6% must be refused either way."""
    cond = bbd.KKT(lambda x, w: (x[0] - 1) ** 2 + (x[1] - w) ** 2, ineq=lambda x, w, u=unit: (u * x[0]).reshape(1))
    lam = 2.0 / unit  # stationarity in x1 at x1 = 0: 2(0 - 1) + lam * u = 0
    wrong = bbd.KKTSolution(x=np.array([0.0, 2.0 * 1.006]), ineq=np.array([lam]))
    with pytest.raises(bbd.CertificationError, match=re.escape("components 1 (")):
        bbd.implicit(cond)(lambda w: wrong)(torch.tensor(2.0))
    right = bbd.KKTSolution(x=np.array([0.0, 2.0]), ineq=np.array([lam]))
    assert bbd.implicit(cond)(lambda w: right)(torch.tensor(2.0)).tolist() == [0.0, 2.0]


def test_a_float32_answer_exact_to_float32_is_accepted():
    w = torch.tensor(1.0e5 + 3.7, dtype=torch.float32, requires_grad=True)
    x = bbd.implicit(bbd.Root(lambda x, w: x**2 - w), arrays="torch")(torch.sqrt)(w)
    x.backward()
    assert x.dtype == torch.float32 and abs(float(w.grad) - 0.5 / float(x)) < 1e-9


def test_a_rounded_answer_is_told_apart_from_a_wrong_one():
    cond = bbd.Root(lambda x, w: x**2 - w)
    with pytest.raises(bbd.CertificationError, match=re.escape("the answer was rounded (e.g. printed with %g)")):
        bbd.implicit(cond)(lambda w: float(f"{np.sqrt(w):.4g}"))(torch.tensor(7.0))
    with pytest.raises(bbd.CertificationError, match=re.escape("This is not a solution of the condition")):
        bbd.implicit(cond)(lambda w: np.sqrt(w) + 1e-3)(torch.tensor(7.0))


def test_answers_at_round_off_around_zero_pass():
    """x* = (0, w1): the first entry's terms all vanish; an accurate solver leaves 1e-12 there."""
    cond = bbd.Argmin(lambda x, w: ((x - w) ** 2).sum() + (x**4).sum())
    x = bbd.implicit(cond)(lambda w: np.array([1e-12, 0.5 * 0.7683]))
    w = torch.tensor([0.0, 0.5 * 0.7683 + 2 * (0.5 * 0.7683) ** 3])
    assert torch.isfinite(x(w)).all()


# --- degenerate points -------------------------------------------------------------------------------------
def _lp(p):
    res = scipy.optimize.linprog([-1.1, -1.0], A_ub=[[1, 0], [0, 1], [1, 1]], b_ub=p, bounds=[(None, None)] * 2,
                                 method="highs")
    return res.x


LP = bbd.KKT(lambda x, p: -(1.1 * x[0] + x[1]),
             ineq=lambda x, p: torch.stack([x[0] - p[0], x[1] - p[1], x[0] + x[1] - p[2]]))


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_lp_vertex_with_three_active_constraints_gives_dx1_and_flags_x2(linear_solver):
    """max 1.1 x1 + x2 s.t. x1 <= p1, x2 <= p2, x1 + x2 <= p3 at p = (1, 1, 2): three constraints active in
    2D. d x1/dp = (1, 0, 0) exists (both admissible active sets {0, 1} and {0, 2} agree); d x2/dp does not
    ((0, 1, 0) vs (-1, 0, 1)). A singular KKT matrix used to give (0.667, -0.333, 0.333) silently."""
    fn = bbd.implicit(LP, linear_solver=linear_solver)(_lp)
    p = torch.tensor([1.0, 1.0, 2.0], requires_grad=True)
    with pytest.warns(RuntimeWarning) as record:
        x = fn(p)
    (g1,) = torch.autograd.grad(x[0], p)
    torch.testing.assert_close(g1, torch.tensor([1.0, 0.0, 0.0]), atol=1e-12, rtol=0)
    messages = [str(r.message) for r in record]
    assert any("active inequality constraints [0, 1, 2] are linearly dependent (LICQ fails)" in m
               and "The derivative of outputs [1] does not exist" in m
               and "Outputs [0] have a derivative, and it is returned exactly" in m for m in messages), messages
    # the returned x2-derivative is one of the one-sided ones
    (g2,) = torch.autograd.grad(fn(p)[1], p)
    assert any(torch.allclose(g2, torch.tensor(t), atol=1e-12) for t in ([0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]))


def test_lp_one_sided_differences_of_the_black_box_agree_for_x1_and_not_for_x2():
    """The reference for the test above: forward and backward differences of the LP solver itself."""
    eps, p = 1e-6, np.array([1.0, 1.0, 2.0])
    fwd = np.stack([(_lp(p + eps * e) - _lp(p)) / eps for e in np.eye(3)], axis=1)  # (x, p)
    bwd = np.stack([(_lp(p) - _lp(p - eps * e)) / eps for e in np.eye(3)], axis=1)
    np.testing.assert_allclose(fwd[0], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(bwd[0], [1.0, 0.0, 0.0], atol=1e-6)
    assert np.abs(fwd[1] - bwd[1]).max() > 0.5  # x2 has no derivative at this vertex


@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (0.1, 0.3)])
def test_a_kink_is_flagged_whatever_the_constraint_scaling(a, b):
    """x1 = min(t1, t3, t4) as max x1 s.t. x1 <= t1, a (x1 - t3) <= 0, b (x1 - t4) <= 0 at t3 = t4: d x1/dt3 is
    1 or 0 depending on the side; a least-squares split gave 1/3, 2/3 silently for a = 0.1, b = 0.3."""
    cond = bbd.KKT(lambda x, t: -x[0], ineq=lambda x, t: torch.stack([x[0] - t[0], a * (x[0] - t[1]),
                                                                     b * (x[0] - t[2])]))
    fn = bbd.implicit(cond)(lambda t: np.array([min(t)]))
    t = torch.tensor([5.0, 1.0, 1.0], requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("active inequality constraints [1, 2] are linearly dependent")):
        x = fn(t)
    (g,) = torch.autograd.grad(x[0], t)
    assert g.tolist() in ([0.0, 1.0, 0.0], [0.0, 0.0, 1.0])


@pytest.mark.parametrize("linear_solver", SOLVERS)
def test_redundant_constraints_scaled_differently_give_the_exact_gradient_silently(linear_solver):
    """Projection onto {x1 + x2 <= 1} stated twice (once scaled by 3): LICQ fails, the derivative exists."""
    cond = bbd.KKT(lambda x, y: 0.5 * ((x - y) ** 2).sum(),
                   ineq=lambda x, y: torch.stack([x.sum() - 1, 3 * (x.sum() - 1)]))
    fn = bbd.implicit(cond, linear_solver=linear_solver)(lambda y: y - max(0.0, (y.sum() - 1) / 2))
    y = torch.tensor([0.8, 0.9], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = fn(y)
        (g,) = torch.autograd.grad((x * torch.tensor([1.0, 3.0])).sum(), y)
    torch.testing.assert_close(g, torch.tensor([-1.0, 1.0]), atol=1e-12, rtol=0)


def test_weakly_active_bound_with_different_sides_is_flagged_and_policy_raise_refuses_it():
    """min (x - w)^2 s.t. x <= 0 at w = 0: the bound is weakly active; dx/dw is 1 (free) or 0 (held)."""
    cond = bbd.KKT(lambda x, w: ((x - w) ** 2).sum(), ineq=lambda x, w: x)
    w = torch.tensor([0.0], requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("inequality constraints [0] are weakly active")):
        bbd.implicit(cond)(lambda w: np.minimum(w, 0.0))(w)
    with pytest.raises(bbd.DegenerateError, match=re.escape("The derivative of outputs [0] does not exist")) as info:
        bbd.implicit(cond, degenerate="raise")(lambda w: np.minimum(w, 0.0))(w)
    assert info.value.constraints == [0] and info.value.outputs == [0]
    with pytest.warns(RuntimeWarning, match=re.escape("The instance's output is NaN")):
        out = bbd.implicit(cond, degenerate="raise", on_failure="nan")(lambda w: np.minimum(w, 0.0))(w)
    assert bool(torch.isnan(out).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bbd.implicit(cond, degenerate="ignore")(lambda w: np.minimum(w, 0.0))(w)


# --- Argmin: a saddle or a maximum is not a minimiser -----------------------------------------------------------
@pytest.mark.parametrize("n", [2, 100], ids=["dense", "lanczos"])
def test_argmin_warns_at_a_saddle_point(n):
    def f(x, w):  # min over x1 at +-sqrt(5 / 2); x1 = 0 is a saddle
        return ((x[0] - w) ** 2) - x[1] ** 2 + 0.1 * x[1] ** 4 + (x[2:] ** 2).sum()

    fn = bbd.implicit(bbd.Argmin(f))
    with pytest.warns(RuntimeWarning, match=re.escape("is not a minimum of the Argmin objective")):
        fn(lambda w: np.r_[w, 0.0, np.zeros(n - 2)])(torch.tensor(0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(lambda w: np.r_[w, np.sqrt(5.0), np.zeros(n - 2)])(torch.tensor(0.3))


def test_a_constraint_part_at_round_off_around_zero_is_judged_by_the_rest_of_the_instance():
    # min (x - w)^2 s.t. x <= 0 at w = 1: x* = 0, lam = 2. The inequality part's terms all vanish (x ~ 0, no
    # data): judged in its own units only, an answer at round-off (x = -1e-17) would be refused; it takes the
    # instance's largest term instead, while an answer off by 1e-3 is still refused.
    cond = bbd.KKT(lambda x, w: (x - w) ** 2, ineq=lambda x, w: x)
    w = torch.tensor(1.0, requires_grad=True)
    x = bbd.implicit(cond)(lambda w: bbd.KKTSolution(x=-1e-17, ineq=[2.0]))(w)
    assert float(x) == -1e-17
    (g,) = torch.autograd.grad(x, w)
    assert float(g) == 0.0  # the bound holds x at 0 whatever w
    with pytest.raises(bbd.CertificationError, match=re.escape("relative to the size of their terms")):
        bbd.implicit(cond)(lambda w: bbd.KKTSolution(x=-1e-3, ineq=[2.0]))(w)
