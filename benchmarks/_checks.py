"""Time spent in the answer checks of a forward, measured inside the code that runs them.

Certification = time in the engine's `Call._certify` (the condition's batch `certify`, or its torch
certificate and term sizes, and the test). Degeneracy = time in the condition's `degeneracy`; with
`lu_reused`, less the sparse LU factorisations it triggers (CasADi, adjoint="sparse_lu": the LU of K at the
answer, which the preconditioned residual needs at that same point anyway and the backward reuses; it
moved, it was not added).

A difference of two forwards (with and without residual_tol) cannot resolve tens of microseconds beside an
IPOPT solve of several milliseconds whose time varies by more than that from call to call; timing the
checks where they run can. The timing wrapper's own cost per call (calibrated around a no-op) is
subtracted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from blackbox_diff.engine import _call

__all__ = ["CheckTimer"]


class CheckTimer:
    """Accumulates seconds in the check functions while `active()`; `reset()` between forwards."""

    def __init__(self) -> None:
        self.certification = self.degeneracy = self.lu = 0.0
        self.calls = {"certification": 0, "degeneracy": 0}
        self._depth = 0  # inside a degeneracy test (LU time there is subtracted)
        self.overhead = self._calibrate()

    def reset(self) -> None:
        self.certification = self.degeneracy = self.lu = 0.0
        self.calls = {"certification": 0, "degeneracy": 0}

    def _calibrate(self, n: int = 20000) -> float:
        """Seconds the timing wrapper itself adds to one call (best of 5 tight loops around a no-op), which
        `row` subtracts per call: at B = 16 the degeneracy test runs 16 times per forward, and its own cost
        is about that of the wrapper. A tight loop underestimates the wrapper's cost between solver calls,
        so what remains still includes some of it."""
        def noop(*args, **kwargs):
            return None

        wrapped = self._timed(noop, "degeneracy")
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                noop()
            bare = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(n):
                wrapped()
            best = min(best, (time.perf_counter() - t - bare) / n)
        self.reset()
        return max(best, 0.0)

    def _timed(self, fn, kind: str):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            if kind == "degeneracy":
                self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t
                if kind == "degeneracy":
                    self._depth -= 1
                    self.degeneracy += spent
                    self.calls["degeneracy"] += 1
                elif kind == "lu":
                    if self._depth:
                        self.lu += spent
                else:
                    self.certification += spent
                    self.calls["certification"] += 1

        return wrapper

    @contextlib.contextmanager
    def active(self, condition: Any) -> Iterator[CheckTimer]:
        """Patch the check functions (the engine's, `condition`'s and, when loaded, CasADi's LU) while inside."""
        patched: list[tuple[Any, str, Any, bool]] = []

        def patch(owner: Any, name: str, kind: str, instance: bool = False) -> None:
            fn = getattr(owner, name)
            wrapped = self._timed(fn, kind)
            patched.append((owner, name, owner.__dict__.get(name) if not instance else None, instance))
            setattr(owner, name, staticmethod(wrapped) if isinstance(owner.__dict__.get(name), staticmethod) else
                    wrapped)

        patch(_call.Call, "_certify", "certification")
        patch(condition, "degeneracy", "degeneracy", instance=True)  # per-call copies of the condition keep it
        with contextlib.suppress(ImportError):
            from blackbox_diff_casadi import _kkt

            patch(_kkt._ScaledLU, "factor", "lu")
        try:
            yield self
        finally:
            for owner, name, original, instance in reversed(patched):
                if instance:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)

    def row(self, B: int = 1, lu_reused: bool = False) -> dict:
        """ms per instance: certification, degeneracy (without the LU it triggered when `lu_reused`), that LU."""
        moved = self.lu if lu_reused else 0.0
        cert = self.certification - self.overhead * self.calls["certification"]
        deg = self.degeneracy - moved - self.overhead * self.calls["degeneracy"]
        return {"certification": 1e3 * cert / B, "degeneracy": 1e3 * deg / B,
                "LU moved from the residual": 1e3 * moved / B}
