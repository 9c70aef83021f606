"""The optimality condition of a CasADi NLP, exposed to the IFT engine as a torch operator.

The residual is evaluated by CasADi (numpy) inside a `torch.autograd.Function`; its VJPs call CasADi's
reverse mode. Two forms:

* ``adjoint="sparse_lu"`` (default): the residual handed to the engine is ``R = K^{-1} F`` with ``K = dF/dz``
  factorised sparsely (SuperLU) at the solution. ``R = 0`` exactly where ``F = 0``, and ``dR/dz = I`` there,
  so the engine's adjoint solve converges in one CG step and the whole backward is one sparse
  factorisation, one triangular solve and one CasADi reverse sweep ``(dF/dp)^T w``.
* ``adjoint="engine"``: the residual is F itself; the engine materialises or iterates on ``(dF/dz)^T v``
  (a CasADi reverse sweep per product).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from blackbox_diff import AbstractCondition
from blackbox_diff.plugin import Kernel, answer_dtype_device, float64_numpy, owned_tensor
from blackbox_diff_casadi._active import point_rows, settle
from blackbox_diff_casadi._degenerate import casadi_degeneracy
from blackbox_diff_casadi._kkt import KKTKernels

__all__ = ["CasadiKKT", "CasadiSolution"]


class CasadiSolution:
    """One answer of the CasADi solver: primal x, multipliers of c = [g; x_bounded], solver statistics."""

    __slots__ = ("x", "lam", "status", "iterations")

    def __init__(self, x: np.ndarray, lam: np.ndarray, status: str, iterations: int | None) -> None:
        self.x, self.lam, self.status, self.iterations = x, lam, status, iterations

    def __getstate__(self):
        return (self.x, self.lam, self.status, self.iterations)

    def __setstate__(self, state):
        self.x, self.lam, self.status, self.iterations = state


def _flat_params(params: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Stack parameters column-major (CasADi's vec) into one float64 vector."""
    parts = [float64_numpy(t).ravel(order="F") for t in params]
    return np.concatenate(parts) if parts else np.zeros(0)  # a copy: the tensors' memory is not kept


def _split_grad(vec: np.ndarray, params: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in params:
        k = t.numel()
        piece = vec[start : start + k].reshape(tuple(t.shape), order="F") if t.dim() else vec[start]
        out.append(torch.as_tensor(np.ascontiguousarray(piece), dtype=t.dtype, device=t.device))
        start += k
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return float64_numpy(t).reshape(-1)


class _Residual(torch.autograd.Function):
    """R(z, a_lo, a_up, *params) for one instance; see the module docstring for the two forms."""

    @staticmethod
    def forward(ctx, kernels: KKTKernels, preconditioned: bool, z, alo, aup, *params):  # noqa: D102
        zn, lo, up, p = _np(z), _np(alo), _np(aup), _flat_params(params)
        ctx.kernels, ctx.preconditioned, ctx.point = kernels, preconditioned, (zn, lo, up, p)
        ctx.params = tuple(t.detach() for t in params)
        if preconditioned:
            value = kernels.at(zn, lo, up, p).solve(kernels.at(zn, lo, up, p).F)
        else:
            value = kernels.residual(zn, lo, up, p)
        return torch.as_tensor(value, dtype=z.dtype, device=z.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        kernels, point = ctx.kernels, ctx.point
        need_z = ctx.needs_input_grad[2]
        need_p = any(ctx.needs_input_grad[5:])
        gz = gp = None
        # The z-products stay torch operations: the engine may call them under vmap (is_grads_batched).
        if need_z and ctx.preconditioned:
            gz = grad  # dR/dz = K^{-1} K = I at the point
        elif need_z:
            if getattr(ctx, "K", None) is None:
                ctx.K = torch.as_tensor(kernels.kkt_matrix(*point).toarray(), dtype=grad.dtype, device=grad.device)
            gz = grad @ ctx.K  # (dF/dz)^T g as a row vector
        if need_p:
            w = grad.detach().to("cpu", torch.float64).numpy().reshape(-1)
            if ctx.preconditioned:  # dR/dp = K^{-1} dF/dp
                w = kernels.at(*point).solve(w, trans="T")
            gp = kernels.vjp_params(*point, w)
        grads_p = _split_grad(gp, ctx.params) if (need_p and gp is not None) else [None] * len(ctx.params)
        return (None, None, gz, None, None, *grads_p)


class CasadiKKT(AbstractCondition):
    """KKT conditions of a CasADi NLP on the active set identified from slacks and multipliers."""

    closed = True  # F reaches only its arguments (the problem data, the answer)

    raw_solution = True
    # The residual is evaluated by CasADi inside a once-differentiable autograd.Function (so no vmap).
    functional = False
    vmappable = False

    def __init__(self, kernels: KKTKernels, *, adjoint: str = "sparse_lu", polish: bool = True) -> None:
        self.kernels, self.adjoint, self.polish = kernels, adjoint, polish
        self.preconditioned = adjoint == "sparse_lu"
        # thread -> the tensors `prepare` last returned and the numpy values they hold: `degeneracy`, called
        # next on the same thread with those tensors, reads the values instead of converting them back
        self._prepared: dict[int, tuple] = {}
        # K^{-1} K = I: the adjoint is the incoming gradient, checked by one product (escalating if it fails).
        self.structure = "identity" if self.preconditioned else "symmetric"

    def describe(self) -> str:
        return "CasADi KKT"

    def residual(self, z: torch.Tensor, alo: torch.Tensor, aup: torch.Tensor, *params: Any) -> torch.Tensor:
        if self.preconditioned:
            # dR/dz = I at the point: state it with torch's own identity, so that the engine's adjoint
            # products never re-enter Python; the CasADi operator only carries the parameter dependence.
            zd = z.detach()
            return (z - zd) + _Residual.apply(self.kernels, True, zd, alo, aup, *params)
        return _Residual.apply(self.kernels, False, z, alo, aup, *params)

    def certificate_blocks(self) -> tuple[int, ...]:
        """Stationarity, constraint rows, inactive rows' feasibility, multiplier signs."""
        n, m = self.kernels.n, self.kernels.m
        return (n, m, m, m)

    def certify(self, Z: torch.Tensor, aux: tuple, params: list, batched: tuple[bool, ...]) -> tuple[np.ndarray, ...]:
        """(certificate, term sizes, None, worst ratio) of a batch, in numpy, instance by instance
        (`certify_one`); no exact-sizes function (the sizes are exact)."""
        Zn, lo, up = float64_numpy(Z), float64_numpy(aux[0]), float64_numpy(aux[1])
        if Zn.shape[0] == 1:  # one instance: no stacking
            C, S, worst = self.certify_one(Zn[0], lo[0], up[0], _flat_params(tuple(params)))
            return C[None], S[None], None, worst
        shared = None if any(batched) else _flat_params(tuple(params))  # the same parameters for every row
        out = [self.certify_one(Zn[i], lo[i], up[i], shared if shared is not None else _flat_params(tuple(
            t[i] if b else t for t, b in zip(params, batched, strict=True)))) for i in range(Zn.shape[0])]
        worst = None if any(o[2] is None for o in out) else max(o[2] for o in out)
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), None, worst

    def certify_one(self, z: np.ndarray, lo: np.ndarray, up: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
        """(certificate, term sizes, worst ratio or None) of one answer, in numpy, from the values the polish
        already evaluated there (`KKTKernels.at`; row sizes kept with the point): one compiled loop where numba
        is installed (which also gives the largest |certificate| / size).

        The certificate: F (not K^{-1} F), the feasibility of inactive rows, the signs of active multipliers.
        The size of each component's terms, exact from CasADi's sparse Jacobians: |d2L/dx2||x| + |grad f| +
        |dc/dx^T||lam| + |d2L/dxdp||p| for stationarity, |dc/dx||x| + |dc/dp||p| + |bounds| for constraint
        rows (|lam| where a multiplier is pinned), and for a multiplier's sign the size a multiplier of that
        row must have to matter in stationarity.
        """
        k = self.kernels
        pt = k.at(z, lo, up, p)
        rows, norms, gf = point_rows(k, pt, z, p)
        terms = pt.terms(z, p)
        if _CERTIFICATE.compiled() is not None:
            return _CERTIFICATE(z, lo, up, pt.F, pt.c, pt.lb, pt.ub, terms, gf, rows, norms, k.n)
        F, c, lb, ub = pt.F, pt.c, pt.lb, pt.ub
        lam = z[k.n :]
        free = (lo + up) == 0
        viol = np.where(free, np.maximum(c - ub, 0) + np.maximum(lb - c, 0), 0.0)
        sign = np.where(up > 0, np.maximum(-lam, 0), 0.0) + np.where((lo > 0) & (lb != ub), np.maximum(lam, 0), 0.0)
        certificate = np.concatenate([F, viol, sign])  # NaN fails the test as it is
        stat = terms[: k.n] + gf
        top = stat.max(initial=0.0)
        dual = np.where(norms > 0, top / np.where(norms > 0, norms, 1.0), 0.0)
        scale = np.concatenate([stat, np.where(free, np.abs(lam), rows), rows, dual + np.abs(lam)])
        scale[~np.isfinite(scale)] = 0.0  # no size from a term that is not finite: judged by the floor
        return certificate, scale, None

    def prepare(self, solution: Any, params: tuple[Any, ...], options: Any) -> tuple[torch.Tensor, tuple]:
        """(z, (a_lo, a_up)): the answer on the active set it settles on, polished onto it (`_active`)."""
        k = self.kernels
        fmt = answer_dtype_device(params)
        p = _flat_params(tuple(params))
        x, lam = np.asarray(solution.x, dtype=np.float64), np.asarray(solution.lam, dtype=np.float64)
        z, alo, aup = settle(k, x, lam, p, options.active_tol, polish=self.polish)
        out = owned_tensor(z, *fmt), (owned_tensor(alo, *fmt), owned_tensor(aup, *fmt))
        if fmt[0] is torch.float64 and fmt[1].type == "cpu":  # the tensors hold exactly these values
            self._prepared[threading.get_ident()] = (out[0], *out[1], (z, alo, aup, p))
        return out

    def degeneracy(self, z: torch.Tensor, aux: tuple, params: tuple, options: Any) -> Any:
        """The admissible active sets at a degenerate answer (`blackbox_diff_casadi._degenerate`)."""
        alo, aup = aux
        last = self._prepared.pop(threading.get_ident(), None)
        if last is not None and last[0] is z and last[1] is alo and last[2] is aup:
            values = last[3]  # the tensors prepare just made from these arrays: no conversion back
        else:
            values = (_np(z), _np(alo), _np(aup), _flat_params(tuple(params)))
        return casadi_degeneracy(self.kernels, *values, options.active_tol, z)


def _certificate_loop(z, lo, up, F, c, lb, ub, terms, gf, rows, norms, n):
    """`CasadiKKT.certify_one`'s numpy arithmetic as one loop (NaN kept where numpy keeps it)."""
    m = c.shape[0]
    N = n + m
    C = np.empty(N + 2 * m)
    S = np.empty(N + 2 * m)
    top = 0.0
    for j in range(n):
        s = terms[j] + gf[j]
        S[j] = s
        if s != s or s > top:  # np.max: NaN wins
            top = s if top == top else top
    for j in range(N):
        C[j] = F[j]
    for r in range(m):
        lam = z[n + r]
        free = lo[r] + up[r] == 0
        v = 0.0
        if free:
            above, below = c[r] - ub[r], lb[r] - c[r]
            v = (above if not above <= 0.0 else 0.0) + (below if not below <= 0.0 else 0.0)
        C[N + r] = v
        sign = 0.0
        if up[r] > 0:
            sign += -lam if not -lam <= 0.0 else 0.0
        if lo[r] > 0 and lb[r] != ub[r]:
            sign += lam if not lam <= 0.0 else 0.0
        C[N + m + r] = sign
        S[n + r] = abs(lam) if free else rows[r]
        S[N + r] = rows[r]
        S[N + m + r] = (top / norms[r] if norms[r] > 0 else 0.0) + abs(lam)
    for j in range(N + 2 * m):
        if not np.isfinite(S[j]):  # no size from a term that is not finite: judged by the floor
            S[j] = 0.0
    # The largest |C| / S, which the engine compares with its tolerance (NaN counts as inf). Written out in
    # each kernel, not shared: numba's disk cache tracks only the kernel's own file, so a compiled helper
    # from another module, changed later, would run stale.
    worst = 0.0
    for j in range(C.shape[0]):
        a, s = abs(C[j]), S[j]
        if not a <= s * worst:
            worst = np.inf if not (s > 0.0 and a == a) else max(worst, a / s)
    return C, S, worst


_F = "float64[::1]"
_CERTIFICATE = Kernel(_certificate_loop, f"Tuple(({_F}, {_F}, float64))({', '.join([_F] * 11)}, int64)")
