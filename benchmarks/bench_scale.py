"""Scaling out the black-box solves: serial vs threads vs processes vs Dask vs Ray (1 and 2 workers), with chunking.

Problem: B small box-constrained QPs  min 0.5 x^T Q x + c^T x  s.t. 0 <= x <= 1  (n = 6, Q SPD and c
random per instance), each solved by scipy SLSQP: a real black box of about a millisecond, the regime
where a batch's time is the solves. Reported per executor:

* solve throughput (solves/s) of `run_instances` (the fan-out alone) and of the whole layer forward
  (`bbd.implicit(KKT, in_dims=0, executor=...)`: solves + multiplier recovery + certification);
* speed-up against the serial loop, and 2 workers against 1;
* the per-instance overhead of the executor path: the same fan-out with a solver that does nothing,
  minus the in-process loop, divided by B.

"chunked" rows use the engine's default, ceil(B / (4 * workers)) instances per task; the others force one
task per instance (`run_instances(..., chunk_size=1)`). Process pools named
"(owned)" are created by the caller once and reused; "processes" (the string option) makes a fresh pool
per call, and its start-up is part of the time. Dask runs a LocalCluster of worker processes on loopback;
Ray a local instance (`ray.init(num_cpus=workers)`) behind the adapter of docs/scaling.md.

Run:  python benchmarks/bench_scale.py [--fast] [--batch B] [--repeat R] [--no-dask] [--no-ray] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize

N_VARS = 6


# --- the black box (module level: picklable for process pools and Dask) ------------------------------
def make_batch(B: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((B, N_VARS, N_VARS))
    Q = M @ M.transpose(0, 2, 1) + np.eye(N_VARS)
    c = 2.0 * rng.standard_normal((B, N_VARS))
    return Q, c


def slsqp_qp(Q: np.ndarray, c: np.ndarray) -> np.ndarray:
    res = scipy.optimize.minimize(
        lambda x: 0.5 * x @ Q @ x + c @ x,
        np.full(N_VARS, 0.5),
        jac=lambda x: Q @ x + c,
        bounds=[(0.0, 1.0)] * N_VARS,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return np.clip(res.x, 0.0, 1.0)


def noop(Q: np.ndarray, c: np.ndarray) -> np.ndarray:
    return c


# --- chunked (the engine's default) vs one task per instance (chunk_size=1) ------------------------------
@contextlib.contextmanager
def chunked(enabled: bool) -> Iterator[None]:
    """Measure the engine's fan-out as it is (chunked), or forced to one task per instance."""
    import blackbox_diff.api._implicit as engine
    from blackbox_diff.runtime import run_instances

    def one_per_task(solve: Callable, args: list, executor: Any, max_workers: int | None) -> list:
        return run_instances(solve, args, executor, max_workers, chunk_size=1)

    original = engine.run_instances
    engine.run_instances = run_instances if enabled else one_per_task
    try:
        yield
    finally:
        engine.run_instances = original


# --- executors -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def executor_for(kind: str, workers: int) -> Iterator[Any]:
    if kind == "serial":
        yield None
    elif kind == "threads":
        yield "threads"
    elif kind == "processes":
        yield "processes"
    elif kind == "pool (owned)":
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            list(pool.map(abs, range(workers)))  # start the workers before timing
            yield pool
    elif kind == "dask":
        import distributed

        with distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster, distributed.Client(cluster) as client:
            client.run(lambda: None)
            yield client.get_executor(pure=False)  # a black box is not assumed pure: always run it
    elif kind == "ray":
        import sys

        import ray

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers do not import benchmarks/
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            from blackbox_diff.executors import RayExecutor

            ex = RayExecutor()
            list(ex.map(abs, range(2 * workers)))  # start the workers before timing
            yield ex
        finally:
            ray.shutdown()
    else:
        raise ValueError(kind)


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(kind, workers, chunk, ex, cond, args, Q, c, reference, repeat) -> dict:
    import blackbox_diff as bbd
    import blackbox_diff.api._implicit as engine

    with chunked(chunk):
        fan_out = engine.run_instances
        mw = workers if kind in ("threads", "processes") else None
        layer = bbd.implicit(cond, in_dims=0, executor=ex, max_workers=mw)(slsqp_qp)
        out = layer(Q, c)  # warm-up and correctness
        err = float(np.abs(out.numpy() - reference).max())
        t_solve = _best(lambda: fan_out(slsqp_qp, args, ex, mw), repeat)
        t_layer = _best(lambda: layer(Q, c), repeat)
        t_noop = _best(lambda: fan_out(noop, args, ex, mw), repeat)
    return {"executor": kind, "workers": workers, "chunked": chunk, "B": len(args), "solve_s": t_solve,
            "layer_s": t_layer, "noop_s": t_noop, "max_err": err}


def bench(B: int, repeat: int, configs: list[tuple[str, int]]) -> list[dict]:
    import torch

    import blackbox_diff as bbd

    Qn, cn = make_batch(B)
    args = [(Qn[i], cn[i]) for i in range(B)]
    Q, c = torch.tensor(Qn), torch.tensor(cn)
    cond = bbd.KKT(
        lambda x, Q, c: 0.5 * x @ Q @ x + c @ x,
        ineq=lambda x, Q, c: torch.cat([-x, x - 1.0]),
    )
    reference = np.stack([slsqp_qp(*a) for a in args])
    rows = []
    for kind, workers in configs:
        with executor_for(kind, workers) as ex:
            for chunk in (False, True) if kind not in ("serial", "threads") else (False,):
                rows.append(_measure(kind, workers, chunk, ex, cond, args, Q, c, reference, repeat))
    serial = next(r for r in rows if r["executor"] == "serial")
    for r in rows:
        r["solves_per_s"] = B / r["solve_s"]
        r["layer_per_s"] = B / r["layer_s"]
        r["speedup"] = serial["solve_s"] / r["solve_s"]
        r["layer_speedup"] = serial["layer_s"] / r["layer_s"]
        r["overhead_us"] = 1e6 * (r["noop_s"] - serial["noop_s"]) / B
        one = next((o for o in rows if (o["executor"], o["chunked"], o["workers"]) == (r["executor"], r["chunked"], 1)),
                   None)
        r["2w/1w"] = one["solve_s"] / r["solve_s"] if one is not None and r["workers"] == 2 else float("nan")
    return rows


def configs(with_dask: bool, fast: bool, with_ray: bool = False) -> list[tuple[str, int]]:
    clusters = (("dask",) if with_dask else ()) + (("ray",) if with_ray else ())
    if fast:  # a smoke run: one of each path
        out = [("serial", 1), ("threads", 2), ("processes", 2), ("pool (owned)", 2)]
        return out + [(kind, 2) for kind in clusters]
    out = [("serial", 1), ("threads", 2)]
    for kind in ("processes", "pool (owned)") + clusters:
        out += [(kind, 1), (kind, 2)]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="B = 100, 1 repeat, 2 workers only (smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="number of QPs (default 1000, fast 200)")
    parser.add_argument("--repeat", type=int, default=None, help="best of this many runs (default 3, fast 1)")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask rows")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    parser.add_argument("--json", help="write the table as JSON to this path")
    args = parser.parse_args(argv)
    B = args.batch or (100 if args.fast else 1000)
    repeat = args.repeat or (1 if args.fast else 3)
    try:
        import distributed  # noqa: F401

        with_dask = not args.no_dask
    except ImportError:
        print("distributed is not installed: skipping the Dask rows (pip install 'dask[distributed]').")
        with_dask = False
    try:
        import ray  # noqa: F401

        with_ray = not args.no_ray
    except ImportError:
        print("ray is not installed: skipping the Ray rows (pip install ray).")
        with_ray = False
    load_before = os.getloadavg()[0]
    rows = bench(B, repeat, configs(with_dask, args.fast, with_ray))
    print(f"B = {B} box-constrained QPs (n = {N_VARS}, scipy SLSQP), best of {repeat}; cpu count {os.cpu_count()}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs skew the numbers)")
    cols = [("executor", "executor", "{}"), ("workers", "workers", "{}"), ("chunked", "chunked", "{}"),
            ("solves/s", "solves_per_s", "{:.0f}"), ("speed-up", "speedup", "{:.2f}"), ("2w/1w", "2w/1w", "{:.2f}"),
            ("layer/s", "layer_per_s", "{:.0f}"), ("layer speed-up", "layer_speedup", "{:.2f}"),
            ("overhead us/inst", "overhead_us", "{:.1f}"), ("max err", "max_err", "{:.1e}")]
    cells = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(title), *(len(row[i]) for row in cells)) for i, (title, _, _) in enumerate(cols)]
    print("  ".join(title.rjust(w) for (title, _, _), w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(text.rjust(w) for text, w in zip(row, widths, strict=True)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
