"""`bbd.check_gradients`: audit an implicit gradient against central finite differences of the black box.

The finite differences differentiate the black box itself, so they carry its noise: a solver that stops at
a loose tolerance, or an executable that prints six digits, makes every difference quotient noisy by about
(output noise) / step. A single step cannot tell that noise from a wrong gradient. The audit therefore
takes central differences at a geometric sequence of steps per entry, removes their h^2 error by
Richardson extrapolation, and uses the spread between neighbouring extrapolated values as the
uncertainty of the best one (Ridders' idea). The verdict per parameter compares the disagreement with
the tolerance *and* with that uncertainty:

    PASS          relative error <= rtol and finite-difference noise <= rtol
    FAIL          relative error > rtol + NOISE_FACTOR * noise: more than the noise can explain
    INCONCLUSIVE  otherwise: the finite differences are too noisy to confirm or refute at rtol
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from blackbox_diff._errors import BlackBoxDiffError, InputError

__all__ = ["GradientReport", "check_gradients", "saved_tensor_bytes"]

# A disagreement counts as real (FAIL) once it exceeds the tolerance by this many noise estimates. The
# estimate is the spread of neighbouring extrapolations, a few times the noise itself, so 3 leaves a
# margin for the luck of the draw without letting a 4x wrong gradient through.
NOISE_FACTOR = 3.0
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
# Between consecutive steps. Not a power of 2 or 10: with an output printed in decimal digits, steps in a
# round ratio give differences that are exact multiples of each other and look converged.
_RATIO = 3.7
_NOISE_POINTS = 9  # points of the output-noise stencil along one direction (5th differences)


@dataclasses.dataclass
class GradientReport:
    """Implicit vs finite-difference gradients of the projected output <w, fn(params)>.

    Attributes:
        implicit: one gradient tensor per parameter, from autograd through the implicit layer.
        finite_difference: the same gradients by central differences of the black box itself
            (Richardson-extrapolated, at the step whose neighbours agree best).
        abs_error: per parameter, max |implicit - fd| over its entries.
        rel_error: per parameter, abs_error / max(|implicit|, |fd|) over its entries: a relative error at
            every scale (a gradient of size 1e-7 off by 4x has rel_error 0.75).
        step: the largest relative step of the finite differences (each entry's steps are
            step * |entry| / 3.7^k, k = 0 .. levels - 1; a zero entry uses the parameter's RMS, or 1).
        rtol: the tolerance the verdicts compare rel_error and fd_noise with.
        fd_noise: per parameter, the uncertainty of the finite differences relative to the same scale as
            rel_error (what the black box's own noise and truncation leave in them).
        fd_uncertainty: per parameter, the absolute uncertainty of each finite-difference entry.
        output_noise: per parameter, the black box's output noise the finite differences imply, relative
            to the size of the projected output (about 1e-16 for an exact function in float64; about 1e-6
            for an output printed with 6 digits).
        notes: per parameter, remarks (e.g. the black box failed at some steps).
    """

    implicit: list[torch.Tensor]
    finite_difference: list[torch.Tensor]
    abs_error: list[float]
    rel_error: list[float]
    step: float
    rtol: float
    fd_noise: list[float] = dataclasses.field(default_factory=list)
    fd_uncertainty: list[torch.Tensor] = dataclasses.field(default_factory=list)
    output_noise: list[float] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        """Per parameter: "PASS", "FAIL" (the gradient disagrees) or "INCONCLUSIVE" (noise too large)."""
        noise = self.fd_noise or [0.0] * len(self.rel_error)
        return [_verdict(e, n, self.rtol) for e, n in zip(self.rel_error, noise, strict=True)]

    @property
    def verdict(self) -> str:
        """FAIL if any parameter fails, else INCONCLUSIVE if any is inconclusive, else PASS."""
        v = self.verdicts
        return FAIL if FAIL in v else INCONCLUSIVE if INCONCLUSIVE in v else PASS

    @property
    def ok(self) -> bool:
        """True when every parameter passes (an inconclusive parameter is not ok)."""
        return self.verdict == PASS

    @property
    def failed(self) -> list[int]:
        """Indices of the parameters whose gradient disagrees beyond the finite differences' noise."""
        return [i for i, v in enumerate(self.verdicts) if v == FAIL]

    @property
    def inconclusive(self) -> list[int]:
        """Indices of the parameters whose finite differences are too noisy to judge at rtol."""
        return [i for i, v in enumerate(self.verdicts) if v == INCONCLUSIVE]

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error, default=0.0)

    def mismatched_entries(self, i: int) -> list[tuple[int, ...]]:
        """Entries of parameter i whose disagreement exceeds rtol (of the parameter's scale) + noise."""
        g, fd = self.implicit[i], self.finite_difference[i]
        if not g.numel():
            return []
        unc = self.fd_uncertainty[i] if self.fd_uncertainty else torch.zeros_like(fd)
        scale = float(torch.maximum(g.abs(), fd.abs()).max())
        bad = (g - fd).abs() > self.rtol * scale + NOISE_FACTOR * unc
        return [tuple(int(k) for k in idx) for idx in torch.nonzero(bad)]

    def __str__(self) -> str:
        noise = self.fd_noise or [0.0] * len(self.rel_error)
        head = f"{'param':>5} {'shape':>9} {'max|implicit|':>14} {'max|fin.diff|':>14} {'rel error':>10} "
        lines = [head + f"{'fd noise':>10}  verdict"]
        for i, (g, fd, r, n, v) in enumerate(
            zip(self.implicit, self.finite_difference, self.rel_error, noise, self.verdicts, strict=True)
        ):
            mg = float(g.abs().max()) if g.numel() else 0.0
            mf = float(fd.abs().max()) if fd.numel() else 0.0
            extra = ""
            if v == FAIL:
                entries = self.mismatched_entries(i)
                extra = " (gradient disagrees" + (f" at entries {entries[:6]}" if g.dim() else "") + ")"
            elif v == INCONCLUSIVE:
                extra = " (finite differences too noisy here)"
            if self.notes and self.notes[i]:
                extra += f" [{self.notes[i]}]"
            shape = str(tuple(g.shape))
            lines.append(f"{i:>5} {shape:>9} {mg:>14.6g} {mf:>14.6g} {r:>10.3g} {n:>10.3g}  {v}{extra}")
        lines.append(
            f"central differences at relative steps {self.step:g} / 3.7^k with Richardson extrapolation; "
            f"tolerance {self.rtol:g}: {self._summary()}"
        )
        return "\n".join(lines)

    def _summary(self) -> str:
        if self.verdict == PASS:
            return "PASS"
        if self.verdict == FAIL:
            return f"FAIL: the gradient disagrees with finite differences of the black box for parameters {self.failed}"
        worst = max(self.output_noise or [float("nan")])
        notes = "; the notes in brackets say what went wrong" if any(self.notes) else ""
        return (
            f"INCONCLUSIVE: finite differences too noisy here for parameters {self.inconclusive} (black-box "
            f"output noise ~{worst:.1g} relative): tighten the solver, print more digits, or loosen rtol{notes}"
        )


def _verdict(rel_error: float, noise: float, rtol: float) -> str:
    if rel_error <= rtol and noise <= rtol:
        return PASS
    if rel_error > rtol + NOISE_FACTOR * noise:
        return FAIL
    return INCONCLUSIVE


def _flat_output(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out.reshape(-1)
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat_output(o) for o in out if o is not None])
    raise InputError(f"check_gradients expects fn to return tensors; it returned {type(out).__name__}.")


@dataclasses.dataclass
class _Entry:
    """One entry's finite difference: estimate, uncertainty, the step it was taken at, what went wrong."""

    estimate: float = math.nan
    uncertainty: float = math.inf
    h: float = math.nan
    failures: int = 0
    quantised: bool = False
    flat: bool = False


def _richardson(coarse: float, fine: float, ratio: float) -> float:
    return (ratio**2 * fine - coarse) / (ratio**2 - 1)


def _extrapolate(diff: Callable[[int], tuple[float, float]], levels: int, floor: float, rtol: float) -> _Entry:
    """Richardson-extrapolated central difference from ``diff(k) -> (D_k, h_k)``, steps shrinking by r = 3.7.

    R_k = (r^2 D_k - D_{k-1}) / (r^2 - 1) cancels the h^2 term. Its uncertainty is the larger of
    |R_k - R_{k-1}| (the coarser estimate's truncation error bounds R_k's, and the noise of both shows in
    it) and floor / h_k (the output's own noise over the step, measured apart, so that a lucky agreement
    of two noisy values cannot pass for accuracy). The scan goes from the largest step down, keeps the
    level of least uncertainty, and stops once the uncertainty has grown past twice the best (Ridders'
    rule: smaller steps only add noise), or as soon as the uncertainty is below rtol / 10 of the estimate
    (no smaller step could change the verdict).

    A difference that is exactly zero after non-zero ones marks a quantised output (printed digits): the
    scan stops there (a plateau of zeros would look perfectly converged), and the smallest non-zero change
    of the output seen, one quantum at least, raises the floor: floor_k >= quantum / (2 h_k).
    """
    D: list[float] = []
    H: list[float] = []
    out = _Entry()
    for k in range(levels):
        d, h = diff(k)
        out.failures += not math.isfinite(d)
        if d == 0.0 and any(x != 0.0 and math.isfinite(x) for x in D):
            out.quantised = True
            break
        D.append(d)
        H.append(h)
        if _select(out, D, H, floor) or out.uncertainty <= 0.1 * rtol * abs(out.estimate):
            break
    if out.quantised:
        quantum = min(abs(d) * 2 * h for d, h in zip(D, H, strict=True) if d != 0.0 and math.isfinite(d))
        out.estimate, out.uncertainty, out.h = math.nan, math.inf, math.nan
        for k in range(2, len(D) + 1):
            _select(out, D[:k], H[:k], floor, quantum)
    out.flat = bool(D) and all(x == 0.0 for x in D)
    if out.h != out.h:  # fewer than two extrapolations: the smallest-step difference, accuracy unknown
        finite = [k for k, x in enumerate(D) if math.isfinite(x)]
        if finite:
            out.estimate, out.h = D[finite[-1]], H[finite[-1]]
    return out


def central_difference(along: Callable[[float], float], floor: float, rtol: float, levels: int = 7) -> _Entry:
    """d/dt along(t) at t = 0 by central differences at steps 1e-2 / 3.7^k, Richardson-extrapolated
    (`_extrapolate`: the estimate, its uncertainty, and whether the output is quantised).

    Args:
        along: the black box's output along one direction, a float of the step t.
        floor: the output's own noise (e.g. eps times its size); no uncertainty is claimed below floor / h.
        rtol: the scan stops once the uncertainty is below rtol / 10 of the estimate.
    """

    def diff(k: int) -> tuple[float, float]:
        h = 1e-2 / _RATIO**k
        return (along(h) - along(-h)) / (2 * h), h

    return _extrapolate(diff, levels, floor, rtol)


def _select(out: _Entry, D: list[float], H: list[float], floor: float, quantum: float = 0.0) -> bool:
    """Consider the last level's extrapolation; True when its uncertainty grew past twice the best."""
    if len(D) < 3:
        return False
    k = len(D) - 1
    R = _richardson(D[k - 1], D[k], H[k - 1] / H[k])
    coarser = _richardson(D[k - 2], D[k - 1], H[k - 2] / H[k - 1])
    uncertainty = max(abs(R - coarser), floor / H[k], quantum / (2 * H[k]))
    if not math.isfinite(uncertainty):
        return False
    if uncertainty < out.uncertainty:
        out.estimate, out.uncertainty, out.h = R, uncertainty, H[k]
        return False
    return uncertainty > 2.0 * out.uncertainty


def entry_scale(p: torch.Tensor) -> torch.Tensor:
    """Per-entry step scale: |entry|, or the parameter's RMS for zero entries, or 1 for a zero parameter."""
    a = p.detach().abs().double()
    rms = float(a.square().mean().sqrt()) if a.numel() else 0.0
    fallback = rms if rms > 0 else 1.0
    return torch.where(a > 0, a, torch.full_like(a, fallback))


def check_gradients(
    fn: Callable[..., Any],
    *params: torch.Tensor,
    step: float = 1e-2,
    rtol: float = 1e-5,
    seed: int = 0,
    levels: int = 7,
) -> GradientReport:
    """Compare the gradient of a random projection of ``fn(*params)`` with finite differences of ``fn``.

    The finite differences call `fn` itself, so they differentiate the black box (its own accuracy
    included), not the optimality condition: a mismatch means the condition does not describe the solver,
    the solver is not accurate enough, or the solution map is not differentiable there. Each entry is
    differenced at `levels` steps ``step * |entry| / 3.7^k`` with Richardson extrapolation; the spread of
    neighbouring estimates measures the noise of the differences, so a noisy black box is reported as
    INCONCLUSIVE instead of passing or failing by luck. Errors are relative at every scale: a gradient of
    size 1e-9 is judged like one of size 1e9.

    Args:
        fn: a callable on tensors, e.g. a `bbd.implicit` function or a `bbd.layer`.
        *params: floating tensors (the point of the check; float64 recommended). They are not modified.
        step: largest relative step of the central differences.
        rtol: tolerance on the relative error (and on the finite differences' relative noise).
        seed: seed of the random projection vector.
        levels: number of steps per entry (two calls of `fn` each); at least 3.

    Returns:
        A `GradientReport`; `report.verdicts` gives PASS / FAIL / INCONCLUSIVE per parameter, `report.ok`
        is True when all pass, and printing it gives a table.

    Raises:
        InputError: a parameter is not a floating tensor, or step/rtol/levels is out of range.
    """
    for i, p in enumerate(params):
        if not torch.is_tensor(p) or not p.is_floating_point():
            raise InputError(f"check_gradients: parameter {i} must be a floating tensor; got {type(p).__name__}.")
    if not (0.0 < step < 1.0) or not isinstance(levels, int) or levels < 3 or not rtol > 0.0:
        raise InputError(
            f"check_gradients: expected 0 < step < 1, rtol > 0 and an integer levels >= 3; got step={step!r}, "
            f"rtol={rtol!r}, levels={levels!r}."
        )
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    out = _flat_output(fn(*leaves))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    grads = [None] * len(leaves)
    if out.requires_grad:
        grads = torch.autograd.grad((w * out).sum(), leaves, allow_unused=True)
    implicit = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, leaves, strict=True)]
    size = float((w * out).detach().abs().sum())  # the projection's magnitude: round-off is eps times this
    eps = torch.finfo(out.dtype).eps

    errors: list[str] = []

    def projected(values: list[torch.Tensor]) -> float:
        try:
            with torch.no_grad():
                return float((w * _flat_output(fn(*values))).sum())
        except BlackBoxDiffError as err:  # the black box failed at this step: that level is left out
            errors.append(f"{type(err).__name__}: {err}")
            return math.nan

    report = GradientReport(implicit, [], [], [], step, rtol)
    base = [p.detach().clone() for p in params]
    sigma = _output_noise(projected, base, step / _RATIO ** (levels // 2), gen)
    for i, p in enumerate(base):
        errors.clear()
        fd, unc, out_noise, notes = _differences(projected, base, i, (step, levels, rtol), max(eps * size, sigma))
        if errors:
            notes = f"{notes} (first: {errors[0][:200]})"
        fd, unc = fd.to(dtype=p.dtype, device=p.device), unc.to(dtype=p.dtype, device=p.device)
        natural = size / float(entry_scale(p).square().mean().sqrt()) if p.numel() else 0.0
        _record(report, implicit[i], fd, unc, natural, max(out_noise, sigma) / size if size > 0 else 0.0, notes)
    return report


def _output_noise(projected, base: list[torch.Tensor], spacing: float, gen: torch.Generator) -> float:
    """Standard deviation of the black box's projected output, from its 5th differences on a line.

    The output at 9 equally spaced points along a random direction of all parameters together (entry
    steps of `spacing` relative to each entry's scale): for a smooth function the 5th differences are
    ~spacing^5, for a noisy one they are noise * sqrt(C(10, 5)) (the idea of Moré & Wild's ECnoise). The
    noise is the output's, so one line serves every parameter.
    """
    if not sum(p.numel() for p in base):
        return 0.0
    signs = [torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1 for p in base]
    directions = [entry_scale(p).to(p) * s for p, s in zip(base, signs, strict=True)]
    values = []
    for m in range(-(_NOISE_POINTS // 2), _NOISE_POINTS // 2 + 1):
        values.append(projected([p + m * spacing * d for p, d in zip(base, directions, strict=True)]))
    fifth = torch.diff(torch.tensor(values, dtype=torch.float64), n=5)
    if not bool(torch.isfinite(fifth).all()):
        return 0.0  # the black box failed on the stencil: the differences' own spread has to do
    return float((fifth.square().mean() / math.comb(10, 5)).sqrt())


def _differences(projected, base: list[torch.Tensor], i: int, steps: tuple[float, int, float], floor: float):
    """Extrapolated central differences of the entries of parameter i.

    Returns:
        (fd, uncertainty, output noise, notes): the uncertainty is at least floor / h (floor: the output's
        noise, or its round-off); the output noise is the largest uncertainty times its step.
    """
    step, levels, rtol = steps
    p = base[i]
    scale = entry_scale(p).reshape(-1)
    fd = torch.zeros(p.numel(), dtype=torch.float64)
    unc = torch.zeros(p.numel(), dtype=torch.float64)
    out_noise, failures, quantised, flat = 0.0, 0, [], []
    for j in range(p.numel()):

        def diff(k: int, j: int = j) -> tuple[float, float]:
            h = step * float(scale[j]) / _RATIO**k
            plus, minus = [b.clone() for b in base], [b.clone() for b in base]
            plus[i].reshape(-1)[j] += h
            minus[i].reshape(-1)[j] -= h
            width = float(plus[i].reshape(-1)[j] - minus[i].reshape(-1)[j])  # the step as represented
            return ((projected(plus) - projected(minus)) / width if width > 0 else math.nan), width / 2

        entry = _extrapolate(diff, levels, floor, rtol)
        fd[j], unc[j] = entry.estimate, entry.uncertainty
        if math.isfinite(unc[j]):
            out_noise = max(out_noise, float(unc[j]) * entry.h)  # uncertainty = noise / h
        failures += entry.failures
        index = tuple(int(x) for x in torch.unravel_index(torch.tensor(j), p.shape)) if p.dim() else ()
        (quantised if entry.quantised else flat if entry.flat else []).append(index)
    notes = []
    if failures:
        notes.append(f"the black box failed at {failures} perturbed points")
    if quantised:
        notes.append("output quantised (equal values at nearby points): print more digits")
    if flat and p.dim() == 0:
        notes.append("output unchanged at every step: the black box ignores it, or prints too few digits")
    elif flat:
        notes.append(f"output unchanged at every step of entries {flat[:6]}")
    return fd.reshape(p.shape), unc.reshape(p.shape), out_noise, "; ".join(notes)


def _record(report: GradientReport, g, fd, unc, natural: float, noise: float, notes: str) -> None:
    """Append parameter's row. Errors are relative to the larger gradient; when both gradients are within
    the noise of zero (a zero derivative), relative to the natural scale |<w, fn>| / |param| instead."""
    report.finite_difference.append(fd)
    report.fd_uncertainty.append(unc)
    report.output_noise.append(noise)
    report.notes.append(notes)
    if not fd.numel():
        report.abs_error.append(0.0)
        report.rel_error.append(0.0)
        report.fd_noise.append(0.0)
        return
    err = float((g - fd).abs().max())
    scale = float(torch.maximum(g.abs(), fd.abs()).max())
    worst_unc = float(unc.max())
    if scale <= NOISE_FACTOR * worst_unc < math.inf and natural > scale:
        scale = natural
        report.notes[-1] = "; ".join(filter(None, [report.notes[-1], "zero within the noise"]))
    report.abs_error.append(err)
    report.rel_error.append(err / scale if scale > 0 else 0.0 if err == 0 else math.inf)
    report.fd_noise.append(worst_unc / scale if scale > 0 else 0.0 if worst_unc == 0 else math.inf)


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd keeps saved for the backward of what `fn()` returns,
    beyond the caller's own leaf tensors.

    The memory an implicit layer keeps for its backward should not grow with the solver's iteration
    count; this measures it (e.g. ``saved_tensor_bytes(lambda: layer(x))`` with few and many iterations).
    Only tensors still saved when `fn` returns count (a graph built and dropped inside the call, e.g. to
    check the answer, holds nothing for the backward). Leaf tensors that require grad (module parameters,
    inputs the caller created) and views of them live whether or not a backward is pending, so references
    to them are not counted; a tensor saved by several operations is counted once (one allocation).
    """
    saved: list[tuple[Any, tuple[int, int], int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base  # a view of a parameter (W.T) is that parameter
        if not (base.is_leaf and base.requires_grad):
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
            saved.append((weakref.ref(t), key, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()  # noqa: F841 - held so that the graph it owns (and its saved tensors) stays alive
    total, seen = 0, set()
    for ref, key, nbytes in saved:
        if ref() is not None and key not in seen:
            seen.add(key)
            total += nbytes
    return total
