"""The `blackbox-diff` command: plugins, demo, bench, replay, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import blackbox_diff as bbd
from blackbox_diff import cli

SCRIPT = Path(sys.executable).parent / "blackbox-diff"


def test_plugins_lists_the_builtin_backends_as_available(capsys):
    assert cli.main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "package", "available"]
    table = lines[2 : lines.index("")]
    rows = {line.split()[0]: line.split() for line in table}
    for name in ("scipy", "subprocess", "cvxpy", "casadi"):
        assert rows[name][2] == "yes", rows[name]
    assert lines[-1].startswith("answer checks: ")


def test_plugins_says_whether_the_answer_checks_are_compiled(capsys):
    # The `fast` extra (numba) is installed here (CI installs every extra): compiled, and numpy once off.
    from blackbox_diff.plugin import use_kernels

    numba = pytest.importorskip("numba")
    assert cli.main(["plugins"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"answer checks: compiled loops (numba {numba.__version__})"
    previous = use_kernels(False)
    try:
        assert cli.main(["plugins"]) == 0
    finally:
        use_kernels(previous)
    assert "answer checks: numpy (numba" in capsys.readouterr().out.splitlines()[-1]


def test_demo_list_shows_every_example_with_its_title(capsys):
    assert cli.main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    for path in sorted((Path(cli.EXAMPLES)).glob("*.py")):
        title = path.read_text().split('"""')[1].splitlines()[0]
        assert f"{path.stem}" in out and title[:40] in out


def test_demo_runs_an_example_fast_and_passes_options_through(capsys, tmp_path):
    out_png = tmp_path / "b.png"
    assert cli.main(["demo", "brachistochrone", "--out", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("== blackbox-diff demo brachistochrone --fast")
    assert out_png.exists() and "fitted R = 0.41372" in text


def test_unknown_demo_exits_2_listing_the_available_ones(capsys):
    assert cli.main(["demo", "no_such_demo"]) == 2
    err = capsys.readouterr().err
    assert "Unknown demo 'no_such_demo'" in err and "seed_examples" in err


def test_bench_by_short_name_writes_its_json_into_a_new_folder(capsys, tmp_path):
    folder = tmp_path / "results" / "deep"
    assert cli.main(["bench", "deq", "--fast", "--json", str(folder)]) == 0
    rows = json.loads((folder / "bench_deq.json").read_text())
    assert {r["method"].split(" + ")[0] for r in rows} >= {"iteration", "anderson"}
    assert all(r["grad_rel_err"] < 1e-6 for r in rows)
    assert "== benchmark bench_deq" in capsys.readouterr().out


def test_a_failing_benchmark_is_reported_and_the_status_is_1(capsys, tmp_path, monkeypatch):
    (tmp_path / "bench_broken.py").write_text('"""Raises."""\nraise RuntimeError("boom")\n')
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path)
    assert cli.main(["bench", "broken"]) == 1
    captured = capsys.readouterr()
    assert "RuntimeError: boom" in captured.err and "!! bench_broken failed" in captured.err


def picky_sqrt(w):
    """A module-level solver (replay imports it by name) that refuses negative input."""
    if w < 0:
        raise ValueError(f"no real square root of {float(w)}")
    return np.sqrt(w)


def test_replay_reruns_a_recorded_failure(tmp_path, capsys):
    log = tmp_path / "failures.jsonl"
    fn = bbd.implicit(bbd.Root(lambda x, w: x**2 - w), in_dims=0, on_failure="nan",
                      capture_failures=str(log))(picky_sqrt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = fn(torch.tensor([4.0, -1.0]))
    assert z[0].item() == 2.0 and torch.isnan(z[1])
    assert cli.main(["replay", str(log)]) == 1  # safe by default: lists what it would run, runs nothing
    out = capsys.readouterr().out
    assert "test_cli:picky_sqrt (batch index 1): NOT RUN" in out and "Nothing was run" in out
    assert cli.main(["replay", str(log), "--solver", "test_cli:picky_sqrt"]) == 0
    out = capsys.readouterr().out
    assert "(batch index 1): REPRODUCED" in out and "no real square root of -1.0" in out


def test_replay_help_documents_every_flag():
    import argparse

    from blackbox_diff.tools import add_replay_arguments

    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    flags = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    assert {"--index", "--solver", "--trust", "--json"} <= set(flags)
    proc = subprocess.run([str(SCRIPT), "replay", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for flag in flags:
        assert flag in text, flag
    assert "Runs nothing unless you name the solver (--solver) or trust the file (--trust)" in text


def test_the_console_script_is_installed():
    proc = subprocess.run([str(SCRIPT), "plugins"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "casadi" in proc.stdout


def test_unknown_options_of_other_commands_are_refused():
    proc = subprocess.run([str(SCRIPT), "plugins", "--bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


# --- demos that ship in the package (a wheel install has no examples/ folder) ---------------------------------
def test_the_showcase_ships_in_the_package_and_wins_over_the_checkouts_copy():
    demos = cli._demos()
    path, title = demos["mpc_imitation"]
    assert path == Path(bbd.__file__).parent / "demos" / "mpc_imitation.py"
    assert title.startswith("Imitation learning through a differentiable MPC")
    assert demos["seed_examples"][0] == cli.EXAMPLES / "seed_examples.py"  # the rest stays in the checkout


def test_outside_a_checkout_only_the_packaged_demos_are_listed(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_CHECKOUT", False)
    assert cli.main(["demo", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["mpc_imitation"]
    assert cli.main(["demo", "seed_examples"]) == 2
    assert "Unknown demo 'seed_examples'. Available demos: mpc_imitation." in capsys.readouterr().err
    assert cli.main(["bench"]) == 2
    assert "the benchmarks live in a checkout of the repository" in capsys.readouterr().err


def test_a_demo_whose_library_is_missing_says_what_to_install(monkeypatch, tmp_path, capsys):
    (tmp_path / "needs_lib.py").write_text('"""Needs a library."""\nimport bbd_no_such_library_xyz\n')
    monkeypatch.setattr(cli, "DEMOS", tmp_path)
    assert cli.main(["demo", "needs_lib"]) == 1
    assert ("!! needs_lib needs the module 'bbd_no_such_library_xyz', which is not installed. Install the extras the "
            'examples use: pip install "blackbox-diff[all]"') in capsys.readouterr().err
