"""The certificate of a polyhedral KKT answer (every QP and LP), for a whole batch: one compiled loop, or numpy.

The problem: min 1/2 x^T P x + c^T x s.t. E x = e, G x <= h, stated on an explicit active set. The unknowns
of one instance are z = (x (n), y_E (pe), y_G (m)); `on_E` (pe) and `on_G` (m), together `on`, are 1 for rows
held with equality (kept equalities, active inequalities) and 0 for pinned multipliers (dropped equalities,
inactive inequalities).
The certificate of z, in this order:

    stationarity (n)        P x + c + E^T (on_E y_E) + G^T (on_G y_G)     (1/2 (P + P^T) x when `symmetric`)
    rows (pe + m)           on * (H x - rhs) + (1 - on) * y               (H = [E; G], rhs = [e; h])
    dropped equalities (pe) (1 - on_E) * (E x - e)
    inactive rows (m)       (1 - on_G) * max(G x - h, 0)
    multiplier signs (m)    on_G * max(-y_G, 0)

and two sets of sizes for the terms each component is made of: from below (the magnitudes of the partial
sums the component is computed from, free once it is computed: |P x| + |c| + |H^T (on y)| for stationarity,
on * (|H x| + |rhs|) for rows, 0 for the parts that vanish at a solution), and exact (`polyhedral_term_sizes`,
products with |P| and |H|, wanted only when the certificate does not pass against the bound). A multiplier's
sign is sized by the multiplier a row must have to matter in stationarity: the largest stationarity term
over the row's 1-norm.

Arrays: Z (B, n + pe + m), on_E (B, pe), on_G (B, m); P (1 or B, n, n) or None, c (1 or B, n), E (1 or B, pe, n),
e (1 or B, pe), G (1 or B, m, n), h (1 or B, m): a leading 1 is shared by the batch. float64 throughout.
"""

from __future__ import annotations

import numpy as np

from ._kernels import Kernel

__all__ = ["polyhedral_certificate", "polyhedral_term_sizes"]

_TINY = float(np.finfo(np.float64).tiny)


def polyhedral_certificate(Z: np.ndarray, on_E: np.ndarray, on_G: np.ndarray, P: np.ndarray | None,
                           c: np.ndarray, E: np.ndarray, e: np.ndarray, G: np.ndarray, h: np.ndarray, *,
                           symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(certificate, term sizes from below, worst), the arrays (B, n + 2 pe + 3 m); see the module docstring.
    worst: the largest |certificate| / size (inf where a size vanishes under a nonzero component, or for NaN),
    from the compiled loop; None from the numpy path (the engine then tests the arrays)."""
    if _KERNEL.compiled() is not None:
        quad = P is not None
        return _KERNEL(Z, on_E, on_G, P if quad else _EMPTY, c, E, e, G, h, quad, symmetric)
    B, n, pe = Z.shape[0], c.shape[1], e.shape[1]
    x, y, on = Z[:, :n], Z[:, n:], np.concatenate([on_E, on_G], axis=1)
    H, rhs = _stack(E, G, B, 1), _stack(e, h, B, 1)
    off, held = 1.0 - on, on * y
    Px = _quadratic(P, x, symmetric) if P is not None else np.zeros_like(x)
    Hx, Hy = _mv(H, x), _vm(held, H)
    r = Hx - rhs
    feasibility = np.concatenate([r[:, :pe], np.maximum(r[:, pe:], 0.0)], axis=1)
    certificate = np.concatenate([Px + c + Hy, on * r + off * y, off * feasibility,
                                  on[:, pe:] * np.maximum(-y[:, pe:], 0.0)], axis=1)
    lower = np.concatenate([np.abs(Px) + np.abs(c) + np.abs(Hy), on * (np.abs(Hx) + np.abs(rhs)),
                            np.zeros_like(certificate[:, n + on.shape[1] :])], axis=1)
    return certificate, lower, None


def polyhedral_term_sizes(Z: np.ndarray, on_E: np.ndarray, on_G: np.ndarray, P: np.ndarray | None,
                          c: np.ndarray, E: np.ndarray, e: np.ndarray, G: np.ndarray, h: np.ndarray, *,
                          symmetric: bool = False) -> np.ndarray:
    """The exact size of each certificate component's terms (B, n + 2 pe + 3 m), in numpy: |P||x| + |c| +
    |H^T||on y| for stationarity, |H||x| + |rhs| for rows (|y| where a multiplier is pinned), and for a
    multiplier's sign the largest stationarity term over the row's 1-norm, plus |y|."""
    B, n, pe = Z.shape[0], c.shape[1], e.shape[1]
    x, y, on = Z[:, :n], Z[:, n:], np.concatenate([on_E, on_G], axis=1)
    Ha, ax = np.abs(_stack(E, G, B, 1)), np.abs(x)
    stat = _vm(np.abs(on * y), Ha) + np.abs(c)
    if P is not None:
        Pa = np.abs(P)
        stat = stat + (0.5 * (_mv(Pa, ax) + _vm(ax, Pa)) if symmetric else _mv(Pa, ax))
    rows = _mv(Ha, ax) + np.abs(_stack(e, h, B, 1))
    norms = np.maximum(Ha[:, pe:].sum(axis=2), _TINY)
    dual = stat.max(axis=1, keepdims=True, initial=0.0) / norms
    return np.concatenate([stat, on * rows + (1.0 - on) * np.abs(y), rows, dual + np.abs(y[:, pe:])], axis=1)


def _stack(a: np.ndarray, b: np.ndarray, B: int, axis: int) -> np.ndarray:
    """[a, b] along `axis` (the row axis), each broadcast to the batch first when shared."""
    if a.shape[0] != b.shape[0]:
        a, b = (np.broadcast_to(t, (B, *t.shape[1:])) for t in (a, b))
    return np.concatenate([a, b], axis=axis)


def _quadratic(P: np.ndarray, x: np.ndarray, symmetric: bool) -> np.ndarray:
    return 0.5 * (_mv(P, x) + _vm(x, P)) if symmetric else _mv(P, x)


def _mv(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Batched M v (leading dimensions broadcast)."""
    return (M @ v[..., None])[..., 0]


def _vm(v: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Batched v^T M (leading dimensions broadcast)."""
    return (v[..., None, :] @ M)[..., 0, :]


# --- the compiled loop (numba's subset: no calls to Python helpers) ---------------------------------
_EMPTY = np.zeros((1, 0, 0))


def _certificate_loop(Z, on_E, on_G, P, c, E, e, G, h, quad, symmetric):
    B, n = Z.shape[0], c.shape[1]
    pe, m = e.shape[1], h.shape[1]
    width = n + 2 * pe + 3 * m
    C = np.zeros((B, width))
    S = np.zeros((B, width))
    hy = np.empty(n)
    qa = np.empty(n)
    qb = np.empty(n)
    for i in range(B):
        ci = c[i if c.shape[0] > 1 else 0]
        x = Z[i, :n]
        y = Z[i, n:]
        for k in range(n):
            hy[k] = 0.0
        for block in range(2):  # equality rows, then inequality rows
            H = E if block == 0 else G
            rhs = e if block == 0 else h
            oni = on_E[i] if block == 0 else on_G[i]
            Hi = H[i if H.shape[0] > 1 else 0]
            ri = rhs[i if rhs.shape[0] > 1 else 0]
            first = 0 if block == 0 else pe
            feas = n + pe + m + (0 if block == 0 else pe)
            for r in range(Hi.shape[0]):
                held = oni[r]
                yr = y[first + r]
                w = held * yr
                hx = 0.0
                for k in range(n):
                    hx += Hi[r, k] * x[k]
                    hy[k] += Hi[r, k] * w
                res = hx - ri[r]
                C[i, n + first + r] = held * res + (1.0 - held) * yr
                S[i, n + first + r] = held * (abs(hx) + abs(ri[r]))
                if block == 1:
                    res = res if not res <= 0.0 else 0.0  # max(res, 0), NaN kept
                C[i, feas + r] = (1.0 - held) * res
        for k in range(n):
            qa[k] = 0.0
            qb[k] = 0.0
        if quad:  # P x, and x^T P for the symmetric part: both in row order
            Pb = P[i if P.shape[0] > 1 else 0]
            for j in range(n):
                xj = x[j]
                t = 0.0
                for k in range(n):
                    t += Pb[j, k] * x[k]
                    if symmetric:
                        qb[k] += Pb[j, k] * xj
                qa[j] = t
        for j in range(n):
            px = 0.5 * (qa[j] + qb[j]) if symmetric else qa[j]
            C[i, j] = px + ci[j] + hy[j]
            S[i, j] = abs(px) + abs(ci[j]) + abs(hy[j])
        for r in range(m):
            v = -y[pe + r]
            C[i, n + 2 * pe + 2 * m + r] = on_G[i, r] * (v if not v <= 0.0 else 0.0)
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


_M2, _M3 = "float64[:, ::1]", "float64[:, :, ::1]"
_KERNEL = Kernel(
    _certificate_loop,
    f"Tuple(({_M2}, {_M2}, float64))({_M2}, {_M2}, {_M2}, {_M3}, {_M2}, {_M3}, {_M2}, {_M3}, {_M2}, boolean, boolean)",
)
