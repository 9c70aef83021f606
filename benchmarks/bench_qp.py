"""Random QPs as layers: blackbox_diff's cvxpy backend against cvxpylayers and qpth, side by side in one run.

The problem (as in the OptNet / qpth benchmarks): n variables, n inequalities, n/4 equalities,

    minimise 1/2 x^T P x + q^T x   subject to   G x <= h,   A x = b,

with P fixed and q, G, h, A, b parameters, random and feasible (h = G x0 + slack, b = A x0). Both layers
use Clarabel as the inner solver, serially (no worker threads), in float64. Reported per instance:
forward and backward times (median of repeats, after a warm-up call), their ratios, and gradient
errors: the directional derivative <dL/dtheta, d> for L = w^T x* and a random direction d, against the
central difference of L along d computed with cvxpy's own Clarabel solve at a tight tolerance.

`bbd.QPLayer` (the "qp" backend: DAQP, a dense active-set solver, per instance; the answer polished on its
active set and the reduced KKT matrix inverted in the forward; the engine's adjoint is then the cotangent
itself) runs on the same tensors with qpth's call convention; its columns are compared with qpth's.
The forward fan-out of QPLayer over the engine's executor (serial, a thread pool, a process pool) is
measured separately at n = 100.

qpth (OptNet's batched primal-dual interior-point QP layer, `pip install --no-deps qpth==0.0.18`: its
metadata pins numpy<2, which it does not need) runs its own solver on the same P, q, G, h, A, b at its default
tolerance (eps 1e-12, at most 20 iterations), batched in torch. Its columns are skipped when it is not installed.

Both layers on their defaults (--defaults): the table of issue 17's targets. The same QPs, and LPs of the
same shape (minimise q^T x, with q = -(G^T lam + A^T nu), lam > 0, so that the LP is bounded), through
`bbd.layer(problem, ...)` and cvxpylayers' `CvxpyLayer(problem, ...)` with no solver named: blackbox_diff
routes these LP/QP-class problems to DAQP (the columns say which solver answered), cvxpylayers runs diffcp
(SCS at its default tolerance, the batch spread over all CPUs). Forward and backward are timed alternately,
best of the repeats; the gradient error is the largest over the first instances of the relative error of a
directional derivative against central differences of a tight solve (Clarabel at 1e-12 for the QPs, HiGHS's
simplex for the LPs: an exact vertex).

Run:  python benchmarks/bench_qp.py [--fast] [--json out.json] [--sizes 10 50 200] [--batches 1 16 64]
      python benchmarks/bench_qp.py --qplayer-only ...   (QPLayer and qpth only, no cvxpy layers)
      python benchmarks/bench_qp.py --check-cost ...     (what certification and the degeneracy test cost)
      python benchmarks/bench_qp.py --defaults [--sizes 50 100 200] [--defaults-batch 8]  (both on defaults)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "plugins")]

import blackbox_diff as bbd  # noqa: E402


def fixed_hessian(n: int, seed: int = 0) -> np.ndarray:
    """The QPs' fixed positive definite P."""
    M = np.random.default_rng(seed).standard_normal((n, n))
    return M @ M.T / n + 0.1 * np.eye(n)


def make_problem(n: int, seed: int = 0):
    """The cvxpy problem, its parameters (q, G, h, A, b) and the variable x."""
    import cvxpy as cp

    P = fixed_hessian(n, seed)
    m, p = n, max(n // 4, 1)
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x), [G @ x <= h, A @ x == b])
    return problem, [q, G, h, A, b], x


def make_lp(n: int):
    """The LP of the same shape: minimise q^T x s.t. G x <= h, A x = b (q, G, h, A, b parameters)."""
    import cvxpy as cp

    m, p = n, max(n // 4, 1)
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    A, b = cp.Parameter((p, n)), cp.Parameter(p)
    problem = cp.Problem(cp.Minimize(q @ x), [G @ x <= h, A @ x == b])
    return problem, [q, G, h, A, b], x


def make_lp_batch(n: int, B: int, seed: int = 1) -> list[torch.Tensor]:
    """Feasible (h = G x0 + slack, b = A x0) and bounded (q = -(G^T lam + A^T nu), lam > 0: dual feasible) LPs."""
    q, G, h, A, b = make_batch(n, B, seed)
    rng = np.random.default_rng(seed + 100)
    lam = torch.tensor(rng.uniform(0.1, 1.0, tuple(h.shape)))
    nu = torch.tensor(rng.standard_normal(tuple(b.shape)))
    q = -(torch.einsum("bij,bi->bj", G, lam) + torch.einsum("bij,bi->bj", A, nu))
    return [q, G, h, A, b]


def make_batch(n: int, B: int, seed: int = 1) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    m, p = n, max(n // 4, 1)
    x0 = rng.standard_normal((B, n))
    G = rng.standard_normal((B, m, n))
    A = rng.standard_normal((B, p, n))
    h = np.einsum("bij,bj->bi", G, x0) + rng.uniform(0.0, 1.0, (B, m))
    b = np.einsum("bij,bj->bi", A, x0)
    q = rng.standard_normal((B, n))
    return [torch.tensor(v) for v in (q, G, h, A, b)]


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _forward_backward(layer, values, repeats: int, call) -> tuple[float, float]:
    """Median forward and backward wall times of one batched call (after one warm-up call)."""
    params = [v.clone().requires_grad_(True) for v in values]

    def forward():
        return call(layer, params)[0]

    out = forward()
    out.sum().backward()  # warm-up: lazy imports, caches
    fwd, bwd = [], []
    for _ in range(repeats):
        for p in params:
            p.grad = None
        t = time.perf_counter()
        out = forward()
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        out.sum().backward()
        bwd.append(time.perf_counter() - t)
    return statistics.median(fwd), statistics.median(bwd)


def _bbd_call(layer, params):
    return layer(*params)


def _cvxpylayers_call(layer, params):
    args = {"solve_method": "Clarabel", "n_jobs_forward": 1, "n_jobs_backward": 1}
    return layer(*params, solver_args=args)


def _qpth_layer(P: np.ndarray):
    """qpth's QPFunction with the benchmark's fixed P, or None when qpth is not installed."""
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None
    return QPFunction(verbose=-1), torch.tensor(P)


def _qpth_call(layer, params):
    fn, P = layer
    q, G, h, A, b = params
    if q.dim() == 1:  # one instance: qpth wants a batch dimension
        return (fn(P, q[None], G[None], h[None], A[None], b[None])[0],)
    return (fn(P, q, G, h, A, b),)


def _qplayer(P: np.ndarray, **options):
    """bbd.QPLayer with the benchmark's fixed P (shared by the batch), on its defaults."""
    return bbd.QPLayer(**options), torch.tensor(P)


def _qplayer_call(layer, params):
    fn, P = layer
    return (fn(P, *params),)


def fanout_times(n: int, B: int, repeats: int, workers: int = 2) -> dict:
    """QPLayer's forward (no gradients) with the engine's executor: serial, threads, processes (pools kept
    across calls, as a user would keep them), in ms per instance."""
    import concurrent.futures

    P = fixed_hessian(n)
    values = make_batch(n, B)
    out = {}
    pools = {
        "serial": None,
        "threads": concurrent.futures.ThreadPoolExecutor(workers),
        "processes": concurrent.futures.ProcessPoolExecutor(workers),
    }
    try:
        for name, pool in pools.items():
            layer = _qplayer(P, executor=pool)
            with torch.no_grad():
                _qplayer_call(layer, values)  # warm-up: worker start, imports
                out[name] = 1e3 * _time(lambda layer=layer: _qplayer_call(layer, values), repeats) / B
    finally:
        for pool in pools.values():
            if pool is not None:
                pool.shutdown()
    return out


def _reference_loss(problem, params, x, values, w, solver: str = "CLARABEL", polish=None) -> float:
    for handle, v in zip(params, values, strict=True):
        handle.value = v.numpy()
    if solver == "CLARABEL":
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12,
                      tol_ktratio=1e-10, max_iter=500)
    else:
        problem.solve(solver=solver)
    if polish is None:
        return float(w @ x.value)
    return float(w @ _polished(polish, values, x.value, problem.constraints[0].dual_value))


def _polished(P: np.ndarray, values, x: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The solution of min 1/2 x'Px + q'x s.t. Gx <= h, Ax = b solved exactly (numpy, dense KKT) on the active
    set of a tight solve's answer x with multipliers lam (rows with lam > slack); x itself when the polished
    point is not feasible with nonnegative multipliers (a wrong active set)."""
    q, G, h, A, b = (v.numpy() for v in values)
    slack = h - G @ x
    act = lam > slack
    Ga = G[act]
    n, k, p = x.size, int(act.sum()), A.shape[0]
    K = np.zeros((n + k + p, n + k + p))
    K[:n, :n] = P
    K[:n, n:n + k], K[n:n + k, :n] = Ga.T, Ga
    K[:n, n + k:], K[n + k:, :n] = A.T, A
    try:
        sol = np.linalg.solve(K, np.concatenate([-q, h[act], b]))
    except np.linalg.LinAlgError:
        return x
    xp, mult = sol[:n], sol[n:n + k]
    scale = 1e-9 * (1.0 + np.abs(h).max() + np.abs(G).max() * np.abs(xp).max())
    if (G @ xp - h).max(initial=-1.0) > scale or mult.min(initial=1.0) < -scale:
        return x
    return xp


def gradient_error(layer, call, problem, params, x, values, h: float = 1e-5, seed: int = 2,
                   with_jvp: bool = False, reference: str = "CLARABEL", polish=None) -> float | tuple[float, float]:
    """Relative error of the directional derivative against central differences of a tight solve.

    With `with_jvp`, also the error of the same directional derivative <w, (dx/dtheta) d> computed in forward
    mode (one JVP along d): returns (reverse-mode error, forward-mode error).
    """
    rng = np.random.default_rng(seed)
    n = values[0].numel()
    w = torch.tensor(rng.standard_normal(n))
    direction = [torch.tensor(rng.standard_normal(v.shape)) for v in values]
    theta = [v.clone().requires_grad_(True) for v in values]
    out = call(layer, theta)[0]
    grads = torch.autograd.grad((w * out).sum(), theta)
    implicit = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    up = [v + h * d for v, d in zip(values, direction, strict=True)]
    down = [v - h * d for v, d in zip(values, direction, strict=True)]
    fd = (_reference_loss(problem, params, x, up, w.numpy(), reference, polish)
          - _reference_loss(problem, params, x, down, w.numpy(), reference, polish)) / (2 * h)
    error = abs(implicit - fd) / max(abs(fd), 1e-12)
    if not with_jvp:
        return error
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(call(layer, [fwAD.make_dual(v, d) for v, d in zip(values, direction,
                                                                                   strict=True)])[0]).tangent
    return error, abs(float((w * tangent).sum()) - fd) / max(abs(fd), 1e-12)


def jvp_time(layer, values, repeats: int, call) -> tuple[float, float]:
    """Forward-mode cost of one batched call: (forward with dual inputs, torch.autograd.forward_ad) minus (the
    same forward without tangents, gradients on), and the backward, timed in one interleaved loop, best of
    max(repeats, 5) each after a warm-up: a difference of two forwards needs the least noisy estimate.

    Returns (jvp seconds, backward seconds) for the whole batch.
    """
    g = torch.Generator().manual_seed(5)
    tangents = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in values]
    params = [v.clone().requires_grad_(True) for v in values]
    fwd, dual, bwd = [], [], []
    for _ in range(max(repeats, 5) + 1):
        for p in params:
            p.grad = None
        t = time.perf_counter()
        out = call(layer, params)[0]
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        out.sum().backward()
        bwd.append(time.perf_counter() - t)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(v, d) for v, d in zip(values, tangents, strict=True)]
            t = time.perf_counter()
            fwAD.unpack_dual(call(layer, duals)[0]).tangent  # noqa: B018
            dual.append(time.perf_counter() - t)
    return min(dual[1:]) - min(fwd[1:]), min(bwd[1:])


def _dense_kkt_time(n: int, B: int, repeats: int) -> float:
    """A batched dense solve of systems the size of the QP's KKT matrix (the cost floor quoted)."""
    N = n + n + max(n // 4, 1)
    K = torch.randn(B, N, N, dtype=torch.float64) + N * torch.eye(N, dtype=torch.float64)
    g = torch.randn(B, N, 1, dtype=torch.float64)
    torch.linalg.solve(K, g)
    return _time(lambda: torch.linalg.solve(K, g), repeats)


def run_case(n: int, B: int, repeats: int, with_error: bool, cvxpy_layers: bool = True) -> dict:
    from cvxpylayers.torch import CvxpyLayer

    problem, params, x = make_problem(n)
    values = make_batch(n, B)
    row = {"n": n, "B": B}
    qplayer = _qplayer(fixed_hessian(n))
    row["qplayer_forward_ms"], row["qplayer_backward_ms"] = (
        1e3 * t / B for t in _forward_backward(qplayer, values, repeats, _qplayer_call)
    )
    qpth = _qpth_layer(fixed_hessian(n))
    if qpth is not None:
        row["qpth_forward_ms"], row["qpth_backward_ms"] = (
            1e3 * t / B for t in _forward_backward(qpth, values, repeats, _qpth_call)
        )
        row["qplayer_forward_ratio"] = row["qplayer_forward_ms"] / row["qpth_forward_ms"]
        row["qplayer_backward_ratio"] = row["qplayer_backward_ms"] / row["qpth_backward_ms"]
    jvp, bwd = jvp_time(qplayer, values, repeats, _qplayer_call)
    row["qplayer_jvp_ms"], row["qplayer_jvp_ratio"] = 1e3 * jvp / B, jvp / bwd
    if with_error:
        single = [v[0] for v in values]
        row["qplayer_grad_error"], row["qplayer_jvp_error"] = gradient_error(
            qplayer, _qplayer_call, problem, params, x, single, with_jvp=True)
        if qpth is not None:
            row["qpth_grad_error"] = gradient_error(qpth, _qpth_call, problem, params, x, single)
    if not cvxpy_layers:
        return row
    # Both on Clarabel here (the --defaults table compares the two layers on their defaults).
    ours = bbd.layer(problem, parameters=params, variables=[x], solver="CLARABEL")
    theirs = CvxpyLayer(problem, parameters=params, variables=[x])
    row["bbd_forward_ms"], row["bbd_backward_ms"] = (
        1e3 * t / B for t in _forward_backward(ours, values, repeats, _bbd_call)
    )
    row["cvxpylayers_forward_ms"], row["cvxpylayers_backward_ms"] = (
        1e3 * t / B for t in _forward_backward(theirs, values, repeats, _cvxpylayers_call)
    )
    jvp, bwd = jvp_time(ours, values, repeats, _bbd_call)
    row["bbd_jvp_ms"], row["bbd_jvp_ratio"] = 1e3 * jvp / B, jvp / bwd
    row["dense_kkt_ms"] = 1e3 * _dense_kkt_time(n, B, repeats) / B
    row["backward_over_forward"] = row["bbd_backward_ms"] / row["bbd_forward_ms"]
    row["backward_speedup"] = row["cvxpylayers_backward_ms"] / row["bbd_backward_ms"]
    row["forward_ratio"] = row["bbd_forward_ms"] / row["cvxpylayers_forward_ms"]
    if qpth is not None:
        row["qpth_backward_speedup"] = row["qpth_backward_ms"] / row["bbd_backward_ms"]
    if with_error:
        single = [v[0] for v in values]
        row["bbd_grad_error"], row["bbd_jvp_error"] = gradient_error(ours, _bbd_call, problem, params, x, single,
                                                                    with_jvp=True)
        row["cvxpylayers_grad_error"] = gradient_error(theirs, _cvxpylayers_call, problem, params, x, single)
    return row


def _cvxpylayers_defaults_call(layer, params):
    return layer(*params)


def _alternate(layers: dict, values, repeats: int) -> dict[str, tuple[float, float]]:
    """(forward, backward) seconds of one batched call of each layer, timed alternately (one round of every
    layer per repeat, so that a noisy stretch of the machine hits them alike), best of the repeats after a
    warm-up call each."""
    params = {name: [v.clone().requires_grad_(True) for v in values] for name in layers}
    times = {name: ([], []) for name in layers}
    for r in range(repeats + 1):
        for name, (layer, call) in layers.items():
            for p in params[name]:
                p.grad = None
            t = time.perf_counter()
            out = call(layer, params[name])[0]
            fwd = time.perf_counter() - t
            t = time.perf_counter()
            out.sum().backward()
            bwd = time.perf_counter() - t
            if r:  # round 0 is the warm-up (lazy imports, caches, the per-size canonicalisation)
                times[name][0].append(fwd)
                times[name][1].append(bwd)
    return {name: (min(f), min(b)) for name, (f, b) in times.items()}


def defaults_case(kind: str, n: int, B: int, repeats: int, error_instances: int = 3) -> dict:
    """Both cvxpy layers on their defaults on a batch of B LPs or QPs of size n (issue 17's targets)."""
    from cvxpylayers.torch import CvxpyLayer

    problem, params, x = make_problem(n) if kind == "QP" else make_lp(n)
    values = make_batch(n, B) if kind == "QP" else make_lp_batch(n, B)
    ours = bbd.layer(problem, parameters=params, variables=[x])
    theirs = CvxpyLayer(problem, parameters=params, variables=[x])
    timed = _alternate({"bbd": (ours, _bbd_call), "cvxpylayers": (theirs, _cvxpylayers_defaults_call)}, values,
                       repeats)
    row = {"kind": kind, "n": n, "B": B}
    for name, (fwd, bwd) in timed.items():
        row[f"{name}_forward_ms"], row[f"{name}_backward_ms"] = 1e3 * fwd / B, 1e3 * bwd / B
    row["forward_ratio"] = row["bbd_forward_ms"] / row["cvxpylayers_forward_ms"]
    row["backward_speedup"] = row["cvxpylayers_backward_ms"] / row["bbd_backward_ms"]
    row["bbd_solvers"] = dict(ours.compiled.solve.solver_counts)
    reference = "CLARABEL" if kind == "QP" else "HIGHS"
    P = fixed_hessian(n) if kind == "QP" else np.zeros((n, n))
    for name, (layer, call) in {"bbd": (ours, _bbd_call), "cvxpylayers": (theirs, _cvxpylayers_defaults_call)}.items():
        row[f"{name}_grad_error"] = max(
            gradient_error(layer, call, problem, params, x, [v[i] for v in values], reference=reference, polish=P)
            for i in range(min(B, error_instances)))
    # The same against the unpolished tight solve (its own error, divided by the step, shows here).
    row["bbd_grad_error_unpolished"] = max(
        gradient_error(ours, _bbd_call, problem, params, x, [v[i] for v in values], reference=reference)
        for i in range(min(B, error_instances)))
    return row


def _defaults_table(rows: list[dict]) -> str:
    head = (f"{'':>2} {'n':>4} {'B':>3} | {'fwd bbd':>8} {'fwd cvxl':>8} {'ratio':>6} | {'bwd bbd':>8} "
            f"{'bwd cvxl':>8} {'speedup':>8} | {'err bbd':>8} {'err cvxl':>8} {'bbd, raw':>9} | bbd solver")
    lines = [head, "-" * len(head)]
    for r in rows:
        solvers = ", ".join(f"{k} {v}" for k, v in sorted(r["bbd_solvers"].items()))
        lines.append(
            f"{r['kind']:>2} {r['n']:>4} {r['B']:>3} | {r['bbd_forward_ms']:8.3f} {r['cvxpylayers_forward_ms']:8.3f} "
            f"{r['forward_ratio']:6.2f} | {r['bbd_backward_ms']:8.3f} {r['cvxpylayers_backward_ms']:8.3f} "
            f"{r['backward_speedup']:7.1f}x | {r['bbd_grad_error']:8.1e} {r['cvxpylayers_grad_error']:8.1e} "
            f"{r['bbd_grad_error_unpolished']:9.1e} | {solvers}"
        )
    lines.append("Both layers on their defaults (no solver named). ms per instance, best of the repeats, timed "
                 "alternately; ratio = fwd bbd / fwd cvxpylayers (target <= 1); speedup = bwd cvxpylayers / bwd bbd "
                 "(target >= 10); err = largest relative error of a directional derivative vs central differences "
                 "(step 1e-5) of a tight solve (Clarabel at 1e-12 for QPs, HiGHS for LPs) polished on its active set "
                 "in numpy, over the first 3 instances (target <= 2e-6); bbd, raw = bbd's against the unpolished "
                 "tight solve; bbd solver = instances each solver answered (DAQP: the default route).")
    return "\n".join(lines)


def barely_active_errors(n: int = 50, B: int = 16, seed: int = 3) -> dict:
    """Gradient error on projections onto a box with barely active / barely inactive rows.

    x* = min(p, u) has the closed-form Jacobians diag(p < u) and diag(p > u). Rows with |p - u| = 1e-4
    and 1e-6 are nondegenerate, but an interior-point answer has slack and multiplier both ~1e-4 there.
    Returns the largest absolute gradient error of each layer (Clarabel and SCS inside, QPLayer, and qpth).
    """
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x = cp.Variable(n)
    p, u = cp.Parameter(n), cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - p)), [x <= u])
    rng = np.random.default_rng(seed)
    gaps = rng.choice([-1e-6, 1e-6, -1e-4, 1e-4, -1e-2, 1e-2, -1.0, 1.0], size=(B, n))
    p_val, u_val = torch.tensor(1.0 + gaps), torch.ones(B, n, dtype=torch.float64)
    active = torch.tensor(gaps > 0, dtype=torch.float64)
    out = {}
    layers = {
        "bbd_clarabel": (bbd.layer(problem, parameters=[p, u], variables=[x], solver="CLARABEL"), {}),
        "bbd_defaults": (bbd.layer(problem, parameters=[p, u], variables=[x]), {}),  # DAQP, the default route
        "bbd_scs": (bbd.layer(problem, parameters=[p, u], variables=[x], solver="SCS"), {}),
        "cvxpylayers_clarabel": (CvxpyLayer(problem, parameters=[p, u], variables=[x]),
                                 {"solver_args": {"solve_method": "Clarabel"}}),
        "cvxpylayers_scs": (CvxpyLayer(problem, parameters=[p, u], variables=[x]),
                            {"solver_args": {"solve_method": "SCS"}}),
    }
    eye, none = torch.eye(n, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    qplayer = bbd.QPLayer()
    layers["qplayer"] = (lambda pp, uu: (qplayer(eye, -pp, eye, uu, none, none),), {})
    qpth = _qpth_layer(np.eye(n))
    if qpth is not None:  # the same projection: P = I, q = -p, G = I, h = u, no equalities
        layers["qpth"] = (lambda pp, uu: (qpth[0](qpth[1], -pp, eye, uu, none, none),), {})
    for name, (layer, kwargs) in layers.items():
        pp, uu = p_val.clone().requires_grad_(True), u_val.clone().requires_grad_(True)
        (sol,) = layer(pp, uu, **kwargs)
        sol.sum().backward()
        out[name] = max(float((pp.grad - (1 - active)).abs().max()), float((uu.grad - active).abs().max()))
    return out


def check_cost(n: int, B: int, repeats: int) -> list[dict]:
    """What the answer checks cost, per instance, timed inside the code that runs them (`_checks.CheckTimer`:
    certification, the degeneracy test), against the backward; best of `repeats` forwards and backwards.
    For QPLayer and the cvxpy layer on the benchmark's QPs."""
    from _checks import CheckTimer

    problem, params, x = make_problem(n)
    values = make_batch(n, B)
    P = torch.tensor(fixed_hessian(n))
    layers = {"QPLayer": (bbd.QPLayer(), P), "cvxpy": bbd.layer(problem, parameters=params, variables=[x])}
    rows = []
    for name, layer in layers.items():
        call = _qplayer_call if name == "QPLayer" else _bbd_call
        theta = [v.clone().requires_grad_(True) for v in values]
        call(layer, theta)[0].sum().backward()  # warm-up, and builds QPLayer's per-size layer
        compiled = (layer[0]._layers[(n, n, max(n // 4, 1))] if name == "QPLayer" else layer).compiled
        timer = CheckTimer()
        fwd, bwd, cert, deg = [], [], [], []
        with timer.active(compiled.condition):
            for _ in range(repeats):
                timer.reset()
                t = time.perf_counter()
                out = call(layer, theta)[0]
                fwd.append(time.perf_counter() - t)
                spent = timer.row(B)
                cert.append(spent["certification"])
                deg.append(spent["degeneracy"])
                t = time.perf_counter()
                out.sum().backward()
                bwd.append(time.perf_counter() - t)
        row = {"layer": name, "n": n, "B": B, "forward_ms": 1e3 * min(fwd) / B, "backward_ms": 1e3 * min(bwd) / B,
               "certification_ms": min(cert), "degeneracy_ms": min(deg)}
        row["checks_over_backward"] = (row["certification_ms"] + row["degeneracy_ms"]) / row["backward_ms"]
        rows.append(row)
    return rows


def _check_table(rows: list[dict]) -> str:
    head = (f"{'layer':>8} {'n':>4} {'B':>3} | {'forward':>8} {'backward':>9} | "
            f"{'certification':>13} {'degeneracy':>10} | {'checks / backward':>17}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer']:>8} {r['n']:>4} {r['B']:>3} | {r['forward_ms']:8.3f} {r['backward_ms']:9.3f} | "
                     f"{r['certification_ms']:13.4f} {r['degeneracy_ms']:10.4f} | {r['checks_over_backward']:16.0%}")
    lines.append("ms per instance, best of the repeats; certification and degeneracy timed inside the code that "
                 "runs them (benchmarks/_checks.py), in every forward.")
    return "\n".join(lines)


def _qplayer_table(rows: list[dict]) -> str:
    qpth = any("qpth_forward_ms" in r for r in rows)
    head = f"{'n':>4} {'B':>3} | {'fwd QPLayer':>11} {'bwd QPLayer':>11} {'err QPLayer':>11}"
    if qpth:
        head += f" | {'fwd qpth':>9} {'bwd qpth':>9} {'err qpth':>8} | {'fwd ratio':>9} {'bwd ratio':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = f"{r['qplayer_grad_error']:11.1e}" if "qplayer_grad_error" in r else f"{'':>11}"
        line = f"{r['n']:>4} {r['B']:>3} | {r['qplayer_forward_ms']:11.3f} {r['qplayer_backward_ms']:11.3f} {err}"
        if qpth:
            qerr = f"{r['qpth_grad_error']:8.1e}" if "qpth_grad_error" in r else f"{'':>8}"
            line += (f" | {r['qpth_forward_ms']:9.3f} {r['qpth_backward_ms']:9.3f} {qerr} | "
                     f"{r['qplayer_forward_ratio']:9.2f} {r['qplayer_backward_ratio']:9.2f}")
        lines.append(line)
    lines.append("QPLayer vs qpth: ms per instance (median); ratio = QPLayer / qpth (below 1: QPLayer faster); err = "
                 "relative error of a directional derivative vs central differences of a tight Clarabel solve "
                 "(first instance of the first batch size)." + ("" if qpth else " qpth: not installed."))
    return "\n".join(lines)


def _jvp_table(rows: list[dict]) -> str:
    cvx = any("bbd_jvp_ms" in r for r in rows)
    head = f"{'n':>4} {'B':>3} | {'jvp QPLayer':>11} {'jvp/bwd':>7} {'err jvp':>8}"
    if cvx:
        head += f" | {'jvp cvxpy':>9} {'jvp/bwd':>7} {'err jvp':>8}"
    lines = [head, "-" * len(head)]

    def err(r, key, width=8):
        return f"{r[key]:{width}.1e}" if key in r else f"{'':>{width}}"

    for r in rows:
        line = f"{r['n']:>4} {r['B']:>3} | {r['qplayer_jvp_ms']:11.3f} {r['qplayer_jvp_ratio']:7.2f} " + err(
            r, "qplayer_jvp_error")
        if cvx:
            line += f" | {r['bbd_jvp_ms']:9.3f} {r['bbd_jvp_ratio']:7.2f} " + err(r, "bbd_jvp_error")
        lines.append(line)
    lines.append("Forward mode: one JVP along a random tangent of every parameter (torch.autograd.forward_ad), ms per "
                 "instance = best (forward with dual inputs) - best (the same forward without tangents); jvp/bwd = "
                 "that over the best backward of the same interleaved loop; err jvp = relative error of <w, J d> "
                 "vs central differences of a tight Clarabel solve (first instance of the first batch size).")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    rows = [r for r in rows if "bbd_forward_ms" in r]
    if not rows:
        return ""
    qpth = any("qpth_forward_ms" in r for r in rows)
    head = (f"{'n':>4} {'B':>3} | {'fwd bbd':>9} {'fwd cvxl':>9} {'ratio':>6} | {'bwd bbd':>9} {'bwd cvxl':>9} "
            f"{'speedup':>8} {'bwd/fwd':>8} {'KKT':>8} | {'err bbd':>8} {'err cvxl':>8}")
    if qpth:
        head += f" | {'fwd qpth':>9} {'bwd qpth':>9} {'qpth/bbd':>8} {'err qpth':>8}"
    lines = [head, "-" * len(head)]

    def err(r, key):
        return f"{r[key]:8.1e}" if key in r else f"{'':>8}"

    for r in rows:
        line = (
            f"{r['n']:>4} {r['B']:>3} | {r['bbd_forward_ms']:9.3f} {r['cvxpylayers_forward_ms']:9.3f} "
            f"{r['forward_ratio']:6.2f} | {r['bbd_backward_ms']:9.3f} {r['cvxpylayers_backward_ms']:9.3f} "
            f"{r['backward_speedup']:7.1f}x {r['backward_over_forward']:8.3f} {r['dense_kkt_ms']:8.3f} | "
            f"{err(r, 'bbd_grad_error')} {err(r, 'cvxpylayers_grad_error')}"
        )
        if qpth:
            line += (f" | {r['qpth_forward_ms']:9.3f} {r['qpth_backward_ms']:9.3f} "
                     f"{r['qpth_backward_speedup']:7.1f}x {err(r, 'qpth_grad_error')}")
        lines.append(line)
    lines.append("times: ms per instance (median); ratio = fwd bbd / fwd cvxpylayers; speedup = bwd cvxpylayers "
                 "/ bwd bbd; qpth/bbd = bwd qpth / bwd bbd; KKT = one dense batched solve of the KKT size; err = "
                 "relative error of a directional derivative vs central differences of a tight Clarabel solve "
                 "(first instance of the first batch size).")
    lines.append("blackbox_diff factors the KKT matrix in the forward pass (when gradients are on), so its "
                 "backward is a triangular solve: compare fwd+bwd totals too. "
                 + ("qpth: its own batched interior-point solver in torch." if qpth else "qpth: not installed."))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="n = 10 and 50, B = 1 and 16, 1 repeat")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="problem sizes n (default 10 50 200; 50 100 200 with --defaults)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this JSON file")
    parser.add_argument("--qplayer-only", action="store_true",
                        help="only QPLayer and qpth (skip the cvxpy layers and the barely-active comparison)")
    parser.add_argument("--fanout-batch", type=int, default=64, help="batch size of the executor fan-out timing")
    parser.add_argument("--check-cost", action="store_true",
                        help="only the cost of the answer checks (certification, degeneracy) against the backward")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: small batched ops lose to thread start-up, "
                        "badly so on a loaded machine; applies to both layers)")
    parser.add_argument("--defaults", action="store_true",
                        help="only both cvxpy layers on their defaults, LPs and QPs (issue 17's targets)")
    parser.add_argument("--defaults-batch", type=int, default=8, help="batch size of the --defaults table")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([50, 100, 200] if args.defaults else [10, 50, 200])
    batches, repeats = args.batches, args.repeats
    if args.fast:
        sizes, batches, repeats = ([10, 20] if args.defaults else [10, 50]), [1, 16], 1
    torch.set_num_threads(args.threads)
    if args.defaults:
        B = 2 if args.fast else args.defaults_batch
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpylayers/diffcp deprecation noise, SCS's inaccuracy warnings
            for kind in ("LP", "QP"):
                for n in sizes:
                    rows.append(defaults_case(kind, n, B, max(repeats, 1)))
                    print(f"  done {kind} n={n} B={B}", file=sys.stderr, flush=True)
        print(_defaults_table(rows))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"defaults": rows}, indent=2))
        return rows
    if args.check_cost:
        rows = [r for n in sizes for B in batches for r in check_cost(n, B, max(repeats, 5))]
        print(_check_table(rows))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"check_cost": rows}, indent=2))
        return rows
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cvxpylayers/diffcp deprecation noise
        for n in sizes:
            for B in batches:
                rows.append(run_case(n, B, repeats, with_error=(B == batches[0]), cvxpy_layers=not args.qplayer_only))
                print(f"  done n={n} B={B}", file=sys.stderr, flush=True)
    print(_qplayer_table(rows))
    print(_jvp_table(rows))
    fan_n, fan_B = (50, 16) if args.fast else (100, args.fanout_batch)
    fanout = fanout_times(fan_n, fan_B, repeats)
    print(f"QPLayer forward fan-out at n = {fan_n}, B = {fan_B} (ms per instance, 2 workers): "
          + ", ".join(f"{k} {v:.3f}" for k, v in fanout.items()))
    errors = {}
    if not args.qplayer_only:
        print(_table(rows))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = barely_active_errors(n=20 if args.fast else 50, B=4 if args.fast else 16)
        print("barely active box projections, max |gradient error| vs the closed form: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"qp": rows, "barely_active": errors, "fanout": fanout}, indent=2))
    return rows


if __name__ == "__main__":
    main()
