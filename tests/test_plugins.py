"""The plugin registry: entry points (built-in and third-party), run-time registration, failures, the env var.

Entry points are simulated by replacing `blackbox_diff._registry._entry_points` (the only place the
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
from blackbox_diff import _hookspecs, _registry

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


def test_builtins_fall_back_to_module_names_when_not_installed(registry):
    registry([])  # blackbox-diff not pip-installed: its own entry points are invisible
    assert {"scipy", "subprocess"} <= set(names())
    assert isinstance(_registry.get_backend("scipy"), bbd.AbstractBackend)


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
    assert [f.plugin for f in _registry.plugin_errors()] == ["broken", "ghost"]
    with pytest.raises(bbd.PluginError, match=re.escape("Plugins that failed to load: ['broken', 'ghost']")):
        _registry.get_backend("broken")


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
    assert {f.plugin for f in _registry.plugin_errors()} == {"raises", "not-a-backend", "scipy"}


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
    _registry.reset()
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
