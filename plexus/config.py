"""The gateway's YAML rig file: load it, interpolate ``${ENV}``, validate it.

A rig file is one YAML mapping. Top-level keys are the gateway's settings
(see :class:`GatewaySettings`, or ``describe_options(GatewaySettings)``);
``adapters`` and ``sinks`` are lists of entries, each naming a registered
``type`` plus that type's options::

    source_id: rover-7
    api_key: ${PLEXUS_API_KEY}          # keep the key out of the file
    tags: {vehicle: rover-7}
    buffer: {type: sqlite}
    batch: {size: 500, interval: 2}
    adapters:
      - type: mqtt                      # a registered adapter type (required)
        name: telemetry                 # optional, unique in the file; default: the type
        tags: {bus: main}               # optional tags for this adapter's points
        host: ${MQTT_HOST:-localhost}   # every other key is an option of the type
        port: ${MQTT_PORT:-1883}        # a plain, whole ${...} is re-typed: the int 1883
    sinks:                              # optional; empty means the gateway's default
      - type: stdout
        upload: {max_bytes_per_s: 20000}   # sinks only: upload rules (plexus.upload_rules)

Interpolation, in every string value (keys are never interpolated):
``${NAME}`` is the environment variable (an error when unset),
``${NAME:-default}`` falls back to ``default`` when it is unset or empty (as
in the shell), and ``$${`` is a literal ``${``. A plain (unquoted) scalar that
is exactly one ``${...}`` is then typed like any YAML scalar, so ``1883``
becomes an int and ``true`` a bool; a quoted one stays a string. Inside a
flow mapping (``{...}``) YAML reads ``{`` as syntax, so a reference there must
be quoted (and so stays a string): use block style for typed references.

Errors never stop at the first: every problem in the file is collected and
raised as one :class:`ConfigErrors`, one problem per line, each in the form
``{file}:{line}: {key path}: {problem}``::

    rig.yaml:14: adapters[2].interval: expected a number, got 'fast'

Option types come from dataclasses (an adapter's or sink's ``Options``);
:func:`build_options` validates a mapping against one. A field's
``metadata`` may carry ``help`` (documentation), ``check`` (a callable that
returns a problem string or ``None``, e.g. :func:`greater_than`) and
``secret`` (its value is never shown in errors or reprs).
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime
import difflib
import functools
import logging
import os
import re
import stat
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from plexus.control import CommandsConfig
from plexus.errors import ConfigError
from plexus.upload_rules import UploadRules

log = logging.getLogger(__name__)

__all__ = [
    "BatchConfig",
    "BufferConfig",
    "Check",
    "ComponentConfig",
    "ConfigErrors",
    "ConfigProblem",
    "GatewaySettings",
    "RetryConfig",
    "RigConfig",
    "Where",
    "at_least",
    "between",
    "build_options",
    "describe_options",
    "greater_than",
    "load_config",
    "load_config_text",
    "one_of",
]


# --------------------------------------------------------------------------
# Problems and where they are


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config: ``{file}:{line}: {path}: {message}``."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        if self.path:
            return f"{self.file}:{self.line}: {self.path}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class ConfigErrors(ConfigError):
    """Every problem found in one config; the message lists them, one per line.

    Attributes:
        errors: the :class:`ConfigProblem` list, in line order.
    """

    def __init__(self, errors: Iterable[ConfigProblem]) -> None:
        # Sorting is stable, so problems on one line keep the order found.
        self.errors = sorted(errors, key=lambda problem: problem.line)
        super().__init__("\n".join(str(problem) for problem in self.errors))


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _join_key(path: str, key: object) -> str:
    text = str(key)
    if not _PLAIN_KEY.match(text):
        # Keys such as tag names may hold dots or spaces; brackets keep the
        # path unambiguous and readable.
        return f"{path}[{text!r}]"
    return f"{path}.{text}" if path else text


@dataclass(frozen=True)
class Where:
    """A place in a config file: file name, 1-based line and key path.

    ``lines`` maps key paths (``adapters[2].interval``) to their lines; a
    child not in it inherits its parent's line, so a bare ``Where(file)``
    works for a mapping built in code.
    """

    file: str
    line: int = 1
    path: str = ""
    lines: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def key(self, key: object) -> Where:
        return self._child(_join_key(self.path, key))

    def index(self, index: int) -> Where:
        return self._child(f"{self.path}[{index}]")

    def problem(self, message: str) -> ConfigProblem:
        return ConfigProblem(self.file, self.line, self.path, message)

    def _child(self, path: str) -> Where:
        return Where(self.file, self.lines.get(path, self.line), path, self.lines)


class _Invalid:
    """A value already reported as wrong; it must not be reported again."""

    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Any = _Invalid()


# --------------------------------------------------------------------------
# Field checks (metadata={"check": ...})

Check = Callable[[Any], "str | None"]


def greater_than(limit: float) -> Check:
    """A check that the number is strictly greater than ``limit``."""

    def check(value: Any) -> str | None:
        return None if value > limit else f"must be greater than {limit:g}, got {value!r}"

    return check


def at_least(limit: float) -> Check:
    """A check that the number is at least ``limit``."""

    def check(value: Any) -> str | None:
        return None if value >= limit else f"must be at least {limit:g}, got {value!r}"

    return check


def between(low: float, high: float) -> Check:
    """A check that ``low <= value <= high``."""

    def check(value: Any) -> str | None:
        if low <= value <= high:
            return None
        return f"must be between {low:g} and {high:g}, got {value!r}"

    return check


def one_of(*choices: str) -> Check:
    """A case-insensitive check that a string is one of ``choices``."""

    def check(value: Any) -> str | None:
        if value.lower() in choices:
            return None
        return f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def _meta(help: str, *, check: Check | None = None, secret: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"help": help}
    if check is not None:
        meta["check"] = check
    if secret:
        meta["secret"] = True
    return meta


# --------------------------------------------------------------------------
# Describing types and values in messages

_SCALAR_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """A reader's name for a type hint: ``list of strings``, ``integer or null``."""
    if tp is Any:
        return "any value"
    if tp in _SCALAR_NAMES:
        return _SCALAR_NAMES[tp]
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is list or tp is list:
        return f"list of {_plural(args[0] if args else Any)}"
    if origin is dict or tp is dict:
        key, value = args if args else (Any, Any)
        return f"mapping of {_plural(key)} to {_plural(value)}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", repr(tp))


def _plural(tp: Any) -> str:
    if tp is Any:
        return "values"
    if tp in _SCALAR_NAMES and tp is not type(None):
        return _SCALAR_NAMES[tp] + "s"
    if dataclasses.is_dataclass(tp):
        return "mappings"
    return f"values ({_type_name(tp)})"


def _a(name: str) -> str:
    if name.startswith(("one of", "any ", "null")):
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    for tp in (str, int, float):
        if isinstance(value, tp):
            return _SCALAR_NAMES[tp]
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "date"
    return type(value).__name__


def _describe_value(value: Any, secret: bool = False) -> str:
    """The value as a message shows it; a secret shows only its kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if secret:
        return f"{_a(_kind(value))} (value hidden)"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return _a(_kind(value))


def _accepts_str(tp: Any) -> bool:
    return tp is str or (_is_union(tp) and str in get_args(tp))


def _expected(tp: Any, value: Any, secret: bool = False) -> str:
    message = f"expected {_a(_type_name(tp))}, got {_describe_value(value, secret)}"
    if _accepts_str(tp) and isinstance(value, (bool, int, float, datetime.date)):
        # YAML reads `yes`, `12` or `2024-05-01` as non-strings; quoting fixes it.
        message += " (quote it to make it a string)"
    return message


# --------------------------------------------------------------------------
# Schema validation against dataclasses


@functools.cache
def _option_fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Name -> (field, resolved type hint) of a dataclass's init fields."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass; options must be declared as one")
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def build_options(cls: type, mapping: Any, where: Where) -> Any:
    """Validate ``mapping`` against the dataclass ``cls`` and build an instance.

    Parameters:
        cls: a dataclass; its fields are the allowed keys, fields without a
            default are required, and type hints say what each accepts.
        mapping: the values, usually a mapping read from YAML.
        where: where ``mapping`` is in its file, for error messages.

    Raises:
        ConfigErrors: listing every problem found (unknown or missing keys,
            wrong types, failed checks, a ``ValueError`` from ``__post_init__``).
        TypeError: ``cls`` is not a dataclass or uses an unsupported type hint.
    """
    problems: list[ConfigProblem] = []
    result = _build(cls, mapping, where, problems)
    if problems:
        raise ConfigErrors(problems)
    return result


def _build(
    cls: type,
    mapping: Any,
    where: Where,
    problems: list[ConfigProblem],
    reserved: tuple[str, ...] = (),
) -> Any:
    """Like build_options, adding to ``problems``; ``reserved`` keys are skipped."""
    if mapping is _INVALID:
        return _INVALID
    fields = _option_fields(cls)
    if not isinstance(mapping, Mapping):
        problems.append(where.problem(_expected(cls, mapping)))
        return _INVALID
    found = len(problems)
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        if key in reserved:
            continue
        if key not in fields:
            problems.append(_unknown_key(key, [*fields, *reserved], where.key(key)))
            continue
        kwargs[key] = _convert_field(fields[key][0], fields[key][1], value, where.key(key), problems)
    for name, (f, _) in fields.items():
        if name not in mapping and not _has_default(f):
            problems.append(where.problem(f"missing required key {name!r}"))
    if len(problems) > found or any(value is _INVALID for value in kwargs.values()):
        return _INVALID
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ cross-checks; ConfigError is a ValueError
        problems.append(where.problem(str(exc)))
        return _INVALID


def _unknown_key(key: object, allowed: Iterable[str], where: Where) -> ConfigProblem:
    names = sorted(allowed)
    message = f"unknown key; allowed keys: {', '.join(names)}"
    close = difflib.get_close_matches(str(key), names, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return where.problem(message)


def _convert_field(
    f: dataclasses.Field[Any], tp: Any, value: Any, where: Where, problems: list[ConfigProblem]
) -> Any:
    secret = bool(f.metadata.get("secret"))
    converted = _convert(tp, value, where, problems, secret)
    check = f.metadata.get("check")
    if check is not None and converted is not _INVALID and converted is not None:
        message = check(converted)
        if message is not None:
            problems.append(where.problem("the value (hidden) is invalid" if secret else message))
            return _INVALID
    return converted


def _convert(
    tp: Any, value: Any, where: Where, problems: list[ConfigProblem], secret: bool = False
) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (converted) or _INVALID."""
    if value is _INVALID or tp is Any:
        return value
    origin = get_origin(tp)
    if _is_union(tp):
        return _convert_union(tp, value, where, problems, secret)
    if origin is Literal:
        return _convert_literal(tp, value, where, problems)
    if origin is list or tp is list:
        return _convert_list(tp, value, where, problems, secret)
    if origin is dict or tp is dict:
        return _convert_dict(tp, value, where, problems, secret)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)  # type: ignore[arg-type]
    if tp in _SCALAR_NAMES:
        return _convert_scalar(tp, value, where, problems, secret)
    raise TypeError(f"unsupported option type {tp!r}")


def _convert_scalar(
    tp: Any, value: Any, where: Where, problems: list[ConfigProblem], secret: bool
) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and is_number:
        return float(value)
    ok = (
        (tp is int and is_number and isinstance(value, int))
        or (tp is bool and isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp is type(None) and value is None)
    )
    if ok:
        return value
    problems.append(where.problem(_expected(tp, value, secret)))
    return _INVALID


def _convert_union(
    tp: Any, value: Any, where: Where, problems: list[ConfigProblem], secret: bool
) -> Any:
    members = get_args(tp)
    for member in members:
        scratch: list[ConfigProblem] = []
        converted = _convert(member, value, where, scratch, secret)
        if not scratch:
            return converted
    # When only one member has the value's shape (a mapping for a dataclass,
    # a list for a list), its detailed problems say more than "expected A or B".
    shaped = [member for member in members if _same_shape(member, value)]
    if len(shaped) == 1:
        return _convert(shaped[0], value, where, problems, secret)
    problems.append(where.problem(_expected(tp, value, secret)))
    return _INVALID


def _same_shape(tp: Any, value: Any) -> bool:
    origin = get_origin(tp)
    if isinstance(value, list):
        return origin is list or tp is list
    if isinstance(value, Mapping):
        return origin is dict or tp is dict or dataclasses.is_dataclass(tp)
    return False


def _convert_literal(tp: Any, value: Any, where: Where, problems: list[ConfigProblem]) -> Any:
    choices = get_args(tp)
    # Compare types too: True == 1 must not satisfy Literal[1].
    if any(type(value) is type(choice) and value == choice for choice in choices):
        return value
    message = _expected(tp, value)
    close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
    if isinstance(value, str) and close:
        message += f" (did you mean {close[0]!r}?)"
    problems.append(where.problem(message))
    return _INVALID


def _convert_list(
    tp: Any, value: Any, where: Where, problems: list[ConfigProblem], secret: bool
) -> Any:
    if not isinstance(value, list):
        problems.append(where.problem(_expected(tp, value, secret)))
        return _INVALID
    item_tp = get_args(tp)[0] if get_args(tp) else Any
    items = [
        _convert(item_tp, item, where.index(i), problems, secret) for i, item in enumerate(value)
    ]
    return _INVALID if any(item is _INVALID for item in items) else items


def _convert_dict(
    tp: Any, value: Any, where: Where, problems: list[ConfigProblem], secret: bool
) -> Any:
    if not isinstance(value, Mapping):
        problems.append(where.problem(_expected(tp, value, secret)))
        return _INVALID
    key_tp, value_tp = get_args(tp) if get_args(tp) else (Any, Any)
    result: dict[Any, Any] = {}
    for key, item in value.items():
        item_where = where.key(key)
        result[_convert(key_tp, key, item_where, problems)] = _convert(
            value_tp, item, item_where, problems, secret
        )
    if any(item is _INVALID for pair in result.items() for item in pair):
        return _INVALID
    return result


def describe_options(cls: type) -> list[tuple[str, str, str, str]]:
    """Document a dataclass of options: ``(name, type, default, help)`` rows.

    Nested dataclass fields are flattened into dotted names (``buffer.type``);
    a field without a default shows ``required``.
    """
    rows: list[tuple[str, str, str, str]] = []
    for name, (f, tp) in _option_fields(cls).items():
        if dataclasses.is_dataclass(tp):
            nested = describe_options(tp)  # type: ignore[arg-type]
            rows.extend((f"{name}.{sub}", *rest) for sub, *rest in nested)  # type: ignore[misc]
            continue
        rows.append((name, _type_name(tp), _describe_default(f), f.metadata.get("help", "")))
    return rows


def _describe_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None or isinstance(value, bool):
        return _describe_value(value)
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _safe_repr(obj: Any) -> str:
    """A dataclass repr that shows ``'***'`` for fields marked secret."""
    parts = []
    for f in dataclasses.fields(obj):
        if not f.repr:
            continue
        value = getattr(obj, f.name)
        if f.metadata.get("secret") and value is not None:
            shown = "'***'"
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            shown = _safe_repr(value)
        else:
            shown = repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------------
# The top-level schema


@dataclass
class BufferConfig:
    """Where points wait until a sink has acknowledged them."""

    type: Literal["memory", "sqlite"] = field(
        default="memory",
        metadata=_meta("'memory' (a ring, lost on exit) or 'sqlite' (survives restarts). "
                       "Default: memory."),
    )
    path: str | None = field(
        default=None,
        metadata=_meta("The SQLite file. Default: null, chosen by the gateway "
                       "(~/.plexus/buffer/<source_id>.db)."),
    )
    max_points: int | None = field(
        default=None,
        metadata=_meta("Cap on buffered points (see when_full). Default: null, the buffer's "
                       "own (10,000 in memory; in sqlite no practical limit, max_bytes "
                       "governs).", check=at_least(1)),
    )
    max_bytes: int | None = field(
        default=None,
        metadata=_meta("sqlite only: cap on stored bytes (compressed, about 7 bytes a "
                       "point). Default: null, 2 GiB.", check=at_least(1)),
    )
    when_full: Literal["block", "drop_oldest"] = field(
        default="block",
        metadata=_meta("What a full buffer does: 'block' makes sources wait for room while "
                       "the sink delivers, and drops the oldest points only while delivery "
                       "fails; 'drop_oldest' never waits. Default: block."),
    )
    sync_interval: float = field(
        default=1.0,
        metadata=_meta("sqlite only: seconds between fsyncs, the most a power cut can lose. "
                       "Default: 1.0.", check=greater_than(0)),
    )


@dataclass
class BatchConfig:
    """How buffered points are grouped into uploads."""

    size: int = field(
        default=1000,
        metadata=_meta("This many waiting points start an upload at once. Default: 1000.",
                       check=at_least(1)),
    )
    interval: float = field(
        default=1.0,
        metadata=_meta("Otherwise upload every this many seconds. Default: 1.0.",
                       check=greater_than(0)),
    )
    max_points: int = field(
        default=10000,
        metadata=_meta("Most points in one request (the platform accepts up to 10,000). "
                       "Default: 10000.", check=between(1, 10000)),
    )


@dataclass
class RetryConfig:
    """Backoff for a batch that failed to send: base, 2*base, 4*base... +-25%."""

    retries: int = field(
        default=3,
        metadata=_meta("Retries of a failed batch before it waits for the next send. "
                       "Default: 3.", check=at_least(0)),
    )
    base: float = field(
        default=1.0,
        metadata=_meta("Seconds before the first retry, doubled each time. Default: 1.0.",
                       check=greater_than(0)),
    )
    max_delay: float = field(
        default=30.0,
        metadata=_meta("Longest wait between retries, in seconds. Default: 30.0.",
                       check=greater_than(0)),
    )


@dataclass
class LocalReceiverConfig:
    """A Plexus-compatible receiver started inside the gateway (demos, bench rigs)."""

    enabled: bool = field(
        default=False,
        metadata=_meta("Start the bundled receiver (plexus.testing) and send to it instead "
                       "of the platform. Default: false."),
    )
    port: int = field(
        default=0,
        metadata=_meta("Its port on 127.0.0.1; 0 picks a free one. Default: 0.",
                       check=between(0, 65535)),
    )


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(repr=False)
class GatewaySettings:
    """The rig file's top-level settings (everything but ``adapters`` and ``sinks``)."""

    source_id: str | None = field(
        default=None,
        metadata=_meta("This gateway's id on the platform. Default: null, then "
                       "PLEXUS_SOURCE_ID, ~/.plexus/config.json, or a generated id."),
    )
    api_key: str | None = field(
        default=None,
        metadata=_meta("The platform API key, normally ${PLEXUS_API_KEY}. Default: null, "
                       "then PLEXUS_API_KEY or ~/.plexus/config.json.", secret=True),
    )
    gateway_url: str | None = field(
        default=None,
        metadata=_meta("Base URL of the platform. Default: null, then PLEXUS_GATEWAY_URL, "
                       "~/.plexus/config.json, or https://gateway.plexus.company."),
    )
    tags: dict[str, str] = field(
        default_factory=dict,
        metadata=_meta("Tags added to every point. Default: {}."),
    )
    buffer: BufferConfig = field(
        default_factory=BufferConfig, metadata=_meta("Buffer settings.")
    )
    batch: BatchConfig = field(default_factory=BatchConfig, metadata=_meta("Batch settings."))
    retry: RetryConfig = field(default_factory=RetryConfig, metadata=_meta("Retry settings."))
    session: str | None = field(
        default=None,
        metadata=_meta("A session id tagging every point of the whole run. Default: null "
                       "(no session)."),
    )
    session_tags: dict[str, str] = field(
        default_factory=dict,
        metadata=_meta("Tags of that session. Default: {}."),
    )
    grace_period: float = field(
        default=5.0,
        metadata=_meta("Seconds allowed at shutdown to deliver what is buffered. Default: 5.0.",
                       check=at_least(0)),
    )
    log_level: str = field(
        default="info",
        metadata=_meta("debug, info, warning, error or critical. Default: info.",
                       check=one_of(*_LOG_LEVELS)),
    )
    status_interval: float = field(
        default=10.0,
        metadata=_meta("Seconds between status reports. Default: 10.0.",
                       check=greater_than(0)),
    )
    verify_tls: bool = field(
        default=True,
        metadata=_meta("Verify the platform's TLS certificate. Default: true."),
    )
    timeout: float = field(
        default=10.0,
        metadata=_meta("Seconds allowed per HTTP request. Default: 10.0.",
                       check=greater_than(0)),
    )
    local_receiver: LocalReceiverConfig = field(
        default_factory=LocalReceiverConfig,
        metadata=_meta("A local receiver for running without a Plexus account (demo)."),
    )
    commands: CommandsConfig = field(
        default_factory=CommandsConfig,
        metadata=_meta("Remote commands from the dashboard (docs/commands.md)."),
    )

    def __post_init__(self) -> None:
        self.log_level = self.log_level.lower()

    def __repr__(self) -> str:
        return _safe_repr(self)


@dataclass(repr=False)
class ComponentConfig:
    """One validated entry of ``adapters:`` or ``sinks:``.

    Attributes:
        type: the registered type name (``type:`` in YAML).
        name: unique in the file; defaults to the type, then ``type-2``...
        tags: the entry's ``tags:``, added to its points.
        options: the built instance of ``cls.Options``.
        cls: the adapter or sink class registered for ``type``.
        line: the entry's line in the file.
        upload: a sink's ``upload:`` rules, or None.
    """

    type: str
    name: str
    tags: dict[str, str]
    options: Any
    cls: builtins.type  # "type" alone would mean the field above
    line: int
    upload: UploadRules | None = None

    def __repr__(self) -> str:
        options = (
            _safe_repr(self.options) if dataclasses.is_dataclass(self.options)
            else repr(self.options)
        )
        upload = "" if self.upload is None else f", upload={self.upload!r}"
        return (
            f"ComponentConfig(type={self.type!r}, name={self.name!r}, tags={self.tags!r}, "
            f"options={options}, cls={self.cls.__qualname__}, line={self.line}{upload})"
        )


@dataclass(repr=False)
class RigConfig(GatewaySettings):
    """A validated rig file: the top-level settings plus its adapters and sinks."""

    adapters: list[ComponentConfig] = field(
        default_factory=list,
        metadata=_meta("Sources: each a mapping with type, optional name and tags, "
                       "and the type's options."),
    )
    sinks: list[ComponentConfig] = field(
        default_factory=list,
        metadata=_meta("Destinations, written like adapters. Default: [], the gateway's "
                       "default sink."),
    )
    path: str = field(
        default="<string>",
        metadata=_meta("The file the config was read from (as named in messages)."),
    )


# --------------------------------------------------------------------------
# Reading YAML with line marks and interpolation

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"

# "$${" (escape), "${...}" (reference), or a "${" that is never closed.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_NAME_DEFAULT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?\Z", re.DOTALL)
_WHOLE_REFERENCE = re.compile(r"\$\{[^}]*\}\Z")


class _Loader(yaml.SafeLoader):
    """A SafeLoader that remembers which scalars carried an explicit tag.

    An explicitly tagged scalar (``!!str ${PORT}``) must keep its tag after
    interpolation instead of being re-typed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.explicitly_tagged: set[int] = set()

    def compose_scalar_node(self, anchor: dict[Any, yaml.Node]) -> yaml.ScalarNode:
        tag = self.peek_event().tag  # type: ignore[attr-defined]
        node = super().compose_scalar_node(anchor)
        if tag is not None:
            self.explicitly_tagged.add(id(node))
        return node


_TOO_DEEP = "the file is nested too deeply to be a rig file"
# A rig file has hundreds of values; aliases nested in each other can make a
# 400-byte file expand to hundreds of millions.
_MAX_VALUES = 100_000


class _TooBig(Exception):
    pass


class _Reader:
    """Turns composed nodes into plain values, noting each key path's line.

    Problems (interpolation, bad tags, duplicate keys) are collected, and the
    value concerned becomes _INVALID so schema checks stay quiet about it.
    """

    def __init__(
        self, loader: _Loader, file: str, environ: Mapping[str, str], secret_paths: set[str]
    ) -> None:
        self.loader = loader
        self.file = file
        self.environ = environ
        self.secret_paths = secret_paths
        self.lines: dict[str, int] = {}
        self.problems: list[ConfigProblem] = []
        #: key paths whose value came wholly from one environment variable
        self.from_environment: set[str] = set()
        self._open: set[int] = set()
        self._values = 0

    def problem(self, path: str, line: int, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, line, path, message))

    def read(self, node: yaml.Node, path: str, line: int) -> Any:
        self._values += 1
        if self._values > _MAX_VALUES:  # an alias bomb: refuse before it eats the memory
            raise _TooBig
        if id(node) in self._open:
            self.problem(path, line, "an alias refers to a mapping or list that contains it")
            return _INVALID
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path, line)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path, line)
            return self._scalar(node, path, line)  # type: ignore[arg-type]
        finally:
            self._open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: str, line: int) -> Any:
        if node.tag != _MAP_TAG:
            self.problem(path, line, f"unsupported YAML tag {node.tag!r}")
            return _INVALID
        written = {id(key_node) for key_node, _ in node.value}
        self.loader.flatten_mapping(node)  # applies "<<: *anchor" merges like SafeLoader
        result: dict[Any, Any] = {}
        written_keys: set[Any] = set()
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(path, key_line, "a key must be a plain value, not a list or mapping")
                continue
            key = self._construct(key_node, path, key_line)
            if key is _INVALID:
                continue
            child = _join_key(path, key)
            # A key written here overrides one merged in by "<<" (merged pairs
            # come first); the same key written twice is a mistake.
            if key in written_keys:
                self.problem(child, key_line,
                             f"duplicate key (first given on line {self.lines[child]})")
                continue
            if id(key_node) in written:
                written_keys.add(key)
            self.lines[child] = key_line
            result[key] = self.read(value_node, child, key_line)
        return result

    def _sequence(self, node: yaml.SequenceNode, path: str, line: int) -> Any:
        if node.tag != _SEQ_TAG:
            self.problem(path, line, f"unsupported YAML tag {node.tag!r}")
            return _INVALID
        items = []
        for index, item in enumerate(node.value):
            child = f"{path}[{index}]"
            self.lines[child] = item.start_mark.line + 1
            items.append(self.read(item, child, self.lines[child]))
        return items

    def _scalar(self, node: yaml.ScalarNode, path: str, line: int) -> Any:
        if node.tag == _STR_TAG and "$" in node.value:
            return self._interpolate(node, path, line)
        return self._construct(node, path, line)

    def _construct(self, node: yaml.ScalarNode, path: str, line: int) -> Any:
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            if path in self.secret_paths:
                self.problem(path, line, f"invalid value for YAML tag {node.tag!r}")
            else:
                detail = getattr(exc, "problem", None) or str(exc)
                self.problem(path, line, f"invalid YAML value: {detail}")
            return _INVALID

    def _interpolate(self, node: yaml.ScalarNode, path: str, line: int) -> Any:
        result = self._substitute(node.value, path, line)
        if result is None:
            return _INVALID
        text, used_default = result
        whole = bool(_WHOLE_REFERENCE.match(node.value))
        if whole and not used_default:
            self.from_environment.add(path)
        if whole and node.style is None and id(node) not in self.loader.explicitly_tagged:
            tag = self.loader.resolve(yaml.ScalarNode, text, (True, False))
            if tag != _STR_TAG:
                typed = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
                return self._construct(typed, path, line)
        return text

    def _substitute(self, raw: str, path: str, line: int) -> tuple[str, bool] | None:
        """``raw`` with references replaced, and whether a default was used; None on error."""
        out: list[str] = []
        position = 0
        used_default = False
        ok = True
        for match in _REFERENCE.finditer(raw):
            out.append(raw[position:match.start()])
            position = match.end()
            if match.group(0) == "$${":
                out.append("${")
                continue
            if match.group(1) is None:
                self.problem(path, line, "'${' is never closed by '}' (write $${ for a literal ${)")
                ok = False
                continue
            value = self._lookup(match.group(1), path, line)
            if value is None:
                ok = False
                continue
            out.append(value[0])
            used_default = used_default or value[1]
        out.append(raw[position:])
        return ("".join(out), used_default) if ok else None

    def _lookup(self, reference: str, path: str, line: int) -> tuple[str, bool] | None:
        """The value of one ``NAME`` or ``NAME:-default``, and whether it is the default."""
        match = _NAME_DEFAULT.match(reference)
        if match is None or "${" in (match.group(2) or ""):
            # Show only the part before ":-": a default may be a literal secret.
            shown = "" if path in self.secret_paths else f" ${{{reference.split(':-')[0]}...}}"
            self.problem(path, line, f"invalid reference{shown}: expected ${{NAME}} or "
                                     "${NAME:-default} (defaults cannot nest references)")
            return None
        name, default = match.group(1), match.group(2)
        value = self.environ.get(name)
        if default is not None and not value:
            return default, True
        if value is None:
            self.problem(path, line, f"environment variable {name} is not set and has no "
                                     f"default (write ${{{name}:-default}} to give one)")
            return None
        return value, False


def _yaml_problem(file: str, text: str, exc: yaml.YAMLError) -> ConfigProblem:
    """Describe a YAML syntax error without quoting the file (it may hold the key)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        parts = [part for part in (exc.context, exc.problem) if part]
        detail = ": ".join(parts) or "cannot parse"
        return ConfigProblem(file, mark.line + 1, "",
                             f"invalid YAML: {detail} (column {mark.column + 1})")
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        code = ord(exc.character) if isinstance(exc.character, str) else exc.character
        return ConfigProblem(file, line, "", f"invalid YAML: {exc.reason} (character #x{code:04x})")
    return ConfigProblem(file, 1, "", f"invalid YAML: {exc}")


def _compose(text: str, file: str) -> tuple[_Loader, yaml.MappingNode]:
    try:
        loader = _Loader(text)  # checks for unprintable characters at once
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        # "from None": the YAML traceback says nothing the message does not.
        raise ConfigErrors([_yaml_problem(file, text, exc)]) from None
    except RecursionError:
        raise ConfigErrors([ConfigProblem(file, 1, "", _TOO_DEEP)]) from None
    if root is None:
        raise ConfigErrors([ConfigProblem(file, 1, "", "the file is empty; expected a mapping "
                                                       "of settings (key: value lines)")])
    if not isinstance(root, yaml.MappingNode):
        got = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise ConfigErrors([ConfigProblem(file, root.start_mark.line + 1, "",
                                          f"the top level must be a mapping of settings "
                                          f"(key: value lines), got {got}")])
    return loader, root


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
    if value is None or value is _INVALID:
        return []
    if not isinstance(value, list):
        problems.append(where.problem(
            f"expected a list of {kind}s (each a mapping with a 'type' key), "
            f"got {_describe_value(value)}"))
        return []
    entries = [_read_component(kind, item, registry, where.index(i), problems)
               for i, item in enumerate(value)]
    return [entry for entry in entries if entry is not None]


def _read_component(
    kind: str, item: Any, registry: Mapping[str, type], where: Where,
    problems: list[ConfigProblem],
) -> _Entry | None:
    if item is _INVALID:
        return None
    if not isinstance(item, Mapping):
        problems.append(where.problem(
            f"expected a mapping with a 'type' key, got {_describe_value(item)}"))
        return None
    cls = _component_class(kind, item, registry, where, problems)
    name = _component_name(item, where, problems)
    tags = _convert(dict[str, str], item.get("tags", {}), where.key("tags"), problems)
    upload = None
    if kind == "sink" and item.get("upload") is not None:
        upload = _build(UploadRules, item["upload"], where.key("upload"), problems)
    if cls is None:
        return None
    reserved = _SINK_KEYS if kind == "sink" else _COMPONENT_KEYS
    options = _build(cls.Options, item, where, problems, reserved=reserved)  # type: ignore[attr-defined]
    if any(value is _INVALID for value in (name, tags, options, upload)):
        return None
    return _Entry(item["type"], name, tags, options, cls, where, upload)


def _component_name(item: Mapping[str, Any], where: Where, problems: list[ConfigProblem]) -> Any:
    if "name" not in item:
        return None
    name = _convert(str, item["name"], where.key("name"), problems)
    if name == "":
        problems.append(where.key("name").problem("must not be empty"))
        return _INVALID
    return name


def _component_class(
    kind: str, item: Mapping[str, Any], registry: Mapping[str, type], where: Where,
    problems: list[ConfigProblem],
) -> type | None:
    if "type" not in item:
        problems.append(where.problem(f"missing required key 'type' (the {kind} type: "
                                      f"{_known(registry)})"))
        return None
    type_name = _convert(str, item["type"], where.key("type"), problems)
    if type_name is _INVALID:
        return None
    cls = registry.get(type_name)
    if cls is None:
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
                           entry.where.line, entry.upload)


def _check_held_data(settings: Any, sinks: list[_Entry], problems: list[ConfigProblem]) -> None:
    """Held data must survive a restart and a long hold: the persistent buffer only."""
    if settings is _INVALID or settings.buffer.type != "memory":
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
            an ``Options`` dataclass.
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
        raise ConfigErrors([ConfigProblem(file, 1, "", f"cannot read the config file: {reason}")]) \
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
    loader, root = _compose(text, file)
    secret_paths = {name for name, (f, _) in _option_fields(GatewaySettings).items()
                    if f.metadata.get("secret")}
    reader = _Reader(loader, file, os.environ if environ is None else environ, secret_paths)
    root_line = root.start_mark.line + 1
    try:
        data = reader.read(root, "", root_line)
    except yaml.YAMLError as exc:  # a bad "<<" merge, found while flattening
        raise ConfigErrors([*reader.problems, _yaml_problem(file, text, exc)]) from None
    except RecursionError:
        raise ConfigErrors([ConfigProblem(file, 1, "", _TOO_DEEP)]) from None
    except _TooBig:
        raise ConfigErrors([ConfigProblem(
            file, 1, "", f"the file expands to more than {_MAX_VALUES:,} values "
                         "(YAML aliases repeated inside each other?)")]) from None
    finally:
        loader.dispose()

    problems = reader.problems
    if not isinstance(data, dict):  # a tagged top level such as "--- !!omap"
        raise ConfigErrors(problems)
    where = Where(file, root_line, "", reader.lines)
    settings = _build(GatewaySettings, data, where, problems, reserved=("adapters", "sinks"))
    entries = (_read_components("adapter", data.get("adapters"), adapter_types,
                                where.key("adapters"), problems))
    sink_entries = _read_components("sink", data.get("sinks"), sink_types,
                                    where.key("sinks"), problems)
    _assign_names(entries + sink_entries, problems)
    _check_held_data(settings, sink_entries, problems)
    if problems or settings is _INVALID:
        raise ConfigErrors(problems)

    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(GatewaySettings)}
    config = RigConfig(**values, adapters=[_component(e) for e in entries],
                       sinks=[_component(e) for e in sink_entries], path=file)
    literal_key = bool(config.api_key) and "api_key" not in reader.from_environment
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
