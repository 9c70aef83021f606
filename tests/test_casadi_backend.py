"""The CasADi backend: Opti and nlpsol-dict problems as layers, gradients against closed forms and finite
differences of the solver itself (with inactive and active bounds, where CasADi's own sensitivities fail)."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import casadi as ca
import numpy as np
import pytest
import torch
from blackbox_diff_casadi import CasadiBackend

import blackbox_diff as bbd

TIGHT = {"ipopt.tol": 1e-12, "ipopt.acceptable_tol": 1e-12}


def toy_opti(kind: str):
    """min (x0 - sin p)^2 + x1^2 with no bound, an inactive bound, or x0 + x1 <= 1 (active for p in (0, pi))."""
    opti = ca.Opti()
    x = opti.variable(2)
    p = opti.parameter()
    if kind == "active":
        opti.minimize((x[0] - ca.sin(p)) ** 2 + (x[1] - 1) ** 2)
        opti.subject_to(x[0] + x[1] <= 1)
    else:
        opti.minimize((x[0] - ca.sin(p)) ** 2 + x[1] ** 2)
    if kind == "inactive":
        opti.subject_to(opti.bounded(-10, x[0] + x[1], 10))
        opti.subject_to(opti.bounded(-5, x, 5))
    return opti, p, x


def toy_dict(kind: str):
    x, p = ca.SX.sym("x", 2), ca.SX.sym("p")
    if kind == "active":
        nlp = {"x": x, "p": p, "f": (x[0] - ca.sin(p)) ** 2 + (x[1] - 1) ** 2, "g": x[0] + x[1]}
        return nlp, {"ubg": 1.0}
    nlp = {"x": x, "p": p, "f": (x[0] - ca.sin(p)) ** 2 + x[1] ** 2, "g": x[0] + x[1]}
    return nlp, {"lbg": -10.0, "ubg": 10.0, "lbx": [-5, -5], "ubx": [5, 5]}


def grad_x0(layer, p: float) -> tuple[float, float]:
    pt = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    (x,) = layer(pt)
    x[0].backward()
    return float(x[0].detach()), float(pt.grad)


def fd_x0(layer, p: float, h: float = 1e-5) -> float:
    """Central finite difference of the black box itself (the solver, tight tolerance)."""
    solve = layer.compiled.solve
    return float((solve(np.array(p + h)).x[0] - solve(np.array(p - h)).x[0]) / (2 * h))


@pytest.mark.parametrize("adjoint", ["sparse_lu", "engine"])
def test_inactive_bounds_give_the_unconstrained_derivative(adjoint):
    # CasADi 3.8's own nlpsol sensitivity returns 0 here; the true derivative is cos(0.3) = 0.955.
    opti, p, x = toy_opti("inactive")
    layer = bbd.layer(opti, parameters=[p], variables=[x], adjoint=adjoint, solver_options=TIGHT)
    value, grad = grad_x0(layer, 0.3)
    assert value == pytest.approx(np.sin(0.3), abs=1e-10)
    assert grad == pytest.approx(np.cos(0.3), abs=1e-10)
    assert grad == pytest.approx(0.955336489125606, abs=1e-12)


def test_inactive_bounds_dict_form_matches_closed_form_and_finite_differences():
    nlp, bounds = toy_dict("inactive")
    layer = bbd.layer(nlp, solver_options=TIGHT, **bounds)
    _, grad = grad_x0(layer, 0.3)
    assert grad == pytest.approx(np.cos(0.3), abs=1e-10)
    assert grad == pytest.approx(fd_x0(layer, 0.3), abs=1e-8)


@pytest.mark.parametrize("form", ["opti", "dict"])
def test_active_bound_derivative_is_half_the_unconstrained_one(form):
    if form == "opti":
        opti, p, x = toy_opti("active")
        layer = bbd.layer(opti, parameters=[p], variables=[x], solver_options=TIGHT)
    else:
        nlp, bounds = toy_dict("active")
        layer = bbd.layer(nlp, solver_options=TIGHT, **bounds)
    value, grad = grad_x0(layer, 0.7)
    assert value == pytest.approx(np.sin(0.7) / 2, abs=1e-9)
    assert grad == pytest.approx(np.cos(0.7) / 2, abs=1e-9)
    assert grad == pytest.approx(fd_x0(layer, 0.7), abs=1e-8)


def test_active_simple_bound_on_x_pins_the_variable():
    x, p = ca.SX.sym("x", 2), ca.SX.sym("p", 2)
    nlp = {"x": x, "p": p, "f": (x[0] - p[0]) ** 2 + (x[1] - p[1]) ** 2 + x[0] * x[1]}
    layer = bbd.layer(nlp, lbx=[-np.inf, 0.0], ubx=[np.inf, np.inf], solver_options=TIGHT)
    pt = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    (z,) = layer(pt)
    # x1 sits at its bound 0, so x0 = p0 and dx0/dp = (1, 0).
    assert z.detach().numpy() == pytest.approx([1.0, 0.0], abs=1e-9)
    z[0].backward()
    assert pt.grad.numpy() == pytest.approx([1.0, 0.0], abs=1e-9)


def test_opti_and_dict_forms_agree_on_values_and_gradients():
    opti, p, x = toy_opti("active")
    nlp, bounds = toy_dict("active")
    grads = []
    for layer in (bbd.layer(opti, parameters=[p], variables=[x]), bbd.layer(nlp, **bounds)):
        pt = torch.tensor([0.2, 1.1, 2.0], dtype=torch.float64, requires_grad=True)
        (z,) = layer(pt)
        (z**2).sum().backward()
        grads.append((z.detach().numpy(), pt.grad.numpy()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-7)
    assert grads[0][1] == pytest.approx(grads[1][1], abs=1e-7)


def test_sqpmethod_and_ipopt_give_the_same_gradients():
    out = []
    for solver in ("ipopt", "sqpmethod"):
        opti, p, x = toy_opti("active")
        layer = bbd.layer(opti, parameters=[p], variables=[x], solver=solver)
        pt = torch.tensor([0.4, 0.9], dtype=torch.float64, requires_grad=True)
        (z,) = layer(pt)
        z[:, 0].sum().backward()
        out.append(pt.grad.numpy())
    assert out[0] == pytest.approx(out[1], abs=1e-7)
    assert out[0] == pytest.approx(np.cos([0.4, 0.9]) / 2, abs=1e-7)


def test_batched_parameter_with_a_shared_one_sums_its_gradient():
    opti = ca.Opti()
    x = opti.variable(2)
    a, b = opti.parameter(2), opti.parameter()
    opti.minimize(ca.sumsqr(x - a) + b * x[0] * x[1])
    opti.subject_to(x[0] >= 0.5)
    layer = bbd.layer(opti, parameters=[a, b], variables=[x], solver_options=TIGHT)
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    B = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (X,) = layer(A, B)
    assert X.shape == (3, 2)
    X.sum().backward()
    gA, gB = A.grad.clone(), B.grad.clone()
    summed = 0.0
    for i in range(3):  # against one instance at a time, and finite differences of the solver
        Ai = A[i].detach().clone().requires_grad_(True)
        Bi = B.detach().clone().requires_grad_(True)
        (Xi,) = layer(Ai, Bi)
        Xi.sum().backward()
        assert gA[i].numpy() == pytest.approx(Ai.grad.numpy(), abs=1e-9)
        h = 1e-5
        fd = (layer.compiled.solve(Ai.detach().numpy(), np.array(0.5 + h)).x.sum()
              - layer.compiled.solve(Ai.detach().numpy(), np.array(0.5 - h)).x.sum()) / (2 * h)
        assert float(Bi.grad) == pytest.approx(fd, abs=1e-7)
        summed += float(Bi.grad)
    assert float(gB) == pytest.approx(summed, abs=1e-9)
    assert X[1].detach().numpy()[0] == pytest.approx(0.5, abs=1e-8)  # bound active for instance 1


def test_matrix_parameters_and_variables_keep_their_layout():
    opti = ca.Opti()
    X = opti.variable(2, 3)
    P = opti.parameter(2, 3)
    opti.minimize(ca.sumsqr(X - 2 * P))
    layer = bbd.layer(opti, parameters=[P], variables=[X])
    Pt = torch.arange(6, dtype=torch.float64).reshape(2, 3).requires_grad_(True)
    (Xt,) = layer(Pt)
    assert Xt.detach().numpy() == pytest.approx(2 * Pt.detach().numpy(), abs=1e-8)
    (Xt * torch.arange(6.0, dtype=torch.float64).reshape(2, 3)).sum().backward()
    assert Pt.grad.numpy() == pytest.approx(2 * np.arange(6.0).reshape(2, 3), abs=1e-8)


def test_unlisted_opti_parameters_are_frozen_at_their_value():
    opti = ca.Opti()
    x = opti.variable()
    p, q = opti.parameter(), opti.parameter()
    opti.set_value(q, 3.0)
    opti.minimize((x - p * q) ** 2)
    layer = bbd.layer(opti, parameters=[p], variables=[x])
    pt = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (z,) = layer(pt)
    z.backward()
    assert float(z.detach()) == pytest.approx(6.0, abs=1e-8)
    assert float(pt.grad) == pytest.approx(3.0, abs=1e-8)


def test_warm_start_reduces_ipopt_iterations():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import mpc_imitation

    w = torch.tensor(mpc_imitation.TRUE_WEIGHTS, dtype=torch.float64)
    length = torch.tensor(0.5, dtype=torch.float64)
    x0 = torch.tensor([0.1, 0.0, 0.2, 0.0], dtype=torch.float64)
    iterations = {}
    for warm in (False, True):
        layer = mpc_imitation.mpc_layer(15, 0.05, warm_start=warm)
        layer(x0, w, length)
        layer(x0 * 1.01, w, length)  # a nearby problem, as in closed-loop MPC
        iterations[warm] = layer.compiled.solve.last_stats["iter_count"]
    assert iterations[True] < iterations[False]
    assert iterations[True] <= 3


def test_mpc_gradients_match_finite_differences_with_active_control_bounds():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import mpc_imitation

    layer = mpc_imitation.mpc_layer(10, 0.05, solver_options=TIGHT)
    engine = mpc_imitation.mpc_layer(10, 0.05, solver_options=TIGHT, adjoint="engine")
    x0 = torch.tensor([0.3, 0.5, 0.6, 0.8], dtype=torch.float64, requires_grad=True)
    w = torch.tensor(mpc_imitation.TRUE_WEIGHTS, dtype=torch.float64, requires_grad=True)
    length = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    X, U = layer(x0, w, length)
    assert float(U.detach().abs().max()) == pytest.approx(mpc_imitation.U_MAX, abs=1e-8)  # some bound is active
    probe = torch.linspace(-1, 1, U.numel(), dtype=torch.float64).reshape(U.shape)
    (U * probe).sum().backward()
    grads = [x0.grad.clone(), w.grad.clone(), length.grad.clone()]
    X2, U2 = engine(x0, w, length)
    g2 = torch.autograd.grad((U2 * probe).sum(), [x0, w, length])
    for a, b in zip(grads, g2, strict=True):
        assert a.numpy() == pytest.approx(b.numpy(), abs=1e-8)
    solve = layer.compiled.solve
    base = [x0.detach().numpy(), w.detach().numpy(), length.detach().numpy()]
    n = 4 * 11
    h = 1e-6
    for k, g in enumerate(grads):
        flat = g.reshape(-1).numpy()
        for j in range(flat.size):
            plus = [b.copy() for b in base]
            minus = [b.copy() for b in base]
            plus[k].reshape(-1)[j] += h
            minus[k].reshape(-1)[j] -= h
            up = solve(*plus).x[n:] @ probe.numpy().reshape(-1)
            down = solve(*minus).x[n:] @ probe.numpy().reshape(-1)
            assert flat[j] == pytest.approx((up - down) / (2 * h), abs=1e-6, rel=1e-6)


def test_gradcheck_through_the_layer():
    opti, p, x = toy_opti("active")
    layer = bbd.layer(opti, parameters=[p], variables=[x], solver_options=TIGHT)
    pt = torch.tensor([0.3, 1.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: layer(q)[0], (pt,), eps=1e-6, atol=1e-6)


def test_infeasible_problem_raises_solver_error():
    opti = ca.Opti()
    x = opti.variable()
    p = opti.parameter()
    opti.minimize(x**2)
    opti.subject_to(x >= 1)
    opti.subject_to(x <= p)
    layer = bbd.layer(opti, parameters=[p], variables=[x])
    with pytest.raises(bbd.SolverError, match=re.escape("CasADi ipopt did not converge: return_status=")) as info:
        layer(torch.tensor(0.0, dtype=torch.float64))
    assert info.value.status == "Infeasible_Problem_Detected"
    assert info.value.backend == "casadi"


def test_iteration_limit_is_a_solver_error_not_a_silent_gradient():
    opti, p, x = toy_opti("active")
    layer = bbd.layer(opti, parameters=[p], variables=[x], solver_options={"ipopt.max_iter": 1})
    with pytest.raises(bbd.SolverError, match=re.escape("return_status='Maximum_Iterations_Exceeded'")):
        layer(torch.tensor(0.5, dtype=torch.float64, requires_grad=True))


def test_failing_instance_in_a_batch_is_nan_with_on_failure_nan():
    opti = ca.Opti()
    x = opti.variable()
    p = opti.parameter()
    opti.minimize((x - 2) ** 2)
    opti.subject_to(x >= 1)
    opti.subject_to(x <= p)
    layer = bbd.layer(opti, parameters=[p], variables=[x], on_failure="nan")
    pt = torch.tensor([3.0, 0.0, 1.5], dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("did not converge")):
        (z,) = layer(pt)
    assert torch.isnan(z[1])
    assert z[[0, 2]].detach().numpy() == pytest.approx([2.0, 1.5], abs=1e-7)
    z[[0, 2]].sum().backward()
    assert pt.grad.numpy() == pytest.approx([0.0, 0.0, 1.0], abs=1e-7)


def test_backend_is_registered_and_accepts_casadi_problems_only():
    backend = CasadiBackend()
    opti, p, x = toy_opti("none")
    nlp, _ = toy_dict("none")
    assert backend.accepts(opti) and backend.accepts(nlp)
    assert not backend.accepts({"x": 1, "f": 2}) and not backend.accepts(object())
    assert "casadi" in [b.name for b in bbd.backends()]


def test_unknown_nlpsol_plugin_is_an_input_error():
    opti, p, x = toy_opti("none")
    with pytest.raises(bbd.InputError, match=re.escape("CasADi has no nlpsol plugin 'nope' installed.")):
        bbd.layer(opti, parameters=[p], variables=[x], solver="nope")


def test_unknown_backend_option_is_rejected():
    opti, p, x = toy_opti("none")
    with pytest.raises(bbd.InputError, match=re.escape("Unknown option(s) ['warmstart']")):
        bbd.layer(opti, parameters=[p], variables=[x], warmstart=True)


def test_parameter_that_is_not_a_parameter_symbol_is_rejected():
    opti, p, x = toy_opti("none")
    with pytest.raises(bbd.InputError, match=re.escape("parameters[0] must be one of the problem's parameter")):
        bbd.layer(opti, parameters=[2 * p], variables=[x])


def test_variable_that_is_not_a_selection_of_x_is_rejected():
    opti, p, x = toy_opti("none")
    with pytest.raises(bbd.InputError, match=re.escape("variables[0] is not a decision variable")):
        bbd.layer(opti, parameters=[p], variables=[x[0] + x[1]])


def test_unset_unlisted_opti_parameter_is_rejected():
    opti = ca.Opti()
    x = opti.variable()
    p, q = opti.parameter(), opti.parameter()
    opti.minimize((x - p * q) ** 2)
    with pytest.raises(bbd.InputError, match=re.escape("are not in `parameters` and have no value")):
        bbd.layer(opti, parameters=[p], variables=[x])


def test_dict_bounds_on_an_opti_problem_are_rejected():
    opti, p, x = toy_opti("none")
    with pytest.raises(bbd.InputError, match=re.escape("Options lbx/ubx/lbg/ubg apply to an nlp dict only")):
        bbd.layer(opti, parameters=[p], variables=[x], lbx=0.0)


def test_dict_with_wrong_bound_size_is_rejected():
    nlp, _ = toy_dict("none")
    with pytest.raises(bbd.InputError, match=re.escape("Bound 'lbx' has 3 entries; expected 1 or 2")):
        bbd.layer(nlp, lbx=[0.0, 0.0, 0.0])


def test_dict_missing_keys_is_rejected():
    x = ca.SX.sym("x")
    with pytest.raises(bbd.InputError, match=re.escape("An NLP dict needs keys 'x' and 'f'")):
        CasadiBackend().compile({"x": x, "f": x**2, "h": x}, None, None, {})


def test_thread_executor_gives_the_serial_answer():
    opti, p, x = toy_opti("active")
    pt = torch.tensor([0.1, 0.5, 0.9, 1.3], dtype=torch.float64, requires_grad=True)
    serial = bbd.layer(opti, parameters=[p], variables=[x])
    threaded = bbd.layer(opti, parameters=[p], variables=[x], executor="threads", max_workers=2)
    (a,) = serial(pt)
    (b,) = threaded(pt)
    assert a.detach().numpy() == pytest.approx(b.detach().numpy(), abs=1e-9)
    b[:, 0].sum().backward()
    assert pt.grad.numpy() == pytest.approx(np.cos([0.1, 0.5, 0.9, 1.3]) / 2, abs=1e-7)


def test_weakly_active_bound_warns_and_keeps_it_active(check_path):
    # min (x - p)^2 s.t. x <= 0 at p = 0: slack and multiplier both vanish.
    x, p = ca.SX.sym("x"), ca.SX.sym("p")
    layer = bbd.layer({"x": x, "p": p, "f": (x - p) ** 2, "g": x}, ubg=0.0, solver_options=TIGHT)
    pt = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("are weakly active (slack and multiplier both <=")):
        (z,) = layer(pt)
    z.backward()
    assert float(pt.grad) == pytest.approx(0.0, abs=1e-9)  # the one-sided derivative that keeps x = 0


def test_process_executor_pickles_the_solver_and_gives_the_serial_answer():
    opti, p, x = toy_opti("active")
    layer = bbd.layer(opti, parameters=[p], variables=[x], executor="processes", max_workers=2)
    pt = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    (z,) = layer(pt)
    z[:, 0].sum().backward()
    assert z[:, 0].detach().numpy() == pytest.approx(np.sin([0.3, 0.7]) / 2, abs=1e-7)
    assert pt.grad.numpy() == pytest.approx(np.cos([0.3, 0.7]) / 2, abs=1e-7)


@pytest.mark.parametrize("adjoint", ["sparse_lu", "engine"])
def test_dependent_active_constraints_give_the_derivative_that_exists_without_warning(adjoint, check_path):
    # x <= p twice (once scaled by 2): both rows active, the KKT matrix singular, the multipliers not unique;
    # either row alone states the same point with dx/dp = 1, so the derivative exists and is exact.
    opti = ca.Opti()
    x = opti.variable()
    p = opti.parameter()
    opti.minimize((x - 2) ** 2)
    opti.subject_to(x <= p)
    opti.subject_to(2 * x <= 2 * p)
    layer = bbd.layer(opti, parameters=[p], variables=[x], adjoint=adjoint)
    pt = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (z,) = layer(pt)
        z.backward()
    assert float(z.detach()) == pytest.approx(1.0, abs=1e-12)
    assert float(pt.grad) == pytest.approx(1.0, abs=1e-12)
