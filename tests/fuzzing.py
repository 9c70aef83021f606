"""Hypothesis settings shared by the fuzz suites: a fast, reproducible subset by default (CI), the full
run under ``make fuzz`` (``BBD_FUZZ_PROFILE=fuzz``: at least 10,000 generated cases in all, fresh ones each
run, failures printed with their reproduction blob).

Each suite states its example count for both profiles with `fuzz_settings(ci=..., fuzz=...)`; the
profile names the rest (no deadline: the machine is shared and noisy; no example database).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("BBD_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "fuzz"):
    raise RuntimeError(f"BBD_FUZZ_PROFILE must be 'ci' or 'fuzz'; got {PROFILE!r}")

settings.register_profile(
    "bbd-ci", deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "bbd-fuzz", deadline=None, derandomize=False, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)


def fuzz_settings(ci: int, fuzz: int) -> settings:
    """Settings of the active profile with `ci` or `fuzz` examples."""
    return settings(settings.get_profile(f"bbd-{PROFILE}"), max_examples=fuzz if PROFILE == "fuzz" else ci)
