"""The plugin author's conformance kit: does a backend keep the contract every backend keeps?

Like scikit-learn's ``check_estimator``: give `check_backend` a backend and a few `Sample` problems with
parameter values, and it runs the checks below on each, through `bbd.layer` as a user would, reporting
which check failed on which sample and why.

- **compile**: the backend is available, accepts the problem, compiles it through `bbd.layer` and when called
  directly with a dict of options; the declared parameter shapes match the instances
- **forward**: every instance solves alone (fresh layer): finite float64 answers and gradients on the CPU, the
  declared variable shapes
- **state**: one layer solving the instances in turn (and again in reverse) gives each the answer and gradient
  a fresh layer gives, and leaves the parameter tensors untouched: no mutable state between calls
- **batch**: the instances stacked into one batch give the single calls' answers and gradients row by row; a
  batch in parameter 0 with the other parameters shared broadcasts them and sums their gradients
- **gradients**: `bbd.check_gradients`: the implicit gradient against central finite differences of the black
  box itself, at the first instance
- **jvp**: forward mode (`torch.autograd.forward_ad`) along a random direction against a directional finite
  difference of the black box, and against reverse mode
- **failure**: an instance the solver cannot solve (`Sample.failing`) raises a `bbd.SolverError` naming the
  backend, with its batch index in a batch; with `on_failure="nan"` it is NaN with a zero gradient and the
  rest of the batch is exact
- **options**: unknown options are refused (by the `Options` model, by `bbd.layer`, by `compile` given a
  dict), and so are strings given to numeric, boolean and Literal (choice) options
- **dtype**: float32 parameters give float32 answers and gradients close to the float64 ones
- **device**: parameters on CUDA give answers and gradients on CUDA equal to the CPU's (skipped without a GPU)
- **threads**: four threads calling one layer at once, and `executor="threads"`, match serial calls

Use it in a test:

```python
from blackbox_diff.testing import Sample, check_backend

def test_my_backend_conforms():
    check_backend(MyBackend(), [Sample(problem, instances=[(w1,), (w2,), (w3,)], parameters=[()])])
```

`check_backend` raises `ConformanceError` (an ``AssertionError``) listing every failed check; with
``raise_on_failure=False`` it returns the `ConformanceReport` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from blackbox_diff._errors import InputError
from blackbox_diff.plugin import AbstractBackend, get_backend
from blackbox_diff.testing._checks import CHECKS, NEEDS_REFERENCE, RUNNERS
from blackbox_diff.testing._context import Context, Failed, Skipped
from blackbox_diff.testing._report import FAIL, PASS, SKIP, CheckResult, ConformanceError, ConformanceReport
from blackbox_diff.testing._sample import Sample

__all__ = ["CHECKS", "CheckResult", "ConformanceError", "ConformanceReport", "Sample", "check_backend"]


def check_backend(
    backend: AbstractBackend | str,
    samples: Sample | Iterable[Sample],
    *,
    checks: Sequence[str] | None = None,
    devices: Sequence[str] | None = None,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Run the conformance checks on `backend` with each sample.

    Args:
        backend: an `AbstractBackend` instance, or the name of a registered backend.
        samples: one `Sample` or several (e.g. one per problem type the backend accepts).
        checks: the names of the checks to run (see `CHECKS`); None runs them all. ``compile`` and
            ``forward`` always run first: the other checks build on them.
        devices: the accelerators of the device check; None: ``["cuda"]`` when CUDA is available, else
            none (the check is skipped).
        raise_on_failure: raise `ConformanceError` when a check fails (for tests); False returns the report.

    Returns:
        The `ConformanceReport` (one row per check and sample).

    Raises:
        ConformanceError: a check failed (the message lists each failed check, the sample and why).
        InputError: an unknown check name, no samples, or a malformed sample.
        PluginError: `backend` is a name no registered backend has.
    """
    chosen = get_backend(backend) if isinstance(backend, str) else backend
    if not isinstance(chosen, AbstractBackend):
        raise InputError(f"check_backend needs an AbstractBackend instance or a registered backend's name; got "
                         f"{type(backend).__name__}.")
    samples = [samples] if isinstance(samples, Sample) else list(samples)
    if not samples or not all(isinstance(s, Sample) for s in samples):
        raise InputError("check_backend needs one or more blackbox_diff.testing.Sample objects.")
    wanted = set(CHECKS if checks is None else checks)
    unknown = sorted(wanted - set(CHECKS))
    if unknown:
        raise InputError(f"Unknown check(s) {unknown}; the checks are {list(CHECKS)}.")
    wanted |= {"compile", "forward"}
    accelerators = list(devices) if devices is not None else (["cuda"] if torch.cuda.is_available() else [])
    report = ConformanceReport(chosen.name)
    for sample in samples:
        _run_sample(report, Context(chosen, sample, sample.tensors()), [c for c in CHECKS if c in wanted],
                    accelerators)
    if raise_on_failure and not report.ok:
        raise ConformanceError(report)
    return report


def _run_sample(report: ConformanceReport, ctx: Context, names: list[str], devices: list[str]) -> None:
    label = ctx.sample.label
    for name in names:
        if name != "compile" and ctx.layer_ is None:
            report.results.append(CheckResult(name, label, SKIP, "the compile check failed"))
            continue
        if name in NEEDS_REFERENCE and ctx.references is None:
            report.results.append(CheckResult(name, label, SKIP, "the forward check failed"))
            continue
        try:
            runner = RUNNERS[name]
            note = runner(ctx, devices) if name == "device" else runner(ctx)
            report.results.append(CheckResult(name, label, PASS, note))
        except Skipped as why:
            report.results.append(CheckResult(name, label, SKIP, str(why)))
        except Failed as why:
            report.results.append(CheckResult(name, label, FAIL, str(why)))
        except Exception as err:  # noqa: BLE001 - an unexpected error is a failed check, reported as such
            report.results.append(CheckResult(name, label, FAIL, f"raised {type(err).__name__}: {err}"))
