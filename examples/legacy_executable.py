"""Differentiate legacy executables: a compiled C Newton solver and a Fortran matrix solver, as they are.

The program tests/legacy/newton3.c solves a 3-equation nonlinear system F(x; p, a) = 0 with its own
Newton iteration and reads its parameters from an input file, as legacy codes do. It is compiled here with
the system C compiler, run through `bbd.Executable` (private temp dir, timeout, no shell), and
differentiated with the implicit function theorem from the same F written in torch. The script

1. checks the implicit gradient against central finite differences of the program itself,
2. calibrates the coupling coefficient `a` from observed solutions (L-BFGS; a batch of runs in parallel),
3. builds examples/legacy_matsolve.f90 with gfortran: a Fortran program that reads a matrix A and a
   right-hand side B column by column (list-directed read) and writes its solution X of
   A X + 0.1 X**3 = B with a D24.16 format. `input_order="F"`, `output_order="F"` and
   `output_format="3D24.16"` take it as it is; its gradient with respect to the matrix is checked against
   central differences of the program, and a batch of right-hand sides runs through a process pool,

printing a table for each. Run: ``python examples/legacy_executable.py [--fast]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import blackbox_diff as bbd

SOURCE = Path(__file__).resolve().parent.parent / "tests" / "legacy" / "newton3.c"
FORTRAN_SOURCE = Path(__file__).resolve().parent / "legacy_matsolve.f90"


def F(x: torch.Tensor, p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The program's equations, in torch: the optimality condition its answer satisfies."""
    return torch.stack([
        4 * x[0] + x[0] ** 3 + a * x[1] * x[2] - p[0],
        4 * x[1] + a * torch.sin(x[0]) + x[1] ** 3 - p[1],
        4 * x[2] + a * torch.tanh(x[0] - x[1]) + 0.5 * x[2] ** 3 - p[2],
    ])


def compile_program(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        sys.exit("This example needs a C compiler (cc, gcc or clang) on PATH to build the legacy program.")
    exe = workdir / "newton3"
    subprocess.run([cc, "-O2", "-o", str(exe), str(SOURCE), "-lm"], check=True)
    return exe


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def gradient_check(exe: bbd.Executable, instances: int) -> float:
    """Implicit gradient of L = x . c with respect to (p, a) vs central differences of the program."""
    solve = bbd.implicit(bbd.Root(F))(exe)
    rng = np.random.default_rng(0)
    c = np.array([1.0, -2.0, 0.5])
    rows, worst = [], 0.0
    for i in range(instances):
        p0, a0 = rng.uniform(-3, 3, size=3), rng.uniform(0.2, 1.0)
        p = torch.tensor(p0, requires_grad=True)
        a = torch.tensor(a0, requires_grad=True)
        (solve(p, a) @ torch.as_tensor(c)).backward()

        def loss(pp, aa):
            return float(exe(pp, np.asarray(aa)) @ c)

        h = 1e-6
        fd_a = (loss(p0, a0 + h) - loss(p0, a0 - h)) / (2 * h)
        fd_p = np.array([(loss(p0 + h * e, a0) - loss(p0 - h * e, a0)) / (2 * h) for e in np.eye(3)])
        err = max(abs(a.grad.item() - fd_a), float(np.abs(p.grad.numpy() - fd_p).max()))
        worst = max(worst, err)
        rows.append([str(i), f"{a0:.3f}", f"{a.grad.item():+.10f}", f"{fd_a:+.10f}", f"{err:.1e}"])
    print_table(["instance", "a", "dL/da (IFT)", "dL/da (FD of program)", "max |diff| (p, a)"], rows)
    return worst


def calibrate(exe: bbd.Executable, batch: int, steps: int) -> float:
    """Recover a_true = 0.8 from the solutions of a batch of runs, by L-BFGS on the implicit gradient."""
    layer = bbd.layer(exe, condition=bbd.Root(F), parameters=[(3,), ()], variables=[(3,)])
    P = torch.as_tensor(np.random.default_rng(1).uniform(-3, 3, size=(batch, 3)))
    with torch.no_grad():
        (observed,) = layer(P, torch.tensor(0.8))
    a = torch.tensor(0.2, requires_grad=True)
    # L-BFGS with a line search: each evaluation is one batch of program runs plus one adjoint solve
    opt = torch.optim.LBFGS([a], lr=1.0, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    rows = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        (X,) = layer(P, a)  # a is shared across the batch: its gradient is summed over the runs
        loss = ((X - observed) ** 2).mean()
        loss.backward()
        rows.append([str(len(rows)), f"{a.item():.8f}", f"{loss.item():.3e}", f"{a.grad.item():+.3e}"])
        return loss

    opt.step(closure)
    print_table(["evaluation", "a", "loss", "dloss/da"], rows)
    return abs(a.item() - 0.8)


def matsolve_residual(X: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The Fortran program's equations, per column of X and B: A x + 0.1 x**3 = b."""
    return A @ X + 0.1 * X**3 - B


def compile_fortran(workdir: Path) -> Path | None:
    gfortran = shutil.which("gfortran")
    if gfortran is None:
        return None
    exe = workdir / "legacy_matsolve"
    subprocess.run([gfortran, "-O2", "-o", str(exe), str(FORTRAN_SOURCE)], check=True)
    return exe


def fortran_gradient_check(exe: bbd.Executable) -> float:
    """Gradient of L = sum(W * X) with respect to the matrix A and to B vs central differences of the program."""
    A0 = np.array([[4.0, -1.0, 0.3], [1.0, 3.0, -0.4], [0.5, 0.2, 5.0]])  # not symmetric: order matters
    B0 = np.array([[1.0, -1.0], [2.0, 0.5], [3.0, -2.0]])
    W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])
    A, B = torch.tensor(A0, requires_grad=True), torch.tensor(B0, requires_grad=True)
    (bbd.implicit(bbd.Root(matsolve_residual))(exe)(A, B) * torch.as_tensor(W)).sum().backward()
    h, rows, worst = 1e-6, [], 0.0
    for name, base, grad in (("A", A0, A.grad.numpy()), ("B", B0, B.grad.numpy())):
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            step = np.zeros_like(base)
            step[idx] = h
            plus = exe(base + step, B0) if name == "A" else exe(A0, base + step)
            minus = exe(base - step, B0) if name == "A" else exe(A0, base - step)
            fd[idx] = ((plus - minus) * W).sum() / (2 * h)
        err = float(np.abs(grad - fd).max())
        worst = max(worst, err)
        rows.append([name, str(base.shape), f"{np.abs(grad).max():.6f}", f"{err:.1e}"])
    print_table(["parameter", "shape", "max |dL/d. (IFT)|", "max |IFT - FD of program|"], rows)
    return worst


def fortran_batch(exe: bbd.Executable, batch: int) -> float:
    """A batch of right-hand sides (A shared) through a process pool; compared with serial runs."""
    A = torch.tensor([[4.0, -1.0, 0.3], [1.0, 3.0, -0.4], [0.5, 0.2, 5.0]], requires_grad=True)
    Bs = torch.as_tensor(np.random.default_rng(2).uniform(-3, 3, size=(batch, 3, 2)))
    solve = bbd.implicit(bbd.Root(matsolve_residual), in_dims=(None, 0), executor="processes", max_workers=2)(exe)
    start = time.perf_counter()
    X = solve(A, Bs)
    X.square().sum().backward()  # one batched adjoint solve; A's gradient is summed over the batch
    elapsed = time.perf_counter() - start
    serial = np.stack([exe(A.detach().numpy(), b.numpy()) for b in Bs])
    diff = float(np.abs(X.detach().numpy() - serial).max())
    print_table(["runs", "pool", "max |pool - serial|", "max |dL/dA|", "seconds"],
                [[str(batch), "processes x2", f"{diff:.1e}", f"{A.grad.abs().max().item():.6f}", f"{elapsed:.2f}"]])
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer instances and steps")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    with tempfile.TemporaryDirectory() as tmp:
        program = compile_program(Path(tmp))
        exe = bbd.Executable([str(program), "{input}", "{output}"], io="text", timeout=30, output_shape=(3,))
        print(f"== gradient of the compiled Newton solver ({SOURCE.name}) vs its own finite differences")
        worst = gradient_check(exe, 2 if args.fast else 5)
        print(f"worst |IFT - FD| = {worst:.1e}\n")
        print("== calibrating the coupling a from observed solutions (batch of runs, threads in parallel)")
        start = time.perf_counter()
        error = calibrate(exe, 4 if args.fast else 16, 10 if args.fast else 20)
        print(f"|a - a_true| = {error:.2e}   ({time.perf_counter() - start:.1f} s)\n")
        fortran = compile_fortran(Path(tmp))
        if fortran is None:
            print("== Fortran part skipped: no gfortran on PATH (`make install` installs it)")
            return
        exe = bbd.Executable([str(fortran), "{input}", "{output}"], io="text", timeout=30, input_order="F",
                             output_order="F", output_shape=(3, 2), output_format="3D24.16")
        print(f"== gradient of the Fortran solver ({FORTRAN_SOURCE.name}: A read column by column, X written "
              "with D24.16) vs its own finite differences")
        print(f"Fortran: worst |IFT - FD| = {fortran_gradient_check(exe):.1e}\n")
        print("== a batch of right-hand sides through a process pool (A shared)")
        print(f"Fortran batch: max |pool - serial| = {fortran_batch(exe, 4 if args.fast else 16):.1e}")


if __name__ == "__main__":
    main()
