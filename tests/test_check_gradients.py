"""`bbd.check_gradients` is a real audit: relative errors at every scale, noise told apart from wrong.

Every black box here is a real solver (scipy's brentq, bisect, root, linalg.solve, minimize) behind
`bbd.implicit`; the "wrong" gradients come from conditions that describe the solver wrongly (4x off, a
sign flipped in one entry), as a user's mistaken condition would. Conditions that do not hold at the
answer need `residual_tol=None`, or certification would refuse them first.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

import blackbox_diff as bbd
from blackbox_diff.tools._checks import NOISE_FACTOR

GRADIENT_SCALES = [1e-9, 1e-5, 1.0, 1e5, 1e9]


def _square(c):
    """x = c w^2 by brentq, with a relative stopping test so that it is exact at any scale."""

    def solve(w):
        return scipy.optimize.brentq(lambda x: x / c - w**2, 0.0, 2 * c * w**2, xtol=1e-300, rtol=1e-15)

    return solve


@pytest.mark.parametrize("param_scale", [1e-3, 1e3])
@pytest.mark.parametrize("grad_scale", GRADIENT_SCALES)
def test_right_gradient_passes_and_wrong_ones_fail_at_every_scale(grad_scale, param_scale):
    w0 = 2.0 * param_scale
    c = grad_scale / (2 * w0)  # d(c w^2)/dw = 2 c w0 = grad_scale
    w = torch.tensor(w0)
    right = bbd.implicit(bbd.Root(lambda x, w: x / c - w**2))(_square(c))
    report = bbd.check_gradients(right, w)
    assert report.verdicts == ["PASS"] and report.ok, str(report)
    assert report.rel_error[0] < 1e-9 and report.fd_noise[0] < 1e-9
    assert report.output_noise[0] < 1e-14  # an exact function: round-off only
    torch.testing.assert_close(report.finite_difference[0], report.implicit[0], rtol=1e-9, atol=0)

    # Conditions that hold at w0 but describe the solver wrongly: 4x too small, and the right size with
    # the wrong sign. Certification at the perturbed points would refuse them, hence residual_tol=None.
    four_x = bbd.Root(lambda x, w: x / c - w0**2 * torch.sqrt(w / w0))
    flipped = bbd.Root(lambda x, w: x / c - (2 * w0**2 - w**2))
    for cond, expected in ((four_x, 0.75), (flipped, 2.0)):
        report = bbd.check_gradients(bbd.implicit(cond, residual_tol=None)(_square(c)), w)
        assert report.verdicts == ["FAIL"] and report.failed == [0], str(report)
        assert report.rel_error[0] == pytest.approx(expected, rel=1e-6)


def test_the_issues_example_a_gradient_of_size_1e_7_off_by_4x_fails():
    # x = 1e-7 w^2 with the condition x = 1e-7 w: gradient 1e-7 where the black box's is 4e-7. The old
    # audit divided by max(1, |fd|) and printed PASS.
    fn = bbd.implicit(bbd.Root(lambda x, w: x - 1e-7 * w), residual_tol=None)(_square(1e-7))
    report = bbd.check_gradients(fn, torch.tensor(2.0))
    assert report.verdict == "FAIL", str(report)
    assert report.rel_error[0] == pytest.approx(0.75, rel=1e-6)
    assert "FAIL: the gradient disagrees with finite differences of the black box for parameters [0]" in str(report)


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1e3, 1e9])
def test_one_wrong_entry_of_a_vector_parameter_is_found(scale):
    A = torch.tensor([[4.0, 1.0, 0.0, 0.5], [1.0, 3.0, 1.0, 0.0], [0.0, 1.0, 5.0, 1.0], [0.5, 0.0, 1.0, 3.0]]) / scale
    b0 = torch.tensor([1.0, -2.0, 0.5, 1.5])

    def solve(A, b):  # scipy.linalg.solve: x = A^-1 b, of size `scale`
        return scipy.linalg.solve(A, b)

    right = bbd.implicit(bbd.Root(lambda x, A, b: A @ x - b))(solve)
    report = bbd.check_gradients(right, A, b0)
    assert report.verdicts == ["PASS", "PASS"], str(report)
    assert max(report.rel_error) < 1e-9

    # b[2] enters the condition reflected about its value: the condition holds at b0, but the derivative
    # with respect to b[2] has the right size and the wrong sign; every other entry is right.
    def reflected(x, A, b):
        b = torch.cat([b[:2], (2 * b0[2] - b[2]).reshape(1), b[3:]])
        return A @ x - b

    report = bbd.check_gradients(bbd.implicit(bbd.Root(reflected), residual_tol=None)(solve), A, b0)
    assert report.verdicts == ["PASS", "FAIL"], str(report)
    assert report.mismatched_entries(1) == [(2,)] and report.mismatched_entries(0) == []
    assert "gradient disagrees at entries [(2,)]" in str(report)


def _rounded_sqrt(digits):
    def solve(w):  # an executable that prints its answer with `digits` significant digits
        x = scipy.optimize.brentq(lambda x: x * x - w, 0.0, w + 1.0, xtol=1e-15)
        return float(f"{x:.{digits}g}")

    return solve


@pytest.mark.parametrize("w0", [0.3, 2.0, 123.0, 5e5])
def test_an_output_printed_with_6_digits_is_too_noisy_not_passed_or_failed(w0):
    w = torch.tensor(w0)
    right = bbd.implicit(bbd.Root(lambda x, w: x**2 - w), residual_tol=None)(_rounded_sqrt(6))
    report = bbd.check_gradients(right, w)
    assert report.verdicts == ["INCONCLUSIVE"] and not report.ok, str(report)
    assert report.fd_noise[0] > 1e-5 and report.rel_error[0] <= 1e-5 + NOISE_FACTOR * report.fd_noise[0]
    assert 1e-8 < report.output_noise[0] < 1e-5  # 6 digits: rounding noise ~1e-7 of the output
    assert "finite differences too noisy here" in str(report)
    # The finite differences are still good to ~1e-3: at a 1 % tolerance the right gradient passes ...
    assert bbd.check_gradients(right, w, rtol=1e-2).ok
    # ... and a gradient 4x off is more than the noise can explain.
    wrong = bbd.implicit(bbd.Root(lambda x, w: x**2 - w / 4), residual_tol=None)(_rounded_sqrt(6))
    report = bbd.check_gradients(wrong, w)
    assert report.verdicts == ["FAIL"], str(report)


def test_a_solver_stopping_at_a_loose_tolerance_is_too_noisy():
    cond = bbd.Root(lambda x, w: x**3 + x - w)

    def bisect(xtol):
        return lambda w: scipy.optimize.bisect(lambda x: x**3 + x - w, -10.0, 10.0, xtol=xtol)

    w = torch.tensor(2.0)
    loose = bbd.check_gradients(bbd.implicit(cond, residual_tol=None)(bisect(1e-7)), w)
    assert loose.verdicts == ["INCONCLUSIVE"], str(loose)
    assert 1e-9 < loose.output_noise[0] < 1e-6 and loose.fd_noise[0] > 1e-5
    tight = bbd.check_gradients(bbd.implicit(cond)(bisect(1e-13)), w)
    assert tight.verdicts == ["PASS"], str(tight)
    assert tight.fd_noise[0] < 1e-8
    wrong = bbd.Root(lambda x, w: x**3 + x - 2.0 * w)  # gradient 2x too large
    report = bbd.check_gradients(bbd.implicit(wrong, residual_tol=None)(bisect(1e-7)), w)
    assert report.verdicts == ["FAIL"], str(report)


def test_float32_black_box_is_judged_by_its_own_noise():
    fn = bbd.implicit(bbd.Root(lambda x, w: x**2 - w))(lambda w: np.sqrt(np.float32(w)))
    w = torch.tensor(2.0, dtype=torch.float32)
    assert bbd.check_gradients(fn, w).verdicts == ["INCONCLUSIVE"]
    assert bbd.check_gradients(fn, w, rtol=1e-3).ok


def _scaled_argmin(s):
    """x* = s u*(t) for the minimiser u* of g(u, t): dx*/dt is of size s. Solved by BFGS on u."""

    def g(u, t):
        return ((u - t) ** 4).sum() / 4 + 0.5 * ((u - t) ** 2).sum() + 0.5 * (u**2).sum() + 0.3 * u[0] * u[1]

    def solve(t):
        tt = torch.tensor(t)

        def fun(u):  # check_gradients' finite differences run under no_grad; the solver needs autograd
            with torch.enable_grad():
                ut = torch.tensor(u, requires_grad=True)
                value = g(ut, tt)
                return float(value.detach()), torch.autograd.grad(value, ut)[0].numpy()

        res = scipy.optimize.minimize(fun, np.zeros(3), jac=True, method="BFGS", options={"gtol": 1e-13})
        return s * res.x

    return bbd.Argmin(lambda x, t: g(x / s, t)), solve


@pytest.mark.parametrize("s", [1e-6, 1e6])
def test_real_scipy_solvers_pass_at_scale(s):
    # An Argmin by BFGS and a root by hybr through bbd.implicit, with gradients of size s and 1/s.
    cond, solve = _scaled_argmin(s)
    # residual_tol=None: certification's threshold is not scale-aware yet (issue 13, item 2).
    report = bbd.check_gradients(bbd.implicit(cond, residual_tol=None)(solve), torch.tensor([0.5, -1.0, 2.0]))
    assert report.ok and report.max_rel_error < 1e-7, str(report)
    assert 0.1 * s < float(report.implicit[0].abs().max()) < 10 * s

    def root(p):
        return scipy.optimize.root(lambda x: x**3 + 4 * x + np.roll(x, 1) - p / s, np.zeros(3), tol=1e-15).x

    F = bbd.Root(lambda x, p: x**3 + 4 * x + torch.roll(x, 1) - p / s)
    report = bbd.check_gradients(bbd.implicit(F)(root), torch.tensor([1.0, -2.0, 0.5]) * s)
    assert report.ok and report.max_rel_error < 1e-7, str(report)
    assert 0.1 / s < float(report.implicit[0].abs().max()) < 10 / s


def test_a_zero_gradient_passes_and_an_ignored_parameter_fails():
    solve = lambda a, b: np.sqrt(a)  # noqa: E731
    fn = bbd.implicit(bbd.Root(lambda x, a, b: x**2 - a))(solve)
    report = bbd.check_gradients(fn, torch.tensor(2.0), torch.tensor([1.0, 3.0]))
    assert report.verdicts == ["PASS", "PASS"], str(report)
    assert report.abs_error[1] == 0.0
    # The condition says x depends on b; the black box ignores b.
    ignored = bbd.Root(lambda x, a, b: x**2 - a - (b - torch.tensor([1.0, 3.0])).sum())
    fn = bbd.implicit(ignored, residual_tol=None)(solve)
    report = bbd.check_gradients(fn, torch.tensor(2.0), torch.tensor([1.0, 3.0]))
    assert report.verdicts == ["PASS", "FAIL"], str(report)
    assert "output unchanged at every step of entries [(0,), (1,)]" in str(report)


def test_a_black_box_failing_near_the_point_is_inconclusive_with_a_note():
    def solve(w):
        if w > 2.0:
            raise bbd.SolverError("no convergence above w = 2")
        return np.sqrt(w)

    report = bbd.check_gradients(bbd.implicit(bbd.Root(lambda x, w: x**2 - w))(solve), torch.tensor(2.0))
    assert report.verdicts == ["INCONCLUSIVE"], str(report)
    assert "the black box failed at" in report.notes[0]


def test_report_stays_backward_compatible():
    g = [torch.tensor([1.0, 2.0])]
    old = bbd.GradientReport(g, [torch.tensor([1.0, 2.0 + 1e-9])], [1e-9], [5e-10], 1e-6, 1e-5)
    assert old.ok and old.verdicts == ["PASS"] and old.max_rel_error == 5e-10
    assert "PASS" in str(old)
    bad = bbd.GradientReport(g, [torch.tensor([1.0, 3.0])], [1.0], [1 / 3], 1e-6, 1e-5)
    assert not bad.ok and bad.failed == [0]


def test_check_gradients_option_errors():
    fn = bbd.implicit(bbd.Root(lambda x, w: x**2 - w))(np.sqrt)
    message = "check_gradients: expected 0 < step < 1, rtol > 0 and an integer levels >= 3; got step=2.0"
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.check_gradients(fn, torch.tensor(2.0), step=2.0)
    with pytest.raises(bbd.InputError, match=re.escape("levels=2")):
        bbd.check_gradients(fn, torch.tensor(2.0), levels=2)
