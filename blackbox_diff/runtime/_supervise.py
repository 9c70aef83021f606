"""Process supervision for `bbd.Executable`: one run under one deadline and one size cap, nothing left behind.

`run_directory()` makes the private run directory and removes it on every exit path. `run()` starts
the program under the supervisor `_launcher.py` (see its docstring: a Linux child subreaper that kills
everything the program started), feeds its standard input and drains its standard output and error in one
`selectors` loop (no threads, linear time: standard output is kept up to its cap and the program is
stopped as soon as it writes more; standard error keeps its tail), and stops the run at the deadline.
`read_output()` reads an output file only if it is a regular file inside the run directory, after
checking its size.

The calling process's SIGTERM and SIGINT stop every live run and remove every live run directory before
the previous handler runs (`install_signal_handlers`, done by `bbd.Executable` from the main thread);
a caller killed outright (SIGKILL) is covered by the supervisor, which gets SIGTERM when its parent dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["OutputRefused", "RunResult", "install_signal_handlers", "read_output", "run", "run_directory"]

LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
_CHUNK = 1 << 16
_GRACE = 5.0  # seconds the supervisor gets to kill the program's processes before it is killed itself
_LOCK = threading.RLock()  # reentrant: a signal handler may run while the main thread holds it
_LIVE: set[subprocess.Popen] = set()
_DIRS: set[str] = set()
_PREVIOUS: dict[int, object] = {}


def _forget_after_fork() -> None:
    """A forked child (a process-pool worker) does not own its parent's runs: a SIGTERM it gets must not
    stop them."""
    global _LOCK
    _LOCK = threading.RLock()
    _LIVE.clear()
    _DIRS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


@dataclasses.dataclass
class RunResult:
    """What one run came to.

    Attributes:
        outcome: ``"exit"`` (the program ended by itself: see `code`), ``"timeout"``, ``"overflow"`` (more
            standard output than the cap; the program was stopped), ``"start-error"`` (it could not be
            started: see `detail`), ``"stopped"`` (its supervisor was signalled by someone else) or
            ``"lost"`` (the supervisor died without a word).
        code: the exit status, or minus the signal that ended the program (None when unknown).
        stdout: standard output (at most the cap).
        stderr: the tail of standard error.
        detail: the start error's message.
    """

    outcome: str
    code: int | None
    stdout: bytes
    stderr: bytes
    detail: str = ""


class OutputRefused(Exception):
    """An output file that is not read: not a regular file, or over the size cap (``overflow``)."""

    def __init__(self, message: str, overflow: bool = False) -> None:
        super().__init__(message)
        self.overflow = overflow


# --- the run directory ------------------------------------------------------------------------------------
@contextlib.contextmanager
def run_directory(parent: str | None) -> Iterator[tuple[str, int]]:
    """A fresh private directory (mode 0700) and a descriptor of it; removed on every exit path."""
    path = tempfile.mkdtemp(prefix="bbd-run-", dir=parent)
    with _LOCK:
        _DIRS.add(path)
    fd = -1
    try:
        os.chmod(path, 0o700)
        # Outputs are opened relative to this descriptor: a program that swaps the directory for a link
        # cannot redirect what is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        yield path, fd
    finally:
        _remove(path, fd)
        with _LOCK:
            _DIRS.discard(path)


def _remove(path: str, fd: int) -> None:
    """Remove the run directory, also when the program moved it away or put a link in its place."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            now = os.readlink(f"/proc/self/fd/{fd}")  # Linux: where the directory is now
            if now != path and os.path.samestat(os.lstat(now), os.fstat(fd)):
                shutil.rmtree(now, ignore_errors=True)
        os.close(fd)
    if os.path.islink(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_output(dir_fd: int, name: str, cap: int) -> bytes | None:
    """The bytes of the output file `name` in the run directory (None when there is none).

    Raises:
        OutputRefused: it is a symbolic link, a named pipe, a device, a directory..., or over `cap` bytes.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                target = "?"
            raise OutputRefused(f"its output file {name} is a symbolic link (to {target}), not a regular file "
                                "inside the run directory") from None
        raise OutputRefused(f"its output file {name} could not be opened ({err.strerror}); expected a regular "
                            "file inside the run directory") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutputRefused(f"its output file {name} is {_kind(info.st_mode)}, not a regular file inside the run "
                                "directory")
        if info.st_size > cap:
            raise OutputRefused(f"{info.st_size} bytes in its output file {name}", overflow=True)
        data = bytearray()
        while len(data) <= cap and (chunk := os.read(fd, min(_CHUNK << 4, cap + 1 - len(data)))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > cap:
        raise OutputRefused(f"more than {cap} bytes in its output file {name}", overflow=True)
    return bytes(data)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# --- one run ----------------------------------------------------------------------------------------------
class _Sink:
    """Collects a stream: the head up to `cap` (stdout: the answer comes first) or the tail (stderr)."""

    def __init__(self, cap: int, tail: bool) -> None:
        self.cap, self.tail = cap, tail
        self.data = bytearray()
        self.overflow = False

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.cap:
            if self.tail:
                if len(self.data) > 2 * self.cap:  # trimmed once per cap bytes: linear overall
                    del self.data[: len(self.data) - self.cap]
            else:
                self.overflow = True
                del self.data[self.cap :]


def run(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdin: bytes | None,
    deadline: float,
    stdout_cap: int,
    stderr_cap: int,
) -> RunResult:
    """Run `argv` in `cwd` under the supervisor until it ends, `deadline` (time.monotonic) passes, or
    standard output exceeds `stdout_cap`; the program and everything it started are dead on return."""
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", LAUNCHER, str(status_w), str(os.getpid()), cwd,
             "=" + env["LC_CTYPE"] if "LC_CTYPE" in env else "-", "--", *argv],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(status_w,),
            start_new_session=True,  # its own process group, for the last-resort kill
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    with _LOCK:
        _LIVE.add(proc)
    out, err, status = _Sink(stdout_cap, tail=False), _Sink(stderr_cap, tail=True), _Sink(4096, tail=False)
    outcome = None
    try:
        outcome = _pump(proc, status_r, stdin, deadline, out, err, status)
        if outcome is None:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                outcome = "timeout"
    finally:
        if proc.returncode is None:
            _stop(proc)
            # The supervisor's last word (the program's status) is still useful after a stop.
            with contextlib.suppress(OSError):
                status.add(os.read(status_r, 4096))
        os.close(status_r)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with _LOCK:
            _LIVE.discard(proc)
    return _result(outcome, status.data.decode("utf-8", "replace").split(), bytes(out.data), bytes(err.data),
                   proc.returncode)


def _pump(proc: subprocess.Popen, status_r: int, stdin: bytes | None, deadline: float, out: _Sink, err: _Sink,
          status: _Sink) -> str | None:
    """The selectors loop: returns "timeout" or "overflow", or None once every stream is closed."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        sel.register(status_r, selectors.EVENT_READ, status)
        reading, offset = 3, 0
        if stdin is not None:
            if stdin:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin, selectors.EVENT_WRITE, None)
            else:
                proc.stdin.close()
        while reading:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            for key, _ in sel.select(min(remaining, 3600.0)):
                if key.data is None:  # standard input is ready for more
                    try:
                        offset += os.write(key.fd, stdin[offset : offset + _CHUNK])
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed its end (it does not read its input)
                        offset = len(stdin)
                    if offset >= len(stdin):
                        sel.unregister(key.fileobj)
                        with contextlib.suppress(OSError):
                            proc.stdin.close()
                    continue
                chunk = os.read(key.fd, _CHUNK)
                if not chunk:
                    sel.unregister(key.fileobj)
                    reading -= 1
                    continue
                key.data.add(chunk)
                if out.overflow:
                    return "overflow"
    return None


def _stop(proc: subprocess.Popen) -> None:
    """Ask the supervisor to kill everything and exit; kill its process group if it does not."""
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _result(outcome: str | None, words: list[str], stdout: bytes, stderr: bytes, launcher_code: int | None):
    def code(kind: str, number: str) -> int:
        return int(number) if kind == "exit" else -int(number)

    if words and words[0] == "stopped":
        program = code(*words[1:3]) if len(words) >= 3 else None
        return RunResult(outcome or "stopped", program, stdout, stderr)
    if outcome is not None:
        return RunResult(outcome, None, stdout, stderr)
    if len(words) >= 2 and words[0] in ("exit", "signal"):
        return RunResult("exit", code(words[0], words[1]), stdout, stderr)
    if words and words[0] == "start-error":
        return RunResult("start-error", None, stdout, stderr, " ".join(words[2:]))
    return RunResult("lost", launcher_code, stdout, stderr, f"the supervisor exited with status {launcher_code}")


# --- the calling process's SIGTERM / SIGINT ---------------------------------------------------------------
def install_signal_handlers() -> None:
    """Make SIGTERM and SIGINT stop every live run and remove its directory before the previous handler.

    Done once per process, and only from the main thread (the only one that may install signal handlers;
    elsewhere this does nothing). The previous handler still runs (KeyboardInterrupt, the user's own
    handler, or the default action: termination).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Once per process: a handler installed later over ours (that may call ours) is left alone.
        current = signal.getsignal(sig)
        if sig in _PREVIOUS or current is None:  # None: a handler installed outside Python; keep it
            continue
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, _on_signal)
            _PREVIOUS[sig] = current


def _on_signal(signum: int, frame: object) -> None:
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    if previous in (signal.SIG_DFL, signal.default_int_handler):  # the process ends or unwinds: stop all runs
        stop_all()
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def stop_all() -> None:
    """Stop every live run of this process and remove every live run directory."""
    with _LOCK:
        procs, dirs = list(_LIVE), list(_DIRS)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(Exception):
            _stop(proc)
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)
