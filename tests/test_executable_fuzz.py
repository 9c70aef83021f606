"""Fuzz the executable protocol: whatever a program writes or does, the call ends in a `SolverError`
naming the problem, or in a correct answer; never a traceback from inside numpy/json/zipfile, never a hang,
never an orphaned process.

The programs are real: small Python scripts run by the interpreter as separate processes, each told what
to misbehave with through its environment (the only channel `bbd.Executable` passes besides the files).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import zipfile

import numpy as np
import pytest
import torch
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from leftovers import Leftovers

import blackbox_diff as bbd

# Writes the bytes in $OUT_HEX (or those a bytes expression in $OUT_PY makes: large outputs would not fit
# in the environment) to the output file (argv[2]) or, when argv[2] is "-", to stdout.
WRITER = """
import os, sys
data = eval(os.environ["OUT_PY"]) if "OUT_PY" in os.environ else bytes.fromhex(os.environ["OUT_HEX"])
if sys.argv[2] == "-":
    sys.stdout.buffer.write(data)
else:
    with open(sys.argv[2], "wb") as f:
        f.write(data)
"""

# Forks a child that outlives its parent (holding stdout open and recording its pid), then answers.
FORKER = """
import os, sys, time
pid = os.fork()
if pid == 0:
    with open(os.environ["PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    os._exit(0)
while not os.path.exists(os.environ["PID_FILE"]):
    time.sleep(0.01)
with open(sys.argv[2], "w") as f:
    f.write("[2.0]")
"""

# Ignores SIGTERM, starts a child that ignores it too, and never answers.
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.environ["PID_FILE"], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""

SQRT = bbd.Root(lambda x, w: x**2 - w)


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("programs")
    out = {}
    for name, text in {"writer": WRITER, "forker": FORKER, "stubborn": STUBBORN}.items():
        path = folder / f"{name}.py"
        path.write_text(text)
        out[name] = str(path)
    return out


def _writer(scripts, data: bytes | str, io_format: str, to_stdout: bool = False, **kwargs) -> bbd.Executable:
    """`data`: the bytes to write, or a Python expression making them (for large outputs)."""
    target = "-" if to_stdout else "{output}"
    env = {"OUT_PY": data} if isinstance(data, str) else {"OUT_HEX": data.hex()}
    return bbd.Executable([sys.executable, scripts["writer"], "{input}", target], io=io_format, timeout=20,
                          env=env, **kwargs)


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=True)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- malformed output files, one named case each ------------------------------------------------------------
BAD_OUTPUTS = [
    ("json", b"[1.0, 2.", "malformed json output"),  # truncated
    ("json", b"\xff\xfe\x00binary\x00", "malformed json output"),  # not UTF-8
    ("json", b'{"y": [2.0]}', "the JSON object has no 'x'"),  # wrong schema
    ("json", b'{"x": "two"}', "malformed json output"),
    ("json", b'{"x": [[1.0], [2.0, 3.0]]}', "malformed json output"),  # ragged
    ("json", 'b"[" * 100_000 + b"]" * 100_000', "malformed json output"),  # nesting beyond the recursion limit
    ("json", b"", "malformed json output"),
    ("json", b"[NaN]", "wrote NaN or Inf"),
    ("npy", _npy([2.0])[:-4], "malformed npy output"),  # truncated data
    ("npy", _npy([2.0])[:20], "malformed npy output"),  # truncated header
    ("npy", _npz(x=np.array([2.0]))[:-30], "malformed npy output"),  # truncated zip
    ("npy", _npz(y=np.array([2.0])), "the .npz has no 'x'"),
    ("npy", _npy(np.array([{"x": 2.0}], dtype=object)), "malformed npy output"),  # pickled objects refused
    ("npy", b"\x93NUMPY garbage", "malformed npy output"),
    ("text", b"2.0 x", "malformed text output"),
    ("text", b"\x00\x01\x02", "malformed text output"),
    ("text", b"   \n", "the output is empty"),
    ("text", b"2.0 3.0", "expected shape (1,)"),
]


@pytest.mark.parametrize(("io_format", "data", "message"), BAD_OUTPUTS,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_OUTPUTS)])
def test_malformed_output_is_a_solver_error_naming_it(scripts, io_format, data, message):
    exe = _writer(scripts, data, io_format, output_shape=(1,))
    with pytest.raises(bbd.SolverError, match=re.escape(message)) as info:
        bbd.implicit(SQRT)(exe)(torch.tensor(4.0))
    assert info.value.backend == "subprocess" and info.value.exit_code == 0


@pytest.mark.parametrize("to_stdout", [False, True], ids=["file", "stdout"])
def test_oversized_output_is_refused_at_the_cap(scripts, to_stdout):
    exe = _writer(scripts, 'b"2.0 " * 50_000', "text", to_stdout=to_stdout, max_output_bytes=1000)
    what = ("wrote output over max_output_bytes=1000 (more than that on stdout) and was stopped" if to_stdout
            else "wrote output over max_output_bytes=1000 (200000 bytes in its output file output.txt, plus 0 bytes "
                 "on stdout)")
    with pytest.raises(bbd.SolverError, match=re.escape(what)):
        exe(np.array(4.0))


def test_a_valid_output_still_parses(scripts):
    for io_format, data in [(f, d) for f, forms in VALID.items() for d in forms]:
        x = bbd.implicit(SQRT)(_writer(scripts, data, io_format, output_shape=(1,)))(torch.tensor(4.0))
        assert x.tolist() == [2.0]


# --- random bytes: a documented error or a correct answer, for every format ------------------------------
FUZZ = fuzz_settings(ci=40, fuzz=1000)  # `make fuzz` runs the large profile (tests/fuzzing.py)
VALID = {"json": [b"[2.0]"], "npy": [_npy(np.array([2.0]))],
         "text": [b"2.0", b"  0.2000000000000000D+01\n", b"0.2E+01", b"2"]}


@st.composite
def outputs(draw):
    io_format = draw(st.sampled_from(["json", "npy", "text"]))
    valid = draw(st.sampled_from(VALID[io_format]))
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "appended"]))
    if kind == "random":
        data = draw(st.binary(max_size=200))
    elif kind == "truncated":
        data = valid[: draw(st.integers(0, len(valid)))]
    elif kind == "flipped":
        i = draw(st.integers(0, len(valid) - 1))
        data = valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1 :]
    else:
        data = valid + draw(st.binary(min_size=1, max_size=50))
    return io_format, data


@FUZZ
@given(outputs())
def test_fuzzed_output_ends_in_a_solver_error_or_the_right_answer(scripts, case):
    io_format, data = case
    exe = _writer(scripts, data, io_format, output_shape=(1,))
    try:
        x = exe(np.array(4.0))
    except bbd.SolverError as err:
        assert "Executable" in str(err) and err.backend == "subprocess"
        return
    # The program's answer was accepted: it must be what those bytes say (a flipped digit may change it).
    assert x.shape == (1,) and np.isfinite(x).all()
    if data in VALID[io_format]:
        assert x.tolist() == [2.0]


# --- processes that misbehave --------------------------------------------------------------------------
def test_a_forked_child_that_outlives_the_program_is_killed_and_does_not_delay_the_answer(scripts, tmp_path):
    # The child holds stdout open and sleeps 60 s, past the 30 s timeout: waiting for it would time out.
    guard = Leftovers(tmp_path)
    pid_file = tmp_path / "child.pid"
    exe = bbd.Executable([sys.executable, scripts["forker"], "{input}", "{output}"], io="json", timeout=30,
                         env={"PID_FILE": str(pid_file), **guard.env}, workdir=guard.workdir)
    assert exe(np.array(4.0)).tolist() == [2.0]
    assert not _alive(int(pid_file.read_text())), "the program's child outlived it"
    guard.assert_clean()


def test_a_program_ignoring_sigterm_is_killed_at_the_timeout_with_its_children(scripts, tmp_path):
    guard = Leftovers(tmp_path)
    pid_file = tmp_path / "child.pid"
    exe = bbd.Executable([sys.executable, scripts["stubborn"], "{input}", "{output}"], io="json", timeout=1.0,
                         env={"PID_FILE": str(pid_file), **guard.env}, workdir=guard.workdir)
    with pytest.raises(bbd.SolverError, match=re.escape("did not finish within timeout=1.0 s and was killed")):
        exe(np.array(4.0))
    assert not _alive(int(pid_file.read_text())), "the program's SIGTERM-ignoring child survived the timeout"
    guard.assert_clean()


def test_a_batch_through_processes_with_one_malformed_instance(scripts):
    # Instance 1 writes a wrong-schema answer; the others are exact and keep their gradients.
    def solve(w):
        data = b'{"y": 1}' if w[0] == 9.0 else json.dumps([float(np.sqrt(w[0]))]).encode()
        return _writer(scripts, data, "json", output_shape=(1,))(w)

    w = torch.tensor([[4.0], [9.0], [16.0]], requires_grad=True)
    fn = bbd.implicit(SQRT, in_dims=0, on_failure="nan", executor="threads", max_workers=2)(solve)
    with pytest.warns(RuntimeWarning, match=re.escape("no 'x'")):
        x = fn(w)
    assert torch.isnan(x[1]).all() and x[[0, 2]].flatten().tolist() == [2.0, 4.0]
    x[[0, 2]].sum().backward()
    assert w.grad.flatten().tolist() == [0.25, 0.0, 0.125]


def test_npz_output_with_multipliers_truncated_in_the_middle(scripts):
    data = _npz(x=np.array([2.0]), ineq=np.array([1.0, 0.0]))
    cut = data[: len(data) // 2]
    assert zipfile.is_zipfile(io.BytesIO(data)) and not zipfile.is_zipfile(io.BytesIO(cut))
    exe = bbd.Executable([sys.executable, scripts["writer"], "{input}", "{output}"], io="npy", timeout=20,
                         env={"OUT_HEX": cut.hex()})
    with pytest.raises(bbd.SolverError, match=re.escape("malformed npy output")):
        exe(np.array(4.0))
