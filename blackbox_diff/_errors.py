"""The error hierarchy of blackbox_diff.

Every error says what failed, what was expected and what to do about it. The classes carry the
structured facts (batch index, backend, exit code, ...) as attributes so that callers can branch on
them without parsing messages.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendUnavailableError",
    "BlackBoxDiffError",
    "CertificationError",
    "DegenerateError",
    "InputError",
    "LinearSolveError",
    "PluginError",
    "SolverError",
]


class BlackBoxDiffError(Exception):
    """Base class of every error raised by blackbox_diff."""


class InputError(BlackBoxDiffError, ValueError):
    """A parameter or option is malformed: wrong shape, dtype, non-finite value, unknown option."""


class SolverError(BlackBoxDiffError):
    """The black-box solver failed or returned something unusable.

    Attributes:
        batch_index: index of the failing instance in the batch (None when unbatched).
        backend: name of the backend that ran the solver, when there is one.
        status: the solver's own status string or code, when it reported one.
        exit_code: process exit code (executables only).
        stderr_tail: the last lines of the process' standard error (executables only).
    """

    def __init__(
        self,
        message: str,
        *,
        batch_index: int | None = None,
        backend: str | None = None,
        status: Any = None,
        exit_code: int | None = None,
        stderr_tail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.batch_index = batch_index
        self.backend = backend
        self.status = status
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        message = super().__str__()
        if self.batch_index is not None and "batch index" not in message:
            message = f"{message.rstrip()} (batch index {self.batch_index})"
        return message


class CertificationError(BlackBoxDiffError):
    """The point returned by the black box does not satisfy the optimality condition.

    Attributes:
        batch_index: index of the failing instance (None when unbatched).
        residual: the measured (scaled) residual.
        tolerance: the tolerance it was compared with.
    """

    def __init__(
        self,
        message: str,
        *,
        batch_index: int | None = None,
        residual: float | None = None,
        tolerance: float | None = None,
    ) -> None:
        super().__init__(message)
        self.batch_index = batch_index
        self.residual = residual
        self.tolerance = tolerance


class LinearSolveError(BlackBoxDiffError):
    """The adjoint linear system did not converge or is singular, and no fallback was allowed."""


class BackendUnavailableError(BlackBoxDiffError, ImportError):
    """A backend's solver library is not installed."""


class PluginError(BlackBoxDiffError):
    """A plugin failed to load, registered something invalid, or no backend accepts a problem."""


class DegenerateError(BlackBoxDiffError):
    """The answer is a degenerate point where the derivative asked for does not exist (one-sided
    derivatives differ), and the `degenerate="raise"` policy refuses such points.

    Attributes:
        batch_index: index of the instance (None when unbatched).
        constraints: the constraint indices concerned.
        outputs: the flat output indices whose derivative does not exist.
    """

    def __init__(self, message: str, *, batch_index: int | None = None, constraints: list[int] | None = None,
                 outputs: list[int] | None = None) -> None:
        super().__init__(message)
        self.batch_index = batch_index
        self.constraints = constraints or []
        self.outputs = outputs or []
