"""The plugin author's API: everything a backend needs, the built-in backends included.

A backend subclasses `AbstractBackend` (with its own `BackendOptions` model), compiles a problem into a
`Compiled` (reading declared shapes with `parse_shapes`), and is registered by a module whose
``register_backends`` hook is marked with `hookimpl` and named by an entry point of the group
``blackbox_diff``. The registry functions below list, find and (for tests) temporarily register
backends; `blackbox_diff.testing` checks a backend against the contract; `blackbox_diff.kkt` holds the
active-set tools of KKT-based backends. A condition's ``prepare`` turns the black box's answer into
tensors of the parameters' dtype and device with `answer_dtype_device` and `owned_tensor`; a numpy
``certify`` reads tensors with `float64_numpy`, and may run its loops compiled with `Kernel` (numba, when
installed: the ``fast`` extra; `use_kernels` switches kernels off, e.g. to test the numpy path).

The built-in backends (``plugins/blackbox_diff_*``) import nothing else from blackbox_diff than these
public names, so a third-party backend can do whatever they do.
"""

from __future__ import annotations

from blackbox_diff.engine import answer_dtype_device, float64_numpy, owned_tensor
from blackbox_diff.linalg import KERNELS_ENV, Kernel, kernels_enabled, use_kernels
from blackbox_diff.plugin._backend import AbstractBackend, BackendOptions, Compiled, parse_shapes
from blackbox_diff.plugin._hookspecs import PROJECT_NAME, hookimpl
from blackbox_diff.plugin._registry import (
    DISABLE_ENV,
    BackendInfo,
    PluginFailure,
    PluginManager,
    backends,
    find_backend,
    get_backend,
    plugin_errors,
    plugin_manager,
    registered,
    reload_plugins,
)

#: The entry-point group (and pluggy project name) plugins are published under.
ENTRY_POINT_GROUP = PROJECT_NAME

__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "KERNELS_ENV",
    "AbstractBackend",
    "BackendInfo",
    "BackendOptions",
    "Compiled",
    "Kernel",
    "PluginFailure",
    "PluginManager",
    "answer_dtype_device",
    "backends",
    "find_backend",
    "float64_numpy",
    "get_backend",
    "hookimpl",
    "kernels_enabled",
    "owned_tensor",
    "parse_shapes",
    "plugin_errors",
    "plugin_manager",
    "registered",
    "reload_plugins",
    "use_kernels",
]
