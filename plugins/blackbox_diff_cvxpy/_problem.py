"""From a cvxpy problem and the user's handles to a cone program, its theta blocks and its outputs.

The user's handles are cvxpylayers': ``parameters`` lists every `cvxpy.Parameter` of the problem in call
order; ``variables`` lists the outputs, each a variable of the problem or a dual variable of one of its
constraints (``constraint.dual_variables[k]``). A geometric program (gp=True) is first reduced to a convex
one in log space by cvxpy's own `Dgp2Dcp`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from blackbox_diff import InputError

from ._outputs import LinearRead, Outputs, dual_reads, primal_read
from ._theta import ThetaPiece, build_pieces

__all__ = ["Canonical", "Handles", "build_outputs", "canonicalise", "check_handles", "check_values"]


@dataclasses.dataclass
class Handles:
    """The user's parameters and outputs. ``outputs[i]`` is ("x", variable) or ("dual", constraint index, k)."""

    parameters: list
    outputs: list[tuple]

    @property
    def wants_duals(self) -> bool:
        return any(kind == "dual" for kind, *_ in self.outputs)

    def shapes(self, problem: Any) -> list[tuple[int, ...]]:
        return [tuple(o[1].shape) if o[0] == "x" else tuple(problem.constraints[o[1]].dual_variables[o[2]].shape)
                for o in self.outputs]


def _name(p: Any) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - a name only decorates messages
        return repr(p)


def check_handles(problem: Any, parameters: Any, variables: Any, gp: bool) -> Handles:
    """Validate the problem's discipline and the user's handles (cvxpylayers' rules, clearer messages)."""
    import cvxpy as cp

    if not isinstance(problem, cp.Problem):
        raise InputError(f"The cvxpy backend expects a cvxpy.Problem; got {type(problem).__name__}.")
    if gp and not problem.is_dgp(dpp=True):
        raise InputError(
            "gp=True needs a log-log convex program (DGP) that is also DPP; problem.is_dgp(dpp=True) is False"
            f" (is_dgp() is {problem.is_dgp()}). Check the problem against cvxpy's DGP rules (positive "
            "variables and parameters, monomials and posynomials), or drop gp=True for a convex (DCP) problem."
        )
    if not gp and not problem.is_dcp():
        hint = " It is log-log convex (DGP): pass gp=True." if problem.is_dgp() else ""
        raise InputError(
            "The cvxpy problem is not DCP (disciplined convex), so it has no cone program to differentiate. "
            f"Check problem.is_dcp() and reformulate it.{hint}"
        )
    parameters = list(problem.parameters() if parameters is None else parameters)
    variables = list(problem.variables() if variables is None else variables)
    for i, p in enumerate(parameters):
        if not isinstance(p, cp.Parameter):
            raise InputError(f"parameters[{i}] is a {type(p).__name__}; expected a cvxpy.Parameter.")
    declared = {p.id for p in problem.parameters()}
    given = {p.id for p in parameters}
    if given != declared or len(given) != len(parameters):
        names = sorted(_name(p) for p in problem.parameters())
        raise InputError(
            f"parameters must list every cvxpy.Parameter of the problem exactly once; the problem has "
            f"{names}, got {[_name(p) for p in parameters]}. Pass parameters=[...] with all of them."
        )
    primal = {v.id for v in problem.variables()}
    duals = {dv.id: (c, k) for c, con in enumerate(problem.constraints) for k, dv in enumerate(con.dual_variables)}
    outputs: list[tuple] = []
    for i, v in enumerate(variables):
        if isinstance(v, cp.Variable) and v.id in primal:
            outputs.append(("x", v))
        elif isinstance(v, cp.Variable) and v.id in duals:
            outputs.append(("dual", *duals[v.id]))
        else:
            raise InputError(
                f"variables[{i}] ({v!r}) is neither a cvxpy.Variable of the problem nor a dual variable of one of "
                "its constraints; pass variables of the problem or constraint.dual_variables[k] of one of "
                "problem.constraints."
            )
    return Handles(parameters, outputs)


@dataclasses.dataclass
class Canonical:
    """A problem canonicalised for one solver, with what is needed to read the answer back.

    Attributes:
        param_prob: cvxpy's `ParamConeProg`.
        solver_instance: the chain's solver reduction (its PSD triangle convention).
        reductions, inverses: the chain before the solver (with `Dgp2Dcp` first for a geometric program),
            whose inversion maps the cone program's dual to the constraints' dual values.
        var_ids: user variable id -> cone program variable id, where cvxpy replaced the variable.
        param_ids: user (or log-space) parameter id -> cone program parameter id, where replaced.
        log_ids: geometric programs: user parameter id -> its log-space parameter's id.
    """

    param_prob: Any
    solver_instance: Any
    reductions: list
    inverses: list
    var_ids: dict[int, int]
    param_ids: dict[int, int]
    log_ids: dict[int, int] | None = None

    def pieces(self, parameters: list) -> list[ThetaPiece]:
        return build_pieces(self.param_prob, parameters, self.param_ids, self.log_ids)


def _single(mapping: dict) -> dict[int, int]:
    return {k: v[0] for k, v in mapping.items() if len(v) == 1}


def canonicalise(problem: Any, solver: str, gp: bool, ignore_dpp: bool = False,
                 canon_backend: str | None = None) -> Canonical:
    """cvxpy's canonicalisation for `solver` (a geometric program through `Dgp2Dcp` first)."""
    import cvxpy as cp

    front, front_inverse, var_ids, log_ids = [], [], {}, None
    target = problem
    if gp:
        dgp = cp.reductions.Dgp2Dcp(problem)
        target, dgp_inverse = dgp.apply(problem)
        front, front_inverse = [dgp], [dgp_inverse]
        var_ids = _single(dgp.var_id_map)
        log_ids = _single(dgp.param_id_map)
    try:
        data, chain, inverse = target.get_problem_data(solver, ignore_dpp=ignore_dpp, canon_backend=canon_backend)
    except cp.error.SolverError as err:
        raise InputError(
            f"cvxpy cannot pass this problem to {solver}: {err}. Pick a solver that supports its cones "
            "(CLARABEL supports LP, QP, SOCP, SDP, exponential and power cones)."
        ) from err
    if data.get("lower_bounds") is not None or data.get("upper_bounds") is not None:
        raise InputError(
            "The cvxpy backend does not support variable bounds (Variable(bounds=...)); write them as "
            "constraints instead."
        )
    chain_vars = _single(chain.compose_var_id_map()) if hasattr(chain, "compose_var_id_map") else {}
    var_ids = {**chain_vars, **{k: chain_vars.get(v, v) for k, v in var_ids.items()}}
    param_ids = _single(chain.compose_param_id_map()) if hasattr(chain, "compose_param_id_map") else {}
    return Canonical(data["param_prob"], chain.reductions[-1], front + chain.reductions[:-1],
                     front_inverse + inverse[:-1], var_ids, param_ids, log_ids)


def _spans(param_prob: Any) -> dict[int, int]:
    cols = sorted(param_prob.var_id_to_col.values()) + [int(param_prob.x.size)]
    return {c: cols[i + 1] - c for i, c in enumerate(cols[:-1])}


def build_outputs(canonical: Canonical, problem: Any, handles: Handles, gp: bool, return_duals: bool) -> Outputs:
    """The `Outputs` of the layer: variables and requested duals, then every constraint's with return_duals."""
    pp = canonical.param_prob
    cols, spans = pp.var_id_to_col, _spans(pp)
    m = int(sum(int(con.size) for con in pp.constraints))
    need = handles.wants_duals or return_duals
    constraints = list(problem.constraints)
    duals = dual_reads(constraints, canonical.reductions, canonical.inverses, pp, m) if need else []
    reads: list[LinearRead] = []
    for kind, *where in handles.outputs:
        if kind == "x":
            (v,) = where
            vid = canonical.var_ids.get(v.id, v.id)
            if vid not in cols and v.size == 0:  # cvxpy drops empty variables; their value is empty
                reads.append(LinearRead("x", np.zeros(0, dtype=np.int64), tuple(v.shape)))
                continue
            if vid not in cols:
                raise InputError(
                    f"Variable {v.name()} does not appear in the cone program cvxpy built (it was eliminated, "
                    "e.g. it occurs in no constraint and not in the objective); its value is arbitrary. Leave it "
                    "out of variables=[...]."
                )
            reads.append(primal_read(v, int(cols[vid]), spans[int(cols[vid])], exp=gp))
            continue
        c, k = where
        if duals[c] is None:
            raise InputError(
                f"The dual variable {k} of constraint {c} ({constraints[c]}) has no counterpart in the cone "
                "program cvxpy built (the constraint was eliminated); cvxpy gives it no dual_value either."
            )
        reads.append(duals[c][k])
    return Outputs(int(pp.x.size), reads, duals if return_duals else None)


def check_values(parameters: list, names: list[str], values: list[torch.Tensor], logged: set[int]) -> None:
    """Reject parameter values the problem's analysis excludes: non-positive values of a geometric
    program's parameters that it solves with in log space (`logged`: their indices), and values against a
    parameter's declared sign (pos, nonneg, neg, nonpos)."""
    for i, (p, name, value) in enumerate(zip(parameters, names, values, strict=False)):
        if not torch.is_tensor(value) or value.numel() == 0:
            continue
        attrs = getattr(p, "attributes", {}) or {}
        if i in logged:
            rule = ("positive", lambda v: v > 0, "gp=True solves the problem with its logarithm")
        elif attrs.get("pos"):
            rule = ("positive", lambda v: v > 0, "the parameter is declared pos=True")
        elif attrs.get("nonneg"):
            rule = ("non-negative", lambda v: v >= 0, "the parameter is declared nonneg=True")
        elif attrs.get("neg"):
            rule = ("negative", lambda v: v < 0, "the parameter is declared neg=True")
        elif attrs.get("nonpos"):
            rule = ("non-positive", lambda v: v <= 0, "the parameter is declared nonpos=True")
        else:
            continue
        word, ok, why = rule
        with torch.no_grad():
            good = ok(value.detach())
            if bool(good.all()):
                continue
            where = "" if value.dim() == 0 else f" at indices {(~good).nonzero()[:5].tolist()}"
            first = float(value.detach()[~good].flatten()[0])
        raise InputError(
            f"{name[:1].upper()}{name[1:]} must be {word} ({why}); got {first:g}{where}. Pass {word} "
            "values" + (", e.g. through torch.exp or softplus of an unconstrained tensor." if word == "positive"
                        else ".")
        )
