"""The plugin manager: finds plugins, collects the adapter and sink types they register.

Plugins are modules named in the ``plexus`` entry-point group; the built-ins
(``plexus.builtins``) are one of them. ``PLEXUS_DISABLE_PLUGINS=name,...``
blocks plugins by entry-point name. A plugin that fails to import, has a hook
with no matching spec, or registers a bad type is reported (in
``Registry.errors`` and the log) and skipped; the others still load.

Two packages registering one type name never decide it by load order:

- two plugins: the bare name (``type: bme280``) belongs to neither. A rig
  that uses it gets an error naming both packages, and chooses with
  ``type: bme280@plexus-bme280sim`` (the package's name, as pip spells it);
- a plugin and a built-in: the bare name stays the built-in, and the
  plugin's type is reached only as ``type: file@plexus-fancyfile``, so a
  built-in is replaced only on purpose.

Either way ``Registry.warnings`` says so, ``plexus-gateway plugins`` lists
both registrations, and ``--check`` shows the warning.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
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


BUILTIN_PLUGIN = "builtins"


@dataclass(frozen=True)
class Provider:
    """Where a registered type comes from."""

    plugin: str  # entry-point name
    package: str  # distribution name
    version: str

    @property
    def builtin(self) -> bool:
        return self.plugin == BUILTIN_PLUGIN and self.package == "plexus-gateway"


def normalize_package(name: str) -> str:
    """A distribution name as pip compares it: ``Plexus_BME280.sim`` -> ``plexus-bme280-sim``."""
    return re.sub(r"[-_.]+", "-", name).lower()


class TypeTable(Mapping[str, type]):
    """The adapter (or sink) types of a registry, by the name a rig file writes.

    A bare name (``bme280``) finds the type when one package registers it, or
    the built-in when a plugin registers a built-in's name too. ``name@package``
    finds the type of that package. Iterating gives the bare names that
    resolve; a name two plugins registered is left out (see :meth:`explain`).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._by_name: dict[str, list[tuple[type, Provider]]] = {}

    def add(self, cls: type, provider: Provider) -> str | None:
        """Add a registration; a problem (the same package registering a name twice) or None."""
        name: str = cls.type_name  # type: ignore[attr-defined]
        found = self._by_name.setdefault(name, [])
        for _other, other in found:
            if normalize_package(other.package) == normalize_package(provider.package):
                return f"{self.kind} type {name!r} is registered twice by {provider.package}"
        found.append((cls, provider))
        return None

    def _resolve(self, name: str) -> tuple[type, Provider] | None:
        bare, sep, package = name.partition("@")
        found = self._by_name.get(bare, [])
        if sep:
            wanted = normalize_package(package)
            return next((item for item in found if normalize_package(item[1].package) == wanted
                         or item[1].plugin == package), None)
        if len(found) == 1:
            return found[0]
        return next((item for item in found if item[1].builtin), None)

    def __getitem__(self, name: str) -> type:
        item = self._resolve(name)
        if item is None:
            raise KeyError(name)
        return item[0]

    def __iter__(self) -> Iterator[str]:
        return iter([name for name in self._by_name if self._resolve(name) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._resolve(name) is not None

    def provider(self, name: str) -> Provider | None:
        """The package behind ``name`` (bare or ``name@package``), or None."""
        item = self._resolve(name)
        return None if item is None else item[1]

    def registrations(self) -> list[tuple[str, type, Provider]]:
        """Every registration, duplicates included: (bare name, class, provider)."""
        return [(name, cls, provider) for name, found in self._by_name.items()
                for cls, provider in found]

    def shared_names(self) -> dict[str, list[Provider]]:
        """Names more than one package registered, with their providers."""
        return {name: [provider for _cls, provider in found]
                for name, found in self._by_name.items() if len(found) > 1}

    def qualified(self) -> dict[str, type]:
        """``name@package`` for every registration of a shared name."""
        return {f"{name}@{provider.package}": cls
                for name, found in self._by_name.items() if len(found) > 1
                for cls, provider in found}

    def explain(self, name: str) -> str | None:
        """Why ``name`` finds no type, when it is not simply unknown; else None."""
        bare, sep, package = name.partition("@")
        found = self._by_name.get(bare, [])
        if not found:
            return None
        packages = " and ".join(p.package for _cls, p in found)
        choices = " or ".join(f"'type: {bare}@{p.package}'" for _cls, p in found)
        if sep:
            return (f"no installed package {package!r} registers {self.kind} type {bare!r} "
                    f"(it comes from {packages})")
        count = "two" if len(found) == 2 else str(len(found))
        return (f"{self.kind} type {bare!r} is registered by {count} packages, {packages}; "
                f"write {choices} to choose (or uninstall one)")


@dataclass
class Registry:
    """Every adapter and sink type the loaded plugins registered."""

    adapters: TypeTable = field(default_factory=lambda: TypeTable("adapter"))
    sinks: TypeTable = field(default_factory=lambda: TypeTable("sink"))
    #: (kind, bare type name) -> the package a bare name resolves to
    providers: dict[tuple[str, str], Provider] = field(default_factory=dict)
    plugins: dict[str, Provider] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: shared type names: not errors until a rig uses the bare name
    warnings: list[str] = field(default_factory=list)
    #: (provider, hook implementation) of each plugin's plexus_register_commands.
    command_hooks: list[tuple[Provider, Any]] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, type, package, version) for every registration (shared names twice), sorted."""
        out = []
        for kind, table in (("adapter", self.adapters), ("sink", self.sinks)):
            for name, _cls, provider in table.registrations():
                out.append((kind, name, provider.package, provider.version))
        return sorted(out)


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
    into: TypeTable,
) -> None:
    # Call each plugin's hook on its own so every registration is tied to its
    # plugin (for `plexus-gateway plugins`) and one raising plugin cannot stop
    # the others.
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        provider = registry.plugins[impl.plugin_name]

        def register(cls: Any, provider: Provider = provider) -> None:
            problem = _check_type(cls, base, kind) or into.add(cls, provider)
            if problem:
                _report(registry, f"plugin {provider.plugin!r} ({provider.package}): {problem}; "
                                  "skipped")

        try:
            impl.function(register=register)
        except Exception as exc:
            _report(registry, f"plugin {provider.plugin!r} ({provider.package}) raised in "
                              f"{hook_name}: {type(exc).__name__}: {exc}")
    for name in into:
        found = into.provider(name)
        assert found is not None
        registry.providers[(kind, name)] = found
    for name, providers in sorted(into.shared_names().items()):
        builtin = next((p for p in providers if p.builtin), None)
        if builtin is not None:
            others = [p for p in providers if not p.builtin]
            message = (f"{kind} type {name!r} is built in and also registered by "
                       f"{' and '.join(p.package for p in others)}: 'type: {name}' stays the "
                       "built-in; write " + " or ".join(f"'type: {name}@{p.package}'"
                                                        for p in others)
                       + " to use the plugin's")
        else:
            message = into.explain(name) or ""
            message += "; a rig file that writes the bare name is refused"
        registry.warnings.append(message)
        log.warning("%s", message)


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
