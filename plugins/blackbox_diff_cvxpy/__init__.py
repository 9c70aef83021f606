"""blackbox_diff backend for cvxpy problems: ``bbd.layer(problem, parameters=[...], variables=[...])``.

cvxpy and the solvers are imported lazily, inside the backend's methods, so a missing cvxpy disables only
this backend.
"""

from __future__ import annotations

import pluggy

import blackbox_diff as bbd

from ._backend import CvxpyBackend, CvxpyOptions

__all__ = ["CvxpyBackend", "CvxpyOptions", "register_backends"]

# bbd.hookimpl is the project's marker; pluggy's marker for the same project name is equivalent.
hookimpl = getattr(bbd, "hookimpl", None) or pluggy.HookimplMarker("blackbox_diff")


@hookimpl
def register_backends(register):
    """Register the cvxpy backend with blackbox_diff's plugin manager."""
    register(CvxpyBackend())
