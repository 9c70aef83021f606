"""Certification of a black box's answer: does F(z*, params) = 0 hold, relative to the size of F's terms?

A residual component is small or large only relative to the terms it is made of: F_i(z, p) = sum of
terms whose sizes |dF_i/dz_j z_j| and |dF_i/dp_k p_k| say what a rounding-level error looks like. Scaling
the residual (a change of units of F), making one unknown large (a multiplier of 2e4 beside x ~ 1), or
changing the units of z leaves the test unchanged; a global ``1 + max|z|`` would not.

The term sizes are estimated with a few Rademacher probes, ``sqrt(mean_r ((J (z o r) + K (p o s))_i^2))``
= ``||(J_ij z_j)_j, (K_ik p_k)_k||_2`` in expectation, by double VJPs; a condition may give exact ones
(`AbstractCondition.residual_scale`), or state certificate and term sizes for a whole batch in numpy
(`AbstractCondition.certify`, the backends' conditions: no torch operation per call). A floor of
sqrt(tol) times the largest term judges components whose terms all vanish (a root at 0, data that are 0
there) at an absolute level set by the rest of the instance: accurate answers with entries at round-off
around 0 pass, and a large unknown elsewhere loosens the others by sqrt(tol) only (x2 off by 10% beside an
unknown of 1e6 is refused; a global ``1 + max|z|`` accepted it). A condition whose certificate has parts
in different units (stationarity rows in the objective's units, constraint rows in the constraints')
names them (`AbstractCondition.certificate_blocks`), and the floor is taken per part.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from blackbox_diff.linalg import Kernel

__all__ = ["Verdict", "effective_tolerance", "passes", "relative_residual", "significant_digits", "term_scale"]

_PROBES = 4


@functools.lru_cache(maxsize=64)
def effective_tolerance(tol: float, dtype: torch.dtype) -> float:
    """The relative tolerance actually used: never below 100 eps of the answer's dtype (float32 answers
    exact to float32 pass with the float64 default)."""
    return max(float(tol), 100.0 * _eps(dtype))


@functools.lru_cache(maxsize=16)
def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


@functools.lru_cache(maxsize=16)
def _finfo(dtype: np.dtype) -> np.finfo:
    return np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64)


def passes(C: np.ndarray, scale: np.ndarray, tol: float) -> bool:
    """Whether every component is within `tol` of its own terms, before any floor: the floor only loosens
    the test (`relative_residual`), so answers that pass this need nothing more (a polished answer's usual
    case: one compiled loop, or four array operations). NaN never passes."""
    if _PASSES.compiled() is not None and C.ndim == 2 and C.shape == scale.shape and \
            C.dtype == scale.dtype == np.float64:
        return _PASSES(C, scale, float(tol))
    return bool((np.abs(C) <= tol * scale).all())


def _passes_loop(C, S, tol):
    for i in range(C.shape[0]):
        for j in range(C.shape[1]):
            if not abs(C[i, j]) <= tol * S[i, j]:
                return False
    return True


_PASSES = Kernel(_passes_loop, "boolean(float64[:, :], float64[:, :], float64)")


def term_scale(fn: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor], Z: torch.Tensor,
               params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Estimated size of the terms of each component of fn(Z, params) (k, m); None where it cannot be
    estimated (a condition torch differentiates only once and without forward mode)."""
    params = [p for p in params]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def signs(t: torch.Tensor) -> torch.Tensor:
        r = torch.randint(0, 2, (_PROBES, *t.shape), generator=gen).to(dtype=t.dtype, device=t.device)
        return (2 * r - 1) * t

    dz = signs(Z)
    dps = [signs(p) if p.is_floating_point() else torch.zeros((_PROBES, *p.shape)) for p in params]
    with torch.no_grad():
        D = _directional(fn, Z, params, dz, dps)
    if D is None:
        return None
    return D.pow(2).mean(dim=0).sqrt()


def _directional(fn, Z, params, dz, dps) -> torch.Tensor | None:
    """(probes, k, m): fn's directional derivatives along each probe, by reverse mode twice (the pairing
    <c, J v> is linear in c: its gradient in c is J v). Not forward mode: torch's forward-AD levels are
    process-global, and a layer called from several threads at once would corrupt each other's tangents."""
    try:
        with torch.enable_grad():
            Zl = Z.detach().requires_grad_(True)
            Pl = [p.detach().requires_grad_(p.is_floating_point()) for p in params]
            R = fn(Zl, Pl)
            if not R.requires_grad:
                return torch.zeros((dz.shape[0], *R.shape), dtype=R.dtype, device=R.device)
            c = torch.zeros_like(R, requires_grad=True)
            leaves = [Zl] + [p for p in Pl if p.requires_grad]
            grads = torch.autograd.grad(R, leaves, c, create_graph=True, allow_unused=True)
            if any(g is not None and not g.requires_grad for g in grads):
                return None  # torch differentiates this condition once only: no second pass to size terms
            dirs = [dz] + [d for d, p in zip(dps, Pl, strict=True) if p.requires_grad]
            used = [(g, d) for g, d in zip(grads, dirs, strict=True) if g is not None and g.requires_grad]
            if not used:
                return torch.zeros((dz.shape[0], *R.shape), dtype=R.dtype, device=R.device)
            # <grads(c), dirs_i> is linear in c: its gradient in c is J dirs_i, for all probes in one sweep
            try:
                (D,) = torch.autograd.grad([g for g, _ in used], c, [d for _, d in used], retain_graph=True,
                                           is_grads_batched=True, allow_unused=True)
            except (RuntimeError, NotImplementedError):  # an op without a batching rule: probe by probe
                probes = [torch.autograd.grad([g for g, _ in used], c, [d[i] for _, d in used], retain_graph=True,
                                              allow_unused=True)[0] for i in range(dz.shape[0])]
                D = torch.stack([torch.zeros_like(R) if x is None else x for x in probes])
        if D is None:
            return torch.zeros((dz.shape[0], *R.shape), dtype=R.dtype, device=R.device)
        return D.detach()
    except Exception:  # noqa: BLE001 - only once differentiable: no generic estimate
        return None


def relative_residual(C: np.ndarray, scale: np.ndarray, tol: float,
                      blocks: Sequence[int] | None = None) -> np.ndarray:
    """|C_i| / (scale_i + floor_i) (k, m), in numpy (the certificates are small: a torch op per step cost
    more than the whole test).

    floor_i = sqrt(tol) x the largest term of component i's block. `blocks` (sizes of consecutive
    components, e.g. stationarity rows then constraint rows) are the certificate's parts in their own units:
    a part in units of 1e-6 beside one in units of 1 is judged by its own terms, not loosened by the other's
    (None: the whole certificate is one part). A part whose terms all vanish against the instance's largest
    (round-off: below 100 eps of it, e.g. constraint rows at 0 with data 0) has nothing of its own to be
    judged by: it takes the instance's largest term instead.
    """
    m = scale.shape[1]
    info = _finfo(C.dtype)
    if not m:
        return np.abs(C) / (scale + info.tiny)
    top = scale.max(axis=1, keepdims=True)
    sizes = [b for b in blocks if b > 0] if blocks is not None and sum(blocks) == m else [m]
    if len(sizes) == 1:
        tops = top
    else:  # each part's largest term (one reduction for all parts), or the instance's where it vanishes
        own = np.maximum.reduceat(scale, np.cumsum([0, *sizes[:-1]]), axis=1)
        tops = np.repeat(np.where(own > 100 * info.eps * top, own, top), sizes, axis=1)
    return np.abs(C) / (scale + tol**0.5 * tops + info.tiny)


def significant_digits(z: torch.Tensor, limit: int = 17) -> int:
    """The fewest significant decimal digits that represent every entry of z exactly (17: not rounded)."""
    values = [float(v) for v in z.detach().reshape(-1).tolist() if v == v and abs(v) != float("inf")]
    for d in range(1, limit):
        if all(float(f"{v:.{d}g}") == v for v in values):
            return d
    return limit


class Verdict:
    """One instance's certification: the worst relative residual and the components over tolerance."""

    def __init__(self, rel: np.ndarray, C: np.ndarray, tol: float) -> None:
        self.rel, self.C, self.tol = rel, C, tol
        self.worst = float(rel.max()) if rel.size else 0.0
        self.bad = np.flatnonzero(~(rel <= tol)).tolist()

    @property
    def passed(self) -> bool:
        return not self.bad

    def describe(self, z: torch.Tensor, corrected: torch.Tensor | None = None) -> str:
        """The message: which components, by how much, and whether rounding explains it.

        Args:
            z: the answer.
            corrected: the answer after one Newton correction (None: not available). The answer counts as
                rounded when it has few significant digits and the corrected one, rounded to as many, is it.
        """
        parts = ", ".join(f"{i} ({float(self.C[i]):.3g}, relative {float(self.rel[i]):.3g})" for i in self.bad[:6])
        more = f" and {len(self.bad) - 6} more" if len(self.bad) > 6 else ""
        text = (f"components {parts}{more} exceed residual_tol = {self.tol:.3g} relative to the size of their "
                "terms")
        digits = significant_digits(z)
        rounded = (corrected is not None and digits <= 12 and all(i < z.numel() for i in self.bad)
                   and not torch.equal(corrected.reshape(-1), z.reshape(-1)) and all(
            float(f"{float(c):.{digits}g}") == float(v)
            for c, v in zip(corrected.reshape(-1).tolist(), z.reshape(-1).tolist(), strict=True)))
        if rounded:
            text += (f". The answer has at most {digits} significant digits and its residual is what rounding to "
                     f"that many digits gives: the answer was rounded (e.g. printed with %g); write it with "
                     "all digits (%.17g), or loosen residual_tol")
        else:
            text += ". This is not a solution of the condition to that accuracy: solve more accurately, check that " \
                    "the condition matches the solver, or loosen residual_tol (None disables the check)"
        return text
