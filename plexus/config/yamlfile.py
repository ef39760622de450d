"""Reading a rig file's YAML: line marks for every key path, and ``${ENV}`` interpolation.

The result is plain Python values (dicts, lists, scalars) plus a map from
key paths (``adapters[2].interval``) to their lines, so the schema checks
that follow can say where each problem is. Problems found while reading
(an unset variable, a duplicate key, an unsupported tag) are collected and
the value concerned becomes ``INVALID``, so the schema says nothing more of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from plexus.config.problems import INVALID, ConfigErrors, ConfigProblem, join_key

__all__ = ["YamlDocument", "read_yaml"]

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
    value concerned becomes INVALID so schema checks stay quiet about it.
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
            return INVALID
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
            return INVALID
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
            if key is INVALID:
                continue
            child = join_key(path, key)
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
            return INVALID
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
            return INVALID

    def _interpolate(self, node: yaml.ScalarNode, path: str, line: int) -> Any:
        result = self._substitute(node.value, path, line)
        if result is None:
            return INVALID
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


@dataclass
class YamlDocument:
    """A rig file read into plain values, with where each key path is."""

    data: dict[str, Any]
    root_line: int
    lines: dict[str, int]
    problems: list[ConfigProblem]
    #: key paths whose value came wholly from one environment variable
    from_environment: set[str]


def read_yaml(
    text: str, file: str, environ: Mapping[str, str], secret_paths: set[str]
) -> YamlDocument:
    """Parse and interpolate ``text``; messages name ``file``.

    ``secret_paths`` are the key paths whose values must never appear in a message.

    Raises:
        ConfigErrors: the text is not YAML, or not a mapping at the top.
    """
    loader, root = _compose(text, file)
    reader = _Reader(loader, file, environ, secret_paths)
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
    if not isinstance(data, dict):  # a tagged top level such as "--- !!omap"
        raise ConfigErrors(reader.problems)
    return YamlDocument(data, root_line, reader.lines, reader.problems, reader.from_environment)
