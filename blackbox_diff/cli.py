"""The `blackbox-diff` command: `plugins`, `demo [NAME]`, `bench [NAME]`, `replay FILE`."""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
import time
import traceback
from pathlib import Path

from blackbox_diff.linalg import describe_kernels
from blackbox_diff.plugin import backends
from blackbox_diff.tools import add_replay_arguments, run_replay

__all__ = ["main"]

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent
#: Demos shipped inside the package: `blackbox-diff demo` finds them in any install, a wheel included.
DEMOS = PACKAGE / "demos"
# A checkout's examples/ and benchmarks/ (absent from a wheel install; never some other package's folders).
_CHECKOUT = (ROOT / "pyproject.toml").is_file() and 'name = "blackbox-diff"' in (ROOT / "pyproject.toml").read_text()
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"
# The showcase first: `make demo` runs the first of these that exists.
DEFAULT_DEMOS = ("mpc_imitation", "seed_examples")


def _scripts(folder: Path) -> dict[str, str]:
    """name -> first docstring line of every runnable script in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _demos() -> dict[str, tuple[Path, str]]:
    """name -> (script, title): the packaged demos, then a checkout's examples (a packaged one wins)."""
    found = {}
    folders = [DEMOS, EXAMPLES] if _CHECKOUT else [DEMOS]
    for folder in reversed(folders):
        found.update({name: (folder / f"{name}.py", title) for name, title in _scripts(folder).items()})
    return found


def _run_script(path: Path, argv: list[str]) -> int:
    old = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 1
    except ModuleNotFoundError as err:
        traceback.print_exc()
        print(f"!! {path.stem} needs the module {err.name!r}, which is not installed. Install the extras the "
              f'examples use: pip install "blackbox-diff[all]"', file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - one failing script must not stop the others: report it, go on
        traceback.print_exc()
        print(f"!! {path.stem} failed (traceback above)", file=sys.stderr)
        return 1
    finally:
        sys.argv = old
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    rows = [("name", "package", "available", "problem types", "duals", "note")]
    for info in backends():
        rows.append(
            (
                info.name,
                info.package or "",
                "yes" if info.available else "no",
                info.problem_types or "",
                "yes" if info.returns_duals else "no",
                info.error or "",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(describe_kernels())
    return 0


def _pick(scripts: dict[str, Path], name: str | None, defaults: tuple[str, ...], kind: str) -> Path | None:
    if name is None:
        name = next((d for d in defaults if d in scripts), None)
    elif name not in scripts and f"bench_{name}" in scripts:  # `bench qp` for benchmarks/bench_qp.py
        name = f"bench_{name}"
    if name is None or name not in scripts:
        known = ", ".join(scripts) or "none found"
        print(f"Unknown {kind} {name!r}. Available {kind}s: {known}.", file=sys.stderr)
        return None
    return scripts[name]


def _cmd_demo(args: argparse.Namespace) -> int:
    demos = _demos()
    if args.list:
        for name, (_, title) in demos.items():
            print(f"{name:24} {title}")
        return 0
    path = _pick({name: p for name, (p, _) in demos.items()}, args.name, DEFAULT_DEMOS, "demo")
    if path is None:
        return 2
    extra = [] if args.full else ["--fast"]
    print(f"== blackbox-diff demo {path.stem} {' '.join(extra)}")
    return _run_script(path, extra + args.rest)


def _cmd_bench(args: argparse.Namespace) -> int:
    folder = BENCHMARKS
    scripts = {name: folder / f"{name}.py" for name in _scripts(folder)} if _CHECKOUT else {}
    names = [args.name] if args.name else list(scripts)
    if not names:
        print(f"No benchmarks found in {folder}: the benchmarks live in a checkout of the repository (a wheel "
              "install does not ship them).", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).mkdir(parents=True, exist_ok=True)
    status = 0
    for name in names:
        path = _pick(scripts, name, (), "benchmark")
        if path is None:
            return 2
        print(f"\n== benchmark {path.stem}")
        start = time.perf_counter()
        argv = ["--fast"] if args.fast else []
        if args.json:
            argv += ["--json", str(Path(args.json) / f"{path.stem}.json")]
        status |= _run_script(path, argv + args.rest)
        print(f"   ({time.perf_counter() - start:.1f} s)")
    return status


def _cmd_replay(args: argparse.Namespace) -> int:
    return run_replay(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blackbox-diff", description="Make any solver differentiable.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list the registered backends").set_defaults(func=_cmd_plugins)
    demo = sub.add_parser("demo", help="run a shipped example (default: the MPC imitation showcase)")
    demo.add_argument("name", nargs="?", help="example name (see --list)")
    demo.add_argument("--list", action="store_true", help="list the examples")
    demo.add_argument("--full", action="store_true", help="full setting instead of --fast")
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="run the benchmark suite side by side with the anchor libraries")
    bench.add_argument("name", nargs="?", help="one benchmark (default: all)")
    bench.add_argument("--fast", action="store_true", help="small sizes, few repeats")
    bench.add_argument("--json", metavar="DIR", help="also write each benchmark's table as JSON into DIR")
    bench.set_defaults(func=_cmd_bench)
    replay = sub.add_parser(
        "replay", help="re-run the failing black-box calls recorded by capture_failures=",
        description="Re-run the failing black-box calls recorded by capture_failures=. Runs nothing unless you "
        "name the solver (--solver) or trust the file (--trust): a capture file names code, and importing runs it. "
        "Exit status: 0 every record reproduced; 1 some did not, were not run or cannot be judged, or the file is "
        "empty; 2 the file or the arguments are invalid.",
    )
    add_replay_arguments(replay)
    replay.set_defaults(func=_cmd_replay)
    # Options a command does not know (e.g. `demo neural_ode --epochs 3`) go to the script it runs.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("demo", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.rest = extra
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
