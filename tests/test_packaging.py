"""The distributions: the sdist and the wheel build and pass `twine check`, and the wheel, installed into a
fresh virtual environment and run from an empty directory, lists the built-in backends (through its own entry
points: nothing of the checkout is importable there) and runs the showcase demo, which ships inside it.

The fresh environment gets the heavy dependencies (torch, cvxpy, casadi, ...) from this test's own environment
through a path file, which adds that site-packages to sys.path without running its path files: the checkout's
editable install of blackbox-diff stays invisible, and the wheel's copy is the only one that imports.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = ("casadi", "cvxpy", "qp", "scipy", "subprocess")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel of this checkout (the wheel built from the sdist, as `python -m build` does)."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def only(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def test_the_sdist_and_the_wheel_pass_twine_check(dist):
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(dist.iterdir()))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_the_wheel_ships_the_package_the_plugins_and_the_showcase_only(dist):
    names = zipfile.ZipFile(only(dist, "*.whl")).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"blackbox_diff", *(f"blackbox_diff_{b}" for b in BUILTINS), "blackbox_diff-0.1.0.dist-info"}
    assert "blackbox_diff/demos/mpc_imitation.py" in names and "blackbox_diff/testing/__init__.py" in names
    assert not [n for n in names if n.endswith((".pyc", ".so"))]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(only(dist, "*.whl")).read(
        "blackbox_diff-0.1.0.dist-info/entry_points.txt").decode())
    assert dict(entry_points["blackbox_diff"]) == {b: f"blackbox_diff_{b}" for b in BUILTINS}
    assert entry_points["console_scripts"]["blackbox-diff"] == "blackbox_diff.cli:main"


def test_the_sdist_holds_the_whole_source(dist):
    with tarfile.open(only(dist, "*.tar.gz")) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for path in ("pyproject.toml", "README.md", "Makefile", "examples/seed_examples.py", "docs/plugins.md",
                 "tests/test_packaging.py", "plugins/blackbox_diff_scipy/__init__.py",
                 "blackbox_diff/demos/mpc_imitation.py", "examples/plugin_package/pyproject.toml"):
        assert path in names, path


@pytest.fixture(scope="module")
def fresh(dist, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A new virtual environment with the wheel installed, and an environment without PYTHONPATH."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "blackbox_diff_test_dependencies.pth").write_text("\n".join(sorted(here)) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--quiet", str(only(dist, "*.whl"))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv, env


def test_the_installed_wheel_is_what_imports(fresh, tmp_path):
    venv, env = fresh
    code = ("import sys, blackbox_diff, blackbox_diff_scipy, blackbox_diff.testing; "
            "print(blackbox_diff.__file__); print(blackbox_diff_scipy.__file__); print(blackbox_diff.__version__); "
            "print([p for p in sys.path if p.rstrip('/') in %r])" % [str(ROOT), str(ROOT / "plugins")])
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    core, plugin, version, checkout_paths = proc.stdout.splitlines()
    assert core.startswith(str(venv)) and plugin.startswith(str(venv)), proc.stdout
    assert version == "0.1.0" and checkout_paths == "[]"


def test_from_the_wheel_in_an_empty_directory_plugins_lists_the_builtin_backends(fresh, tmp_path):
    venv, env = fresh
    proc = subprocess.run([str(venv / "bin" / "blackbox-diff"), "plugins"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2 : lines.index("")]}
    assert set(rows) == set(BUILTINS), proc.stdout
    for name in BUILTINS:
        assert rows[name][1:3] == ["blackbox-diff", "yes"], rows[name]
    assert lines[-1].startswith("answer checks: "), proc.stdout  # compiled or numpy, and why
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_from_the_wheel_in_an_empty_directory_demo_runs_the_showcase(fresh, tmp_path):
    venv, env = fresh
    start = time.perf_counter()
    proc = subprocess.run([str(venv / "bin" / "blackbox-diff"), "demo", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("== blackbox-diff demo mpc_imitation --fast"), out[:500]
    assert re.search(r"^MPC-IFT \(ours\)\s+\d", out, re.MULTILINE), out
    assert "learned weights" in out and (tmp_path / "outputs" / "mpc_imitation.png").stat().st_size > 10_000
    print(f"demo from the wheel: {seconds:.1f} s")
