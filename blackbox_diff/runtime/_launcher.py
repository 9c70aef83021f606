"""Supervisor of one `bbd.Executable` run: a stand-alone script, run as ``python -I -S _launcher.py``.

Usage: ``_launcher.py STATUS_FD PARENT_PID RUN_DIR LC_CTYPE -- PROGRAM [ARG ...]``

The program gets this process's environment as the caller passed it. LC_CTYPE (``-`` when unset, else
``=VALUE``) is passed again on the command line because Python's start-up coerces a C locale by setting
``LC_CTYPE=C.UTF-8`` in its own environment (PEP 538), which the program must not inherit.

It starts the program, waits for it, then kills everything the program started, and writes one line to
the pipe STATUS_FD: ``exit N``, ``signal N``, ``start-error ERRNO MESSAGE`` or ``stopped [exit|signal N]``.
It imports nothing but a few built-in modules of the standard library, so that it starts fast (a few
ms beyond the interpreter's own start) and whatever the program's environment holds (PYTHONPATH, ...)
cannot change it.

Why a process of its own: on Linux it makes itself a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``),
so every process the program starts, even one that leaves the process group or the session (a daemon
started with ``setsid``, a double fork), is re-parented to it when its own parent dies and is found by
walking ``/proc``: all of them are killed when the program exits or is stopped. It also asks for
SIGUSR2 when the calling thread dies (``PR_SET_PDEATHSIG``): then it kills the program's processes and,
once the calling process is gone, removes the run directory, so that even a caller killed with SIGKILL
leaves nothing behind. Elsewhere (macOS, BSD) the program gets a process group of its own and that group
is killed.

SIGTERM, SIGINT, SIGHUP or SIGUSR1 stop the run (the caller sends SIGTERM at its deadline); SIGUSR2 says
the caller died.
"""

import _signal as signal  # the C module: `signal` imports enum, which would double the start-up time
import os
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ORPHANED = signal.SIGUSR2  # the parent-death signal
ORPHAN_WAIT = 5.0  # seconds for the dying caller to be gone (its other threads exit after the one that spawned us)
KILL_WINDOW = 5.0  # seconds to hunt down processes that keep forking while they are being killed


class Stop(Exception):
    """A stop signal arrived."""


def _stop(signum, frame):
    raise Stop(signum)


def _linux_guards():
    """Become a child subreaper and ask for SIGTERM when the caller dies; False where that is impossible."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return False
        libc.prctl(PR_SET_PDEATHSIG, ORPHANED, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return True


def _descendants(root):
    """The live (non-zombie) processes below `root`, from one scan of /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue  # it exited meanwhile
        fields = data[data.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append((int(name), fields[0]))
    found, todo = [], [root]
    while todo:
        for pid, state in children.get(todo.pop(), ()):
            todo.append(pid)
            if state != b"Z":
                found.append(pid)
    return found


class Supervisor:
    def __init__(self, subreaper):
        self.subreaper = subreaper
        self.pid = None
        self.status = None  # the program's "exit N" / "signal N" once reaped

    def reap(self, block):
        """Collect exited children; True while some remain."""
        while True:
            try:
                got, code = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return False
            if got == 0:
                return True
            if got == self.pid and self.status is None:
                self.status = (f"exit {os.WEXITSTATUS(code)}" if os.WIFEXITED(code)
                               else f"signal {os.WTERMSIG(code)}")
            if block and self.status is not None:
                return True

    def kill_all(self):
        """Kill every process the program started (and the program), and reap them."""
        if not self.subreaper:
            if self.pid is not None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            while self.reap(block=False):
                time.sleep(0.005)
            return
        give_up = time.monotonic() + KILL_WINDOW
        while True:
            alive = _descendants(os.getpid())
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            remaining = self.reap(block=False)
            if (not alive and not remaining) or time.monotonic() > give_up:
                return
            time.sleep(0.001)


def _gone(parent):
    """Whether the calling process is gone. The parent-death signal comes when the *thread* that started
    us exits; while the caller's other threads are still exiting we are re-parented to one of them, so
    wait for the re-parenting to the next subreaper or init."""
    give_up = time.monotonic() + ORPHAN_WAIT
    while os.getppid() == parent and time.monotonic() < give_up:
        time.sleep(0.01)
    return os.getppid() != parent


def main(argv):
    status_fd, parent, run_dir, lc_ctype, program = int(argv[1]), int(argv[2]), argv[3], argv[4], argv[6:]
    os.set_inheritable(status_fd, False)
    env = dict(os.environ)
    env.pop("LC_CTYPE", None)
    if lc_ctype.startswith("="):
        env["LC_CTYPE"] = lc_ctype[1:]
    sup = Supervisor(_linux_guards())
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    status, orphaned = "stopped", False
    try:
        if os.getppid() != parent:
            raise Stop(ORPHANED)  # the caller died before PR_SET_PDEATHSIG was armed
        # SIGPIPE and SIGXFSZ are ignored by Python; the program gets the default dispositions back.
        group = {} if sup.subreaper else {"setpgroup": 0}
        sup.pid = os.posix_spawnp(program[0], program, env, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                                  **group)
        sup.reap(block=True)
        status = sup.status or "stopped"
    except Stop as stop:
        orphaned = stop.args[0] == ORPHANED
    except OSError as err:  # the program could not be started
        status = f"start-error {err.errno} {err.strerror}"
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        sup.kill_all()
        if status == "stopped" and sup.status is not None:
            status = f"stopped {sup.status}"
        if orphaned and _gone(parent):  # nobody else will remove the run directory
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    try:
        os.write(status_fd, status.encode())
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
