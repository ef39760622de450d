"""A whole rig file: the settings, then each ``adapters:`` and ``sinks:`` entry.

Each entry names a registered ``type``; its other keys (besides ``name`` and
``tags``, and a sink's ``upload``) are validated against that type's
``Options`` class, declared in the adapter's or sink's own module. A sink's
``upload:`` rules are validated against :class:`~plexus.upload_rules.UploadRules`.
"""

from __future__ import annotations

import builtins
import difflib
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, PrivateAttr

from plexus.config.options import field_specs, safe_repr, validate_into
from plexus.config.problems import (
    INVALID,
    ConfigErrors,
    ConfigProblem,
    Where,
    describe_value,
    expected,
)
from plexus.config.settings import GatewaySettings
from plexus.config.yamlfile import read_yaml
from plexus.upload_rules import UploadRules

__all__ = ["ComponentConfig", "RigConfig", "load_config", "load_config_text"]

log = logging.getLogger("plexus.config")


class ComponentConfig:
    """One validated entry of ``adapters:`` or ``sinks:``.

    Attributes:
        type: the registered type name (``type:`` in YAML, without an ``@package``).
        name: unique in the file; defaults to the type, then ``type-2``...
        tags: the entry's ``tags:``, added to its points.
        options: the built instance of ``cls.Options``.
        cls: the adapter or sink class registered for ``type``.
        line: the entry's line in the file.
        path: its key path (``adapters[2]``), for messages.
        upload: a sink's ``upload:`` rules, or None.
    """

    def __init__(self, type: str, name: str, tags: dict[str, str], options: Any,
                 cls: builtins.type, line: int, path: str = "",
                 upload: UploadRules | None = None) -> None:
        self.type = type
        self.name = name
        self.tags = tags
        self.options = options
        self.cls = cls
        self.line = line
        self.path = path
        self.upload = upload

    def problem(self, file: str, message: str) -> ConfigProblem:
        """A problem of this entry: ``file:line: adapters[2] (engine): message``."""
        label = f"{self.path} ({self.name})" if self.path else self.name
        return ConfigProblem(file, self.line, label, message)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComponentConfig) and vars(self) == vars(other)

    def __repr__(self) -> str:
        upload = "" if self.upload is None else f", upload={self.upload!r}"
        return (
            f"ComponentConfig(type={self.type!r}, name={self.name!r}, tags={self.tags!r}, "
            f"options={safe_repr(self.options)}, cls={self.cls.__qualname__}, line={self.line}"
            f"{upload})"
        )


class RigConfig(GatewaySettings):
    """A validated rig file: the top-level settings plus its adapters and sinks.

    ``path`` is the file it was read from (as named in messages); it is not a
    key of the file.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    adapters: list[Any] = Field(default_factory=list)
    sinks: list[Any] = Field(default_factory=list)
    path: str = Field(default="<string>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    def problem(self, key: str, message: str) -> ConfigProblem:
        """A problem of a top-level key, at its line (line 1 when it is not in the file)."""
        return ConfigProblem(self.path, self._lines.get(key, 1), key, message)


def _tags(value: Any, where: Where, problems: list[ConfigProblem]) -> Any:
    if value is INVALID:
        return INVALID
    if not isinstance(value, Mapping):
        problems.append(where.problem(expected(dict[str, str], value)))
        return INVALID
    ok = True
    for key, item in value.items():
        if not isinstance(key, str):
            problems.append(where.key(key).problem(expected(str, key)))
            ok = False
        elif item is INVALID:
            ok = False
        elif not isinstance(item, str):
            problems.append(where.key(key).problem(expected(str, item)))
            ok = False
    return dict(value) if ok else INVALID


# --------------------------------------------------------------------------
# Adapters and sinks

_COMPONENT_KEYS = ("type", "name", "tags")
_SINK_KEYS = (*_COMPONENT_KEYS, "upload")


@dataclass
class _Entry:
    type: str
    name: str | None
    tags: dict[str, str]
    options: Any
    cls: builtins.type
    where: Where
    upload: UploadRules | None = None


def _read_components(
    kind: str, value: Any, registry: Mapping[str, type], where: Where,
    problems: list[ConfigProblem],
) -> list[_Entry]:
    if value is None or value is INVALID:
        return []
    if not isinstance(value, list):
        problems.append(where.problem(
            f"expected a list of {kind}s (each a mapping with a 'type' key), "
            f"got {describe_value(value)}"))
        return []
    entries = [_read_component(kind, item, registry, where.index(i), problems)
               for i, item in enumerate(value)]
    return [entry for entry in entries if entry is not None]


def _read_component(
    kind: str, item: Any, registry: Mapping[str, type], where: Where,
    problems: list[ConfigProblem],
) -> _Entry | None:
    if item is INVALID:
        return None
    if not isinstance(item, Mapping):
        problems.append(where.problem(
            f"expected a mapping with a 'type' key, got {describe_value(item)}"))
        return None
    cls = _component_class(kind, item, registry, where, problems)
    name = _component_name(item, where, problems)
    tags = _tags(item.get("tags", {}), where.key("tags"), problems)
    upload = None
    if kind == "sink" and item.get("upload") is not None:
        upload = validate_into(UploadRules, item["upload"], where.key("upload"), problems)
    if cls is None:
        return None
    reserved = _SINK_KEYS if kind == "sink" else _COMPONENT_KEYS
    options = validate_into(cls.Options, item, where, problems, reserved=reserved)  # type: ignore[attr-defined]
    if any(value is INVALID for value in (name, tags, options, upload)):
        return None
    # ``bme280@plexus-bme280sim`` chose a package; the entry's type is the bare name.
    return _Entry(item["type"].partition("@")[0], name, tags, options, cls, where, upload)


def _component_name(item: Mapping[str, Any], where: Where, problems: list[ConfigProblem]) -> Any:
    if "name" not in item:
        return None
    name = item["name"]
    if name is INVALID:
        return INVALID
    if not isinstance(name, str):
        problems.append(where.key("name").problem(expected(str, name)))
        return INVALID
    if name == "":
        problems.append(where.key("name").problem("must not be empty"))
        return INVALID
    return name


def _component_class(
    kind: str, item: Mapping[str, Any], registry: Mapping[str, type], where: Where,
    problems: list[ConfigProblem],
) -> type | None:
    if "type" not in item:
        problems.append(where.problem(f"missing required key 'type' (the {kind} type: "
                                      f"{_known(registry)})"))
        return None
    type_name = item["type"]
    if type_name is INVALID:
        return None
    if not isinstance(type_name, str):
        problems.append(where.key("type").problem(expected(str, type_name)))
        return None
    cls = registry.get(type_name)
    if cls is None:
        # A plugin registry explains a name two packages share, or a wrong @package.
        explain = getattr(registry, "explain", None)
        message = explain(type_name) if explain is not None else None
        if message is None:
            message = f"unknown {kind} type {type_name!r}; known types: {_known(registry)}"
            close = difflib.get_close_matches(type_name, list(registry), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        problems.append(where.key("type").problem(message))
    return cls


def _known(registry: Mapping[str, type]) -> str:
    return ", ".join(sorted(registry)) or "none are registered"


def _assign_names(entries: list[_Entry], problems: list[ConfigProblem]) -> None:
    """Check explicit names are unique, then give the others ``type``, ``type-2``..."""
    taken: dict[str, int] = {}
    for entry in entries:
        if entry.name is None:
            continue
        name_where = entry.where.key("name")
        if entry.name in taken:
            problems.append(name_where.problem(
                f"duplicate name {entry.name!r} (already used on line {taken[entry.name]}); "
                "names must be unique across adapters and sinks"))
        else:
            taken[entry.name] = name_where.line
    # Explicit names are all known before any default is chosen, so a default
    # never takes a name the user wrote further down.
    for entry in entries:
        if entry.name is None:
            entry.name = _free_name(entry.type, taken)
            taken[entry.name] = entry.where.line


def _free_name(type_name: str, taken: Mapping[str, int]) -> str:
    if type_name not in taken:
        return type_name
    number = 2
    while f"{type_name}-{number}" in taken:
        number += 1
    return f"{type_name}-{number}"


def _component(entry: _Entry) -> ComponentConfig:
    assert entry.name is not None
    return ComponentConfig(entry.type, entry.name, entry.tags, entry.options, entry.cls,
                           entry.where.line, entry.where.path, entry.upload)


def _check_held_data(settings: Any, sinks: list[_Entry], problems: list[ConfigProblem]) -> None:
    """Held data must survive a restart and a long hold: the persistent buffer only."""
    if settings is INVALID or settings.buffer.type != "memory":
        return
    for entry in sinks:
        if entry.upload is not None and entry.upload.hold:
            problems.append(entry.where.key("upload").key("hold").problem(
                "holding data needs the persistent buffer: add buffer: {type: sqlite} (the "
                "memory buffer keeps 10,000 points and loses them on exit, so a hold would "
                "quietly turn into dropping the oldest)"))


# --------------------------------------------------------------------------
# Entry points


def load_config(
    path: str | os.PathLike[str],
    *,
    adapter_types: Mapping[str, type],
    sink_types: Mapping[str, type],
    environ: Mapping[str, str] | None = None,
) -> RigConfig:
    """Load, interpolate and validate the rig file at ``path``.

    Parameters:
        path: the YAML file; messages name it as given.
        adapter_types: registered adapter classes by ``type`` name; each has
            an ``Options`` class (a dataclass or a pydantic model).
        sink_types: the same for sinks.
        environ: the variables for ``${...}``; default ``os.environ``.

    Raises:
        ConfigErrors: (a ConfigError) the file cannot be read or parsed, or
            breaks the schema; every problem is listed, one per line.

    Logs a warning (logger ``plexus.config``) when the file holds a literal
    ``api_key`` and other users may read it.
    """
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigErrors([ConfigProblem(file, 0, "", f"cannot read the rig file: {reason}")]) \
            from exc
    config, literal_key = _load(text, file, adapter_types, sink_types, environ)
    if literal_key:
        _warn_if_readable(file)
    return config


def load_config_text(
    text: str,
    filename: str = "<string>",
    *,
    adapter_types: Mapping[str, type],
    sink_types: Mapping[str, type],
    environ: Mapping[str, str] | None = None,
) -> RigConfig:
    """Like :func:`load_config` for YAML already in memory; ``filename`` names it in messages."""
    return _load(text, filename, adapter_types, sink_types, environ)[0]


def _load(
    text: str,
    file: str,
    adapter_types: Mapping[str, type],
    sink_types: Mapping[str, type],
    environ: Mapping[str, str] | None,
) -> tuple[RigConfig, bool]:
    """The config, and whether it holds a literal api_key (not from the environment)."""
    secret_paths = {name for name, spec in field_specs(GatewaySettings).items() if spec.secret}
    doc = read_yaml(text, file, os.environ if environ is None else environ, secret_paths)
    data, problems = doc.data, doc.problems
    where = Where(file, doc.root_line, "", doc.lines)
    settings = validate_into(GatewaySettings, data, where, problems,
                             reserved=("adapters", "sinks"))
    entries = (_read_components("adapter", data.get("adapters"), adapter_types,
                                where.key("adapters"), problems))
    sink_entries = _read_components("sink", data.get("sinks"), sink_types,
                                    where.key("sinks"), problems)
    _assign_names(entries + sink_entries, problems)
    _check_held_data(settings, sink_entries, problems)
    if problems or settings is INVALID:
        raise ConfigErrors(problems)

    values = {name: getattr(settings, name) for name in GatewaySettings.model_fields}
    config = RigConfig.model_construct(**values, adapters=[_component(e) for e in entries],
                                       sinks=[_component(e) for e in sink_entries], path=file)
    config._lines = dict(doc.lines)
    literal_key = bool(config.api_key) and "api_key" not in doc.from_environment
    return config, literal_key


def _warn_if_readable(file: str) -> None:
    if os.name != "posix":
        return  # permission bits mean nothing useful elsewhere
    try:
        mode = os.stat(file).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "%s holds an api_key and can be read by other users (%s); run 'chmod 600 %s', "
            "or write api_key: ${PLEXUS_API_KEY} and set it in the environment",
            file, stat.filemode(mode), file,
        )
