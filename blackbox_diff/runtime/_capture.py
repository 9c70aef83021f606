"""Capture of failing black-box calls (`capture_failures=PATH`): one JSON line per failing instance.

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
replay sees bit-identical inputs. `blackbox_diff.tools.replay` reads these files back; it runs the code a
record names only when its user says so (see its docstring: the trust model).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import json
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "record_failure", "resolve", "solver_path", "unwrap"]

FORMAT = "blackbox-diff-failure/1"
_LOCK = threading.Lock()  # one record = one write; threads of one process never interleave lines


def solver_path(solve: Callable) -> tuple[str | None, str | None, bool]:
    """(``module:qualname`` of `solve`, None, unwrap) or (None, why it cannot be imported, False).

    A function decorated in place by `bbd.implicit` is importable: its name holds the wrapper, whose
    ``__wrapped__`` is the solver (the replay unwraps it).
    """
    module = getattr(solve, "__module__", None)
    qualname = getattr(solve, "__qualname__", None)
    if module is None or qualname is None:
        return None, f"an instance of {type(solve).__name__} has no module-level name", False
    if "<lambda>" in qualname or "<locals>" in qualname:
        return None, f"{qualname!r} is a lambda or a closure defined inside a function", False
    try:
        target = resolve(module, qualname, getattr(sys.modules.get(module), "__file__", None))
    except Exception as err:  # noqa: BLE001 - any import problem only means "not importable"
        return None, f"importing {module}:{qualname} failed ({type(err).__name__}: {err})", False
    if target is not solve and unwrap(target) is not solve:
        return None, f"{module}:{qualname} names a different object than the solver", False
    return f"{module}:{qualname}", None, target is not solve


def unwrap(obj: Any) -> Any:
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


def resolve(module: str, qualname: str, file: str | None) -> Any:
    """The object `module:qualname`; a script's `__main__` is loaded from `file` under another name.

    This imports (runs) code: callers decide whether that code is trusted.
    """
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
