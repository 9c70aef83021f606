"""blackbox_diff backend for compiled programs: ``bbd.layer(bbd.Executable(...), condition=..., parameters=...)``.

`bbd.Executable` itself lives in the core (``bbd.implicit(cond)(bbd.Executable(...))`` needs no plugin);
this plugin lets an executable be used as a layer, with the cvxpylayers batching convention and the
instances of a batch run in parallel.
"""

from __future__ import annotations

import blackbox_diff as bbd

from ._backend import SubprocessBackend, SubprocessOptions

__all__ = ["SubprocessBackend", "SubprocessOptions", "register_backends"]


@bbd.hookimpl
def register_backends(register):
    """Register the subprocess backend with blackbox_diff's plugin manager."""
    register(SubprocessBackend())
