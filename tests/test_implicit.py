"""The IFT engine on the problem zoo: residuals, finite differences of the black box, gradcheck, every
linear solver, batching, executors, failures."""

from __future__ import annotations

import concurrent.futures
import re
import warnings

import numpy as np
import pytest
import torch
from zoo import KKT_SIMPLEX, by_name, problems

import blackbox_diff as bbd

ZOO = problems()
IDS = [p.name for p in ZOO]


def _fn(problem, **options):
    return bbd.implicit(problem.condition, **{**problem.options, **options})(problem.solve)


@pytest.mark.parametrize("problem", ZOO, ids=IDS)
def test_residual_vanishes_at_the_black_box_answer(problem):
    params = problem.params()
    z = _fn(problem)(*params)
    if problem.name == "kkt":
        x = z.detach()
        assert abs(float(x.sum()) - 1) < 1e-12 and float(x.min()) >= 0
    else:
        r = problem.condition.residual(z.detach(), *params)
        assert float(r.abs().max()) < 1e-10


@pytest.mark.parametrize("problem", ZOO, ids=IDS)
def test_gradient_matches_finite_differences_of_the_black_box(problem):
    report = bbd.check_gradients(_fn(problem), *problem.params(), rtol=1e-6)
    assert report.ok, str(report)


@pytest.mark.parametrize("problem", ZOO, ids=IDS)
def test_gradcheck(problem):
    params = [p.clone().requires_grad_(True) for p in problem.params()]
    assert torch.autograd.gradcheck(_fn(problem), params, eps=1e-6, atol=1e-6, rtol=1e-5)


SOLVERS = ["dense", "lstsq", "gmres", "bicgstab", "minres", "cg", "neumann"]
# Which Krylov methods are valid for which structure; others must escalate, never return garbage.
VALID = {
    "root": {"dense", "lstsq", "gmres", "bicgstab"},
    "argmin": {"dense", "lstsq", "gmres", "bicgstab", "minres", "cg"},
    "fixed_point": {"dense", "lstsq", "gmres", "bicgstab", "neumann"},
    "kkt": {"dense", "lstsq", "gmres", "minres"},
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("problem", ZOO, ids=IDS)
def test_every_linear_solver_gives_the_dense_gradient(problem, solver):
    params = problem.params()

    def grads(**opts):
        leaves = [p.clone().requires_grad_(True) for p in params]
        z = _fn(problem, **opts)(*leaves)
        weights = torch.arange(1.0, z.numel() + 1).reshape(z.shape)
        return torch.autograd.grad((weights * z).sum(), leaves)

    reference = grads(linear_solver="dense")
    if solver in VALID[problem.name]:
        got = grads(linear_solver=solver, fallback=False)
    else:  # an invalid method may stall; escalation must still give the right answer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = grads(linear_solver=solver, fallback=True)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


# --- batching ---------------------------------------------------------------------------------
def test_batched_call_equals_per_instance_calls_and_sums_broadcast_gradients():
    problem = by_name("root")
    A, b = problem.params()
    B = torch.stack([b, 2 * b, -b])
    fn = _fn(problem, in_dims=(None, 0))
    A1 = A.clone().requires_grad_(True)
    B1 = B.clone().requires_grad_(True)
    Z = fn(A1, B1)
    assert Z.shape == (3, 3)
    (Z**2).sum().backward()
    gA = torch.zeros_like(A)
    for i in range(3):
        Ai = A.clone().requires_grad_(True)
        bi = B[i].clone().requires_grad_(True)
        zi = _fn(problem)(Ai, bi)
        torch.testing.assert_close(zi, Z[i].detach(), atol=1e-12, rtol=0)
        (zi**2).sum().backward()
        gA += Ai.grad
        torch.testing.assert_close(B1.grad[i], bi.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(A1.grad, gA, atol=1e-10, rtol=0)


def test_batch_dimension_other_than_zero():
    problem = by_name("root")
    A, b = problem.params()
    Bt = torch.stack([b, 2 * b], dim=1)  # batch along dim 1
    Z = _fn(problem, in_dims=(None, 1))(A, Bt)
    torch.testing.assert_close(Z[1], _fn(problem)(A, 2 * b), atol=1e-12, rtol=0)


def test_kkt_batch_with_different_active_sets():
    fn = bbd.implicit(KKT_SIMPLEX, in_dims=0)(by_name("kkt").solve)
    Y = torch.tensor([[0.9, 0.5, -0.4, 0.1], [0.1, 0.2, 0.3, 0.25], [2.0, -1.0, 0.0, 0.1]], requires_grad=True)
    report = bbd.check_gradients(fn, Y.detach(), rtol=1e-6)
    assert report.ok, str(report)


@pytest.mark.parametrize("executor", ["threads", "processes", "instance"])
def test_executors_give_the_serial_result(executor):
    problem = by_name("root")
    A, b = problem.params()
    B = torch.stack([b, 2 * b, -b, 0.5 * b])
    serial = _fn(problem, in_dims=(None, 0))(A, B)
    if executor == "instance":
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = _fn(problem, in_dims=(None, 0), executor=pool)(A, B)
    else:
        got = _fn(problem, in_dims=(None, 0), executor=executor, max_workers=2)(A, B)
    torch.testing.assert_close(got, serial, atol=0, rtol=0)


def test_closure_parameters_receive_gradients():
    lin = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.mul_(0.2)

    @bbd.implicit(bbd.FixedPoint(lambda z, x: torch.tanh(lin(z) + x)), arrays="torch")
    def iterate(x):
        z = torch.zeros_like(x)
        for _ in range(200):
            z = torch.tanh(lin(z) + x)
        return z

    x = torch.tensor([0.3, -0.1, 0.8])
    iterate(x).sum().backward()
    # Reference: unrolled autograd through many iterations (converged, so it equals the IFT gradient).
    w = lin.weight.grad.clone()
    lin.zero_grad()
    z = torch.zeros(3)
    for _ in range(200):
        z = torch.tanh(lin(z) + x)
    z.sum().backward()
    torch.testing.assert_close(w, lin.weight.grad, atol=1e-10, rtol=0)


def test_float32_parameters_give_float32_outputs():
    out = _fn(by_name("root"))(*(p.float() for p in by_name("root").params()))
    assert out.dtype == torch.float32


def test_no_graph_when_nothing_requires_grad():
    out = _fn(by_name("root"))(*by_name("root").params())
    assert not out.requires_grad


# --- failures inside a batch ------------------------------------------------------------------
def _flaky(A, b):
    if b[0] > 10:
        raise RuntimeError("did not converge")
    return by_name("root").solve(A, b)


def test_failing_instance_with_nan_policy_leaves_the_others_exact():
    problem = by_name("root")
    A, b = problem.params()
    B = torch.stack([b, torch.tensor([20.0, 0.0, 0.0]), 2 * b])
    A1, B1 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        Z = bbd.implicit(problem.condition, in_dims=(None, 0), on_failure="nan")(_flaky)(A1, B1)
    assert torch.isnan(Z[1]).all() and torch.isfinite(Z[[0, 2]]).all()
    Z[[0, 2]].sum().backward()
    assert torch.isfinite(A1.grad).all()
    assert (B1.grad[1] == 0).all()
    A2, B2 = A.clone().requires_grad_(True), B[[0, 2]].clone().requires_grad_(True)
    _fn(problem, in_dims=(None, 0))(A2, B2).sum().backward()
    torch.testing.assert_close(A1.grad, A2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(B1.grad[[0, 2]], B2.grad, atol=1e-12, rtol=0)


def test_failing_instance_raises_solver_error_with_its_batch_index():
    problem = by_name("root")
    A, b = problem.params()
    B = torch.stack([b, torch.tensor([20.0, 0.0, 0.0])])
    with pytest.raises(bbd.SolverError, match="raised RuntimeError: did not converge at batch index 1") as info:
        bbd.implicit(problem.condition, in_dims=(None, 0))(_flaky)(A, B)
    assert info.value.batch_index == 1


def test_uncertified_answer_fails_only_its_instance_under_nan_policy():
    problem = by_name("root")
    A, b = problem.params()

    def sloppy(A, b):
        x = problem.solve(A, b)
        return x + 1e-2 if b[0] < 0 else x

    B = torch.stack([b, -b])
    with pytest.warns(RuntimeWarning, match="does not satisfy the Root condition"):
        Z = bbd.implicit(problem.condition, in_dims=(None, 0), on_failure="nan")(sloppy)(A, B)
    assert torch.isfinite(Z[0]).all() and torch.isnan(Z[1]).all()


def test_nan_policy_with_every_instance_failing_raises():
    with pytest.raises(bbd.SolverError, match="Every instance of the call failed"), pytest.warns(RuntimeWarning):
        bbd.implicit(bbd.Root(lambda x, w: x - w), on_failure="nan", in_dims=0)(
            lambda w: (_ for _ in ()).throw(RuntimeError("no"))
        )(torch.ones(2))


def test_weakly_active_constraint_warns_and_returns_a_one_sided_derivative():
    # min (x - w)^2 s.t. x <= 0 at w = 0: x* = 0, multiplier 0: weakly active.
    cond = bbd.KKT(lambda x, w: (x - w) ** 2, ineq=lambda x, w: x)
    fn = bbd.implicit(cond)(lambda w: np.minimum(w, 0.0))
    w = torch.tensor(0.0, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="weakly active"):
        x = fn(w)
    x.backward()
    assert w.grad.item() == 0.0


def test_singular_adjoint_system_escalates_to_least_squares_with_a_warning():
    # F(z, w) = [z0 - w, 0 * z1]: dF/dz is singular; the minimum-norm solution is still finite.
    F = lambda z, w: torch.stack([z[0] - w, 0.0 * z[1]])  # noqa: E731
    fn = bbd.implicit(bbd.Root(F), linear_solver="gmres")(lambda w: np.array([w, 0.0]))
    w = torch.tensor(1.5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="minimum-norm least-squares"):
        fn(w).sum().backward()  # dL/dz = [1, 1] is not in the range of (dF/dz)^T: no exact solution
    assert w.grad.item() == pytest.approx(1.0, abs=1e-10)


def test_singular_adjoint_system_raises_when_fallback_is_off():
    F = lambda z, w: torch.stack([z[0] - w, 0.0 * z[1]])  # noqa: E731
    fn = bbd.implicit(bbd.Root(F), linear_solver="dense", fallback=False)(lambda w: np.array([w, 0.0]))
    w = torch.tensor(1.5, requires_grad=True)
    with pytest.raises(bbd.LinearSolveError, match=re.escape("was not solved: instances [0] failed; dense")):
        fn(w)[0].backward()


def test_a_black_box_that_reuses_its_output_buffer_does_not_change_earlier_results():
    workspace = np.zeros(3)

    def solve(b):  # legacy style: the answer lives in a workspace the next call overwrites
        workspace[:] = np.sqrt(b)
        return workspace

    fn = bbd.implicit(bbd.Root(lambda x, b: x**2 - b))(solve)
    first = fn(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    fn(torch.tensor([16.0, 25.0, 36.0], dtype=torch.float64))
    assert first.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_read_only_and_shared_answers_are_copied(kind):
    """Ray hands back read-only arrays from its object store: no torch warning, a writable output."""
    kept = []

    def solve(b):
        x = np.sqrt(b)
        x.setflags(write=False)
        out = x if kind == "numpy" else torch.from_numpy(x.copy())
        kept.append(out)
        return out

    b = torch.tensor([[1.0, 4.0], [9.0, 16.0]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = bbd.implicit(bbd.Root(lambda x, b: x**2 - b), in_dims=0)(solve)(b)
    with torch.no_grad():
        x.add_(1.0)  # writable, and the black box's own objects are untouched
    assert [float(k[0]) for k in kept] == [1.0, 3.0]
    (x - 1.0).sum().backward()
    torch.testing.assert_close(b.grad, 0.5 / b.detach().sqrt())
