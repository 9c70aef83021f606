"""The examples not run by another test, in their --fast setting, asserting what they print and save.

(mpc_imitation, neural_ode, deq_tanh, cvxpylayers_switch, legacy_executable and plugin_package are run by
the tests of their backends: test_mpc_example, test_ode, test_deq, test_cvxpy_backend, test_executable,
test_plugins.)
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_every_example_has_a_title_a_fast_mode_and_an_index_entry():
    index = (EXAMPLES / "README.md").read_text()
    scripts = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 7
    for path in scripts:
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc and doc.splitlines()[0].strip(), f"{path.name} has no docstring title"
        packaged = re.search(r"^from (blackbox_diff\.demos\.\w+) import", source, re.MULTILINE)
        if packaged:  # a demo that ships in the package, run from the checkout: its code is there
            source = (EXAMPLES.parent / Path(*packaged.group(1).split("."))).with_suffix(".py").read_text()
        assert '"--fast"' in source, f"{path.name} has no --fast mode"
        assert path.name in index, f"examples/README.md does not index {path.name}"
    assert "plugin_package" in index


def test_brachistochrone_fits_the_closed_form_radius_with_exact_implicit_gradients(tmp_path, capsys):
    import brachistochrone

    out = tmp_path / "cycloid.png"
    result = brachistochrone.main(["--fast", "--out", str(out)])
    assert out.stat().st_size > 10_000
    for name in ("ode", "cycloid"):
        r = result[name]
        assert abs(r["R"] - result["R_true"]) < 1e-7, (name, r["R"], result["R_true"])
        # the IFT gradient against central differences of the black box itself, float64
        assert abs(r["grad_at_0.6"] - r["fd_at_0.6"]) <= 1e-6 * abs(r["fd_at_0.6"]), (name, r)
    # the two black boxes (an ODE integration, a rolling-angle root) give one gradient
    assert abs(result["ode"]["grad_at_0.6"] - result["cycloid"]["grad_at_0.6"]) < 1e-9
    text = capsys.readouterr().out
    assert "closed-form R = 0.4137262947" in text and f"plot: {out}" in text


def test_brachistochrone_unreachable_target_is_a_solver_error():
    import torch
    from brachistochrone import BLACK_BOXES

    import blackbox_diff as bbd

    R, px = torch.tensor(0.2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(bbd.SolverError, match="need R > P_x / pi"):
        BLACK_BOXES["ode"](R, px)


def test_seed_examples_table_matches_the_closed_forms(capsys):
    import seed_examples

    rows = seed_examples.main(["--fast"])
    assert len(rows) >= 6
    for title, got, expected in rows:
        # 25 plain gradient steps leave x off the minimiser by ~1e-6: the lecture's 0.3927 to 4 digits
        tol = 1e-5 if "GD steps" in title else 1e-7
        assert got == pytest.approx(expected, abs=tol), title
    text = capsys.readouterr().out
    assert "0.39269" in text  # the lecture's unconstrained sin(x w) example


def test_optnet_qp_learns_the_hidden_qp_with_exact_gradients(capsys):
    import optnet_qp

    result = optnet_qp.main(["--fast"])
    assert result["final"] < 0.1 * result["initial"], result  # the student QP layer fits the teacher's answers
    assert result["test"] < 0.1 * result["initial"], result  # and generalises to held-out inputs
    # the implicit gradient against central differences of the layer's forward pass (the black box), float64
    assert result["grad_error"] < 1e-6, result
    text = capsys.readouterr().out
    assert "train loss" in text and "gradient vs central differences of the black box" in text


def test_hyper_newton_second_order_hyperparameters_match_closed_form_and_differences(capsys):
    """Hypergradients and hyper-Hessians through Argmin black boxes (scipy lstsq, L-BFGS-B): right against the
    closed form (ridge) and central differences of the black box; Newton's iterations converge quadratically,
    which a Hessian that drops the dependence of w* (or of the adjoint) on eta cannot do."""
    import hyper_newton

    results = hyper_newton.main(["--fast"])
    assert set(results) == {"ridge regression", "logistic regression"}
    ridge = results["ridge regression"]
    assert ridge["grad_vs_closed_form"] < 1e-9 and ridge["hessian_vs_closed_form"] < 1e-9
    for name, r in results.items():
        assert r["grad_vs_fd"] < 1e-7, name  # central differences of the raw solver, eps 1e-5
        assert r["hessian_vs_fd"] < 1e-6, name  # central differences of the IFT hypergradient
        assert r["forward_over_reverse_vs_reverse"] < 1e-9 and r["asymmetry"] < 1e-9, name
        # one Newton step lowers the re-solved validation loss more than the best gradient step
        assert r["newton_actual"] < r["gradient_best"] < 0, name
        # the quadratic model's predicted change matches the re-solved change near the optimum
        for pred, actual in r["model"][2:]:
            if abs(pred) > 1e-11:
                assert abs(actual - pred) < 0.03 * abs(pred), (name, pred, actual)
        # quadratic convergence: |g_{k+1}| <= C |g_k|^2 once |g_k| is small, so the contraction |g_{k+1}| / |g_k|
        # keeps shrinking; a wrong Hessian converges linearly (a contraction that stays put)
        norms = [gn for _, gn in r["newton"]]
        pairs = list(zip(norms[:-1], norms[1:], strict=True))
        assert norms[-1] < 1e-9 and min(b / a for a, b in pairs) < 1e-3, (name, norms)
        for a, b in pairs:
            if 1e-7 < a < 0.1:
                assert b < 1000 * a**2, (name, norms)
        (v_newton, g_newton), (v_gd, g_gd) = r["newton"][-1], r["gradient"][-1]
        assert v_newton <= v_gd + 1e-12 and g_newton < 1e-2 * g_gd, name
    assert 0.87 < ridge["newton"][-1][0] < 0.8709 and (ridge["eta_newton"] - ridge["eta_gradient"]).abs().max() < 0.5
    text = capsys.readouterr().out
    assert "hyper-Hessian" in text and "Hessian vs central differences of the hypergradient" in text
