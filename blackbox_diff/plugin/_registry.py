"""The plugin manager: a typed pluggy manager that knows the solver backends.

Plugins come from the entry-point group ``blackbox_diff`` and from run-time registration
(``bbd.plugin_manager().register(obj)``, or `registered` for the length of a ``with`` block). There is one
loading path: the built-in backends are entry points of blackbox-diff's own distribution, declared in its
pyproject exactly like a third-party plugin, and come only through them (an editable or a wheel install);
when none is found, the errors that name a missing backend say so and how to install. Loading is lazy (the
first call that needs the registry), happens once per process, and is thread-safe. A plugin that fails to
import, or registers something invalid, is recorded in `plugin_errors()` (and, for a failed import, listed
by `backends()` as unavailable) and warned about; it never breaks ``import blackbox_diff`` or the other
plugins.

Environment: ``BLACKBOX_DIFF_DISABLE_PLUGINS`` = ``1`` / ``all`` skips every third-party entry point (the
built-in backends, those of the distribution blackbox-diff, still load); a comma-separated list of
entry-point names (``mysolver,casadi``) skips exactly those, built-in or not. Read when the registry first
loads (`reload_plugins` reads it again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import pluggy

from blackbox_diff._errors import PluginError
from blackbox_diff.plugin import _hookspecs
from blackbox_diff.plugin._backend import AbstractBackend

__all__ = [
    "DISABLE_ENV",
    "BackendInfo",
    "PluginFailure",
    "PluginManager",
    "backends",
    "find_backend",
    "get_backend",
    "plugin_errors",
    "plugin_manager",
    "registered",
    "reload_plugins",
]

#: The environment variable that disables entry-point plugins (read when the registry loads).
DISABLE_ENV = "BLACKBOX_DIFF_DISABLE_PLUGINS"
GROUP = _hookspecs.PROJECT_NAME
#: The distribution whose entry points are the built-in backends.
DISTRIBUTION = "blackbox-diff"


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of ``blackbox-diff plugins``.

    Attributes:
        name: the backend's registry key (``bbd.layer(..., backend=name)``).
        package: the distribution (or top-level module) that provides it.
        available: whether its solver library is importable.
        problem_types: what it accepts, in words.
        returns_duals: whether its solutions carry multipliers.
        error: why it is unavailable (missing library and the pip hint, or the plugin's import error).
    """

    name: str
    package: str
    available: bool
    problem_types: str
    returns_duals: bool
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to load or registered something invalid (a row of `plugin_errors()`).

    Attributes:
        plugin: the plugin's name (its entry-point name, or the name it was registered under).
        package: the distribution (or top-level module) that provides it.
        error: what went wrong, e.g. ``"import failed: ModuleNotFoundError: ..."``.
    """

    plugin: str
    package: str
    error: str


@dataclasses.dataclass
class _Entry:
    backend: AbstractBackend
    package: str


def _entry_points() -> list[Any]:
    """The installed entry points of the group (tests monkeypatch this)."""
    return list(importlib.metadata.entry_points(group=GROUP))


def _disabled() -> tuple[bool, set[str]]:
    raw = os.environ.get(DISABLE_ENV, "").strip()
    if raw.lower() in ("", "0", "false", "no"):
        return False, set()
    if raw.lower() in ("1", "all", "true", "yes"):
        return True, set()
    return False, {part.strip() for part in raw.split(",") if part.strip()}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


def _package_of(plugin: Any) -> str:
    """The distribution that installed a run-time plugin's top-level module, else that module's name."""
    module = getattr(plugin, "__name__", None) if isinstance(plugin, type(os)) else type(plugin).__module__
    top = (module or "?").split(".")[0]
    dists = _distributions().get(top) or [top]
    return dists[0]


def _dist_of(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    return getattr(dist, "name", None)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager for project ``blackbox_diff``, with a typed backend table on top.

    Every hook call goes through `backend_table`, which calls each plugin's ``register_backends``
    separately so that one faulty plugin cannot hide the others' backends.
    """

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.add_hookspecs(_hookspecs)
        self._lock = threading.RLock()
        self._table: dict[str, _Entry] | None = None
        self._load_errors: list[PluginFailure] = []
        self._build_errors: list[PluginFailure] = []
        self._packages: dict[str, str] = {}
        self._builtins_found = True  # whether blackbox-diff's own entry points were found (set on loading)

    # --- registration ---------------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register a plugin object or module (pluggy's `register`); the backend table is rebuilt."""
        with self._lock:
            result = super().register(plugin, name)
            if result is not None and result not in self._packages:
                self._packages[result] = _package_of(plugin)
            self._table = None
            return result

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        """Unregister a plugin (pluggy's `unregister`); the backend table is rebuilt."""
        with self._lock:
            name = name if name is not None else self.get_name(plugin)
            result = super().unregister(plugin, name)
            self._packages.pop(name, None)
            self._table = None
            return result

    def load_entry_points(self, entry_points: Iterable[Any] | None = None) -> None:
        """Import and register every plugin of the entry-point group (honouring the disable variable).

        The built-in backends come through the same group, as entry points of the distribution
        blackbox-diff; there is no other way in. Where none of them is found (blackbox_diff imported from
        a checkout that was never pip-installed), `get_backend` and `find_backend` say so in their errors.

        Args:
            entry_points: objects with ``name``, ``value``, ``dist`` and ``load()`` (what
                ``importlib.metadata.entry_points`` returns); None lists the installed ones.
        """
        everything, names = _disabled()
        eps = list(_entry_points() if entry_points is None else entry_points)
        self._builtins_found = any(_normalise(_dist_of(ep) or "") == DISTRIBUTION for ep in eps)
        for ep in eps:
            package = _dist_of(ep) or ep.value.split(":")[0].split(".")[0]
            builtin = _normalise(package) == DISTRIBUTION
            if ep.name in names or (everything and not builtin):
                continue
            self.load_entry_point(ep, package)

    def load_entry_point(self, ep: Any, package: str | None = None) -> str | None:
        """Import the plugin an entry point names and register it under the entry point's name.

        A failure is recorded (`failures`) and warned about, never raised. Returns the plugin's name, or
        None when it failed to load (or a plugin of that name is already registered).
        """
        name = ep.name
        package = package or _dist_of(ep) or ep.value.split(":")[0].split(".")[0]
        if self.has_plugin(name):
            return None
        try:
            plugin = ep.load()
            self._packages[name] = package
            self.register(plugin, name=name)
        except Exception as err:  # noqa: BLE001 - a broken plugin must never break the package
            self._packages.pop(name, None)
            failure = PluginFailure(name, package, f"import failed: {type(err).__name__}: {err}")
            self._load_errors.append(failure)
            warnings.warn(
                f"blackbox_diff plugin {name!r} (package {package!r}) failed to load and is disabled: "
                f"{type(err).__name__}: {err}. Reinstall or fix the package, or disable it with "
                f"{DISABLE_ENV}={name}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return name

    # --- the backend table ------------------------------------------------------------------------
    def backend_table(self) -> dict[str, _Entry]:
        """name -> (backend, package), in the order plugins are called (run-time plugins first)."""
        with self._lock:
            if self._table is None:
                self._table, self._build_errors = self._build()
                for failure in self._build_errors:
                    warnings.warn(
                        f"blackbox_diff plugin {failure.plugin!r} (package {failure.package!r}): {failure.error}",
                        RuntimeWarning,
                        stacklevel=4,
                    )
            return self._table

    def _build(self) -> tuple[dict[str, _Entry], list[PluginFailure]]:
        table: dict[str, _Entry] = {}
        errors: list[PluginFailure] = []
        # pluggy calls the last-registered implementation first; keep that order.
        for impl in reversed(self.hook.register_backends.get_hookimpls()):
            plugin_name = impl.plugin_name
            package = self._packages.get(plugin_name) or _package_of(impl.plugin)

            def register(backend: Any, _plugin=plugin_name, _package=package) -> None:
                problem = _check_backend(backend)
                if problem is None and backend.name in table:
                    problem = (
                        f"backend name {backend.name!r} is already registered by package "
                        f"{table[backend.name].package!r}; this registration is ignored. Pick a unique name."
                    )
                if problem is not None:
                    errors.append(PluginFailure(_plugin, _package, problem))
                    return
                table[backend.name] = _Entry(backend, _package)

            try:
                impl.function(register=register)
            except Exception as err:  # noqa: BLE001 - one faulty plugin must not hide the others
                errors.append(
                    PluginFailure(plugin_name, package, f"register_backends raised {type(err).__name__}: {err}")
                )
        return table, errors

    def failures(self) -> list[PluginFailure]:
        """Load failures plus the problems found while building the backend table."""
        self.backend_table()
        return [*self._load_errors, *self._build_errors]


def _check_backend(backend: Any) -> str | None:
    if not isinstance(backend, AbstractBackend):
        return (
            f"register_backends registered a {type(backend).__name__}, expected an instance of "
            "bbd.AbstractBackend (subclass it and pass an instance, not the class)."
        )
    if not isinstance(backend.name, str) or not backend.name:
        return f"backend {type(backend).__name__} has no name; set the class attribute name = '...'."
    return None


_MANAGER: PluginManager | None = None
_MANAGER_LOCK = threading.Lock()


def plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created and loaded from entry points on first use.

    ``bbd.plugin_manager().register(obj)`` registers a plugin at run time.
    """
    global _MANAGER
    manager = _MANAGER
    if manager is not None:
        return manager
    with _MANAGER_LOCK:
        if _MANAGER is None:
            manager = PluginManager()
            manager.load_entry_points()
            _MANAGER = manager
        return _MANAGER


def reload_plugins() -> None:
    """Forget the loaded plugins: the next call that needs the registry lists the entry points and imports
    them again (e.g. after installing a plugin, or changing ``BLACKBOX_DIFF_DISABLE_PLUGINS``).

    Plugins registered at run time are forgotten too.
    """
    global _MANAGER
    with _MANAGER_LOCK:
        _MANAGER = None


@contextlib.contextmanager
def registered(*plugins: Any) -> Iterator[PluginManager]:
    """Register plugins for the length of a ``with`` block (tests), then unregister them.

    ``with bbd.plugin.registered(MyPlugin()): ...`` makes the plugin's backends visible to `bbd.layer`,
    `bbd.backends` and the rest inside the block. Each plugin is an object or a module with
    ``@bbd.hookimpl`` functions, or an entry point (``importlib.metadata.EntryPoint(name, "my_pkg.plugin",
    "blackbox_diff")``), which is loaded exactly as an installed one would be: a module that fails to import
    is listed by `plugin_errors()` inside the block, not raised. Run-time plugins are called before
    entry-point plugins, so a plugin registered here may replace a built-in backend of the same name.

    Yields:
        The process-wide plugin manager.

    Raises:
        PluginError: a plugin is already registered (unregister it first, or use it as it is).
    """
    manager = plugin_manager()
    names: list[str] = []
    with manager._lock:
        before = len(manager._load_errors)
    try:
        for plugin in plugins:
            if hasattr(plugin, "load") and hasattr(plugin, "value") and hasattr(plugin, "name"):
                if manager.has_plugin(plugin.name):
                    raise PluginError(
                        f"A plugin named {plugin.name!r} is already registered; registered() cannot register the "
                        f"entry point {plugin.value!r} under the same name. Unregister it first."
                    )
                name = manager.load_entry_point(plugin)
            else:
                if manager.is_registered(plugin):
                    raise PluginError(
                        f"{plugin!r} is already registered (as {manager.get_name(plugin)!r}); registered() "
                        "registers a plugin that is not yet registered. Unregister it first."
                    )
                name = manager.register(plugin)
            if name is not None:
                names.append(name)
        yield manager
    finally:
        for name in names:
            if manager.has_plugin(name):
                manager.unregister(name=name)
        with manager._lock:
            del manager._load_errors[before:]
            manager._table = None


def _info(name: str, entry: _Entry) -> BackendInfo:
    backend = entry.backend
    try:
        available = bool(backend.available())
        error = None
        if not available:
            try:
                backend.require()
            except Exception as err:  # noqa: BLE001 - the message is the point
                error = str(err)
            else:
                error = "unavailable"
    except Exception as err:  # noqa: BLE001 - a faulty backend is reported, not fatal
        available, error = False, f"available() raised {type(err).__name__}: {err}"
    return BackendInfo(
        name=name,
        package=entry.package,
        available=available,
        problem_types=str(backend.problem_types or ""),
        returns_duals=bool(backend.returns_duals),
        error=error,
    )


def backends() -> list[BackendInfo]:
    """Every registered backend (and every plugin that failed to import), sorted by name."""
    manager = plugin_manager()
    rows = [_info(name, entry) for name, entry in manager.backend_table().items()]
    listed = {row.name for row in rows}
    for failure in manager._load_errors:
        if failure.plugin not in listed:
            rows.append(BackendInfo(failure.plugin, failure.package, False, "", False, failure.error))
    return sorted(rows, key=lambda row: row.name)


def plugin_errors() -> list[PluginFailure]:
    """Plugins that failed to import or registered something invalid (each was also warned about)."""
    return plugin_manager().failures()


def _describe(table: dict[str, _Entry]) -> str:
    if not table:
        return "no backends are registered"
    return "; ".join(f"{name!r} accepts {e.backend.problem_types or '?'}" for name, e in table.items())


def get_backend(name: str) -> AbstractBackend:
    """The backend registered under `name`.

    Raises:
        PluginError: no backend has that name (the message lists the registered ones).
    """
    manager = plugin_manager()
    table = manager.backend_table()
    if name not in table:
        failed = [f.plugin for f in manager._load_errors]
        hint = f" Plugins that failed to load: {failed}." if failed else ""
        raise PluginError(
            f"No backend named {name!r}. Registered backends: {sorted(table)}.{hint}{_not_installed(manager)} "
            "Install the plugin that provides it, or register one with bbd.plugin_manager().register(plugin)."
        )
    return table[name].backend


def _not_installed(manager: PluginManager) -> str:
    """The sentence for a registry without blackbox-diff's own entry points ('' when they were found)."""
    if manager._builtins_found:
        return ""
    return (
        f" No entry point of the distribution {DISTRIBUTION!r} was found in the group {GROUP!r}, so the built-in "
        "backends are not registered: blackbox_diff is imported without being installed (a checkout on "
        "PYTHONPATH?). Install it: pip install -e . in the checkout, or pip install the wheel."
    )


def find_backend(problem: Any) -> AbstractBackend:
    """The first available backend whose ``accepts(problem)`` is true.

    Raises:
        BackendUnavailableError: only an unavailable backend accepts it (the message has the pip hint).
        PluginError: no backend accepts it (the message lists what each backend accepts).
    """
    table = plugin_manager().backend_table()
    unavailable = []
    for entry in table.values():
        try:
            accepted = bool(entry.backend.accepts(problem))
        except Exception:  # noqa: BLE001 - a backend that cannot judge the problem does not accept it
            accepted = False
        if not accepted:
            continue
        if entry.backend.available():
            return entry.backend
        unavailable.append(entry.backend)
    if unavailable:
        unavailable[0].require()
    raise PluginError(
        f"No registered backend accepts a {type(problem).__module__}.{type(problem).__qualname__}. "
        f"Registered: {_describe(table)}.{_not_installed(plugin_manager())} Pass a problem one of them accepts, "
        "name one with backend=..., or install/register a plugin for this problem type."
    )
