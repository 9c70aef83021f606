"""Compiled loops for the answer checks: numba when it is installed (the ``fast`` extra), numpy otherwise.

A check that runs after every forward (a certificate, a degeneracy screen) is a few dozen small array
operations; in numpy each costs a microsecond or more of dispatch, which on small problems is most of the
check. The same arithmetic as one compiled loop costs a few microseconds in all. `Kernel` wraps a function
written with scalar loops: `compiled()` is that function compiled by numba on first use (one explicit
signature, so one compilation per machine, cached on disk; calling the `Kernel` copies the arrays that
signature does not take as they are), or None when numba is not installed, cannot compile it (a warning),
or kernels are switched off (``BLACKBOX_DIFF_KERNELS=0``, `use_kernels`); callers then take their
vectorised numpy path, which computes the same values (the tests compare the two).

Compiled with ``fastmath={"reassoc", "contract"}`` only: sums may be reordered (vectorised) and fused, which
changes round-off and nothing else; NaN and Inf keep their meaning (no ``nnan``/``ninf``), so a NaN answer
still fails its check. Inside a kernel, ``max(0.0, v)`` is 0 for a NaN v (max keeps its first argument
unless another is larger): kernels write ``v if not v <= 0.0 else 0.0``, which keeps NaN whatever the order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["KERNELS_ENV", "Kernel", "describe_kernels", "kernels_enabled", "use_kernels"]

#: Set to 0 to run the checks' numpy paths even where numba is installed.
KERNELS_ENV = "BLACKBOX_DIFF_KERNELS"

_state = {"enabled": os.environ.get(KERNELS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")}


def kernels_enabled() -> bool:
    """Whether `Kernel.compiled` may return compiled code (numba must also be importable)."""
    return _state["enabled"]


def describe_kernels() -> str:
    """One line for `blackbox-diff plugins`: whether the answer checks run as compiled loops, and why not."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return 'answer checks: numpy (pip install "blackbox-diff[fast]" for compiled loops)'
    version = importlib.metadata.version("numba")
    if not _state["enabled"]:
        return f"answer checks: numpy (numba {version} installed; switched off by {KERNELS_ENV}=0 or use_kernels)"
    return f"answer checks: compiled loops (numba {version})"


def use_kernels(enabled: bool) -> bool:
    """Switch the compiled kernels on or off for this process; returns the previous setting."""
    previous = _state["enabled"]
    _state["enabled"] = bool(enabled)
    return previous


class Kernel:
    """A function of scalar loops over numpy arrays, compiled by numba on first use.

    Args:
        fn: the Python function (numba's nopython subset).
        signature: numba's signature string (e.g. ``"Tuple((f8[:, ::1], f8[:, ::1]))(f8[:, ::1], i8)"``); one
            signature, so the kernel compiles once per machine (arrays it does not take as they are, strided,
            read-only or float32, are copied by `__call__`).
    """

    def __init__(self, fn: Callable, signature: str) -> None:
        self.fn, self.signature = fn, signature
        self._compiled: Any = None
        self._tried = False
        self._lock = threading.Lock()
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any) -> Any:
        """The compiled function on `args` (callers check `compiled()` first). Arrays the signature does not
        take as they are (strided, read-only, float32) are copied (C order, floating arrays as float64) and
        the call retried, so the usual call pays no conversion."""
        fn = self._compiled if self._tried else self.compiled()
        try:
            return fn(*args)
        except TypeError:  # numba: no matching definition for these array layouts
            return fn(*(_contiguous(a) for a in args))

    def compiled(self) -> Callable | None:
        """The compiled function, or None (no numba, or kernels switched off)."""
        if not _state["enabled"]:
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._compiled = _compile(self.fn, self.signature)
                    self._tried = True
        return self._compiled


def _contiguous(a: Any) -> Any:
    import numpy as np

    if not isinstance(a, np.ndarray):
        return a
    if a.dtype.kind == "f" and a.dtype != np.float64:
        return np.array(a, dtype=np.float64, order="C")
    if not (a.flags.c_contiguous and a.flags.writeable):
        return np.array(a, order="C")
    return a


def _compile(fn: Callable, signature: str) -> Callable | None:
    try:
        import numba
    except ImportError:
        return None
    try:
        return numba.njit(signature, cache=True, nogil=True, fastmath={"reassoc", "contract"})(fn)
    except Exception as err:  # noqa: BLE001 - a broken numba/LLVM install must not break a forward
        import warnings

        warnings.warn(f"Compiling the check {fn.__name__!r} with numba failed ({type(err).__name__}: {err}); it runs "
                      f"in numpy instead (same values, slower). Set {KERNELS_ENV}=0 to skip numba.", RuntimeWarning,
                      stacklevel=4)
        return None
