"""blackbox_diff.testing, the plugin author's conformance kit: every built-in backend and the example plugin
pass it, and deliberately broken backends are caught with a message that says what is wrong."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff.testing import CHECKS, ConformanceError, ConformanceReport, Sample, check_backend

ROOT = Path(__file__).resolve().parent.parent
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def assert_all_pass(report: ConformanceReport) -> None:
    """Every check ran and passed on every sample; only the device check may skip (no GPU here)."""
    expected_skips = set() if torch.cuda.is_available() else {"device"}
    assert report.ok, str(report)
    assert {r.check for r in report.skipped} <= expected_skips, str(report)
    assert {r.check for r in report.results} == set(CHECKS)


# --- the built-in backends -------------------------------------------------------------------------------
# A box-and-budget QP: min ||x - w||^2 s.t. x >= 0, sum(x) <= u. Instance 0 has no active constraint,
# instance 1 the budget, instance 2 the bound x_0 >= 0; u = -1 is infeasible.
BOX_INSTANCES = [([0.5, 0.2], 1.0), ([1.0, 0.6], 1.0), ([-0.5, 0.4], 1.0)]
BOX_FAILING = ([0.5, 0.2], -1.0)


def scipy_samples() -> list[Sample]:
    def f(x, w):
        return 0.5 * ((x - w) ** 2).sum()

    def g(x, w):  # w[1] <= x[0] <= 1: infeasible when w[1] > 1
        return torch.stack([w[1] - x[0], x[0] - 1.0])

    kkt = Sample(bbd.KKT(f, ineq=g), instances=[([0.5, 0.0],), ([0.3, 0.6],), ([1.5, -1.0],)], parameters=[(2,)],
                 options={"x0": np.zeros(2)}, failing=([0.0, 2.0],), name="kkt-slsqp")
    # x^2 = a w: x = sqrt(a w) from x0 = 1; no real root (hybr fails) where a w < 0.
    root = Sample(bbd.Root(lambda x, w, a: x**2 - a * w), instances=[([1.0, 4.0], 1.0), ([2.0, 9.0], 2.0),
                                                                      ([0.5, 3.0], 0.5)],
                  parameters=[(2,), ()], options={"x0": np.ones(2)}, failing=([-1.0, 4.0], 1.0), name="root-hybr")
    return [kkt, root]


def cvxpy_samples() -> list[Sample]:
    import cvxpy as cp
    x, w, u = cp.Variable(2), cp.Parameter(2), cp.Parameter()
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - w)), [x >= 0, cp.sum(x) <= u])
    return [Sample(problem, instances=BOX_INSTANCES, parameters=[w, u], variables=[x], failing=BOX_FAILING,
                   name="box-budget")]


def casadi_samples() -> list[Sample]:
    import casadi as ca
    opti = ca.Opti()
    x, w, u = opti.variable(2), opti.parameter(2), opti.parameter()
    opti.minimize(ca.sumsqr(x - w))
    opti.subject_to(x >= 0)
    opti.subject_to(ca.sum1(x) <= u)
    return [Sample(opti, instances=BOX_INSTANCES, parameters=[w, u], variables=[x], failing=BOX_FAILING,
                   name="opti-ipopt")]


def qp_samples() -> list[Sample]:
    from blackbox_diff.qp import QuadraticProgram

    # min 1/2 z'Qz + p'z s.t. z >= 0, z_0 + z_1 = b. Instance 1 has z_0 = 0 active; h = -1 is infeasible.
    Q = np.array([[2.0, 0.5], [0.5, 1.0]])
    G, h, A, b = -np.eye(2), np.zeros(2), np.ones((1, 2)), np.ones(1)
    instances = [(Q, [-1.0, -1.0], G, h, A, b), (Q, [1.0, -1.0], G, h, A, [0.8]), (1.5 * Q, [-2.0, 0.5], G, h, A, b)]
    return [Sample(QuadraticProgram(2, 2, 1), instances=instances, failing=(Q, [-1.0, -1.0], G, [-1.0, -1.0], A, b),
                   name="daqp")]


CUBIC_C = r"""
/* x_i^3 + a x_i = w_i (i = 0, 1) by Newton. INPUT: w0 w1 on line 1, a on line 2. Exit 2 if a <= 0. */
#include <math.h>
#include <stdio.h>
int main(int argc, char **argv) {
    double w[2], a, x[2];
    FILE *in = fopen(argv[1], "r");
    if (argc != 3 || !in || fscanf(in, "%lf %lf %lf", &w[0], &w[1], &a) != 3) return 65;
    fclose(in);
    if (!(a > 0)) { fprintf(stderr, "cubic: a must be positive, got %g\n", a); return 2; }
    for (int i = 0; i < 2; i++) {
        double z = 0;
        for (int k = 0; k < 100; k++) {
            double step = (z * z * z + a * z - w[i]) / (3 * z * z + a);
            z -= step;
            if (fabs(step) < 1e-15 * (1 + fabs(z))) break;
        }
        x[i] = z;
    }
    FILE *out = fopen(argv[2], "w");
    fprintf(out, "%.17g %.17g\n", x[0], x[1]);
    return fclose(out) != 0;
}
"""


def subprocess_samples(tmp_path: Path) -> list[Sample]:
    if CC is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH to build the test program")
    (tmp_path / "cubic.c").write_text(CUBIC_C)
    program = tmp_path / "cubic"
    subprocess.run([CC, "-O2", "-o", str(program), str(tmp_path / "cubic.c"), "-lm"], check=True)
    exe = bbd.Executable([str(program), "{input}", "{output}"], io="text", timeout=60)
    return [Sample(exe, instances=[([1.0, 2.0], 1.0), ([-3.0, 0.5], 2.0), ([10.0, 0.1], 0.5)],
                   parameters=[(2,), ()], variables=[(2,)],
                   options={"condition": bbd.Root(lambda x, w, a: x**3 + a * x - w)},
                   failing=([1.0, 2.0], -1.0), name="cubic-c")]


SAMPLES = {"scipy": scipy_samples, "cvxpy": cvxpy_samples, "casadi": casadi_samples, "qp": qp_samples,
           "subprocess": subprocess_samples}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_builtin_backend_passes_the_kit(name, tmp_path):
    samples = SAMPLES[name](tmp_path) if name == "subprocess" else SAMPLES[name]()
    report = check_backend(name, samples)
    assert_all_pass(report)
    assert report.backend == name and len(report.results) == len(CHECKS) * len(samples)


def example_tests(monkeypatch) -> Any:
    """examples/plugin_package/tests/test_bbd_brentq.py, the plugin's own tests, as its author runs them."""
    import importlib.util

    package = ROOT / "examples" / "plugin_package"
    monkeypatch.syspath_prepend(str(package))
    spec = importlib.util.spec_from_file_location("bbd_brentq_own_tests", package / "tests" / "test_bbd_brentq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_plugin_package_passes_the_kit(monkeypatch):
    tests = example_tests(monkeypatch)
    tests.test_the_backend_passes_the_conformance_kit()
    assert_all_pass(check_backend(tests.BrentqBackend(), tests.SAMPLE))


def test_the_example_plugin_packages_entry_point_test(monkeypatch):
    example_tests(monkeypatch).test_the_entry_point_registers_the_backend()
    assert "brentq" not in [b.name for b in bbd.backends()]  # registered for the block only


# --- a backend that keeps the contract, and broken variants of it ----------------------------------------------
class Cubic:
    """Solve x^3 + x = w elementwise (a strictly increasing map: one real root per entry)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size


def newton(w: np.ndarray) -> np.ndarray:
    if np.any(np.abs(w) > 100):
        raise bbd.SolverError(f"newton: |w| <= 100 expected, got {w}", backend="cubic")
    x = np.zeros_like(w)
    for _ in range(60):
        x = x - (x**3 + x - w) / (3 * x**2 + 1)
    return x


class CubicBackend(bbd.AbstractBackend):
    name: ClassVar[str] = "cubic"
    problem_types: ClassVar[str] = "Cubic (x^3 + x = w)"

    class Options(bbd.plugin.BackendOptions):
        iterations: int = 60

    def accepts(self, problem: Any) -> bool:
        return isinstance(problem, Cubic)

    def solve(self) -> Any:
        return newton

    def condition(self) -> bbd.AbstractCondition:
        return bbd.Root(lambda x, w: x**3 + x - w)

    def compile(self, problem, parameters, variables, options) -> bbd.Compiled:
        self.validate_options(options)
        return bbd.Compiled(solve=self.solve(), condition=self.condition(),
                            parameter_shapes=bbd.plugin.parse_shapes(parameters), backend=self.name)


def cubic_sample(**kw: Any) -> Sample:
    return Sample(Cubic(), instances=[([1.0, -2.0],), ([0.5, 3.0],), ([-1.5, 10.0],)], parameters=[(2,)],
                  failing=([1.0, 500.0],), name="cubic", **kw)


def test_a_backend_that_keeps_the_contract_passes():
    assert_all_pass(check_backend(CubicBackend(), cubic_sample()))


class DetachedParameter(CubicBackend):
    """A wrong condition that still holds at every answer: it reads w as a constant (detached), so the
    implicit gradient is zero while the solution moves with w."""

    def condition(self):
        return bbd.Root(lambda x, w: x**3 + x - w.detach())


def test_a_condition_that_ignores_a_parameter_is_caught_by_the_gradient_checks():
    with pytest.raises(ConformanceError, match=re.escape(
        "- gradients [cubic]: the implicit gradient disagrees with finite differences of the black box for "
        "parameter(s) [0] at instance 0: the optimality condition does not describe what the solver computes (a "
        "wrong condition, or one that ignores or detaches a parameter)"
    )) as info:
        check_backend(DetachedParameter(), cubic_sample())
    report = info.value.report
    assert report.status("gradients") == "FAIL" and report.status("jvp") == "FAIL"
    assert "the forward-mode derivative disagrees with finite differences of the black box" in str(info.value)
    assert report.status("forward") == "PASS"  # the answers themselves are right


class WrongEquation(CubicBackend):
    """A condition for another equation (2x instead of x): the solver's answer does not satisfy it."""

    def condition(self):
        return bbd.Root(lambda x, w: x**3 + 2 * x - w)


def test_a_condition_for_another_equation_is_caught_at_the_first_solve():
    report = check_backend(WrongEquation(), cubic_sample(), raise_on_failure=False)
    (failure,) = [r for r in report.failures]
    assert failure.check == "forward"
    assert failure.message.startswith("instance 0 raised CertificationError:")
    assert {r.check for r in report.skipped} >= {"state", "batch", "gradients", "jvp", "failure", "dtype", "threads"}


class Memoised:
    """Mutable state shared between calls: the first answer is cached and returned for every later call."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.cache.setdefault(w.shape, newton(w)).copy()


class MemoisingBackend(CubicBackend):
    def solve(self):
        return Memoised()


@pytest.mark.parametrize("certify", [True, False], ids=["certified", "uncertified"])
def test_mutable_state_between_calls_is_caught(certify):
    """Certified, the stale answer fails certification after another instance; uncertified (residual_tol=None),
    it comes back silently: the state check catches both and says why."""
    options = {} if certify else {"residual_tol": None}
    with pytest.raises(ConformanceError) as info:
        check_backend(MemoisingBackend(), cubic_sample(options=options))
    state = next(r for r in info.value.report.failures if r.check == "state")
    first = "raised CertificationError" if certify else "against a fresh layer: output 0 differs by"
    assert f"instance 1, solved by a layer after solving instance(s) [0], {first}" in state.message
    assert state.message.endswith(
        "The answer depends on earlier calls: the backend keeps mutable state between calls (a cache, a warm start "
        "or a buffer its black box or condition shares). Make each call depend on its parameters only (warm starts "
        "off by default, and never changing the answer beyond the solver's tolerance)."
    )
    assert info.value.report.status("forward") == "PASS"  # each fresh layer is right: only reuse shows it


class SharedBuffer:
    """Not thread-safe: the parameters go through one buffer, and the solve reads it back later."""

    def __init__(self) -> None:
        self.buffer = np.zeros(2)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        self.buffer[:] = w
        time.sleep(0.05)  # the solver "works"; another thread's call overwrites the buffer meanwhile
        return newton(self.buffer.copy())


class SharedBufferBackend(CubicBackend):
    def solve(self):
        return SharedBuffer()


def test_state_shared_between_threads_is_caught():
    report = check_backend(SharedBufferBackend(), cubic_sample(), checks=["threads"], raise_on_failure=False)
    assert report.status("forward") == "PASS" and report.status("threads") == "FAIL", str(report)
    assert report.failures[0].message.endswith(
        "Calls from several threads interfere: the black box or the condition shares mutable state between calls (a "
        "buffer, a solver object that is not thread-safe). Give each call its own state, or guard it with a lock."
    )


class UnvalidatedOptions(CubicBackend):
    def compile(self, problem, parameters, variables, options):
        return bbd.Compiled(solve=newton, condition=self.condition(), parameter_shapes=[(2,)], backend=self.name)


def test_a_compile_that_does_not_validate_a_dict_of_options_is_caught():
    report = check_backend(UnvalidatedOptions(), cubic_sample(), checks=["options"], raise_on_failure=False)
    assert report.failures[0].message == (
        "compile, called directly with a dict holding the unknown option 'bbd_testing_unknown_option', did not refuse "
        "it: begin compile with opts = self.validate_options(options), which validates a dict (and passes the model "
        "bbd.layer gives through)."
    )


class LaxOptions(CubicBackend):
    class Options(bbd.plugin.BackendOptions):
        model_config = {"extra": "allow"}


def test_options_that_allow_unknown_keys_are_caught():
    report = check_backend(LaxOptions(), cubic_sample(), checks=["options"], raise_on_failure=False)
    assert report.failures[0].message.startswith("the backend's Options model accepts unknown keys: derive it from "
                                                 "bbd.plugin.BackendOptions")


class Float64Outputs(CubicBackend):
    def compile(self, problem, parameters, variables, options):
        compiled = super().compile(problem, parameters, variables, options)
        compiled.outputs = lambda z: (z.double(),)
        compiled.variable_shapes = [(2,)]
        return compiled


def test_outputs_that_ignore_the_parameters_dtype_are_caught():
    report = check_backend(Float64Outputs(), cubic_sample(), checks=["dtype"], raise_on_failure=False)
    assert report.failures[0].message.startswith("float32 parameters gave a torch.float64 output 0; expected "
                                                 "float32, the parameters' dtype")


class ReversedBatch(CubicBackend):
    """Compiled.outputs that mixes up the batch's rows (a single call, a batch of one, looks right)."""

    def compile(self, problem, parameters, variables, options):
        compiled = super().compile(problem, parameters, variables, options)
        compiled.outputs = lambda z: (z.flip(0),)
        compiled.variable_shapes = [(2,)]
        return compiled


def test_outputs_that_mix_up_the_batch_are_caught():
    report = check_backend(ReversedBatch(), cubic_sample(), checks=["batch"], raise_on_failure=False)
    assert report.status("forward") == "PASS"
    assert report.failures[0].message.startswith(
        "row 0 of a batch of 3, against instance 0 solved alone: output 0 differs by"
    )


def test_a_failing_instance_that_does_not_fail_is_reported():
    sample = cubic_sample()
    sample.failing = ([1.0, 2.0],)
    report = check_backend(CubicBackend(), sample, checks=["failure"], raise_on_failure=False)
    assert report.failures[0].message.startswith("the failing instance did not fail: Sample.failing must be "
                                                  "parameter values the solver cannot solve")


def test_without_a_failing_instance_the_failure_check_is_skipped_and_says_so():
    sample = cubic_sample()
    sample.failing = None
    report = check_backend(CubicBackend(), sample, checks=["failure"])
    assert report.status("failure") == "SKIP"
    assert "Sample(failing=...)" in report.skipped[0].message


# --- the kit's own input errors and report ---------------------------------------------------------------------
def test_the_report_is_a_table_of_every_check():
    text = str(check_backend(CubicBackend(), cubic_sample(), checks=["gradients"]))
    assert text.splitlines()[0] == "conformance of backend 'cubic': 3 passed, 0 failed, 0 skipped"
    assert "PASS  gradients  [cubic]: max relative error" in text


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_backend(CubicBackend(), cubic_sample(), checks=["gradient"]),
         f"Unknown check(s) ['gradient']; the checks are {list(CHECKS)}."),
        (lambda: check_backend(CubicBackend(), []), "check_backend needs one or more blackbox_diff.testing.Sample"),
        (lambda: check_backend(object(), cubic_sample()),
         "check_backend needs an AbstractBackend instance or a registered backend's name; got object."),
        (lambda: check_backend(CubicBackend(), Sample(Cubic(), instances=[([1.0, 2.0],)])),
         "Sample 'Cubic' has 1 instance(s); expected two or more (different parameter values), so that batches and "
         "repeated calls can be compared."),
        (lambda: check_backend(CubicBackend(), Sample(Cubic(), instances=[([1.0, 2.0],), ([1.0],)])),
         "Sample 'Cubic': the instances differ in their parameters' count or shapes"),
        (lambda: check_backend(CubicBackend(), Sample(Cubic(), instances=[([1.0, 2.0],), "ab"])),
         "Sample 'Cubic': instances[1] must be a tuple with one value per parameter; got str."),
    ],
    ids=["unknown-check", "no-samples", "not-a-backend", "one-instance", "shapes-differ", "not-a-tuple"],
)
def test_bad_arguments_are_input_errors(call, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        call()


def test_an_unknown_backend_name_is_a_plugin_error():
    with pytest.raises(bbd.PluginError, match=re.escape("No backend named 'no-such-backend'")):
        check_backend("no-such-backend", cubic_sample())
