"""Tests of the batched linear-solver kernels in ``blackbox_diff.linalg`` (float64 unless stated)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from blackbox_diff.linalg import (
    LinearSolution,
    bicgstab,
    cg,
    dense_solve,
    gmres,
    lstsq_solve,
    materialize,
    minres,
    neumann,
)

DT = torch.float64
B = 5
ITERATIVE = [cg, minres, gmres, bicgstab, neumann]


# ---------------------------------------------------------------- problem zoo


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(batch: int, n: int, g: torch.Generator, dtype=DT) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=dtype))
    return Q


def _with_spectrum(eigenvalues: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Symmetric matrices Q diag(eigenvalues) Q^T with random orthogonal Q."""
    Q = _orthogonal(eigenvalues.shape[0], eigenvalues.shape[1], g, eigenvalues.dtype)
    return Q @ torch.diag_embed(eigenvalues) @ Q.mT


def spd(batch: int, n: int, g: torch.Generator, cond: float = 100.0, dtype=DT) -> torch.Tensor:
    eig = 1.0 + (cond - 1.0) * torch.rand(batch, n, generator=g, dtype=dtype)
    return _with_spectrum(eig, g)


def indefinite(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    size = 1.0 + 9.0 * torch.rand(batch, n, generator=g, dtype=DT)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT)  # both signs whenever n > 1
    return _with_spectrum(size * sign, g)


def nonsymmetric(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    return 3.0 * torch.eye(n, dtype=DT) + torch.randn(batch, n, n, generator=g, dtype=DT) / math.sqrt(n)


def contraction(batch: int, n: int, g: torch.Generator, norm: float = 0.5) -> torch.Tensor:
    """I - M with ||M||_2 = norm < 1 (nonsymmetric M)."""
    M = torch.randn(batch, n, n, generator=g, dtype=DT)
    M = norm * M / torch.linalg.matrix_norm(M, ord=2)[:, None, None]
    return torch.eye(n, dtype=DT) - M


def symmetric_contraction(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """I - M with symmetric M, ||M||_2 <= 0.5: symmetric positive definite as well."""
    return _with_spectrum(1.0 - 0.5 * (2.0 * torch.rand(batch, n, generator=g, dtype=DT) - 1.0), g)


def matvec_of(A: torch.Tensor):
    return lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)


def relative_error(x: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x - expected, dim=-1) / torch.linalg.vector_norm(expected, dim=-1)


def true_residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(b - (A @ x.unsqueeze(-1)).squeeze(-1), dim=-1)


ZOO = {
    "spd": (spd, [cg, minres, gmres, bicgstab]),
    "indefinite": (indefinite, [minres, gmres, bicgstab]),
    "nonsymmetric": (nonsymmetric, [gmres, bicgstab]),
    "contraction": (contraction, [neumann, gmres, bicgstab]),
    "symmetric-contraction": (symmetric_contraction, [neumann, cg, minres, gmres, bicgstab]),
}
CASES = [
    pytest.param(kind, solver, n, id=f"{solver.__name__}-{kind}-n{n}")
    for kind, (_, solvers) in ZOO.items()
    for solver in solvers
    for n in (1, 7, 40)
]


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(("kind", "solver", "n"), CASES)
def test_iterative_solver_matches_dense_solve(kind, solver, n):
    g = _rng(n)
    A = ZOO[kind][0](B, n, g)
    b = torch.randn(B, n, generator=g, dtype=DT)
    sol = solver(matvec_of(A), b)
    expected = torch.linalg.solve(A, b)

    assert isinstance(sol, LinearSolution)
    assert sol.method == solver.__name__
    assert sol.all_converged, sol.summary()
    assert not sol.breakdown.any()
    assert relative_error(sol.x, expected).max().item() <= 1e-8
    # residual_norm is the true residual of the returned x, within the documented criterion.
    torch.testing.assert_close(sol.residual_norm, true_residual(A, sol.x, b), rtol=1e-6, atol=1e-14)
    assert (sol.residual_norm <= 1e-10 * torch.linalg.vector_norm(b, dim=-1)).all()
    assert sol.x.shape == (B, n) and sol.x.dtype == DT
    assert sol.iterations.dtype == torch.int64 and (sol.iterations >= 1).all()
    assert sol.converged.dtype == torch.bool and sol.breakdown.dtype == torch.bool


@pytest.mark.parametrize("kind", list(ZOO))
@pytest.mark.parametrize("direct", [dense_solve, lstsq_solve], ids=["dense", "lstsq"])
def test_direct_solver_matches_dense_solve(kind, direct):
    g = _rng(3)
    A = ZOO[kind][0](B, 7, g)
    b = torch.randn(B, 7, generator=g, dtype=DT)
    sol = direct(A, b)
    assert sol.all_converged, sol.summary()
    assert relative_error(sol.x, torch.linalg.solve(A, b)).max().item() <= 1e-12
    assert (sol.iterations == 0).all()


@pytest.mark.parametrize("solver", ITERATIVE)
def test_single_instance_batch(solver):
    A = symmetric_contraction(1, 6, _rng(11))
    b = torch.randn(1, 6, generator=_rng(12), dtype=DT)
    sol = solver(matvec_of(A), b)
    assert sol.all_converged
    assert relative_error(sol.x, torch.linalg.solve(A, b)).item() <= 1e-8


# ---------------------------------------------------------------- per-instance masks


def _easy_and_hard(solver, n: int = 40):
    """Instance 0 is the identity (one step); instance 1 is hard for the given solver."""
    g = _rng(21)
    if solver is neumann:
        hard = contraction(1, n, g, norm=0.9)[0]  # needs ~ log(1e-10) / log(0.9) = 220 steps
    else:
        hard = spd(1, n, g, cond=1e4)[0]
    A = torch.stack([torch.eye(n, dtype=DT), hard])
    b = torch.randn(2, n, generator=g, dtype=DT)
    return A, b


@pytest.mark.parametrize("solver", ITERATIVE)
def test_instances_converge_independently(solver):
    A, b = _easy_and_hard(solver)
    sol = solver(matvec_of(A), b)
    assert sol.converged.tolist() == [True, True], sol.summary()
    assert sol.iterations[0].item() == 1
    assert sol.iterations[1].item() > 10
    # The easy instance was frozen once converged: exactly what it gets when solved alone.
    alone = solver(matvec_of(A[:1]), b[:1])
    assert torch.equal(sol.x[0], alone.x[0])
    torch.testing.assert_close(sol.x[0], b[0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_max_steps_too_small_fails_only_the_hard_instance(solver):
    A, b = _easy_and_hard(solver)
    sol = solver(matvec_of(A), b, max_steps=3)
    assert sol.converged.tolist() == [True, False]
    assert sol.iterations.tolist() == [1, 3]
    assert not sol.breakdown.any()
    assert torch.isfinite(sol.x).all()
    assert sol.residual_norm[1] > 1e-10 * torch.linalg.vector_norm(b[1])
    assert "1/2 converged" in sol.summary() and "not converged: [1]" in sol.summary()


@pytest.mark.parametrize("solver", ITERATIVE)
def test_non_finite_operator_output_does_not_poison_the_batch(solver):
    A = symmetric_contraction(3, 8, _rng(31))
    b = torch.randn(3, 8, generator=_rng(32), dtype=DT)

    def poisoned(v):
        out = (A @ v.unsqueeze(-1)).squeeze(-1)
        return torch.cat([out[:1], torch.full_like(out[1:2], math.nan), out[2:]])

    sol = solver(poisoned, b)
    assert sol.converged.tolist() == [True, False, True]
    assert sol.breakdown.tolist() == [False, True, False]
    assert torch.isfinite(sol.x).all()
    expected = torch.linalg.solve(A, b)
    assert relative_error(sol.x[[0, 2]], expected[[0, 2]]).max().item() <= 1e-8


# ---------------------------------------------------------------- breakdowns


def test_cg_reports_breakdown_on_indefinite_matrices():
    g = _rng(41)
    A = torch.stack(
        [
            spd(1, 4, g)[0],
            -spd(1, 4, g)[0],  # negative definite: <p, A p> < 0 at once
            torch.diag(torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=DT)),  # <b, A b> = 0 exactly
        ]
    )
    b = torch.cat([torch.randn(2, 4, generator=g, dtype=DT), torch.ones(1, 4, dtype=DT)])
    sol = cg(matvec_of(A), b)
    assert sol.converged.tolist() == [True, False, False]
    assert sol.breakdown.tolist() == [False, True, True]
    assert torch.isfinite(sol.x).all()
    assert "breakdown: [1, 2]" in sol.summary()


@pytest.mark.parametrize("solver", [cg, minres, gmres, bicgstab])
def test_eigenvector_rhs_converges_in_one_step(solver):
    # The Krylov space is invariant after one step (lucky breakdown): converged, not a breakdown.
    A = torch.diag(torch.arange(1.0, 6.0, dtype=DT)).expand(3, 5, 5)
    b = 3.0 * torch.eye(5, dtype=DT)[:3]
    sol = solver(matvec_of(A), b)
    assert sol.all_converged and not sol.breakdown.any()
    assert sol.iterations.tolist() == [1, 1, 1]
    torch.testing.assert_close(sol.x, b / torch.tensor([[1.0], [2.0], [3.0]], dtype=DT))


@pytest.mark.parametrize("solver", [cg, minres, gmres, bicgstab])
def test_singular_systems(solver):
    A = torch.stack(
        [
            torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT)),  # b in the range: solvable
            torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=DT)),  # b not in the range
        ]
    )
    b = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=DT)
    sol = solver(matvec_of(A), b)
    assert sol.converged.tolist() == [True, False]
    assert sol.breakdown.tolist() == [False, True]
    torch.testing.assert_close(sol.x[0], torch.tensor([1.0, 0.5, 0.0], dtype=DT))
    assert sol.x.abs().max().item() < 10.0  # no huge garbage update from a round-off pivot


def test_neumann_reports_divergence_and_returns_best_iterate():
    g = _rng(42)
    n = 6
    Q = _orthogonal(1, n, g)[0]
    A = torch.stack(
        [
            torch.eye(n, dtype=DT) - 2.0 * Q,  # ||I - A|| = 2: the residual doubles every step
            torch.eye(n, dtype=DT) - 1e200 * Q,  # overflows to inf within two steps
            contraction(1, n, g)[0],
        ]
    )
    b = torch.randn(3, n, generator=g, dtype=DT)
    sol = neumann(matvec_of(A), b)
    assert sol.breakdown.tolist() == [True, True, False]
    assert sol.converged.tolist() == [False, False, True]
    assert torch.isfinite(sol.x).all() and torch.isfinite(sol.residual_norm).all()
    # The best iterate of a diverging series is the start, x0 = 0.
    assert torch.equal(sol.x[:2], torch.zeros(2, n, dtype=DT))
    assert sol.iterations[0].item() == 10  # default patience
    assert sol.iterations[1].item() <= 3


def test_neumann_patience_is_configurable():
    A = (1.0 - 1.5) * torch.eye(3, dtype=DT).expand(1, 3, 3)  # I - A = 1.5 I
    sol = neumann(matvec_of(A), torch.ones(1, 3, dtype=DT), patience=2)
    assert sol.breakdown.item() and sol.iterations.item() == 2


def test_dense_solve_flags_singular_instances_only():
    g = _rng(51)
    n = 6
    A = spd(4, n, g)
    low_rank = torch.randn(n, n - 1, generator=g, dtype=DT) @ torch.randn(n - 1, n, generator=g, dtype=DT)
    A[1] = low_rank  # singular to working precision
    A[2] = 0.0  # exactly singular: zero pivot
    A[3, 0, 0] = math.nan  # non-finite input
    A = torch.cat([A, spd(1, n, g)])
    b = torch.randn(5, n, generator=g, dtype=DT)
    sol = dense_solve(A, b)
    assert sol.converged.tolist() == [True, False, False, False, True]
    assert sol.breakdown.tolist() == [False, True, True, True, False]
    assert torch.equal(sol.x[1:4], torch.zeros(3, n, dtype=DT))
    expected = torch.linalg.solve(A[[0, 4]], b[[0, 4]])
    assert relative_error(sol.x[[0, 4]], expected).max().item() <= 1e-12
    torch.testing.assert_close(sol.residual_norm[1:4], torch.linalg.vector_norm(b[1:4], dim=-1))


def test_dense_solve_singular_with_zero_rhs_is_solved_by_zero():
    sol = dense_solve(torch.zeros(1, 3, 3, dtype=DT), torch.zeros(1, 3, dtype=DT))
    assert sol.converged.item() and sol.breakdown.item()
    assert torch.equal(sol.x, torch.zeros(1, 3, dtype=DT))


# ---------------------------------------------------------------- least squares


def _rank_deficient(batch: int, m: int, n: int, rank: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, m, rank, generator=g, dtype=DT) @ torch.randn(
        batch, rank, n, generator=g, dtype=DT
    )


@pytest.mark.parametrize(("m", "n"), [(6, 6), (8, 5), (4, 7)], ids=["square", "tall", "wide"])
def test_lstsq_returns_minimum_norm_solution_of_consistent_rank_deficient_system(m, n):
    g = _rng(61)
    A = _rank_deficient(B, m, n, 3, g)
    b = (A @ torch.randn(B, n, 1, generator=g, dtype=DT)).squeeze(-1)
    sol = lstsq_solve(A, b)
    expected = (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)
    assert sol.all_converged, sol.summary()
    assert relative_error(sol.x, expected).max().item() <= 1e-10
    assert sol.x.shape == (B, n)
    # Minimum norm: x lies in the row space of A, i.e. orthogonal to its null space.
    _, _, Vh = torch.linalg.svd(A)
    null_space = Vh[:, 3:, :]
    assert (null_space @ sol.x.unsqueeze(-1)).abs().max().item() <= 1e-10


def test_lstsq_inconsistent_system_is_least_squares_but_not_converged():
    g = _rng(62)
    A = _rank_deficient(2, 6, 6, 2, g)
    b = torch.randn(2, 6, generator=g, dtype=DT)
    sol = lstsq_solve(A, b)
    assert sol.converged.tolist() == [False, False]
    assert not sol.breakdown.any()
    expected = (torch.linalg.pinv(A) @ b.unsqueeze(-1)).squeeze(-1)
    assert relative_error(sol.x, expected).max().item() <= 1e-10
    # Normal equations hold at a least-squares solution.
    normal = A.mT @ (b - (A @ sol.x.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)
    assert normal.abs().max().item() <= 1e-10


def test_lstsq_rcond_truncates_small_singular_values():
    A = torch.diag(torch.tensor([1.0, 1e-9], dtype=DT)).unsqueeze(0)
    b = torch.ones(1, 2, dtype=DT)
    assert lstsq_solve(A, b).x[0, 1].item() == pytest.approx(1e9)
    truncated = lstsq_solve(A, b, rcond=1e-6)
    assert truncated.x[0].tolist() == pytest.approx([1.0, 0.0])
    assert not truncated.converged.item()


# ---------------------------------------------------------------- materialize


@pytest.mark.parametrize("n", [1, 7, 300])
def test_materialize_with_batched_matvec(n):
    A = torch.randn(2, n, n, generator=_rng(71), dtype=DT)
    calls = []

    def batched(V):
        calls.append(V.shape[0])
        return torch.einsum("bij,kbj->kbi", A, V)

    M = materialize(matvec_of(A), n, batch=2, dtype=DT, device="cpu", batched_matvec=batched)
    assert torch.equal(M, A)
    assert calls == [min(n - start, 256) for start in range(0, n, 256)]


def test_materialize_with_vmap():
    A = torch.randn(3, 7, 7, generator=_rng(72), dtype=DT)
    calls = []

    def matvec(v):
        calls.append(1)
        return matvec_of(A)(v)

    M = materialize(matvec, 7, batch=3, dtype=DT, device="cpu")
    assert torch.equal(M, A)
    assert len(calls) == 1  # one vectorised call


def test_materialize_falls_back_to_a_loop_when_vmap_fails():
    A = torch.randn(3, 7, 7, generator=_rng(73), dtype=DT)
    calls = []

    def matvec(v):
        calls.append(1)
        scale = 1.0 if v.abs().max().item() >= 0 else 0.0  # .item() is not vmap-able
        return scale * matvec_of(A)(v)

    M = materialize(matvec, 7, batch=3, dtype=DT, device="cpu")
    torch.testing.assert_close(M, A, rtol=0, atol=0)
    assert len(calls) == 1 + 7  # the failed vmap attempt, then one call per column


def test_materialize_feeds_dense_solve():
    A = spd(2, 5, _rng(74))
    b = torch.randn(2, 5, generator=_rng(75), dtype=DT)
    M = materialize(matvec_of(A), 5, batch=2, dtype=DT, device="cpu")
    assert relative_error(dense_solve(M, b).x, torch.linalg.solve(A, b)).max().item() <= 1e-12


# ---------------------------------------------------------------- starting points, rhs, dtypes


@pytest.mark.parametrize("solver", ITERATIVE)
def test_good_starting_point_saves_iterations(solver):
    g = _rng(81)
    A = symmetric_contraction(B, 40, g) if solver is neumann else spd(B, 40, g)
    b = torch.randn(B, 40, generator=g, dtype=DT)
    exact = torch.linalg.solve(A, b)
    cold = solver(matvec_of(A), b)
    warm = solver(matvec_of(A), b, x0=exact + 1e-6 * torch.randn(B, 40, generator=g, dtype=DT))
    assert warm.all_converged and cold.all_converged
    assert (warm.iterations < cold.iterations).all(), (warm.iterations, cold.iterations)
    assert relative_error(warm.x, exact).max().item() <= 1e-8
    at_solution = solver(matvec_of(A), b, x0=exact)
    assert at_solution.all_converged and (at_solution.iterations == 0).all()


@pytest.mark.parametrize("solver", ITERATIVE)
def test_zero_rhs_gives_zero_solution_without_iterating(solver):
    A = spd(3, 4, _rng(82))
    b = torch.randn(3, 4, generator=_rng(83), dtype=DT)
    b[1] = 0.0
    sol = solver(matvec_of(A), b) if solver is not neumann else solver(matvec_of(torch.eye(4, dtype=DT)), b)
    assert sol.converged.all()
    assert sol.iterations[1].item() == 0
    assert torch.equal(sol.x[1], torch.zeros(4, dtype=DT))
    assert sol.residual_norm[1].item() == 0.0


@pytest.mark.parametrize("solver", [*ITERATIVE, dense_solve, lstsq_solve])
def test_float32(solver):
    g = _rng(84)
    A = symmetric_contraction(B, 20, g).float()
    b = torch.randn(B, 20, generator=g, dtype=DT).float()
    if solver in (dense_solve, lstsq_solve):
        sol = solver(A, b)
    else:
        sol = solver(matvec_of(A), b, rtol=1e-5)
    assert sol.x.dtype == torch.float32 and sol.residual_norm.dtype == torch.float32
    assert sol.all_converged, sol.summary()
    expected = torch.linalg.solve(A.double(), b.double())
    assert relative_error(sol.x.double(), expected).max().item() <= 1e-3


def test_atol_stops_early():
    A = spd(2, 30, _rng(85))
    b = torch.randn(2, 30, generator=_rng(86), dtype=DT)
    loose = cg(matvec_of(A), b, rtol=0.0, atol=1e-2)
    tight = cg(matvec_of(A), b)
    assert loose.all_converged and (loose.residual_norm <= 1e-2).all()
    assert (loose.iterations < tight.iterations).all()


def test_gmres_restart_and_max_steps_count_matvecs():
    A = nonsymmetric(2, 30, _rng(87))
    b = torch.randn(2, 30, generator=_rng(88), dtype=DT)
    calls = []

    def matvec(v):
        calls.append(1)
        return matvec_of(A)(v)

    sol = gmres(matvec, b, restart=5)
    assert sol.all_converged, sol.summary()
    assert relative_error(sol.x, torch.linalg.solve(A, b)).max().item() <= 1e-8
    # One residual per restart plus the final one are not counted in iterations.
    assert sol.iterations.max().item() < len(calls)
    capped = gmres(matvec_of(A), b, restart=5, max_steps=12)
    assert capped.iterations.tolist() == [12, 12] and not capped.converged.any()


@pytest.mark.parametrize("solver", [*ITERATIVE, dense_solve, lstsq_solve])
def test_autograd_runs_through_the_solvers(solver):
    # Needed when the engine differentiates its own backward (create_graph=True).
    A = symmetric_contraction(2, 5, _rng(89))
    b = torch.randn(2, 5, generator=_rng(90), dtype=DT, requires_grad=True)
    sol = solver(A, b) if solver in (dense_solve, lstsq_solve) else solver(matvec_of(A), b)
    (grad,) = torch.autograd.grad(sol.x.sum(), b)
    expected = torch.linalg.solve(A.mT, torch.ones(2, 5, dtype=DT))
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)
    assert sol.summary().startswith(f"{sol.method}: 2/2 converged")


@pytest.mark.parametrize("solver", [*ITERATIVE, dense_solve, lstsq_solve])
@pytest.mark.parametrize(("batch", "n"), [(0, 3), (2, 0)], ids=["empty-batch", "empty-system"])
def test_empty_problems_are_solved_trivially(solver, batch, n):
    A = torch.zeros(batch, n, n, dtype=DT)
    b = torch.zeros(batch, n, dtype=DT)
    sol = solver(A, b) if solver in (dense_solve, lstsq_solve) else solver(matvec_of(A), b)
    assert sol.x.shape == (batch, n)
    assert sol.converged.shape == (batch,) and sol.converged.all()
    assert sol.summary().startswith(f"{sol.method}: {batch}/{batch} converged")
    assert materialize(matvec_of(A), n, batch=batch, dtype=DT, device="cpu").shape == (batch, n, n)


# ---------------------------------------------------------------- the result type


def test_linear_solution_is_frozen_and_summarises():
    sol = cg(matvec_of(spd(2, 3, _rng(91))), torch.ones(2, 3, dtype=DT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sol.method = "other"  # type: ignore[misc]
    assert sol.all_converged is True
    assert sol.batch_size == 2
    assert sol.summary().startswith("cg: 2/2 converged, iterations ")


# ---------------------------------------------------------------- validation


def _ok_b():
    return torch.ones(2, 3, dtype=DT)


def _identity(v):
    return v


@pytest.mark.parametrize("solver", ITERATIVE)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rtol": -1.0}, "rtol: expected a finite real number >= 0, got -1.0"),
        ({"atol": math.inf}, "atol: expected a finite real number >= 0, got inf"),
        ({"max_steps": 0}, "max_steps: expected an integer >= 1 or None, got 0"),
        ({"max_steps": 2.5}, "max_steps: expected an integer >= 1 or None, got 2.5"),
        ({"x0": torch.ones(3, dtype=DT)}, "x0: expected shape (2, 3) (the shape of b), got (3,)"),
        (
            {"x0": torch.ones(2, 3, dtype=torch.float32)},
            "x0: expected dtype torch.float64 on cpu (those of b), got torch.float32 on cpu",
        ),
    ],
    ids=["rtol", "atol", "max_steps-zero", "max_steps-float", "x0-shape", "x0-dtype"],
)
def test_settings_are_validated(solver, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        solver(_identity, _ok_b(), **kwargs)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_rhs_and_operator_are_validated(solver):
    with pytest.raises(ValueError, match=re.escape("b: expected shape (B, n), one row per instance")):
        solver(_identity, torch.ones(3, dtype=DT))
    for dtype in (torch.int64, torch.float16):
        with pytest.raises(
            ValueError,
            match=re.escape(f"b: expected a real floating-point tensor (float32 or float64), got {dtype}"),
        ):
            solver(_identity, torch.ones(2, 3, dtype=dtype))
    with pytest.raises(
        ValueError, match=re.escape("matvec: expected a callable mapping (B, n) -> (B, n), got NoneType")
    ):
        solver(None, _ok_b())
    with pytest.raises(ValueError, match=re.escape("matvec: expected an output of shape (2, 3)")):
        solver(lambda v: v[:, :2], _ok_b())
    with pytest.raises(ValueError, match=re.escape("matvec: expected an output of dtype torch.float64")):
        solver(lambda v: v.float(), _ok_b())


def test_solver_specific_settings_are_validated():
    with pytest.raises(ValueError, match=re.escape("restart: expected an integer >= 1 or None, got 0")):
        gmres(_identity, _ok_b(), restart=0)
    with pytest.raises(ValueError, match=re.escape("patience: expected an integer >= 1 or None, got 0")):
        neumann(_identity, _ok_b(), patience=0)


def test_direct_solver_arguments_are_validated():
    with pytest.raises(ValueError, match=re.escape("A: expected shape (B, n, n) with B = 2 and rows = 3")):
        dense_solve(torch.ones(2, 3, 4, dtype=DT), _ok_b())
    with pytest.raises(ValueError, match=re.escape("A: expected shape (B, m, n) with B = 2 and rows = 3")):
        lstsq_solve(torch.ones(2, 4, 4, dtype=DT), _ok_b())
    with pytest.raises(ValueError, match=re.escape("A: expected dtype torch.float64 on cpu (those of b)")):
        dense_solve(torch.ones(2, 3, 3, dtype=torch.float32), _ok_b())
    with pytest.raises(ValueError, match=re.escape("rcond: expected a finite real number >= 0, got -0.1")):
        lstsq_solve(torch.ones(2, 3, 3, dtype=DT), _ok_b(), rcond=-0.1)
    with pytest.raises(ValueError, match=re.escape("n: expected an integer >= 0, got -1")):
        materialize(_identity, -1, batch=1, dtype=DT, device="cpu")
    with pytest.raises(
        ValueError, match=re.escape("dtype: expected a floating-point torch.dtype, got torch.int64")
    ):
        materialize(_identity, 2, batch=1, dtype=torch.int64, device="cpu")
    with pytest.raises(ValueError, match=re.escape("batched_matvec: expected outputs of shape (2, 3)")):
        materialize(_identity, 3, batch=2, dtype=DT, device="cpu", batched_matvec=lambda V: V[:, :1])


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", [cg, minres, gmres, bicgstab, neumann])
def test_iterative_solvers_on_cuda(solver):
    A = symmetric_contraction(B, 40, _rng(101)).cuda()
    b = torch.randn(B, 40, generator=_rng(102), dtype=DT).cuda()
    sol = solver(matvec_of(A), b)
    assert sol.x.device.type == "cuda" and sol.converged.device.type == "cuda"
    assert sol.all_converged, sol.summary()
    assert relative_error(sol.x, torch.linalg.solve(A, b)).max().item() <= 1e-8


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_direct_solvers_and_materialize_on_cuda():
    g = _rng(103)
    A = spd(3, 6, g).cuda()
    A[1] = 0.0
    b = torch.randn(3, 6, generator=g, dtype=DT).cuda()
    sol = dense_solve(A, b)
    assert sol.converged.tolist() == [True, False, True]
    R = _rank_deficient(2, 6, 6, 3, g).cuda()
    rhs = (R @ torch.randn(2, 6, 1, generator=g, dtype=DT).cuda()).squeeze(-1)
    lsq = lstsq_solve(R, rhs)
    assert lsq.all_converged and lsq.x.device.type == "cuda"
    expected = (torch.linalg.pinv(R.cpu()) @ rhs.cpu().unsqueeze(-1)).squeeze(-1)
    assert relative_error(lsq.x.cpu(), expected).max().item() <= 1e-8
    M = materialize(matvec_of(A), 6, batch=3, dtype=DT, device=A.device)
    assert M.device.type == "cuda"
    torch.testing.assert_close(M, A, rtol=0, atol=1e-14)
