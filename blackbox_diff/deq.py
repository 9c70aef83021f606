"""Deep equilibrium layers: a fixed point z* = f(z*, x) found by a black box and differentiated by the IFT.

The forward is any fixed-point solver run without autograd: plain iteration, Anderson acceleration
(both here, batched in torch) or the user's ``solver(T, z0) -> z``, inside the engine's autograd core
with the fixed-point condition z - f(z, x) = 0. The backward is one adjoint solve
``(I - df/dz)^T u = dL/dz*`` per instance, by Neumann iteration when the forward measured a clear
contraction, by GMRES otherwise, then one VJP of f. Memory is one evaluation of f, independent of the
number of forward iterations (unrolling stores every one).

Invariant: the returned z satisfies ``max|f(z, x) - z| <= tol (1 + max|z|)`` for every instance of the
batch; otherwise the call raises (`bbd.CertificationError`) instead of returning a wrong gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from blackbox_diff import engine
from blackbox_diff._errors import InputError, SolverError
from blackbox_diff.engine import check_finite, parse_options

__all__ = ["DEQ", "FixedPointResult", "anderson", "fixed_point_iteration", "fixed_point_layer"]

# A converged plain iteration whose residual shrank faster than this per step is called contractive,
# and its adjoint solved by Neumann iteration (which converges at the same rate); otherwise GMRES.
_NEUMANN_MAX_RATE = 0.9
# Anderson's secant gain is only an estimate of the contraction (along the explored directions): Neumann
# only with a factor-2 margin.
_NEUMANN_MAX_SECANT_GAIN = 0.5


@dataclasses.dataclass(frozen=True)
class FixedPointResult:
    """Outcome of a batched fixed-point solve.

    Attributes:
        z: the last iterate, shape of z0.
        iterations: evaluations of T used.
        residual: (B,) ``max|T(z) - z|`` per instance at the returned z.
        converged: (B,) bool, ``residual <= tol (1 + max|z|)``.
        rate: observed contraction factor: for `fixed_point_iteration` the residual's reduction per step
            over the last steps (an estimate of the spectral radius of dT/dz at z*); for `anderson` the
            largest secant gain ||T(x_i) - T(x_j)|| / ||x_i - x_j|| over its final history (the gain of
            dT/dz along the slow directions); NaN when unknown.
        method: the solver that produced it.
    """

    z: torch.Tensor
    iterations: int
    residual: torch.Tensor
    converged: torch.Tensor
    rate: float
    method: str = "user"


def _check(z0: Any, tol: float, max_iter: int, name: str) -> None:
    if not torch.is_tensor(z0) or not z0.is_floating_point() or z0.dim() < 1:
        raise InputError(
            f"{name}: z0 must be a floating-point tensor of shape (B, ...) (batch first); got "
            f"{type(z0).__name__}{' of shape ' + str(tuple(z0.shape)) if torch.is_tensor(z0) else ''}."
        )
    if not tol > 0 or not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"{name}: expected tol > 0 and an integer max_iter >= 1; got tol={tol}, max_iter={max_iter}.")


def _errors(fz: torch.Tensor, z: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    B = z.shape[0]
    err = (fz - z).reshape(B, -1).abs().amax(dim=1)
    ok = err <= tol * (1.0 + fz.reshape(B, -1).abs().amax(dim=1))
    return err, ok


def fixed_point_iteration(
    T: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, tol: float = 1e-8, max_iter: int = 500
) -> FixedPointResult:
    """Plain iteration z <- T(z) on a batch (B, ...) until every instance meets the tolerance."""
    _check(z0, tol, max_iter, "fixed_point_iteration")
    z, history = z0, []
    with torch.no_grad():
        for _ in range(max_iter):
            fz = T(z)
            err, ok = _errors(fz, z, tol)
            history.append(err.max())
            z = fz
            if bool(ok.all()):
                break
        err, ok = _errors(T(z), z, tol)
    # Asymptotic contraction rate of the iteration (spectral radius of dT/dz at z*) from the last steps.
    j = min(5, len(history) - 1)
    rate = float((history[-1] / history[-1 - j].clamp_min(1e-300)) ** (1.0 / j)) if j > 0 else float("nan")
    return FixedPointResult(z, len(history) + 1, err, ok, rate, "iteration")


def anderson(
    T: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    m: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    tol: float = 1e-8,
    max_iter: int = 100,
) -> FixedPointResult:
    """Batched Anderson acceleration (Anderson 1965; Walker & Ni 2011) for z = T(z).

    Keeps the last m iterates X and images F = T(X); the next iterate mixes them with weights alpha
    minimising ``||sum_i alpha_i (F_i - X_i)||`` subject to ``sum alpha = 1`` (a regularised bordered
    least-squares system of size m + 1 per instance): ``z = beta F alpha + (1 - beta) X alpha``.

    Args:
        T: batched map (B, ...) -> (B, ...), instances independent.
        z0: starting point (B, ...).
        m: history size. beta: mixing (damping). lam: Tikhonov term of the weight system, relative to
            the largest squared residual in the history.
        tol: stop when every instance has max|T(z) - z| <= tol (1 + max|T(z)|).
        max_iter: cap on evaluations of T.
    """
    _check(z0, tol, max_iter, "anderson")
    if not isinstance(m, int) or m < 1:
        raise InputError(f"anderson: m (history size) must be an integer >= 1; got {m!r}.")
    B = z0.shape[0]
    with torch.no_grad():
        x = z0.reshape(B, -1)
        n = x.shape[1]
        X = x.new_zeros(B, m, n)
        F = x.new_zeros(B, m, n)

        def T_flat(v: torch.Tensor) -> torch.Tensor:
            return T(v.reshape(z0.shape)).reshape(B, -1)

        # Three plain steps first: they seed the history.
        X[:, 0], F[:, 0] = x, T_flat(x)
        last = 0
        for j in range(1, min(3, m)):
            X[:, j], F[:, j] = F[:, j - 1], T_flat(F[:, j - 1])
            last = j
        H = x.new_zeros(B, m + 1, m + 1)
        H[:, 0, 1:] = H[:, 1:, 0] = 1.0
        rhs = x.new_zeros(B, m + 1, 1)
        rhs[:, 0] = 1.0
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        k = last + 1
        for k in range(last + 1, max_iter):
            _, ok = _errors(F[:, last], X[:, last], tol)
            if bool(ok.all()):
                break
            p = min(k, m)
            G = F[:, :p] - X[:, :p]
            GG = G @ G.transpose(1, 2)
            # Regularise relative to the residuals' scale, which shrinks by orders of magnitude.
            scale = GG.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
            H[:, 1 : p + 1, 1 : p + 1] = GG + lam * scale[:, None, None] * eye[:p, :p]
            alpha = torch.linalg.solve(H[:, : p + 1, : p + 1], rhs[:, : p + 1])[:, 1 : p + 1, 0]
            last = k % m
            X[:, last] = beta * (alpha[:, None] @ F[:, :p])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :p])[:, 0]
            F[:, last] = T_flat(X[:, last])
        z = F[:, last]
        err, ok = _errors(T_flat(z), z, tol)
        rate = _secant_gain(X[:, : min(k + 1, m)], F[:, : min(k + 1, m)], last)
    return FixedPointResult(z.reshape(z0.shape), k + 1, err, ok, rate, "anderson")


def _secant_gain(X: torch.Tensor, F: torch.Tensor, last: int) -> float:
    """max ||T(x_i) - T(x_last)|| / ||x_i - x_last|| over the history: the gain of dT/dz along the
    directions the iteration explored near z*, which are its slowest ones (NaN without history)."""
    dX = (X - X[:, last : last + 1]).norm(dim=2)
    dF = (F - F[:, last : last + 1]).norm(dim=2)
    valid = dX > 0
    if not bool(valid.any()):
        return float("nan")
    return float((dF[valid] / dX[valid]).max())


_SOLVERS = {"anderson": anderson, "iteration": fixed_point_iteration}


class DEQ(torch.nn.Module):
    """A deep equilibrium layer: ``forward(x) = z*`` with ``z* = f(z*, x)``, differentiated by the IFT.

    Args:
        f: the layer map ``f(z, x) -> z`` (usually an nn.Module; its weights receive gradients). z and x
            carry the batch in dimension 0, and instances must not interact.
        solver: 'anderson' (default), 'iteration', or a callable ``solver(T, z0) -> z`` (or a
            `FixedPointResult`) where T maps a batch of z to f(z, x).
        tol: forward tolerance, ``max|f(z, x) - z| <= tol (1 + max|z|)`` per instance; None: 1e-8 in
            float64, 1e-5 in float32 (certification, which compares each component with its own terms, uses
            100 x tol unless `residual_tol` is given: the forward's test is relative to the largest |z| only).
        max_iter: cap on forward evaluations of f.
        solver_options: extra keywords of the built-in solver (e.g. ``{"m": 6, "beta": 1.0}``).
        linear_solver: adjoint solver of the backward: 'auto' (Neumann when a converged plain iteration
            contracted faster than 0.9 per step or Anderson's secant gain is below 0.5, GMRES otherwise),
            or any `bbd.implicit` linear solver.
        **implicit_options: further `bbd.implicit` options (rtol, max_steps, residual_tol, certify, ...).

    Every instance of the batch (row of x) is one fixed-point problem for the engine: adjoint solves
    converge, escalate and fail per instance. The forward solver runs inside the engine's autograd core, so
    forward mode, second derivatives in x and torch.func transforms work; f's own weights get exact first
    derivatives (and forward-mode tangents).

    Attributes:
        last: the `FixedPointResult` of the most recent forward (iterations, residuals, rate).
        last_linear_solver: the adjoint solver the most recent forward chose.
    """

    def __init__(
        self,
        f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        solver: str | Callable = "anderson",
        tol: float | None = None,
        max_iter: int = 100,
        solver_options: dict | None = None,
        linear_solver: str = "auto",
        **implicit_options: Any,
    ) -> None:
        super().__init__()
        if not callable(f):
            raise InputError(
                f"DEQ expects f to be a callable f(z, x) -> z (e.g. an nn.Module); got {type(f).__name__}."
            )
        if not (callable(solver) or solver in _SOLVERS):
            raise InputError(
                f"DEQ: unknown solver {solver!r}; expected 'anderson', 'iteration', or a callable "
                "solver(T, z0) -> z."
            )
        self.f, self.solver, self.tol, self.max_iter = f, solver, tol, max_iter
        self.solver_options = dict(solver_options or {})
        self.linear_solver = linear_solver
        residual_tol = implicit_options.pop("residual_tol", "default")
        # The adjoint needs no more accuracy than z* has: stop it at the forward's tolerance.
        rtol = implicit_options.pop("rtol", None)
        for key in ("in_dims", "executor", "arrays"):
            if key in implicit_options:
                raise InputError(
                    f"DEQ: option {key!r} does not apply (the batch is x's first dimension and the forward solver "
                    "runs in torch); remove it."
                )
        self.last: FixedPointResult | None = None
        self.last_linear_solver: str | None = None
        methods = ("neumann", "gmres") if linear_solver == "auto" else (linear_solver,)
        # Validated now, with their names, rather than at the first forward.
        self._options = {
            (m, dt): parse_options({
                "linear_solver": m,
                "residual_tol": 100 * self._tol(dt) if residual_tol == "default" else residual_tol,
                "rtol": self._tol(dt) if rtol is None else rtol,
                **implicit_options,
            })
            for m in methods
            for dt in (torch.float32, torch.float64)
        }

    def _tol(self, dtype: torch.dtype) -> float:
        if self.tol is not None:
            return self.tol
        return 1e-8 if dtype == torch.float64 else 1e-5

    def solve(self, x: torch.Tensor, z0: torch.Tensor | None = None, *, f: Callable | None = None
              ) -> FixedPointResult:
        """Run the forward solver only (no gradient), from z0 (default zeros of x's shape).

        Args:
            x: the input (B, ...).
            z0: the starting point (default zeros of x's shape).
            f: the map to iterate (default the layer's f; the engine passes f with given weights).
        """
        z0 = torch.zeros_like(x) if z0 is None else z0.detach()
        f = self.f if f is None else f

        def T(z: torch.Tensor) -> torch.Tensor:
            return f(z, x)

        with torch.no_grad():
            if callable(self.solver):
                out = self.solver(T, z0)
                if isinstance(out, FixedPointResult):
                    return out
                if not torch.is_tensor(out) or out.shape != z0.shape:
                    raise SolverError(
                        f"The DEQ's solver returned {type(out).__name__} "
                        f"{tuple(out.shape) if torch.is_tensor(out) else ''}; expected a tensor of shape "
                        f"{tuple(z0.shape)} (the shape of z0) or a FixedPointResult."
                    )
                err, ok = _errors(T(out), out, self._tol(x.dtype))
                return FixedPointResult(out, -1, err, ok, float("nan"), "user")
            tol = self._tol(x.dtype)
            return _SOLVERS[self.solver](T, z0, tol=tol, max_iter=self.max_iter, **self.solver_options)

    def choose_linear_solver(self, result: FixedPointResult) -> str:
        """The adjoint solver for a forward's result (see `linear_solver`)."""
        if self.linear_solver != "auto":
            return self.linear_solver
        # Neumann converges at the plain iteration's rate: use it where the forward measured a clear
        # contraction; otherwise GMRES (never more operator applications than Neumann).
        limit = {"iteration": _NEUMANN_MAX_RATE, "anderson": _NEUMANN_MAX_SECANT_GAIN}.get(result.method, 0.0)
        contractive = bool(result.converged.all()) and result.rate < limit  # NaN compares False
        return "neumann" if contractive else "gmres"

    @torch.compiler.disable
    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 1:
            raise InputError(
                f"DEQ expects x to be a floating-point tensor of shape (B, ...) (batch first); got "
                f"{type(x).__name__}{' of shape ' + str(tuple(x.shape)) if torch.is_tensor(x) else ''}."
            )
        # z0 travels as an input only when given (vmap must fold it with x); otherwise zeros inside.
        starts = [] if z0 is None else [z0.detach().to(dtype=x.dtype, device=x.device)]
        lifted = engine.lift(self.f)
        weights = [] if lifted is None else lifted.tensors
        call = _DEQCall(self, x.dtype, lifted, has_start=bool(starts))
        Z, _ = engine.apply(call, [x, *starts, *weights])
        return Z.reshape(x.shape[0], *call.shape)


class _DEQCall(engine.Call):
    """A DEQ forward for the engine: the batch solved at once in torch, each row one fixed-point problem."""

    structure = "fixed_point"
    independent = False
    coupling_hint = ("f mixes the instances of the batch (e.g. batch statistics); a DEQ needs f to act on each row "
                     "of z and x independently.")

    def __init__(self, deq: DEQ, dtype: torch.dtype, lifted: engine.Lifted | None, has_start: bool) -> None:
        key = ("neumann" if deq.linear_solver == "auto" else deq.linear_solver,
               torch.float64 if dtype == torch.float64 else torch.float32)
        n_weights = 0 if lifted is None else len(lifted.names)
        super().__init__(deq._options[key], (True,) * (1 + has_start) + (False,) * n_weights, "FixedPoint")
        self.deq, self.dtype, self.lifted, self.has_start = deq, key[1], lifted, has_start
        self.shape: torch.Size | None = None

    def _split(self, params) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        x = params[0]
        return x, (params[1] if self.has_start else None), list(params[1 + self.has_start :])

    def _f(self, z: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return self.deq.f(z, x) if self.lifted is None else self.lifted(weights, z, x)

    def answers(self, params: list[torch.Tensor]) -> engine.Answers:
        x, z0, weights = self._split(params)
        check_finite([x])
        result = self.deq.solve(x, z0, f=lambda z, x: self._f(z, x, weights))
        method = self.deq.choose_linear_solver(result)
        self.deq.last, self.deq.last_linear_solver = result, method
        self.options = self.deq._options[method, self.dtype]
        self.shape = result.z.shape[1:]
        Z = result.z.reshape(x.shape[0], -1)
        return engine.Answers(Z, (), torch.ones(x.shape[0], dtype=torch.bool, device=x.device))

    def residual_fn(self):
        shape = self.shape

        def residual(Z: torch.Tensor, aux: tuple, params, batched) -> torch.Tensor:
            z = Z.reshape(Z.shape[0], *shape)
            x, _, weights = self._split(params)
            return (z - self._f(z, x, weights)).reshape(Z.shape[0], -1)

        return residual

    def adopt(self, other: engine.Call) -> None:
        super().adopt(other)
        self.shape = other.shape


def fixed_point_layer(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, **deq_options: Any
) -> torch.Tensor:
    """Functional form: ``DEQ(f, **deq_options)(x)``."""
    return DEQ(f, **deq_options)(x)
