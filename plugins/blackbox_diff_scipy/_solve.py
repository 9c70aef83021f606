"""The black box of the scipy backend: one instance solved by scipy.optimize, fed torch derivatives."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from blackbox_diff import InputError, KKTSolution, SolverError

from ._polish import polish_kkt

__all__ = ["DEFAULT_METHODS", "METHODS", "ScipySolve"]

DEFAULT_METHODS = {"Argmin": "BFGS", "KKT": "SLSQP", "Root": "hybr", "FixedPoint": "del2"}
METHODS: dict[str, tuple[str, ...]] = {
    "Argmin": ("BFGS", "L-BFGS-B", "Newton-CG", "CG", "TNC", "SLSQP", "trust-ncg", "trust-krylov",
               "trust-exact", "trust-constr", "Nelder-Mead", "Powell"),
    "KKT": ("SLSQP", "trust-constr"),
    "Root": ("hybr", "lm", "broyden1", "broyden2", "anderson", "linearmixing", "diagbroyden",
             "excitingmixing", "krylov", "df-sane"),
    "FixedPoint": ("del2", "iteration"),
}
_HESSP = {"Newton-CG", "trust-ncg", "trust-krylov", "trust-constr"}
_HESS = {"trust-exact"}
_NO_JAC = {"Nelder-Mead", "Powell"}
_ROOT_JAC = {"hybr", "lm"}


def _tensor(v: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(shape)


def _flat_jacobian(fn: Any, x: torch.Tensor) -> np.ndarray:
    out = torch.func.jacrev(lambda y: fn(y).reshape(-1))(x)
    return out.reshape(out.shape[0], -1).detach().numpy()


class _Derivatives:
    """scipy's callbacks (flat float64 vectors in, numpy out) for torch functions of (x, *params)."""

    def __init__(self, shape: tuple[int, ...], params: tuple) -> None:
        self.shape, self.params = shape, params

    def x(self, v: np.ndarray) -> torch.Tensor:
        return _tensor(v, self.shape)

    def scalar(self, f: Any) -> Any:
        return lambda y: f(y, *self.params).reshape(())

    def value_and_grad(self, f: Any) -> Any:
        def fun(v):
            x = self.x(v).requires_grad_(True)
            value = f(x, *self.params).reshape(())
            (grad,) = torch.autograd.grad(value, x)
            return float(value.detach()), grad.reshape(-1).numpy()

        return fun

    def values(self, c: Any) -> Any:
        return lambda v: c(self.x(v), *self.params).reshape(-1).detach().numpy()

    def jacobian(self, c: Any) -> Any:
        return lambda v: _flat_jacobian(lambda y: c(y, *self.params), self.x(v))

    def hessian(self, f: Any) -> Any:
        return lambda v: _flat_jacobian(torch.func.grad(self.scalar(f)), self.x(v))

    def hessp(self, f: Any) -> Any:
        def hvp(v, p):
            # H p as the VJP of the gradient (H is symmetric): reverse over reverse, so it also runs when the
            # layer is called under torch.autograd.forward_ad, whose levels do not nest.
            _, vjp = torch.func.vjp(torch.func.grad(self.scalar(f)), self.x(v))
            return vjp(self.x(p))[0].reshape(-1).detach().numpy()

        return hvp

    def weighted_hessian(self, c: Any) -> Any:
        """(v, m) -> Hessian of m^T c at v (trust-constr's constraint Hessian)."""

        def hess(v, m):
            mult = torch.as_tensor(np.asarray(m, dtype=np.float64))
            return _flat_jacobian(torch.func.grad(lambda y: (mult * c(y, *self.params)).sum()), self.x(v))

        return hess


class ScipySolve:
    """Solve one instance: ``solve(*numpy_params) -> x`` (or a `KKTSolution` for trust-constr).

    Attributes:
        kind: "Argmin", "KKT", "Root" or "FixedPoint".
        method: the scipy method.
    """

    def __init__(self, kind, problem, method, opts, x_shape, lb, ub) -> None:
        self.kind, self.problem, self.method, self.opts = kind, problem, method, opts
        self.x_shape, self.lb, self.ub = x_shape, lb, ub
        self._last: np.ndarray | None = None
        call = "minimize" if kind in ("Argmin", "KKT") else "root" if kind == "Root" else "fixed_point"
        self.__name__ = f"scipy.optimize.{call}[{method}]"

    def __repr__(self) -> str:
        return f"ScipySolve({self.kind}, method={self.method!r})"

    def __call__(self, *params: np.ndarray) -> Any:
        tp = tuple(torch.as_tensor(np.asarray(p, dtype=np.float64)) for p in params)
        x0 = self._start(params)
        solver = {"Argmin": self._argmin, "KKT": self._kkt, "Root": self._root, "FixedPoint": self._fixed_point}
        # scipy is fed gradients from torch autograd: they are needed even when the caller is under
        # torch.no_grad() (inference, bbd.check_gradients' finite differences).
        with torch.enable_grad():
            result = solver[self.kind](x0, tp)
        if self.opts.warm_start:
            x = result.x if isinstance(result, KKTSolution) else result
            self._last = np.array(x, dtype=np.float64)
        return result

    def _start(self, params: tuple) -> np.ndarray:
        x0 = self.opts.x0
        if self.opts.warm_start and self._last is not None:
            return self._last.copy()
        if callable(x0):
            x0 = x0(*params)
        if x0 is None:
            if self.x_shape is None:
                raise InputError(
                    "The scipy backend needs a starting point: pass x0=array (or a callable x0(*params)), or "
                    "variables=[shape] to start from zeros."
                )
            return np.zeros(self.x_shape)
        x0 = np.array(x0, dtype=np.float64)
        if self.x_shape is not None and x0.shape != tuple(self.x_shape):
            raise InputError(f"x0 has shape {x0.shape}; variables declares {tuple(self.x_shape)}. Make them agree.")
        return x0

    def _fail(self, what: str, res: Any) -> None:
        raise SolverError(
            f"scipy {what} (method={self.method!r}) failed: {getattr(res, 'message', res)} "
            f"(status {getattr(res, 'status', None)}). Try another method, a better x0, a larger maxiter, or "
            "looser tol.",
            backend="scipy",
            status=getattr(res, "status", None),
        )

    # --- Argmin -------------------------------------------------------------------------------------
    def _argmin(self, x0: np.ndarray, tp: tuple) -> np.ndarray:
        from scipy.optimize import Bounds, minimize

        d, f = _Derivatives(x0.shape, tp), self.problem.f
        fun = d.value_and_grad(f)
        kw: dict[str, Any] = {"method": self.method, "tol": self.opts.tol, "options": self._options()}
        if self.method in _NO_JAC:
            kw["fun"] = lambda v: fun(v)[0]
        else:
            kw["fun"], kw["jac"] = fun, True
        if self.method in _HESSP:
            kw["hessp"] = d.hessp(f)
        if self.method in _HESS:
            kw["hess"] = d.hessian(f)
        start = x0.reshape(-1)
        lb = -np.inf if self.lb is None else self.lb.reshape(-1)
        ub = np.inf if self.ub is None else self.ub.reshape(-1)
        if self.lb is not None:
            kw["bounds"] = Bounds(lb, ub)
            start = np.clip(start, lb, ub)
        res = minimize(x0=start, **kw)
        if not res.success:
            value, grad = fun(res.x)
            projected = res.x - np.clip(res.x - grad, lb, ub)
            if not np.max(np.abs(projected), initial=0.0) <= self.opts.accept_gtol * (1 + abs(value)):
                self._fail("minimize", res)
        return res.x.reshape(x0.shape)

    def _options(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.opts.maxiter is not None:
            out["maxfev" if self.method == "hybr" else "maxiter"] = self.opts.maxiter
        return {**out, **self.opts.solver_options}

    # --- KKT ------------------------------------------------------------------------------------------
    def _kkt(self, x0: np.ndarray, tp: tuple) -> Any:
        cond, d = self.problem, _Derivatives(x0.shape, tp)
        x0t = _tensor(x0, x0.shape)
        n_eq, n_in = cond.h(x0t, *tp).numel(), cond.g(x0t, *tp).numel()
        if self.method == "SLSQP":
            return self._slsqp(x0, d, n_eq, n_in)
        return self._trust_constr(x0, d, n_eq, n_in, tp)

    def _slsqp(self, x0: np.ndarray, d: _Derivatives, n_eq: int, n_in: int) -> np.ndarray:
        from scipy.optimize import minimize

        cond = self.problem
        cons = []
        if n_eq:
            cons.append({"type": "eq", "fun": d.values(cond.h), "jac": d.jacobian(cond.h)})
        if n_in:  # scipy's convention is fun(x) >= 0
            g, jg = d.values(cond.g), d.jacobian(cond.g)
            cons.append({"type": "ineq", "fun": lambda v: -g(v), "jac": lambda v: -jg(v)})
        res = minimize(d.value_and_grad(cond.f), x0.reshape(-1), jac=True, method="SLSQP", constraints=cons,
                       tol=self.opts.tol, options={"maxiter": 500, **self._options()})
        if not res.success:
            self._fail("minimize", res)
        return res.x.reshape(x0.shape)  # SLSQP's multipliers are not exposed reliably: the engine recovers them

    def _trust_constr(self, x0: np.ndarray, d: _Derivatives, n_eq: int, n_in: int, tp: tuple) -> KKTSolution:
        from scipy.optimize import NonlinearConstraint, minimize

        cond = self.problem
        cons = []
        if n_eq:
            cons.append(NonlinearConstraint(d.values(cond.h), 0.0, 0.0, jac=d.jacobian(cond.h),
                                            hess=d.weighted_hessian(cond.h)))
        if n_in:
            cons.append(NonlinearConstraint(d.values(cond.g), -np.inf, 0.0, jac=d.jacobian(cond.g),
                                            hess=d.weighted_hessian(cond.g)))
        options = {"gtol": self.opts.tol, "xtol": self.opts.tol * 1e-3, "barrier_tol": self.opts.tol,
                   **self._options()}
        res = minimize(d.value_and_grad(cond.f), x0.reshape(-1), jac=True, hess=d.hessian(cond.f),
                       method="trust-constr", constraints=cons, options=options)
        if res.status not in (1, 2):
            self._fail("minimize", res)
        # scipy's trust-constr Lagrangian is f + v^T c with c = (h, g) as passed: our sign convention.
        nu = np.asarray(res.v[0], dtype=np.float64) if n_eq else np.zeros(0)
        lam = np.asarray(res.v[-1], dtype=np.float64) if n_in else np.zeros(0)
        x = res.x.reshape(x0.shape)
        if self.opts.polish:
            x, nu, lam = polish_kkt(cond, x, nu, lam, tp)
        return KKTSolution(x=x, eq=nu if n_eq else None, ineq=lam if n_in else None)

    # --- Root and FixedPoint ------------------------------------------------------------------------
    def _root(self, x0: np.ndarray, tp: tuple) -> np.ndarray:
        from scipy.optimize import root

        d, F = _Derivatives(x0.shape, tp), self.problem.F
        fun = d.values(F)
        jac = d.jacobian(F) if self.method in _ROOT_JAC else None
        res = root(fun, x0.reshape(-1), jac=jac, method=self.method, tol=self.opts.tol, options=self._options())
        if not res.success:
            r = np.max(np.abs(fun(res.x)), initial=0.0)
            if not r <= self.opts.accept_gtol * (1 + np.max(np.abs(res.x), initial=0.0)):
                self._fail("root", res)
        return res.x.reshape(x0.shape)

    def _fixed_point(self, x0: np.ndarray, tp: tuple) -> np.ndarray:
        from scipy.optimize import fixed_point

        T = self.problem.T

        def fun(v):
            return T(_tensor(v, x0.shape), *tp).reshape(x0.shape).detach().numpy()

        try:
            return np.asarray(
                fixed_point(fun, x0, xtol=self.opts.tol, maxiter=self.opts.maxiter or 500, method=self.method)
            )
        except RuntimeError as err:
            self._fail("fixed_point", str(err))
            raise  # unreachable: _fail raises
