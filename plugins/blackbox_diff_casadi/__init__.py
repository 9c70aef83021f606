"""CasADi backend: a `casadi.Opti` problem or an nlpsol dict (IPOPT or any nlpsol plugin) as a torch layer.

Forward: the real solver, per instance (optionally warm-started from the previous answer). Backward: the
KKT conditions of the NLP on the active set identified from slacks and multipliers, built with CasADi's
own AD and solved sparsely. CasADi is imported inside functions only, so this module imports where
CasADi is missing (the backend is then listed as unavailable).
"""

from __future__ import annotations

from typing import Any

import blackbox_diff as bbd

from ._backend import CasadiBackend

__all__ = ["CasadiBackend", "register_backends"]


@bbd.hookimpl
def register_backends(register: Any) -> None:
    """Register the CasADi backend (its availability is checked lazily)."""
    register(CasadiBackend())
