"""Points and their validation against the ingest protocol (docs/protocol.md).

A point travels through the pipeline as a plain tuple, because tuples are the
cheapest thing Python can build on the hot path::

    (metric, value, timestamp_ms, tags)

``timestamp_ms`` is an int (milliseconds since the epoch, the resolution the
platform stores) and ``tags`` is a ``dict[str, str]`` or ``None``. Tag dicts
are shared between points and must never be mutated after stamping.

Every point is checked here before it is buffered, so a point the platform
would reject fails at ``send()`` and never poisons a batch of good ones.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson

from plexus.errors import PointTypeError, ValidationError

Point = tuple[str, Any, int, "dict[str, str] | None"]

MAX_METRIC_CHARS = 256
MAX_TAGS = 16
MAX_TAG_CHARS = 256
MAX_STRING_VALUE_BYTES = 256
MAX_JSON_VALUE_BYTES = 4096
MAX_POINTS_PER_REQUEST = 10_000
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_SOURCE_ID_CHARS = 256
# A timestamp further ahead than this is a unit mistake (ms or ns passed as
# seconds) or a broken clock; the platform would file it in the wrong year.
MAX_FUTURE_SECONDS = 7 * 24 * 3600
# Ints are sent as JSON numbers; outside 64 bits no JSON reader keeps them.
_INT_LIMIT = 2**63

_SOURCE_ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_SOURCE_ID_REST = _SOURCE_ID_FIRST | frozenset("._-")


def validate_source_id(source_id: object) -> str:
    """Return ``source_id`` if the platform accepts it, else raise ValidationError."""
    if not isinstance(source_id, str):
        raise PointTypeError(f"source_id must be a string, got {type(source_id).__name__}")
    if not source_id or utf8_len(source_id) > MAX_SOURCE_ID_CHARS:
        raise ValidationError(
            f"source_id must be 1..{MAX_SOURCE_ID_CHARS} characters, got {len(source_id)}"
        )
    if source_id[0] not in _SOURCE_ID_FIRST or not set(source_id) <= _SOURCE_ID_REST:
        raise ValidationError(
            f"source_id {source_id!r} is invalid: use lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (pattern ^[a-z0-9][a-z0-9._-]*$)"
        )
    return source_id


def utf8_len(text: str) -> int:
    """Length in UTF-8 bytes, which is what the platform's Go gateway counts."""
    return len(text) if text.isascii() else len(text.encode())


def check_metric(metric: object) -> None:
    if type(metric) is not str:
        if not isinstance(metric, str):
            raise PointTypeError(f"metric must be a string, got {type(metric).__name__}")
    if not 0 < len(metric) <= MAX_METRIC_CHARS or (
        len(metric) * 4 > MAX_METRIC_CHARS and utf8_len(metric) > MAX_METRIC_CHARS
    ):
        raise ValidationError(
            f"metric must be 1..{MAX_METRIC_CHARS} characters (UTF-8 bytes), got "
            f"{utf8_len(metric)}" + (f" ({metric[:40]!r}...)" if metric else "")
        )


def normalize_value(metric: str, value: Any) -> Any:
    """Return the value as it will be sent, or raise naming what is wrong.

    Fast for the common types; numpy scalars are unwrapped to Python numbers.
    """
    kind = type(value)
    if kind is float:
        if value - value != 0.0:  # NaN or +-Inf, cheaper than math.isfinite
            raise ValidationError(f"value of {metric!r} must be a finite number, got {value}")
        return value
    if kind is int or kind is bool:
        if kind is int and not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ValidationError(f"value of {metric!r} does not fit in 64 bits: {value}")
        return value
    if kind is str:
        if len(value) * 4 > MAX_STRING_VALUE_BYTES and len(value.encode()) > MAX_STRING_VALUE_BYTES:
            raise ValidationError(
                f"value of {metric!r}: a string value may be at most "
                f"{MAX_STRING_VALUE_BYTES} bytes of UTF-8, got {len(value.encode())}"
            )
        return value
    if value is None:
        raise ValidationError(f"value of {metric!r} is None; the platform rejects null values")
    if kind is dict or kind is list or kind is tuple:
        return _normalize_json_value(metric, value)
    return _normalize_other(metric, value)


def _normalize_other(metric: str, value: Any) -> Any:
    # Subclasses of the plain types (IntEnum, numpy.float64, str subclasses).
    if isinstance(value, bool):
        return bool(value)
    for base in (int, float, str):
        if isinstance(value, base):
            return normalize_value(metric, base(value))
    if isinstance(value, (dict, list, tuple)):
        return _normalize_json_value(metric, value)
    # numpy scalars and 0-d arrays expose .item(); robotics code sends them a lot.
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        item = value.item()
        if type(item) in (int, float, bool, str):
            return normalize_value(metric, item)
    raise PointTypeError(
        f"value of {metric!r} has unsupported type {type(value).__name__}; "
        "use a number, str, bool, dict or list"
    )


def _check_nested(metric: str, value: Any, path: str) -> Any:
    kind = type(value)
    if kind is float or isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"value of {metric!r}: {path} must be finite, got {value}")
        return float(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ValidationError(f"value of {metric!r}: {path} does not fit in 64 bits")
        return int(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise PointTypeError(
                    f"value of {metric!r}: key {key!r} at {path} must be a string, "
                    f"got {type(key).__name__}"
                )
            out[key] = _check_nested(metric, item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_check_nested(metric, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _check_nested(metric, value.tolist(), path)
    raise PointTypeError(
        f"value of {metric!r}: {path} has unsupported type {type(value).__name__}"
    )


def go_json_size(encoded: bytes) -> int:
    """Size of this JSON as Go's encoding/json writes it: <, >, & become \\u003c (+5 bytes
    each) and U+2028/U+2029 become \\u2028 (+3 bytes each)."""
    return (len(encoded) + 5 * (encoded.count(b"<") + encoded.count(b">") + encoded.count(b"&"))
            + 3 * (encoded.count("\u2028".encode()) + encoded.count("\u2029".encode())))


def _normalize_json_value(metric: str, value: Any) -> Any:
    clean = _check_nested(metric, value, "value")
    size = go_json_size(orjson.dumps(clean))
    if size > MAX_JSON_VALUE_BYTES:
        raise ValidationError(
            f"value of {metric!r}: an object or list value may be at most "
            f"{MAX_JSON_VALUE_BYTES} bytes of JSON, got {size}"
        )
    return clean


def timestamp_ms(timestamp: Any) -> int:
    """Convert a Unix timestamp in seconds to the int milliseconds we send."""
    kind = type(timestamp)
    if kind is not float and kind is not int:
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
            raise PointTypeError(
                f"timestamp must be Unix seconds as a number, got {type(timestamp).__name__}"
            )
        timestamp = float(timestamp)
    if not 0 <= timestamp <= time.time() + MAX_FUTURE_SECONDS:
        if timestamp != timestamp or timestamp in (math.inf, -math.inf):
            raise ValidationError(f"timestamp must be finite, got {timestamp}")
        if timestamp < 0:
            raise ValidationError(f"timestamp must not be negative, got {timestamp}")
        if timestamp < 1e11 and _not_future(timestamp):
            return int(timestamp * 1000)
        hint = (
            " (it looks like nanoseconds; divide by 1e9)" if timestamp > 1e17
            else " (it looks like microseconds; divide by 1e6)" if timestamp > 1e14
            else " (it looks like milliseconds; divide by 1000)" if timestamp > 1e11
            else ""
        )
        raise ValidationError(
            f"timestamp {timestamp} is more than {MAX_FUTURE_SECONDS // 86400} days in the "
            f"future; timestamps are Unix seconds{hint}"
        )
    return int(timestamp * 1000)


def _not_future(timestamp: float) -> bool:
    """Judged against the trusted time: the system clock may be wrong (docs/time.md)."""
    from plexus.clock import system_clock_behind_s

    behind = system_clock_behind_s()
    if behind is None:
        return True  # no trustworthy time yet: only a unit mistake can be told
    return behind > 0 and timestamp <= time.time() + behind + MAX_FUTURE_SECONDS


def check_tags(tags: Any) -> dict[str, str]:
    """Validate a tag dict (types, lengths, count) and return it.

    Numbers and bools as tag values are turned into strings (``5`` -> ``"5"``,
    ``True`` -> ``"true"``), as users of other time-series clients expect; the
    returned dict is then a new one. Any other type is an error.
    """
    if type(tags) is not dict:
        if not isinstance(tags, dict):
            raise PointTypeError(f"tags must be a dict of str to str, got {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} tags are allowed per point, got {len(tags)}")
    for key, val in tags.items():
        if type(key) is not str or type(val) is not str:
            if isinstance(key, str) and isinstance(val, (bool, int, float)):
                # The slow path only: str tags (the norm) never get here.
                return check_tags({k: _tag_text(k, v) for k, v in tags.items()})
            bad = key if type(key) is not str else val
            what = "key" if bad is key else f"value of tag {key!r}"
            if not isinstance(bad, str):
                raise PointTypeError(
                    f"tag {what} must be a string, got {type(bad).__name__} ({bad!r})"
                )
        if (not 0 < len(key) <= MAX_TAG_CHARS or len(val) > MAX_TAG_CHARS or (
            (len(key) > MAX_TAG_CHARS // 4 or len(val) > MAX_TAG_CHARS // 4)
            and (utf8_len(key) > MAX_TAG_CHARS or utf8_len(val) > MAX_TAG_CHARS)
        )):
            raise ValidationError(
                f"tag {key[:40]!r}: keys must be 1..{MAX_TAG_CHARS} characters (UTF-8 bytes) "
                f"and values at most {MAX_TAG_CHARS}"
            )
    return tags


def _tag_text(key: Any, value: Any) -> Any:
    """A number or bool tag value as text; anything else is left for check_tags to refuse."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"value of tag {key!r} must be a finite number, got {value!r}")
        return repr(value)
    if isinstance(value, int):
        return str(int(value))  # int() unwraps subclasses such as IntEnum
    return value


def merge_tags(
    base: dict[str, str] | None, extra: dict[str, str] | None
) -> dict[str, str] | None:
    """Tags of ``extra`` win over ``base``; the result is validated."""
    if not extra:
        return base
    extra = check_tags(extra)
    if not base:
        return extra
    merged = {**base, **extra}
    if len(merged) > MAX_TAGS:
        raise ValidationError(
            f"at most {MAX_TAGS} tags are allowed per point, got {len(merged)} "
            f"({len(base)} from the client/session, {len(extra)} given)"
        )
    return merged


def make_point(
    metric: Any,
    value: Any,
    timestamp: Any = None,
    tags: Any = None,
    base_tags: dict[str, str] | None = None,
) -> Point:
    """Validate one reading and return it as a point tuple."""
    check_metric(metric)
    value = normalize_value(metric, value)
    ts = int(time.time() * 1000) if timestamp is None else timestamp_ms(timestamp)
    return (metric, value, ts, merge_tags(base_tags, tags))


def json_lines(source_id: str, points: list[Point]) -> bytes:
    """Points as JSON Lines, one self-contained object per point (file and stdout sinks)."""
    return b"".join(
        orjson.dumps({"source_id": source_id, "metric": m, "value": v, "timestamp": ts,
                      "tags": tags or {}}) + b"\n"
        for m, v, ts, tags in points
    )
