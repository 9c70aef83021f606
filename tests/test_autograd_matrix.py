"""The support matrix of docs/howto/autograd.md, checked cell by cell: it cannot drift from the code.

The table is parsed from the page itself. Each row is one differentiable output (an implicit function, a
layer of each backend, odeint, DEQ, solve_ivp_layer), built here on a small problem whose second derivatives
are not zero; each column is one way of differentiating it. A cell that says "yes" must give the right
numbers, against central differences of the black box (the output's forward pass, float64); a cell that
says "no" must raise a `bbd.BlackBoxDiffError` that says what is not supported. Cells that the code gets
wrong today are marked xfail(strict=True) below with the reason: when the bug is fixed, the strict xfail
fails and the mark must go.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

import casadi as ca
import cvxpy as cp
import numpy as np
import pytest
import scipy.optimize
import torch
import torch.autograd.forward_ad as fwAD

import blackbox_diff as bbd
from blackbox_diff.deq import DEQ
from blackbox_diff.ode import odeint, solve_ivp_layer

F64 = torch.float64
PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto" / "autograd.md"
MARKER = "<!-- support-matrix: every cell is checked by tests/test_autograd_matrix.py -->"
# What a "no" cell's error must say: that (or how) the feature is not supported.
UNSUPPORTED = re.compile(r"not supported|supported only|needs the forward sensitivities")


# --- the table, from the page -------------------------------------------------------------------------
def support_table() -> tuple[list[str], dict[str, dict[str, str]]]:
    """(column names, {row name: {column: 'yes' | 'no'}}) from the markdown table after MARKER.

    A cell is 'yes' or 'no', optionally followed by a footnote reference such as '(1)'.
    """
    lines = PAGE.read_text().splitlines()
    start = lines.index(MARKER) + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, _, *body = rows
    table = {}
    for cells in body:
        name = cells[0]
        values = {}
        for col, cell in zip(header[1:], cells[1:], strict=True):
            word = cell.split()[0].lower() if cell else ""
            if word not in ("yes", "no"):
                raise ValueError(f"{PAGE.name}: cell ({name}, {col}) is {cell!r}; expected 'yes' or 'no' first")
            values[col] = word
        table[name] = values
    return header[1:], table


# --- the rows: each output on a small problem -----------------------------------------------------------
@dataclasses.dataclass
class Case:
    """An output as a function of one flat tensor p, at a point p0."""

    f: Callable[[torch.Tensor], torch.Tensor]
    p0: torch.Tensor
    eps: float = 1e-6  # central-difference step
    tol: float = 1e-6  # relative error allowed against central differences

    def loss(self, p: torch.Tensor) -> torch.Tensor:
        """A scalar of the output with a nonzero Hessian even where the output is linear in p."""
        y = self.f(p)
        c = torch.linspace(0.5, 1.5, y.numel(), dtype=F64).reshape(y.shape)
        return (c * y).sum() + (y**3).sum() / 3

    def cotangent(self) -> torch.Tensor:
        with torch.no_grad():
            y = self.f(self.p0)
        return torch.linspace(1.0, -1.0, y.numel(), dtype=F64).reshape(y.shape)

    def tangent(self) -> torch.Tensor:
        return torch.linspace(1.0, -0.5, self.p0.numel(), dtype=F64)


def _cubic_roots(w):
    """x with x^3 + x = w, per entry, by brentq (a legacy scalar root finder)."""
    w = np.asarray(w, dtype=float)
    roots = [scipy.optimize.brentq(lambda x, wi=wi: x**3 + x - wi, -1e3, 1e3, xtol=1e-15) for wi in w.reshape(-1)]
    return np.array(roots).reshape(w.shape)


def implicit_case() -> Case:
    fn = bbd.implicit(bbd.Root(lambda x, w: x**3 + x - w))(_cubic_roots)
    return Case(fn, torch.tensor([2.0, 10.0], dtype=F64))


def cvxpy_case() -> Case:
    """Projection of c onto the half-space a^T x <= 1, differentiated in the normal a (nonlinear in a)."""
    x, a = cp.Variable(3), cp.Parameter(3)
    c = np.array([1.0, 2.0, -0.5])
    layer = bbd.layer(cp.Problem(cp.Minimize(cp.sum_squares(x - c)), [a @ x <= 1.0]), parameters=[a],
                      variables=[x])
    return Case(lambda p: layer(p)[0], torch.tensor([0.5, 1.0, 0.3], dtype=F64))


def casadi_case() -> Case:
    opti = ca.Opti()
    y, q = opti.variable(2), opti.parameter(2)
    opti.minimize(ca.sumsqr(y - q) + 0.25 * ca.sumsqr(y**2))
    opti.solver("ipopt", {"print_time": False}, {"print_level": 0, "tol": 1e-13})
    layer = bbd.layer(opti, parameters=[q], variables=[y])
    return Case(lambda p: layer(p)[0], torch.tensor([0.3, -1.0], dtype=F64))


def _scipy_fit(method: str, tol: float):
    return bbd.layer(bbd.Argmin(lambda x, w: ((x - w) ** 2).sum() + (x**4).sum()), backend="scipy",
                     x0=np.zeros(2), method=method, tol=tol)


def scipy_case() -> Case:
    # L-BFGS-B (gradients only); the Hessian-based methods are checked under forward_ad by their own test below
    return Case(_scipy_fit("L-BFGS-B", 1e-15), torch.tensor([0.4, -0.2], dtype=F64))


def qplayer_case() -> Case:
    """The same half-space projection as the cvxpy row, as a QP in qpth's convention."""
    qp = bbd.QPLayer()
    c = torch.tensor([1.0, 2.0, -0.5], dtype=F64)
    none = torch.empty(0, dtype=F64)

    def f(a):
        return qp(torch.eye(3, dtype=F64), -c, a[None, :], torch.ones(1, dtype=F64), none, none)

    return Case(f, torch.tensor([0.5, 1.0, 0.3], dtype=F64))


# x^3 + x = w by Newton, in a separate process (no imports beyond json: it starts fast)
PROGRAM = """import json, sys
w = json.load(open(sys.argv[1]))['parameters'][0]
out = []
for wi in (w if isinstance(w, list) else [w]):
    x = 0.0
    for _ in range(60):
        x -= (x**3 + x - wi) / (3 * x * x + 1)
    out.append(x)
json.dump(out, open(sys.argv[2], 'w'))
"""


def executable_case(tmp: Path) -> Case:
    program = tmp / "cubic.py"
    program.write_text(PROGRAM)
    exe = bbd.Executable([sys.executable, "-S", str(program), "{input}", "{output}"], io="json", timeout=60)
    return Case(bbd.implicit(bbd.Root(lambda x, w: x**3 + x - w))(exe), torch.tensor([2.0, 10.0], dtype=F64))


def _vdp(t, y, mu):
    return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], dim=-1)


def odeint_case() -> Case:
    """Van der Pol from y0 = p[:2] with mu = p[2], radau5; batch_dims=1 (see the page's footnote on vmap)."""

    def f(p):
        Y = odeint(_vdp, p[:2][None], [0.0, 0.5], p[2], method="radau5", substeps=2, newton_tol=1e-13, batch_dims=1)
        return Y[-1, 0]

    return Case(f, torch.tensor([1.0, 0.5, 0.8], dtype=F64))


class _TanhLayer(torch.nn.Module):
    def __init__(self, d: int = 3, scale: float = 0.7) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(scale * torch.randn(d, d, generator=g, dtype=F64) / d**0.5)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x)


def deq_case() -> Case:
    layer = DEQ(_TanhLayer(), tol=1e-13, max_iter=500)  # default solver: Anderson
    return Case(lambda p: layer(p[None])[0], torch.tensor([0.3, -0.2, 0.5], dtype=F64))


def _field(t, y, k):
    return -k * y + torch.sin(y)


def ivp_case(sensitivity: str) -> Case:
    def f(p):
        Y = solve_ivp_layer(_field, p[:1], [0.0, 0.5, 1.0], p[1], sensitivity=sensitivity, rtol=1e-11, atol=1e-13)
        return Y[1:, 0]

    return Case(f, torch.tensor([2.0, 0.8], dtype=F64))


ROWS: dict[str, Callable[[Path], Case]] = {
    "`bbd.implicit` (torch condition)": lambda tmp: implicit_case(),
    "cvxpy layer": lambda tmp: cvxpy_case(),
    "CasADi layer": lambda tmp: casadi_case(),
    "scipy layer": lambda tmp: scipy_case(),
    "`bbd.QPLayer`": lambda tmp: qplayer_case(),
    "`bbd.Executable`": executable_case,
    "`odeint`": lambda tmp: odeint_case(),
    "`DEQ`": lambda tmp: deq_case(),
    "`solve_ivp_layer`, forward": lambda tmp: ivp_case("forward"),
    "`solve_ivp_layer`, adjoint": lambda tmp: ivp_case("adjoint"),
}


@dataclasses.dataclass
class Reference:
    """Central differences of the black box at p0: the output's Jacobian and the loss's gradient."""

    case: Case
    J: torch.Tensor  # (*out_shape, k)
    grad: torch.Tensor  # (k,)


@functools.cache
def reference(row: str, tmp: Path) -> Reference:
    case = ROWS[row](tmp)
    p0, eps = case.p0, case.eps
    cols, grad = [], []
    with torch.no_grad():
        for i in range(p0.numel()):
            e = torch.zeros_like(p0)
            e[i] = eps
            up, down = case.f(p0 + e), case.f(p0 - e)
            cols.append((up - down) / (2 * eps))
            c = torch.linspace(0.5, 1.5, up.numel(), dtype=F64).reshape(up.shape)
            grad.append(((c * up).sum() + (up**3).sum() / 3 - (c * down).sum() - (down**3).sum() / 3) / (2 * eps))
    return Reference(case, torch.stack(cols, dim=-1), torch.stack(grad))


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    got, want = got.detach(), want.detach()
    err = float((got - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    assert err <= tol * scale, f"{what}: max error {err:.2e} > {tol:g} x {scale:.3g}\n got {got}\nwant {want}"


def _grad(case: Case, p: torch.Tensor) -> torch.Tensor:
    p = p.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(case.loss(p), p)
    return g


# --- the columns: how each is checked ------------------------------------------------------------------
def check_backward(ref: Reference) -> None:
    case = ref.case
    p = case.p0.clone().requires_grad_(True)
    case.loss(p).backward()
    _close(p.grad, ref.grad, case.tol, "loss.backward() vs central differences")


def check_hessian(ref: Reference) -> None:
    case, eps = ref.case, 1e-5
    H = torch.autograd.functional.hessian(case.loss, case.p0)  # create_graph=True inside
    cols = []
    for i in range(case.p0.numel()):
        e = torch.zeros_like(case.p0)
        e[i] = eps
        cols.append((_grad(case, case.p0 + e) - _grad(case, case.p0 - e)) / (2 * eps))
    _close(H, torch.stack(cols, dim=1), 1e-5, "hessian vs central differences of the gradient")
    _close(H, H.T, 1e-9, "hessian symmetric")


def check_forward_mode(ref: Reference) -> None:
    case, t = ref.case, ref.case.tangent()
    want = ref.J @ t
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(case.f(fwAD.make_dual(case.p0, t))).tangent
    assert tangent is not None, "forward_ad gave no tangent"
    _close(tangent, want, case.tol, "forward_ad tangent vs central differences")
    _, jv = torch.autograd.functional.jvp(case.f, case.p0, t)
    _close(jv, want, case.tol, "autograd.functional.jvp vs central differences")


def check_func_grad_vjp(ref: Reference) -> None:
    case = ref.case
    _close(torch.func.grad(case.loss)(case.p0), ref.grad, case.tol, "torch.func.grad vs central differences")
    c = case.cotangent()
    _, vjp_fn = torch.func.vjp(case.f, case.p0)
    want = (c.reshape(-1, 1) * ref.J.reshape(c.numel(), -1)).sum(0)
    _close(vjp_fn(c)[0], want, case.tol, "torch.func.vjp vs central differences")


def check_jacrev(ref: Reference) -> None:
    _close(torch.func.jacrev(ref.case.f)(ref.case.p0), ref.J, ref.case.tol, "torch.func.jacrev vs central differences")


def check_func_jvp(ref: Reference) -> None:
    case, t = ref.case, ref.case.tangent()
    _, jv = torch.func.jvp(case.f, (case.p0,), (t,))
    _close(jv, ref.J @ t, case.tol, "torch.func.jvp vs central differences")


def check_jacfwd(ref: Reference) -> None:
    _close(torch.func.jacfwd(ref.case.f)(ref.case.p0), ref.J, ref.case.tol, "torch.func.jacfwd vs central differences")


def check_vmap(ref: Reference) -> None:
    case = ref.case
    P = torch.stack([case.p0, case.p0 + 0.01, case.p0 - 0.02])
    with torch.no_grad():
        want = torch.stack([case.f(p) for p in P])
    _close(torch.func.vmap(case.f)(P), want, 1e-12, "torch.func.vmap vs one call per point")


def check_compile(ref: Reference) -> None:
    case = ref.case
    torch._dynamo.reset()
    compiled = torch.compile(case.loss)
    p = case.p0.clone().requires_grad_(True)
    value = compiled(p)
    value.backward()
    _close(value, case.loss(case.p0), 1e-12, "torch.compile value vs eager")
    _close(p.grad, ref.grad, case.tol, "torch.compile gradient vs central differences")


def _attempt_all(check: Callable[[Reference], None], ref: Reference) -> None:
    """A "no" cell: every call of the column raises a BlackBoxDiffError saying what is not supported."""
    case = ref.case
    calls = {
        check_backward: [lambda: case.loss(case.p0.clone().requires_grad_(True)).backward()],
        check_hessian: [lambda: torch.autograd.functional.hessian(case.loss, case.p0)],
        check_forward_mode: [_dual_call(case), lambda: torch.autograd.functional.jvp(case.f, case.p0, case.tangent())],
        check_func_grad_vjp: [lambda: torch.func.grad(case.loss)(case.p0),
                              lambda: torch.func.vjp(case.f, case.p0)[1](case.cotangent())],
        check_jacrev: [lambda: torch.func.jacrev(case.f)(case.p0)],
        check_func_jvp: [lambda: torch.func.jvp(case.f, (case.p0,), (case.tangent(),))],
        check_jacfwd: [lambda: torch.func.jacfwd(case.f)(case.p0)],
        check_vmap: [lambda: torch.func.vmap(case.f)(torch.stack([case.p0, case.p0 + 0.01]))],
        check_compile: [lambda: torch.compile(case.loss)(case.p0.clone().requires_grad_(True)).backward()],
    }[check]
    for call in calls:
        with pytest.raises(bbd.BlackBoxDiffError, match=UNSUPPORTED):
            call()


def _dual_call(case: Case) -> Callable[[], None]:
    def call():
        with fwAD.dual_level():
            case.f(fwAD.make_dual(case.p0, case.tangent()))

    return call


COLUMNS: dict[str, Callable[[Reference], None]] = {
    "backward": check_backward,
    "create_graph / Hessian": check_hessian,
    "forward mode": check_forward_mode,
    "`torch.func` grad / vjp": check_func_grad_vjp,
    "`torch.func.jvp`": check_func_jvp,
    "jacrev": check_jacrev,
    "jacfwd": check_jacfwd,
    "vmap": check_vmap,
    "`torch.compile`": check_compile,
}

# Cells the code gets wrong today (found by this matrix; the engine is not this file's to change).
KNOWN_BUGS: dict[tuple[str, str], str] = {}  # (row, column) -> why the cell fails today; none now


def _cells():
    columns, table = support_table()
    for row, values in table.items():
        for col in columns:
            marks = []
            if (row, col) in KNOWN_BUGS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[row, col]))
            yield pytest.param(row, col, values[col], id=f"{row}-{col}-{values[col]}".replace("`", ""),
                               marks=marks)


def test_the_page_lists_every_output_and_every_column():
    columns, table = support_table()
    assert columns == list(COLUMNS)
    assert list(table) == list(ROWS)
    assert all(set(v) == set(COLUMNS) for v in table.values())


@pytest.mark.parametrize(("row", "column", "claim"), list(_cells()))
def test_support_matrix(row, column, claim, tmp_path_factory):
    ref = reference(row, tmp_path_factory.getbasetemp())
    check = COLUMNS[column]
    if claim == "yes":
        check(ref)
    else:
        _attempt_all(check, ref)


# --- around the table: its footnotes ---------------------------------------------------------------------
def test_odeint_vmap_without_batch_dims_says_how_to_batch():
    def f(p):
        return odeint(_vdp, p[:2], [0.0, 0.5], p[2], method="radau5", substeps=2)[-1]

    with pytest.raises(bbd.BlackBoxDiffError, match=re.escape("torch.func.vmap over odeint is supported only for "
                                                              "batch_dims=1")):
        torch.func.vmap(f)(torch.tensor([[1.0, 0.5, 0.8], [1.0, 0.6, 0.8]], dtype=F64))


def test_deq_forward_ad_with_plain_iteration_is_right():
    """The DEQ forward-mode bug above is Anderson's output view: with solver='iteration' the tangent is right."""
    layer = DEQ(_TanhLayer(), solver="iteration", tol=1e-13, max_iter=500)
    x, t = torch.tensor([[0.3, -0.2, 0.5]], dtype=F64), torch.tensor([[1.0, 0.25, -0.5]], dtype=F64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent
    eps = 1e-6
    with torch.no_grad():
        fd = (layer(x + eps * t) - layer(x - eps * t)) / (2 * eps)
    _close(tangent, fd, 1e-7, "DEQ(iteration) forward_ad vs central differences")


def test_scipy_layer_with_a_hessian_method_under_forward_ad():
    fit = _scipy_fit("Newton-CG", 1e-14)
    w, t = torch.tensor([0.4, -0.2], dtype=F64), torch.tensor([1.0, -0.5], dtype=F64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fit(fwAD.make_dual(w, t))).tangent
    eps = 1e-6
    with torch.no_grad():
        fd = (fit(w + eps * t) - fit(w - eps * t)) / (2 * eps)
    _close(tangent, fd, 1e-6, "Newton-CG layer: forward_ad vs central differences")


# --- closure captures: first derivatives and forward mode (the page's section) ----------------------------
def _captured_root():
    """x = sqrt(s w) as the root of x^2 - s w, with s captured by the condition (not passed)."""
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)
    return s, bbd.implicit(bbd.Root(lambda x, w: x**2 - s * w))(lambda w: np.sqrt(float(s) * w))


def test_captured_tensor_gets_first_derivatives_and_forward_mode():
    s, root = _captured_root()
    w = torch.tensor(8.0, dtype=F64, requires_grad=True)
    gw, gs = torch.autograd.grad(root(w), (w, s))  # x = 4: dx/dw = s / (2x), dx/ds = w / (2x)
    assert float(gw) == pytest.approx(0.25, abs=1e-12) and float(gs) == pytest.approx(1.0, abs=1e-12)
    s_dual = torch.tensor(2.0, dtype=F64)
    with fwAD.dual_level():
        sd = fwAD.make_dual(s_dual, torch.tensor(1.0, dtype=F64))
        root_fw = bbd.implicit(bbd.Root(lambda x, w: x**2 - sd * w))(lambda w: np.sqrt(2.0 * w))
        tangent = fwAD.unpack_dual(root_fw(torch.tensor(8.0, dtype=F64))).tangent
    assert float(tangent) == pytest.approx(1.0, abs=1e-12)


def test_second_derivative_through_a_captured_tensor_is_right_or_refused():
    s, root = _captured_root()
    w = torch.tensor(8.0, dtype=F64, requires_grad=True)
    gw, gs = torch.autograd.grad(root(w), (w, s), create_graph=True)
    try:
        (h,) = torch.autograd.grad(gw + gs, w)
    except bbd.BlackBoxDiffError:
        return  # refused, clearly: acceptable
    # x = sqrt(s w): d2x/dw2 = -s^2 / (4 x^3) = -1/64, d2x/(ds dw) = 1/(2x) - s w / (4 x^3) = 1/16
    assert float(h) == pytest.approx(-1 / 64 + 1 / 16, abs=1e-12)


def test_second_derivative_in_a_captured_tensor_is_refused_clearly():
    s, root = _captured_root()
    w = torch.tensor(8.0, dtype=F64, requires_grad=True)
    (gs,) = torch.autograd.grad(root(w), s, create_graph=True)
    with pytest.raises(bbd.BlackBoxDiffError, match="captures by closure"):
        torch.autograd.grad(gs, s)
