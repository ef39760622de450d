"""The plugin manager: finds plugins, collects the adapter and sink types they register.

Plugins are modules named in the ``plexus`` entry-point group; the built-ins
(``plexus.builtins``) are one of them. ``PLEXUS_DISABLE_PLUGINS=name,...``
blocks plugins by entry-point name. A plugin that fails to import, has a hook
with no matching spec, or registers a bad or duplicate type is reported (in
``Registry.errors`` and the log) and skipped; the others still load.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from plexus import hookspecs
from plexus.adapters.base import Adapter
from plexus.sinks.base import Sink

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "plexus"
DISABLE_ENV = "PLEXUS_DISABLE_PLUGINS"
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Provider:
    """Where a registered type comes from."""

    plugin: str  # entry-point name
    package: str  # distribution name
    version: str


@dataclass
class Registry:
    """Every adapter and sink type the loaded plugins registered."""

    adapters: dict[str, type[Adapter]] = field(default_factory=dict)
    sinks: dict[str, type[Sink]] = field(default_factory=dict)
    providers: dict[tuple[str, str], Provider] = field(default_factory=dict)  # (kind, type)
    plugins: dict[str, Provider] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: (provider, hook implementation) of each plugin's plexus_register_commands.
    command_hooks: list[tuple[Provider, Any]] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, type, package, version) for every registered type, sorted."""
        out = []
        for (kind, name), provider in sorted(self.providers.items()):
            out.append((kind, name, provider.package, provider.version))
        return out


def disabled_plugins() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def load_plugins(
    extra: dict[str, ModuleType | Callable[[], ModuleType]] | None = None,
) -> Registry:
    """Discover entry-point plugins and collect the types they register.

    ``extra`` adds plugins by name without an entry point: a module, or a
    function returning one (called like an entry point's ``load``).
    """
    registry = Registry()
    blocked = disabled_plugins()
    pm = pluggy.PluginManager("plexus")
    pm.add_hookspecs(hookspecs)

    candidates: list[tuple[str, Provider, Callable[[], Any]]] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        provider = Provider(ep.name, dist.name if dist else "?", dist.version if dist else "?")
        candidates.append((ep.name, provider, ep.load))
    if not any(name == "builtins" for name, _, _ in candidates):
        # Running from a source tree that was never pip-installed.
        from plexus import __version__

        candidates.append((
            "builtins", Provider("builtins", "plexus-gateway", __version__),
            lambda: importlib.import_module("plexus.builtins"),
        ))
    for name, module in (extra or {}).items():
        loader = module if callable(module) else (lambda m=module: m)
        candidates.append((name, Provider(name, getattr(module, "__name__", name), "?"), loader))

    for name, provider, load in candidates:
        if name in blocked:
            registry.disabled.append(name)
            log.info("plugin %r is disabled by %s", name, DISABLE_ENV)
            continue
        if name in registry.plugins:
            registry.errors.append(f"plugin {name!r} ({provider.package}): the name is taken "
                                   f"by {registry.plugins[name].package}; skipped")
            continue
        try:
            module = load()
            pm.register(module, name=name)
        except Exception as exc:
            _report(registry, f"plugin {name!r} ({provider.package}) failed to load: "
                              f"{type(exc).__name__}: {exc}")
            continue
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=name)
            _report(registry, f"plugin {name!r} ({provider.package}) is invalid: {exc}")
            continue
        registry.plugins[name] = provider

    _collect(pm, registry, "adapter", "plexus_register_adapters", Adapter, registry.adapters)
    _collect(pm, registry, "sink", "plexus_register_sinks", Sink, registry.sinks)
    # Commands need the running gateway, so they are collected when one is built.
    registry.command_hooks = [(registry.plugins[impl.plugin_name], impl)
                              for impl in pm.hook.plexus_register_commands.get_hookimpls()]
    return registry


def collect_commands(registry: Registry, register: Callable[[Any], None],
                     control: Any) -> list[str]:
    """Call every plugin's ``plexus_register_commands``; return the problems found.

    ``register`` raises (TypeError/ValueError) for a bad or duplicate command;
    that command is skipped and reported, the plugin's others still count.
    """
    problems: list[str] = []
    for provider, impl in registry.command_hooks:
        def checked(cmd: Any, provider: Provider = provider) -> None:
            try:
                register(cmd)
            except (TypeError, ValueError) as exc:
                message = f"plugin {provider.plugin!r} ({provider.package}): {exc}; skipped"
                problems.append(message)
                log.error("%s", message)

        kwargs = {"register": checked, "control": control}
        try:
            impl.function(**{name: kwargs[name] for name in impl.argnames if name in kwargs})
        except Exception as exc:
            message = (f"plugin {provider.plugin!r} ({provider.package}) raised in "
                       f"plexus_register_commands: {type(exc).__name__}: {exc}")
            problems.append(message)
            log.error("%s", message)
    return problems


def _collect(
    pm: pluggy.PluginManager,
    registry: Registry,
    kind: str,
    hook_name: str,
    base: type,
    into: dict[str, Any],
) -> None:
    # Call each plugin's hook on its own so every registration is tied to its
    # plugin (for `plexus-gateway plugins`) and one raising plugin cannot stop
    # the others.
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        provider = registry.plugins[impl.plugin_name]

        def register(cls: Any, provider: Provider = provider) -> None:
            problem = _check_type(cls, base, kind)
            if problem is None and cls.type_name in into:
                other = registry.providers[(kind, cls.type_name)]
                problem = (f"{kind} type {cls.type_name!r} is already registered by "
                           f"{other.package}")
            if problem:
                _report(registry, f"plugin {provider.plugin!r} ({provider.package}): {problem}; "
                                  "skipped")
                return
            into[cls.type_name] = cls
            registry.providers[(kind, cls.type_name)] = provider

        try:
            impl.function(register=register)
        except Exception as exc:
            _report(registry, f"plugin {provider.plugin!r} ({provider.package}) raised in "
                              f"{hook_name}: {type(exc).__name__}: {exc}")


def _check_type(cls: Any, base: type, kind: str) -> str | None:
    if not isinstance(cls, type) or not issubclass(cls, base):
        return f"{cls!r} is not a subclass of {base.__module__}.{base.__name__}"
    name = getattr(cls, "type_name", "")
    if not isinstance(name, str) or not _TYPE_NAME.match(name):
        return (f"{cls.__name__}.type_name {name!r} must be snake_case "
                "(lower-case letters, digits, '_')")
    options = getattr(cls, "Options", None)
    if not (dataclasses.is_dataclass(options) or hasattr(options, "model_fields")):
        return (f"{cls.__name__}.Options must be a dataclass or a pydantic model of its "
                f"{kind}'s options")
    return None


def _report(registry: Registry, message: str) -> None:
    registry.errors.append(message)
    log.error("%s", message)
