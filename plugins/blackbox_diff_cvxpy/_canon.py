"""Canonicalisation: a cvxpy problem -> the conic program the solver sees, as affine maps of the parameters.

cvxpy reduces a DPP problem to the parametric cone program

    minimise    1/2 x^T P x + c^T x
    subject to  b - A x in K,      K = {0}^z x R_+^l x SOC(q_1) x ... x PSD(s_1) x ... x K_exp^e x K_pow(a_1) x ...

whose data (P, c, A, b) are affine in the stacked parameter vector theta (cvxpy's `ParamConeProg`). This
module builds that map once and applies it two ways: with scipy (the forward solve, per instance) and
with torch gathers and `index_add` (the residual, which autograd and vmap differentiate).

Conventions follow the solver interfaces (Clarabel, SCS): A here is the solver's A (cvxpy's ``-A``), the
dual y satisfies P x + c + A^T y = 0 with y in K*, and PSD blocks are scaled triangles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ._certify import SparseCertificate
from ._theta import ThetaPiece

__all__ = ["AffineMap", "ConeLayout", "ConeProgram", "build_program"]


@dataclasses.dataclass
class AffineMap:
    """values = M @ theta for a fixed sparsity pattern of the data matrix (or vector).

    Attributes:
        matrix: scipy CSR (nnz_pattern, n_theta + 1); the last column multiplies the constant 1.
        rows, cols, vals: the same matrix as torch COO triplets, for the torch evaluation.
    """

    matrix: sp.csr_array
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor

    @classmethod
    def from_scipy(cls, mat: Any) -> AffineMap:
        csr = sp.csr_array(mat)
        coo = csr.tocoo()
        return cls(
            matrix=csr,
            rows=torch.as_tensor(coo.row.astype(np.int64)),
            cols=torch.as_tensor(coo.col.astype(np.int64)),
            vals=torch.as_tensor(coo.data.astype(np.float64)),
        )

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    def numpy(self, theta: np.ndarray) -> np.ndarray:
        return self.matrix @ theta

    def torch(self, theta: torch.Tensor) -> torch.Tensor:
        gather = self.gather()
        if gather is not None:  # one theta entry per value (the common DPP case): a gather, fast under vmap
            index, scale = gather
            return theta[index.to(theta.device)] * scale.to(theta.device, theta.dtype)
        vals = self.vals.to(theta.device, theta.dtype)
        src = vals * theta[self.cols.to(theta.device)]
        out = theta.new_zeros(self.size)
        return out.index_add(0, self.rows.to(theta.device), src)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index, scale) with values = scale * theta[index] when every value reads at most one entry of
        theta (a row without one reads entry 0 with scale 0); None otherwise."""
        cached = getattr(self, "_gather", False)
        if cached is False:
            counts = np.diff(self.matrix.indptr)
            cached = None
            if counts.size == 0 or counts.max() <= 1:
                index = np.zeros(self.size, dtype=np.int64)
                scale = np.zeros(self.size)
                one = counts == 1
                index[one] = self.matrix.indices[self.matrix.indptr[:-1][one]]
                scale[one] = self.matrix.data[self.matrix.indptr[:-1][one]]
                cached = (torch.as_tensor(index), torch.as_tensor(scale))
            self._gather = cached
        return cached


@dataclasses.dataclass
class ConeLayout:
    """Cone dimensions in the solver's order: zero, nonneg, SOC, PSD (scaled triangles), exp, power."""

    zero: int
    nonneg: int
    soc: list[int]
    psd: list[int]
    psd_upper: bool  # True: upper triangle, column-major (Clarabel); False: lower, column-major (SCS)
    exp: int = 0
    pow: list[float] = dataclasses.field(default_factory=list)  # the alpha of each 3-d power cone

    @property
    def size(self) -> int:
        return (self.zero + self.nonneg + sum(self.soc) + sum(k * (k + 1) // 2 for k in self.psd) + 3 * self.exp
                + 3 * len(self.pow))

    @property
    def conic_start(self) -> int:
        return self.zero + self.nonneg

    @property
    def nonlinear(self) -> bool:
        """Whether any row belongs to a cone that is not polyhedral."""
        return bool(self.soc or self.psd or self.exp or self.pow)

    def describe(self) -> str:
        parts = [f"zero {self.zero}", f"nonneg {self.nonneg}"]
        if self.soc:
            parts.append(f"soc {self.soc}")
        if self.psd:
            parts.append(f"psd {self.psd}")
        if self.exp:
            parts.append(f"exp {self.exp}")
        if self.pow:
            parts.append(f"pow {self.pow}")
        return ", ".join(parts)


@dataclasses.dataclass
class ConeProgram:
    """The parametric cone program of one cvxpy problem, for one solver.

    Attributes:
        n: number of conic variables; m: number of conic rows.
        c_map: theta -> c (n); A_map: theta -> values of A on (A_rows, A_cols); b_map: theta -> b (m);
        P_map: theta -> values of the full symmetric P on (P_rows, P_cols), or None for a linear objective.
        cones: the cone layout of the rows.
        n_theta: size of theta (without the constant 1).
        pieces: how the user's parameters fill theta (`_theta.ThetaPiece`).
    """

    n: int
    m: int
    c_map: AffineMap
    A_map: AffineMap
    A_rows: np.ndarray
    A_cols: np.ndarray
    b_map: AffineMap
    P_map: AffineMap | None
    P_rows: np.ndarray
    P_cols: np.ndarray
    cones: ConeLayout
    n_theta: int
    pieces: list[ThetaPiece]

    # --- numpy: the forward solve ------------------------------------------------------------
    def _structure(self):
        """CSC index arrays of A and of P's upper triangle (the patterns are sorted column-major)."""
        cached = getattr(self, "_csc_cache", None)
        if cached is None:
            a_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.A_cols, minlength=self.n))]).astype(np.int32)
            upper = self.P_rows <= self.P_cols
            p_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.P_cols[upper], minlength=self.n))])
            cached = (self.A_rows.astype(np.int32), a_ptr, upper, self.P_rows[upper].astype(np.int32),
                      p_ptr.astype(np.int32))
            self._csc_cache = cached
        return cached

    def data(self, theta: np.ndarray):
        """(P upper triangle, c, A, b) for one parameter vector, A and P as int32 CSC matrices (what the
        solvers take), plus the raw values of A and of the full P for dense use."""
        a_idx, a_ptr, upper, p_idx, p_ptr = self._structure()
        c = self.c_map.numpy(theta)
        a_vals = self.A_map.numpy(theta)
        A = sp.csc_matrix((a_vals, a_idx, a_ptr), shape=(self.m, self.n))
        b = self.b_map.numpy(theta)
        P = p_vals = None
        if self.P_map is not None:
            p_vals = self.P_map.numpy(theta)
            P = sp.csc_matrix((p_vals[upper], p_idx, p_ptr), shape=(self.n, self.n))
        return P, c, A, b

    def data_values(self, theta: np.ndarray) -> tuple[np.ndarray, ...]:
        """(c, b, values of A on (A_rows, A_cols), values of P on (P_rows, P_cols) or None), each (B, .), for
        a batch of theta (n_theta + 1, B): one sparse product with the maps stacked (built once)."""
        stacked = getattr(self, "_stacked_maps", None)
        if stacked is None:
            maps = [self.c_map, self.b_map, self.A_map] + ([self.P_map] if self.P_map is not None else [])
            ends = np.cumsum([mp.size for mp in maps]).tolist()
            bounds = list(zip([0, *ends[:-1]], ends, strict=True))
            stacked = (sp.csr_array(sp.vstack([mp.matrix for mp in maps])), bounds)
            self._stacked_maps = stacked
        product = stacked[0] @ theta
        parts = tuple(product[start:end].T for start, end in stacked[1])
        return (*parts, None) if self.P_map is None else parts

    def sparse_certificate(self) -> SparseCertificate:
        """The compiled certificate of this program's answers (`_certify`), built once."""
        cached = getattr(self, "_sparse_certificate", None)
        if cached is None:
            cached = self._sparse_certificate = SparseCertificate(self)
        return cached

    def dense_batch(self, values: np.ndarray, which: str) -> np.ndarray:
        """A batch of dense A (or P, `which`) from their values on the pattern (B, nnz): a view of the values
        when the pattern is the whole matrix column by column (dense parameters: no scatter), else scattered."""
        rows, cols, shape = ((self.A_rows, self.A_cols, (self.m, self.n)) if which == "A"
                             else (self.P_rows, self.P_cols, (self.n, self.n)))
        key = f"_{which}_column_major"
        whole = getattr(self, key, None)
        if whole is None:
            whole = rows.size == shape[0] * shape[1] and bool(np.array_equal(cols * shape[0] + rows,
                                                                              np.arange(rows.size)))
            setattr(self, key, whole)
        B = values.shape[0]
        if whole:
            return values.reshape(B, shape[1], shape[0]).swapaxes(1, 2)
        out = np.zeros((B, *shape))
        out[:, rows, cols] = values
        return out

    def dense(self, P, c, A, b) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
        """Dense (full P, c, A, b) from `data`'s output (P given as its upper triangle)."""
        A_d = A.toarray()
        P_d = None
        if P is not None:
            upper = P.toarray()
            P_d = upper + upper.T - np.diag(np.diag(upper))
        return P_d, c, A_d, b

    # --- torch: the residual -------------------------------------------------------------------
    def data_torch(self, theta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, c, A, b) as dense torch tensors, differentiable in theta (vmap-friendly gathers)."""
        c = self.c_map.torch(theta)
        A = _dense(self, "_A_dense", self.A_map, self.A_rows, self.A_cols, (self.m, self.n), theta)
        b = self.b_map.torch(theta)
        P = None
        if self.P_map is not None:
            P = _dense(self, "_P_dense", self.P_map, self.P_rows, self.P_cols, (self.n, self.n), theta)
        return P, c, A, b


def _dense(owner: Any, key: str, amap: AffineMap, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
           theta: torch.Tensor) -> torch.Tensor:
    """A dense matrix from its map's values on (rows, cols): one gather from theta when every value reads
    one entry of theta (3x faster under vmap than scattering the values), else a scatter of the values."""
    lin = rows * shape[1] + cols
    gather = amap.gather()
    if gather is None:
        out = theta.new_zeros(shape[0] * shape[1]).index_add(0, torch.as_tensor(lin, device=theta.device),
                                                              amap.torch(theta))
        return out.reshape(shape)
    cached = getattr(owner, key, None)
    if cached is None:
        index = torch.zeros(shape[0] * shape[1], dtype=torch.int64)
        scale = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
        index[torch.as_tensor(lin)] = gather[0]
        scale[torch.as_tensor(lin)] = gather[1]
        cached = (index, scale)
        setattr(owner, key, cached)
    index, scale = cached
    return (theta[index.to(theta.device)] * scale.to(theta.device, theta.dtype)).reshape(shape)


def _split_A(A_tensor: Any, m: int, n: int):
    """cvxpy's A tensor has rows (i + m*j) for j < n (matrix) and j == n (offset). Returns the matrix part
    as (rows, cols, map) with the sign flipped to the solver's convention, and the offset part as a map."""
    coo = sp.coo_array(A_tensor)
    i = coo.row % m
    j = coo.row // m
    is_b = j == n
    # Matrix part: group triplets by (i, j) entry.
    keys = (i[~is_b] + m * j[~is_b]).astype(np.int64)
    uniq, inverse = np.unique(keys, return_inverse=True)
    A_part = sp.csr_array(
        (-coo.data[~is_b], (inverse, coo.col[~is_b])), shape=(len(uniq), A_tensor.shape[1])
    )
    rows, cols = uniq % m, uniq // m
    b_part = sp.csr_array((coo.data[is_b], (i[is_b], coo.col[is_b])), shape=(m, A_tensor.shape[1]))
    return rows, cols, AffineMap.from_scipy(A_part), AffineMap.from_scipy(b_part)


def _split_P(P_tensor: Any, n: int):
    coo = sp.coo_array(P_tensor)
    uniq, inverse = np.unique(coo.row.astype(np.int64), return_inverse=True)
    part = sp.csr_array((coo.data, (inverse, coo.col)), shape=(len(uniq), P_tensor.shape[1]))
    return uniq % n, uniq // n, AffineMap.from_scipy(part)


def build_program(param_prob: Any, solver_instance: Any, pieces: list[ThetaPiece]) -> ConeProgram:
    """Build the `ConeProgram` of a formatted cvxpy `ParamConeProg`.

    Args:
        param_prob: ``problem.get_problem_data(solver)[0]["param_prob"]``.
        solver_instance: the cvxpy solver reduction (PSD triangle convention).
        pieces: how the user's parameters fill theta (`_theta.build_pieces`).
    """
    from cvxpy.utilities.psd_utils import TriangleKind

    n = int(param_prob.x.size)
    dims = param_prob.cone_dims
    layout = ConeLayout(
        zero=int(dims.zero),
        nonneg=int(dims.nonneg),
        soc=[int(k) for k in dims.soc],
        psd=[int(k) for k in dims.psd],
        psd_upper=getattr(solver_instance, "PSD_TRIANGLE_KIND", None) == TriangleKind.UPPER,
        exp=int(dims.exp),
        pow=[float(a) for a in dims.p3d],
    )
    m = layout.size
    q = sp.csr_array(param_prob.q)
    c_map = AffineMap.from_scipy(q[:n])
    A_rows, A_cols, A_map, b_map = _split_A(param_prob.A, m, n)
    if param_prob.P is not None and sp.coo_array(param_prob.P).nnz:
        P_rows, P_cols, P_map = _split_P(param_prob.P, n)
    else:
        P_rows = P_cols = np.zeros(0, dtype=np.int64)
        P_map = None
    return ConeProgram(
        n=n, m=m, c_map=c_map, A_map=A_map, A_rows=A_rows, A_cols=A_cols, b_map=b_map, P_map=P_map,
        P_rows=P_rows, P_cols=P_cols, cones=layout, n_theta=int(param_prob.total_param_size), pieces=pieces,
    )

