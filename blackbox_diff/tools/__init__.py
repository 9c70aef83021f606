"""The user's audit tools: `check_gradients` compares an implicit gradient with finite differences of the
black box itself; `replay` re-runs the failing calls of a capture file (the ``blackbox-diff replay``
command). The finite-difference pieces are shared with the conformance kit (`blackbox_diff.testing`)."""

from blackbox_diff.tools._checks import (
    FAIL,
    GradientReport,
    central_difference,
    check_gradients,
    entry_scale,
    saved_tensor_bytes,
)
from blackbox_diff.tools._replay import ReplayResult, load_records, replay
from blackbox_diff.tools._replay import add_arguments as add_replay_arguments
from blackbox_diff.tools._replay import run as run_replay

__all__ = [
    "FAIL",
    "GradientReport",
    "ReplayResult",
    "add_replay_arguments",
    "central_difference",
    "check_gradients",
    "entry_scale",
    "load_records",
    "replay",
    "run_replay",
    "saved_tensor_bytes",
]
