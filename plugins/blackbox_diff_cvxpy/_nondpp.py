"""Non-DPP problems: canonicalise on every call and linearise the data in the parameters.

A problem that is not DPP has no affine parameter -> data map that cvxpy can build once (cvxpylayers
refuses such problems). Here each instance is canonicalised with the parameter values as constants,
and the derivative of the cone program's data (P, c, A, b) with respect to every parameter entry is taken
by central differences of the canonicalisation (exact for data affine in a parameter, O(h^2) otherwise).
The residual then uses  data(theta) ~ data0 + J (theta - theta0),  whose value at theta0 is exact and
whose theta-derivative is the data's. Cost: 2 * (number of parameter entries) + 1 canonicalisations per
instance, so this path suits problems with few parameters.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import torch

from blackbox_diff import InputError, SolverError

from ._canon import ConeLayout, build_program
from ._condition import ConeCondition
from ._problem import Canonical, Handles, build_outputs, canonicalise
from ._solvers import check_cones, solve_conic
from ._theta import ThetaPiece, sequential_pieces, theta_numpy

__all__ = ["LinearizedProgram", "compile_non_dpp"]

_LOCK = threading.Lock()


@dataclasses.dataclass
class LinearizedProgram:
    """Layout of a non-DPP problem's cone program; its data travel as a flat vector per instance."""

    n: int
    m: int
    quadratic: bool
    cones: ConeLayout
    n_theta: int
    pieces: list[ThetaPiece]

    @property
    def data_size(self) -> int:
        return self.n + self.m * self.n + self.m + (self.n * self.n if self.quadratic else 0)

    def flatten_data(self, P, c, A, b) -> np.ndarray:
        """P comes as its upper triangle (as `ConeProgram.data` gives it); the flat vector holds it full."""
        parts = [c, A.toarray().reshape(-1), b]
        if self.quadratic:
            if P is None:
                parts.append(np.zeros(self.n * self.n))
            else:
                upper = P.toarray()
                parts.append((upper + np.triu(upper, 1).T).reshape(-1))
        return np.concatenate(parts)

    def unflatten_data(self, flat: torch.Tensor):
        n, m = self.n, self.m
        c = flat[:n]
        A = flat[n : n + m * n].reshape(m, n)
        b = flat[n + m * n : n + m * n + m]
        P = flat[n + m * n + m :].reshape(n, n) if self.quadratic else None
        return P, c, A, b


def _canonical(problem, solver: str, parameters: list, values: list) -> tuple[Canonical, Any, tuple]:
    """Canonicalise with the given parameter values (treated as constants); (canonical, program, data)."""
    for p, v in zip(parameters, values, strict=True):
        p.value = v
    canonical = canonicalise(problem, solver, gp=False, ignore_dpp=True)
    program = build_program(canonical.param_prob, canonical.solver_instance, [])
    return canonical, program, program.data(np.ones(1))


def _value(piece: ThetaPiece, parameter: Any, block: np.ndarray) -> np.ndarray:
    """A parameter's full value from its (possibly lowered) block of theta."""
    if piece.gather is None:
        return block.reshape(piece.shape, order="F")
    from cvxpy.reductions.cvx_attr2constr import recover_value_for_leaf

    full = recover_value_for_leaf(parameter, block, project=False)
    return full.toarray() if hasattr(full, "toarray") else np.asarray(full)


def _placeholder(p) -> np.ndarray:
    if p.value is not None:
        return np.asarray(p.value, dtype=np.float64)
    if p.attributes.get("PSD") or p.attributes.get("symmetric"):
        return np.eye(p.shape[0])
    return np.ones(p.shape)


class NonDPPSolve:
    """The black box of one instance: canonicalise, differentiate the data by central differences, solve."""

    def __init__(self, problem, solver: str, parameters: list, layout: LinearizedProgram,
                 args: dict[str, Any], fd_step: float) -> None:
        self.problem, self.solver, self.parameters = problem, solver, parameters
        self.layout, self.args, self.fd_step = layout, args, fd_step
        self.__name__ = f"cvxpy[{solver}, non-DPP]"

    def _data(self, theta: np.ndarray) -> np.ndarray:
        values = [_value(piece, self.parameters[piece.index], theta[piece.offset : piece.offset + piece.size])
                  for piece in self.layout.pieces]
        _, program, data = _canonical(self.problem, self.solver, self.parameters, values)
        if (program.n, program.m, program.cones.describe()) != (
            self.layout.n, self.layout.m, self.layout.cones.describe()
        ):
            raise SolverError(
                "cvxpy backend: the non-DPP problem canonicalised to a different cone program for these "
                f"parameter values ({program.n} variables, {program.cones.describe()}) than at compile time "
                f"({self.layout.n} variables, {self.layout.cones.describe()}); its gradient cannot be formed. "
                "Rewrite the problem in DPP form.",
                backend="cvxpy",
            )
        return self.layout.flatten_data(*data)

    def __call__(self, *params: np.ndarray):
        theta0 = theta_numpy(self.layout.pieces, self.layout.n_theta, list(params))[:-1]
        with _LOCK:
            saved = [p.value for p in self.parameters]
            try:
                data0 = self._data(theta0)
                jac = np.zeros((data0.size, theta0.size + 1))
                for k in range(theta0.size):
                    h = self.fd_step * max(1.0, abs(theta0[k]))
                    up, down = theta0.copy(), theta0.copy()
                    up[k] += h
                    down[k] -= h
                    jac[:, k] = (self._data(up) - self._data(down)) / (2 * h)
            finally:
                for p, v in zip(self.parameters, saved, strict=True):
                    p.value = v
        P, c, A, b = self.layout.unflatten_data(torch.as_tensor(data0))
        import scipy.sparse as sp

        P = None if P is None else sp.csc_matrix(np.triu(P.numpy()))
        answer = solve_conic(self.solver, P, c.numpy(), sp.csc_matrix(A.numpy()), b.numpy(),
                             self.layout.cones, self.args)
        answer.data = (None if P is None else P.toarray() + np.triu(P.toarray(), 1).T, c.numpy(), A.numpy(),
                       b.numpy())
        return answer, data0, jac, np.append(theta0, 1.0)


def compile_non_dpp(problem, solver: str, handles: Handles, opts) -> tuple:
    """(solve factory: args -> black box, condition, outputs) for a problem that is not DPP."""
    parameters = handles.parameters
    with _LOCK:
        saved = [p.value for p in parameters]
        try:
            canonical, program, data = _canonical(problem, solver, parameters, [_placeholder(p) for p in parameters])
            outputs = build_outputs(canonical, problem, handles, False, opts.return_duals)
        except InputError:
            raise
        except Exception as err:
            raise InputError(
                f"cvxpy backend: canonicalising the non-DPP problem for {solver} failed ({err}). Give every "
                "parameter a valid value before building the layer, or rewrite the problem in DPP form."
            ) from err
        finally:
            for p, v in zip(parameters, saved, strict=True):
                p.value = v

    check_cones(canonical.param_prob, solver)
    pieces = sequential_pieces(parameters)
    layout = LinearizedProgram(
        n=program.n, m=program.m, quadratic=data[0] is not None, cones=program.cones,
        n_theta=sum(piece.size for piece in pieces), pieces=pieces,
    )
    condition = ConeCondition(layout, precondition=opts.precondition, refine=opts.refine, linearization=True,
                              dense_max=opts.dense_max, with_duals=handles.wants_duals or opts.return_duals)

    def factory(args: dict[str, Any]) -> NonDPPSolve:
        return NonDPPSolve(problem, solver, parameters, layout, args, opts.fd_step)

    return factory, condition, outputs
