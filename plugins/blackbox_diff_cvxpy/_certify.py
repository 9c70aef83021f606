"""The certificate of a polyhedral cone program's answers straight from the parameters: one compiled pass.

The data (c, b, A, P) are affine in theta (`_canon`): one stacked sparse map, [c; b; values of A on its
pattern; values of P on its pattern] = M theta. The certificate (`blackbox_diff.kkt.polyhedral_certificate`'s
components, in the cone program's order) needs A only through A x and A^T y, so a compiled loop computes each
data value from its row of M and adds it straight into those products: no dense A, no dense P, work in
proportion to the map's nonzeros (a sparse A costs what it holds). theta itself is the parameters laid end
to end in their own memory order: M's columns are renumbered once, from cvxpy's Fortran order to C order, for
every plain parameter block (lowered, symmetrised and log-space blocks keep their `ThetaPiece.numpy` values).

Without numba (or with kernels off) `SparseCertificate.__call__` returns None and the condition takes the
dense numpy path; the tests compare the two.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from blackbox_diff.plugin import Kernel

__all__ = ["SparseCertificate"]


class SparseCertificate:
    """(certificate, term sizes from below) of a batch of answers of one polyhedral program, from theta."""

    def __init__(self, program) -> None:
        maps = [program.c_map, program.b_map, program.A_map] + ([program.P_map] if program.P_map is not None else [])
        M = sp.csr_array(sp.vstack([mp.matrix for mp in maps]))
        M.sort_indices()
        renumber = np.arange(M.shape[1], dtype=np.int64)
        self.plain = []
        for piece in program.pieces:
            plain = piece.gather is None and not piece.symmetric and not piece.log
            self.plain.append(plain)
            if plain and len(piece.shape) > 1:  # Fortran index f of the block -> its C position
                c_of_f = np.empty(piece.size, dtype=np.int64)
                c_of_f[np.arange(piece.size).reshape(piece.shape, order="F").ravel()] = np.arange(piece.size)
                renumber[piece.offset : piece.offset + piece.size] = piece.offset + c_of_f
        counts = np.diff(M.indptr)
        if counts.size and counts.max() > 1:  # values that combine several entries of theta: CSR
            self.csr = (M.indptr.astype(np.int32), renumber[M.indices].astype(np.int32), M.data.astype(np.float64))
        else:  # one entry each (the usual DPP data): value = scale * theta[index], no row pointers to read
            index, scale = np.zeros(M.shape[0], dtype=np.int32), np.zeros(M.shape[0])
            one = counts == 1
            index[one] = renumber[M.indices[M.indptr[:-1][one]]]
            scale[one] = M.data[M.indptr[:-1][one]]
            self.csr = (np.zeros(0, dtype=np.int32), index, scale)
        # int32 indices: the loop's cost is reading them (the map has one entry per data value)
        self.pattern = tuple(np.ascontiguousarray(a, dtype=np.int32)
                             for a in (program.A_rows, program.A_cols, program.P_rows, program.P_cols))
        # A pattern that is the whole matrix column by column (dense parameters) is multiplied as dense
        n, m = program.n, program.m
        self.dense = (_whole(program.A_rows, program.A_cols, (m, n)), _whole(program.P_rows, program.P_cols, (n, n)))
        self.pieces, self.n_theta = program.pieces, program.n_theta
        # Every block plain and the blocks tiling theta in order: theta is one concatenation of the values
        ends = [piece.offset + piece.size for piece in self.pieces]
        self.tiled = all(self.plain) and [piece.offset for piece in self.pieces] == [0, *ends[:-1]] and \
            (ends[-1] if ends else 0) == self.n_theta
        self.order = [piece.index for piece in self.pieces]
        self._ones: dict[int, np.ndarray] = {}
        self.n, self.m, self.zero = program.n, program.m, program.cones.zero

    def theta_rows(self, values: list[np.ndarray], B: int) -> np.ndarray:
        """theta (B, n_theta + 1), plain blocks in C order (as M's renumbered columns read them)."""
        if self.tiled:
            blocks = [values[i].reshape(values[i].shape[0], -1) for i in self.order]
            if all(b.shape[0] == B for b in blocks):  # no shared parameter to broadcast: one concatenation
                ones = self._ones.get(B)
                if ones is None:
                    ones = self._ones.setdefault(B, np.ones((B, 1)))
                blocks.append(ones)
                return np.concatenate(blocks, axis=1)
        theta = np.empty((B, self.n_theta + 1))
        for piece, plain in zip(self.pieces, self.plain, strict=True):
            v = values[piece.index]
            block = v.reshape(v.shape[0], -1) if plain else piece.numpy(v)
            theta[:, piece.offset : piece.offset + piece.size] = block
        theta[:, -1] = 1.0
        return theta

    def __call__(self, Z: np.ndarray, active: np.ndarray, values: list[np.ndarray]):
        """(certificate, sizes from below, worst ratio) (B, n + 2 m + nonneg), or None without a compiled
        kernel."""
        if _KERNEL.compiled() is None:
            return None
        theta = self.theta_rows(values, Z.shape[0])
        return _KERNEL(*self.csr, theta, self.n, self.m, *self.pattern, *self.dense, Z, active, self.zero)


def _whole(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> bool:
    """Whether the pattern (rows, cols) is every entry of a matrix of `shape`, column by column."""
    return rows.size == shape[0] * shape[1] and bool(np.array_equal(cols * shape[0] + rows, np.arange(rows.size)))


def _certificate_loop(indptr, indices, data, theta, n, m, a_rows, a_cols, p_rows, p_cols, a_dense, p_dense, Z,
                      active, z0):
    """indptr empty: the map is one entry per row (value = data[row] * theta[indices[row]]). a_dense, p_dense:
    the pattern is the whole matrix, column-major (products as dense loops, no index arrays read)."""
    B = theta.shape[0]
    na, npv = a_rows.shape[0], p_rows.shape[0]
    width = n + 2 * m + (m - z0)
    C = np.zeros((B, width))
    S = np.zeros((B, width))
    vals = np.empty(n + m + na + npv)
    aty, px = np.empty(n), np.empty(n)
    ax, held = np.empty(m), np.empty(m)
    for i in range(B):
        th = theta[i]
        z = Z[i]
        act = active[i]
        if indptr.shape[0] == 0:  # every data value from one entry of theta
            for row in range(vals.shape[0]):
                vals[row] = data[row] * th[indices[row]]
        else:
            for row in range(vals.shape[0]):
                v = 0.0
                for k in range(indptr[row], indptr[row + 1]):
                    v += data[k] * th[indices[k]]
                vals[row] = v
        for j in range(n):
            aty[j] = 0.0
            px[j] = 0.0
        for r in range(m):
            ax[r] = 0.0
            held[r] = act[r] * z[n + r]
        base = n + m
        if a_dense:  # A x and A^T (active y), A column-major
            for j in range(n):
                xj = z[j]
                t = 0.0
                for r in range(m):
                    v = vals[base + j * m + r]
                    ax[r] += v * xj
                    t += v * held[r]
                aty[j] = t
        else:  # from A's values on its pattern
            for k in range(na):
                v = vals[base + k]
                r, j = a_rows[k], a_cols[k]
                ax[r] += v * z[j]
                aty[j] += v * held[r]
        base += na
        if p_dense:
            for j in range(n):
                xj = z[j]
                for r in range(n):
                    px[r] += vals[base + j * n + r] * xj
        else:
            for k in range(npv):
                px[p_rows[k]] += vals[base + k] * z[p_cols[k]]
        for j in range(n):
            C[i, j] = px[j] + vals[j] + aty[j]
            S[i, j] = abs(px[j]) + abs(vals[j]) + abs(aty[j])
        for r in range(m):
            on = act[r]
            w = z[n + r]
            bv = vals[n + r]
            res = ax[r] - bv
            C[i, n + r] = on * res + (1.0 - on) * w
            S[i, n + r] = on * (abs(ax[r]) + abs(bv))
            if r < z0:  # a dropped equality must hold both ways
                C[i, n + m + r] = (1.0 - on) * res
            else:  # an inactive row one way; an active row's multiplier is >= 0 (max(., 0) keeping NaN)
                C[i, n + m + r] = (1.0 - on) * (res if not res <= 0.0 else 0.0)
                C[i, n + 2 * m + r - z0] = on * (-w if not -w <= 0.0 else 0.0)
    # The largest |C| / S, which the engine compares with its tolerance (NaN counts as inf). Written out in
    # each kernel, not shared: numba's disk cache tracks only the kernel's own file, so a compiled helper
    # from another module, changed later, would run stale.
    worst = 0.0
    for i in range(C.shape[0]):
        for j in range(C.shape[1]):
            a, s = abs(C[i, j]), S[i, j]
            if not a <= s * worst:  # only a component that might raise it is divided
                worst = np.inf if not (s > 0.0 and a == a) else max(worst, a / s)
    return C, S, worst


_I, _F1, _F2 = "int32[::1]", "float64[::1]", "float64[:, ::1]"
_KERNEL = Kernel(_certificate_loop, f"Tuple(({_F2}, {_F2}, float64))({_I}, {_I}, {_F1}, {_F2}, int64, int64, "
                                    f"{_I}, {_I}, {_I}, {_I}, boolean, boolean, {_F2}, {_F2}, int64)")
