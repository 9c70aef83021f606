"""The IFT engine: one autograd core for every differentiable output of blackbox_diff.

`apply(call, params)` runs a `Call` (a black box and its optimality condition) inside a
`torch.autograd.Function` whose backward, forward-mode and vmap rules implement the implicit function
theorem (see `blackbox_diff.engine._functions`). `bbd.implicit`, every `bbd.layer`, `odeint` and `DEQ`
go through it.
"""

from blackbox_diff.engine._batching import answer_dtype_device as answer_dtype_device
from blackbox_diff.engine._batching import as_parameters as as_parameters
from blackbox_diff.engine._batching import batch_layout as batch_layout
from blackbox_diff.engine._batching import check_finite as check_finite
from blackbox_diff.engine._batching import float64_numpy as float64_numpy
from blackbox_diff.engine._batching import instance_args as instance_args
from blackbox_diff.engine._batching import owned_tensor as owned_tensor
from blackbox_diff.engine._call import Answers, Call
from blackbox_diff.engine._degeneracy import Degeneracy
from blackbox_diff.engine._functions import apply
from blackbox_diff.engine._lift import Lifted, lift
from blackbox_diff.engine._options import ImplicitOptions as ImplicitOptions
from blackbox_diff.engine._options import parse_options as parse_options
from blackbox_diff.engine._policy import choose_solver, solve_linear
from blackbox_diff.engine._system import Linearization, System, first_order_only

__all__ = [
    "Answers",
    "Call",
    "Degeneracy",
    "Lifted",
    "Linearization",
    "System",
    "apply",
    "choose_solver",
    "first_order_only",
    "lift",
    "solve_linear",
]
