"""bbd.layer: backend choice, option routing, the cvxpylayers batching convention, and every error path."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff.plugin import find_backend


def linear_root(x, A, b):
    return A @ x - b


class LinearSystem:
    """A toy problem type: solve A x = b."""


class LinearBackend(bbd.AbstractBackend):
    """Solves LinearSystem with numpy; splits x into two outputs to exercise `Compiled.outputs`."""

    name: ClassVar[str] = "linear-test"
    problem_types: ClassVar[str] = "LinearSystem (tests)"
    defaults: ClassVar[dict[str, Any]] = {"linear_solver": "dense"}

    class Options(bbd.AbstractBackend.Options):
        split: bool = False

    def accepts(self, problem):
        return isinstance(problem, LinearSystem)

    def compile(self, problem, parameters, variables, options):
        opts = self.Options(**options)
        outputs = (lambda z: (z[..., :1], z[..., 1:])) if opts.split else None
        return bbd.Compiled(
            solve=lambda A, b: np.linalg.solve(A, b),
            condition=bbd.Root(linear_root),
            parameter_shapes=[(2, 2), (2,)],
            variable_shapes=[(1,), (1,)] if opts.split else [(2,)],
            outputs=outputs,
            options=dict(self.defaults),
            backend=self.name,
        )


A0 = torch.tensor([[3.0, 1.0], [0.5, 2.0]])


def test_layer_is_a_module_returning_a_tuple():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    assert isinstance(layer, torch.nn.Module)
    assert "backend='linear-test'" in repr(layer)
    (x,) = layer(A0, torch.tensor([1.0, 2.0]))
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(A0.numpy(), [1.0, 2.0]), rtol=1e-14)


def test_batched_and_shared_parameters_follow_cvxpylayers():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    A = A0.clone().requires_grad_(True)
    B = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]], requires_grad=True)
    (X,) = layer(A, B)  # A shared, b batched
    assert X.shape == (3, 2)
    (X**2).sum().backward()
    grad_A, grad_B = A.grad.clone(), B.grad.clone()
    expected_A = torch.zeros(2, 2)
    for i in range(3):
        a = A0.clone().requires_grad_(True)
        b = B[i].detach().clone().requires_grad_(True)
        (x,) = layer(a, b)
        (x**2).sum().backward()
        expected_A += a.grad
        np.testing.assert_allclose(grad_B[i].numpy(), b.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad_A.numpy(), expected_A.numpy(), rtol=1e-12)  # summed over the batch


def test_outputs_map_batched_and_unbatched_results():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend(), split=True)
    first, second = layer(A0, torch.tensor([1.0, 2.0]))
    assert first.shape == (1,) and second.shape == (1,)
    first, second = layer(A0.expand(4, 2, 2), torch.ones(4, 2))
    assert first.shape == (4, 1) and second.shape == (4, 1)


def test_backend_defaults_lose_to_user_options():
    assert bbd.layer(LinearSystem(), backend=LinearBackend()).options.linear_solver == "dense"
    layer = bbd.layer(LinearSystem(), backend=LinearBackend(), linear_solver="gmres", rtol=1e-12)
    assert layer.options.linear_solver == "gmres" and layer.options.rtol == 1e-12


def test_registry_picks_the_accepting_backend():
    class Plugin:
        @bbd.hookimpl
        def register_backends(self, register):
            register(LinearBackend())

    plugin = Plugin()
    bbd.plugin_manager().register(plugin)
    try:
        layer = bbd.layer(LinearSystem())
        assert layer.compiled.backend == "linear-test"
        assert bbd.layer(LinearSystem(), backend="linear-test").compiled.backend == "linear-test"
    finally:
        bbd.plugin_manager().unregister(plugin)


def test_unknown_shape_means_unbatched_unless_in_dims():
    cond = bbd.Root(lambda x, w: x**2 - w)
    layer = bbd.layer(cond, backend="scipy", x0=np.ones(2))
    assert layer.compiled.parameter_shapes is None
    w = torch.tensor([4.0, 9.0])
    np.testing.assert_allclose(layer(w).numpy(), [2.0, 3.0], rtol=1e-13)  # one instance, a vector unknown
    batched = bbd.layer(cond, backend="scipy", x0=np.array(1.0), in_dims=0)
    np.testing.assert_allclose(batched(w).numpy(), [2.0, 3.0], rtol=1e-13)


# --- errors -----------------------------------------------------------------------------------------
def test_wrong_shape_names_the_parameter():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    with pytest.raises(bbd.InputError, match=re.escape(
        "Parameter 1 has shape (3,); declared shape (2,), so expected (2,) (shared by the batch) or (batch, 2,) "
        "(batched)."
    )):
        layer(A0, torch.ones(3))


def test_wrong_count_and_batch_mismatch():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    with pytest.raises(bbd.InputError, match=re.escape(
        "The layer takes 2 parameter(s) (parameter 0, parameter 1) but was called with 1."
    )):
        layer(A0)
    with pytest.raises(bbd.InputError, match=re.escape(
        "Batched parameters disagree on the batch size: {'parameter 0': 2, 'parameter 1': 3}."
    )):
        layer(A0.expand(2, 2, 2), torch.ones(3, 2))


def test_parameter_names_come_from_handles():
    class Named:
        def __init__(self, name):
            self._name = name

        def name(self):
            return self._name

    layer = bbd.layer(LinearSystem(), backend=LinearBackend(), parameters=[Named("A"), Named("b")])
    with pytest.raises(bbd.InputError, match=re.escape("Parameter 1 ('b') has shape (5,); declared shape (2,)")):
        layer(A0, torch.ones(5))
    with pytest.raises(bbd.InputError, match=re.escape("Parameter 0 ('A') has shape (3, 3); declared shape (2, 2)")):
        layer(torch.eye(3), torch.ones(2))


def test_unknown_option_lists_both_option_sets():
    with pytest.raises(bbd.InputError, match=re.escape(
        "Unknown option(s) ['colour'] for bbd.layer with backend 'linear-test'. Engine options (bbd.implicit): "
        "['active_tol', 'arrays', "
    )) as info:
        bbd.layer(LinearSystem(), backend=LinearBackend(), colour="red")
    assert "Options of backend 'linear-test': ['split']." in str(info.value)


def test_bad_engine_option_value():
    with pytest.raises(bbd.InputError, match=re.escape("option 'linear_solver'")):
        bbd.layer(LinearSystem(), backend=LinearBackend(), linear_solver="magic")


def test_no_backend_accepts_the_problem():
    with pytest.raises(bbd.PluginError, match=re.escape(
        "No registered backend accepts a builtins.dict. Registered: "
    )) as info:
        bbd.layer({"not": "a problem"})
    assert "'scipy' accepts bbd.Argmin" in str(info.value)


def test_unknown_backend_name():
    with pytest.raises(bbd.PluginError, match=re.escape("No backend named 'nope'. Registered backends: [")):
        bbd.layer(LinearSystem(), backend="nope")


def test_backend_argument_type():
    with pytest.raises(bbd.InputError, match=re.escape(
        "backend must be a registered backend's name or an AbstractBackend instance; got int."
    )):
        bbd.layer(LinearSystem(), backend=3)


class MissingBackend(LinearBackend):
    name: ClassVar[str] = "missing-test"
    requires: ClassVar[tuple[str, ...]] = ("blackbox_diff_no_such_module",)
    extra: ClassVar[str | None] = "missing"


def test_unavailable_backend_raises_with_pip_hint():
    with pytest.raises(bbd.BackendUnavailableError, match=re.escape(
        "Backend 'missing-test' needs blackbox_diff_no_such_module, which is not installed. Install it with: "
        'pip install "blackbox-diff[missing]"'
    )) as info:
        bbd.layer(LinearSystem(), backend=MissingBackend())
    assert isinstance(info.value, ImportError)


def test_only_an_unavailable_backend_accepts():
    class Plugin:
        @bbd.hookimpl
        def register_backends(self, register):
            register(MissingBackend())

    plugin = Plugin()
    bbd.plugin_manager().register(plugin)
    try:
        with pytest.raises(bbd.BackendUnavailableError, match=re.escape('pip install "blackbox-diff[missing]"')):
            bbd.layer(LinearSystem())
    finally:
        bbd.plugin_manager().unregister(plugin)


def test_compile_must_return_compiled():
    class Broken(LinearBackend):
        name: ClassVar[str] = "broken-test"

        def compile(self, problem, parameters, variables, options):
            return {"solve": None}

    with pytest.raises(bbd.PluginError, match=re.escape(
        "Backend 'broken-test'.compile returned a dict; expected bbd.Compiled."
    )):
        bbd.layer(LinearSystem(), backend=Broken())


def test_cvxpy_problems_go_to_the_cvxpy_backend():
    import cvxpy as cp

    x = cp.Variable(2)
    b = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - b)))
    assert find_backend(problem).name == "cvxpy"


def test_solver_errors_name_the_backend_and_batch_index():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    A = torch.stack([A0, torch.zeros(2, 2)])  # the second instance is singular
    with pytest.raises(bbd.SolverError, match=re.escape("[linear-test] The black box '<lambda>' raised LinAlgError")) \
            as info:
        layer(A, torch.ones(2))
    assert info.value.batch_index == 1 and info.value.backend == "linear-test"
    assert "batch index 1" in str(info.value)


# --- call-time arguments: None / non-numeric parameters, keyword options through Compiled.on_call ---------------
def test_none_parameter_names_the_parameter():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    with pytest.raises(bbd.InputError, match=re.escape(
        "Parameter 1 is None; expected a torch.Tensor of shape (2,) (or with a leading batch dimension). Pass a "
        "value for every parameter, in the order given to bbd.layer(parameters=...)."
    )):
        layer(A0, None)


def test_non_numeric_parameter_names_the_parameter():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    with pytest.raises(bbd.InputError, match=re.escape(
        "Parameter 0 is a str that is not numeric"
    )) as info:
        layer("A", torch.ones(2))
    assert "expected a torch.Tensor of shape (2, 2) (or with a leading batch dimension)" in str(info.value)
    # Numbers and arrays are still converted (to float64).
    (x,) = layer(A0.double().numpy(), [1.0, 2.0])
    assert x.dtype == torch.float64


def test_keyword_arguments_need_the_backends_on_call_hook():
    layer = bbd.layer(LinearSystem(), backend=LinearBackend())
    with pytest.raises(bbd.InputError, match=re.escape(
        "The layer of backend 'linear-test' takes no keyword arguments at call time; got ['solver_args']. Set "
        "options in bbd.layer(...) instead."
    )):
        layer(A0, torch.ones(2), solver_args={"eps": 1e-8})


class ScaledBackend(LinearBackend):
    """Solves A x = scale * b, where `scale` is a per-call keyword taken through `Compiled.on_call`."""

    name: ClassVar[str] = "scaled-test"

    def compile(self, problem, parameters, variables, options):
        seen: list = []

        def build(scale: float) -> bbd.Compiled:
            return bbd.Compiled(
                solve=lambda A, b: np.linalg.solve(A, scale * b),
                condition=bbd.Root(lambda x, A, b: A @ x - scale * b),
                parameter_shapes=[(2, 2), (2,)],
                variable_shapes=[(2,)],
                backend=self.name,
                on_call=on_call,
            )

        def on_call(params, call_options):
            seen.append((tuple(p.shape for p in params), dict(call_options)))
            if float(params[1].detach().abs().max()) > 100:
                raise bbd.InputError("b is too large for this test backend")
            if set(call_options) - {"scale"}:
                return "not a Compiled"
            return build(call_options["scale"]) if "scale" in call_options else None

        compiled = build(1.0)
        compiled.seen = seen
        return compiled


def test_on_call_picks_the_compiled_of_the_call_and_keeps_gradients_right():
    layer = bbd.layer(LinearSystem(), backend=ScaledBackend())
    b = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    A = A0.double()
    (x1,) = layer(A, b)
    (x3,) = layer(A, b, scale=3.0)
    torch.testing.assert_close(x3, 3.0 * x1)
    (g,) = torch.autograd.grad(x3.sum(), b)
    torch.testing.assert_close(g, 3.0 * torch.linalg.solve(A.T, torch.ones(2, dtype=torch.float64)))
    assert layer.compiled.seen[0] == (((2, 2), (2,)), {})
    assert layer.compiled.seen[1] == (((2, 2), (2,)), {"scale": 3.0})
    (x1_again,) = layer(A, b)  # without the keyword: the layer's own Compiled again
    torch.testing.assert_close(x1_again, x1)


def test_on_call_errors_reach_the_caller():
    layer = bbd.layer(LinearSystem(), backend=ScaledBackend())
    with pytest.raises(bbd.InputError, match=re.escape("b is too large for this test backend")):
        layer(A0, torch.tensor([1e3, 0.0]))
    with pytest.raises(bbd.PluginError, match=re.escape(
        "Backend 'scaled-test': Compiled.on_call returned a str; expected a bbd.Compiled or None."
    )):
        layer(A0, torch.ones(2), colour="red")
