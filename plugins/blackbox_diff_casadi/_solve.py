"""The black box: one CasADi nlpsol call per instance, with optional warm starts across calls."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from blackbox_diff import SolverError
from blackbox_diff_casadi._condition import CasadiSolution
from blackbox_diff_casadi._kkt import KKTKernels
from blackbox_diff_casadi._nlp import CanonicalNLP

__all__ = ["CasadiSolver", "default_solver_options"]

_QUIET: dict[str, dict[str, Any]] = {
    "ipopt": {"print_time": False, "ipopt.print_level": 0, "ipopt.sb": "yes"},
    "sqpmethod": {
        "print_time": False, "print_header": False, "print_iteration": False, "print_status": False,
        "qpsol": "qrqp", "qpsol_options": {"print_iter": False, "print_header": False, "error_on_fail": False},
    },
    "feasiblesqpmethod": {"print_time": False, "print_header": False, "print_iteration": False},
}

# IPOPT restarted from a primal-dual point: start barrier small and do not push the point off its bounds.
_IPOPT_WARM = {
    "ipopt.warm_start_init_point": "yes",
    "ipopt.mu_init": 1e-6,
    "ipopt.warm_start_bound_push": 1e-9,
    "ipopt.warm_start_bound_frac": 1e-9,
    "ipopt.warm_start_slack_bound_push": 1e-9,
    "ipopt.warm_start_slack_bound_frac": 1e-9,
    "ipopt.warm_start_mult_bound_push": 1e-9,
}


def default_solver_options(plugin: str) -> dict[str, Any]:
    """The options the backend passes to nlpsol before the user's (quiet output)."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in _QUIET.get(plugin, {"print_time": False}).items()}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class CasadiSolver:
    """``solver(*params) -> CasadiSolution``: the real nlpsol, per instance.

    Attributes:
        last_stats: the nlpsol statistics of the most recent call (``iter_count``, ``return_status``...).
        calls: how many instances have been solved.
    """

    def __init__(self, nlp: CanonicalNLP, kernels: KKTKernels, plugin: str, options: dict[str, Any],
                 warm_start: bool, expand: bool | None, x0: np.ndarray | None = None) -> None:
        import casadi as ca

        self.plugin, self.warm_start = plugin, warm_start
        self._bounds_g = kernels.bounds_g
        self.n_p = int(nlp.p.numel())
        self.lbx, self.ubx = nlp.lbx, nlp.ubx
        self.bounded_x = nlp.bounded_x
        self.x0 = nlp.x0 if x0 is None else np.asarray(x0, dtype=np.float64).reshape(-1)
        opts = _merge(default_solver_options(plugin), options)
        if expand and kernels.symbolic == "MX":
            opts["expand"] = True
        try:
            self._cold = ca.nlpsol("bbd_casadi", plugin, kernels.solver_problem, opts)
            self._warm = None
            if warm_start:
                wopts = _merge(_IPOPT_WARM, opts) if plugin == "ipopt" else opts
                self._warm = ca.nlpsol("bbd_casadi_warm", plugin, kernels.solver_problem, wopts)
        except RuntimeError as err:
            raise SolverError(
                f"casadi.nlpsol could not build the {plugin!r} solver: {str(err).strip().splitlines()[-1]}. "
                "Check the plugin name (casadi.has_nlpsol) and its solver_options.",
                backend="casadi",
            ) from err
        self._state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._solve_lock = threading.Lock()
        self.last_stats: dict[str, Any] = {}
        self.calls = 0
        self.__name__ = f"casadi.nlpsol({plugin!r})"

    def __getstate__(self) -> dict:
        """Picklable for executor='processes': CasADi Functions travel in CasADi's own serialisation."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_solve_lock", "last_stats")}
        for key in ("_cold", "_warm", "_bounds_g"):
            state[key] = None if state[key] is None else state[key].serialize()
        return state

    def __setstate__(self, state: dict) -> None:
        import casadi as ca

        for key in ("_cold", "_warm", "_bounds_g"):
            if state[key] is not None:
                state[key] = ca.Function.deserialize(state[key])
        self.__dict__.update(state)
        self._lock, self._solve_lock, self.last_stats = threading.Lock(), threading.Lock(), {}

    def reset(self) -> None:
        """Forget the warm-start point: the next call starts from the problem's initial guess."""
        with self._lock:
            self._state = None

    def __call__(self, *params: Any) -> CasadiSolution:
        p = np.concatenate([np.asarray(q, dtype=np.float64).reshape(-1, order="F") for q in params]) \
            if params else np.zeros(0)
        lbg, ubg = self._bounds_g(p)
        args: dict[str, Any] = {"p": p, "lbg": lbg, "ubg": ubg, "lbx": self.lbx, "ubx": self.ubx, "x0": self.x0}
        solver = self._cold
        with self._lock:
            state = self._state
        if self.warm_start and state is not None:
            args.update(x0=state[0], lam_g0=state[1], lam_x0=state[2])
            solver = self._warm
        try:
            with self._solve_lock:  # one nlpsol instance is not safe to call from two threads at once
                out = solver(**args)
                stats = solver.stats()
        except RuntimeError as err:
            raise SolverError(
                f"CasADi {self.plugin} raised: {str(err).strip().splitlines()[-1]}. Check the problem at these "
                "parameters (NaN in the model, a failing function evaluation).", backend="casadi",
            ) from err
        self.last_stats, self.calls = stats, self.calls + 1
        status = str(stats.get("return_status", stats.get("success")))
        if not stats.get("success", False):
            raise SolverError(
                f"CasADi {self.plugin} did not converge: return_status={status!r} after "
                f"{stats.get('iter_count', '?')} iterations. Expected a successful solve; no gradient is "
                "returned for a non-converged point. Check feasibility of the problem at these parameters, "
                "give a better initial guess, or raise the solver's iteration limit (solver_options).",
                backend="casadi", status=status,
            )
        x = np.asarray(out["x"]).reshape(-1)
        lam_g = np.asarray(out["lam_g"]).reshape(-1)
        lam_x = np.asarray(out["lam_x"]).reshape(-1)
        if self.warm_start:
            with self._lock:
                self._state = (x, lam_g, lam_x)
        lam = np.concatenate([lam_g, lam_x[self.bounded_x]])
        return CasadiSolution(x, lam, status, stats.get("iter_count"))
