"""`bbd.Executable`: a compiled program as a black box, run safely once per instance.

I/O protocol (docs/backends/executable.md has the details and examples). The program receives one
instance's parameters and writes its solution:

* ``io="json"``: input ``{"parameters": [p0, p1, ...], "shapes": [[...], ...]}`` with each parameter a
  nested list; output the solution as a (nested) list of numbers, or an object
  ``{"x": ..., "eq": ..., "ineq": ...}`` where the optional ``eq``/``ineq`` are KKT multipliers.
* ``io="npy"``: input ``input.npz`` holding ``p0``, ``p1``, ... (read with ``allow_pickle=False``); output
  ``output.npy`` (the solution) or ``output.npz`` with ``x`` and optional ``eq``/``ineq``.
* ``io="text"``: the legacy format: one line per parameter (its values flattened in C order, or column by
  column with ``input_order="F"``, free format or in the fields of ``input_format``); the output is the
  solution's numbers as Fortran and C programs write them (``D`` exponents, ``1.0-300``, NaN/Infinity
  spellings: see `blackbox_diff.runtime._textio`), white-space separated or in the fixed-width fields of
  ``output_format``, flattened in ``output_order``.

``argv`` may contain ``{input}`` and ``{output}``, replaced by the absolute paths of files in the run's
private directory. Without ``{input}`` the input goes to the program's standard input; without
``{output}`` the solution is read from its standard output.

Safety (`blackbox_diff.runtime._supervise` and `_launcher`): an argument list, never a shell; a
fresh private directory removed on every exit path; an explicit environment; one deadline for the whole
run (start, run, reading the outputs) and one size cap for everything read from the program; output files
read only if they are regular files inside the run directory; every process the program starts killed
when the call ends (on Linux even those that leave the process group); no pickle. Every failure raises
`SolverError` with the exit code, the signal's name and the tail of standard error.
"""

from __future__ import annotations

import io as _io
import json
import math
import os
import signal
import time
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from blackbox_diff._errors import InputError, SolverError
from blackbox_diff.conditions import KKTSolution
from blackbox_diff.runtime import _supervise
from blackbox_diff.runtime._fortran_format import FortranFormat, parse_format
from blackbox_diff.runtime._textio import TextFormatError, read_numbers, write_numbers

__all__ = ["Executable"]

_IO = ("json", "npy", "text")
_INPUT = {"json": "input.json", "npy": "input.npz", "text": "input.txt"}
_OUTPUT = {"json": "output.json", "npy": "output.npy", "text": "output.txt"}
_ORDERS = ("C", "F")
_TAIL_LINES = 20


class Executable:
    """A program that solves one instance: parameters in, solution (and optional multipliers) out.

    Use it as the black box of `bbd.implicit`::

        exe = bbd.Executable(["./legacy_solver", "{input}", "{output}"], io="text", timeout=30)
        solve = bbd.implicit(bbd.Root(F))(exe)

    Args:
        argv: the command as an argument list; ``{input}``/``{output}`` are replaced by file paths. A
            relative program path containing a separator (``./prog``) is resolved against the current
            directory now, because the program runs inside its private directory.
        io: ``"json"``, ``"npy"`` or ``"text"`` (see the module docstring for the protocol).
        timeout: seconds for the whole run (start, run, reading the outputs); then the program and
            everything it started are killed. None: no limit.
        env: extra environment variables; the program sees only these plus ``PATH``, ``LANG=C`` and
            ``HOME`` (the run directory).
        output_shape: the expected solution shape (None: any shape). A flat output of the right size is
            reshaped to it (in ``output_order``).
        max_output_bytes: cap on everything read from the program: standard output and the output file
            together. A program that writes more is stopped at once.
        max_stderr_bytes: how much of standard error's tail is kept for error messages.
        workdir: parent directory of the private run directories (None: the system's temp directory).
        input_order: ``"C"`` (row-major) or ``"F"`` (column-major, as a Fortran ``read(*,*) A`` fills a
            matrix) for how ``io="text"`` flattens parameters; one letter for all, or one per parameter.
        output_order: ``"C"`` or ``"F"``: how a flat output fills ``output_shape``.
        input_format: ``io="text"`` only: a Fortran format (``"3F12.6"``, ``"(4E24.16)"``) or a field width
            in which each parameter is written, for programs that read with a format; None: free format,
            full precision.
        output_format: ``io="text"`` only: the Fortran format (or field width) the program writes its
            output with, for fixed-width fields without separators (``"3F12.6"`` reads
            ``"    1.000000-100.000000    2.500000"``); None: white-space separated numbers.

    Raises:
        InputError: on construction, for any setting that is not valid (the message says which and why).
    """

    def __init__(
        self,
        argv: Sequence[str],
        io: str = "json",
        timeout: float | None = 60.0,
        *,
        env: Mapping[str, str] | None = None,
        output_shape: Sequence[int] | None = None,
        max_output_bytes: int = 64 * 2**20,
        max_stderr_bytes: int = 64 * 2**10,
        workdir: str | os.PathLike | None = None,
        input_order: str | Sequence[str] = "C",
        output_order: str = "C",
        input_format: str | int | None = None,
        output_format: str | int | None = None,
    ) -> None:
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise InputError(
                f"Executable expects argv as a non-empty list of strings, e.g. ['./solver', '{{input}}', "
                f"'{{output}}']; got {argv!r}. A single command string is not accepted (no shell is used)."
            )
        if io not in _IO:
            raise InputError(f"Executable io must be one of {list(_IO)}; got {io!r}.")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise InputError(f"Executable timeout must be a positive number of seconds or None; got {timeout!r}.")
        for name, value in (("max_output_bytes", max_output_bytes), ("max_stderr_bytes", max_stderr_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Executable {name} must be a positive int (bytes); got {value!r}.")
        program = argv[0]
        if os.sep in program and not os.path.isabs(program):
            program = os.path.abspath(program)
        self.argv = [program, *argv[1:]]
        self.io = io
        self.timeout = timeout
        self.env = dict(env or {})
        self.output_shape = _shape(output_shape)
        self.max_output_bytes = max_output_bytes
        self.max_stderr_bytes = max_stderr_bytes
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.input_order = _orders(input_order, io)
        self.output_order = _orders(output_order, io, single=True)
        self.input_format = _text_format(input_format, "input_format", io)
        self.output_format = _text_format(output_format, "output_format", io)
        self.__name__ = os.path.basename(program)
        _supervise.install_signal_handlers()

    def __repr__(self) -> str:
        return f"Executable({self.argv!r}, io={self.io!r}, timeout={self.timeout!r})"

    def with_output_shape(self, shape: Sequence[int]) -> Executable:
        """A copy that expects solutions of `shape` (what the subprocess backend knows from `variables`)."""
        clone = object.__new__(Executable)
        clone.__dict__.update(self.__dict__, output_shape=_shape(shape))
        return clone

    # --- one run ------------------------------------------------------------------------------
    def __call__(self, *params: Any) -> np.ndarray | KKTSolution:
        """Run the program on one instance's parameters and return its solution."""
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else math.inf)
        _supervise.install_signal_handlers()
        arrays = [np.ascontiguousarray(np.asarray(p, dtype=np.float64)) for p in params]
        data = self._encode(arrays)
        with _supervise.run_directory(self.workdir) as (run_dir, dir_fd):
            in_path = os.path.join(run_dir, _INPUT[self.io])
            out_path = os.path.join(run_dir, _OUTPUT[self.io])
            uses_input = any("{input}" in a for a in self.argv)
            uses_output = any("{output}" in a for a in self.argv)
            if uses_input:
                with open(in_path, "wb") as fh:
                    fh.write(data)
            argv = [a.replace("{input}", in_path).replace("{output}", out_path) for a in self.argv]
            env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C", "HOME": run_dir, **self.env}
            result = _supervise.run(argv, cwd=run_dir, env=env, stdin=None if uses_input else data,
                                    deadline=deadline, stdout_cap=self.max_output_bytes,
                                    stderr_cap=self.max_stderr_bytes)
            tail = _tail(result.stderr)
            self._check_outcome(result, tail)
            raw = self._read_output(dir_fd, result, tail) if uses_output else result.stdout
        return self._check(self._parse_or_fail(raw, result.code, tail), result.code, tail)

    def _check_outcome(self, result: _supervise.RunResult, tail: str) -> None:
        code = result.code
        if result.outcome == "start-error":
            raise SolverError(
                f"Executable {self.argv[0]!r} could not be started: {result.detail}. Check the path and that the "
                "file is executable (chmod +x).",
                backend="subprocess",
            )
        if result.outcome == "timeout":
            self._fail(f"did not finish within timeout={self.timeout} s and was killed", -signal.SIGKILL
                       if code is None else code, tail)
        if result.outcome == "overflow":
            self._fail(f"wrote output over max_output_bytes={self.max_output_bytes} (more than that on stdout) "
                       "and was stopped", code, tail)
        if result.outcome in ("stopped", "lost"):
            why = "its supervisor was stopped by a signal" if result.outcome == "stopped" else result.detail
            self._fail(f"was stopped before it finished ({why})", code, tail)
        if code < 0:
            self._fail(f"was killed by signal {_signal_name(-code)}", code, tail)
        if code != 0:
            self._fail(f"exited with status {code}", code, tail)

    def _read_output(self, dir_fd: int, result: _supervise.RunResult, tail: str) -> bytes:
        names = [_OUTPUT[self.io]] + (["output.npz"] if self.io == "npy" else [])
        cap = self.max_output_bytes - len(result.stdout)
        for name in names:
            try:
                raw = _supervise.read_output(dir_fd, name, cap)
            except _supervise.OutputRefused as err:
                what = (f"wrote output over max_output_bytes={self.max_output_bytes} ({err}, plus "
                        f"{len(result.stdout)} bytes on stdout)") if err.overflow else str(err)
                self._fail(what, result.code, tail)
            if raw is not None:
                return raw
        self._fail(f"exited normally but wrote no output file {names[0]}", result.code, tail)
        raise AssertionError("unreachable")  # _fail always raises

    # --- protocol -------------------------------------------------------------------------------
    def _encode(self, arrays: list[np.ndarray]) -> bytes:
        if self.io == "json":
            doc = {"parameters": [a.tolist() for a in arrays], "shapes": [list(a.shape) for a in arrays]}
            return json.dumps(doc).encode()
        if self.io == "npy":
            buf = _io.BytesIO()
            np.savez(buf, **{f"p{i}": a for i, a in enumerate(arrays)})
            return buf.getvalue()
        orders = self.input_order * len(arrays) if len(self.input_order) == 1 else self.input_order
        if len(orders) != len(arrays):
            raise InputError(f"Executable input_order has {len(orders)} entries {list(orders)}, but the program "
                             f"was called with {len(arrays)} parameters; give one order per parameter or one for all.")
        lines = [write_numbers(a.reshape(-1, order=o), self.input_format, f"parameter {i}")
                 for i, (a, o) in enumerate(zip(arrays, orders, strict=True))]
        return "".join(lines).encode()

    def _parse_or_fail(self, raw: bytes, code: int | None, tail: str) -> Any:
        try:
            return self._parse(raw)
        except TextFormatError as err:
            self._fail(f"wrote malformed text output: {err}", code, tail)
        except Exception as err:  # noqa: BLE001 - any parse failure (EOF, bad zip, recursion) is malformed output
            self._fail(f"wrote malformed {self.io} output ({type(err).__name__}: {err}; starts with {raw[:60]!r})",
                       code, tail)

    def _parse(self, raw: bytes) -> Any:
        if self.io == "json":
            doc = json.loads(raw.decode("utf-8"))
            if isinstance(doc, dict):
                if "x" not in doc:
                    raise KeyError(f"the JSON object has no 'x' (keys: {sorted(doc)})")
                return _solution(doc["x"], doc.get("eq"), doc.get("ineq"))
            return _solution(doc)
        if self.io == "npy":
            return _load_npy(raw, self.max_output_bytes)
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            raise ValueError("the output is empty")
        return _solution(read_numbers(text, self.output_format))

    def _check(self, solution: Any, code: int | None, tail: str) -> Any:
        x = solution.x if isinstance(solution, KKTSolution) else solution
        if self.output_shape is not None and x.shape != self.output_shape:
            if x.size == math.prod(self.output_shape) and x.ndim <= 1:
                x = x.reshape(self.output_shape, order=self.output_order[0])  # a flat output of a matrix
            else:
                self._fail(f"wrote a solution of shape {x.shape} ({x.size} numbers), expected shape "
                           f"{self.output_shape} ({math.prod(self.output_shape)} numbers)", code, tail)
        parts = [x] + ([solution.eq, solution.ineq] if isinstance(solution, KKTSolution) else [])
        if not all(p is None or bool(np.isfinite(p).all()) for p in parts):
            self._fail(f"wrote NaN or Inf: {x.reshape(-1)[:6].tolist()}", code, tail)
        if isinstance(solution, KKTSolution):
            return KKTSolution(x=x, eq=solution.eq, ineq=solution.ineq)
        return x

    def _fail(self, what: str, code: int | None, tail: str) -> None:
        shown = tail if tail else "(empty)"
        raise SolverError(
            f"Executable {os.path.basename(self.argv[0])!r} {what} (exit code {code}). Expected exit status 0 "
            f"and a valid {self.io} output. Last lines of its stderr:\n{shown}",
            backend="subprocess",
            status=what,
            exit_code=code,
            stderr_tail=tail,
        )


# --- settings ---------------------------------------------------------------------------------------------
def _shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        out = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        out = None
    if out is None or any(n < 0 for n in out):
        raise InputError(f"Executable output_shape must be a tuple of non-negative ints such as (3,) or (2, 2); "
                         f"got {shape!r}.")
    return out


def _orders(value: str | Sequence[str], io: str, single: bool = False) -> tuple[str, ...]:
    name = "output_order" if single else "input_order"
    values = (value,) if isinstance(value, str) or single else tuple(value)
    if not values or not all(isinstance(v, str) and v in _ORDERS for v in values):
        more = "" if single else ", or a list with one of them per parameter"
        raise InputError(f"Executable {name} must be 'C' (row-major) or 'F' (column-major, Fortran){more}; got "
                         f"{value!r}.")
    if not single and io != "text" and "F" in values:
        raise InputError(f"Executable input_order='F' applies to io='text' only (JSON nests lists row by row and "
                         f".npz files carry their own order); got io={io!r}.")
    return values


def _text_format(spec: str | int | None, name: str, io: str) -> FortranFormat | None:
    if spec is None:
        return None
    if io != "text":
        raise InputError(f"Executable {name} applies to io='text' only; got io={io!r}.")
    return parse_format(spec, f"Executable {name}")


# --- output helpers -----------------------------------------------------------------------------------------
def _solution(x: Any, eq: Any = None, ineq: Any = None) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    if eq is None and ineq is None:
        return arr
    return KKTSolution(
        x=arr,
        eq=None if eq is None else np.asarray(eq, dtype=np.float64).reshape(-1),
        ineq=None if ineq is None else np.asarray(ineq, dtype=np.float64).reshape(-1),
    )


def _load_npy(raw: bytes, cap: int) -> Any:
    """An .npy or .npz output; each array is checked against its header before numpy allocates it."""
    if not raw.startswith(b"PK"):
        return _solution(_npy(raw))
    with zipfile.ZipFile(_io.BytesIO(raw)) as archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        if "x" not in members:
            raise KeyError(f"the .npz has no 'x' (arrays: {sorted(members)})")
        arrays = {}
        for key in ("x", "eq", "ineq"):
            if key in members:
                with archive.open(members[key]) as fh:
                    data = fh.read(cap + 1)  # a compressed member may expand far beyond the bytes read
                if len(data) > cap:
                    raise ValueError(f"the .npz member {key!r} expands to more than max_output_bytes={cap}")
                arrays[key] = _npy(data)
    return _solution(arrays["x"], arrays.get("eq"), arrays.get("ineq"))


def _npy(raw: bytes) -> np.ndarray:
    """One .npy file, refusing pickles and headers that claim more data than the file holds."""
    buf = _io.BytesIO(raw)
    version = np.lib.format.read_magic(buf)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(buf)
    if dtype.hasobject:
        raise ValueError("the array holds Python objects (a pickle), which are never loaded")
    declared, held = math.prod(shape) * dtype.itemsize, len(raw) - buf.tell()
    if declared != held:
        raise ValueError(f"the header declares shape {shape} of {dtype} ({declared} bytes), the file holds {held}")
    buf.seek(0)
    return np.load(buf, allow_pickle=False)


def _tail(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
