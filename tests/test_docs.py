"""The docs run: every ```python block of README.md and docs/**/*.md is executed in a fresh interpreter.

A new user must be able to go from the README to a working layer of each kind by following the docs
alone, so each block is a complete program (imports included) run in an empty temporary directory with
only the repository root and ``plugins/`` on ``PYTHONPATH``. Two HTML comments, on the line right before a
fence, change that:

* ``<!-- skip: reason -->``: the block is not run (a fragment, needs a GPU or a cluster, a long training).
  Skips are counted and capped by ``MAX_SKIPPED``: a skip is the exception, not an escape hatch.
* ``<!-- continue -->``: the block continues the previous block of the same page (prepended before it
  runs), for pages that build one example in steps.

The site is built here too, with ``mkdocs build --strict`` (broken links and anchors, griffe docstring
warnings and unresolved ``:::`` references fail it), and the API reference is checked against the public
names of the contract.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import blackbox_diff as bbd

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TIMEOUT_S = 60
# The number of blocks that may be marked <!-- skip: ... -->. Raise it only with a reason in the marker.
MAX_SKIPPED = 5

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
_CONTINUE = re.compile(r"^\s*<!--\s*continue\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One ```python block: where it starts, its code, and its markers."""

    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None = None  # the reason, when marked <!-- skip: reason -->
    prelude: str = ""  # the code of the previous blocks, when marked <!-- continue -->

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(text: str, path: str) -> list[Block]:
    """The ```python blocks of one markdown text, with their skip/continue markers.

    Raises:
        ValueError: an unclosed fence, a marker that is not followed by a python fence, or a continue
            marker with no previous runnable block on the page.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: the {fence} fence opened here is never closed")
        marker = lines[i - 1] if i > 0 else ""
        if lang == "python":
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            skip = _SKIP.match(marker)
            prelude = ""
            if _CONTINUE.match(marker):
                previous = [b for b in blocks if b.skip is None]
                if not previous:
                    raise ValueError(f"{path}:{i + 1}: <!-- continue --> but no earlier runnable block on the page")
                prelude = previous[-1].prelude + previous[-1].code
            blocks.append(Block(path, i + 1, code + "\n", skip.group("reason") if skip else None, prelude))
        elif _SKIP.match(marker) or _CONTINUE.match(marker):
            raise ValueError(f"{path}:{i + 1}: a skip/continue marker before a {lang or 'plain'} fence")
        i = end + 1
    return blocks


def _all_blocks() -> list[Block]:
    return [b for f in DOC_FILES for b in parse_blocks(f.read_text(encoding="utf-8"), f.relative_to(ROOT).as_posix())]


BLOCKS = _all_blocks()


def test_parser_reads_markers_and_line_numbers():
    text = "\n".join([
        "# page",
        "```python",
        "a = 1",
        "```",
        "<!-- continue -->",
        "```python",
        "b = a + 1",
        "```",
        "<!-- skip: needs a GPU -->",
        "```python",
        "torch.cuda.init()",
        "```",
        "```bash",
        "make test",
        "```",
        "  ```python",
        "  c = 3",
        "  ```",
    ])
    first, second, gpu, indented = parse_blocks(text, "page.md")
    assert (first.line, first.code, first.skip, first.prelude) == (2, "a = 1\n", None, "")
    assert (second.line, second.code, second.prelude) == (6, "b = a + 1\n", "a = 1\n")
    assert (gpu.id, gpu.skip) == ("page.md:10", "needs a GPU")
    assert indented.code == "c = 3\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("```python\nx = 1\n", "never closed"),
        ("<!-- skip: why -->\n```bash\nls\n```\n", "before a bash fence"),
        ("<!-- continue -->\n```python\nx = 1\n```\n", "no earlier runnable block"),
    ],
    ids=["unclosed", "marker-on-bash", "continue-first"],
)
def test_parser_rejects_malformed_pages(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_blocks(text, "page.md")


def test_every_page_is_scanned_and_skips_stay_few():
    pages = {b.path for b in BLOCKS}
    # The pages a new user follows to a working layer of each kind must all contribute runnable code.
    for page in ["README.md", "docs/index.md", "docs/install.md", "docs/concepts.md", "docs/faq.md",
                 "docs/backends/scipy.md", "docs/backends/cvxpy.md", "docs/backends/casadi.md",
                 "docs/backends/executable.md", "docs/howto/ode.md", "docs/howto/deq.md", "docs/plugins.md",
                 "docs/scaling.md"]:
        assert page in pages, f"{page} has no ```python block"
        assert any(b.skip is None for b in BLOCKS if b.path == page), f"every block of {page} is skipped"
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert all(b.skip for b in skipped), [b.id for b in skipped if not b.skip]
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} skipped blocks: {[(b.id, b.skip) for b in skipped]}"
    assert len(BLOCKS) - len(skipped) >= 20


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path):
    if block.skip is not None:
        pytest.skip(block.skip)
    script = tmp_path / "snippet.py"
    script.write_text(block.prelude + block.code, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH")] if p),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "default",
    }
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} ran longer than {TIMEOUT_S} s: make it smaller or mark it <!-- skip: reason -->")
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{block.id} exited with {proc.returncode}\n{output}"


# The contract's public names (DESIGN.md section 2) that must each have an entry in the API reference.
REFERENCED = [
    "implicit", "ImplicitFunction", "ImplicitOptions", "Root", "FixedPoint", "Argmin", "KKT", "KKTSolution",
    "AbstractCondition", "layer", "Executable", "AbstractBackend", "Compiled", "backends", "plugin_manager",
    "check_gradients", "GradientReport", "BlackBoxDiffError", "InputError", "SolverError", "CertificationError",
    "LinearSolveError", "BackendUnavailableError", "PluginError", "linalg", "linalg.cg", "linalg.minres",
    "linalg.gmres", "linalg.bicgstab", "linalg.neumann", "linalg.dense_solve", "linalg.lstsq_solve",
    "ode.odeint", "ode.solve_ivp_layer", "deq.DEQ", "deq.fixed_point_layer", "deq.anderson",
    "deq.fixed_point_iteration", "plugin.BackendOptions", "plugin.parse_shapes", "plugin.registered",
    "plugin.plugin_errors", "testing.check_backend", "testing.Sample",
]


def test_site_builds_strict_with_an_entry_per_public_name(tmp_path: Path):
    site = tmp_path / "site"
    # Not -q: mkdocs counts warnings for --strict only when they are logged, and -q drops them.
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    reference = "".join(p.read_text(encoding="utf-8") for p in (site / "reference").rglob("*.html"))
    missing = [name for name in REFERENCED if f'id="blackbox_diff.{name}"' not in reference]
    assert not missing, f"no API reference entry for {missing}"
    for page in ["install", "concepts", "faq", "benchmarks", "plugins", "scaling", "backends/cvxpy", "howto/ode"]:
        assert (site / page / "index.html").is_file(), page


def test_options_table_lists_exactly_the_implicit_options():
    text = (ROOT / "docs" / "reference" / "implicit.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE)
    assert documented == list(bbd.ImplicitOptions.model_fields)
