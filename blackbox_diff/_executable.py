"""`bbd.Executable`: a compiled program as a black box, run safely once per instance.

I/O protocol (see docs/backends/executable.md). The program receives one instance's parameters and writes
its solution:

* ``io="json"``: input ``{"parameters": [p0, p1, ...], "shapes": [[...], ...]}`` with each parameter a
  nested list (C order); output either the solution as a (nested) list of numbers, or an object
  ``{"x": ..., "eq": ..., "ineq": ...}`` where the optional ``eq``/``ineq`` are KKT multipliers.
* ``io="npy"``: input ``input.npz`` holding ``p0``, ``p1``, ... (numpy's format, read with
  ``allow_pickle=False``); output ``output.npy`` (the solution) or ``output.npz`` with ``x`` and optional
  ``eq``/``ineq``.
* ``io="text"``: the legacy-friendly format: the input has one line per parameter, its values flattened
  in C order and separated by spaces (read it with ``scanf("%lf")`` / Fortran list-directed ``read``);
  the output is the solution's numbers separated by white space.

``argv`` may contain the placeholders ``{input}`` and ``{output}``, replaced by the absolute paths of the
files in the run's private directory. Without ``{input}`` the input is written to the program's standard
input; without ``{output}`` the solution is read from its standard output.

Safety: an argument list (never a shell), a fresh private directory (mode 0700, removed afterwards
whatever happens) as working directory, an explicit environment (``PATH`` and ``LANG=C`` plus what you
pass in ``env``), a timeout that kills the whole process group, standard output and error captured with a
size cap, no pickle; children the program leaves behind are killed when it exits. Every failure (exit
status, signal, timeout, missing or malformed output, wrong shape, NaN) raises `SolverError` with the exit
code, the signal's name and the tail of standard error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from blackbox_diff._conditions import KKTSolution
from blackbox_diff._errors import InputError, SolverError

__all__ = ["Executable"]

_IO = ("json", "npy", "text")
_INPUT = {"json": "input.json", "npy": "input.npz", "text": "input.txt"}
_OUTPUT = {"json": "output.json", "npy": "output.npy", "text": "output.txt"}
_TAIL_LINES = 20


class _Capped:
    """Drains a pipe in a thread, keeping the first `cap` bytes (and whether more came)."""

    def __init__(self, stream: Any, cap: int, keep_tail: bool) -> None:
        self.cap, self.keep_tail = cap, keep_tail
        self.data = bytearray()
        self.overflow = False
        self.thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self.thread.start()

    def _drain(self, stream: Any) -> None:
        with stream:
            while chunk := stream.read(65536):
                self.data += chunk
                if len(self.data) > self.cap:
                    self.overflow = True
                    # stderr keeps its tail (the useful end), stdout its head (the answer comes first)
                    self.data = self.data[-self.cap :] if self.keep_tail else self.data[: self.cap]

    def result(self) -> bytes:
        self.thread.join(timeout=5.0)
        return bytes(self.data)


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
        timeout: seconds before the program (and its process group) is killed.
        env: extra environment variables; the program sees only these plus ``PATH`` and ``LANG=C``.
        output_shape: the expected solution shape (None: any shape).
        max_output_bytes: cap on captured standard output and on the output file's size.
        max_stderr_bytes: how much of standard error's tail is kept for error messages.
        workdir: parent directory of the private run directories (None: the system's temp directory).

    Raises:
        InputError: on construction, for an empty argv, an unknown io format or a bad timeout.
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
    ) -> None:
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise InputError(
                f"Executable expects argv as a non-empty list of strings, e.g. ['./solver', '{{input}}', "
                f"'{{output}}']; got {argv!r}. A single command string is not accepted (no shell is used)."
            )
        if io not in _IO:
            raise InputError(f"Executable io must be one of {list(_IO)}; got {io!r}.")
        if timeout is not None and not timeout > 0:
            raise InputError(f"Executable timeout must be a positive number of seconds or None; got {timeout!r}.")
        program = argv[0]
        if os.sep in program and not os.path.isabs(program):
            program = os.path.abspath(program)
        self.argv = [program, *argv[1:]]
        self.io = io
        self.timeout = timeout
        self.env = dict(env or {})
        self.output_shape = None if output_shape is None else tuple(int(n) for n in output_shape)
        self.max_output_bytes = int(max_output_bytes)
        self.max_stderr_bytes = int(max_stderr_bytes)
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.__name__ = os.path.basename(program)

    def __repr__(self) -> str:
        return f"Executable({self.argv!r}, io={self.io!r}, timeout={self.timeout!r})"

    # --- one run ------------------------------------------------------------------------------
    def __call__(self, *params: Any) -> np.ndarray | KKTSolution:
        """Run the program on one instance's parameters and return its solution."""
        arrays = [np.ascontiguousarray(np.asarray(p, dtype=np.float64)) for p in params]
        run_dir = tempfile.mkdtemp(prefix="bbd-run-", dir=self.workdir)  # mode 0700
        try:
            os.chmod(run_dir, 0o700)
            return self._run(run_dir, arrays)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _run(self, run_dir: str, arrays: list[np.ndarray]) -> np.ndarray | KKTSolution:
        in_path = os.path.join(run_dir, _INPUT[self.io])
        out_path = os.path.join(run_dir, _OUTPUT[self.io])
        self._write_input(in_path, arrays)
        uses_input = any("{input}" in a for a in self.argv)
        uses_output = any("{output}" in a for a in self.argv)
        argv = [a.replace("{input}", in_path).replace("{output}", out_path) for a in self.argv]
        stdin_bytes = None if uses_input else _read_bytes(in_path)
        code, stdout, stderr, timed_out, overflow = self._spawn(argv, run_dir, stdin_bytes)
        tail = _tail(stderr)
        if timed_out:
            self._fail(f"did not finish within timeout={self.timeout} s and was killed", code, tail)
        if code < 0:
            name = _signal_name(-code)
            self._fail(f"was killed by signal {name}", code, tail)
        if code != 0:
            self._fail(f"exited with status {code}", code, tail)
        if overflow:
            self._fail(f"wrote more than max_output_bytes={self.max_output_bytes} bytes to stdout", code, tail)
        if uses_output:
            if self.io == "npy" and not os.path.exists(out_path):
                out_path = os.path.splitext(out_path)[0] + ".npz"
            if not os.path.exists(out_path):
                self._fail(f"exited normally but wrote no output file {os.path.basename(out_path)}", code, tail)
            if os.path.getsize(out_path) > self.max_output_bytes:
                self._fail(f"wrote an output file larger than max_output_bytes={self.max_output_bytes}", code, tail)
            raw = _read_bytes(out_path)
        else:
            raw = stdout
        try:
            solution = self._parse(raw, out_path)
        except Exception as err:  # noqa: BLE001 - any parse failure (EOF, bad zip, recursion) is malformed output
            self._fail(f"wrote malformed {self.io} output ({type(err).__name__}: {err}; starts with "
                       f"{raw[:60]!r})", code, tail)
        return self._check(solution, code, tail)

    def _spawn(self, argv: list[str], run_dir: str, stdin_bytes: bytes | None):
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C", "HOME": run_dir, **self.env}
        try:
            proc = subprocess.Popen(
                argv,
                cwd=run_dir,
                env=env,
                stdin=subprocess.PIPE if stdin_bytes is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, so a timeout kills its children too
                shell=False,
            )
        except OSError as err:
            raise SolverError(
                f"Executable {self.argv[0]!r} could not be started: {err}. Check the path and that the file "
                "is executable (chmod +x).",
                backend="subprocess",
            ) from err
        out = _Capped(proc.stdout, self.max_output_bytes, keep_tail=False)
        err = _Capped(proc.stderr, self.max_stderr_bytes, keep_tail=True)
        if stdin_bytes is not None:
            # A thread, so that a program that never reads its input cannot block us past the timeout.
            threading.Thread(target=_feed, args=(proc.stdin, stdin_bytes), daemon=True).start()
        timed_out = False
        try:
            proc.wait(timeout=self.timeout)
            # Children the program left behind (forked helpers, daemons) would outlive the run and hold
            # its output pipes open: they die with it.
            _kill_group(proc)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        except BaseException:  # interrupted (KeyboardInterrupt, ...): never leave the program running
            _kill_group(proc)
            proc.wait()
            raise
        return proc.returncode, out.result(), err.result(), timed_out, out.overflow

    # --- protocol -------------------------------------------------------------------------------
    def _write_input(self, path: str, arrays: list[np.ndarray]) -> None:
        if self.io == "json":
            doc = {"parameters": [a.tolist() for a in arrays], "shapes": [list(a.shape) for a in arrays]}
            with open(path, "w") as fh:
                json.dump(doc, fh)
        elif self.io == "npy":
            with open(path, "wb") as fh:
                np.savez(fh, **{f"p{i}": a for i, a in enumerate(arrays)})
        else:
            with open(path, "w") as fh:
                for a in arrays:
                    fh.write(" ".join(repr(float(v)) for v in a.reshape(-1)) + "\n")

    def _parse(self, raw: bytes, path: str) -> Any:
        if self.io == "json":
            doc = json.loads(raw.decode("utf-8"))
            if isinstance(doc, dict):
                if "x" not in doc:
                    raise KeyError(f"the JSON object has no 'x' (keys: {sorted(doc)})")
                return _solution(doc["x"], doc.get("eq"), doc.get("ineq"))
            return _solution(doc)
        if self.io == "npy":
            import io as _io

            loaded = np.load(_io.BytesIO(raw), allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    if "x" not in loaded.files:
                        raise KeyError(f"the .npz has no 'x' (arrays: {loaded.files})")
                    return _solution(
                        loaded["x"], *(loaded[k] if k in loaded.files else None for k in ("eq", "ineq"))
                    )
            return _solution(loaded)
        text = raw.decode("utf-8").split()
        if not text:
            raise ValueError("the output is empty")
        return _solution([float(v) for v in text])

    def _check(self, solution: Any, code: int, tail: str) -> Any:
        x = solution.x if isinstance(solution, KKTSolution) else solution
        if self.output_shape is not None and x.shape != self.output_shape:
            if x.size == int(np.prod(self.output_shape)) and x.ndim <= 1:
                x = x.reshape(self.output_shape)  # flat text/JSON output of a matrix-valued solution
            else:
                self._fail(f"wrote a solution of shape {x.shape} ({x.size} numbers), expected shape "
                           f"{self.output_shape}", code, tail)
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
            f"and a valid "
            f"{self.io} output. Last lines of its stderr:\n{shown}",
            backend="subprocess",
            status=what,
            exit_code=code,
            stderr_tail=tail,
        )


def _solution(x: Any, eq: Any = None, ineq: Any = None) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    if eq is None and ineq is None:
        return arr
    return KKTSolution(
        x=arr,
        eq=None if eq is None else np.asarray(eq, dtype=np.float64).reshape(-1),
        ineq=None if ineq is None else np.asarray(ineq, dtype=np.float64).reshape(-1),
    )


def _feed(stream: Any, data: bytes) -> None:
    try:
        stream.write(data)
    except (BrokenPipeError, OSError):
        pass  # the program did not read its input; its exit status tells the rest
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _tail(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", errors="replace").rstrip().splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
