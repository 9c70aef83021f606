"""One test per error path of the core: each message says what failed, what was expected and the fix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import blackbox_diff as bbd

ROOT = bbd.Root(lambda x, w: x**2 - w)


def sqrt_solver(w):
    return np.sqrt(w)


def _call(fn, *args):
    return fn(*args)


def test_error_hierarchy():
    assert issubclass(bbd.InputError, ValueError) and issubclass(bbd.InputError, bbd.BlackBoxDiffError)
    assert issubclass(bbd.BackendUnavailableError, ImportError)
    for cls in (bbd.SolverError, bbd.CertificationError, bbd.LinearSolveError, bbd.PluginError):
        assert issubclass(cls, bbd.BlackBoxDiffError)


def test_implicit_needs_a_condition():
    with pytest.raises(bbd.InputError, match=re.escape("implicit() expects an optimality condition")):
        bbd.implicit(lambda x, w: x - w)


def test_condition_needs_a_callable():
    with pytest.raises(bbd.InputError, match=re.escape("Root expects F to be a callable")):
        bbd.Root(3.0)
    with pytest.raises(bbd.InputError, match=re.escape("KKT expects ineq to be a callable")):
        bbd.KKT(lambda x: x.sum(), ineq="x <= 0")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(bbd.InputError, match=re.escape("unknown option 'tolerance'")) as info:
        bbd.implicit(ROOT, tolerance=1e-3)
    assert "residual_tol" in str(info.value)


def test_invalid_option_value():
    with pytest.raises(bbd.InputError, match=re.escape("option 'linear_solver'")):
        bbd.implicit(ROOT, linear_solver="qr")
    with pytest.raises(bbd.InputError, match=re.escape("option 'rtol'")):
        bbd.implicit(ROOT, rtol=-1.0)
    with pytest.raises(bbd.InputError, match=re.escape("executor must be None, 'threads', 'processes'")):
        bbd.implicit(ROOT, executor="gpu")
    with pytest.raises(bbd.InputError, match=re.escape("in_dims must be None, an int, or a tuple")):
        bbd.implicit(ROOT, in_dims="batch")


def test_decorating_a_non_callable():
    with pytest.raises(bbd.InputError, match=re.escape("must decorate a callable solver; got int")):
        bbd.implicit(ROOT)(3)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("four", "Parameter 0 is a str; expected a torch.Tensor, a float or a numpy array"),
        (torch.tensor(4), "Parameter 0 has dtype torch.int64; expected a real floating dtype"),
        (torch.tensor(4.0 + 0j), "Parameter 0 has dtype torch.complex128; expected a real floating dtype"),
        (torch.tensor(float("nan")), "Parameter 0 contains NaN or Inf"),
        (torch.tensor([1.0, float("inf")]), "Parameter 0 contains NaN or Inf (first entries at indices [[1]])"),
    ],
)
def test_bad_parameters(param, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.implicit(ROOT)(sqrt_solver)(param)


def test_in_dims_errors():
    fn = bbd.implicit(bbd.Root(lambda x, a, b: x - a - b), in_dims=(0,))(lambda a, b: a + b)
    with pytest.raises(bbd.InputError, match=re.escape("in_dims has 1 entries but the call has 2 parameters")):
        fn(torch.ones(2), torch.ones(2))
    fn = bbd.implicit(bbd.Root(lambda x, a: x - a), in_dims=2)(lambda a: a)
    with pytest.raises(bbd.InputError, match=re.escape("in_dims[0] = 2 but parameter 0 has shape (3,)")):
        fn(torch.ones(3))
    fn = bbd.implicit(bbd.Root(lambda x, a, b: x - a - b), in_dims=0)(lambda a, b: a + b)
    with pytest.raises(bbd.InputError, match=re.escape("Batched parameters disagree on the batch size: {0: 2, 1: 3}")):
        fn(torch.ones(2), torch.ones(3))


def test_black_box_returning_text():
    with pytest.raises(bbd.SolverError, match=re.escape("returned a str ('converged'); expected numbers")):
        bbd.implicit(ROOT)(lambda w: "converged")(torch.tensor(4.0))


def test_black_box_returning_nan():
    with pytest.raises(bbd.SolverError, match=re.escape("The black box returned NaN or Inf")):
        bbd.implicit(ROOT)(lambda w: float("nan"))(torch.tensor(4.0))


def test_black_box_shape_changes_across_the_batch():
    def solve(w):
        return np.sqrt(w) if w < 5 else np.array([np.sqrt(w), 0.0])

    expected = "returned shape (2,) at batch index 1, expected () (the other instances' shape)"
    with pytest.raises(bbd.SolverError, match=re.escape(expected)):
        bbd.implicit(ROOT, in_dims=0)(solve)(torch.tensor([4.0, 9.0]))


def test_black_box_exception_is_wrapped_with_its_cause():
    def solve(w):
        raise ArithmeticError("diverged")

    with pytest.raises(bbd.SolverError, match=re.escape("raised ArithmeticError: diverged")) as info:
        bbd.implicit(ROOT)(solve)(torch.tensor(4.0))
    assert isinstance(info.value.__cause__, ArithmeticError)


def test_non_square_residual():
    cond = bbd.Root(lambda x, w: torch.stack([x - w, x + w]))
    with pytest.raises(bbd.InputError, match=re.escape("residual has 2 entries but z has 1")):
        bbd.implicit(cond)(lambda w: w)(torch.tensor(1.0))


def test_residual_that_raises():
    cond = bbd.Root(lambda x, w, extra: x - w)
    with pytest.raises(bbd.InputError, match=re.escape("Evaluating the Root residual at the black box's answer")):
        bbd.implicit(cond)(lambda w: w)(torch.tensor(1.0))


def test_argmin_objective_must_be_scalar():
    cond = bbd.Argmin(lambda x, w: (x - w) ** 2)
    with pytest.raises(bbd.InputError, match=re.escape("Argmin expects f to return a scalar; it returned shape (2,)")):
        bbd.implicit(cond)(lambda w: w)(torch.tensor([1.0, 2.0]))


def test_certification_error_carries_the_numbers():
    message = "does not satisfy the Root condition: components 0 (0.41, relative 0.0"
    with pytest.raises(bbd.CertificationError, match=re.escape(message)) as info:
        bbd.implicit(ROOT)(lambda w: 2.1)(torch.tensor(4.0))
    # F = x^2 - w = 0.41; its terms are 2 x^2 = 8.82 and w = 4: the relative residual is 0.41 over their size
    assert 0.41 / (8.82 + 4.0) <= info.value.residual <= 0.41 / 8.82
    assert info.value.tolerance == 1e-5


def test_certification_can_be_disabled_or_downgraded():
    w = torch.tensor(4.0)
    assert bbd.implicit(ROOT, residual_tol=None)(lambda w: 2.1)(w).item() == 2.1
    with pytest.warns(RuntimeWarning, match="Gradients may be wrong"):
        bbd.implicit(ROOT, certify="warn")(lambda w: 2.1)(w)


def test_processes_executor_needs_a_picklable_solver():
    fn = bbd.implicit(ROOT, in_dims=0, executor="processes")(lambda w: np.sqrt(w))
    with pytest.raises(bbd.InputError, match=re.escape("executor='processes' needs a picklable black box")):
        fn(torch.tensor([4.0, 9.0]))


def test_kkt_wrong_number_of_multipliers():
    cond = bbd.KKT(lambda x, w: (x - w) ** 2, ineq=lambda x, w: x)
    fn = bbd.implicit(cond)(lambda w: bbd.KKTSolution(x=min(w, 0.0), ineq=[0.0, 1.0]))
    with pytest.raises(bbd.SolverError, match=re.escape("returned 2 ineq multipliers but the problem has 1")):
        fn(torch.tensor(1.0))


def test_kkt_constraint_function_that_fails():
    cond = bbd.KKT(lambda x, w: (x - w) ** 2, ineq=lambda x, w: x.sum(keepdim=True))
    with pytest.raises(bbd.InputError, match=re.escape("Preparing the KKT unknowns from the black box's answer")):
        bbd.implicit(cond)(lambda w: 0.0)(torch.tensor(1.0))


def test_check_gradients_needs_tensors():
    with pytest.raises(bbd.InputError, match=re.escape("check_gradients: parameter 0 must be a floating tensor")):
        bbd.check_gradients(bbd.implicit(ROOT)(sqrt_solver), 4.0)


def test_linear_solve_error_names_the_fix():
    F = lambda z, w: torch.stack([z[0] - w, 0.0 * z[1]])  # noqa: E731
    fn = bbd.implicit(bbd.Root(F), linear_solver="gmres", fallback=False)(lambda w: np.array([w, 0.0]))
    w = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(bbd.LinearSolveError, match=re.escape("Allow escalation (fallback=True)")):
        fn(w).sum().backward()


def test_solver_error_raised_by_the_black_box_gets_its_batch_index():
    def solver(w):
        if w < 0:
            raise bbd.SolverError("my solver: no real root", status="infeasible")
        return np.sqrt(w)

    fn = bbd.implicit(bbd.Root(lambda z, w: z**2 - w), in_dims=0)(solver)
    with pytest.raises(bbd.SolverError, match=re.escape("my solver: no real root (batch index 1)")) as info:
        fn(torch.tensor([4.0, -1.0]))
    assert info.value.batch_index == 1 and info.value.status == "infeasible"


def test_an_answer_of_the_wrong_size_is_the_black_box_s_failure_and_nan_isolates_it():
    """Two numbers for three unknowns, nothing declared: the condition cannot be evaluated there. A
    SolverError naming the answer's shape (not an InputError blaming the residual), isolated by 'nan'."""
    cond = bbd.Root(lambda x, w: x**2 - w)
    short = bbd.implicit(cond, in_dims=0)(lambda w: np.sqrt(w)[:2])
    w = torch.tensor([[1.0, 4.0, 9.0], [1.0, 4.0, 9.0]])
    expected = "at batch index 0 (shape (2,), from the black box '<lambda>'): RuntimeError"
    with pytest.raises(bbd.SolverError, match=re.escape(expected)):
        short(w)
    with pytest.warns(RuntimeWarning, match=re.escape("Either the black box returned the wrong number of values")):
        out = bbd.implicit(cond, in_dims=0, on_failure="nan")(lambda w: np.sqrt(w)[:2])(w)
    assert bool(torch.isnan(out).all())


# --- issue 14's table, row by row ----------------------------------------------------------------------------
def test_black_box_returning_none_names_it_and_the_batch_index():
    with pytest.raises(bbd.SolverError, match=re.escape("returned None; expected its solution")):
        bbd.implicit(ROOT)(lambda w: None)(torch.tensor(4.0))
    solve = lambda w: None if w > 5 else np.sqrt(w)  # noqa: E731
    with pytest.raises(bbd.SolverError, match=re.escape("returned None at batch index 1")):
        bbd.implicit(ROOT, in_dims=0)(solve)(torch.tensor([4.0, 9.0]))


def test_black_box_returning_a_numeric_string_is_refused_not_parsed():
    # "2" would convert with float(); a solver that prints its answer is still a bug to be named
    with pytest.raises(bbd.SolverError, match=re.escape("returned a str ('2'); expected numbers")):
        bbd.implicit(ROOT)(lambda w: "2")(torch.tensor(4.0))


def test_ridge_inf_is_an_option_error():
    with pytest.raises(bbd.InputError, match=re.escape("ridge")) as info:
        bbd.implicit(ROOT, ridge=float("inf"))(np.sqrt)(torch.tensor(4.0))
    assert "finite" in str(info.value)


def test_first_instance_odd_is_blamed_by_the_majority():
    solve = lambda w: np.array([np.sqrt(w), 0.0]) if w < 5 else np.sqrt(w)  # noqa: E731
    w = torch.tensor([4.0, 9.0, 16.0])
    with pytest.raises(bbd.SolverError, match=re.escape("returned shape (2,) at batch index 0, expected ()")):
        bbd.implicit(ROOT, in_dims=0)(solve)(w)
    with pytest.warns(RuntimeWarning, match=re.escape("at batch index 0")):
        out = bbd.implicit(ROOT, in_dims=0, on_failure="nan")(solve)(w)
    assert bool(torch.isnan(out[0])) and torch.allclose(out[1:], torch.tensor([3.0, 4.0]))

