"""blackbox_diff backend for problems stated with torch callables, solved by scipy.optimize.

``bbd.layer(bbd.Argmin(f) | bbd.KKT(f, eq, ineq) | bbd.Root(F) | bbd.FixedPoint(T), backend="scipy", ...)``.
scipy is imported inside the solver calls, so this module imports even where scipy is missing (the backend
is then listed as unavailable).
"""

from __future__ import annotations

import blackbox_diff as bbd

from ._backend import ScipyBackend, ScipyOptions
from ._condition import BoxArgmin
from ._solve import ScipySolve

__all__ = ["BoxArgmin", "ScipyBackend", "ScipyOptions", "ScipySolve", "register_backends"]


@bbd.hookimpl
def register_backends(register):
    """Register the scipy backend with blackbox_diff's plugin manager."""
    register(ScipyBackend())
