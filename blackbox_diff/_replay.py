"""Capture and replay of failing black-box calls (`capture_failures=PATH`, `blackbox-diff replay PATH`).

A capture file is JSON lines: one self-contained record per failing instance, appended, never pickled, so
it can be attached to a bug report and read by any language. A record holds

    {"format": "blackbox-diff-failure/1",
     "solver": "package.module:function" | null,   # null: not importable (lambda, closure, instance)
     "importable": true | false, "why_not_importable": "...", "unwrap": false,
     "solver_repr": "...", "solver_file": "...",
     "args": [{"kind": "numpy" | "torch", "dtype": "float64", "device": "cpu", "shape": [3], "data": [...]}],
     "error": {"type": "SolverError", "message": "...", "cause_type": "RuntimeError", "cause_message": "..."},
     "batch_index": 2 | null, "timestamp": "2026-...Z", "versions": {"python": ..., "numpy": ..., ...}}

Parameters are stored as nested lists of float64 numbers in Python's shortest round-trip notation, so a
replay sees bit-identical inputs. `replay` imports the solver, calls it on the recorded parameters and
says whether it fails the same way: it raises an exception of the recorded type (a solver that raised),
or returns a value the engine rejects again (NaN, Inf or not numbers). A certification failure cannot be
re-judged without the optimality condition: such a replay reports what the solver returned and leaves
`reproduced` as None.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import inspect
import json
import platform
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blackbox_diff._errors import BlackBoxDiffError, CertificationError, InputError

__all__ = ["FORMAT", "ReplayResult", "load_records", "main", "record_failure", "replay", "solver_path"]

FORMAT = "blackbox-diff-failure/1"
_LOCK = threading.Lock()  # one record = one write; threads of one process never interleave lines


# --- capture -------------------------------------------------------------------------------------------
def solver_path(solve: Callable) -> tuple[str | None, str | None, bool]:
    """(``module:qualname`` of `solve`, None, unwrap) or (None, why it cannot be imported, False).

    A function decorated in place by `bbd.implicit` is importable: its name holds the wrapper, whose
    ``__wrapped__`` is the solver (the replay unwraps it).
    """
    module = getattr(solve, "__module__", None)
    qualname = getattr(solve, "__qualname__", None)
    if module is None or qualname is None:
        return None, f"a {type(solve).__name__} instance has no module-level name", False
    if "<lambda>" in qualname or "<locals>" in qualname:
        return None, f"{qualname!r} is a lambda or a closure defined inside a function", False
    try:
        target = _resolve(module, qualname, getattr(sys.modules.get(module), "__file__", None))
    except Exception as err:  # noqa: BLE001 - any import problem only means "not importable"
        return None, f"importing {module}:{qualname} failed ({type(err).__name__}: {err})", False
    if target is not solve and _unwrap(target) is not solve:
        return None, f"{module}:{qualname} names a different object than the solver", False
    return f"{module}:{qualname}", None, target is not solve


def _unwrap(obj: Any) -> Any:
    inner = getattr(obj, "__wrapped__", None)
    return obj if inner is None else inner


def _array_record(value: Any) -> dict[str, Any]:
    kind = "numpy"
    dtype, device = "float64", "cpu"
    if hasattr(value, "detach") and hasattr(value, "dtype"):  # a torch tensor (arrays="torch")
        kind, dtype, device = "torch", str(value.dtype).replace("torch.", ""), str(value.device)
        value = value.detach().to("cpu").double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    data = arr.tolist()
    return {"kind": kind, "dtype": dtype, "device": device, "shape": list(arr.shape), "data": data}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__}
    for name in ("torch", "scipy", "blackbox_diff"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "unknown"))
    return out


def _error_record(error: BaseException) -> dict[str, Any]:
    cause = error.__cause__
    return {
        "type": type(error).__name__,
        "message": str(error),
        "cause_type": None if cause is None else type(cause).__name__,
        "cause_message": None if cause is None else str(cause),
    }


def record_failure(
    path: str | Path, solve: Callable, args: tuple, error: BaseException, batch_index: int | None
) -> None:
    """Append one failing black-box call to the capture file `path` (JSON lines; see the module doc).

    Never raises: a capture that cannot be written warns (RuntimeWarning), so the original failure is
    what the caller sees.

    Args:
        path: the capture file; created (with its folder) on first use, appended to afterwards.
        solve: the black box that failed.
        args: the arguments it was called with (numpy arrays, or torch tensors under arrays="torch").
        error: the error the engine raised or turned into NaN for this instance.
        batch_index: the instance's index in the batch (None for an unbatched call).
    """
    try:
        name, why, unwrap = solver_path(solve)
        try:
            source_file = inspect.getsourcefile(solve)
        except TypeError:  # builtins and callable instances have no source file
            source_file = None
        record = {
            "format": FORMAT,
            "solver": name,
            "importable": name is not None,
            "why_not_importable": why,
            "unwrap": unwrap,
            "solver_repr": repr(solve)[:200],
            "solver_file": source_file,
            "args": [_array_record(a) for a in args],
            "error": _error_record(error),
            "batch_index": batch_index,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "versions": _versions(),
        }
        line = json.dumps(record, allow_nan=True) + "\n"
        target = Path(path)
        with _LOCK:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a", encoding="utf-8") as fh:
                fh.write(line)
    except Exception as err:  # noqa: BLE001 - the capture must never hide the solver's own failure
        warnings.warn(
            f"capture_failures could not record the failing call to {str(path)!r}: {type(err).__name__}: "
            f"{err}. Check that the path is writable and the parameters are numbers.",
            RuntimeWarning,
            stacklevel=2,
        )


# --- replay --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReplayResult:
    """The outcome of re-running one recorded failure.

    Attributes:
        record: position of the record in the file (0-based).
        solver: the solver's import path (or repr when it was not importable).
        batch_index: the instance's batch index in the original call.
        recorded: "Type: message" of the recorded error.
        outcome: "raised" (the solver raised again), "returned" (it returned a value), or "not run"
            (the solver could not be imported).
        reproduced: True when it failed the same way, False when not, None when a re-run alone cannot
            tell (a certification failure needs the optimality condition).
        detail: the new exception ("Type: message"), a summary of the returned value, or why it was not run.
        value: what the solver returned (None unless outcome == "returned").
    """

    record: int
    solver: str
    batch_index: int | None
    recorded: str
    outcome: str
    reproduced: bool | None
    detail: str
    value: Any = None


def _resolve(module: str, qualname: str, file: str | None) -> Any:
    if module == "__main__" and file and getattr(sys.modules.get("__main__"), "__file__", None) != file:
        # A script's solver: load the script under another name, so its `if __name__ == "__main__":`
        # block (the training loop) does not run.
        spec = importlib.util.spec_from_file_location("_bbd_replay_main", file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {file}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a capture file.

    Raises:
        InputError: the file is missing, or a line is not a record written by `record_failure`.
    """
    target = Path(path)
    if not target.is_file():
        raise InputError(
            f"No capture file at {str(path)!r}. Expected the file written by capture_failures=PATH; check the "
            "path (a capture file only exists once a call has failed)."
        )
    records = []
    for number, line in enumerate(target.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                f"Line {number} of {str(path)!r} is not JSON ({err.msg} at column {err.colno}); expected one "
                "record per line as written by capture_failures=. Remove the damaged line and retry."
            ) from err
        if not isinstance(rec, dict) or rec.get("format") != FORMAT:
            got = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
            raise InputError(
                f"Line {number} of {str(path)!r} has format {got!r}; expected {FORMAT!r}. The file was not "
                "written by capture_failures= of this version of blackbox-diff."
            )
        records.append(rec)
    return records


def _rebuild(arg: dict[str, Any]) -> Any:
    arr = np.asarray(arg["data"], dtype=np.float64).reshape(arg["shape"])
    if arg.get("kind") == "torch":
        import torch

        return torch.as_tensor(arr).to(getattr(torch, arg.get("dtype", "float64")))
    return arr


def _summary(value: Any) -> tuple[str, bool]:
    """(a short description of a returned value, whether the engine would reject it as NaN/Inf/text)."""
    raw = getattr(value, "x", value)  # a KKTSolution's primal
    if hasattr(raw, "detach"):
        raw = raw.detach().cpu().double().numpy()
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return f"a {type(value).__name__} that is not an array of numbers: {str(value)[:60]!r}", True
    head = ", ".join(f"{v:.6g}" for v in arr.reshape(-1)[:4]) + (", ..." if arr.size > 4 else "")
    bad = not bool(np.isfinite(arr).all())
    return f"array of shape {arr.shape}: [{head}]" + (" (contains NaN/Inf)" if bad else ""), bad


def _replay_one(k: int, rec: dict[str, Any], solver: Callable | None) -> ReplayResult:
    err = rec["error"]
    recorded = f"{err['type']}: {err['message']}"
    name = rec.get("solver") or rec.get("solver_repr", "?")
    base = {"record": k, "solver": name, "batch_index": rec.get("batch_index"), "recorded": recorded}
    if solver is None:
        if not rec.get("importable"):
            why = f"the solver is not importable ({rec.get('why_not_importable')}); pass solver= (--solver)"
            return ReplayResult(**base, outcome="not run", reproduced=False, detail=why)
        module, qualname = rec["solver"].split(":", 1)
        try:
            solver = _resolve(module, qualname, rec.get("solver_file"))
            solver = _unwrap(solver) if rec.get("unwrap") else solver
        except Exception as exc:  # noqa: BLE001 - reported per record
            detail = f"importing {rec['solver']} failed: {type(exc).__name__}: {exc}"
            return ReplayResult(**base, outcome="not run", reproduced=False, detail=detail)
    args = [_rebuild(a) for a in rec["args"]]
    try:
        value = solver(*args)
    except Exception as exc:  # noqa: BLE001 - the failure being replayed
        raised = type(exc).__name__
        same = raised in (err["type"], err.get("cause_type"))
        return ReplayResult(**base, outcome="raised", reproduced=same, detail=f"{raised}: {exc}")
    text, rejected = _summary(value)
    if err["type"] == CertificationError.__name__:
        reproduced = None  # needs the optimality condition to judge
    else:
        reproduced = rejected and err.get("cause_type") in (None, "TypeError", "ValueError")
    return ReplayResult(**base, outcome="returned", reproduced=reproduced, detail=text, value=value)


def replay(
    path: str | Path, *, index: int | None = None, solver: Callable | None = None
) -> list[ReplayResult]:
    """Re-run the failing calls recorded in `path` and say whether each fails the same way.

    Args:
        path: a capture file written by capture_failures=.
        index: replay only this record (0-based; negative counts from the end).
        solver: call this instead of the recorded solver (needed when it was a lambda or a closure).

    Returns:
        one `ReplayResult` per replayed record, in file order.

    Raises:
        InputError: the file is missing or malformed, or `index` is out of range.
    """
    records = load_records(path)
    chosen = list(enumerate(records))
    if index is not None:
        if not -len(records) <= index < len(records):
            raise InputError(
                f"Record index {index} is out of range: {str(path)!r} holds {len(records)} records; expected "
                f"an index in [{-len(records)}, {len(records) - 1}]."
            )
        chosen = [chosen[index]]
    return [_replay_one(k, rec, solver) for k, rec in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    """`blackbox-diff replay FILE [--index N] [--solver MODULE:NAME] [--json]`.

    Returns:
        0 when every replayed record reproduced its failure, 1 when some did not (or could not be run or
        judged), 2 when the file or the arguments are invalid.
    """
    parser = argparse.ArgumentParser(
        prog="blackbox-diff replay", description="Re-run the failing black-box calls recorded by capture_failures="
    )
    parser.add_argument("file", help="the capture file (JSON lines)")
    parser.add_argument("--index", type=int, default=None, help="replay only record N (0-based)")
    parser.add_argument("--solver", default=None, help="MODULE:NAME of the solver to call instead of the recorded one")
    parser.add_argument("--json", action="store_true", help="print one JSON object per record")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        solver = None
        if args.solver is not None:
            module, _, qualname = args.solver.partition(":")
            if not qualname:
                raise InputError(f"--solver must be MODULE:NAME (e.g. mypkg.solvers:solve); got {args.solver!r}.")
            solver = _resolve(module, qualname, None)
        results = replay(args.file, index=args.index, solver=solver)
    except (BlackBoxDiffError, ImportError, AttributeError) as err:
        print(f"blackbox-diff replay: {err}", file=sys.stderr)
        return 2
    for r in results:
        if args.json:
            row = dataclasses.asdict(r)
            row["value"] = None if r.value is None else _summary(r.value)[0]
            print(json.dumps(row))
            continue
        verdict = {True: "REPRODUCED", False: "NOT REPRODUCED", None: "RETURNED (certify with the condition)"}
        where = "" if r.batch_index is None else f" (batch index {r.batch_index})"
        print(f"[{r.record}] {r.solver}{where}: {verdict[r.reproduced]}")
        print(f"    recorded: {_clip(r.recorded)}")
        print(f"    replay:   {r.outcome}: {_clip(r.detail)}")
    return 0 if results and all(r.reproduced for r in results) else 1


def _clip(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."

