"""Hostile programs: `bbd.Executable` contains what they do, and leaves no process and no run directory.

One test per row of the table in issue 14, each with its program written here (small Python scripts run
as separate processes; no mocks). Every test ends with `Leftovers.assert_clean()`: no process carrying
the test's environment marker is alive (the supervisor, the program, its children and daemons) and the
run directory's parent is empty. Limits are generous (a shared machine): a test proves the right error
by its message (e.g. "over max_output_bytes", not "did not finish within timeout").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from leftovers import Leftovers

import blackbox_diff as bbd

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guarantees tested are Linux's")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def guard(tmp_path) -> Leftovers:
    g = Leftovers(tmp_path)
    yield g
    g.assert_clean()


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def executable(guard: Leftovers, argv: list[str], **kwargs) -> bbd.Executable:
    env = {**guard.env, **kwargs.pop("env", {})}
    return bbd.Executable(argv, io=kwargs.pop("io", "text"), env=env, workdir=guard.workdir, **kwargs)


# --- outputs that are not regular files --------------------------------------------------------------------
NOT_REGULAR = {
    "fifo": ("import os, sys; os.mkfifo(sys.argv[1])", "is a named pipe (FIFO), not a regular file"),
    "symlink-dev-zero": ("import os, sys; os.symlink('/dev/zero', sys.argv[1])",
                         "is a symbolic link (to /dev/zero), not a regular file inside the run directory"),
    "symlink-outside": ("import os, sys; os.symlink(os.environ['OUTSIDE'], sys.argv[1])",
                        "is a symbolic link (to {outside}), not a regular file inside the run directory"),
    "directory": ("import os, sys; os.mkdir(sys.argv[1])", "is a directory, not a regular file"),
    "socket": ("import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])",
               "could not be opened (No such device or address)"),
}


@pytest.mark.parametrize("case", list(NOT_REGULAR))
def test_an_output_that_is_not_a_regular_file_is_refused_not_read(tmp_path, guard, case):
    code, message = NOT_REGULAR[case]
    outside = tmp_path / "outside.txt"
    outside.write_text("2.0\n")  # a valid answer: reading through the link would "work"
    exe = executable(guard, [sys.executable, "-c", code, "{output}"], timeout=30, env={"OUTSIDE": str(outside)})
    expected = f"its output file output.txt {message.format(outside=outside)}"
    with pytest.raises(bbd.SolverError, match=re.escape(expected)) as info:
        exe(np.array(4.0))
    assert info.value.exit_code == 0


# --- too much output ------------------------------------------------------------------------------------
def test_200_mb_on_stdout_is_stopped_at_the_cap(tmp_path, guard):
    big = script(tmp_path, "big", """
        import sys
        chunk = b"1.0 " * (1 << 18)  # 1 MiB
        for _ in range(200):
            sys.stdout.buffer.write(chunk)
    """)
    exe = executable(guard, [sys.executable, big], timeout=120)  # default cap: 64 MiB
    with pytest.raises(bbd.SolverError, match=re.escape(
            "wrote output over max_output_bytes=67108864 (more than that on stdout) and was stopped")):
        exe(np.array(1.0))


def test_stdout_and_output_file_share_one_cap(guard):
    code = "import sys; print('#' * 59); open(sys.argv[1], 'w').write('2.0 ' * 15)"  # 60 + 60 bytes
    exe = executable(guard, [sys.executable, "-c", code, "{output}"], max_output_bytes=100)
    with pytest.raises(bbd.SolverError, match=re.escape(
            "wrote output over max_output_bytes=100 (60 bytes in its output file output.txt, plus 60 bytes on "
            "stdout)")):
        exe(np.array(1.0))
    assert executable(guard, [sys.executable, "-c", code, "{output}"], max_output_bytes=120)(np.array(1.0)).size == 15


def test_a_flood_on_stderr_keeps_only_its_tail(guard):
    code = ("import sys\nfor i in range(400_000): sys.stderr.write(f'log line {i:07d} ' + 'x' * 100 + '\\n')\n"
            "print(2.0)")  # ~45 MB of log
    exe = executable(guard, [sys.executable, "-c", code], timeout=120, max_stderr_bytes=4096)
    assert exe(np.array(1.0)).tolist() == [2.0]
    failing = executable(guard, [sys.executable, "-c", code.replace("print(2.0)", "sys.exit(4)")], timeout=120,
                         max_stderr_bytes=4096)
    with pytest.raises(bbd.SolverError, match=re.escape("exited with status 4")) as info:
        failing(np.array(1.0))
    tail = info.value.stderr_tail.splitlines()
    assert tail[-1].startswith("log line 0399999 ") and len(tail) == 20  # the last 20 lines, nothing older


# --- processes that escape -------------------------------------------------------------------------------
DAEMON = """
    import os, sys, time
    pid = os.fork()
    if pid == 0:
        os.setsid()                     # a session of its own: out of the program's process group
        if os.fork() == 0:              # double fork: re-parented when its parent exits
            if os.environ.get("CLOSE_STDIO"):
                fd = os.open(os.devnull, os.O_RDWR)
                for k in (0, 1, 2):
                    os.dup2(fd, k)
            with open(os.environ["PID_FILE"], "w") as fh:
                fh.write(str(os.getpid()))
            time.sleep(120)
        os._exit(0)
    os.waitpid(pid, 0)
    while not os.path.exists(os.environ["PID_FILE"]):
        time.sleep(0.01)
    if os.environ.get("HANG"):
        time.sleep(120)
    print("2.0")
"""


@pytest.mark.parametrize("variant", ["closed-stdio", "holding-stdout", "program-hangs"])
def test_a_daemon_started_with_setsid_is_killed(tmp_path, guard, variant):
    pid_file = tmp_path / "daemon.pid"
    env = {"PID_FILE": str(pid_file), "CLOSE_STDIO": "1" if variant == "closed-stdio" else "",
           "HANG": "1" if variant == "program-hangs" else ""}
    exe = executable(guard, [sys.executable, script(tmp_path, "daemon", DAEMON)], timeout=20 if variant !=
                     "program-hangs" else 2, env=env)
    if variant == "program-hangs":
        with pytest.raises(bbd.SolverError, match=re.escape("did not finish within timeout=2 s and was killed")):
            exe(np.array(4.0))
    else:
        assert exe(np.array(4.0)).tolist() == [2.0]
    daemon = int(pid_file.read_text())
    assert not Path(f"/proc/{daemon}").exists() or Path(f"/proc/{daemon}/stat").read_text().split()[2] == "Z"
    guard.assert_clean()  # right at return, not eventually


def test_a_daemon_that_keeps_forking_itself_is_killed(tmp_path, guard):
    hydra = script(tmp_path, "hydra", """
        import os, time
        if os.fork() == 0:
            os.setsid()
            while True:                 # each generation forks the next and exits: always a new pid
                if os.fork() != 0:
                    os._exit(0)
                time.sleep(0.002)
        time.sleep(0.2)
        print("2.0")
    """)
    assert executable(guard, [sys.executable, hydra], timeout=20)(np.array(4.0)).tolist() == [2.0]


# --- a wrong number of values, known from `variables` -------------------------------------------------------
SHORT = """
    import sys
    p = [float(v) for v in sys.stdin.read().split()]
    x = [2 * v for v in p]
    print(" ".join(repr(v) for v in (x[:2] if p[0] < 0 else x)))  # 2 numbers for 3 unknowns when p0 < 0
"""


def test_two_numbers_for_three_unknowns_is_the_programs_failure(tmp_path, guard):
    exe = executable(guard, [sys.executable, script(tmp_path, "short", SHORT)], timeout=20)  # no output_shape
    layer = bbd.layer(exe, condition=bbd.Root(lambda x, p: x - 2 * p), parameters=[(3,)], variables=[(3,)])
    with pytest.raises(bbd.SolverError, match=re.escape(
            "wrote a solution of shape (2,) (2 numbers), expected shape (3,) (3 numbers)")) as info:
        layer(torch.tensor([-1.0, 2.0, 3.0]))
    assert f"Executable {os.path.basename(sys.executable)!r} wrote" in str(info.value)  # names the program
    isolated = bbd.layer(exe, condition=bbd.Root(lambda x, p: x - 2 * p), parameters=[(3,)], variables=[(3,)],
                         on_failure="nan")
    P = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (X,) = isolated(P)
    assert any("expected shape (3,)" in str(w.message) for w in caught)
    assert torch.isnan(X[1]).all() and torch.equal(X[[0, 2]], 2 * P[[0, 2]].detach())
    X[[0, 2]].sum().backward()
    assert P.grad.tolist() == [[2.0] * 3, [0.0] * 3, [2.0] * 3]


def test_variables_and_output_shape_must_agree(guard):
    exe = executable(guard, ["prog"], output_shape=(2,))
    with pytest.raises(bbd.InputError, match=re.escape(
            "variables declares the solution shape (3,), but the Executable has output_shape=(2,); give one of "
            "them, or make them agree.")):
        bbd.layer(exe, condition=bbd.Root(lambda x, p: x - p), parameters=[(3,)], variables=[(3,)])


# --- the calling process is signalled ----------------------------------------------------------------------
CALLER = """
    import sys
    import numpy as np
    import torch
    import blackbox_diff as bbd

    sleeper, workdir, mark, pid_dir, mode = sys.argv[1:6]
    exe = bbd.Executable([sys.executable, sleeper], io="text", timeout=120, workdir=workdir,
                         env={"BBD_TEST_LEFTOVER_MARK": mark, "PID_DIR": pid_dir})
    if mode == "threads":
        solve = bbd.implicit(bbd.Root(lambda x, w: x - w), in_dims=0, executor="threads", max_workers=2)(exe)
        solve(torch.tensor([1.0, 2.0]))
    else:
        exe(np.array(1.0))
"""
SLEEPER = """
    import os, time
    open(os.path.join(os.environ["PID_DIR"], str(os.getpid())), "w").close()
    time.sleep(120)
"""


@pytest.mark.parametrize(
    ("sig", "mode"),
    [(signal.SIGTERM, "main"), (signal.SIGINT, "main"), (signal.SIGTERM, "threads"), (signal.SIGINT, "threads"),
     (signal.SIGKILL, "main")],
    ids=["SIGTERM", "SIGINT", "SIGTERM-threads", "SIGINT-threads", "SIGKILL"],
)
def test_signals_to_the_calling_process_leave_nothing_behind(tmp_path, guard, sig, mode):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    caller = script(tmp_path, "caller", CALLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.Popen([sys.executable, caller, script(tmp_path, "sleeper", SLEEPER), str(guard.workdir),
                             guard.token, str(pid_dir), mode], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    expected = 2 if mode == "threads" else 1
    give_up = time.monotonic() + 90
    while len(os.listdir(pid_dir)) < expected and proc.poll() is None and time.monotonic() < give_up:
        time.sleep(0.05)
    assert len(os.listdir(pid_dir)) == expected, proc.communicate(timeout=30)
    assert len(os.listdir(guard.workdir)) == expected  # the runs are live
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -sig, err.decode()
    # SIGTERM/SIGINT: cleaned by the caller before it died; SIGKILL: by the supervisor (PR_SET_PDEATHSIG).
    guard.assert_clean(wait=10.0 if sig == signal.SIGKILL else 0.0)


def test_a_run_directory_moved_away_by_the_program_is_still_removed(tmp_path, guard):
    mover = "import os; here = os.getcwd(); os.rename(here, here + '-moved'); os.symlink('/', here); print(2.0)"
    assert executable(guard, [sys.executable, "-c", mover])(np.array(1.0)).tolist() == [2.0]
