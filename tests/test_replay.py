"""Capture of failing black-box calls (capture_failures=) and their replay (`blackbox-diff replay`)."""

from __future__ import annotations

import copyreg
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff.tools import _replay
from blackbox_diff.tools._replay import FORMAT, load_records, record_failure, replay

ROOT = bbd.Root(lambda x, w: x**2 - w)
REPO = Path(__file__).resolve().parent.parent


def picky_sqrt(w):
    """A module-level (importable) solver that fails on negative input, like many legacy codes."""
    w = np.asarray(w, dtype=np.float64)
    if (w < 0).any():
        raise ArithmeticError(f"negative input {w.min():.17g}")
    return np.sqrt(w)


def nan_sqrt(w):
    return np.sqrt(w) if w >= 0 else float("nan")


def fixed_sqrt(w):
    return np.sqrt(np.abs(w))


def _wrapped(err: Exception, cause: Exception | None) -> Exception:
    err.__cause__ = cause
    return err


# --- record_failure ----------------------------------------------------------------------------------
def test_record_holds_an_exact_copy_of_the_parameters_and_the_error(tmp_path):
    path = tmp_path / "fail.jsonl"
    w = np.array([[0.1, -1 / 3], [np.pi, -1e-300]])
    err = _wrapped(bbd.SolverError("solver raised", batch_index=4), ArithmeticError("negative input"))
    record_failure(path, picky_sqrt, (w, np.float64(2.5)), err, 4)
    (rec,) = load_records(path)
    assert rec["format"] == FORMAT
    assert rec["solver"] == "test_replay:picky_sqrt" and rec["importable"] is True
    assert rec["args"][0]["shape"] == [2, 2] and rec["args"][1]["shape"] == []
    assert np.array_equal(np.asarray(rec["args"][0]["data"]), w)  # bit-exact round trip
    assert rec["error"] == {
        "type": "SolverError",
        "message": "solver raised (batch index 4)",
        "cause_type": "ArithmeticError",
        "cause_message": "negative input",
    }
    assert rec["batch_index"] == 4
    assert rec["timestamp"].endswith("+00:00")
    assert {"python", "numpy", "torch"} <= set(rec["versions"])


def test_lambdas_and_closures_are_recorded_as_not_importable(tmp_path):
    path = tmp_path / "fail.jsonl"

    def local(w):
        return w

    record_failure(path, lambda w: w, (np.ones(2),), bbd.SolverError("x"), None)
    record_failure(path, local, (np.ones(2),), bbd.SolverError("x"), None)
    lam, clo = load_records(path)
    assert lam["solver"] is None and "lambda or a closure" in lam["why_not_importable"]
    assert clo["solver"] is None and "<locals>" in clo["why_not_importable"]
    (res,) = replay(path, index=0, trust=True)
    assert res.outcome == "not run" and res.reproduced is None
    assert res.detail.startswith("the file names nothing importable (")
    assert res.detail.endswith("not importable, so only --solver can run it")


def test_torch_arguments_keep_their_dtype(tmp_path):
    path = tmp_path / "fail.jsonl"
    w = torch.tensor([-2.0, 4.0], dtype=torch.float32)
    record_failure(path, picky_sqrt, (w,), bbd.SolverError("x"), 0)
    (rec,) = load_records(path)
    assert rec["args"][0]["kind"] == "torch" and rec["args"][0]["dtype"] == "float32"
    (res,) = replay(path, trust=True)
    assert res.outcome == "raised" and res.detail.startswith("ArithmeticError: negative input -2")


def test_unwritable_capture_path_warns_instead_of_hiding_the_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match=re.escape("capture_failures could not record the failing call")):
        record_failure(blocker / "sub" / "fail.jsonl", picky_sqrt, (np.ones(1),), bbd.SolverError("x"), None)


def test_records_from_many_threads_never_interleave(tmp_path):
    path = tmp_path / "fail.jsonl"
    big = np.linspace(0, 1, 5000)

    def work(k):
        for _ in range(10):
            record_failure(path, picky_sqrt, (big * k,), bbd.SolverError(f"thread {k}"), k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = load_records(path)
    assert len(records) == 80
    for rec in records:
        assert rec["error"]["message"] == f"thread {rec['batch_index']}"
        assert np.array_equal(np.asarray(rec["args"][0]["data"]), big * rec["batch_index"])


# --- replay --------------------------------------------------------------------------------------------
def test_replay_reproduces_a_raising_solver(tmp_path):
    path = tmp_path / "fail.jsonl"
    err = _wrapped(bbd.SolverError("raised ArithmeticError"), ArithmeticError("negative input -1"))
    record_failure(path, picky_sqrt, (np.array([-1.0]),), err, 1)
    (res,) = replay(path, trust=True)
    assert (res.record, res.batch_index, res.outcome, res.reproduced) == (0, 1, "raised", True)
    assert res.detail == "ArithmeticError: negative input -1"
    assert res.recorded == "SolverError: raised ArithmeticError"


def test_replay_with_a_fixed_solver_is_not_reproduced(tmp_path):
    path = tmp_path / "fail.jsonl"
    err = _wrapped(bbd.SolverError("raised"), ArithmeticError("negative"))
    record_failure(path, picky_sqrt, (np.array(-4.0),), err, None)
    (res,) = replay(path, solver=fixed_sqrt)
    assert res.outcome == "returned" and res.reproduced is False
    assert res.detail == "array of shape (): [2]" and float(res.value) == 2.0


def test_replay_of_a_nan_answer_and_of_a_certification_failure(tmp_path):
    path = tmp_path / "fail.jsonl"
    record_failure(path, nan_sqrt, (np.array(-4.0),), bbd.SolverError("The black box returned NaN"), None)
    cert = bbd.CertificationError("does not satisfy", residual=1.0, tolerance=1e-6)
    record_failure(path, picky_sqrt, (np.array(4.0),), cert, None)
    nan, certified = replay(path, trust=True)
    assert nan.outcome == "returned" and nan.reproduced is True and "contains NaN/Inf" in nan.detail
    assert certified.outcome == "returned" and certified.reproduced is None


def test_replay_index_selects_one_record(tmp_path):
    path = tmp_path / "fail.jsonl"
    for k in range(3):
        record_failure(path, picky_sqrt, (np.array(-k - 1.0),), bbd.SolverError("x"), k)
    assert [r.batch_index for r in replay(path, index=-1)] == [2]
    with pytest.raises(bbd.InputError, match=re.escape("Record index 3 is out of range: ")):
        replay(path, index=3)


def test_replay_errors_on_missing_or_foreign_files(tmp_path):
    with pytest.raises(bbd.InputError, match=re.escape("No capture file at")):
        replay(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "other"}\n')
    with pytest.raises(bbd.InputError, match=re.escape("Line 1 of")) as info:
        replay(bad)
    assert "has format 'other'; expected 'blackbox-diff-failure/1'" in str(info.value)
    bad.write_text("{not json\n")
    with pytest.raises(bbd.InputError, match=re.escape("is not JSON")):
        replay(bad)


def test_replay_of_a_solver_whose_module_is_gone(tmp_path):
    path = tmp_path / "fail.jsonl"
    record_failure(path, picky_sqrt, (np.array(-1.0),), bbd.SolverError("x"), None)
    rec = json.loads(path.read_text())
    rec["solver"] = "no_such_module_for_bbd:solve"
    path.write_text(json.dumps(rec) + "\n")
    (res,) = replay(path, trust=True)
    assert res.outcome == "not run" and res.reproduced is None
    assert res.detail.startswith("loading no_such_module_for_bbd:solve (imports the module no_such_module_for_bbd) "
                                 "failed: ModuleNotFoundError")


# --- the CLI -------------------------------------------------------------------------------------------
def test_main_exit_codes_and_output(tmp_path, capsys):
    path = tmp_path / "fail.jsonl"
    err = _wrapped(bbd.SolverError("raised"), ArithmeticError("negative"))
    record_failure(path, picky_sqrt, (np.array(-1.0),), err, 7)
    assert _replay.main([str(path), "--trust"]) == 0
    out = capsys.readouterr().out
    assert "[0] test_replay:picky_sqrt (batch index 7): REPRODUCED" in out
    assert _replay.main([str(path), "--solver", "test_replay:fixed_sqrt", "--json"]) == 1
    row = json.loads(capsys.readouterr().out)
    assert row["reproduced"] is False and row["value"] == "array of shape (): [1]"
    assert _replay.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "No capture file at" in capsys.readouterr().err
    assert _replay.main([str(path), "--solver", "nocolon"]) == 2
    assert "--solver must be MODULE:NAME" in capsys.readouterr().err


def test_cli_subcommand_in_a_fresh_process(tmp_path):
    path = tmp_path / "fail.jsonl"
    err = _wrapped(bbd.SolverError("raised"), ArithmeticError("negative"))
    record_failure(path, picky_sqrt, (np.array([2.0, -3.0]),), err, None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, "-m", "blackbox_diff.cli", "replay", str(path), "--index", "0", "--trust"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "REPRODUCED" in proc.stdout and "ArithmeticError: negative input -3" in proc.stdout


# --- end to end: bbd.implicit(capture_failures=...) ----------------------------------------------------
def test_failing_instances_of_a_batch_are_captured_and_replayed(tmp_path):
    path = tmp_path / "captures" / "fail.jsonl"
    fn = bbd.implicit(ROOT, in_dims=0, on_failure="nan", capture_failures=str(path))(picky_sqrt)
    w = torch.tensor([4.0, -1.0, 9.0, -2.5])
    with pytest.warns(RuntimeWarning, match="negative input"):
        z = fn(w)
    assert torch.isnan(z[[1, 3]]).all() and z[[0, 2]].tolist() == [2.0, 3.0]
    records = load_records(path)
    assert [r["batch_index"] for r in records] == [1, 3]
    assert [r["args"][0]["data"] for r in records] == [-1.0, -2.5]
    assert all(r["solver"] == "test_replay:picky_sqrt" for r in records)
    results = replay(path, trust=True)
    assert [(r.outcome, r.reproduced) for r in results] == [("raised", True), ("raised", True)]
    assert results[1].detail == "ArithmeticError: negative input -2.5"


def test_a_raising_call_is_captured_before_it_raises(tmp_path):
    path = tmp_path / "fail.jsonl"
    fn = bbd.implicit(ROOT, capture_failures=str(path))(picky_sqrt)
    with pytest.raises(bbd.SolverError, match=re.escape("raised ArithmeticError: negative input -3")):
        fn(torch.tensor(-3.0))
    (rec,) = load_records(path)
    assert rec["batch_index"] is None and rec["error"]["cause_type"] == "ArithmeticError"


def test_certification_and_nan_failures_are_captured(tmp_path):
    path = tmp_path / "fail.jsonl"
    with pytest.raises(bbd.CertificationError):
        bbd.implicit(ROOT, capture_failures=str(path))(fixed_sqrt)(torch.tensor(-4.0))  # 2**2 != -4
    with pytest.raises(bbd.SolverError, match=re.escape("returned NaN or Inf")):
        bbd.implicit(ROOT, capture_failures=str(path))(nan_sqrt)(torch.tensor(-4.0))
    cert, nan = load_records(path)
    assert cert["error"]["type"] == "CertificationError" and nan["error"]["type"] == "SolverError"
    r_cert, r_nan = replay(path, trust=True)
    assert r_cert.reproduced is None and float(r_cert.value) == 2.0
    assert r_nan.reproduced is True


def test_failures_under_a_process_pool_are_captured(tmp_path):
    path = tmp_path / "fail.jsonl"
    fn = bbd.implicit(ROOT, in_dims=0, on_failure="nan", executor="processes", max_workers=2,
                      capture_failures=str(path))(picky_sqrt)
    with pytest.warns(RuntimeWarning):
        fn(torch.tensor([-1.0, 1.0, -7.0]))
    assert [r["batch_index"] for r in load_records(path)] == [0, 2]
    assert all(r.reproduced for r in replay(path, trust=True))


@bbd.implicit(ROOT, capture_failures=None)
def decorated_sqrt(w):
    """Decorated in place: the module attribute is the ImplicitFunction, the solver its __wrapped__."""
    return picky_sqrt(w)


def test_a_solver_decorated_in_place_is_importable_and_unwrapped_on_replay(tmp_path):
    path = tmp_path / "fail.jsonl"
    with pytest.raises(bbd.SolverError):
        decorated_sqrt.with_options(capture_failures=str(path))(torch.tensor(-2.0))
    (rec,) = load_records(path)
    assert rec["solver"] == "test_replay:decorated_sqrt" and rec["unwrap"] is True
    (res,) = replay(path, trust=True)
    assert res.outcome == "raised" and res.reproduced is True


SCRIPT = """
import numpy as np
import torch
import blackbox_diff as bbd


def legacy_solver(w):
    if w < 0:
        raise FloatingPointError("legacy code cannot take negative w")
    return np.sqrt(w)


if __name__ == "__main__":  # the training loop: must not run again during a replay
    fn = bbd.implicit(bbd.Root(lambda x, w: x**2 - w), in_dims=0, on_failure="nan", capture_failures={path!r})(
        legacy_solver
    )
    fn(torch.tensor([4.0, -9.0]))
    print("TRAINING LOOP RAN")
"""


def test_a_solver_defined_in_a_script_is_replayed_from_its_file(tmp_path, capsys):
    path = tmp_path / "fail.jsonl"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(path=str(path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0 and "TRAINING LOOP RAN" in proc.stdout, proc.stderr
    (rec,) = load_records(path)
    assert rec["solver"] == "__main__:legacy_solver" and rec["solver_file"] == str(script)
    assert rec["batch_index"] == 1 and rec["args"][0]["data"] == -9.0
    (res,) = replay(path, trust=True)
    assert res.outcome == "raised" and res.reproduced is True
    assert res.detail == "FloatingPointError: legacy code cannot take negative w"
    assert "TRAINING LOOP RAN" not in capsys.readouterr().out


# --- the trust model: a capture file is data; the code it names runs only when the user says so ----------
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")


def solve(w):
    pathlib.Path({marker!r}).write_text("called")
    raise ArithmeticError("evil")
"""


def _hand_written(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A capture file naming a module and a script that leave a marker file when they run."""
    marker = tmp_path / "ran.txt"
    (tmp_path / "evil_bbd_module.py").write_text(EVIL.format(marker=str(marker)))
    script = tmp_path / "evil_script.py"
    script.write_text(EVIL.format(marker=str(marker)))
    base = {"format": FORMAT, "importable": True, "unwrap": False, "args": [{"shape": [], "data": -1.0}],
            "error": {"type": "SolverError", "message": "x", "cause_type": "ArithmeticError"}, "batch_index": None}
    path = tmp_path / "fail.jsonl"
    path.write_text(json.dumps({**base, "solver": "evil_bbd_module:solve"}) + "\n"
                    + json.dumps({**base, "solver": "__main__:solve", "solver_file": str(script)}) + "\n")
    return path, marker, script


def test_replay_runs_nothing_named_in_the_file_by_default(tmp_path, capsys, monkeypatch):
    path, marker, script = _hand_written(tmp_path)
    monkeypatch.chdir(tmp_path)  # the module would be importable from here
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _replay.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert not marker.exists(), "replay ran code named in the capture file"
    assert "[0] evil_bbd_module:solve: NOT RUN" in out
    assert "the file names evil_bbd_module:solve (imports the module evil_bbd_module)" in out
    assert f"the file names solve from the script {script} (loaded without its __main__ block)" in out
    assert out.rstrip().endswith(
        "Nothing was run: a capture file names code, and replay runs only code you name: pass --solver MODULE:NAME "
        "(solver=) to run your solver on the recorded parameters, or --trust (trust=True) to run the code the file "
        "names, for files you trust.")
    assert [r.outcome for r in replay(path)] == ["not run", "not run"] and not marker.exists()


def test_replay_runs_the_solver_named_on_the_command_line_and_only_that(tmp_path, capsys, monkeypatch):
    path, marker, _ = _hand_written(tmp_path)
    mine = tmp_path / "my_solver.py"
    mine.write_text("def solve(w):\n    raise ArithmeticError('mine')\n")
    assert _replay.main([str(path), "--solver", f"{mine}:solve"]) == 0
    assert "ArithmeticError: mine" in capsys.readouterr().out and not marker.exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert _replay.main([str(path), "--solver", "my_solver:solve"]) == 0  # a module of the current directory
    assert not marker.exists()


def test_replay_with_trust_runs_the_named_code(tmp_path, monkeypatch):
    path, marker, _ = _hand_written(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    results = replay(path, trust=True)
    assert [(r.outcome, r.reproduced) for r in results] == [("raised", True), ("raised", True)]
    assert marker.read_text() == "called"


MALFORMED = [
    ({"error": "boom"}, "'error' must be an object with string 'type' and 'message'"),
    ({"args": {"shape": []}}, "'args' must be a list of arrays"),
    ({"args": [{"shape": [2], "data": [1.0]}]}, "args[0]: 'data' holds 1 numbers, but 'shape' [2] needs 2"),
    ({"args": [{"shape": [2], "data": ["a", "b"]}]}, "args[0]: 'data' is not a (nested) list of numbers"),
    ({"args": [{"shape": [-1], "data": []}]}, "args[0]: 'shape' must be a list of non-negative integers"),
    ({"args": [{"shape": [], "data": 1.0, "kind": "torch", "dtype": "int64"}]},
     "args[0]: 'kind' must be 'numpy' or 'torch' and 'dtype' one of"),
    ({"solver": 42}, "'solver' must be 'module:qualname' or null; got 42"),
    ({"batch_index": "3"}, "'batch_index' must be an integer or null; got '3'"),
]


@pytest.mark.parametrize(("change", "message"), MALFORMED, ids=[m[:24] for _, m in MALFORMED])
def test_a_malformed_record_exits_2_with_a_message(tmp_path, capsys, change, message):
    path = tmp_path / "fail.jsonl"
    record_failure(path, picky_sqrt, (np.array(-1.0),), bbd.SolverError("x"), None)
    rec = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(rec) + "\n")
    assert _replay.main([str(path), "--trust"]) == 2
    err = capsys.readouterr().err
    assert f"Line 1 of {str(path)!r} is not a well-formed capture record: {message}" in err
    assert "Traceback" not in err


def test_an_empty_file_says_so(tmp_path, capsys):
    path = tmp_path / "fail.jsonl"
    path.write_text("\n")
    assert replay(path) == []
    assert _replay.main([str(path)]) == 1
    assert capsys.readouterr().out.startswith(f"No records in {str(path)!r}: the capture file is empty")


class Locked(Exception):
    """An exception that cannot be pickled (it holds a lock), as some solver libraries raise."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def locked_solver(w):
    raise Locked(f"solver state is locked at w={float(w)}")


def _tblib_style_reducer(err):
    # What tblib.pickling_support.install() (imported by dask.distributed) registers for every exception
    # class: a copyreg reducer that pickles the instance's __dict__ (here: a lock) and comes before
    # anything set on the instance.
    return Locked, (str(err),), err.__dict__


@pytest.mark.parametrize("copyreg_reducer", [False, True], ids=["plain", "tblib-installed"])
@pytest.mark.parametrize("executor", [None, "threads", "processes"])
def test_an_unpicklable_exception_keeps_its_type_unless_it_crosses_a_process(tmp_path, monkeypatch, executor,
                                                                             copyreg_reducer):
    if copyreg_reducer:
        monkeypatch.setitem(copyreg.dispatch_table, Locked, _tblib_style_reducer)
    path = tmp_path / "fail.jsonl"
    fn = bbd.implicit(ROOT, in_dims=0, on_failure="raise", executor=executor, max_workers=2,
                      capture_failures=str(path))(locked_solver)
    with pytest.raises(bbd.SolverError) as info:
        fn(torch.tensor([-1.0, -2.0]))
    cause = info.value.__cause__
    if executor == "processes":  # pickled to come back: its type survives in the message only
        assert type(cause) is RuntimeError and str(cause) == "Locked: solver state is locked at w=-1.0"
    else:
        assert type(cause) is Locked
    (rec,) = load_records(path)
    assert rec["error"]["cause_type"] == ("RuntimeError" if executor == "processes" else "Locked")
    (res,) = replay(path, solver=locked_solver)
    assert res.outcome == "raised" and res.reproduced is (executor != "processes")


EXE_MODULE = """
import sys
import blackbox_diff as bbd

# A legacy program that gives up on negative input, as the user's own module would define it.
PROGRAM = "import sys; w = float(open(sys.argv[1]).read()); sys.exit('negative input') if w < 0 else print(w ** 0.5)"
exe = bbd.Executable([sys.executable, "-c", PROGRAM, "{input}"], io="text", timeout=30)
"""


def test_a_captured_executable_failure_is_not_run_by_default_and_reproduced_with_solver(tmp_path, capsys):
    module = tmp_path / "my_programs.py"
    module.write_text(EXE_MODULE)
    spec = importlib.util.spec_from_file_location("my_programs_for_capture", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "fail.jsonl"
    fn = bbd.implicit(ROOT, in_dims=0, on_failure="nan", capture_failures=str(path))(mod.exe)
    with pytest.warns(RuntimeWarning, match=re.escape("exited with status 1")):
        fn(torch.tensor([4.0, -1.0]))
    (rec,) = load_records(path)
    assert rec["solver"] is None and rec["why_not_importable"] == "an instance of Executable has no module-level name"
    assert _replay.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "(batch index 1): NOT RUN" in out and "NOT REPRODUCED" not in out
    assert "the file names nothing importable (an instance of Executable has no module-level name)" in out
    assert "pass --solver MODULE:NAME" in out
    assert _replay.main([str(path), "--solver", f"{module}:exe"]) == 0
    out = capsys.readouterr().out
    assert "(batch index 1): REPRODUCED" in out
    assert f"replay:   raised: SolverError: Executable {os.path.basename(sys.executable)!r} exited with status 1" in out
