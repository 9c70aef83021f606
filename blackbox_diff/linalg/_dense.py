"""Dense batched solvers (LU, minimum-norm least squares) and materialising an operator as a matrix."""

from __future__ import annotations

import numbers

import torch

from ._krylov import Matvec, bnorm, check_rhs, check_tolerance
from ._result import LinearSolution, make_solution

__all__ = ["dense_solve", "lstsq_solve", "materialize"]

_CHUNK = 256
# vmap turns `A @ v` with a captured A into a broadcast matmul that copies A once per column of the
# chunk; a chunk is therefore capped at about this many bytes of such copies.
_VMAP_CHUNK_BYTES = 2**28
# vmap refuses data-dependent Python control flow, .item(), in-place ops on captured tensors, etc.;
# those surface as these types. Anything else from the operator is a real error and propagates.
_VMAP_FAILURES = (RuntimeError, NotImplementedError, TypeError, ValueError)


def dense_solve(
    A: torch.Tensor, b: torch.Tensor, *, rtol: float | None = None, atol: float = 0.0
) -> LinearSolution:
    """Solve ``A_i x_i = b_i`` for a batch of square matrices by LU with partial pivoting.

    Never raises for a numerically singular instance: an exact zero pivot, a pivot below n eps times the
    largest one (singular to working precision: the solution of a consistent singular system is arbitrary
    even though its residual is small), a non-finite entry in ``A_i``, ``b_i`` or ``x_i``, or a residual
    above the tolerance marks the instance as failed: ``x_i = 0``, ``breakdown = True``. ``converged`` is
    then evaluated on that zero (true only when ``b_i`` itself is within tolerance, e.g. ``b_i = 0``). The
    pivot test runs on the row- and column-equilibrated matrix, so it is blind to the units of rows and
    unknowns.

    Args:
        A: matrices, shape ``(B, n, n)``.
        b: right-hand sides, shape ``(B, n)``, same dtype and device as ``A``.
        rtol: relative tolerance for ``||b - A x|| <= max(rtol * ||b||, atol)``; ``None`` means
            ``sqrt(eps)`` of the dtype (about 1.5e-8 in float64, 3.5e-4 in float32).
        atol: absolute tolerance, ``>= 0``.

    Returns:
        A `LinearSolution` (``method="dense"``, ``iterations`` all 0) whose ``residual_norm`` is
        the true residual of the returned ``x``.

    Raises:
        ValueError: ``A`` or ``b`` has the wrong type, shape, dtype or device, or a tolerance is invalid.
    """
    A, b = _check_matrix_system(A, b, square=True)
    rtol, atol = _dense_tolerances(rtol, atol, b.dtype)
    bad_input, A_safe, b_safe = _sanitize(A, b)
    if A.shape[-1] == 0:
        return _package("dense", A, b, torch.zeros_like(b), ~bad_input, bad_input,
                        torch.clamp(rtol * bnorm(b), min=atol))
    # Equilibrated (rows, then columns, scaled to unit max) so that the pivot test below is blind to units:
    # (R A C) y = R b, x = C y.
    R = 1.0 / A_safe.abs().amax(dim=-1).clamp_min(torch.finfo(A.dtype).tiny)
    RA = A_safe * R[..., :, None]
    C = 1.0 / RA.abs().amax(dim=-2).clamp_min(torch.finfo(A.dtype).tiny)
    LU, pivots, info = torch.linalg.lu_factor_ex(RA * C[..., None, :])
    # A pivot below n eps of the largest is a numerically singular matrix: its solution is arbitrary along
    # the near null space even when the residual test passes (a consistent singular system), so it fails.
    diag = LU.diagonal(dim1=-2, dim2=-1).abs()
    n = A.shape[-1]
    top = diag.amax(dim=-1) if n else diag.new_zeros(diag.shape[:-1])
    tiny_pivot = (diag.amin(dim=-1) <= n * torch.finfo(A.dtype).eps * top) if n else torch.zeros_like(info, dtype=bool)
    x = C * torch.linalg.lu_solve(LU, pivots, (R * b_safe).unsqueeze(-1)).squeeze(-1)
    residual = b_safe - (A_safe @ x.unsqueeze(-1)).squeeze(-1)
    tol = torch.clamp(rtol * bnorm(b), min=atol)
    finite = torch.isfinite(x).all(dim=-1) & torch.isfinite(bnorm(residual))
    ok = ~bad_input & (info == 0) & ~tiny_pivot & finite & (bnorm(residual) <= tol)
    return _package("dense", A, b, x, ok, ~ok, tol)


def lstsq_solve(
    A: torch.Tensor,
    b: torch.Tensor,
    *,
    rcond: float | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
) -> LinearSolution:
    """Minimum-norm least-squares solutions ``x_i = pinv(A_i) b_i`` for a batch of matrices.

    Uses the SVD-based pseudo-inverse (``torch.linalg.pinv``), which handles rank-deficient and
    rectangular ``A`` identically on CPU and CUDA (the CUDA ``lstsq`` driver ``gels`` assumes full
    rank). Singular values below ``rcond * sigma_max`` are treated as zero. ``x_i`` minimises
    ``||b_i - A_i x||`` and, among minimisers, ``||x||``. For an inconsistent system ``x_i`` is still the
    least-squares solution but ``converged`` is False (the residual criterion fails). A non-finite entry
    in ``A_i`` or ``b_i`` gives ``x_i = 0`` and ``breakdown = True``.

    Args:
        A: matrices, shape ``(B, m, n)``.
        b: right-hand sides, shape ``(B, m)``, same dtype and device as ``A``.
        rcond: relative cut-off for small singular values, ``>= 0``; ``None`` means ``max(m, n) * eps``.
        rtol: relative tolerance for ``converged``: ``||b - A x|| <= max(rtol * ||b||, atol)``;
            ``None`` means ``sqrt(eps)`` of the dtype.
        atol: absolute tolerance, ``>= 0``.

    Returns:
        A `LinearSolution` (``method="lstsq"``, ``iterations`` all 0), ``x`` of shape ``(B, n)``.

    Raises:
        ValueError: ``A`` or ``b`` has the wrong type, shape, dtype or device, or a tolerance is invalid.
    """
    A, b = _check_matrix_system(A, b, square=False)
    rtol, atol = _dense_tolerances(rtol, atol, b.dtype)
    if rcond is not None:
        rcond = check_tolerance(rcond, "rcond")
    bad_input, A_safe, b_safe = _sanitize(A, b)
    x = (torch.linalg.pinv(A_safe, rtol=rcond) @ b_safe.unsqueeze(-1)).squeeze(-1)
    ok = ~bad_input & torch.isfinite(x).all(dim=-1)
    tol = torch.clamp(rtol * bnorm(b), min=atol)
    return _package("lstsq", A, b, x, ok, ~ok, tol)


def materialize(
    matvec: Matvec,
    n: int,
    *,
    batch: int,
    dtype: torch.dtype,
    device: torch.device | str,
    batched_matvec: Matvec | None = None,
) -> torch.Tensor:
    """Build the dense matrices ``A`` of shape ``(B, n, n)`` of a batched operator, column by column.

    Column ``j`` of every ``A_i`` is the operator applied to the unit vector ``e_j``. Three strategies,
    tried in order:

    1. ``batched_matvec``, mapping ``(k, B, n) -> (k, B, n)`` (row ``[c, i]`` is ``A_i @ v[c, i]``),
       called on chunks of 256 columns to bound memory;
    2. ``torch.func.vmap(matvec)`` over the basis, in chunks of at most 256 columns and at most
       ``2**28 / (B n^2 itemsize)`` columns (an operator multiplying by a captured dense ``A`` gets ``A``
       copied once per column under vmap);
    3. when vmap cannot trace ``matvec`` (``.item()``, data-dependent control flow, ...), a Python loop
       of ``n`` calls.

    Args:
        matvec: batched operator ``(B, n) -> (B, n)``.
        n: system size, ``>= 0``.
        batch: number of instances ``B``, ``>= 0``.
        dtype: floating dtype of the basis vectors.
        device: device of the basis vectors.
        batched_matvec: optional vectorised operator over a leading axis of ``k`` vectors.

    Returns:
        ``A`` of shape ``(batch, n, n)``, dtype ``dtype`` on ``device``, with ``A[i, :, j] = A_i e_j``.

    Raises:
        ValueError: invalid ``n``/``batch``, or an operator returns a wrong shape.
    """
    for name, value in (("n", n), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if n == 0 or batch == 0:
        return torch.zeros(batch, n, n, dtype=dtype, device=device)
    eye = torch.eye(n, dtype=dtype, device=device)
    if batched_matvec is not None:
        chunks = []
        for start in range(0, n, _CHUNK):
            basis = eye[start : start + _CHUNK, None, :].expand(-1, batch, n).contiguous()
            out = batched_matvec(basis)
            _check_columns(out, basis.shape, "batched_matvec")
            chunks.append(out)
        columns = torch.cat(chunks, dim=0)
    else:
        basis = eye[:, None, :].expand(n, batch, n).contiguous()
        try:
            columns = torch.func.vmap(matvec, chunk_size=_vmap_chunk(batch, n, eye.element_size()))(basis)
        except _VMAP_FAILURES:
            columns = torch.stack([matvec(basis[j]) for j in range(n)])
        _check_columns(columns, basis.shape, "matvec")
    # columns[j, i, :] = A_i e_j, i.e. A[i, :, j].
    return columns.permute(1, 2, 0).contiguous()


def _vmap_chunk(batch: int, n: int, itemsize: int) -> int:
    return max(1, min(_CHUNK, _VMAP_CHUNK_BYTES // max(1, batch * n * n * itemsize)))


def _check_columns(out: object, shape: torch.Size, name: str) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name}: expected outputs of shape {tuple(shape[1:])} per column, got {got}")


def _check_matrix_system(A: object, b: object, *, square: bool) -> tuple[torch.Tensor, torch.Tensor]:
    b = check_rhs(b)
    expected = "(B, n, n)" if square else "(B, m, n)"
    if not isinstance(A, torch.Tensor):
        raise ValueError(f"A: expected a torch.Tensor of shape {expected}, got {type(A).__name__}")
    if (
        A.ndim != 3
        or A.shape[0] != b.shape[0]
        or A.shape[1] != b.shape[1]
        or (square and A.shape[2] != A.shape[1])
    ):
        raise ValueError(
            f"A: expected shape {expected} with B = {b.shape[0]} and rows = {b.shape[1]} (from b), "
            f"got {tuple(A.shape)}"
        )
    if A.dtype != b.dtype or A.device != b.device:
        raise ValueError(
            f"A: expected dtype {b.dtype} on {b.device} (those of b), got {A.dtype} on {A.device}"
        )
    return A, b


def _dense_tolerances(rtol: object, atol: object, dtype: torch.dtype) -> tuple[float, float]:
    rtol = torch.finfo(dtype).eps ** 0.5 if rtol is None else check_tolerance(rtol, "rtol")
    return rtol, check_tolerance(atol, "atol")


def _sanitize(A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace instances with non-finite data by a harmless system, so factorisations never raise."""
    bad = ~torch.isfinite(A).flatten(1).all(dim=1) | ~torch.isfinite(b).all(dim=1)
    eye = torch.eye(A.shape[1], A.shape[2], dtype=A.dtype, device=A.device).expand_as(A)
    A_safe = torch.where(bad[:, None, None], eye, A)
    b_safe = torch.where(bad[:, None], torch.zeros_like(b), b)
    return bad, A_safe, b_safe


def _package(
    method: str,
    A: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    ok: torch.Tensor,
    breakdown: torch.Tensor,
    tol: torch.Tensor,
) -> LinearSolution:
    """Zero the failed rows of ``x`` and report the true residual of what is returned."""
    x = torch.where(ok[:, None], x, torch.zeros_like(x))
    residual = b - (A @ x.unsqueeze(-1)).squeeze(-1)
    # A failed instance may hold non-finite A; its x is zero, so its residual is b.
    residual = torch.where(ok[:, None], residual, b)
    iterations = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    return make_solution(method, x, residual, tol, iterations, breakdown)
