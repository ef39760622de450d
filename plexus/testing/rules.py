"""The ingest protocol's rules, as the platform's gateway enforces them.

Kept here on purpose rather than imported from :mod:`plexus.point`: this is
the independent oracle the client is tested against, so a mistake in the
client's validation cannot hide itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# The limits of docs/protocol.md, kept here on purpose rather than imported from
# plexus.point (see the module docstring).
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_POINTS = 10_000
MAX_SOURCE_ID_CHARS = 256
MAX_METRIC_CHARS = 256
MAX_STRING_VALUE_BYTES = 256
MAX_JSON_VALUE_BYTES = 4096
MAX_TAGS = 16
MAX_TAG_CHARS = 256
#: The real gateway admits one request per source every 0.5 ms.
GATEWAY_RATE_LIMIT_INTERVAL = 0.0005

_SOURCE_ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_SOURCE_ID_CHARS = _SOURCE_ID_FIRST | frozenset("._-")
_MISSING: Any = object()
_JSON_TYPE_NAMES = {
    dict: "object", list: "array", str: "string", int: "number", float: "number",
    bool: "boolean", type(None): "null",
}



class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _bad(i: int, message: str) -> HTTPError:
    return HTTPError(400, f"points[{i}]: {message}")


def _check_source_id(i: int, sid: str) -> None:
    if len(sid) > MAX_SOURCE_ID_CHARS:
        raise _bad(i, f"source_id must be at most {MAX_SOURCE_ID_CHARS} characters, got {len(sid)}")
    if sid[0] not in _SOURCE_ID_FIRST or not _SOURCE_ID_CHARS.issuperset(sid):
        raise _bad(i, f"source_id {sid[:64]!r} must match ^[a-z0-9][a-z0-9._-]*$")


def _resolve_source_id(i: int, sid: Any, default: str | None) -> str:
    # The gateway treats an absent, null or empty per-point source_id as "use
    # the top-level one"; any other non-string is a mistake worth naming.
    if sid is None or sid == "":
        if not default:
            raise _bad(i, "source_id is required (set a top-level or per-point source_id)")
        return default
    raise _bad(i, f"source_id must be a string, got {json_type(sid)}")


def _go_json_size(value: Any) -> int:
    # The gateway measures an object/array value with Go's json.Marshal, which
    # escapes <, > and & as \u003c (3 bytes more each) and U+2028/U+2029 as
    # \u2028 (3 bytes more each). Counting like that keeps this receiver from
    # accepting a value the platform would reject.
    data = orjson.dumps(value)
    size = len(data)
    if size > MAX_JSON_VALUE_BYTES // 7:  # below this even all-escaped text fits
        size += 5 * (data.count(b"<") + data.count(b">") + data.count(b"&"))
        size += 3 * (data.count(b"\xe2\x80\xa8") + data.count(b"\xe2\x80\xa9"))
    return size


def _check_tags(i: int, tags: Any) -> None:
    if type(tags) is not dict:
        raise _bad(i, f"tags must be an object of strings, got {json_type(tags)}")
    if len(tags) > MAX_TAGS:
        raise _bad(i, f"tags may have at most {MAX_TAGS} entries, got {len(tags)}")
    for key, val in tags.items():
        if len(key) > MAX_TAG_CHARS:
            raise _bad(i, f"tag key {key[:40]!r}... must be at most {MAX_TAG_CHARS} characters")
        if type(val) is not str:
            raise _bad(i, f"tags[{key!r}] must be a string, got {json_type(val)}")
        if len(val) > MAX_TAG_CHARS:
            raise _bad(i, f"tags[{key!r}] must be at most {MAX_TAG_CHARS} characters, got {len(val)}")


def _bad_value(i: int, cls: str, value: Any) -> HTTPError:
    if value is _MISSING:
        return _bad(i, "value is required")
    if value is None:
        return _bad(i, "value must not be null")
    if cls == "metric":
        if type(value) is float:
            return _bad(i, f"value must be a finite number, got {value}")
        return _bad(i, f"value must be a finite number for class 'metric', got {json_type(value)}")
    if type(value) is str:
        return _bad(i, f"value: a string may be at most {MAX_STRING_VALUE_BYTES} bytes of UTF-8, "
                       f"got {len(value.encode())}")
    if type(value) is dict or type(value) is list:
        return _bad(i, f"value: an object or array may be at most {MAX_JSON_VALUE_BYTES} bytes "
                       f"of JSON, got {_go_json_size(value)}")
    return _bad(i, f"value has unsupported type {json_type(value)}")  # pragma: no cover


def validate_points(
    points: list[Any],
    default_sid: str | None,
    now_ms: int,
    extra_check: Callable[[dict[str, Any]], str | None] | None,
) -> dict[str, list[dict[str, Any]]]:
    """Validate and normalize every point in place; return them grouped by source.

    Raises HTTPError(400, "points[i]: ...") at the first bad point. This loop
    receives a million points in the benchmarks, so the common case takes the
    fewest possible branches and every error is built off the hot path.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, p in enumerate(points):
        if type(p) is not dict:
            raise _bad(i, f"a point must be an object, got {json_type(p)}")
        sid = p.get("source_id")
        if type(sid) is not str or not sid:
            sid = _resolve_source_id(i, sid, default_sid)
            p["source_id"] = sid
        group = groups.get(sid)
        if group is None:
            _check_source_id(i, sid)
            group = groups[sid] = []
        value = p.get("value", _MISSING)
        kind = type(value)
        cls = p.get("class")
        if cls is None:
            # JSON true/false decode to bool, which `type(...) is int` excludes.
            cls = p["class"] = "metric" if kind is int or kind is float else "event"
        if cls == "metric":
            if kind is float:
                if value - value != 0.0:  # NaN or +-Inf
                    raise _bad_value(i, cls, value)
            elif kind is not int:
                raise _bad_value(i, cls, value)
        elif cls == "event":
            if kind is str:
                # 4 bytes per character at most, so short strings skip encoding.
                if len(value) > MAX_STRING_VALUE_BYTES // 4 and (
                    len(value.encode()) > MAX_STRING_VALUE_BYTES
                ):
                    raise _bad_value(i, cls, value)
            elif kind is dict or kind is list:
                if _go_json_size(value) > MAX_JSON_VALUE_BYTES:
                    raise _bad_value(i, cls, value)
            elif kind is not bool and kind is not int and kind is not float:
                raise _bad_value(i, cls, value)
        else:
            shown = cls if type(cls) is str else json_type(cls)
            raise _bad(i, f"class must be 'metric' or 'event', got {shown!r}")
        metric = p.get("metric")
        if type(metric) is not str or not 0 < len(metric) <= MAX_METRIC_CHARS:
            got = len(metric) if type(metric) is str else json_type(metric)
            raise _bad(i, f"metric must be 1..{MAX_METRIC_CHARS} characters, got {got}")
        ts = p.get("timestamp", _MISSING)
        if ts is _MISSING:
            p["timestamp"] = now_ms
        else:
            tkind = type(ts)
            if (tkind is not int and tkind is not float) or ts - ts != 0:
                got = str(ts) if tkind is float else json_type(ts)
                raise _bad(i, f"timestamp must be a finite number, got {got}")
            if 0 < ts < 1e12:  # seconds, as the gateway reads it
                ts = ts * 1000
                # Keep whole milliseconds as int so tests compare with ints.
                p["timestamp"] = int(ts) if tkind is float and ts.is_integer() else ts
        tags = p.get("tags", _MISSING)
        if tags is not _MISSING:
            # Inlined: a call per point would cost more than the checks.
            if type(tags) is not dict or len(tags) > MAX_TAGS:
                _check_tags(i, tags)
            for key, val in tags.items():
                if type(val) is not str or len(val) > MAX_TAG_CHARS or len(key) > MAX_TAG_CHARS:
                    _check_tags(i, tags)
        if extra_check is not None:
            problem = extra_check(p)
            if problem:
                raise _bad(i, problem)
        group.append(p)
    return groups


def group_points(points: list[Any], default_sid: str | None) -> dict[str, list[dict[str, Any]]]:
    """The validate=False path: only resolve each point's source."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for i, p in enumerate(points):
        sid = p.get("source_id") if type(p) is dict else None
        if type(sid) is not str or not sid:
            if not default_sid:
                raise _bad(i, "source_id is required (set a top-level or per-point source_id)")
            sid = default_sid
            if type(p) is dict:
                p["source_id"] = sid
        group = groups.get(sid)
        if group is None:
            group = groups[sid] = []
        group.append(p)
    return groups

