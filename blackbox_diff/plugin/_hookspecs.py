"""The hook specifications of blackbox_diff: the whole plugin API, one hook.

A plugin is any module or object with a function decorated by `hookimpl` whose name is a hook below.
Third-party packages expose their plugin module through the entry-point group ``blackbox_diff``::

    [project.entry-points.blackbox_diff]
    mysolver = "my_pkg.bbd_plugin"

The built-in backends in ``plugins/`` are registered through the very same group. A plugin object can
also be registered at run time with ``bbd.plugin_manager().register(obj)``.

Each hook is documented in docs/plugins.md ("Hook reference"); a meta-test checks that every hook
declared here has a documented signature and a test.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from blackbox_diff.plugin._backend import AbstractBackend

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec", "register_backends"]

#: The pluggy project name, which is also the entry-point group plugins are published under.
PROJECT_NAME = "blackbox_diff"

#: Marker for hook specifications (used only in this module).
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Marker for hook implementations: decorate a plugin's ``register_backends`` with ``@bbd.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_backends(register: Callable[[AbstractBackend], None]) -> None:
    """Register the solver backends this plugin provides.

    Signature: ``register_backends(register: Callable[[AbstractBackend], None]) -> None``

    Called once per plugin each time the registry (re)builds its backend table: when ``bbd.backends()``,
    ``bbd.layer`` or ``get_backend`` first need it, and again after a plugin is registered or
    unregistered at run time. Call ``register(backend)`` once per backend instance. Backend names must be
    unique; when two plugins register the same name, the one called first wins (plugins registered at run
    time are called before entry-point plugins, so they can override a built-in backend) and the other is
    reported by ``bbd.plugin.plugin_errors()``.

    The hook must be cheap and must not import the backend's solver library: a backend whose library is
    missing is still registered and listed as unavailable (``AbstractBackend.available()``).

    Args:
        register: call it with an `AbstractBackend` instance. Anything else is reported as a plugin
            error (the rest of the plugin's registrations proceed).
    """
