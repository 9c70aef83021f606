"""blackbox_diff: make any solver differentiable.

A black-box solver maps parameters to a solution z*; an optimality condition F(z, params) = 0 holds at
z*; the implicit function theorem turns dL/dz* into dL/dparams with one adjoint linear solve.
"""

from importlib.metadata import PackageNotFoundError, version

from blackbox_diff import deq, kkt, linalg, ode, plugin
from blackbox_diff._errors import (
    BackendUnavailableError,
    BlackBoxDiffError,
    CertificationError,
    DegenerateError,
    InputError,
    LinearSolveError,
    PluginError,
    SolverError,
)
from blackbox_diff.api import ImplicitFunction, implicit, layer
from blackbox_diff.conditions import KKT, AbstractCondition, Argmin, FixedPoint, KKTSolution, Root
from blackbox_diff.deq import DEQ, fixed_point_layer
from blackbox_diff.engine import ImplicitOptions
from blackbox_diff.ode import odeint, solve_ivp_layer
from blackbox_diff.plugin import AbstractBackend, Compiled, backends, hookimpl, plugin_manager
from blackbox_diff.qp import QPLayer
from blackbox_diff.runtime import Executable
from blackbox_diff.tools import GradientReport, check_gradients, saved_tensor_bytes

try:
    __version__ = version("blackbox-diff")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AbstractBackend",
    "AbstractCondition",
    "Argmin",
    "BackendUnavailableError",
    "BlackBoxDiffError",
    "CertificationError",
    "DEQ",
    "DegenerateError",
    "Compiled",
    "Executable",
    "FixedPoint",
    "GradientReport",
    "ImplicitFunction",
    "ImplicitOptions",
    "InputError",
    "KKT",
    "KKTSolution",
    "LinearSolveError",
    "PluginError",
    "QPLayer",
    "Root",
    "SolverError",
    "backends",
    "check_gradients",
    "deq",
    "fixed_point_layer",
    "hookimpl",
    "implicit",
    "kkt",
    "layer",
    "linalg",
    "ode",
    "odeint",
    "plugin",
    "plugin_manager",
    "saved_tensor_bytes",
    "solve_ivp_layer",
]
