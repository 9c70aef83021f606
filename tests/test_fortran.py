"""A real Fortran legacy program (examples/legacy_matsolve.f90, built here with gfortran) as a black box.

It reads a 3x3 matrix A and a 3x2 matrix B column by column (list-directed reads), solves
A X + 0.1 X**3 = B per column with its own Newton iteration and writes X column by column with a D24.16
format. Its gradient is checked against central differences of the program itself, the array orders are
checked against the transposed reading a C-order writer would cause, and a batch runs through a process
pool. Small Fortran programs written below check what gfortran itself prints (D exponents, three-digit
exponents without a letter, Infinity/NaN, fields that touch).

gfortran is installed by ``make install`` (``apt-get install -y gfortran``) where it is missing; these
tests fail rather than skip on a machine that could have installed it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import blackbox_diff as bbd

SOURCE = Path(__file__).resolve().parents[1] / "examples" / "legacy_matsolve.f90"
A0 = np.array([[4.0, -1.0, 0.3], [1.0, 3.0, -0.4], [0.5, 0.2, 5.0]])  # not symmetric: a transpose shows
B0 = np.array([[1.0, -1.0], [2.0, 0.5], [3.0, -2.0]])


def gfortran() -> str:
    path = shutil.which("gfortran")
    if path is not None:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail("gfortran is missing but this machine can install it: run `make install` (apt-get install -y "
                    "gfortran)")
    pytest.skip("no gfortran on PATH, and no root/apt-get here to install it (make install does where it can)")


def build(source: str | Path, folder: Path, name: str) -> str:
    """Compile a Fortran source file (a Path) or source text (a str) with gfortran; the executable's path."""
    src = source if isinstance(source, Path) else folder / f"{name}.f90"
    if not isinstance(source, Path):
        src.write_text(source)
    exe = folder / name
    subprocess.run([gfortran(), "-O2", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=120)
    return str(exe)


@pytest.fixture(scope="module")
def matsolve(tmp_path_factory) -> str:
    return build(SOURCE, tmp_path_factory.mktemp("fortran"), "legacy_matsolve")


@pytest.fixture
def runs(tmp_path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def F(X, A, B):
    return A @ X + 0.1 * X**3 - B


def program(matsolve: str, runs: Path, **kwargs) -> bbd.Executable:
    options = {"input_order": "F", "output_order": "F", "output_shape": (3, 2), "output_format": "3D24.16", **kwargs}
    return bbd.Executable([matsolve, "{input}", "{output}"], io="text", timeout=20, workdir=runs, **options)


def reference(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The same equations solved in numpy (Newton from 0, then polished): an independent reference."""
    X = np.zeros_like(B)
    for _ in range(60):
        for j in range(B.shape[1]):
            x = X[:, j]
            X[:, j] = x - np.linalg.solve(A + 0.3 * np.diag(x**2), A @ x + 0.1 * x**3 - B[:, j])
    return X


def test_forward_matches_an_independent_solve(matsolve, runs):
    X = program(matsolve, runs)(A0, B0)
    np.testing.assert_allclose(X, reference(A0, B0), rtol=1e-13, atol=1e-14)
    assert os.listdir(runs) == []


def test_gradient_matches_central_differences_of_the_program(matsolve, runs):
    exe = program(matsolve, runs)
    solve = bbd.implicit(bbd.Root(F))(exe)
    A = torch.tensor(A0, requires_grad=True)
    B = torch.tensor(B0, requires_grad=True)
    W = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])
    (solve(A, B) * W).sum().backward()

    def loss(a, b):
        return float((exe(a, b) * W.numpy()).sum())

    h = 1e-6
    for grad, base, which in ((A.grad, A0, 0), (B.grad, B0, 1)):
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            step = np.zeros_like(base)
            step[idx] = h
            args_p = [A0, B0]
            args_m = [A0, B0]
            args_p[which], args_m[which] = base + step, base - step
            fd[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        np.testing.assert_allclose(grad.numpy(), fd, atol=1e-8)
    assert os.listdir(runs) == []


def test_c_order_hands_the_program_a_transposed_matrix_and_certification_says_so(matsolve, runs):
    exe = program(matsolve, runs, input_order="C")
    with pytest.raises(bbd.CertificationError, match=re.escape("does not satisfy the Root condition")):
        bbd.implicit(bbd.Root(F))(exe)(torch.tensor(A0), torch.tensor(B0))
    # What it solved is the system of the transposed matrices (B is 3x2: its C-order numbers refill
    # a Fortran 3x2 column by column, a different matrix again).
    flat_b = B0.reshape(-1).reshape(3, 2, order="F")
    np.testing.assert_allclose(exe(A0, B0), reference(A0.T, flat_b), rtol=1e-12, atol=1e-13)


def test_a_batch_through_a_process_pool_with_one_failing_instance(matsolve, runs):
    exe = program(matsolve, runs)
    solve = bbd.implicit(bbd.Root(F), in_dims=(0, None), executor="processes", max_workers=2,
                         on_failure="nan")(exe)
    As = torch.tensor(np.stack([A0, np.zeros((3, 3)), A0.T, 2 * A0]), requires_grad=True)  # 1: singular
    B = torch.tensor(B0, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=re.escape("legacy_matsolve: singular Jacobian")):
        X = solve(As, B)
    assert torch.isnan(X[1]).all()
    for i in (0, 2, 3):
        np.testing.assert_allclose(X[i].detach().numpy(), reference(As[i].detach().numpy(), B0), rtol=1e-12,
                                   atol=1e-13)
    X[[0, 2, 3]].sum().backward()
    # Closed-form IFT per instance: dX/dB = J^-1 per column with J = A + 0.3 diag(x^2).
    expected_b = sum(
        np.stack([np.linalg.solve((As[i].detach().numpy() + 0.3 * np.diag(x**2)).T, np.ones(3))
                  for x in X[i].detach().numpy().T], axis=1)
        for i in (0, 2, 3)
    )
    np.testing.assert_allclose(B.grad.numpy(), expected_b, rtol=1e-10)
    assert torch.all(As.grad[1] == 0)
    assert os.listdir(runs) == []


def test_a_failing_fortran_stop_is_a_solver_error_with_its_message(matsolve, runs):
    with pytest.raises(bbd.SolverError, match=re.escape("exited with status 3 (exit code 3)")) as info:
        program(matsolve, runs)(np.zeros((3, 3)), B0)
    assert "legacy_matsolve: singular Jacobian" in info.value.stderr_tail


# --- what gfortran writes, read as it is --------------------------------------------------------------------
SPECIALS = """
program specials
  implicit none
  double precision :: x(3), zero
  character(len=4096) :: output
  call get_command_argument(1, output)
  zero = 0.0d0
  x = [2.0d0, -1.0d-300, 1.0d300]
  open (11, file=trim(output), status='replace')
  select case (OUTFORM)
  case (1)
    write (11, '(3D24.16)') x
  case (2)
    write (11, '(3ES23.16)') -x
  case (3)
    write (11, *) x(1), 1.0d0/zero, x(3)
  case (4)
    write (11, '(3F12.6)') x(1), zero/zero, x(1)
  end select
end program
"""


@pytest.mark.parametrize(
    ("form", "fmt", "expected"),
    [
        (1, "3D24.16", [2.0, -1e-300, 1e300]),  # 0.2000000000000000D+01 -0.1000000000000000-299 ...
        (2, "3ES23.16", [-2.0, 1e-300, -1e300]),  # fields that touch: -2.0000000000000000E+00 1.0...-300-1.0...+300
        (1, None, [2.0, -1e-300, 1e300]),  # free format reads the same D24.16 line
    ],
    ids=["D24.16", "ES23.16-touching", "D24.16-free"],
)
def test_gfortran_number_forms_read_exactly(tmp_path, runs, form, fmt, expected):
    exe_path = build(SPECIALS.replace("OUTFORM", str(form)), tmp_path, f"specials{form}")
    exe = bbd.Executable([exe_path, "{output}"], io="text", output_format=fmt, workdir=runs)
    assert exe().tolist() == expected


@pytest.mark.parametrize(("form", "shown"), [(3, "[2.0, inf, 1e+300]"), (4, "[2.0, nan, 2.0]")],
                         ids=["Infinity", "NaN"])
def test_gfortran_infinity_and_nan_are_reported_as_non_finite(tmp_path, runs, form, shown):
    exe_path = build(SPECIALS.replace("OUTFORM", str(form)), tmp_path, f"specials{form}")
    exe = bbd.Executable([exe_path, "{output}"], io="text", output_format="3F12.6" if form == 4 else None,
                         workdir=runs)
    with pytest.raises(bbd.SolverError, match=re.escape(f"wrote NaN or Inf: {shown}")):
        exe()
