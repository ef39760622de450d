"""The limits and choices an options dataclass declares, checked on an instance.

The rig loader checks them with pydantic, each at its key and line. An
options object built in Python (``SerialOptions(port=..., bytesize=9)``)
skips that, so a ``__post_init__`` calls :func:`declared_problems` to hold
it to the same declaration, without importing pydantic::

    def __post_init__(self) -> None:
        problems = declared_problems(self)
        ...                                   # cross-field rules append here
        if problems:
            raise InvalidOptions(problems)

Limits are read from ``Annotated[int, Ge(1)]`` (annotated_types or pydantic
metadata: anything with ``gt``/``ge``/``lt``/``le``) and from a field's
``metadata={"gt": 0}``; choices from ``Literal[...]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

__all__ = ["declared_problems"]

_WORDS = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}
_OK = {"gt": lambda v, x: v > x, "ge": lambda v, x: v >= x,
       "lt": lambda v, x: v < x, "le": lambda v, x: v <= x}


def declared_problems(obj: Any) -> list[tuple[str, str]]:
    """``(field, message)`` for every declared limit or choice ``obj`` breaks."""
    problems: list[tuple[str, str]] = []
    cls: type = type(obj)
    for name, (limits, choices) in _declarations(cls).items():
        value = getattr(obj, name)
        if value is None or isinstance(value, bool):
            continue
        if choices is not None:
            if not any(value == c and type(value) is type(c) or _same_number(value, c)
                       for c in choices):
                shown = ", ".join(repr(c) for c in choices)
                problems.append((name, f"expected one of {shown}, got {value!r}"))
            continue
        if not isinstance(value, (int, float)) or not limits:
            continue
        if "ge" in limits and "le" in limits:
            if not limits["ge"] <= value <= limits["le"]:
                problems.append((name, f"must be between {_num(limits['ge'])} and "
                                       f"{_num(limits['le'])}, got {value!r}"))
            continue
        for key, limit in limits.items():
            if not _OK[key](value, limit):
                problems.append((name, f"must be {_WORDS[key]} {_num(limit)}, got {value!r}"))
                break
    return problems


def _same_number(value: Any, choice: Any) -> bool:
    return (isinstance(value, (int, float)) and isinstance(choice, (int, float))
            and not isinstance(choice, bool) and value == choice)


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


@functools.cache
def _declarations(cls: type) -> dict[str, tuple[dict[str, float], tuple[Any, ...] | None]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, tuple[dict[str, float], tuple[Any, ...] | None]] = {}
    for f in dataclasses.fields(cls):
        limits: dict[str, float] = {}
        tp = hints.get(f.name, Any)
        tp = _strip_optional(tp)
        while get_origin(tp) is typing.Annotated:
            base, *metadata = get_args(tp)
            for item in metadata:
                for key in _WORDS:
                    limit = getattr(item, key, None)
                    if isinstance(limit, (int, float)) and not isinstance(limit, bool):
                        limits[key] = limit
            tp = _strip_optional(base)
        for key in _WORDS:
            if key in f.metadata:
                limits[key] = f.metadata[key]
        choices = get_args(tp) if get_origin(tp) is Literal else None
        if limits or choices:
            out[f.name] = (limits, choices)
    return out


def _strip_optional(tp: Any) -> Any:
    args = get_args(tp)
    if get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp
