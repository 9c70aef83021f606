"""bbd.Executable: real compiled programs (C, built here with the system compiler) as black boxes.

The Newton solver in tests/legacy/newton3.c is differentiated through bbd.implicit(bbd.Root(F)) and its
gradient compared with central differences of the program itself; tests/legacy/misbehave.c crashes, hangs,
prints garbage, writes the wrong shape, exits 3 or writes NaN on request, and each failure must give its own
SolverError, leave no temporary directory behind, and leave the rest of a batch exact.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import blackbox_diff as bbd

LEGACY = Path(__file__).parent / "legacy"
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc/clang) on PATH to build tests/legacy/*.c")


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, str]:
    if CC is None:
        pytest.skip("no C compiler (cc/gcc/clang) on PATH to build tests/legacy/*.c")
    out = tmp_path_factory.mktemp("legacy-bin")
    built = {}
    for name in ("newton3", "misbehave"):
        exe = out / name
        subprocess.run([CC, "-O2", "-o", str(exe), str(LEGACY / f"{name}.c"), "-lm"], check=True)
        built[name] = str(exe)
    return built


def newton3_residual(x, p, a):
    return torch.stack([
        4 * x[0] + x[0] ** 3 + a * x[1] * x[2] - p[0],
        4 * x[1] + a * torch.sin(x[0]) + x[1] ** 3 - p[1],
        4 * x[2] + a * torch.tanh(x[0] - x[1]) + 0.5 * x[2] ** 3 - p[2],
    ])


def sqrt_residual(x, mode, w):
    return x**2 - w


@pytest.fixture
def runs(tmp_path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


# --- the legacy Newton solver ----------------------------------------------------------------------------
@needs_cc
def test_newton3_gradient_matches_finite_differences_of_the_program(programs, runs):
    exe = bbd.Executable([programs["newton3"], "{input}", "{output}"], io="text", timeout=20, output_shape=(3,),
                         workdir=runs)
    solve = bbd.implicit(bbd.Root(newton3_residual))(exe)
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    a = torch.tensor(0.5, requires_grad=True)
    x = solve(p, a)
    assert newton3_residual(x.detach(), p.detach(), a.detach()).abs().max() < 1e-12
    weights = np.array([1.0, -2.0, 0.5])
    (x @ torch.as_tensor(weights)).backward()

    def loss(pp, aa):
        return float(exe(pp, np.asarray(aa)) @ weights)

    h = 1e-6
    p0 = p.detach().numpy()
    fd_p = [(loss(p0 + h * e, 0.5) - loss(p0 - h * e, 0.5)) / (2 * h) for e in np.eye(3)]
    fd_a = (loss(p0, 0.5 + h) - loss(p0, 0.5 - h)) / (2 * h)
    np.testing.assert_allclose(p.grad.numpy(), fd_p, atol=1e-6)
    assert a.grad.item() == pytest.approx(fd_a, abs=1e-6)
    assert os.listdir(runs) == []


@needs_cc
def test_newton3_batch_runs_in_parallel_processes(programs, runs):
    exe = bbd.Executable([programs["newton3"], "{input}", "{output}"], io="text", timeout=20, workdir=runs)
    solve = bbd.implicit(bbd.Root(newton3_residual), in_dims=(0, None), executor="processes", max_workers=2)(exe)
    P = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [-2.0, 0.0, 1.0]], requires_grad=True)
    a = torch.tensor(0.3, requires_grad=True)
    X = solve(P, a)
    serial = np.stack([exe(P[i].detach().numpy(), np.asarray(0.3)) for i in range(3)])
    np.testing.assert_allclose(X.detach().numpy(), serial, rtol=0, atol=1e-14)
    X[:, 0].sum().backward()
    # d x0 / d p for each instance, from the dense IFT: -(dF/dx)^-1 dF/dp with dF/dp = -I
    for i in range(3):
        J = torch.func.jacrev(newton3_residual)(X[i].detach(), P[i].detach(), a.detach())
        np.testing.assert_allclose(P.grad[i].numpy(), torch.linalg.inv(J)[0].numpy(), atol=1e-12)
    assert os.listdir(runs) == []


@needs_cc
def test_executable_pickles_for_process_pools(programs):
    exe = bbd.Executable([programs["newton3"], "{input}", "{output}"], io="text", timeout=5)
    clone = pickle.loads(pickle.dumps(exe))
    np.testing.assert_array_equal(clone(np.array([1.0, 2.0, 3.0]), np.asarray(0.5)),
                                  exe(np.array([1.0, 2.0, 3.0]), np.asarray(0.5)))


# --- every failure has its own error ----------------------------------------------------------------------
FAILURES = [
    (1, "segfault", "was killed by signal SIGSEGV (exit code -11)", -11, "about to crash"),
    (2, "hang", "did not finish within timeout=0.5 s and was killed (exit code -9)", -9, "mode 2"),
    (3, "garbage", "wrote malformed text output: line 1, field 1 (column 1): found 'x', expected a number", 0,
     "mode 3"),
    (4, "wrong-shape", "wrote a solution of shape (2,) (2 numbers), expected shape (1,)", 0, "mode 4"),
    (5, "exit-3", "exited with status 3 (exit code 3)", 3, "giving up: singular matrix"),
    (6, "nan", "wrote NaN or Inf: [nan]", 0, "mode 6"),
    (7, "no-output", "exited normally but wrote no output file output.txt", 0, "mode 7"),
]


@needs_cc
@pytest.mark.parametrize(("mode", "message", "code", "stderr"), [f[:1] + f[2:] for f in FAILURES],
                         ids=[f[1] for f in FAILURES])
def test_each_failure_is_a_clear_solver_error(programs, runs, mode, message, code, stderr):
    exe = bbd.Executable([programs["misbehave"], "{input}", "{output}"], io="text", timeout=0.5,
                         output_shape=(1,), workdir=runs)
    solve = bbd.implicit(bbd.Root(sqrt_residual))(exe)
    with pytest.raises(bbd.SolverError, match=re.escape(message)) as info:
        solve(torch.tensor(float(mode)), torch.tensor(4.0))
    assert info.value.exit_code == code
    assert stderr in info.value.stderr_tail
    assert f"Last lines of its stderr:\nmisbehave: mode {mode}, w = 4" in str(info.value)
    assert os.listdir(runs) == []


@needs_cc
@pytest.mark.parametrize("mode", [f[0] for f in FAILURES], ids=[f[1] for f in FAILURES])
def test_a_failing_instance_leaves_the_batch_exact(programs, runs, mode):
    exe = bbd.Executable([programs["misbehave"], "{input}", "{output}"], io="text", timeout=0.5,
                         output_shape=(1,), workdir=runs)
    solve = bbd.implicit(bbd.Root(sqrt_residual), in_dims=0, on_failure="nan", executor="threads")(exe)
    modes = torch.tensor([0.0, float(mode), 0.0])
    w = torch.tensor([4.0, 9.0, 16.0], requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = solve(modes, w)
    assert any("batch index 1" in str(c.message) or "Executable" in str(c.message) for c in caught)
    assert torch.isnan(x[1]).all()
    np.testing.assert_allclose(x[[0, 2]].detach().numpy().ravel(), [2.0, 4.0], rtol=1e-15)
    x[[0, 2]].sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), [0.25, 0.0, 0.125], rtol=1e-14)
    assert os.listdir(runs) == []


@needs_cc
def test_layer_through_the_subprocess_backend(programs, runs):
    exe = bbd.Executable([programs["newton3"], "{input}", "{output}"], io="text", timeout=20, workdir=runs)
    layer = bbd.layer(exe, condition=bbd.Root(newton3_residual), parameters=[(3,), ()], variables=[(3,)])
    P = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], requires_grad=True)
    a = torch.tensor(0.3, requires_grad=True)
    (X,) = layer(P, a)
    assert X.shape == (2, 3)
    X.sum().backward()
    expected = sum(
        -torch.linalg.solve(torch.func.jacrev(newton3_residual)(X[i].detach(), P[i].detach(), a.detach()),
                            torch.func.jacrev(newton3_residual, argnums=2)(X[i].detach(), P[i].detach(),
                                                                           a.detach())).sum()
        for i in range(2)
    )
    assert a.grad.item() == pytest.approx(expected.item(), abs=1e-12)  # shared parameter: summed over batch


# --- protocols, with small Python programs --------------------------------------------------------------
ECHO = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    io, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
    if io == "json":
        params = [np.asarray(p) for p in json.load(open(src))["parameters"]]
    else:
        with np.load(src, allow_pickle=False) as data:
            params = [data[f"p{i}"] for i in range(len(data.files))]
    w = params[0]
    checks = {"private dir": oct(os.stat(".").st_mode & 0o777) == "0o700",
              "no inherited env": os.environ.get("BBD_SECRET") is None,
              "explicit env": os.environ.get("MY_OPTION") == "on"}
    if not all(checks.values()):
        sys.exit(f"environment checks failed: {checks}")
    x, lam = -np.sign(w) * 1.0, np.abs(w) / 2  # min x*w s.t. x^2 <= 1
    if io == "json":
        json.dump({"x": x.tolist(), "ineq": lam.tolist()}, open(dst, "w"))
    else:
        np.savez(dst[:-4] + ".npz", x=x, ineq=lam)
    """
)


@pytest.fixture
def echo(tmp_path) -> str:
    path = tmp_path / "echo.py"
    path.write_text(ECHO)
    return str(path)


@pytest.mark.parametrize("io", ["json", "npy"])
def test_json_and_npy_protocols_private_dir_explicit_env(echo, runs, io, monkeypatch):
    """The program checks it runs in a 0700 directory and sees only the environment it was given."""
    monkeypatch.setenv("BBD_SECRET", "do not leak")
    exe = bbd.Executable([sys.executable, echo, io, "{input}", "{output}"], io=io, timeout=60,
                         env={"MY_OPTION": "on"}, workdir=runs)
    sol = exe(np.array([2.0, -3.0]))
    assert isinstance(sol, bbd.KKTSolution)
    np.testing.assert_array_equal(sol.x, [-1.0, 1.0])
    np.testing.assert_array_equal(sol.ineq, [1.0, 1.5])
    kkt = bbd.KKT(lambda x, w: (x * w).sum(), ineq=lambda x, w: x**2 - 1)
    w = torch.tensor([2.0, -3.0], requires_grad=True)
    out = bbd.implicit(kkt, return_duals=True)(exe)(w)
    out.ineq.sum().backward()  # lam = |w| / 2 on the active set
    np.testing.assert_allclose(w.grad.numpy(), [0.5, -0.5], rtol=1e-12)
    assert os.listdir(runs) == []


def test_the_program_sees_exactly_the_environment_it_is_given(runs, monkeypatch):
    monkeypatch.setenv("BBD_SECRET", "do not leak")
    monkeypatch.setenv("LC_ALL", "")
    exe = bbd.Executable(["/bin/sh", "-c", "env >&2; exit 1"], io="text", env={"MY_OPTION": "on"}, workdir=runs)
    with pytest.raises(bbd.SolverError) as info:
        exe(np.array(1.0))
    seen = dict(line.split("=", 1) for line in info.value.stderr_tail.splitlines())
    seen.pop("PWD", None)  # set by sh itself
    assert seen == {"PATH": os.environ["PATH"], "LANG": "C", "HOME": seen["HOME"], "MY_OPTION": "on"}
    assert os.path.basename(seen["HOME"]).startswith("bbd-run-")  # the run directory


def test_stdin_and_stdout_when_no_placeholders(runs):
    code = "import sys; print(' '.join(str(2*float(v)) for v in sys.stdin.read().split()))"
    exe = bbd.Executable([sys.executable, "-c", code], io="text", workdir=runs)
    np.testing.assert_array_equal(exe(np.array([1.0, 2.5]), np.array(3.0)), [2.0, 5.0, 6.0])
    assert os.listdir(runs) == []


def test_stdout_is_size_capped(runs):
    exe = bbd.Executable([sys.executable, "-c", "print('1 ' * 10000)"], io="text", max_output_bytes=100,
                         workdir=runs)
    with pytest.raises(bbd.SolverError, match=re.escape("wrote output over max_output_bytes=100 (more than that on "
                                                        "stdout) and was stopped")):
        exe(np.array(1.0))
    assert os.listdir(runs) == []


def test_malformed_json_output(runs):
    code = "import sys; open(sys.argv[1], 'w').write('{\"y\": [1]}')"
    exe = bbd.Executable([sys.executable, "-c", code, "{output}"], io="json", workdir=runs)
    with pytest.raises(bbd.SolverError, match=re.escape("wrote malformed json output (KeyError:")):
        exe(np.array(1.0))


def test_missing_program_is_a_solver_error(tmp_path):
    exe = bbd.Executable([str(tmp_path / "nope"), "{input}"], io="text")
    with pytest.raises(bbd.SolverError, match=re.escape("could not be started")):
        exe(np.array(1.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"argv": "./solver {input}"}, "Executable expects argv as a non-empty list of strings"),
        ({"argv": []}, "Executable expects argv as a non-empty list of strings"),
        ({"argv": ["x"], "io": "xml"}, "Executable io must be one of ['json', 'npy', 'text']; got 'xml'."),
        ({"argv": ["x"], "timeout": 0}, "Executable timeout must be a positive number of seconds or None; got 0."),
    ],
    ids=["string", "empty", "io", "timeout"],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    with pytest.raises(bbd.InputError, match=re.escape(message)):
        bbd.Executable(**kwargs)


def test_relative_program_path_is_resolved_now(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exe = bbd.Executable(["./solver", "{input}"], io="text")
    assert exe.argv[0] == str(tmp_path / "solver")


@needs_cc
def test_legacy_executable_example_runs(capsys, monkeypatch):
    import runpy

    example = Path(__file__).resolve().parent.parent / "examples" / "legacy_executable.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--fast"])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    worst = float(re.search(r"worst \|IFT - FD\| = (\S+)", out).group(1))
    assert worst < 1e-6
    assert float(re.search(r"\|a - a_true\| = (\S+)", out).group(1)) < 1e-6
    installable = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if shutil.which("gfortran") is None and not installable:
        assert "Fortran part skipped: no gfortran on PATH" in out
        return
    assert "Fortran part skipped" not in out, "gfortran is installable here: run `make install`"
    assert float(re.search(r"Fortran: worst \|IFT - FD\| = (\S+)", out).group(1)) < 1e-6
    assert float(re.search(r"Fortran batch: max \|pool - serial\| = (\S+)", out).group(1)) == 0.0


def test_program_that_never_reads_its_stdin_still_times_out(runs):
    exe = bbd.Executable([sys.executable, "-c", "import time; time.sleep(60)"], io="text", timeout=1.0, workdir=runs)
    with pytest.raises(bbd.SolverError, match=re.escape("did not finish within timeout=1.0 s and was killed")):
        exe(np.zeros(200_000))  # ~1 MB on stdin: more than a pipe holds
    assert os.listdir(runs) == []
