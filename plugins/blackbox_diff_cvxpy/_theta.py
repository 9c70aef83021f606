"""The stacked parameter vector theta of a cone program, built from the user's parameter tensors.

cvxpy's `ParamConeProg` is affine in theta: its parameters' entries in column order (each Fortran-
flattened), then a constant 1. A user parameter fills one or more blocks of theta:

* plainly: its entries, Fortran-flattened;
* lowered: cvxpy stores a symmetric (or PSD/NSD) parameter as its upper triangle and a diagonal one as
  its diagonal. The block is a gather of the flattened value. A symmetric parameter is symmetrised first,
  (P + P^T) / 2, so its gradient is symmetric and a perturbation of one entry (finite differences,
  gradcheck) is a perturbation of a symmetric matrix;
* in log space: a geometric program (gp=True) is solved in log space, so the block holds log(value).

The same blocks are written with numpy (the black box) and with torch (the residual, differentiable).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

__all__ = ["ThetaPiece", "build_pieces", "sequential_pieces", "theta_columns", "theta_numpy", "theta_tangent",
           "theta_torch"]


@dataclasses.dataclass(frozen=True)
class ThetaPiece:
    """One block of theta, filled from one user parameter.

    Attributes:
        offset: first column of the block in theta.
        index: the user parameter it comes from (call order).
        shape: that parameter's declared shape.
        gather: Fortran-order flat indices of the entries kept by cvxpy's lowering; None keeps them all.
        symmetric: symmetrise the value before gathering.
        log: the block holds log(value) (geometric programs).
    """

    offset: int
    index: int
    shape: tuple[int, ...]
    gather: np.ndarray | None = None
    symmetric: bool = False
    log: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape) if self.gather is None else int(self.gather.size)

    def numpy(self, values: np.ndarray) -> np.ndarray:
        """The piece's entries of theta (B, size) from a batch of the parameter's values (B, *shape)."""
        v = np.asarray(values, dtype=np.float64)
        B = v.shape[0]
        if self.log:
            v = np.log(v)
        if len(self.shape) > 1:
            v = v.reshape(B, *self.shape)
            if self.symmetric:
                v = 0.5 * (v + np.swapaxes(v, -1, -2))
            v = v.transpose(0, *range(v.ndim - 1, 0, -1))  # each value in Fortran order
        flat = v.reshape(B, -1)
        return flat if self.gather is None else flat[:, self.gather]

    def torch(self, value: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.log(value) if self.log else value)

    def linear(self, v: torch.Tensor) -> torch.Tensor:
        """The piece's entries of theta from the (logged) parameter value: a linear map."""
        if self.symmetric:
            v = 0.5 * (v + v.transpose(-1, -2))
        flat = v.reshape(-1) if v.dim() <= 1 else v.permute(*reversed(range(v.dim()))).reshape(-1)
        if self.gather is None:
            return flat
        return flat[torch.as_tensor(self.gather, device=flat.device)]


def _lowering(param: Any) -> tuple[np.ndarray | None, bool]:
    """(gather, symmetric) for a parameter cvxpy stores in reduced form (triangle, diagonal, sparsity)."""
    from cvxpy.reductions.cvx_attr2constr import SYMMETRIC_ATTRIBUTES, attributes_present, lower_value

    if not getattr(param, "_has_dim_reducing_attr", False):
        return None, False
    probe = np.arange(param.size, dtype=np.float64).reshape(param.shape, order="F")
    gather = np.rint(np.asarray(lower_value(param, probe), dtype=np.float64).reshape(-1, order="F")).astype(np.int64)
    return gather, bool(attributes_present([param], SYMMETRIC_ATTRIBUTES))


def build_pieces(param_prob: Any, parameters: list, param_id_map: dict[int, int],
                 log_ids: dict[int, int] | None = None) -> list[ThetaPiece]:
    """The blocks of theta, from cvxpy's parameter columns.

    Args:
        param_prob: the `ParamConeProg` (its ``param_id_to_col``).
        parameters: the user's parameters, in call order.
        param_id_map: user parameter id -> id in the cone program, where cvxpy replaced it (lowering).
        log_ids: geometric programs: user parameter id -> id of its log-space parameter.
    """
    cols = param_prob.param_id_to_col
    pieces = []
    for i, p in enumerate(parameters):
        sources = [(p.id, False)]
        if log_ids and p.id in log_ids:
            sources.insert(0, (log_ids[p.id], True))
        for pid, is_log in sources:
            resolved = param_id_map.get(pid, pid)
            if resolved not in cols:
                continue
            gather, symmetric = _lowering(p) if resolved != pid else (None, False)
            pieces.append(ThetaPiece(int(cols[resolved]), i, tuple(p.shape), gather, symmetric, is_log))
    return sorted(pieces, key=lambda piece: piece.offset)


def sequential_pieces(parameters: list) -> list[ThetaPiece]:
    """Blocks one after the other in call order, each lowered like cvxpy lowers it (non-DPP problems)."""
    pieces, off = [], 0
    for i, p in enumerate(parameters):
        gather, symmetric = _lowering(p)
        piece = ThetaPiece(off, i, tuple(p.shape), gather, symmetric)
        pieces.append(piece)
        off += piece.size
    return pieces


def theta_numpy(pieces: list[ThetaPiece], n_theta: int, params: list[np.ndarray]) -> np.ndarray:
    """theta (n_theta + 1: the constant 1 last) for one instance, from numpy parameter values."""
    return theta_columns(pieces, n_theta, [np.asarray(v, dtype=np.float64)[None] for v in params], 1)[:, 0]


def theta_columns(pieces: list[ThetaPiece], n_theta: int, params: list[np.ndarray], B: int) -> np.ndarray:
    """theta as columns (n_theta + 1, B), C-contiguous: what the data maps multiply. A plain piece is written
    in place: its block, seen as (*reversed(shape), B), is the values with every axis reversed (Fortran order
    per instance), so no flattened copy is made."""
    theta = np.empty((n_theta + 1, B))
    for piece in pieces:
        block = theta[piece.offset : piece.offset + piece.size]
        v = params[piece.index]
        if piece.gather is None and not piece.symmetric and not piece.log and v.ndim == len(piece.shape) + 1:
            block.reshape(*piece.shape[::-1], B)[...] = v.T
        else:
            block[...] = piece.numpy(v).T
    theta[-1] = 1.0
    return theta


def theta_tangent(pieces: list[ThetaPiece], n_theta: int, params: tuple[torch.Tensor, ...],
                  tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """d theta along the parameters' tangents (the constant entry's tangent is 0; a logged parameter's
    is its tangent over its value)."""
    ref = params[pieces[0].index] if pieces else (params[0] if params else torch.zeros((), dtype=torch.float64))
    blocks, end = [], 0
    for piece in pieces:
        if piece.offset > end:
            blocks.append(ref.new_zeros(piece.offset - end))
        t = tangents[piece.index]
        blocks.append(piece.linear(t / params[piece.index] if piece.log else t))
        end = piece.offset + piece.size
    if end < n_theta:
        blocks.append(ref.new_zeros(n_theta - end))
    blocks.append(ref.new_zeros(1))
    return torch.cat(blocks)


def theta_torch(pieces: list[ThetaPiece], n_theta: int, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The same vector in torch, differentiable in the parameters (vmap-friendly: no in-place writes)."""
    ref = params[pieces[0].index] if pieces else (params[0] if params else torch.zeros((), dtype=torch.float64))
    blocks, end = [], 0
    for piece in pieces:  # sorted by offset; cvxpy's columns are contiguous
        if piece.offset > end:
            blocks.append(ref.new_zeros(piece.offset - end))
        blocks.append(piece.torch(params[piece.index]))
        end = piece.offset + piece.size
    if end < n_theta:
        blocks.append(ref.new_zeros(n_theta - end))
    blocks.append(ref.new_ones(1))
    return torch.cat(blocks)
