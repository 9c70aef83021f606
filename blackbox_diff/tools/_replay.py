"""Replay of captured failures (`blackbox-diff replay FILE`), safe by default.

Trust model. A capture file (written by ``capture_failures=``, see `blackbox_diff.runtime._capture`) is data: its
parameters are only ever parsed as JSON numbers and nothing is unpickled. But a record also *names code*:
the solver's import path (``module:qualname``) and, for a solver defined in a script, the script's file.
Importing a module or loading a script runs its code, so replay never does that on the file's word:

* by default nothing runs: each record is listed with the code it names and how to run it;
* ``--solver MODULE:NAME`` (``solver=``) runs the solver *you* name on the command line on every record's
  parameters (``MODULE`` is imported as ``python -m`` would, the current directory first;
  ``path/to/file.py:NAME`` loads that file);
* ``--trust`` (``trust=True``) runs the code the records name: for files you wrote yourself or trust as
  you would trust code.

A replay says whether the solver fails the same way: it raises an exception of the recorded type (a solver
that raised), or returns a value the engine rejects again (NaN, Inf or not numbers). A certification
failure cannot be re-judged without the optimality condition: such a replay reports what the solver
returned and leaves `reproduced` as None.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blackbox_diff._errors import BlackBoxDiffError, CertificationError, InputError
from blackbox_diff.api import ImplicitFunction
from blackbox_diff.runtime import FORMAT, record_failure, resolve, unwrap

__all__ = ["FORMAT", "ReplayResult", "add_arguments", "load_records", "load_solver", "main", "record_failure",
           "replay", "run"]

_DTYPES = ("float64", "float32", "float16", "bfloat16")
HOW_TO_RUN = ("replay runs only code you name: pass --solver MODULE:NAME (solver=) to run your solver on the "
              "recorded parameters, or --trust (trust=True) to run the code the file names, for files you trust")


@dataclasses.dataclass
class ReplayResult:
    """The outcome of re-running one recorded failure.

    Attributes:
        record: position of the record in the file (0-based).
        solver: the solver's import path (or repr when it was not importable).
        batch_index: the instance's batch index in the original call.
        recorded: "Type: message" of the recorded error.
        outcome: "raised" (the solver raised again), "returned" (it returned a value), or "not run"
            (nothing was run: no solver named and no trust given, or the named code could not be loaded).
        reproduced: True when it failed the same way, False when it did not, None when nothing ran or a
            re-run alone cannot tell (a certification failure needs the optimality condition).
        detail: the new exception ("Type: message"), a summary of the returned value, or why it was not
            run and how to run it.
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


# --- reading a capture file --------------------------------------------------------------------------------
def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a capture file (an empty file gives an empty list).

    Raises:
        InputError: the file is missing, or a line is not a well-formed record written by `record_failure`.
    """
    target = Path(path)
    if not target.is_file():
        raise InputError(
            f"No capture file at {str(path)!r}. Expected the file written by capture_failures=PATH; check the "
            "path (a capture file only exists once a call has failed)."
        )
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{str(path)!r} cannot be read as a capture file ({err}); expected UTF-8 JSON lines "
                         "written by capture_failures=.") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
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
        problem = _malformed(rec)
        if problem is not None:
            raise InputError(
                f"Line {number} of {str(path)!r} is not a well-formed capture record: {problem}. Expected a record "
                "as written by capture_failures=; fix or remove that line."
            )
        records.append(rec)
    return records


def _malformed(rec: dict[str, Any]) -> str | None:
    """What is wrong with a record (None: nothing)."""
    error = rec.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("type"), str) or not isinstance(
            error.get("message"), str):
        return "'error' must be an object with string 'type' and 'message'"
    if not isinstance(error.get("cause_type"), (str, type(None))):
        return "'error.cause_type' must be a string or null"
    solver = rec.get("solver")
    if solver is not None and not (isinstance(solver, str) and ":" in solver):
        return f"'solver' must be 'module:qualname' or null; got {solver!r}"
    for key in ("solver_file", "why_not_importable", "solver_repr"):
        if not isinstance(rec.get(key), (str, type(None))):
            return f"{key!r} must be a string or null"
    index = rec.get("batch_index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        return f"'batch_index' must be an integer or null; got {index!r}"
    args = rec.get("args")
    if not isinstance(args, list):
        return "'args' must be a list of arrays"
    for k, arg in enumerate(args):
        problem = _malformed_array(arg)
        if problem is not None:
            return f"args[{k}]: {problem}"
    return None


def _malformed_array(arg: Any) -> str | None:
    if not isinstance(arg, dict):
        return "expected an object with 'shape' and 'data'"
    shape = arg.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        return f"'shape' must be a list of non-negative integers; got {shape!r}"
    if arg.get("kind", "numpy") not in ("numpy", "torch") or arg.get("dtype", "float64") not in _DTYPES:
        return f"'kind' must be 'numpy' or 'torch' and 'dtype' one of {list(_DTYPES)}"
    try:
        data = np.asarray(arg.get("data"), dtype=np.float64)
    except (TypeError, ValueError) as err:
        return f"'data' is not a (nested) list of numbers ({err})"
    if data.size != math.prod(shape):
        return f"'data' holds {data.size} numbers, but 'shape' {shape} needs {math.prod(shape)}"
    return None


def _rebuild(arg: dict[str, Any]) -> Any:
    arr = np.asarray(arg["data"], dtype=np.float64).reshape(arg["shape"])
    if arg.get("kind") == "torch":
        import torch

        return torch.as_tensor(arr).to(getattr(torch, arg.get("dtype", "float64")))
    return arr


# --- replaying ---------------------------------------------------------------------------------------------
def load_solver(spec: str) -> Callable:
    """The callable `spec` names: ``MODULE:NAME`` (imported, the current directory first) or ``FILE.py:NAME``.

    Raises:
        InputError: `spec` is malformed, or the module, file or name cannot be loaded.
    """
    module, sep, qualname = spec.rpartition(":")
    if not sep or not module or not qualname:
        raise InputError(f"--solver must be MODULE:NAME (e.g. mypkg.solvers:solve) or FILE.py:NAME; got {spec!r}.")
    try:
        if module.endswith(".py") or os.sep in module:
            path = Path(module).resolve()
            loader = importlib.util.spec_from_file_location("_bbd_replay_solver", path)
            if loader is None or loader.loader is None or not path.is_file():
                raise ImportError(f"no Python file at {str(path)!r}")
            obj: Any = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(obj)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does
            obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as err:  # noqa: BLE001 - any failure to load the named code is the user's to fix
        raise InputError(f"--solver {spec!r} cannot be loaded ({type(err).__name__}: {err}). Check the module or "
                         "file and the name.") from err
    if not callable(obj):
        raise InputError(f"--solver {spec!r} names a {type(obj).__name__}, not a callable solver.")
    return unwrap(obj) if isinstance(obj, ImplicitFunction) else obj


def _named_code(rec: dict[str, Any]) -> str:
    """What running a record's own solver would run, in words."""
    if not rec.get("importable") or not rec.get("solver"):
        return f"nothing importable ({rec.get('why_not_importable') or 'no import path recorded'})"
    module, qualname = rec["solver"].split(":", 1)
    if module == "__main__" and rec.get("solver_file"):
        return f"{qualname} from the script {rec['solver_file']} (loaded without its __main__ block)"
    return f"{rec['solver']} (imports the module {module})"


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


def _replay_one(k: int, rec: dict[str, Any], solver: Callable | None, trust: bool) -> ReplayResult:
    err = rec["error"]
    recorded = f"{err['type']}: {err['message']}"
    name = rec.get("solver") or rec.get("solver_repr") or "?"
    base = {"record": k, "solver": name, "batch_index": rec.get("batch_index"), "recorded": recorded}
    if solver is None:
        named = _named_code(rec)
        if not trust or not rec.get("importable") or not rec.get("solver"):
            why = "not importable, so only --solver can run it" if trust else HOW_TO_RUN
            return ReplayResult(**base, outcome="not run", reproduced=None, detail=f"the file names {named}; {why}")
        module, qualname = rec["solver"].split(":", 1)
        try:
            solver = resolve(module, qualname, rec.get("solver_file"))
            solver = unwrap(solver) if rec.get("unwrap") else solver
        except Exception as exc:  # noqa: BLE001 - reported per record
            detail = f"loading {named} failed: {type(exc).__name__}: {exc}"
            return ReplayResult(**base, outcome="not run", reproduced=None, detail=detail)
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
    path: str | Path, *, index: int | None = None, solver: Callable | None = None, trust: bool = False
) -> list[ReplayResult]:
    """Re-run the failing calls recorded in `path` and say whether each fails the same way.

    Nothing runs unless you name the code (`solver`) or trust the file (`trust`): see the module docstring.

    Args:
        path: a capture file written by capture_failures=.
        index: replay only this record (0-based; negative counts from the end).
        solver: call this on every record's parameters (your solver, or a fixed version of it).
        trust: run the solver each record names (imports its module, or loads its script). Off by
            default: a capture file is data from wherever it came from, and importing runs code.

    Returns:
        one `ReplayResult` per replayed record, in file order (none for an empty file).

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
    return [_replay_one(k, rec, solver, trust) for k, rec in chosen]


# --- the command -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `blackbox-diff replay` (shared by the command and `main`)."""
    parser.add_argument("file", help="the capture file (JSON lines written by capture_failures=)")
    parser.add_argument("--index", type=int, default=None, metavar="N",
                        help="replay only record N (0-based; negative counts from the end)")
    parser.add_argument("--solver", default=None, metavar="MODULE:NAME",
                        help="run this solver on every record's parameters: MODULE:NAME (imported, the current "
                             "directory first) or FILE.py:NAME. Without it (and without --trust) nothing is run: "
                             "each record is listed with the code it names")
    parser.add_argument("--trust", action="store_true",
                        help="run the solver each record names (imports its module or loads its script). Off by "
                             "default: importing runs code, so use it only for capture files you trust")
    parser.add_argument("--json", action="store_true", help="print one JSON object per record")


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; the exit status (see `main`)."""
    try:
        solver = None if args.solver is None else load_solver(args.solver)
        results = replay(args.file, index=args.index, solver=solver, trust=args.trust)
    except BlackBoxDiffError as err:
        print(f"blackbox-diff replay: {err}", file=sys.stderr)
        return 2
    if not results:
        print(f"No records in {args.file!r}: the capture file is empty (capture_failures= appends a record only "
              "when a call fails), so there is nothing to replay.")
        return 1
    for r in results:
        _print(r, args.json)
    if not args.json and any(r.outcome == "not run" for r in results) and solver is None and not args.trust:
        print(f"Nothing was run: a capture file names code, and {HOW_TO_RUN}.")
    return 0 if all(r.reproduced for r in results) else 1


def _print(r: ReplayResult, as_json: bool) -> None:
    if as_json:
        row = dataclasses.asdict(r)
        row["value"] = None if r.value is None else _summary(r.value)[0]
        print(json.dumps(row))
        return
    if r.outcome == "not run":
        verdict = "NOT RUN"
    else:
        verdict = {True: "REPRODUCED", False: "NOT REPRODUCED", None: "RETURNED (certify with the condition)"}[
            r.reproduced]
    where = "" if r.batch_index is None else f" (batch index {r.batch_index})"
    print(f"[{r.record}] {r.solver}{where}: {verdict}")
    print(f"    recorded: {_clip(r.recorded)}")
    print(f"    replay:   {r.outcome}: {_clip(r.detail)}")


def main(argv: Sequence[str] | None = None) -> int:
    """`blackbox-diff replay FILE [--index N] [--solver MODULE:NAME] [--trust] [--json]`.

    Returns:
        0 when every replayed record reproduced its failure; 1 when some did not, or were not run (no
        --solver and no --trust), or cannot be judged, or the file holds no record; 2 when the file or the
        arguments are invalid.
    """
    parser = argparse.ArgumentParser(
        prog="blackbox-diff replay", description="Re-run the failing black-box calls recorded by capture_failures=. "
        "Runs nothing unless you name the solver (--solver) or trust the file (--trust)."
    )
    add_arguments(parser)
    return run(parser.parse_args(list(argv) if argv is not None else None))


def _clip(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
