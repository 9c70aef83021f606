"""One call of an implicit function: run the black box, certify its answers, state the condition.

A `Call` is what the IFT core (`blackbox_diff.engine.apply`) runs inside its autograd forward, on plain
tensors: `answers` runs the black box for every instance (a per-instance solver through an executor, a
batched torch solver, a Newton step), the residual and certificate functions state the optimality
condition on flat unknowns, and `run` ties them together: answers -> certification -> `System` (and, when
gradients may follow, whether the condition reaches trainable tensors by closure).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from blackbox_diff._errors import BlackBoxDiffError, CertificationError, DegenerateError, InputError, SolverError
from blackbox_diff.engine._certify import Verdict, effective_tolerance, passes, relative_residual, term_scale
from blackbox_diff.engine._curvature import smallest_curvature
from blackbox_diff.engine._degeneracy import Degeneracy, compare_variants, output_jacobian
from blackbox_diff.engine._system import Linearization, Residual, System

__all__ = ["Answers", "Call"]


@dataclasses.dataclass
class Answers:
    """The black box's answers for a batch: unknowns (B, n), per-instance aux tensors, success mask (B,)."""

    Z: torch.Tensor
    aux: tuple[torch.Tensor, ...]
    ok: torch.Tensor


class Call(abc.ABC):
    """Base of a call's record. Subclasses say how to get answers and state the condition.

    Attributes set by the caller: options (`ImplicitOptions`-like), batched (per parameter), describe.
    Attributes set by `run`: system, ok, point (the ok rows' answers and parameters, detached), captures
    (whether the residual reaches trainable tensors other than the parameters).
    """

    structure: str = "general"
    functional: bool = True
    # Row independence of a natively batched residual is a claim (verified in the backward); see `System`.
    independent: bool = True
    foldable: bool = True
    coupling_hint: str = ""
    # Argmin: warn when the answer has negative curvature (a saddle or a maximum, not a minimiser).
    check_curvature: bool = False

    def __init__(self, options: Any, batched: tuple[bool, ...], describe: str) -> None:
        self.options, self.batched, self.describe = options, tuple(batched), describe
        self.system: System | None = None
        self.ok: torch.Tensor | None = None
        self.captures = False
        self.want_graph = False
        self.linearization: Linearization | None = None
        self._pending: Linearization | None = None
        self.point: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self.vmapped = False
        # row -> Degeneracy, filled by `answers` for instances at degenerate points
        self.degeneracies: dict[int, Degeneracy] = {}
        self._adjoint: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- what subclasses provide ----------------------------------------------------------------
    @abc.abstractmethod
    def answers(self, params: list[torch.Tensor]) -> Answers:
        """Run the black box on every instance (plain, detached tensors); failures get ok=False."""

    @abc.abstractmethod
    def residual_fn(self) -> Residual:
        """The batched residual (Z (B, n), aux, params) -> (B, n)."""

    def certificate_fn(self) -> Residual | None:
        """The batched certificate (largest magnitude certifies an answer); None: the residual."""
        return None

    def certify_fn(self) -> Callable | None:
        """(Z, aux, params, batched) -> (certificate, term sizes), numpy (B, m), for a whole batch at once: the
        condition's own (e.g. from the data in numpy, cheaper than its torch certificate); None, or a function
        that returns None for this batch: the engine evaluates `certificate_fn` and `scale_fn`."""
        return None

    def scale_fn(self) -> Residual | None:
        """The batched size of the terms of each certificate component; None: estimated from derivatives."""
        return None

    def certificate_blocks(self) -> Sequence[int] | None:
        """Sizes of the certificate's consecutive parts in their own units; None: one part."""
        return None

    def closed(self) -> bool:
        """Whether F reaches no tensor but its arguments (no captured tangents to look for)."""
        return False

    def jvp_params_fn(self):
        """Batched (dF/dparams) tangents stated by the condition (see `System.jvp_params`); None: derived."""
        return None

    def fail(self, err: BlackBoxDiffError, index: int | None) -> None:
        """An instance failed after the black box returned (certification): raise, or warn and go on."""
        if getattr(self.options, "on_failure", "raise") == "raise":
            raise err
        warnings.warn(f"{err} The instance's output is NaN and its gradient zero.", RuntimeWarning, stacklevel=6)

    def index_of(self, row: int) -> int | None:
        """The user's batch index of row `row` (None for an unbatched call)."""
        return row

    def fresh(self, batched: tuple[bool, ...]) -> Call:
        """A copy for a different batch layout (vmap merges a vmapped dimension into the batch)."""
        new = copy.copy(self)
        Call.__init__(new, self.options, batched, self.describe)
        return new

    def adopt(self, other: Call) -> None:
        """Take over the state of `other`, the copy that actually ran with a vmapped dimension folded into
        its batch: the condition (the backward re-reads aux from the saved outputs, in this call's layout),
        and whether every instance succeeded (failed instances under vmap cannot be told apart by row).
        Subclasses extend it with what their caller reads after the call (e.g. the solution shape)."""
        self.system = other.system.with_aux(other.system.aux, self.batched)
        self.captures = other.captures
        self.vmapped = True
        self.ok = None if other.ok is None else bool(other.ok.all())

    # --- the shared run ---------------------------------------------------------------------------
    def run(self, params: list[torch.Tensor]) -> torch.Tensor:
        """answers -> certification -> system; returns Z (B, n) with NaN rows for failed instances."""
        params = [p.detach() if p.requires_grad else p for p in params]  # once, for everything below
        ans = self.answers(params)
        # A tensor of its own: a view (a solver's reshaped iterate) as the Function's output would make forward
        # mode give its tangent the view's layout.
        Z, ok = (ans.Z if ans.Z._base is None else ans.Z.clone()), ans.ok.clone()
        system = System(self.residual_fn(), ans.aux, self.batched, self.structure, self.options, self.describe,
                        self.functional, self.independent, self.foldable, self.coupling_hint,
                        self.jvp_params_fn())
        self.system = system
        for _ in range(2):  # a second pass only when certification removed instances
            if not bool(ok.any()):
                break
            full = bool(ok.all())
            R = self._evaluate(system, Z, params, ok, full)
            if R is None:
                ok[:] = False
                break
            passed = self._certify(system, Z, params, ok, R, full)
            if passed is None or bool(passed.all()):
                self.linearization = self._pending
                idx = torch.nonzero(ok).flatten()
                full = bool(ok.all())
                self.point = (Z.detach() if full else Z[idx].detach(),
                              [p.detach() for p in (params if full else system.params_rows(params, idx))])
                break
            ok[torch.nonzero(ok).flatten()[~passed]] = False
        if self.degeneracies:
            Z = self._resolve_degeneracies(system, Z, params, ok)
            self.linearization = None  # the statement of some rows changed
        if self.check_curvature and bool(ok.any()):
            self._warn_if_not_a_minimum(system, Z, params, ok)
        self.ok = ok
        if not bool(ok.all()):
            Z = Z.clone()
            Z[~ok] = float("nan")
        return Z

    def _warn_if_not_a_minimum(self, system: System, Z: torch.Tensor, params, ok: torch.Tensor) -> None:
        """Warn for instances whose Hessian has negative curvature: a saddle or a maximum, not a minimiser."""
        rows = torch.nonzero(ok).flatten()
        sub = system.rows(rows)
        lin = Linearization(sub, Z[rows].detach(), [p.detach() for p in sub.params_rows(params, rows)])
        try:
            low, high = smallest_curvature(lin)
        except Exception:  # noqa: BLE001 - a diagnosis only: a condition torch cannot differentiate here
            return
        tol = 1e-8 * high.abs().clamp_min(torch.finfo(Z.dtype).tiny)
        for k, bad in enumerate((low < -tol).tolist()):
            if not bad:
                continue
            index = self.index_of(int(rows[k]))
            where = "" if index is None else f" at batch index {index}"
            warnings.warn(
                f"The black box's answer{where} is not a minimum of the {self.describe} objective: its Hessian has "
                f"a negative eigenvalue ({float(low[k]):.3g}; the largest is {float(high[k]):.3g}), so it is a "
                "saddle point or a maximum. The gradient describes how this stationary point moves; if a minimiser "
                "was meant, restart the solver elsewhere or use a global method.",
                RuntimeWarning,
                stacklevel=6,
            )

    def _resolve_degeneracies(self, system: System, Z: torch.Tensor, params, ok: torch.Tensor) -> torch.Tensor:
        """Compare the outputs' derivatives under every admissible statement of a degenerate instance; use a
        regular one where the answer's own is singular; warn or raise where the derivative does not exist."""
        policy = getattr(self.options, "degenerate", "warn")
        for row, deg in sorted(self.degeneracies.items()):
            if not bool(ok[row]) or not deg.variants:
                continue
            idx = torch.tensor([row], device=Z.device)
            P = [p.detach() for p in system.params_rows(params, idx)]
            jacs, labels = [], []
            if deg.main_regular:
                jac = output_jacobian(system.rows(idx), Z[idx], P, deg.outputs)
                if jac is not None:
                    jacs.append(jac)
                    labels.append("the answer's active set")
            for k, (zv, auxv) in enumerate(deg.variants):
                variant = system.with_aux(tuple(a.unsqueeze(0) for a in auxv), system.batched)
                jac = output_jacobian(variant, zv.unsqueeze(0), P, deg.outputs)
                if jac is not None:
                    jacs.append(jac)
                    labels.append(deg.labels[k] if k < len(deg.labels) else f"variant {k}")
            if not deg.main_regular:  # the answer's statement is singular: state it with the first variant
                zv, auxv = deg.variants[0]
                Z = Z.clone()
                Z[row] = zv.to(Z.dtype)
                for dst, src in zip(system.aux, auxv, strict=True):
                    dst[row] = src
            differ = compare_variants(jacs) if len(jacs) > 1 else []
            if not differ or policy == "ignore":
                continue
            index = self.index_of(row)
            where = "" if index is None else f" at batch index {index}"
            agree = [i for i in range(deg.outputs) if i not in differ]
            msg = (
                f"Degenerate point{where}: {deg.kind}. The derivative of outputs {differ} does not exist there: "
                f"the one-sided derivatives of {', '.join(labels)} differ; the gradient returned is that of "
                f"{labels[0]}."
                + (f" Outputs {agree} have a derivative, and it is returned exactly." if agree else "")
                + " degenerate='raise' refuses such points, degenerate='ignore' silences this."
            )
            if policy == "raise":
                self.fail(DegenerateError(msg, batch_index=index, constraints=deg.constraints, outputs=differ), index)
                ok[row] = False
            else:
                warnings.warn(msg, RuntimeWarning, stacklevel=6)
        return Z

    def _evaluate(self, system: System, Z, params, ok, full: bool) -> torch.Tensor | None:
        """F at the answers of the ok rows (detached; `full`: every row is ok); None when it cannot be
        evaluated there (the instances then failed). When a backward may follow, F's graph on detached
        leaves is kept for it."""
        idx = torch.nonzero(ok).flatten()
        sub = system if full else system.rows(idx)
        Zs = (Z if full else Z[idx]).detach()
        Ps = [p.detach() for p in (list(params) if full else sub.params_rows(params, idx))]
        try:
            self._pending = None
            if self.want_graph:
                # F's graph at the answers, kept for a first-order backward (one evaluation of F held, as the
                # memory of any IFT backward is); closure captures are the leaves it reaches besides its own.
                lin = Linearization(sub, Zs, Ps)
                R, Zl, Pl = lin.graph()
                self.captures = _reaches_other_leaves(R, [Zl, *Pl])
                self._pending = lin
            else:
                R = sub(Zs, Ps)
                self.captures = False
        except (BlackBoxDiffError, InputError):
            raise
        except TypeError as err:  # called with the wrong arguments: the residual's signature, not the answer
            raise InputError(
                f"Evaluating the {self.describe} residual at the black box's answer failed: {type(err).__name__}: "
                f"{err}. Check the residual's signature F(z, *params) (one argument per parameter of the call) and "
                "that it is written in torch."
            ) from err
        except Exception as err:  # noqa: BLE001 - any failure of the condition at these answers
            # The answers all have the agreed shape, so either every one has the wrong size for the condition
            # or the condition is wrong: say both, blame the answers (on_failure='nan' isolates them).
            for row in idx.tolist():
                index = self.index_of(row)
                where = "" if index is None else f" at batch index {index}"
                failure = SolverError(
                    f"The {self.describe} condition could not be evaluated at the black box's answer{where} "
                    f"({self.answer_shape()}): {type(err).__name__}: {err}. Either the black box returned the wrong "
                    "number of values (declare output_shape= on an Executable, or variables= on a layer, to have its "
                    "answer checked first) or the residual is wrong (signature F(z, *params), torch operations, z of "
                    "the black box's shape).",
                    batch_index=index,
                )
                failure.__cause__ = err
                self.fail(failure, index)
            return None
        return R.detach()

    def answer_shape(self) -> str:
        """How one instance's answer looks, for messages."""
        shape = getattr(self, "shape", None)
        return f"shape {tuple(shape)}" if shape is not None else "its unknowns"

    def _certify(self, system: System, Z, params, ok, R: torch.Tensor, full: bool) -> torch.Tensor | None:
        """Per ok row (`full`: every row is ok): does the answer satisfy the condition? None: every ok row
        does. Failing rows go through `fail`."""
        if R.shape[1] != Z.shape[1]:
            raise InputError(
                f"The {self.describe} residual has {R.shape[1]} entries but z has {Z.shape[1]}; the implicit "
                "function theorem needs a square system (one equation per unknown)."
            )
        tol = self.options.residual_tol
        if tol is None:
            return None
        tol = effective_tolerance(tol, Z.dtype)
        rows = torch.nonzero(ok).flatten() if not full else None
        sub = system if full else system.rows(rows)
        Zs = Z if full else Z[rows]
        Zs = Zs.detach() if Zs.requires_grad else Zs
        Ps = params if full else sub.params_rows(params, rows)  # detached by `run`
        C, scale, exact, worst = self._certificate(sub, Zs, Ps, R)
        if worst is not None and worst <= tol:  # the condition's own scan: every |C| <= tol * scale
            return None
        if passes(C, scale, tol):  # within tol of its own terms without the floor: nothing more to test
            return None
        if exact is not None:  # `scale` was a bound from below: the test needs the exact term sizes
            scale = np.asarray(exact())
            if passes(C, scale, tol):
                return None
        rel = relative_residual(C, scale, tol, self.certificate_blocks())
        row_ok = (rel <= tol).all(axis=1)  # one test for the batch; a Verdict only for failing rows
        if bool(row_ok.all()):
            return None
        rows = torch.nonzero(ok).flatten() if rows is None else rows
        passed = []
        for k, r in enumerate(rows.tolist()):
            if row_ok[k]:
                passed.append(True)
                continue
            verdict = Verdict(rel[k], C[k], tol)
            index = self.index_of(r)
            where = "" if index is None else f" at batch index {index}"
            corrected = _newton_corrected(system.rows(rows[k : k + 1]), Zs[k : k + 1],
                                          sub.params_rows(Ps, torch.tensor([k])) if any(sub.batched) else Ps)
            msg = (f"The black box's answer{where} does not satisfy the {self.describe} condition: "
                   f"{verdict.describe(Zs[k], corrected)}.")
            if getattr(self.options, "certify", "raise") == "warn":
                warnings.warn(msg + " Gradients may be wrong.", RuntimeWarning, stacklevel=6)
                passed.append(True)
                continue
            self.fail(CertificationError(msg, batch_index=index, residual=verdict.worst, tolerance=tol), index)
            passed.append(False)
        return torch.tensor(passed, dtype=torch.bool)

    def _certificate(self, sub: System, Zs: torch.Tensor, Ps: list[torch.Tensor],
                     R: torch.Tensor) -> tuple[np.ndarray, np.ndarray, Callable | None, float | None]:
        """(certificate, term sizes, None) of the ok rows (their system `sub`, answers `Zs`, parameters `Ps`;
        R: the residual there), numpy (k, m): the condition's batch `certify_fn`, else its torch certificate
        and term sizes. A condition may give the term sizes from below and a function for the exact ones
        (third element), which the test then calls only when the bound does not suffice, and the largest
        |certificate| / size it found (fourth), which spares the test its own scan."""
        own = self.certify_fn()
        stated = None if own is None else own(Zs, sub.aux, Ps, sub.batched)
        if stated is not None:
            return (np.asarray(stated[0]), np.asarray(stated[1]), stated[2] if len(stated) > 2 else None,
                    stated[3] if len(stated) > 3 else None)
        cert = self.certificate_fn()
        fn = cert or sub.residual

        def certificate(Zv: torch.Tensor, Pv: list[torch.Tensor]) -> torch.Tensor:
            return fn(Zv, sub.aux, Pv, sub.batched)

        with torch.no_grad():
            C = R if cert is None else certificate(Zs, Ps)
        scale_fn = self.scale_fn()
        if scale_fn is not None:
            scale = scale_fn(Zs, sub.aux, Ps, sub.batched)
        else:
            scale = term_scale(certificate, Zs, Ps) if sub.functional else None
        if scale is None:  # no derivatives to size the terms with: the unknowns' size, as a last resort
            scale = (1.0 + Zs.abs().amax(dim=1, keepdim=True)).expand_as(C) if Zs.shape[1] else torch.ones_like(C)
        return C.detach().cpu().numpy(), scale.detach().to(C.dtype).cpu().numpy(), None, None

    # --- adjoint cache (the closure link and the parameter path share one solve) ----------------
    def remember_adjoint(self, g: torch.Tensor, u: torch.Tensor) -> None:
        self._adjoint = (g.detach(), u.detach())

    def recall_adjoint(self, g: torch.Tensor) -> torch.Tensor | None:
        if self._adjoint is None:
            return None
        g0, u0 = self._adjoint
        same = g0.shape == g.shape and (g0.data_ptr() == g.data_ptr() or bool(torch.equal(g0, g.detach())))
        return u0 if same else None




def _newton_corrected(system: System, Z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor | None:
    """z - J^{-1} F(z) for one instance (dense; small systems only): the answer the black box would give
    if it were exact, to tell a rounded answer from a wrong one. None when it cannot be had cheaply."""
    n = Z.shape[1]
    if n == 0 or n > 200 or not system.functional:
        return None
    try:
        with torch.enable_grad():
            Zl = Z.detach().requires_grad_(True)
            R = system(Zl, [p.detach() for p in params])
            J = torch.stack([torch.autograd.grad(R[0, i], Zl, retain_graph=True)[0][0] for i in range(n)])
        step = torch.linalg.solve(J, R.detach()[0])
    except Exception:  # noqa: BLE001 - only a diagnosis: no correction, no claim about rounding
        return None
    return (Z[0] - step).detach()


def _reaches_other_leaves(R: torch.Tensor, leaves: list[torch.Tensor]) -> bool:
    """Whether R's graph reaches tensors that require grad besides `leaves` (closure captures)."""
    own = {id(t) for t in leaves}
    stack, seen = [R.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf
            if id(variable) not in own:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
