"""The degenerate zoo: every backend and every linear solver at points where the KKT conditions can be
stated in more than one way (issue 13).

Each problem is a parametric LP/QP written once as data affine in theta, and stated through every backend
that takes it: the cvxpy layer (Clarabel), `bbd.QPLayer` (DAQP), `bbd.KKT` on the scipy backend (SLSQP),
the CasADi layer (IPOPT, both adjoints) and, for bounds, `bbd.Argmin` with scipy's box bounds. The
references are re-solves of the same problem by `solve_qp` (DAQP polished on its active set: exact):
central differences where the derivative exists, one-sided differences where it does not.

* Where one-sided differences agree, the derivative is returned exactly, whatever the linear solver, and
  without a warning.
* Where they differ, the call warns, naming the constraints and the outputs concerned and saying that the
  derivative does not exist; the gradient returned is one of the one-sided ones.

`bbd.QPLayer`'s parameters are the data themselves (G, h, A, b entry by entry): a constraint stated twice
is a kink in h there (x = min(h_0, h_1)), so it warns where the other layers, whose parameters enter both
copies alike, do not; its gradient with respect to theta (through h) is exact all the same.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings

import casadi as ca
import cvxpy as cp
import numpy as np
import pytest
import torch

import blackbox_diff as bbd

qp_plugin = pytest.importorskip("blackbox_diff_qp")
from blackbox_diff_qp import solve_qp  # noqa: E402

LINEAR_SOLVERS = ["auto", "dense", "minres", "gmres", "bicgstab", "lstsq"]
NONE = torch.empty(0)
IPOPT_TIGHT = {"ipopt.tol": 1e-12, "ipopt.acceptable_tol": 1e-12}


# --- the problems: min 1/2 x'Qx + (C theta + q0)'x  s.t.  G x <= H theta + h0,  A x == B theta + b0 ----------
@dataclasses.dataclass
class Problem:
    name: str
    theta: np.ndarray
    Q: np.ndarray
    q0: np.ndarray
    G: np.ndarray
    H: np.ndarray
    h0: np.ndarray
    C: np.ndarray | None = None
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    b0: np.ndarray | None = None
    box: tuple | None = None  # (lb, ub) when the inequalities are exactly bounds on x (rows of +-I)

    def __post_init__(self) -> None:
        n, k = self.Q.shape[0], self.theta.size
        self.C = np.zeros((n, k)) if self.C is None else self.C
        self.A = np.zeros((0, n)) if self.A is None else self.A
        self.B = np.zeros((self.A.shape[0], k)) if self.B is None else self.B
        self.b0 = np.zeros(self.A.shape[0]) if self.b0 is None else self.b0

    def data(self, theta: np.ndarray):
        return (self.Q, self.C @ theta + self.q0, self.G, self.H @ theta + self.h0, self.A, self.B @ theta + self.b0)

    def solve(self, theta: np.ndarray) -> np.ndarray:
        """The reference: an exact re-solve (DAQP, polished on its active set)."""
        return solve_qp(*self.data(theta), solver="daqp").x

    def central(self, h: float = 1e-4) -> np.ndarray:
        """d x / d theta by central differences of re-solves (n, k). The solution maps here are piecewise
        affine, so a step short of the nearest kink is exact but for the re-solves' own error (DAQP leaves
        ~1e-11 where the answer cannot be polished: at a degenerate point)."""
        return np.stack([(self.solve(self.theta + h * e) - self.solve(self.theta - h * e)) / (2 * h)
                         for e in np.eye(self.theta.size)], axis=1)

    def one_sided(self, h: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
        """Right and left derivatives (n, k), by differences of re-solves on each side (away from the
        degenerate point itself, where no solver's answer is polished)."""
        def diff(sign: float) -> np.ndarray:
            return np.stack([sign * (self.solve(self.theta + 2 * sign * h * e) - self.solve(self.theta + sign * h * e))
                             / h for e in np.eye(self.theta.size)], axis=1)

        return diff(1.0), diff(-1.0)


def lp_vertex() -> Problem:
    """max 1.1 x1 + x2 s.t. x1 <= p1, x2 <= p2, x1 + x2 <= p3 at p = (1, 1, 2): three active rows in 2-D.
    x1 = p1 (d x1/dp = (1, 0, 0)); x2 = min(p2, p3 - p1) has a kink."""
    return Problem("lp_vertex", np.array([1.0, 1.0, 2.0]), np.zeros((2, 2)), np.array([-1.1, -1.0]),
                   np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.eye(3), np.zeros(3))


def kink(a: float, b: float) -> Problem:
    """max x1 s.t. x1 <= t1, a(x1 - t3) <= 0, b(x1 - t4) <= 0 at t = (5, 1, 1): x1 = min(t1, t3, t4)."""
    return Problem(f"kink_{a:g}_{b:g}", np.array([5.0, 1.0, 1.0]), np.zeros((1, 1)), np.array([-1.0]),
                   np.array([[1.0], [a], [b]]), np.diag([1.0, a, b]), np.zeros(3))


def redundant_lp(s: float) -> Problem:
    """max x1 + x2 s.t. x1 <= p1, s x1 <= s p1, x2 <= p2: x = p, d x/dp = I (the vertex is degenerate)."""
    return Problem(f"redundant_lp_{s:g}", np.array([1.0, 1.0]), np.zeros((2, 2)), np.array([-1.0, -1.0]),
                   np.array([[1.0, 0.0], [s, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [s, 0.0], [0.0, 1.0]]),
                   np.zeros(3))


def redundant_qp(s: float) -> Problem:
    """min (x1 - 2)^2 + (x2 - 2)^2 s.t. x1 <= p1, s x1 <= s p1, x2 <= p2 at p = (1, 1): x = p."""
    return Problem(f"redundant_qp_{s:g}", np.array([1.0, 1.0]), 2 * np.eye(2), np.array([-4.0, -4.0]),
                   np.array([[1.0, 0.0], [s, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [s, 0.0], [0.0, 1.0]]),
                   np.zeros(3))


def redundant_equality() -> Problem:
    """min (x1 - 2)^2 + x2^2 s.t. x1 + x2 = p, 3 (x1 + x2) = 3 p, x1 <= 10: x = ((p + 2)/2, (p - 2)/2)."""
    return Problem("redundant_equality", np.array([1.0]), 2 * np.eye(2), np.array([-4.0, 0.0]),
                   np.array([[1.0, 0.0]]), np.zeros((1, 1)), np.array([10.0]),
                   A=np.array([[1.0, 1.0], [3.0, 3.0]]), B=np.array([[1.0], [3.0]]))


def weak_bound() -> Problem:
    """min (x - p)^2 s.t. x <= 0 at p = 0: slack and multiplier both 0; dx/dp is 1 from below, 0 above."""
    return Problem("weak_bound", np.array([0.0]), 2 * np.eye(1), np.zeros(1), np.eye(1), np.zeros((1, 1)),
                   np.zeros(1), C=np.array([[-2.0]]), box=(-np.inf, 0.0))


def weak_flat() -> Problem:
    """min (x1 - p)^2 + x2^2 s.t. x2 <= 0 at p = 0.3: x2 = 0 is weakly active, but x2 = 0 either way, so the
    derivative exists (d x/dp = (1, 0))."""
    return Problem("weak_flat", np.array([0.3]), 2 * np.eye(2), np.zeros(2), np.array([[0.0, 1.0]]),
                   np.zeros((1, 1)), np.zeros(1), C=np.array([[-2.0], [0.0]]),
                   box=(np.array([-np.inf, -np.inf]), np.array([np.inf, 0.0])))


# --- the backends ----------------------------------------------------------------------------------------------
def via_cvxpy(pb: Problem, ls: str):
    n, k = pb.Q.shape[0], pb.theta.size
    x, th = cp.Variable(n), cp.Parameter(k)
    objective = (pb.C @ th + pb.q0) @ x
    if np.any(pb.Q):
        objective = objective + 0.5 * cp.quad_form(x, pb.Q)
    cons = [pb.G @ x <= pb.H @ th + pb.h0]
    if pb.A.shape[0]:
        cons.append(pb.A @ x == pb.B @ th + pb.b0)
    layer = bbd.layer(cp.Problem(cp.Minimize(objective), cons), parameters=[th], variables=[x], linear_solver=ls)
    return lambda t: layer(t)[0]


def via_qplayer(pb: Problem, ls: str):
    layer = bbd.QPLayer(linear_solver=ls)
    T = [torch.as_tensor(M) for M in (pb.Q, pb.C, pb.q0, pb.G, pb.H, pb.h0, pb.A, pb.B, pb.b0)]
    Q, C, q0, G, H, h0, A, B, b0 = T

    def fn(t):
        eq = (A, B @ t + b0) if A.shape[0] else (NONE, NONE)
        return layer(Q, C @ t + q0, G, H @ t + h0, *eq)[0]

    return fn


def via_kkt(pb: Problem, ls: str, method: str = "SLSQP"):
    Q, C, q0, G, H, h0, A, B, b0 = (torch.as_tensor(M) for M in (pb.Q, pb.C, pb.q0, pb.G, pb.H, pb.h0, pb.A,
                                                                   pb.B, pb.b0))
    cond = bbd.KKT(lambda x, t: 0.5 * x @ Q @ x + (C @ t + q0) @ x, ineq=lambda x, t: G @ x - H @ t - h0,
                   eq=(lambda x, t: A @ x - B @ t - b0) if pb.A.shape[0] else None)
    return bbd.layer(cond, backend="scipy", x0=np.zeros(pb.Q.shape[0]), method=method, linear_solver=ls)


def via_casadi(pb: Problem, ls: str, adjoint: str = "sparse_lu"):
    n, k = pb.Q.shape[0], pb.theta.size
    opti = ca.Opti()
    x, th = opti.variable(n), opti.parameter(k)
    opti.minimize(0.5 * ca.dot(x, ca.mtimes(ca.DM(pb.Q), x)) + ca.dot(ca.mtimes(ca.DM(pb.C), th) + pb.q0, x))
    opti.subject_to(ca.mtimes(ca.DM(pb.G), x) <= ca.mtimes(ca.DM(pb.H), th) + pb.h0)
    if pb.A.shape[0]:
        opti.subject_to(ca.mtimes(ca.DM(pb.A), x) == ca.mtimes(ca.DM(pb.B), th) + pb.b0)
    layer = bbd.layer(opti, parameters=[th], variables=[x], linear_solver=ls, adjoint=adjoint,
                      solver_options=IPOPT_TIGHT)
    return lambda t: layer(t)[0].reshape(-1)


def via_box(pb: Problem, ls: str):
    Q, C, q0 = (torch.as_tensor(M) for M in (pb.Q, pb.C, pb.q0))
    f = bbd.Argmin(lambda x, t: 0.5 * x @ Q @ x + (C @ t + q0) @ x)
    lb, ub = pb.box
    layer = bbd.layer(f, backend="scipy", x0=np.full(pb.Q.shape[0], -0.5), bounds=(lb, ub), method="L-BFGS-B",
                      linear_solver=ls, parameters=[pb.theta.shape])
    return layer


BACKENDS = {
    "cvxpy": via_cvxpy,
    "qplayer": via_qplayer,
    "kkt-slsqp": via_kkt,
    "casadi": via_casadi,
    "casadi-engine": lambda pb, ls: via_casadi(pb, ls, adjoint="engine"),
}


def jacobian_and_warnings(fn, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x, d x/d theta (n, k), the RuntimeWarnings of the forward) of one layer call."""
    t = torch.tensor(theta, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = fn(t)
        rows = [torch.autograd.grad(x[i], t, retain_graph=True)[0].numpy() for i in range(x.numel())]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return x.detach().numpy(), np.stack(rows), messages


def assert_one_sided(J: np.ndarray, pb: Problem, outputs: list[int]) -> None:
    """Each returned partial derivative of the outputs is one of the one-sided ones, and somewhere the two
    sides differ (the derivative does not exist)."""
    fwd, bwd = pb.one_sided()
    for i in outputs:
        assert not np.allclose(fwd[i], bwd[i], atol=1e-6), (fwd[i], bwd[i])
        for k in range(pb.theta.size):
            assert min(abs(J[i, k] - fwd[i, k]), abs(J[i, k] - bwd[i, k])) < 1e-6, (i, k, J[i], fwd[i], bwd[i])


def degenerate_messages(messages: list[str]) -> list[str]:
    return [m for m in messages if m.startswith("Degenerate point")]


# --- the LP vertex of the issue, every backend x every linear solver -------------------------------------------
@pytest.mark.parametrize("ls", LINEAR_SOLVERS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_lp_vertex_gives_dx1_exactly_and_flags_x2(backend, ls):
    pb = lp_vertex()
    x, J, messages = jacobian_and_warnings(BACKENDS[backend](pb, ls), pb.theta)
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-8)
    np.testing.assert_allclose(J[0], [1.0, 0.0, 0.0], atol=1e-10)  # exists: the central differences'
    np.testing.assert_allclose(J[0], pb.central()[0], atol=1e-6)
    assert_one_sided(J, pb, [1])
    (message,) = degenerate_messages(messages)
    assert "active inequality constraints [0, 1, 2] are linearly dependent (LICQ fails)" in message
    assert "The derivative of outputs [1] does not exist there" in message
    assert "Outputs [0] have a derivative, and it is returned exactly" in message
    assert len(messages) == 1, messages


# --- kinks with arbitrary constraint scalings -------------------------------------------------------------------
@pytest.mark.parametrize("ls", LINEAR_SOLVERS)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.1, 0.3)], ids=["a=b=1", "a=0.1,b=0.3"])
def test_kink_is_flagged_whatever_the_scaling_of_its_rows(backend, ls, scales):
    pb = kink(*scales)
    x, J, messages = jacobian_and_warnings(BACKENDS[backend](pb, ls), pb.theta)
    np.testing.assert_allclose(x, [1.0], atol=1e-8)
    assert_one_sided(J, pb, [0])
    # one constraint's side (dx1/dt3 or dx1/dt4), never an arbitrary split between them
    assert np.allclose(J[0], [0, 1, 0], atol=1e-10) or np.allclose(J[0], [0, 0, 1], atol=1e-10), J
    (message,) = degenerate_messages(messages)
    assert "active inequality constraints [1, 2] are linearly dependent (LICQ fails)" in message
    assert "The derivative of outputs [0] does not exist there" in message


# --- redundant constraints: the derivative exists and is exact --------------------------------------------------
REDUNDANT = [redundant_lp(1.0), redundant_lp(3.0), redundant_qp(1.0), redundant_qp(3.0), redundant_equality()]


@pytest.mark.parametrize("ls", LINEAR_SOLVERS)
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("pb", REDUNDANT, ids=[pb.name for pb in REDUNDANT])
def test_redundant_constraints_give_the_exact_derivative(pb, backend, ls):
    make = BACKENDS[backend]
    if backend == "kkt-slsqp" and pb.A.shape[0]:  # SLSQP stops on dependent equalities (its LSQ matrix is
        make = functools.partial(via_kkt, method="trust-constr")  # singular, status 6): trust-constr solves it
    x, J, messages = jacobian_and_warnings(make(pb, ls), pb.theta)
    np.testing.assert_allclose(x, pb.solve(pb.theta), atol=1e-8)
    np.testing.assert_allclose(J, pb.central(), atol=1e-6)
    exact = np.eye(2) if pb.theta.size == 2 else np.array([[0.5], [0.5]])
    np.testing.assert_allclose(J, exact, atol=1e-10)
    if backend != "qplayer" or pb.A.shape[0]:
        # (QPLayer's b entry by entry: moving one copy alone leaves no feasible point, so only the moves
        # that keep the copies equal have a derivative, and every independent subset gives the same one.)
        assert messages == []
    else:  # its parameters are h entry by entry: the copies are a kink in them (see the module docstring)
        (message,) = degenerate_messages(messages)
        assert "are linearly dependent (LICQ fails)" in message and "does not exist there" in message


# --- weakly active constraints ------------------------------------------------------------------------------
WEAK_BACKENDS = {**BACKENDS, "scipy-bounds": via_box}


@pytest.mark.parametrize("ls", LINEAR_SOLVERS)
@pytest.mark.parametrize("backend", list(WEAK_BACKENDS))
def test_weakly_active_bound_is_flagged_with_a_one_sided_derivative(backend, ls):
    pb = weak_bound()
    x, J, messages = jacobian_and_warnings(WEAK_BACKENDS[backend](pb, ls), pb.theta)
    np.testing.assert_allclose(x, [0.0], atol=1e-7)
    assert_one_sided(J, pb, [0])
    (message,) = degenerate_messages(messages)
    assert re.search(r"(inequality constraints|bounds on entries) \[0\] are weakly active", message), message
    assert "The derivative of outputs [0] does not exist there" in message


@pytest.mark.parametrize("ls", ["auto", "minres", "lstsq"])
@pytest.mark.parametrize("backend", [b for b in WEAK_BACKENDS if b != "qplayer"])
def test_weakly_active_bound_whose_sides_agree_is_exact_and_silent(backend, ls):
    pb = weak_flat()
    x, J, messages = jacobian_and_warnings(WEAK_BACKENDS[backend](pb, ls), pb.theta)
    np.testing.assert_allclose(x, [0.3, 0.0], atol=1e-7)
    np.testing.assert_allclose(J, [[1.0], [0.0]], atol=1e-8)
    np.testing.assert_allclose(J, pb.central(), atol=1e-6)
    assert messages == []


# --- an MPC with dependent state constraints (CasADi Opti, IPOPT) ---------------------------------------------
MPC_KINDS = {"implied": [0.0, 10.0, 1.0], "twice": [0.0, 10.0, 2.5], "kink": [0.0, 10.0, 1.0, 1.0]}


def mpc_layer(kind: str, adjoint: str, T: int = 4):
    """x_{t+1} = x_t + u_t from x_0, cost sum (x_t - r)^2 + 0.1 u_t^2, target r far away so the moves saturate.

    kind "implied": u_t <= umax and x_{t+1} - x_t <= umax (the same bound again, implied by the dynamics),
    parameters (x0, r, umax); "twice": x_t <= xmax stated twice (the state saturates at xmax), parameters
    (x0, r, xmax); "kink": u_t <= umax and x_{t+1} - x_t <= w at w = umax (a kink), parameters (x0, r, umax, w).
    """
    opti = ca.Opti()
    X, U = opti.variable(T + 1), opti.variable(T)
    params = [opti.parameter() for _ in MPC_KINDS[kind]]
    x0, r, bound = params[:3]
    opti.minimize(ca.sumsqr(X[1:] - r) + 0.1 * ca.sumsqr(U))
    opti.subject_to(X[0] == x0)
    opti.subject_to(X[1:] == X[:-1] + U)
    if kind == "twice":
        opti.subject_to(X[1:] <= bound)
        opti.subject_to(X[1:] <= bound)
    else:
        opti.subject_to(U <= bound)
        opti.subject_to(X[1:] - X[:-1] <= (bound if kind == "implied" else params[3]))
    return bbd.layer(opti, parameters=params, variables=[X, U], adjoint=adjoint, solver_options=IPOPT_TIGHT)


def mpc_solve(layer, theta: np.ndarray) -> np.ndarray:
    """The black box itself (IPOPT, tight), (X, U) stacked."""
    return np.asarray(layer.compiled.solve(*theta).x)


def mpc_jacobian(layer, theta: np.ndarray):
    t = [torch.tensor(v, requires_grad=True) for v in theta]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X, U = layer(*t)
        out = torch.cat([X, U])
        rows = [torch.stack(torch.autograd.grad(out[i], t, retain_graph=True, allow_unused=True,
                                                materialize_grads=True)).numpy() for i in range(out.numel())]
    return out.detach().numpy(), np.stack(rows), [str(w.message) for w in caught
                                                   if issubclass(w.category, RuntimeWarning)]


def mpc_central(layer, theta: np.ndarray, k: int, h: float = 1e-4) -> np.ndarray:
    e = np.eye(theta.size)[k]
    return (mpc_solve(layer, theta + h * e) - mpc_solve(layer, theta - h * e)) / (2 * h)


@pytest.mark.parametrize("adjoint", ["sparse_lu", "engine"])
@pytest.mark.parametrize("kind", ["implied", "twice"])
def test_mpc_with_dependent_state_constraints_gives_the_derivative_that_exists(kind, adjoint):
    layer, theta = mpc_layer(kind, adjoint), np.array(MPC_KINDS[kind])
    x, J, messages = mpc_jacobian(layer, theta)
    np.testing.assert_allclose(x, mpc_solve(layer, theta), atol=1e-7)
    for k in range(theta.size):
        np.testing.assert_allclose(J[:, k], mpc_central(layer, theta, k), atol=1e-5)
    # closed form where the moves saturate: X_t = x0 + t umax (implied), X_t = xmax from t = 3 on (twice)
    saturated = np.arange(1, 5) if kind == "implied" else np.arange(3, 5)
    np.testing.assert_allclose(J[saturated, 2], saturated if kind == "implied" else 1.0, atol=1e-9)
    assert degenerate_messages(messages) == [], messages
    assert "are linearly dependent" not in " ".join(messages)


@pytest.mark.parametrize("adjoint", ["sparse_lu", "engine"])
def test_mpc_kink_between_two_bounds_is_flagged_naming_the_constraints(adjoint):
    layer, theta = mpc_layer("kink", adjoint), np.array(MPC_KINDS["kink"])
    x, J, messages = mpc_jacobian(layer, theta)
    (message,) = degenerate_messages(messages)
    assert "active inequality constraints [5, 6, 7, 8, 9, 10, 11, 12] are linearly dependent" in message
    assert "The derivative of outputs" in message and "does not exist there" in message
    # the two sides in umax (and in w) differ: u_t = min(umax, w) moves with one or the other
    h = 1e-4
    for k in (2, 3):
        e = np.eye(theta.size)[k]
        right = (mpc_solve(layer, theta + 2 * h * e) - mpc_solve(layer, theta + h * e)) / h
        left = (mpc_solve(layer, theta - h * e) - mpc_solve(layer, theta - 2 * h * e)) / h
        assert not np.allclose(right, left, atol=1e-3)
        close = np.minimum(np.abs(J[:, k] - right), np.abs(J[:, k] - left))
        assert close.max() < 1e-4, (J[:, k], right, left)
    for k in (0, 1):  # the derivatives in x0 and r exist (both sides agree) and are returned
        np.testing.assert_allclose(J[:, k], mpc_central(layer, theta, k), atol=1e-5)


# --- certification: scale-aware in every backend ------------------------------------------------------------------
def _stiff_qp(s: float):
    """min s (1e4 (x1 - 3)^2 + (x2 - 1)^2) s.t. x1 <= h: x = (2, 1) with a multiplier of 2e4 s at h = 2."""
    Q = torch.diag(torch.tensor([2e4, 2.0])) * s
    q = torch.tensor([-6e4, -2.0]) * s
    return Q, q, torch.tensor([[1.0, 0.0]])


def _off(x):
    """x2 off by 0.6% (an inaccurate black box: the real solver's answer, then spoiled)."""
    x = np.array(x, dtype=np.float64)
    x[1] *= 1.006
    return x


def _qp_certified(s: float, spoil: bool):
    Q, q, G = _stiff_qp(s)
    compiled = bbd.layer(bbd.qp.QuadraticProgram(2, 1, 0), backend="qp").compiled

    def solve(*args):
        sol = compiled.solve(*args)
        if spoil:
            sol.x = _off(sol.x)
        return sol

    h = torch.tensor([2.0], requires_grad=True)
    z = bbd.implicit(compiled.condition)(solve)(Q, q, G, h, torch.zeros(0, 2), torch.zeros(0))
    return z[:2], h


def _cvxpy_certified(s: float, spoil: bool):
    x, h = cp.Variable(2), cp.Parameter(1)
    problem = cp.Problem(cp.Minimize(s * (1e4 * cp.square(x[0] - 3) + cp.square(x[1] - 1))), [x[0] <= h[0]])
    compiled = bbd.layer(problem, parameters=[h], variables=[x], refine=False).compiled
    where = compiled.outputs.reads[0].index  # x's entries in the cone program's variable

    def solve(*args):
        answer = compiled.solve(*args)
        if spoil:
            answer.x = answer.x.copy()
            answer.x[where[1]] *= 1.006
        return answer

    ht = torch.tensor([2.0], requires_grad=True)
    z = bbd.implicit(compiled.condition)(solve)(ht)
    return z[where], ht


def _casadi_certified(s: float, spoil: bool):
    opti = ca.Opti()
    x, h = opti.variable(2), opti.parameter()
    opti.minimize(s * (1e4 * (x[0] - 3) ** 2 + (x[1] - 1) ** 2))
    opti.subject_to(x[0] <= h)
    compiled = bbd.layer(opti, parameters=[h], variables=[x], polish=False, solver_options=IPOPT_TIGHT).compiled

    def solve(*args):
        sol = compiled.solve(*args)
        if spoil:
            sol.x = _off(sol.x)
        return sol

    ht = torch.tensor(2.0, requires_grad=True)
    z = bbd.implicit(compiled.condition)(solve)(ht)
    return z[:2], ht


CERTIFIED = {"qplayer": _qp_certified, "cvxpy": _cvxpy_certified, "casadi": _casadi_certified}


@pytest.mark.parametrize("s", [1e-9, 1e-6, 1.0, 1e6, 1e9], ids=lambda s: f"units-{s:g}")
@pytest.mark.parametrize("backend", [*CERTIFIED, "bbd.KKT"])
def test_answer_off_by_a_little_beside_a_large_multiplier_is_refused_in_any_units(backend, s, check_path):
    # The certificate's parts are floored in their own units (certificate_blocks): with the objective in
    # units of 1e-6 the constraint rows' terms (~1) no longer set the floor of the stationarity rows (~1e-6).
    if backend == "bbd.KKT":  # the engine's own KKT condition, for comparison (the case)
        cond = bbd.KKT(lambda x, h: s * (1e4 * (x[0] - 3) ** 2 + (x[1] - 1) ** 2), ineq=lambda x, h: x[:1] - h)
        solve = bbd.implicit(cond)(lambda h: bbd.KKTSolution(np.array([2.0, 1.006]), ineq=np.array([2e4 * s])))
        with pytest.raises(bbd.CertificationError, match=re.escape("relative to the size of their terms")):
            solve(torch.tensor([2.0]))
        return
    with pytest.raises(bbd.CertificationError, match=re.escape("relative to the size of their terms")):
        CERTIFIED[backend](s, spoil=True)


# Not 1e-9 / 1e9 here: DAQP (x0 = 3, infeasible, at 1e9) and Clarabel (absolute tolerances, at 1e-9) do not
# solve these accurately, and certification rightly refuses their answers.
@pytest.mark.parametrize("s", [1e-6, 1.0, 1e6], ids=lambda s: f"units-{s:g}")
@pytest.mark.parametrize("backend", list(CERTIFIED))
def test_accurate_answer_beside_a_large_multiplier_is_accepted_in_any_units(backend, s, check_path):
    x, h = CERTIFIED[backend](s, spoil=False)
    np.testing.assert_allclose(x.detach().numpy(), [2.0, 1.0], atol=1e-6)
    (g,) = torch.autograd.grad(x[0], h)
    np.testing.assert_allclose(g.numpy().reshape(-1), [1.0], atol=1e-6)


@pytest.mark.parametrize("adjoint", ["sparse_lu", "engine"])
@pytest.mark.parametrize("p", [-1e-5, -1e-6, -1e-7])
def test_ipopt_answer_near_an_inactive_bound_is_accepted_with_derivative_one(p, adjoint, check_path):
    # IPOPT (default tolerance) leaves x ~ -4e-5 and a multiplier ~8e-5 here: both at its complementarity
    # level. The active set is settled by polishing (x = 0 would need a negative multiplier), so the answer
    # is x = p exactly, inactive, derivative 1, and certified.
    opti = ca.Opti()
    x, pp = opti.variable(), opti.parameter()
    opti.minimize((x - pp) ** 2)
    opti.subject_to(x <= 0)
    layer = bbd.layer(opti, parameters=[pp], variables=[x], adjoint=adjoint)
    t = torch.tensor(p, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (z,) = layer(t)
        (g,) = torch.autograd.grad(z, t)
    assert float(z) == pytest.approx(p, abs=1e-15)
    assert float(g) == pytest.approx(1.0, abs=1e-12)


# --- the KKT toolkit enumerates only the weak and dependent rows: many strongly active ones do not hide a weak one ---
def test_weakly_active_row_beside_many_strongly_active_rows_is_flagged():
    n = 14
    u = torch.ones(n)
    p = u + torch.cat([torch.ones(n - 1), torch.zeros(1)])  # x = min(p, u): 13 strongly active rows, 1 weak
    p.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bbd.QPLayer()(torch.eye(n), -p, torch.eye(n), u, NONE, NONE)
    assert any("weakly active" in str(w.message) for w in caught)


def test_more_weak_rows_than_the_toolkit_compares_is_said_not_silent():
    # x = min(p, u) with all 14 rows weakly active (p = u): 2^14 one-sided sets are not enumerated, and the
    # warning says the point was not examined rather than passing it for regular.
    n = 14
    u = torch.ones(n)
    p = u.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match=re.escape("Degenerate point not examined: 14 active inequality")):
        bbd.QPLayer()(torch.eye(n), -p, torch.eye(n), u, NONE, NONE)


# --- certification of a whole batch in one numpy pass (AbstractCondition.certify) ---------------------------------
def test_qp_batch_certification_judges_each_row_by_its_own_data_and_fails_only_the_spoiled_one(check_path):
    # The QP condition certifies the batch at once, Q shared (broadcast) and h per instance. Row 1 is spoiled;
    # rows 0 and 2 differ from it only in h. A batch certificate that mixed rows, or broadcast the wrong
    # operand, would refuse the good rows or pass the spoiled one.
    Q, q, G = _stiff_qp(1e-6)  # the objective in units of 1e-6: the constraint rows must not set its floor
    compiled = bbd.layer(bbd.qp.QuadraticProgram(2, 1, 0), backend="qp").compiled
    hs = torch.tensor([[2.0], [2.5], [1.5]], requires_grad=True)

    def solve(Qi, qi, Gi, hi, Ai, bi):
        sol = compiled.solve(Qi, qi, Gi, hi, Ai, bi)
        if float(hi[0]) == 2.5:
            sol.x = _off(sol.x)
        return sol

    fn = bbd.implicit(compiled.condition, on_failure="nan", in_dims=(None, None, None, 0, None, None))(solve)
    with pytest.warns(RuntimeWarning, match=r"at batch index 1 does not satisfy.*relative to the size of their terms"):
        z = fn(Q, q, G, hs, torch.zeros(0, 2), torch.zeros(0))
    assert torch.isnan(z[1]).all() and torch.isfinite(z[[0, 2]]).all()
    # The good rows keep their exact derivative: x1 = h (active), x2 = 1, so dx1/dh = 1.
    (g,) = torch.autograd.grad(z[[0, 2], 0].sum(), hs)
    assert torch.allclose(g, torch.tensor([[1.0], [0.0], [1.0]], dtype=g.dtype), atol=1e-8)


def test_the_batch_certificate_is_each_instances_own():
    # One pass over a batch (shared Q, G per instance) gives every row what the instance alone gives.
    rng = np.random.default_rng(3)
    n, m = 4, 3
    compiled = bbd.layer(bbd.qp.QuadraticProgram(n, m, 1), backend="qp").compiled
    cond = compiled.condition
    M = rng.standard_normal((n, n))
    Q = torch.tensor(M @ M.T + np.eye(n))
    rows = []
    for _ in range(3):
        x0 = rng.standard_normal(n)
        G, A = rng.standard_normal((m, n)), rng.standard_normal((1, n))
        data = [Q, torch.tensor(5 * rng.standard_normal(n)), torch.tensor(G),
                torch.tensor(G @ x0 + 0.1 * rng.random(m)), torch.tensor(A), torch.tensor(A @ x0)]
        z, aux = cond.prepare(compiled.solve(*[d.numpy() for d in data]), tuple(data), bbd.ImplicitOptions())
        rows.append((z + 0.1 * torch.as_tensor(rng.standard_normal(z.numel())), aux, data))  # off the solution
    Z = torch.stack([r[0] for r in rows])
    aux = tuple(torch.stack([r[1][k] for r in rows]) for k in range(len(rows[0][1])))
    params = [Q] + [torch.stack([r[2][k] for r in rows]) for k in range(1, 6)]
    C, L, exact, worst = cond.certify(Z, aux, params, (False, True, True, True, True, True))
    S = exact()
    # The compiled loop's largest |C| / size, which the engine compares with its tolerance (None from numpy).
    assert worst is None or worst == pytest.approx(np.max(np.where(L > 0, np.abs(C) / np.where(L > 0, L, 1), np.where(
        C == 0, 0.0, np.inf))), rel=1e-12)
    for i, (z, a, data) in enumerate(rows):
        Ci, Li, exact_i, _ = cond.certify(z[None], tuple(t[None] for t in a), [data[0]] + [d[None] for d in data[1:]],
                                          (False, True, True, True, True, True))
        np.testing.assert_allclose(C[i], Ci[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(L[i], Li[0], rtol=1e-14)
        np.testing.assert_allclose(S[i], exact_i()[0], rtol=1e-14)
    assert C.shape == S.shape == L.shape == (3, sum(cond.certificate_blocks())) and np.abs(C[:, :n]).min() > 1e-6
    # The sizes handed first are a bound from below (what passes against them passes the exact test), and a
    # real one: the stationarity and active rows' bounds are nonzero.
    assert np.all(L <= S * (1 + 1e-14)) and np.all(L[:, :n] > 0)
    assert np.all(S[:, :n] > 0)  # stationarity terms are never empty here: a zero would make any residual fail


def test_term_sizes_from_below_ask_for_the_exact_ones_only_when_they_do_not_suffice():
    # A certificate of 1e-6 against sizes from below of 0 cannot pass on the bound: the exact sizes (1) are
    # asked for and pass it; against a bound of 1 the exact sizes are never computed; and a certificate the
    # exact sizes refuse is refused.
    calls = []

    class Bounded(bbd.Root):
        def __init__(self, value, low):
            super().__init__(lambda z, w: z - z.detach())
            self.value, self.low = value, low

        def certify(self, Z, aux, params, batched):
            C = np.full((Z.shape[0], Z.shape[1]), self.value)

            def exact():
                calls.append(1)
                return np.ones_like(C)

            return C, np.full_like(C, self.low), exact

    assert float(bbd.implicit(Bounded(1e-6, 0.0))(lambda w: 2.0)(torch.tensor(4.0))) == 2.0 and len(calls) == 1
    assert float(bbd.implicit(Bounded(1e-6, 1.0))(lambda w: 2.0)(torch.tensor(4.0))) == 2.0 and len(calls) == 1
    with pytest.raises(bbd.CertificationError, match=re.escape("components 0 (0.001, relative 0.000997)")):
        bbd.implicit(Bounded(1e-3, 0.0))(lambda w: 2.0)(torch.tensor(4.0))
    assert len(calls) == 2


def test_a_condition_s_own_batch_certify_is_what_certification_uses():
    # A user condition stating its certificate in numpy: the engine takes it instead of the torch residual
    # (which here is exactly zero, so only the stated certificate can refuse the answer).
    class Stated(bbd.Root):
        def __init__(self, value):
            super().__init__(lambda z, w: z - z.detach())
            self.value = value

        def certify(self, Z, aux, params, batched):
            C = np.full((Z.shape[0], Z.shape[1]), self.value)
            return C, np.ones_like(C)

    ok = bbd.implicit(Stated(1e-9))(lambda w: 2.0)(torch.tensor(4.0))
    assert float(ok) == 2.0
    with pytest.raises(bbd.CertificationError, match=re.escape("components 0 (0.001, relative 0.000997)")):
        bbd.implicit(Stated(1e-3))(lambda w: 2.0)(torch.tensor(4.0))
