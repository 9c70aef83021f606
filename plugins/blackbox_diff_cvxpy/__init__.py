"""blackbox_diff backend for cvxpy problems: ``bbd.layer(problem, parameters=[...], variables=[...])``.

cvxpy and the solvers are imported lazily, inside the backend's methods, so a missing cvxpy disables only
this backend.
"""

from __future__ import annotations

import blackbox_diff as bbd

from ._backend import CvxpyBackend, CvxpyOptions

__all__ = ["CvxpyBackend", "CvxpyOptions", "register_backends"]

@bbd.hookimpl
def register_backends(register):
    """Register the cvxpy backend with blackbox_diff's plugin manager."""
    register(CvxpyBackend())
