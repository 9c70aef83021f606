"""The plugin registry: entry points (built-in and third-party), run-time registration, failures, the env var.

Entry points are simulated by replacing `blackbox_diff.plugin._registry._entry_points` (the only place the
registry lists them), with objects that load real modules written to a temporary directory.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff.plugin import _hookspecs, _registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


class FakeEntryPoint:
    """What importlib.metadata.EntryPoint offers the registry: name, value, group, dist, load()."""

    def __init__(self, name: str, value: str, dist: str | None = None) -> None:
        self.name, self.value, self.group = name, value, "blackbox_diff"
        self.dist = types.SimpleNamespace(name=dist) if dist else None
        self.loads = 0

    def load(self):
        self.loads += 1
        import importlib

        return importlib.import_module(self.value)


def pyproject_entry_points(path: Path) -> list[FakeEntryPoint]:
    table = tomllib.loads(path.read_text())["project"]
    dist = table["name"]
    return [FakeEntryPoint(n, v, dist) for n, v in table["entry-points"]["blackbox_diff"].items()]


@pytest.fixture
def registry(monkeypatch):
    """A fresh, not yet loaded registry whose entry points the test sets with `registry(list)`."""
    monkeypatch.setattr(_registry, "_MANAGER", None)
    monkeypatch.delenv(_registry.DISABLE_ENV, raising=False)
    calls = []

    def use(eps):
        def listing():
            calls.append(1)
            return list(eps)

        monkeypatch.setattr(_registry, "_entry_points", listing)
        return calls

    use(pyproject_entry_points(ROOT / "pyproject.toml"))
    return use


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Write plugin modules: `plugin_dir(name, source)`; the directory is on sys.path."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return write


TOY = """
    import numpy as np
    from typing import ClassVar
    import blackbox_diff as bbd

    class Halve:
        pass

    class ToyBackend(bbd.AbstractBackend):
        name: ClassVar[str] = "{name}"
        problem_types: ClassVar[str] = "Halve (x = w / 2)"

        def accepts(self, problem):
            return isinstance(problem, Halve)

        def compile(self, problem, parameters, variables, options):
            return bbd.Compiled(solve=lambda w: w / 2, condition=bbd.Root(lambda x, w: 2 * x - w),
                                parameter_shapes=[()], backend=self.name)

    @bbd.hookimpl
    def register_backends(register):
        register(ToyBackend())
"""


def names() -> list[str]:
    return [info.name for info in bbd.backends()]


# --- built-ins through entry points -------------------------------------------------------------------
def test_builtin_backends_load_through_the_projects_entry_points(registry):
    eps = pyproject_entry_points(ROOT / "pyproject.toml")
    registry(eps)
    rows = {info.name: info for info in bbd.backends()}
    assert {"scipy", "subprocess"} <= set(rows)
    assert all(ep.loads == 1 for ep in eps if ep.name in rows)
    assert rows["scipy"].package == "blackbox-diff"
    assert rows["scipy"].available and rows["scipy"].returns_duals and rows["scipy"].error is None
    assert "bbd.KKT (SLSQP, trust-constr)" in rows["scipy"].problem_types


NOT_INSTALLED = (
    "No entry point of the distribution 'blackbox-diff' was found in the group 'blackbox_diff', so the built-in "
    "backends are not registered: blackbox_diff is imported without being installed (a checkout on PYTHONPATH?). "
    "Install it: pip install -e . in the checkout, or pip install the wheel."
)


def test_without_the_projects_entry_points_the_builtins_are_missing_and_the_error_says_why(registry, monkeypatch):
    """One loading path: no fallback imports the built-in modules by name when their entry points are absent."""
    registry([])  # blackbox-diff not pip-installed: its own entry points are invisible
    assert names() == []
    assert "blackbox_diff_scipy" not in [p.__name__ for p in bbd.plugin_manager().get_plugins()]
    with pytest.raises(bbd.PluginError, match=re.escape(f"No backend named 'scipy'. Registered backends: []. "
                                                        f"{NOT_INSTALLED}")):
        bbd.plugin.get_backend("scipy")
    with pytest.raises(bbd.PluginError, match=re.escape(NOT_INSTALLED)):
        bbd.layer(bbd.Root(lambda x, w: x - w), x0=np.zeros(1))


def test_a_third_party_entry_point_alone_still_says_the_builtins_are_missing(registry, plugin_dir):
    module = plugin_dir("bbd_toy_alone", TOY.format(name="toy"))
    registry([FakeEntryPoint("toy", module, "toy-dist")])
    assert names() == ["toy"]
    with pytest.raises(bbd.PluginError, match=re.escape(NOT_INSTALLED)):
        bbd.plugin.get_backend("cvxpy")


def test_with_the_projects_entry_points_the_error_does_not_blame_the_installation(registry):
    with pytest.raises(bbd.PluginError) as info:
        bbd.plugin.get_backend("no-such-backend")
    assert "No backend named 'no-such-backend'. Registered backends: ['casadi', 'cvxpy', 'qp', 'scipy', " \
           "'subprocess']. Install the plugin" in str(info.value)


def test_the_disable_variable_keeps_the_builtins_by_distribution_not_by_module_name(registry, plugin_dir,
                                                                                      monkeypatch):
    """A third-party plugin whose module is named like a built-in one is still third-party: the built-ins
    are recognised by their distribution (blackbox-diff), not by a list of module names."""
    module = plugin_dir("bbd_toy_impostor", TOY.format(name="impostor"))
    registry([*pyproject_entry_points(ROOT / "pyproject.toml"), FakeEntryPoint("impostor", module, "other-dist")])
    monkeypatch.setenv(_registry.DISABLE_ENV, "1")
    got = set(names())
    assert {"scipy", "subprocess", "qp"} <= got and "impostor" not in got


def test_builtin_plugins_import_without_their_solver_library():
    """cvxpy and casadi hidden: `import blackbox_diff` works and their backends are listed unavailable."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["cvxpy"] = None
        sys.modules["casadi"] = None
        import blackbox_diff as bbd
        print("loaded at import:", [m for m in ("blackbox_diff_scipy", "blackbox_diff_cvxpy") if m in sys.modules])
        rows = {r.name: r for r in bbd.backends()}
        print(rows["cvxpy"].available, rows["cvxpy"].error)
        try:
            bbd.layer(object(), backend="cvxpy")
        except bbd.BackendUnavailableError as err:
            print("raised", err)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded at import: []" in out.stdout  # plugins load lazily, on first use
    assert 'False Backend \'cvxpy\' needs cvxpy, which is not installed. Install it with: pip install ' \
           '"blackbox-diff[cvxpy]"' in out.stdout
    assert 'raised Backend \'cvxpy\' needs cvxpy' in out.stdout


def test_missing_library_makes_the_backend_unavailable(registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # find_spec("scipy") is now None
    row = next(info for info in bbd.backends() if info.name == "scipy")
    assert not row.available
    assert row.error == 'Backend \'scipy\' needs scipy, which is not installed. Install it with: pip install ' \
                        '"blackbox-diff[scipy]"'
    with pytest.raises(bbd.BackendUnavailableError, match=re.escape('pip install "blackbox-diff[scipy]"')):
        bbd.layer(bbd.Root(lambda x, w: x - w), backend="scipy", x0=np.zeros(1))


# --- the hook: third-party entry points, run-time registration ------------------------------------------
def test_hook_register_backends_from_a_third_party_entry_point(registry, plugin_dir):
    module = plugin_dir("bbd_toy_ep", TOY.format(name="toy"))
    registry([*pyproject_entry_points(ROOT / "pyproject.toml"), FakeEntryPoint("toy", module, "toy-dist")])
    row = next(info for info in bbd.backends() if info.name == "toy")
    assert row.package == "toy-dist" and row.available and row.problem_types == "Halve (x = w / 2)"
    halve = sys.modules[module].Halve()
    layer = bbd.layer(halve, parameters=[()])  # found through accepts()
    w = torch.tensor([2.0, 5.0], requires_grad=True)
    x = layer(w)
    x.sum().backward()
    np.testing.assert_allclose(x.detach().numpy(), [1.0, 2.5])
    np.testing.assert_allclose(w.grad.numpy(), [0.5, 0.5], rtol=1e-14)


def test_hook_register_backends_at_run_time(registry):
    class Plugin:
        @bbd.hookimpl
        def register_backends(self, register):
            register(Runtime())

    class Runtime(bbd.AbstractBackend):
        name: ClassVar[str] = "runtime-test"

        def accepts(self, problem):
            return False

        def compile(self, problem, parameters, variables, options):
            raise NotImplementedError

    manager = bbd.plugin_manager()
    assert isinstance(manager, _registry.PluginManager) and manager.project_name == "blackbox_diff"
    plugin = Plugin()
    manager.register(plugin)
    assert "runtime-test" in names()
    assert next(i for i in bbd.backends() if i.name == "runtime-test").package == "test_plugins"
    manager.unregister(plugin)
    assert "runtime-test" not in names()


def test_example_plugin_package_through_its_own_entry_point(registry, monkeypatch):
    package = ROOT / "examples" / "plugin_package"
    monkeypatch.syspath_prepend(str(package))
    registry([*pyproject_entry_points(ROOT / "pyproject.toml"), *pyproject_entry_points(package / "pyproject.toml")])
    row = next(info for info in bbd.backends() if info.name == "brentq")
    assert row.package == "bbd-brentq" and row.available
    from bbd_brentq import BracketedRoot

    layer = bbd.layer(BracketedRoot(lambda x, w: x**3 + x - w, lo=-10.0, hi=10.0), parameters=[()])
    w = torch.tensor([2.0, 10.0], requires_grad=True)
    x = layer(w)
    x.sum().backward()
    np.testing.assert_allclose(x.detach().numpy(), [1.0, 2.0], rtol=1e-13)
    np.testing.assert_allclose(w.grad.numpy(), [1 / 4, 1 / 13], rtol=1e-12)  # 1 / (3x^2 + 1)


# --- failures are reported, never fatal ----------------------------------------------------------------
def test_plugin_whose_import_fails_is_reported(registry, plugin_dir):
    broken = plugin_dir("bbd_broken_plugin", "raise RuntimeError('boom: incompatible numpy')\n")
    registry([*pyproject_entry_points(ROOT / "pyproject.toml"), FakeEntryPoint("broken", broken, "broken-dist"),
              FakeEntryPoint("ghost", "bbd_no_such_module_anywhere")])
    with pytest.warns(RuntimeWarning) as caught:
        rows = {info.name: info for info in bbd.backends()}
    assert [str(w.message) for w in caught][0] == (
        "blackbox_diff plugin 'broken' (package 'broken-dist') failed to load and is disabled: RuntimeError: "
        "boom: incompatible numpy. Reinstall or fix the package, or disable it with "
        "BLACKBOX_DIFF_DISABLE_PLUGINS=broken."
    )
    assert "plugin 'ghost' (package 'bbd_no_such_module_anywhere') failed to load" in str(caught[1].message)
    assert rows["broken"] == _registry.BackendInfo(
        "broken", "broken-dist", False, "", False, "import failed: RuntimeError: boom: incompatible numpy"
    )
    assert rows["ghost"].error.startswith("import failed: ModuleNotFoundError: No module named")
    assert rows["scipy"].available  # the others are unaffected
    assert [f.plugin for f in bbd.plugin.plugin_errors()] == ["broken", "ghost"]
    with pytest.raises(bbd.PluginError, match=re.escape("Plugins that failed to load: ['broken', 'ghost']")):
        bbd.plugin.get_backend("broken")


def test_faulty_registrations_are_reported(registry):
    class NotABackend:
        @bbd.hookimpl
        def register_backends(self, register):
            register(object)
            register(ScipyImpostor())

    class Raises:
        @bbd.hookimpl
        def register_backends(self, register):
            raise ValueError("cannot read my config")

    class ScipyImpostor(bbd.AbstractBackend):
        name: ClassVar[str] = "scipy"

        def accepts(self, problem):
            return False

        def compile(self, problem, parameters, variables, options):
            raise NotImplementedError

    manager = bbd.plugin_manager()
    manager.register(NotABackend(), name="not-a-backend")
    manager.register(Raises(), name="raises")
    with pytest.warns(RuntimeWarning) as caught:
        table = manager.backend_table()
    messages = [str(w.message) for w in caught]
    assert any("register_backends raised ValueError: cannot read my config" in m for m in messages)
    assert any("registered a type, expected an instance of bbd.AbstractBackend" in m for m in messages)
    assert any("backend name 'scipy' is already registered by package 'test_plugins'" in m for m in messages)
    assert isinstance(table["scipy"].backend, ScipyImpostor)  # run-time plugins are called first: they win
    assert {f.plugin for f in bbd.plugin.plugin_errors()} == {"raises", "not-a-backend", "scipy"}


# --- BLACKBOX_DIFF_DISABLE_PLUGINS --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "present", "absent"),
    [
        ("1", {"scipy", "subprocess"}, {"toy"}),
        ("all", {"scipy"}, {"toy"}),
        ("toy", {"scipy"}, {"toy"}),
        ("scipy, toy", {"subprocess"}, {"scipy", "toy"}),
        ("0", {"scipy", "toy"}, set()),
    ],
)
def test_disable_environment_variable(registry, plugin_dir, monkeypatch, value, present, absent):
    module = plugin_dir("bbd_toy_env", TOY.format(name="toy"))
    registry([*pyproject_entry_points(ROOT / "pyproject.toml"), FakeEntryPoint("toy", module)])
    monkeypatch.setenv(_registry.DISABLE_ENV, value)
    got = set(names())
    assert present <= got and not (absent & got)


# --- lazy, once, thread-safe ----------------------------------------------------------------------------
def test_entry_points_load_lazily_once_and_thread_safely(registry):
    calls = registry(pyproject_entry_points(ROOT / "pyproject.toml"))
    assert calls == []  # nothing loads until the registry is used
    managers = []
    threads = [threading.Thread(target=lambda: managers.append(bbd.plugin_manager())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bbd.backends()
    bbd.backends()
    assert len(calls) == 1
    assert all(m is managers[0] for m in managers) and bbd.plugin_manager() is managers[0]
    bbd.plugin.reload_plugins()
    bbd.plugin_manager()
    assert len(calls) == 2


# --- the CLI table ----------------------------------------------------------------------------------------
def test_cli_plugins_prints_the_table(registry, capsys):
    from blackbox_diff import cli

    assert cli.main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "package", "available", "problem", "types"]
    scipy_row = next(line for line in lines if line.startswith("scipy "))
    assert "blackbox-diff" in scipy_row and "bbd.Argmin" in scipy_row


# --- meta: every hook is tested and documented ------------------------------------------------------------
def hooks() -> dict[str, str]:
    """hook name -> its exact signature as documented: ``name(arg: type, ...) -> type``."""
    out = {}
    for name, fn in vars(_hookspecs).items():
        if callable(fn) and hasattr(fn, f"{_hookspecs.PROJECT_NAME}_spec"):
            sig = inspect.signature(fn)
            args = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
            out[name] = f"{name}({args}) -> {sig.return_annotation}"
    return out


def test_meta_every_hook_has_a_test_and_a_documented_signature():
    found = hooks()
    assert found == {"register_backends": "register_backends(register: Callable[[AbstractBackend], None]) -> None"}
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tests = [name for name in globals() if name.startswith("test_hook_")]
    for name, signature in found.items():
        assert f"### `{signature}`" in docs, f"docs/plugins.md lacks a section headed ### `{signature}`"
        assert any(t.startswith(f"test_hook_{name}") for t in tests), f"no test_hook_{name}* test"
        assert f"Signature: ``{signature}``" in inspect.getdoc(getattr(_hookspecs, name))


def test_a_third_party_backend_names_its_own_install_command():
    class Needy(bbd.AbstractBackend):
        name = "needy"
        requires = ("no_such_solver_module_xyz",)
        install_hint = "pip install needy-solver"

        def accepts(self, problem):
            return False

        def compile(self, problem, parameters, variables, options):
            raise AssertionError("never compiled")

    assert not Needy().available()
    with pytest.raises(bbd.BackendUnavailableError, match=re.escape("Install it with: pip install needy-solver")):
        Needy().require()


# --- the public plugin API: registered(), validated options, parse_shapes ---------------------------------
class ToyPlugin:
    """A run-time plugin whose backend solves 2 x = w (and records the options compile received)."""

    def __init__(self, name: str = "toy-runtime") -> None:
        self.name = name
        self.received: list = []

    @bbd.hookimpl
    def register_backends(self, register):
        plugin = self

        class Backend(bbd.AbstractBackend):
            name: ClassVar[str] = plugin.name

            class Options(bbd.AbstractBackend.Options):
                scale: float = 1.0
                label: str = "x"

            def accepts(self, problem):
                return problem == "halve"

            def compile(self, problem, parameters, variables, options):
                plugin.received.append(options)
                opts = self.Options(**options)  # the pre-validation idiom keeps working
                return bbd.Compiled(solve=lambda w: w / (2 * opts.scale),
                                    condition=bbd.Root(lambda x, w: 2 * opts.scale * x - w),
                                    parameter_shapes=[()], backend=self.name)

        register(Backend())


def test_registered_adds_a_plugin_for_the_block_only(registry):
    plugin = ToyPlugin()
    with bbd.plugin.registered(plugin) as manager:
        assert manager is bbd.plugin_manager()
        assert "toy-runtime" in names()
        x = bbd.layer("halve")(torch.tensor([4.0, 6.0]))
        np.testing.assert_allclose(x.numpy(), [2.0, 3.0])
    assert "toy-runtime" not in names()
    assert not bbd.plugin_manager().is_registered(plugin)


def test_registered_unregisters_when_the_block_raises(registry):
    plugin = ToyPlugin()
    with pytest.raises(RuntimeError, match="inside"), bbd.plugin.registered(plugin):
        raise RuntimeError("inside")
    assert "toy-runtime" not in names()


def test_registered_loads_an_entry_point_like_an_installed_one(registry, plugin_dir):
    import importlib.metadata

    module = plugin_dir("bbd_toy_registered", TOY.format(name="toy-ep"))
    good = importlib.metadata.EntryPoint("toy-ep", module, bbd.plugin.ENTRY_POINT_GROUP)
    bad = importlib.metadata.EntryPoint("missing-ep", "bbd_no_such_plugin_module", bbd.plugin.ENTRY_POINT_GROUP)
    with pytest.warns(RuntimeWarning, match="plugin 'missing-ep'"), bbd.plugin.registered(good, bad):
        assert "toy-ep" in names()
        failures = bbd.plugin.plugin_errors()
        assert [f.plugin for f in failures] == ["missing-ep"]
        assert failures[0].error.startswith("import failed: ModuleNotFoundError: No module named")
    assert "toy-ep" not in names() and bbd.plugin.plugin_errors() == []


def test_registered_refuses_a_plugin_that_is_already_registered(registry):
    plugin = ToyPlugin()
    bbd.plugin_manager().register(plugin, name="already")
    with pytest.raises(bbd.PluginError, match=re.escape(
        "is already registered (as 'already'); registered() registers a plugin that is not yet registered. "
        "Unregister it first."
    )), bbd.plugin.registered(plugin):
        pass
    assert bbd.plugin_manager().is_registered(plugin)  # left as it was


def test_a_runtime_plugin_from_an_installed_distribution_names_that_distribution(registry):
    import blackbox_diff_qp

    registry([])  # the qp module registered by hand, not through its entry point
    with bbd.plugin.registered(blackbox_diff_qp):
        row = next(info for info in bbd.backends() if info.name == "qp")
    assert row.package == "blackbox-diff"


def test_compile_receives_the_validated_options_model(registry):
    plugin = ToyPlugin()
    with bbd.plugin.registered(plugin):
        layer = bbd.layer("halve", scale="2", rtol=1e-12)  # "2" is coerced by the model; rtol goes to the engine
        (options,) = plugin.received
        backend = bbd.plugin.get_backend("toy-runtime")
        assert isinstance(options, backend.Options) and options.scale == 2.0
        assert dict(options) == {"scale": 2.0} and "scale" in options and "label" not in options
        assert options["label"] == "x" and options.get("label", "unset") == "unset"
        np.testing.assert_allclose(layer(torch.tensor(8.0)).item(), 2.0)
        with pytest.raises(bbd.InputError, match=re.escape(
            "Invalid options for Options: option 'scale': Input should be a valid number, unable to parse string "
            "as a number (got 'big')."
        )):
            bbd.layer("halve", scale="big")
        assert len(plugin.received) == 1  # an invalid option never reaches compile


def test_a_backend_whose_options_are_a_plain_pydantic_model_keeps_working(registry):
    """Written for the dict blackbox_diff passed before: Options(**options) and dict(options) still work."""
    from pydantic import BaseModel, ConfigDict

    seen = []

    class Plain(bbd.AbstractBackend):
        name: ClassVar[str] = "plain-options"

        class Options(BaseModel):
            model_config = ConfigDict(extra="forbid")
            scale: float = 1.0

        def accepts(self, problem):
            return problem == "plain"

        def compile(self, problem, parameters, variables, options):
            seen.append((dict(options), isinstance(options, self.Options)))
            opts = self.Options(**options)
            return bbd.Compiled(solve=lambda w: w / opts.scale, condition=bbd.Root(lambda x, w: opts.scale * x - w),
                                parameter_shapes=[()], backend=self.name)

    layer = bbd.layer("plain", backend=Plain(), scale=4)
    np.testing.assert_allclose(layer(torch.tensor(2.0)).item(), 0.5)
    assert seen == [({"scale": 4.0}, True)]
    with pytest.raises(bbd.InputError, match=re.escape("Invalid options for Options: option 'scale': Input should be "
                                                       "a valid number")):
        bbd.layer("plain", backend=Plain(), scale="x")


def test_validate_options_takes_a_dict_a_model_or_none():
    plugin = ToyPlugin()
    with bbd.plugin.registered(plugin):
        backend = bbd.plugin.get_backend("toy-runtime")
    model = backend.validate_options({"scale": 3})
    assert model.scale == 3.0 and backend.validate_options(model) is model
    assert backend.validate_options(None).scale == 1.0
    with pytest.raises(bbd.InputError, match=re.escape("unknown option 'scal'")):
        backend.validate_options({"scal": 3})
    with pytest.raises(bbd.InputError, match=re.escape(
        "Backend 'toy-runtime': options must be a mapping of option names to values or an instance of its Options "
        "model; got list."
    )):
        backend.validate_options([("scale", 3)])


@pytest.mark.parametrize(
    ("specs", "shapes"),
    [
        ([3, (2, 2), (), [4]], [(3,), (2, 2), (), (4,)]),
        ([np.zeros((2, 3)), torch.zeros(5), 0.5, np.float64(2.0)], [(2, 3), (5,), (), ()]),
        ([np.int64(2), (np.int64(1), 2), torch.Size([2, 1])], [(2,), (1, 2), (2, 1)]),
        (None, None),
        ([], []),
    ],
    ids=["ints-and-tuples", "examples", "numpy-ints", "none", "empty"],
)
def test_parse_shapes_accepts_shapes_lengths_and_examples(specs, shapes):
    assert bbd.plugin.parse_shapes(specs) == shapes


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["a"], "parameters[0] = 'a' is not a shape; expected a tuple of ints >= 0 such as (3,) or (), an int n >= 0 "
                "for shape (n,), or an example array (or number) whose shape is taken."),
        ([(3,), True], "parameters[1] = True is not a shape"),  # a bool is no length
        ([-1], "parameters[0] = -1 is not a shape"),
        ([(2, -1)], "parameters[0] = (2, -1) is not a shape"),
        ([(2.0, 1)], "parameters[0] = (2.0, 1) is not a shape"),
        ("34", "parameters must be a list with one entry per parameter (a shape tuple, an int n for "
                          "shape (n,), or an example array); got str."),
    ],
    ids=["string", "bool", "negative", "negative-dim", "float-dim", "not-a-list"],
)
def test_parse_shapes_refuses_what_is_not_a_shape(specs, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.plugin.parse_shapes(specs)


@pytest.mark.parametrize("spec", [0.5, (3,), 2, np.zeros((2, 2))], ids=["float", "tuple", "int", "array"])
def test_scipy_and_subprocess_backends_read_shapes_alike(spec):
    """One parser: both backends take the same declarations (a float is a scalar example in both)."""
    expected = bbd.plugin.parse_shapes([spec])
    scipy = bbd.layer(bbd.Root(lambda x, w: x - w.sum()), backend="scipy", x0=np.zeros(()), parameters=[spec])
    exe = bbd.Executable([sys.executable, "-c", "pass"], io="json")
    sub = bbd.layer(exe, condition=bbd.Root(lambda x, w: x - w.sum()), parameters=[spec])
    assert list(scipy.compiled.parameter_shapes) == expected == list(sub.compiled.parameter_shapes)
    with pytest.raises(bbd.InputError, match=re.escape("variables[0] = 'x' is not a shape")):
        bbd.layer(exe, condition=bbd.Root(lambda x, w: x - w), parameters=[spec], variables=["x"])


def test_version_comes_from_the_installed_metadata():
    import importlib.metadata

    assert bbd.__version__ == importlib.metadata.version("blackbox-diff")
    assert bbd.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def private_uses(source: str) -> list[str]:
    """Private names of blackbox_diff a module imports or reads (``blackbox_diff._x``, ``from blackbox_diff
    import _x``, ``bbd._x``)."""
    import ast

    found = []
    aliases = {"blackbox_diff"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "blackbox_diff":
                    aliases.add(a.asname or a.name)
                    found += [a.name] if any(part.startswith("_") for part in a.name.split(".")) else []
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "blackbox_diff":
            parts = node.module.split(".") + [a.name for a in node.names]
            found += [f"{node.module}: {[a.name for a in node.names]}"] if any(p.startswith("_") for p in parts) else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_private_name_finder_finds_each_form():
    assert private_uses("from blackbox_diff._options import parse_options") != []
    assert private_uses("from blackbox_diff import KKT, _registry") != []
    assert private_uses("import blackbox_diff._registry") != []
    assert private_uses("import blackbox_diff as bbd\nbbd._registry.reset()") != []
    assert private_uses("import blackbox_diff as bbd\nfrom blackbox_diff.plugin import parse_shapes\n"
                        "from blackbox_diff_qp._solve import solve_qp\nbbd.__version__") == []


def test_builtin_plugins_import_only_public_names_of_blackbox_diff():
    """The built-in backends get nothing a third-party backend does not: no private module of the core."""
    offenders = {}
    for path in sorted([*(ROOT / "plugins").rglob("*.py"), *(ROOT / "examples" / "plugin_package").rglob("*.py")]):
        found = private_uses(path.read_text())
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_answer_dtype_device_follows_the_first_floating_parameter_and_owned_tensor_copies():
    """The helper every KKT backend's `prepare` uses: an integer tensor first must not make the answer int64
    (the "first tensor" shortcut), and no tensor at all gives float64 on the CPU."""
    from blackbox_diff.plugin import answer_dtype_device, owned_tensor

    ints, f32 = torch.tensor([1, 2]), torch.ones(2, dtype=torch.float32)
    assert answer_dtype_device([3.0, ints, f32]) == (torch.float32, torch.device("cpu"))
    assert answer_dtype_device([ints]) == (torch.float64, ints.device)
    assert answer_dtype_device([np.ones(2), 1.0]) == (torch.float64, torch.device("cpu"))
    array = np.arange(3.0)
    out = owned_tensor(array, torch.float32, torch.device("cpu"))
    array[0] = 9.0  # a black box reusing its workspace must not reach the answer
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 1.0, 2.0]
    source = torch.zeros(2, dtype=torch.float64)
    kept = owned_tensor(source, torch.float64, torch.device("cpu"))
    source += 1.0
    assert kept.tolist() == [0.0, 0.0]
    assert owned_tensor(np.array([True, False]), torch.float64, torch.device("cpu")).tolist() == [1.0, 0.0]
