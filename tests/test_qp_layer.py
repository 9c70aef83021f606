"""bbd.QPLayer and the "qp" backend: real QP solvers (every name), qpth's conventions, exact gradients.

Gradients are checked against central differences of the black box itself (`solve_qp` with DAQP, whose
answers are exact to round-off), against closed forms (box projections, unconstrained QPs), and against
qpth where qpth is accurate (a well-conditioned QP, every argument batched: qpth averages the gradients
of shared arguments over the batch, see the docs' switching page).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff.qp import QuadraticProgram

qp_plugin = pytest.importorskip("blackbox_diff_qp")
from blackbox_diff_qp import SOLVER_PACKAGES, solve_qp  # noqa: E402
from blackbox_diff_qp._solvers import _installed  # noqa: E402

SOLVERS = [name for name in SOLVER_PACKAGES if _installed(name)]
NONE = torch.empty(0)


def random_qp(B: int | None, n: int = 6, m: int = 8, k: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """A feasible, strictly convex QP (batched when B is an int): h = G x0 + slack, b = A x0."""
    g = torch.Generator().manual_seed(seed)
    lead = (B or 1,)
    L = torch.randn(*lead, n, n, generator=g)
    Q = L @ L.mT / n + 0.5 * torch.eye(n)
    x0 = torch.randn(*lead, n, generator=g)
    G = torch.randn(*lead, m, n, generator=g)
    h = (G @ x0[..., None])[..., 0] + torch.rand(*lead, m, generator=g)
    A = torch.randn(*lead, k, n, generator=g)
    b = (A @ x0[..., None])[..., 0]
    p = 3 * torch.randn(*lead, n, generator=g)
    out = [Q, p, G, h, A, b]
    return out if B is not None else [t[0] for t in out]


def directional_fd(values: list[torch.Tensor], w: np.ndarray, direction: list[np.ndarray], eps: float = 1e-6) -> float:
    """Central difference of w^T z*(theta) along `direction`, with the black box (DAQP, exact answers)."""

    def loss(sign: float) -> float:
        args = [v.numpy() + sign * eps * d for v, d in zip(values, direction, strict=True)]
        return float(w @ solve_qp(*args, solver="daqp").x)

    return (loss(1.0) - loss(-1.0)) / (2 * eps)


def implicit_directional(layer, values, w, direction) -> float:
    params = [v.clone().requires_grad_(True) for v in values]
    z = layer(*params)
    (z[0] @ torch.as_tensor(w)).backward()
    return sum(float((p.grad.numpy() * d).sum()) for p, d in zip(params, direction, strict=True))


# --- every solver name ----------------------------------------------------------------------------------
def test_every_solver_of_the_qp_extra_is_installed():
    """CI installs the whole extra: a missing solver would silently shrink the parametrisation below."""
    assert set(SOLVERS) == set(SOLVER_PACKAGES)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_gives_the_exact_solution_and_gradient(solver):
    values = random_qp(None, seed=3)
    reference = torch.as_tensor(solve_qp(*[v.numpy() for v in values], solver="daqp").x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nondegenerate: no weak-activity or LICQ warning
        z = bbd.QPLayer(solver)(*values)
    assert z.shape == (1, 6)
    assert torch.allclose(z[0], reference, atol=1e-10, rtol=0)  # polished on the active set: exact
    rng = np.random.default_rng(0)
    w = rng.standard_normal(6)
    direction = [rng.standard_normal(tuple(v.shape)) for v in values]
    fd = directional_fd(values, w, direction)
    got = implicit_directional(bbd.QPLayer(solver), values, w, direction)
    assert abs(got - fd) <= 1e-7 * abs(fd), (solver, got, fd)


def test_solver_auto_is_daqp_for_dense_problems():
    values = [v.numpy() for v in random_qp(None)]
    assert solve_qp(*values).solver == "daqp"


def test_gradcheck_every_argument():
    values = random_qp(2, n=3, m=4, k=1, seed=5)
    layer = bbd.QPLayer()
    params = tuple(v.clone().requires_grad_(True) for v in values)
    assert torch.autograd.gradcheck(lambda *a: layer(*a), params, eps=1e-6, atol=1e-6, rtol=1e-5)


# --- closed forms: where the easy implementation is wrong ---------------------------------------------------
@pytest.mark.parametrize("solver", ["daqp", "piqp", "clarabel", "proxqp", "osqp"])
def test_barely_active_box_projection_has_the_exact_jacobian(solver):
    """z* = min(p, u) (Q = I, G = I): dz/dp = diag(p < u), dz/du = diag(p > u), exactly, for rows only 1e-6
    from switching. An interior-point answer has slack and multiplier both ~1e-6..1e-4 there: its
    complementarity-form derivative (what qpth differentiates) is off by O(1) on those rows."""
    gaps = torch.tensor([-1e-6, 1e-6, -1e-4, 1e-4, -1e-2, 1e-2, -1.0, 1.0])
    p = (1.0 + gaps).requires_grad_(True)
    u = torch.ones(8, requires_grad=True)
    eye = torch.eye(8)
    z = bbd.QPLayer(solver)(eye, -p, eye, u, NONE, NONE)
    z.sum().backward()
    active = (gaps > 0).double()
    assert torch.equal(z[0], torch.minimum(p, u).detach())
    assert torch.equal(p.grad, 1 - active) and torch.equal(u.grad, active)


def test_unconstrained_qp_is_the_linear_solve():
    Q, p = random_qp(None)[:2]
    p = p.clone().requires_grad_(True)
    z = bbd.QPLayer()(Q, p, NONE, NONE, NONE, NONE)
    assert torch.allclose(z[0], -torch.linalg.solve(Q, p.detach()), atol=1e-12)
    z[0, 0].backward()
    assert torch.allclose(p.grad, -torch.linalg.inv(Q)[0], atol=1e-12)


def test_equality_only_qp_matches_the_kkt_solve():
    Q, p, _, _, A, b = random_qp(None)
    z = bbd.QPLayer()(Q, p, NONE, NONE, A, b)
    K = torch.cat([torch.cat([Q, A.T], 1), torch.cat([A, torch.zeros(2, 2)], 1)])
    expected = torch.linalg.solve(K, torch.cat([-p, b]))[:6]
    assert torch.allclose(z[0], expected, atol=1e-12)


# --- qpth's conventions ---------------------------------------------------------------------------------------
def test_batched_and_shared_arguments_match_per_instance_solves_and_sum_shared_gradients():
    Q, p, G, h, A, b = random_qp(3, seed=1)
    Qs, As, bs = Q[0], A[0], b[0]  # shared by the batch
    h = h + 5.0  # keep each instance feasible for the shared equality row
    params = [t.clone().requires_grad_(True) for t in (Qs, p, G, h, As, bs)]
    z = bbd.QPLayer()(*params)
    assert z.shape == (3, 6)
    z.sum().backward()
    total = [torch.zeros_like(t) for t in params]
    for i in range(3):
        one = [t.clone().requires_grad_(True) for t in (Qs, p[i], G[i], h[i], As, bs)]
        zi = bbd.QPLayer()(*one)
        assert torch.allclose(zi[0], z[i], atol=1e-12)
        zi.sum().backward()
        for acc, t, shared in zip(total, one, (True, False, False, False, True, True), strict=True):
            if shared:
                acc += t.grad
    for t, acc, shared in zip(params, total, (True, False, False, False, True, True), strict=True):
        if shared:
            assert torch.allclose(t.grad, acc, atol=1e-10)


def test_a_batch_of_one_broadcasts_against_a_larger_batch():
    Q, p, G, h, A, b = random_qp(3, seed=2)
    z = bbd.QPLayer()(Q[:1], p, G, h, A, b)
    zs = bbd.QPLayer()(Q[0], p, G, h, A, b)
    assert z.shape == (3, 6) and torch.equal(z, zs)


def test_unbatched_arguments_give_a_batch_of_one_like_qpth():
    z = bbd.QPLayer()(*random_qp(None))
    assert z.shape == (1, 6)


@pytest.mark.parametrize("empty", [torch.empty(0), torch.tensor([]), None])
def test_empty_equalities_as_qpth_users_pass_them(empty):
    Q, p, G, h, _, _ = random_qp(2)
    z = bbd.QPLayer()(Q, p, G, h, empty, empty)
    expected = torch.stack([torch.as_tensor(solve_qp(Q[i].numpy(), p[i].numpy(), G[i].numpy(), h[i].numpy()).x)
                            for i in range(2)])
    assert torch.allclose(z, expected, atol=1e-12)


def test_float32_in_float32_out_with_float32_gradients():
    values = random_qp(2)
    params = [v.float().requires_grad_(True) for v in values]
    z = bbd.QPLayer()(*params)
    assert z.dtype == torch.float32
    z.sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    reference = [v.clone().requires_grad_(True) for v in values]
    z64 = bbd.QPLayer()(*reference)
    z64.sum().backward()
    assert torch.allclose(z.double(), z64, atol=1e-5)
    for p32, p64 in zip(params, reference, strict=True):
        assert torch.allclose(p32.grad.double(), p64.grad, atol=1e-4, rtol=1e-4)


def test_return_duals_gives_kkt_multipliers_in_the_lagrangian_convention():
    Q, p, G, h, A, b = random_qp(2)
    sol = bbd.QPLayer(return_duals=True)(Q, p, G, h, A, b)
    assert isinstance(sol, bbd.KKTSolution)
    assert sol.x.shape == (2, 6) and sol.eq.shape == (2, 2) and sol.ineq.shape == (2, 8)
    x, nu, lam = sol.x, sol.eq, sol.ineq
    stationarity = (Q @ x[..., None])[..., 0] + p + (A.mT @ nu[..., None])[..., 0] + (G.mT @ lam[..., None])[..., 0]
    assert stationarity.abs().max() < 1e-10
    slack = h - (G @ x[..., None])[..., 0]
    assert (lam >= 0).all() and (lam * slack).abs().max() < 1e-10 and bool((lam > 0).any())


def test_threads_executor_gives_the_same_answer_and_gradient():
    values = random_qp(4)
    grads = []
    for executor in (None, "threads"):
        params = [v.clone().requires_grad_(True) for v in values]
        z = bbd.QPLayer(executor=executor)(*params)
        z.sum().backward()
        grads.append((z.detach(), [p.grad for p in params]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, c in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(a, c, atol=1e-14)



def test_solves_leave_sys_stdout_alone(monkeypatch):
    """Swapping sys.stdout (to hide HiGHS's banner) is process-wide: under executor='threads' it once lost
    the caller's own output. The solver must see the caller's sys.stdout."""
    import sys

    import qpsolvers

    seen = []
    real = qpsolvers.solve_problem

    def spy(*args, **kwargs):
        seen.append(sys.stdout)
        return real(*args, **kwargs)

    monkeypatch.setattr(qpsolvers, "solve_problem", spy)
    stdout = sys.stdout
    bbd.QPLayer(executor="threads")(*random_qp(3))
    assert len(seen) == 3 and all(s is stdout for s in seen)


def test_large_problems_leave_the_adjoint_to_the_engine_and_agree():
    """dense_max=0: no inverse in the forward; the engine solves the raw symmetric KKT system instead."""
    values = random_qp(2)
    out = []
    for options in ({}, {"dense_max": 0}):
        params = [v.clone().requires_grad_(True) for v in values]
        z = bbd.QPLayer(**options)(*params)
        z.sum().backward()
        out.append([p.grad for p in params])
    for a, c in zip(*out, strict=True):
        assert torch.allclose(a, c, atol=1e-10)


def test_gradients_match_qpth_where_qpth_is_accurate():
    QPFunction = pytest.importorskip("qpth.qp").QPFunction
    values = random_qp(3, seed=4)
    ours = [v.clone().requires_grad_(True) for v in values]
    theirs = [v.clone().requires_grad_(True) for v in values]
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    z = bbd.QPLayer()(*ours)
    (z * w).sum().backward()
    z_qpth = QPFunction(verbose=-1)(*theirs)
    (z_qpth * w).sum().backward()
    assert torch.allclose(z, z_qpth, atol=1e-6)
    for a, c in zip(ours, theirs, strict=True):
        assert torch.allclose(a.grad, c.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_are_solved_on_cpu_and_differentiated_on_their_device():
    values = random_qp(2)
    params = [v.cuda().requires_grad_(True) for v in values]
    z = bbd.QPLayer()(*params)
    z.sum().backward()
    assert z.device.type == "cuda" and all(p.grad.device.type == "cuda" for p in params)
    cpu = [v.clone().requires_grad_(True) for v in values]
    bbd.QPLayer()(*cpu).sum().backward()
    assert torch.allclose(params[1].grad.cpu(), cpu[1].grad, atol=1e-10)


# --- degenerate problems ----------------------------------------------------------------------------------------
def test_duplicate_active_rows_are_named_and_the_derivative_that_exists_is_right():
    """Rows 0 and 1 are the same constraint z_0 <= 1 (LICQ fails): dz/dp exists (z_0 stays at 1, z_1 = -p_1)
    and is exact; z_0 = min(h_0, h_1) has a kink in h and z_1 one in G (tilting row 0 or row 1 moves it
    differently), and the warning names the rows and the outputs."""
    p = torch.tensor([-2.0, -2.0], requires_grad=True)
    G = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([1.0, 1.0, 5.0], requires_grad=True)
    with pytest.warns(RuntimeWarning) as record:
        z = bbd.QPLayer()(torch.eye(2), p, G, h, NONE, NONE)
    messages = [str(r.message) for r in record]
    assert len(messages) == 1, messages
    assert "active inequality constraints [0, 1] are linearly dependent (LICQ fails)" in messages[0]
    assert "The derivative of outputs [0, 1] does not exist there" in messages[0]
    assert "active set [0], active set [1] differ" in messages[0]
    z[0, 1].backward(retain_graph=True)
    assert torch.allclose(p.grad, torch.tensor([0.0, -1.0]), atol=1e-12)
    assert torch.allclose(h.grad, torch.zeros(3), atol=1e-12)
    p.grad = h.grad = None
    z[0, 0].backward()
    assert torch.allclose(z[0], torch.tensor([1.0, 2.0]))
    assert torch.allclose(p.grad, torch.zeros(2), atol=1e-12)
    assert torch.allclose(h.grad, torch.tensor([1.0, 0.0, 0.0]), atol=1e-12)  # one side: row 0 kept active


def test_weakly_active_row_is_named():
    """min (z-1)^2 s.t. z <= 1: slack and multiplier both zero; dz/dh is 1 from below and 0 from above."""
    h = torch.tensor([1.0], requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("inequality constraints [0] are weakly active")):
        z = bbd.QPLayer()(torch.eye(1), torch.tensor([-1.0]), torch.eye(1), h, NONE, NONE)
    z.sum().backward()
    assert h.grad.item() == 1.0


# --- bad input -------------------------------------------------------------------------------------------------
def test_q_not_psd_names_the_instance_and_nan_isolates_it():
    values = random_qp(3)
    values[0] = values[0].clone()
    values[0][1] = -torch.eye(6)
    message = ("Q is not positive semidefinite (smallest eigenvalue -1), so the QP is not convex. Expected a "
               "symmetric positive semidefinite Q (e.g. Q = L L^T + eps*I). (batch index 1)")
    for solver in ("auto", "proxqp"):
        with pytest.raises(bbd.SolverError, match=re.escape(message)):
            bbd.QPLayer(solver)(*values)
    params = [v.clone().requires_grad_(True) for v in values]
    with pytest.warns(RuntimeWarning, match=re.escape("(batch index 1)")):
        z = bbd.QPLayer(on_failure="nan")(*params)
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    z[[0, 2]].sum().backward()
    assert torch.isfinite(params[1].grad).all() and (params[1].grad[1] == 0).all()
    good = [v.clone() for v in values]
    good[0] = good[0][[0, 2]]
    good = [g if i == 0 else g[[0, 2]] for i, g in enumerate(good)]
    assert torch.allclose(z[[0, 2]], bbd.QPLayer()(*good), atol=1e-12)


def test_infeasible_instance_is_named():
    Q, p, G, h, A, b = (v.clone() for v in random_qp(2))
    G[1, 0], G[1, 1] = torch.eye(6)[0], -torch.eye(6)[0]
    h[1, 0], h[1, 1] = -1.0, -1.0  # z_0 <= -1 and z_0 >= 1
    message = "The QP is infeasible (no z satisfies Gz <= h and Az = b): check h and b. (batch index 1)"
    with pytest.raises(bbd.SolverError, match=re.escape(message)):
        bbd.QPLayer()(Q, p, G, h, A, b)


def test_unbounded_instance_is_named():
    message = "The QP is unbounded below (Q is singular along a feasible direction in which p^T z decreases)"
    with pytest.raises(bbd.SolverError, match=re.escape(message)):
        bbd.QPLayer()(torch.zeros(2, 2), torch.ones(2), NONE, NONE, NONE, NONE)
    G = torch.tensor([[1.0, 0.0]])
    with pytest.raises(bbd.SolverError, match=re.escape(message)):
        bbd.QPLayer()(torch.diag(torch.tensor([1.0, 0.0])), torch.ones(2), G, torch.ones(1), NONE, NONE)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({2: torch.zeros(8, 5)}, "QPLayer: G has shape (8, 5); with n = 6 (from Q), 8 inequalities (from G) and 2 "
                                 "equalities (from A) expected (8, 6) or (batch, 8, 6)."),
        ({1: torch.zeros(5)}, "QPLayer: p has shape (5,); with n = 6 (from Q), 8 inequalities (from G) and 2 "
                              "equalities (from A) expected (6,) or (batch, 6)."),
        ({3: torch.zeros(2, 7)}, "QPLayer: h has shape (2, 7); with n = 6 (from Q), 8 inequalities (from G) and 2 "
                                 "equalities (from A) expected (8,) or (batch, 8)."),
        ({0: torch.zeros(6, 5)}, "QPLayer: Q has shape (6, 5); expected a square (n, n) matrix or a batch "
                                 "(batch, n, n) with n >= 1."),
        ({5: NONE}, "QPLayer: A has shape (2, 6) but b has shape (0,); expected both empty (no such constraints) "
                    "or both non-empty."),
        ({1: torch.zeros(6, dtype=torch.int64)}, "QPLayer: p has dtype torch.int64; expected float32 or float64."),
        ({1: torch.zeros(3, 6), 3: torch.ones(4, 8)}, "QPLayer: batched arguments disagree on the batch size: "
                                                       "{'p': 3, 'h': 4}."),
    ],
)
def test_mismatched_shapes_and_dtypes_are_input_errors(change, message):
    values = random_qp(None)
    for i, v in change.items():
        values[i] = v
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.QPLayer()(*values)


def test_unknown_solver_and_option_are_rejected_at_construction():
    with pytest.raises(bbd.InputError, match=re.escape("Unknown QP solver 'gurobi'; expected 'auto' or one of")):
        bbd.QPLayer("gurobi")
    with pytest.raises(bbd.InputError, match=re.escape("Unknown option(s) ['tolerance'] for bbd.layer with backend "
                                                       "'qp'")):
        bbd.QPLayer(tolerance=1e-3)


def test_missing_solver_library_gives_the_pip_command(monkeypatch):
    import blackbox_diff_qp._solvers as solvers

    monkeypatch.setattr(solvers, "_installed", lambda name: name != "proxqp")
    with pytest.raises(bbd.BackendUnavailableError, match=re.escape("pip install proxsuite")):
        bbd.QPLayer("proxqp")


# --- the backend and its public black box ---------------------------------------------------------------------------
def test_qp_backend_is_registered_through_the_entry_point():
    row = next(info for info in bbd.backends() if info.name == "qp")
    assert row.available and row.returns_duals and row.package == "blackbox-diff"


def test_bbd_layer_on_a_quadratic_program_is_the_same_layer():
    Q, p, G, h, A, b = random_qp(2)
    layer = bbd.layer(QuadraticProgram(6, 8, 2), backend="qp")
    (z,) = layer(Q, p, G, h, A, b)
    assert torch.allclose(z, bbd.QPLayer()(Q, p, G, h, A, b), atol=1e-14)
    with pytest.raises(bbd.InputError, match=re.escape("The qp backend's parameters are always (Q, p, G, h, A, b)")):
        bbd.layer(QuadraticProgram(6, 8, 2), backend="qp", parameters=[1])


def test_solve_qp_takes_sparse_matrices_and_returns_the_active_set():
    import scipy.sparse as sps

    Q, p, G, h, A, b = (v.numpy() for v in random_qp(None, seed=7))
    dense = solve_qp(Q, p, G, h, A, b)
    sparse = solve_qp(sps.csc_matrix(Q), p, sps.csc_matrix(G), h, sps.csc_matrix(A), b, solver="piqp")
    assert np.allclose(dense.x, sparse.x, atol=1e-12) and np.array_equal(dense.active, sparse.active)
    slack = h - G @ dense.x
    assert np.all(np.abs(slack[dense.active]) < 1e-12) and np.all(dense.ineq[~dense.active] == 0)
    assert dense.kkt_inverse.shape[0] == 6 + 2 + int(dense.active.sum())


@pytest.mark.parametrize("dense", [True, False], ids=["preconditioned", "raw"])
def test_the_stated_parameter_jvp_is_the_residuals_own_derivative(dense):
    # Forward mode takes (dF/d(Q, p, G, h, A, b)) (dQ, ...) from the QP condition's jvp_params (F is linear in
    # the data) instead of two reverse sweeps: it must equal torch.func.jvp of the residual itself, at an
    # answer with active and inactive rows, with and without the K0^{-1} preconditioning.
    torch.manual_seed(0)
    n, m, pe = 5, 6, 2
    compiled = bbd.layer(QuadraticProgram(n, m, pe), backend="qp", dense_max=100 if dense else 0).compiled
    cond = compiled.condition
    M, G, A = (torch.randn(r, n, dtype=torch.float64) for r in (n, m, pe))
    x0 = torch.randn(n, dtype=torch.float64)  # feasible: G x0 < h, A x0 = b; the objective pulls away from it
    data = [M @ M.T + torch.eye(n, dtype=torch.float64), 5 * torch.randn(n, dtype=torch.float64),
            G, G @ x0 + 0.1 * torch.rand(m, dtype=torch.float64), A, A @ x0]
    z, aux = cond.prepare(compiled.solve(*[d.numpy() for d in data]), tuple(data), compiled_options(compiled))
    assert 0 < int(aux[0].sum()) < m  # some rows active, some not
    tangents = [torch.randn_like(d) for d in data]
    _, expected = torch.func.jvp(lambda *d: cond.residual(z, *aux, *d), tuple(data), tuple(tangents))
    torch.testing.assert_close(cond.jvp_params(z, *aux, *data, *tangents), expected, rtol=1e-12, atol=1e-12)
    # Batch-agnostic (the engine calls it once for a batch): two rows, Q and its tangent shared by the batch
    assert cond.batched_jvp_params
    two = lambda t: torch.stack([t, 2 * t])  # noqa: E731
    rows = cond.jvp_params(two(z), *[torch.stack([a, a]) for a in aux], data[0], *[two(d) for d in data[1:]],
                           tangents[0], *[two(t) for t in tangents[1:]])
    for k, scale in enumerate((1.0, 2.0)):
        one = cond.jvp_params(scale * z, *aux, data[0], *[scale * d for d in data[1:]], tangents[0],
                              *[scale * t for t in tangents[1:]])
        torch.testing.assert_close(rows[k], one, rtol=1e-12, atol=1e-12)


def compiled_options(compiled):
    return bbd.ImplicitOptions(**compiled.options)
