"""Options classes: how an adapter, a sink or the gateway declares its settings.

An options class is either a **pydantic model** (subclass :class:`OptionsModel`)
or a **plain dataclass**; pydantic validates both. Either way:

- each field is a key of the rig-file entry; a field without a default is required;
- the type hint says what the key accepts (str, int, float, bool, ``X | None``,
  ``Literal[...]``, ``list[...]``, ``dict[str, ...]``, a nested options class);
- limits are declared on the type, where pydantic and the JSON Schema see them:
  ``Annotated[float, Gt(0)]`` (``annotated_types``), or ``Field(gt=0)`` in a model;
  a dataclass that must not import anything may write ``metadata={"gt": 0}``
  (also ``ge``, ``lt``, ``le``), checked once the types are right;
- help text is the model field's ``description``, or a dataclass field's
  ``metadata={"help": ...}``;
- ``secret`` (the value never appears in errors or reprs) and ``path`` (a file
  name, relative to the rig file) are ``json_schema_extra`` keys of a model
  field, or ``metadata`` keys of a dataclass field; :func:`option` writes both;
- cross-field rules go in a model validator or a dataclass ``__post_init__``
  raising ``ValueError``; the message is shown as written.

Validation is strict about scalar types, as an operator expects from a
config file: ``"1883"`` is not a port and ``1`` is not a boolean (YAML already
typed each value). Every problem in an entry is reported, each with its line
and key path (see :func:`build_options`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic.fields import FieldInfo
from pydantic_core import SchemaValidator

from plexus.config.problems import (
    INVALID,
    ConfigErrors,
    ConfigProblem,
    Where,
    describe_value,
    expected,
    is_options_class,
    is_union,
    strip_annotated,
)
from plexus.errors import InvalidOptions

__all__ = [
    "Check",
    "FieldSpec",
    "OptionsModel",
    "at_least",
    "between",
    "build_options",
    "describe_options",
    "field_specs",
    "greater_than",
    "one_of",
    "option",
    "safe_repr",
]


class OptionsModel(BaseModel):
    """Base of options declared as a pydantic model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=False)

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        specs = field_specs(type(self))
        for name, value in super().__repr_args__():
            spec = specs.get(name or "")
            if spec is not None and spec.secret and value is not None:
                yield name, "***"
            else:
                yield name, value


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    secret: bool = False,
    path: bool = False,
    default_factory: Callable[[], Any] | None = None,
    **constraints: Any,
) -> Any:
    """A field of an :class:`OptionsModel`: ``option(1.0, help="seconds", gt=0)``.

    ``constraints`` are pydantic's (``gt``, ``ge``, ``lt``, ``le``,
    ``min_length``, ``max_length``, ``pattern``).
    """
    extra: dict[str, Any] = {}
    if secret:
        extra["secret"] = True
    if path:
        extra["path"] = True
    kwargs: dict[str, Any] = {"description": help or None, "json_schema_extra": extra or None,
                              **constraints}
    if default_factory is not None:
        return Field(default_factory=default_factory, **kwargs)
    if default is dataclasses.MISSING:
        return Field(**kwargs)
    return Field(default, **kwargs)


# --------------------------------------------------------------------------
# Legacy checks: metadata={"check": greater_than(0)} on a dataclass field.
# They still work (run after pydantic has built the object); new code puts
# limits on the type, where the JSON Schema and `options` show them.

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


# --------------------------------------------------------------------------
# One view of a field, whichever way it was declared


@dataclass(frozen=True)
class FieldSpec:
    """A field of an options class as the loader, the docs and the schema see it."""

    name: str
    annotation: Any  # with Annotated[...] stripped
    required: bool
    default: Any  # a default_factory's product
    help: str
    secret: bool
    path: bool
    limits: dict[str, float]  # gt, ge, lt, le
    check: Check | None = None
    lengths: dict[str, int] = dataclasses.field(default_factory=dict)  # min_length, max_length


def _limits(metadata: Iterable[Any]) -> dict[str, float]:
    limits: dict[str, float] = {}
    for item in metadata:
        if isinstance(item, annotated_types.Interval):
            for name in ("gt", "ge", "lt", "le"):
                if getattr(item, name) is not None:
                    limits[name] = getattr(item, name)
            continue
        for name in ("gt", "ge", "lt", "le"):
            value = getattr(item, name, None)
            if value is not None and isinstance(value, (int, float)):
                limits[name] = value
        if isinstance(item, FieldInfo):
            limits.update(_limits(item.metadata))
    return limits


def _lengths(metadata: Iterable[Any]) -> dict[str, int]:
    """min_length/max_length of a string or list (``MinLen(1)``, ``Len(1, 1)``, ``Field``)."""
    out: dict[str, int] = {}
    for item in metadata:
        for name in ("min_length", "max_length"):
            value = getattr(item, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
        if isinstance(item, FieldInfo):
            out.update(_lengths(item.metadata))
    if out.get("min_length") == 0:
        del out["min_length"]
    return out


def _union_limits(tp: Any) -> dict[str, float]:
    """Limits written inside an optional type: ``Annotated[int, Ge(1)] | None``."""
    if not is_union(tp):
        return {}
    for member in get_args(tp):
        limits = _limits(_annotated_parts(member)[1])
        if limits:
            return limits
    return {}


def _annotated_parts(tp: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while get_origin(tp) is not None and hasattr(tp, "__metadata__"):
        metadata.extend(tp.__metadata__)
        tp = get_args(tp)[0]
    return tp, metadata


@functools.cache
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """Name -> :class:`FieldSpec` of an options class (a dataclass or a pydantic model).

    Raises:
        TypeError: ``cls`` is neither.
    """
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return {name: _model_field(name, info) for name, info in cls.model_fields.items()}
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass or pydantic model; options must be "
                        "declared as one")
    hints = get_type_hints(cls, include_extras=True)
    specs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, metadata = _annotated_parts(hints[f.name])
        help_text = f.metadata.get("help", "")
        for item in metadata:
            if isinstance(item, FieldInfo) and item.description and not help_text:
                help_text = item.description
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        specs[f.name] = FieldSpec(
            f.name, tp, required, default, help_text, bool(f.metadata.get("secret")),
            bool(f.metadata.get("path")),
            {**(_limits(metadata) or _union_limits(tp)), **_metadata_limits(f.metadata)},
            f.metadata.get("check") or _limit_check(f.metadata), _lengths(metadata))
    return specs


_LIMIT_KEYS: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "gt": ("greater than", lambda v, x: v > x), "ge": ("at least", lambda v, x: v >= x),
    "lt": ("less than", lambda v, x: v < x), "le": ("at most", lambda v, x: v <= x)}


def _metadata_limits(metadata: Mapping[str, Any]) -> dict[str, float]:
    return {key: metadata[key] for key in _LIMIT_KEYS if key in metadata}


def _limit_check(metadata: Mapping[str, Any]) -> Check | None:
    """A check for limits written in a dataclass field's metadata (``{"gt": 0}``)."""
    limits = _metadata_limits(metadata)
    if not limits:
        return None

    def check(value: Any) -> str | None:
        if "ge" in limits and "le" in limits and not limits["ge"] <= value <= limits["le"]:
            return f"must be between {_num(limits['ge'])} and {_num(limits['le'])}, got {value!r}"
        for key, limit in limits.items():
            words, ok = _LIMIT_KEYS[key]
            if not ok(value, limit):
                return f"must be {words} {_num(limit)}, got {value!r}"
        return None

    return check


def _model_field(name: str, info: FieldInfo) -> FieldSpec:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    required = info.is_required()
    if info.default_factory is not None:
        default: Any = info.default_factory()  # type: ignore[call-arg]
    else:
        default = None if required else info.default
    return FieldSpec(name, strip_annotated(info.annotation), required, default,
                     info.description or "", bool(extra.get("secret")), bool(extra.get("path")),
                     _limits(info.metadata) or _union_limits(info.annotation),
                     lengths=_lengths(info.metadata))


# --------------------------------------------------------------------------
# Validating: pydantic, strict about scalars, then our messages

_STRICT_SCALARS = {"int", "float", "bool", "str", "bytes", "date", "datetime", "time",
                   "timedelta", "decimal", "literal"}
_FIELD_CONTAINERS = {"dataclass-args", "model-fields", "typed-dict"}


def _harden(schema: Any) -> Any:
    """Make every scalar strict and every mapping closed, leaving containers lax.

    Strict mode as a whole would refuse a dict for a nested dataclass; this
    refuses only what a config file must not coerce (``"1883"`` for an int,
    ``1`` for a bool) and unknown keys, in any dataclass or model, a plugin's
    included.
    """
    if isinstance(schema, dict):
        kind = schema.get("type")
        kind = kind if isinstance(kind, str) else None  # a field may be named "type"
        if kind in _STRICT_SCALARS:
            schema["strict"] = True
        elif kind in _FIELD_CONTAINERS:
            schema["extra_behavior"] = "forbid"
        for value in schema.values():
            _harden(value)
    elif isinstance(schema, list):
        for value in schema:
            _harden(value)
    return schema


_NUMBER_SCHEMAS = {"int", "float"}


def _add_metadata_limits(schema: Any) -> Any:
    """Give pydantic the limits a dataclass wrote as ``metadata={"gt": 0}``.

    Checked with the types, they are reported with everything else in the
    entry (and not only once the rest is right, as a check run afterwards
    would be).
    """
    if isinstance(schema, dict):
        if schema.get("type") == "dataclass" and isinstance(schema.get("cls"), type):
            specs = field_specs(schema["cls"])
            args = schema.get("schema", {})
            for item in args.get("fields", []) if isinstance(args, dict) else []:
                spec = specs.get(item.get("name"))
                metadata = _dataclass_metadata(schema["cls"], item.get("name"))
                limits = _metadata_limits(metadata)
                if spec is not None and limits:
                    number = _number_schema(item.get("schema"))
                    if number is not None:
                        for key, limit in limits.items():
                            number.setdefault(key, limit)
                if spec is not None and callable(metadata.get("check")):
                    _wrap_with_check(item, metadata["check"], spec.secret)
        for value in schema.values():
            _add_metadata_limits(value)
    elif isinstance(schema, list):
        for value in schema:
            _add_metadata_limits(value)
    return schema


def _wrap_with_check(field_schema: dict[str, Any], check: Check, secret: bool) -> None:
    """Run a legacy ``metadata={"check": f}`` inside pydantic, on the value under any
    default and null, so its problem is reported with the entry's others."""
    holder = field_schema
    key = "schema"
    while isinstance(holder.get(key), dict) and holder[key].get("type") in ("default",
                                                                            "nullable"):
        holder = holder[key]
    inner = holder.get(key)
    if not isinstance(inner, dict):
        return

    def run(value: Any) -> Any:
        message = check(value)
        if message is not None:
            raise ValueError("the value (hidden) is invalid" if secret else message)
        return value

    holder[key] = {"type": "function-after", "function": {"type": "no-info", "function": run},
                   "schema": inner}


def _dataclass_metadata(cls: type, name: Any) -> Mapping[str, Any]:
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name == name:
            return f.metadata
    return {}


def _number_schema(schema: Any) -> dict[str, Any] | None:
    """The int/float schema under defaults and nullables, or None."""
    while isinstance(schema, dict):
        if schema.get("type") in _NUMBER_SCHEMAS:
            return schema
        if schema.get("type") in ("default", "nullable"):
            schema = schema.get("schema")
            continue
        return None
    return None


def _unprebuilt(schema: Any) -> Any:
    """Make pydantic validate models by the schema we hardened, not their own validator.

    pydantic-core builds a ``model`` node from the class's own prebuilt
    validator when the class has one (every finished pydantic model), ignoring
    the node's schema, and so our strict scalars and closed mappings. Each model
    node becomes its fields' schema (which is hardened) followed by
    ``model_validate`` of what they produced, which runs the model's own
    validators on values already of the right types.
    """
    if isinstance(schema, list):
        return [_unprebuilt(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _unprebuilt(value) for key, value in schema.items()}
    cls = schema.get("cls")
    fields = out.get("schema")
    if schema.get("type") == "model" and isinstance(cls, type) and issubclass(cls, BaseModel) \
            and isinstance(fields, dict) and fields.get("type") == "model-fields":
        replaced: dict[str, Any] = {
            "type": "function-after", "schema": fields,
            "function": {"type": "no-info", "function": _model_builder(cls)}}
        if "ref" in schema:
            replaced["ref"] = schema["ref"]
        return replaced
    return out


def _model_builder(cls: type[BaseModel]) -> Callable[[Any], Any]:
    def build(validated: Any) -> Any:
        values = validated[0] if isinstance(validated, tuple) else validated
        try:
            return cls.model_validate(values)
        except PydanticValidationError as exc:
            # The model's own validators (the fields were right): their problems,
            # each at its key, as InvalidOptions does.
            problems = []
            for error in exc.errors():
                reason = (error.get("ctx") or {}).get("error")
                if isinstance(reason, InvalidOptions):
                    problems += reason.problems
                    continue
                key = ".".join(str(part) for part in error["loc"])
                problems.append((key, str(reason) if reason is not None else error["msg"]))
            raise InvalidOptions(problems) from None

    return build


@functools.cache
def _validator(cls: type) -> SchemaValidator:
    core = _unprebuilt(copy.deepcopy(TypeAdapter(cls).core_schema))
    return SchemaValidator(_harden(_add_metadata_limits(core)))  # type: ignore[arg-type]


def build_options(cls: type, mapping: Any, where: Where) -> Any:
    """Validate ``mapping`` against the options class ``cls`` and build an instance.

    Parameters:
        cls: a dataclass or pydantic model; its fields are the allowed keys.
        mapping: the values, usually a mapping read from YAML.
        where: where ``mapping`` is in its file, for error messages.

    Raises:
        ConfigErrors: listing every problem found (unknown or missing keys,
            wrong types, values out of their limits, a ``ValueError`` from a
            validator or ``__post_init__``).
        TypeError: ``cls`` is not an options class, or uses a type pydantic
            cannot validate.
    """
    problems: list[ConfigProblem] = []
    result = validate_into(cls, mapping, where, problems)
    if problems:
        raise ConfigErrors(problems)
    return result


def validate_into(
    cls: type,
    mapping: Any,
    where: Where,
    problems: list[ConfigProblem],
    reserved: tuple[str, ...] = (),
) -> Any:
    """Like :func:`build_options`, adding to ``problems``; ``reserved`` keys are skipped
    (and named among the allowed keys)."""
    if mapping is INVALID:
        return INVALID
    specs = field_specs(cls)
    if not isinstance(mapping, Mapping):
        problems.append(where.problem(expected(cls, mapping)))
        return INVALID
    try:
        validator = _validator(cls)
    except Exception as exc:  # pydantic cannot build a schema for one of the types
        raise TypeError(f"unsupported option type in {cls.__qualname__}: {exc}") from exc
    data = {key: value for key, value in mapping.items() if key not in reserved}
    if any(value is INVALID for value in data.values()):
        # Already reported while reading; check the rest, then give up on the entry.
        clean = {k: v for k, v in data.items() if v is not INVALID}
        scratch: list[ConfigProblem] = []
        _validate(validator, cls, clean, where, scratch, reserved, specs)
        problems.extend(p for p in scratch if "missing required key" not in p.message
                        or not any(k in data for k in _missing_names(p)))
        return INVALID
    return _validate(validator, cls, data, where, problems, reserved, specs)


def _missing_names(problem: ConfigProblem) -> list[str]:
    return [problem.message.rsplit("'", 2)[-2]] if "'" in problem.message else []


def _validate(
    validator: SchemaValidator, cls: type, data: dict[Any, Any], where: Where,
    problems: list[ConfigProblem], reserved: tuple[str, ...], specs: dict[str, FieldSpec],
) -> Any:
    try:
        result = validator.validate_python(data)
    except PydanticValidationError as exc:
        problems.extend(_Translator(cls, data, where, reserved).problems(exc.errors()))
        return INVALID
    found = len(problems)
    _run_checks(result, where, problems)
    return INVALID if len(problems) > found else result


def _run_checks(obj: Any, where: Where, problems: list[ConfigProblem]) -> None:
    """The legacy ``metadata={"check": ...}`` of dataclass fields, nested ones included
    (also dataclasses inside a pydantic model, such as the ``commands:`` section)."""
    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value) or isinstance(value, BaseModel):
                _run_checks(value, where.key(name), problems)
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for name, spec in field_specs(type(obj)).items():
        value = getattr(obj, name)
        here = where.key(name)
        if spec.check is not None and value is not None:
            message = spec.check(value)
            if message is not None:
                problems.append(here.problem("the value (hidden) is invalid" if spec.secret
                                             else message))
        if dataclasses.is_dataclass(value) or isinstance(value, BaseModel):
            _run_checks(value, here, problems)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                _run_checks(item, here.index(index), problems)


@dataclass
class _Located:
    """One pydantic error followed through the types to the key path it concerns."""

    error: dict[str, Any]
    keys: list[Any]  # the data path: keys and list indexes
    type: Any  # the type hint the failing value was checked against
    spec: FieldSpec | None  # the innermost field on the way
    secret: bool
    # Unions passed on the way: (depth in keys, the union, the member taken)
    unions: list[tuple[int, Any, Any]]
    owner: Any = None  # the options class that declares ``spec``


class _Translator:
    """pydantic's errors, in our words: key path, line, what was expected, what was found."""

    def __init__(self, cls: type, data: Any, where: Where, reserved: tuple[str, ...]) -> None:
        self.cls = cls
        self.data = data
        self.where = where
        self.reserved = reserved

    def problems(self, errors: list[Any]) -> list[ConfigProblem]:
        located = [self._locate(error) for error in errors]
        # In the order the keys were written; missing keys after them.
        order = {key: rank for rank, key in enumerate(self.data)} \
            if isinstance(self.data, Mapping) else {}
        located.sort(key=lambda item: order.get(item.keys[0], len(order))
                     if item.keys and item.error["type"] != "missing" else len(order))
        out: list[ConfigProblem] = []
        seen: set[str] = set()
        for item in self._resolve_unions(located):
            for problem in self._several(item) or [self._problem(item)]:
                if str(problem) not in seen:  # a union can report one thing twice
                    seen.add(str(problem))
                    out.append(problem)
        return out

    def _several(self, item: _Located) -> list[ConfigProblem]:
        """An InvalidOptions raised by a validator: each problem at its own key."""
        reason = (item.error.get("ctx") or {}).get("error")
        if item.error["type"] != "value_error" or not isinstance(reason, InvalidOptions):
            return []
        where = self._where(item.keys)
        out = []
        for key, message in reason.problems:
            here = where
            # topics[0].qos, signal_options['Engine.*'].keepalive
            for part in re.findall(r"\[\d+\]|\['[^']*'\]|[^.\[\]]+", key):
                if part.startswith("['"):
                    here = here.key(part[2:-2])
                elif part.startswith("["):
                    here = here.index(int(part[1:-1]))
                else:
                    here = here.key(part)
            out.append(here.problem(message))
        return out

    # Following a loc through the types ----------------------------------
    def _locate(self, error: Any) -> _Located:
        tp: Any = self.cls
        keys: list[Any] = []
        spec: FieldSpec | None = None
        owner: Any = None
        secret = False
        unions: list[tuple[int, Any, Any]] = []
        loc = list(error["loc"])
        i = 0
        while True:
            tp = strip_annotated(tp)
            if is_union(tp):
                members = [m for m in get_args(tp) if m is not type(None)]
                if len(members) == 1:  # X | None: pydantic adds no step for it
                    if i >= len(loc):
                        break  # the error is about the field itself: show "or null"
                    tp = members[0]
                    continue
                if i >= len(loc):
                    break
                member = _member_for_tag(members, loc[i])
                unions.append((len(keys), tp, member))
                tp = member
                i += 1
                continue
            if i >= len(loc):
                break
            part = loc[i]
            origin = get_origin(tp)
            if is_options_class(tp):
                specs = field_specs(tp)
                keys.append(part)
                if part in specs:
                    spec = specs[part]
                    owner = tp
                    secret = secret or spec.secret
                    tp = spec.annotation
                else:
                    tp = Any
            elif origin is list or tp is list:
                keys.append(part)
                tp = get_args(tp)[0] if get_args(tp) else Any
            elif origin is dict or tp is dict:
                key_tp, value_tp = get_args(tp) if get_args(tp) else (Any, Any)
                keys.append(part)
                if i + 1 < len(loc) and loc[i + 1] == "[key]":
                    tp = key_tp
                    i += 1
                else:
                    tp = value_tp
            else:
                keys.append(part)
                tp = Any
            i += 1
        return _Located(error, keys, tp, spec, secret, unions, owner)

    # Unions: one clear message rather than one per member ----------------
    def _resolve_unions(self, located: list[_Located]) -> list[_Located]:
        done: list[_Located] = []
        groups: dict[tuple[Any, ...], list[_Located]] = {}
        for item in located:
            if not item.unions:
                done.append(item)
                continue
            depth, union, _member = item.unions[0]
            groups.setdefault((tuple(map(str, item.keys[:depth])), id(union)), []).append(item)
        for items in groups.values():
            depth, union, _ = items[0].unions[0]
            value = self._value_at(items[0].keys[:depth])
            members = [m for m in get_args(union) if m is not type(None)]
            shaped = [m for m in members if _same_shape(m, value)]
            if len(shaped) == 1:
                # Only one member has the value's shape (a mapping for a
                # dataclass, a list for a list): its own problems say more.
                chosen = [dataclasses.replace(i, unions=i.unions[1:]) for i in items
                          if i.unions[0][2] is shaped[0]]
                done.extend(self._resolve_unions(chosen))
                continue
            first = items[0]
            done.append(_Located(
                {"type": "union_type", "loc": (), "input": value, "ctx": {}, "msg": ""},
                first.keys[:depth], self._union_type(first, depth, union), first.spec,
                first.secret, []))
        return done

    def _union_type(self, item: _Located, depth: int, union: Any) -> Any:
        # Show "or null" when the field itself is optional.
        if item.spec is not None and depth and item.keys[depth - 1] == item.spec.name:
            spec_tp = strip_annotated(item.spec.annotation)
            if is_union(spec_tp) and type(None) in get_args(spec_tp):
                return spec_tp
        return union

    def _value_at(self, keys: list[Any]) -> Any:
        value = self.data
        for key in keys:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                return None
        return value

    # Messages -------------------------------------------------------------
    def _where(self, keys: list[Any]) -> Where:
        where = self.where
        for depth, key in enumerate(keys):
            if isinstance(key, int) and isinstance(self._value_at(keys[:depth]), list):
                where = where.index(key)
            else:
                where = where.key(key)
        return where

    def _problem(self, item: _Located) -> ConfigProblem:
        error = item.error
        kind = error["type"]
        value = error.get("input")
        ctx = error.get("ctx") or {}
        if kind == "missing" or kind == "missing_argument":
            name = item.keys[-1]
            return self._where(item.keys[:-1]).problem(f"missing required key {name!r}")
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            return self._unknown_key(item)
        where = self._where(item.keys)
        if kind in ("value_error", "assertion_error"):
            reason = ctx.get("error")
            return where.problem(str(reason) if reason is not None else error["msg"])
        if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            return where.problem(self._limit_message(item, kind, ctx, value))
        if kind == "literal_error":
            message = expected(item.type, value)
            choices = [str(c) for c in get_args(strip_annotated(item.type))]
            close = difflib.get_close_matches(str(value), choices, n=1)
            if isinstance(value, str) and close:
                message += f" (did you mean {close[0]!r}?)"
            return where.problem(message)
        if kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "union_type",
                                              "dataclass_exact_type", "model_attributes_type",
                                              "finite_number"):
            return where.problem(expected(item.type, value, item.secret))
        if item.secret:
            return where.problem("the value (hidden) is invalid")
        message = error["msg"]
        return where.problem(message[:1].lower() + message[1:])

    def _limit_message(self, item: _Located, kind: str, ctx: dict[str, Any], value: Any) -> str:
        if item.secret:
            return "the value (hidden) is out of range"
        if strip_annotated(item.type) is float and isinstance(value, int):
            value = float(value)
        shown = describe_value(value)
        limits = item.spec.limits if item.spec is not None else {}
        written = written_numbers(item.owner).get(item.spec.name, {}) \
            if item.owner is not None and item.spec is not None else {}
        low = limits.get("ge")
        high = limits.get("le")
        if low is not None and high is not None:
            return (f"must be between {written.get('ge') or _num(low)} and "
                    f"{written.get('le') or _num(high)}, got {shown}")
        words = {"greater_than": ("gt", "greater than"), "greater_than_equal": ("ge", "at least"),
                 "less_than": ("lt", "less than"), "less_than_equal": ("le", "at most")}
        key, text = words[kind]
        return f"must be {text} {written.get(key) or _num(ctx.get(key))}, got {shown}"

    def _unknown_key(self, item: _Located) -> ConfigProblem:
        parent = item.keys[:-1]
        key = item.keys[-1]
        owner = self._owner(parent)
        names = sorted({*field_specs(owner), *(self.reserved if not parent else ())}) \
            if owner is not None else []
        message = f"unknown key; allowed keys: {', '.join(names)}"
        close = difflib.get_close_matches(str(key), names, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        return self._where(item.keys).problem(message)

    def _owner(self, keys: list[Any]) -> Any:
        """The options class whose mapping is at ``keys``."""
        tp: Any = self.cls
        value = self.data
        for key in keys:
            tp = strip_annotated(tp)
            if is_union(tp):
                tp = next((m for m in get_args(tp) if _same_shape(m, value)), Any)
                tp = strip_annotated(tp)
            if is_options_class(tp):
                spec = field_specs(tp).get(key)
                tp = spec.annotation if spec else Any
            elif get_args(tp):
                tp = get_args(tp)[-1]
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                value = None
        tp = strip_annotated(tp)
        if is_union(tp):
            tp = next((m for m in get_args(tp) if is_options_class(strip_annotated(m))), Any)
        return tp if is_options_class(tp) else None


def _num(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)


def _member_for_tag(members: list[Any], tag: Any) -> Any:
    """The union member pydantic named ``tag`` in an error's loc ('int', 'list[str]', 'Lim')."""
    text = str(tag)
    for member in members:
        base = strip_annotated(member)
        name = getattr(base, "__name__", None)
        if name == text:
            return member
    for member in members:
        base = strip_annotated(member)
        origin = get_origin(base)
        if origin is not None and text.startswith(getattr(origin, "__name__", "?") + "["):
            return member
        if origin is Literal and text.startswith("literal["):
            return member
    return members[0]


def _same_shape(tp: Any, value: Any) -> bool:
    tp = strip_annotated(tp)
    origin = get_origin(tp)
    if isinstance(value, list):
        return origin is list or tp is list
    if isinstance(value, Mapping):
        return origin is dict or tp is dict or is_options_class(tp)
    return False


# --------------------------------------------------------------------------
# Documenting


def describe_options(cls: type) -> list[tuple[str, str, str, str]]:
    """Document an options class: ``(name, type, default, help)`` rows.

    Nested options classes are flattened into dotted names (``buffer.type``);
    a field without a default shows ``required``; limits are added to the type
    (``number, > 0``).
    """
    from plexus.config.problems import type_name

    rows: list[tuple[str, str, str, str]] = []
    written = written_numbers(cls)
    for name, spec in field_specs(cls).items():
        tp = strip_annotated(spec.annotation)
        if is_options_class(tp):
            nested = describe_options(tp)
            rows.extend((f"{name}.{sub}", *rest) for sub, *rest in nested)  # type: ignore[misc]
            continue
        kind = type_name(tp)
        limits = describe_limits(spec.limits, written.get(name))
        if limits:
            kind += f", {limits}"
        low, high = spec.lengths.get("min_length"), spec.lengths.get("max_length")
        if low is not None and low == high:
            kind += f", length {low}"
        elif low is not None or high is not None:
            kind += ", length " + ", ".join(
                text for text in (low is not None and f">= {low}", high is not None
                                  and f"<= {high}") if text)
        rows.append((name, kind, written.get(name, {}).get("default") or _describe_default(spec),
                     spec.help))
    return rows


@functools.cache
def written_numbers(cls: type) -> dict[str, dict[str, str]]:
    """Number defaults and limits as the class's source writes them (``0x76``,
    ``10_000_000``): field name -> {"default"/"gt"/"ge"/"lt"/"le": text}.

    Only where the text reads back as the same number in a rig file (YAML), so a
    reader may copy it; empty when the source cannot be read (a zipped install).
    """
    import ast
    import inspect
    import textwrap

    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return {}
    specs = field_specs(cls)
    out: dict[str, dict[str, str]] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id in specs):
            continue
        spec = specs[node.target.id]
        found: dict[str, ast.expr] = {}
        for call in ast.walk(node.annotation):  # Ge(1), Interval(ge=1, le=0xFF), Field(gt=0)
            if isinstance(call, ast.Call):
                name = getattr(call.func, "id", getattr(call.func, "attr", ""))
                if name.lower() in _LIMIT_KEYS and call.args:
                    found[name.lower()] = call.args[0]
                found.update({k.arg: k.value for k in call.keywords if k.arg in _LIMIT_KEYS})
        value = node.value
        if isinstance(value, ast.Call):  # field(default=..., metadata={...}), option(...)
            keywords = {k.arg: k.value for k in value.keywords if k.arg}
            default = keywords.get("default", value.args[0] if value.args else None)
            if default is not None:
                found["default"] = default
            found.update({k: v for k, v in keywords.items() if k in _LIMIT_KEYS})
            metadata = keywords.get("metadata")
            if isinstance(metadata, ast.Dict):
                for key, item in zip(metadata.keys, metadata.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value in _LIMIT_KEYS:
                        found[key.value] = item
        elif value is not None:
            found["default"] = value
        actual = {"default": None if spec.required else spec.default, **spec.limits}
        texts = {key: text for key, expr in found.items()
                 if (text := _same_number_text(source, expr, actual.get(key)))}
        if texts:
            out[node.target.id] = texts
    return out


def _same_number_text(source: str, expr: Any, value: Any) -> str | None:
    """The source text of ``expr`` if YAML reads it as ``value`` and it differs from str()."""
    import ast

    import yaml

    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    text = ast.get_source_segment(source, expr) or ""
    try:
        read = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if type(read) is type(value) and read == value and text != str(value):
        return text
    return None


def describe_limits(limits: Mapping[str, float], written: Mapping[str, str] | None = None,
                    ) -> str:
    """``>= 1, <= 10000`` for the limits of a field; '' when it has none.

    ``written`` gives a limit's text as the source wrote it (``<= 0x77``).
    """
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    written = written or {}
    return ", ".join(f"{signs[k]} {written.get(k) or _num(limits[k])}"
                     for k in ("gt", "ge", "lt", "le") if k in limits)


def _describe_default(spec: FieldSpec) -> str:
    if spec.required:
        return "required"
    value = spec.default
    if value is None or isinstance(value, bool):
        return describe_value(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, BaseModel):
        return "{}"
    return str(value)


def safe_repr(obj: Any) -> str:
    """A repr of an options object that shows ``'***'`` for fields marked secret."""
    if isinstance(obj, BaseModel) and not isinstance(obj, OptionsModel):
        return repr(obj)
    if not (dataclasses.is_dataclass(obj) or isinstance(obj, BaseModel)) or isinstance(obj, type):
        return repr(obj)
    parts = []
    for name, spec in field_specs(type(obj)).items():
        if dataclasses.is_dataclass(obj) and not next(
                f for f in dataclasses.fields(obj) if f.name == name).repr:
            continue
        value = getattr(obj, name)
        if spec.secret and value is not None:
            shown = "'***'"
        elif is_options_class(type(value)):
            shown = safe_repr(value)
        else:
            shown = repr(value)
        parts.append(f"{name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"

