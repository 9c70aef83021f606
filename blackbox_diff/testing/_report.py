"""The conformance report: one row per check and sample, and the error that lists the failures."""

from __future__ import annotations

import dataclasses

from blackbox_diff._errors import BlackBoxDiffError

__all__ = ["CheckResult", "ConformanceError", "ConformanceReport"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one sample.

    Attributes:
        check: the check's name (one of `blackbox_diff.testing.CHECKS`).
        sample: the sample's name.
        status: "PASS", "FAIL" or "SKIP".
        message: why it failed or was skipped (what is wrong and what to do), or what was verified.
    """

    check: str
    sample: str
    status: str
    message: str = ""


@dataclasses.dataclass
class ConformanceReport:
    """Every check's result for one backend. ``str(report)`` is a table; `failures` the rows that failed."""

    backend: str
    results: list[CheckResult] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count as failures)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    @property
    def skipped(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == SKIP]

    def status(self, check: str, sample: str | None = None) -> str:
        """The status of `check` (FAIL if it failed on any sample, else PASS if it passed on one, else SKIP)."""
        rows = [r for r in self.results if r.check == check and (sample is None or r.sample == sample)]
        statuses = {r.status for r in rows}
        return FAIL if FAIL in statuses else PASS if PASS in statuses else SKIP

    def __str__(self) -> str:
        passed = sum(r.status == PASS for r in self.results)
        lines = [f"conformance of backend {self.backend!r}: {passed} passed, {len(self.failures)} failed, "
                 f"{len(self.skipped)} skipped"]
        for r in self.results:
            head = f"  {r.status:4}  {r.check:10} [{r.sample}]"
            text = r.message
            lines.append(head + (": " + text.replace("\n", "\n        ") if text else ""))
        return "\n".join(lines)


class ConformanceError(BlackBoxDiffError, AssertionError):
    """A backend failed conformance checks. The message lists each failed check and why.

    Attributes:
        report: the full `ConformanceReport`.
    """

    def __init__(self, report: ConformanceReport) -> None:
        failed = report.failures
        lines = [f"Backend {report.backend!r} failed {len(failed)} conformance check(s):"]
        for r in failed:
            lines.append(f"- {r.check} [{r.sample}]: " + r.message.replace("\n", "\n    "))
        super().__init__("\n".join(lines))
        self.report = report
