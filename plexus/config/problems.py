"""Where a problem is in a rig file, and how values and types are named in messages.

Every problem reads ``{file}:{line}: {key path}: {what is wrong}``; a file's
problems are collected and raised together as one :class:`ConfigErrors`.
"""

from __future__ import annotations

import datetime
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from plexus.errors import ConfigError

__all__ = ["INVALID", "ConfigErrors", "ConfigProblem", "Where"]


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config: ``{file}:{line}: {path}: {message}``."""

    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line > 0 else self.file  # 0: no line
        if self.path:
            return f"{place}: {self.path}: {self.message}"
        return f"{place}: {self.message}"


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


def join_key(path: str, key: object) -> str:
    """``path.key``, or ``path['a.b']`` for a key a dot would make ambiguous."""
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
        return self._child(join_key(self.path, key))

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


INVALID: Any = _Invalid()


# --------------------------------------------------------------------------
# Naming types and values

_SCALAR_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def strip_annotated(tp: Any) -> Any:
    """``Annotated[float, Gt(0)]`` -> ``float``."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def is_options_class(tp: Any) -> bool:
    """A dataclass or a pydantic model: a mapping in the rig file."""
    return isinstance(tp, type) and (is_dataclass(tp) or hasattr(tp, "model_fields"))


def type_name(tp: Any) -> str:
    """A reader's name for a type hint: ``list of strings``, ``integer or null``."""
    tp = strip_annotated(tp)
    if tp is Any:
        return "any value"
    if tp in _SCALAR_NAMES:
        return _SCALAR_NAMES[tp]
    origin, args = get_origin(tp), get_args(tp)
    if is_union(tp):
        return " or ".join(type_name(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is list or tp is list:
        return f"list of {_plural(args[0] if args else Any)}"
    if origin is dict or tp is dict:
        key, value = args if args else (Any, Any)
        return f"mapping of {_plural(key)} to {_plural(value)}"
    if is_options_class(tp):
        return "mapping"
    return getattr(tp, "__name__", repr(tp))


def _plural(tp: Any) -> str:
    tp = strip_annotated(tp)
    if tp is Any:
        return "values"
    if tp in _SCALAR_NAMES and tp is not type(None):
        return _SCALAR_NAMES[tp] + "s"
    if is_options_class(tp):
        return "mappings"
    return f"values ({type_name(tp)})"


def a(name: str) -> str:
    """The name with its article: ``an integer``, ``a list of strings``."""
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


def describe_value(value: Any, secret: bool = False) -> str:
    """The value as a message shows it; a secret shows only its kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if secret:
        return f"{a(_kind(value))} (value hidden)"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return a(_kind(value))


def _accepts_str(tp: Any) -> bool:
    tp = strip_annotated(tp)
    return tp is str or (is_union(tp) and any(strip_annotated(m) is str for m in get_args(tp)))


def expected(tp: Any, value: Any, secret: bool = False) -> str:
    """``expected an integer, got 'x'``, with a quoting hint where YAML typed a string."""
    message = f"expected {a(type_name(tp))}, got {describe_value(value, secret)}"
    if _accepts_str(tp) and isinstance(value, (bool, int, float, datetime.date)):
        # YAML reads `yes`, `12` or `2024-05-01` as non-strings; quoting fixes it.
        message += " (quote it to make it a string)"
    return message
