"""`bbd.QPLayer`: dense QPs with tensor inputs in qpth's convention, on the "qp" backend.

    z = QPLayer()(Q, p, G, h, A, b)   solves   min 1/2 z^T Q z + p^T z   s.t.  G z <= h,  A z = b

for each instance of a batch. This module only parses qpth's argument conventions (batched or shared
arguments, empty tensors for absent constraints, float32 or float64, any device) and calls a `bbd.layer`
built on `QuadraticProgram` by the QP backend plugin (real QP solvers as black boxes, exact active sets,
the engine's implicit gradient). It holds no solver code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from blackbox_diff._errors import InputError
from blackbox_diff.api import Layer, layer
from blackbox_diff.conditions import KKTSolution

__all__ = ["QPLayer", "QuadraticProgram"]

_NAMES = ("Q", "p", "G", "h", "A", "b")


@dataclasses.dataclass(frozen=True)
class QuadraticProgram:
    """The problem the "qp" backend compiles: min 1/2 z^T Q z + p^T z s.t. Gz <= h, Az = b, with sizes.

    Every matrix and vector is a parameter of the layer, in the order (Q, p, G, h, A, b), with shapes
    (n, n), (n,), (n_ineq, n), (n_ineq,), (n_eq, n), (n_eq,).
    """

    n: int
    n_ineq: int = 0
    n_eq: int = 0


class QPLayer(torch.nn.Module):
    """A differentiable dense QP layer with qpth's call convention (a drop-in for ``qpth.qp.QPFunction``).

    ``QPLayer()(Q, p, G, h, A, b)`` returns z* of shape (batch, n), as qpth does (batch 1 when no argument
    is batched). Each argument is either shared, with its own shape ((n, n), (n,), (m, n), (m,), (k, n),
    (k,)), or batched with one more leading dimension; empty tensors (``torch.empty(0)``) for A and b (or G
    and h) mean no such constraints. float32 and float64 inputs give outputs of their dtype (solved and
    differentiated in float64); tensors on any device are solved on the CPU and differentiated on theirs.

    Args:
        solver: None or "auto" (DAQP, a dense active-set solver, for all but large sparse problems), or a
            qpsolvers name: "daqp", "proxqp", "osqp", "piqp", "clarabel", "highs", "quadprog", "ecos", "scs".
        **options: `bbd.implicit` options (``on_failure="nan"``, ``executor="threads"``, ``return_duals=True``
            to get a `bbd.KKTSolution` (x, eq, ineq), ...) and the QP backend's (``solver_settings``,
            ``check_psd``, ``active_tol``, ``dense_max``).

    Raises:
        InputError: an unknown option or solver name.
        BackendUnavailableError: qpsolvers or the named solver is not installed (with the pip command).
    """

    def __init__(self, solver: str | None = None, **options: Any) -> None:
        super().__init__()
        self.solver = solver or "auto"
        self.options = dict(options)
        self._layers: dict[tuple[int, int, int], Layer] = {}
        self._build(QuadraticProgram(1))  # validates the options and the solver now, not at the first call

    def extra_repr(self) -> str:
        return f"solver={self.solver!r}" + "".join(f", {k}={v!r}" for k, v in self.options.items())

    def _build(self, problem: QuadraticProgram) -> Layer:
        key = (problem.n, problem.n_ineq, problem.n_eq)
        if key not in self._layers:
            self._layers[key] = layer(problem, backend="qp", solver=self.solver, **self.options)
        return self._layers[key]

    def forward(self, Q: Any, p: Any, G: Any, h: Any, A: Any, b: Any) -> Any:
        args = _tensors((Q, p, G, h, A, b))
        dtype = _dtype(args)
        device = args[0].device
        n = _size_n(args[0])
        args = _with_empties(args, n, dtype, device)
        m, k = args[2].shape[-2], args[4].shape[-2]
        args, batch = _broadcast(args, n, m, k)
        work = [a.to(torch.float64) for a in args]
        out = self._build(QuadraticProgram(n, m, k))(*work)
        out = tuple(o if batch else o.unsqueeze(0) for o in out)
        out = tuple(o.to(dtype) for o in out)
        return KKTSolution(*out) if len(out) == 3 else out[0]


def _tensors(values: tuple) -> list[torch.Tensor]:
    out = []
    for name, v in zip(_NAMES, values, strict=True):
        if v is None:
            v = torch.empty(0, dtype=torch.float64)
        if not torch.is_tensor(v):
            try:
                v = torch.as_tensor(v, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise InputError(f"QPLayer: {name} is a {type(v).__name__}; expected a tensor ({err}).") from err
        if v.dtype not in (torch.float32, torch.float64):
            raise InputError(
                f"QPLayer: {name} has dtype {v.dtype}; expected float32 or float64. Convert it with .double()."
            )
        out.append(v)
    return out


def _dtype(args: list[torch.Tensor]) -> torch.dtype:
    dtype = args[0].dtype
    for a in args[1:]:
        if a.numel():
            dtype = torch.promote_types(dtype, a.dtype)
    return dtype


def _size_n(Q: torch.Tensor) -> int:
    if Q.dim() not in (2, 3) or Q.shape[-1] != Q.shape[-2] or Q.shape[-1] == 0:
        raise InputError(
            f"QPLayer: Q has shape {tuple(Q.shape)}; expected a square (n, n) matrix or a batch (batch, n, n) "
            "with n >= 1."
        )
    return int(Q.shape[-1])


def _with_empties(args: list[torch.Tensor], n: int, dtype, device) -> list[torch.Tensor]:
    """Empty G/h or A/b (qpth users pass torch.empty(0)) become (0, n) and (0,) on the call's device."""
    out = list(args)
    for i in (2, 4):
        mat, vec = args[i], args[i + 1]
        if mat.numel() == 0 and vec.numel() == 0:
            out[i] = torch.zeros(0, n, dtype=dtype, device=device)
            out[i + 1] = torch.zeros(0, dtype=dtype, device=device)
        elif mat.numel() == 0 or vec.numel() == 0:
            raise InputError(
                f"QPLayer: {_NAMES[i]} has shape {tuple(mat.shape)} but {_NAMES[i + 1]} has shape {tuple(vec.shape)}; "
                "expected both empty (no such constraints) or both non-empty."
            )
    return out


def _broadcast(args: list[torch.Tensor], n: int, m: int, k: int) -> tuple[list[torch.Tensor], int | None]:
    """Check every shape against (n, m, k) and settle the batch: each argument shared (its own shape)
    or batched (one more leading dimension); batch sizes agree, a batch of one broadcasts."""
    shapes = [(n, n), (n,), (m, n), (m,), (k, n), (k,)]
    sizes: dict[str, int] = {}
    for name, a, shape in zip(_NAMES, args, shapes, strict=True):
        if tuple(a.shape) == shape:
            continue
        if a.dim() == len(shape) + 1 and tuple(a.shape[1:]) == shape:
            sizes[name] = int(a.shape[0])
            continue
        dims = ", ".join(map(str, shape))
        raise InputError(
            f"QPLayer: {name} has shape {tuple(a.shape)}; with n = {n} (from Q), {m} inequalities (from G) and {k} "
            f"equalities (from A) expected ({dims}{',' if len(shape) == 1 else ''}) or (batch, {dims})."
        )
    distinct = {s for s in sizes.values() if s != 1}
    if len(distinct) > 1:
        raise InputError(
            f"QPLayer: batched arguments disagree on the batch size: {sizes}. Expected one batch size (a batch of "
            "1 broadcasts)."
        )
    if not sizes:
        return args, None
    if distinct:  # size-1 batches are shared by the others
        args = [a.squeeze(0) if sizes.get(name) == 1 else a for name, a in zip(_NAMES, args, strict=True)]
    return args, (distinct.pop() if distinct else 1)
