"""A CasADi problem (an `Opti` or an nlpsol dict) brought to one canonical parametric NLP.

    min_x f(x, p)   s.t.   lb(p) <= c(x, p) <= ub(p),

where c stacks the general constraints g and the simple bounds on x that are finite, p stacks the layer's
declared parameters (column-major, CasADi's `vec`), and the multipliers follow CasADi's sign convention:
L = f + lam^T c, lam > 0 where an upper bound is active, lam < 0 where a lower bound is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from blackbox_diff import InputError

__all__ = ["CanonicalNLP", "Handle", "from_dict", "from_opti"]


@dataclasses.dataclass
class Handle:
    """Where one declared parameter or variable lives in the stacked vector (column-major)."""

    name: str
    shape: tuple[int, ...]  # the torch shape: () for 1x1, (n,) for nx1, (n, m) otherwise
    index: np.ndarray  # positions in the stacked vector, in CasADi (column-major) order


@dataclasses.dataclass
class CanonicalNLP:
    """The symbolic NLP plus what the solver call needs (all CasADi objects, one symbolic type)."""

    x: Any  # symbolic decision vector (n x 1)
    p: Any  # symbolic stacked parameters (np x 1), purely symbolic
    f: Any
    g: Any  # general constraints (the solver's g)
    lbg: Any  # expressions in p (Opti) or constants
    ubg: Any
    lbx: np.ndarray  # simple bounds on x (n,), may be infinite
    ubx: np.ndarray
    x0: np.ndarray  # default initial guess
    parameters: list[Handle]
    variables: list[Handle]
    bounded_x: np.ndarray  # indices of x with a finite simple bound (rows appended to c)

    @property
    def n(self) -> int:
        return int(self.x.numel())

    @property
    def m(self) -> int:
        return int(self.g.numel()) + len(self.bounded_x)


def _name(expr: Any, fallback: str) -> str:
    try:
        return str(expr.name()) if expr.is_symbolic() else fallback
    except RuntimeError:  # an SX vector has no single name
        return fallback


def _torch_shape(expr: Any) -> tuple[int, ...]:
    r, c = expr.size1(), expr.size2()
    if c == 1:
        return () if r == 1 else (r,)
    return (r, c)


def _selection(ca: Any, expr: Any, x: Any, what: str, i: int) -> np.ndarray:
    """Indices k such that vec(expr) == x[k]; InputError when expr is not a plain selection of x."""
    flat = ca.vec(expr)
    J = ca.Function("sel", [x], [ca.jacobian(flat, x), flat])
    jac, at0 = J(np.zeros(x.numel()))
    jac = np.asarray(ca.DM(jac).full())
    rows_ok = np.all((jac == 0) | (jac == 1), axis=1) & (np.count_nonzero(jac, axis=1) == 1)
    if ca.depends_on(ca.jacobian(flat, x), x) or not rows_ok.all() or np.any(np.asarray(at0.full()) != 0):
        raise InputError(
            f"{what}[{i}] is not a decision variable of the problem (or a slice of one): {str(expr)[:60]!r}. "
            f"Pass variables created with opti.variable(...) (or entries of the nlp's 'x')."
        )
    return np.argmax(jac, axis=1).astype(np.int64)


def _symbol_names(ca: Any, expr: Any) -> list[str]:
    return [_name(s, "?") for s in ca.symvar(expr)]


def _parameter_symbols(ca: Any, params: Sequence[Any], all_syms: list[Any], what: str) -> None:
    names = {_name(s, "") for s in all_syms}
    seen: list[str] = []
    for i, s in enumerate(params):
        ok = hasattr(s, "is_valid_input") and s.is_valid_input() and s.numel() > 0
        own = _symbol_names(ca, s) if ok else []
        if not ok or not set(own) <= names:
            raise InputError(
                f"parameters[{i}] must be one of the problem's parameter symbols ({', '.join(sorted(names))}); "
                f"got {str(s)[:60]!r}. Pass the objects returned by {what}."
            )
        seen += own
    if len(set(seen)) != len(seen):
        raise InputError(f"parameters lists a symbol twice: {seen}. Pass each parameter once.")


def _handles(ca: Any, syms: Sequence[Any]) -> list[Handle]:
    out, start = [], 0
    for s in syms:
        k = s.numel()
        out.append(Handle(_name(s, "p"), _torch_shape(s), np.arange(start, start + k)))
        start += k
    return out


def from_opti(opti: Any, parameters: Sequence[Any] | None, variables: Sequence[Any] | None) -> CanonicalNLP:
    """Canonical NLP of a `casadi.Opti`; parameters not declared are frozen at their `set_value`."""
    import casadi as ca

    all_p = ca.symvar(opti.p)
    params = list(all_p if parameters is None else parameters)
    _parameter_symbols(ca, params, all_p, "opti.parameter(...)")
    listed = {s.name() for s in params}
    frozen = [s for s in all_p if s.name() not in listed]
    values = opti.value_parameters()
    f, g, lbg, ubg = opti.f, opti.g, opti.lbg, opti.ubg
    if frozen:
        try:
            vals = [ca.DM(opti.debug.value(s, values)) for s in frozen]
        except RuntimeError as err:
            raise InputError(
                f"The Opti parameters {[s.name() for s in frozen]} are not in `parameters` and have no value. "
                "Declare them as layer parameters, or give them a value with opti.set_value(...)."
            ) from err
        if any(np.isnan(v.full()).any() for v in vals):
            raise InputError(
                f"The Opti parameters {[s.name() for s in frozen]} are not in `parameters` and have no value. "
                "Declare them as layer parameters, or give them a value with opti.set_value(...)."
            )
        exprs = ca.substitute([f, g, lbg, ubg], frozen, [ca.MX(v) for v in vals])
        f, g, lbg, ubg = exprs
    p = ca.vertcat(*[ca.vec(s) for s in params]) if params else ca.MX(0, 1)
    x = opti.x
    var_syms = ca.symvar(x) if variables is None else list(variables)
    vhandles = []
    for i, v in enumerate(var_syms):
        name = _name(v, f"variables[{i}]")
        vhandles.append(Handle(name, _torch_shape(v), _selection(ca, v, x, "variables", i)))
    x0 = np.asarray(opti.debug.value(x, opti.initial()), dtype=np.float64).reshape(-1)
    n = int(x.numel())
    return CanonicalNLP(
        x=x, p=p, f=f, g=g, lbg=lbg, ubg=ubg,
        lbx=np.full(n, -np.inf), ubx=np.full(n, np.inf), x0=np.nan_to_num(x0),
        parameters=_handles(ca, params), variables=vhandles, bounded_x=np.zeros(0, dtype=np.int64),
    )


def _bound(value: Any, size: int, default: float, key: str) -> np.ndarray:
    if value is None:
        return np.full(size, default)
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(size, float(arr[0]))
    if arr.size != size:
        raise InputError(f"Bound {key!r} has {arr.size} entries; expected 1 or {size} (one per row).")
    return arr


_DICT_KEYS = ("x", "p", "f", "g", "lbx", "ubx", "lbg", "ubg", "x0")


def from_dict(
    nlp: dict, parameters: Sequence[Any] | None, variables: Sequence[Any] | None, bounds: dict[str, Any]
) -> CanonicalNLP:
    """Canonical NLP of an nlpsol dict {'x', 'p', 'f', 'g'} (+ optional 'lbx', 'ubx', 'lbg', 'ubg', 'x0')."""
    import casadi as ca

    unknown = sorted(set(nlp) - set(_DICT_KEYS))
    if unknown or "x" not in nlp or "f" not in nlp:
        raise InputError(
            f"An NLP dict needs keys 'x' and 'f' (and optionally {', '.join(_DICT_KEYS[1:])}); got keys "
            f"{sorted(nlp)}. Build it like casadi.nlpsol's problem: {{'x': x, 'p': p, 'f': f, 'g': g}}."
        )
    x = nlp["x"]
    kind = type(x)
    p_in = nlp.get("p", kind(0, 1))
    g = nlp.get("g", kind(0, 1))
    f = nlp["f"]
    all_p = ca.symvar(p_in)
    params = [p_in] if parameters is None and p_in.numel() else list(parameters or [])
    if parameters is not None:
        _parameter_symbols(ca, params, all_p, "SX.sym/MX.sym for the nlp's 'p'")
        missing = {_name(s, "?") for s in all_p} - {n for s in params for n in _symbol_names(ca, s)}
        if missing:
            raise InputError(
                f"The nlp's 'p' contains symbols {sorted(missing)} that are not in `parameters`. List every "
                "parameter symbol (an NLP dict has no stored parameter values)."
            )
    p = ca.vertcat(*[ca.vec(s) for s in params]) if params else kind(0, 1)
    n, ng = int(x.numel()), int(g.numel())
    merged = {k: nlp.get(k, bounds.get(k)) for k in ("lbx", "ubx", "lbg", "ubg", "x0")}
    lbx, ubx = _bound(merged["lbx"], n, -np.inf, "lbx"), _bound(merged["ubx"], n, np.inf, "ubx")
    lbg, ubg = _bound(merged["lbg"], ng, -np.inf, "lbg"), _bound(merged["ubg"], ng, np.inf, "ubg")
    x0 = _bound(merged["x0"], n, 0.0, "x0")
    if params and p_in.is_valid_input() and parameters is None:
        phandles = [Handle("p", _torch_shape(p_in), np.arange(p_in.numel()))]
        p = ca.vec(p_in)
    else:
        phandles = _handles(ca, params)
    var_syms = [x] if variables is None else list(variables)
    vhandles = []
    for i, v in enumerate(var_syms):
        name = _name(v, f"variables[{i}]")
        vhandles.append(Handle(name, _torch_shape(v), _selection(ca, v, x, "variables", i)))
    bounded = np.nonzero(np.isfinite(lbx) | np.isfinite(ubx))[0].astype(np.int64)
    return CanonicalNLP(
        x=x, p=p, f=f, g=g, lbg=ca.DM(lbg), ubg=ca.DM(ubg), lbx=lbx, ubx=ubx, x0=x0,
        parameters=phandles, variables=vhandles, bounded_x=bounded,
    )
