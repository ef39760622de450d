"""Validation of points against docs/protocol.md, as a caller of send() sees it."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.errors import PlexusError, PointTypeError, ValidationError
from plexus.point import go_json_size, make_point, validate_source_id

NOW = time.time()

# (description, metric, value, timestamp, tags, exception type, words the message must hold)
BAD_POINTS = [
    ("NaN", "m", math.nan, None, None, ValueError, ["finite", "'m'"]),
    ("+Inf", "m", math.inf, None, None, ValueError, ["finite"]),
    ("-Inf", "m", -math.inf, None, None, ValueError, ["finite"]),
    ("None", "m", None, None, None, ValueError, ["None"]),
    ("bytes", "m", b"\x00", None, None, TypeError, ["unsupported type bytes"]),
    ("set", "m", {1, 2}, None, None, TypeError, ["unsupported type set"]),
    ("object", "m", object(), None, None, TypeError, ["unsupported type object"]),
    ("nested NaN", "m", {"a": [1.0, math.nan]}, None, None, ValueError, ["value.a[1]", "finite"]),
    ("nested non-str key", "m", {1: 2}, None, None, TypeError, ["key 1", "string"]),
    ("nested bytes", "m", {"a": b"x"}, None, None, TypeError, ["value.a", "bytes"]),
    ("object over 4 KB", "m", {"k": "x" * 4100}, None, None, ValueError, ["4096 bytes"]),
    ("list over 4 KB", "m", list(range(2000)), None, None, ValueError, ["4096 bytes"]),
    ("string over 256 bytes", "m", "é" * 129, None, None, ValueError, ["256 bytes"]),
    ("int beyond 64 bits", "m", 2**64, None, None, ValueError, ["64 bits"]),
    ("empty metric", "", 1.0, None, None, ValueError, ["metric", "1..256"]),
    ("257-char metric", "m" * 257, 1.0, None, None, ValueError, ["metric", "1..256", "257"]),
    ("metric not a string", 5, 1.0, None, None, TypeError, ["metric", "int"]),
    ("17 tags", "m", 1.0, None, {f"k{i}": "v" for i in range(17)}, ValueError, ["16 tags", "17"]),
    ("list as a tag value", "m", 1.0, None, {"k": [1]}, TypeError, ["tag", "'k'", "list"]),
    ("None as a tag value", "m", 1.0, None, {"k": None}, TypeError, ["tag", "'k'", "NoneType"]),
    ("NaN as a tag value", "m", 1.0, None, {"k": math.nan}, ValueError, ["tag", "'k'", "finite"]),
    ("non-string tag key", "m", 1.0, None, {1: "v"}, TypeError, ["tag key", "int"]),
    ("tags not a dict", "m", 1.0, None, ["a"], TypeError, ["tags", "list"]),
    ("257-char tag value", "m", 1.0, None, {"k": "v" * 257}, ValueError, ["tag", "256"]),
    ("empty tag key", "m", 1.0, None, {"": "v"}, ValueError, ["tag", "1..256"]),
    ("timestamp as string", "m", 1.0, "1700000000", None, TypeError, ["timestamp", "str"]),
    ("timestamp in ns", "m", 1.0, 1_700_000_000_000_000_000, None, ValueError, ["timestamp", "nanoseconds"]),
    ("timestamp in ms", "m", 1.0, 1_700_000_000_000, None, ValueError, ["timestamp", "milliseconds"]),
    ("negative timestamp", "m", 1.0, -1.0, None, ValueError, ["timestamp", "negative"]),
    ("far-future timestamp", "m", 1.0, NOW + 365 * 86400, None, ValueError, ["timestamp", "future"]),
    ("NaN timestamp", "m", 1.0, math.nan, None, ValueError, ["timestamp", "finite"]),
    ("bool timestamp", "m", 1.0, True, None, TypeError, ["timestamp", "bool"]),
]


@pytest.mark.parametrize(
    "metric,value,timestamp,tags,exc_type,words",
    [case[1:] for case in BAD_POINTS],
    ids=[case[0] for case in BAD_POINTS],
)
def test_bad_point_is_a_clear_error(metric, value, timestamp, tags, exc_type, words):
    with pytest.raises(PlexusError) as info:
        make_point(metric, value, timestamp, tags)
    assert isinstance(info.value, exc_type)
    assert isinstance(info.value, ValidationError)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "bad_id", ["", "Rig-01", "-rig", "rig 01", "rig/01", "r" * 257, "ünï"]
)
def test_invalid_source_id_names_the_rule(bad_id):
    with pytest.raises(ValidationError, match="source_id"):
        validate_source_id(bad_id)


def test_source_id_not_a_string():
    with pytest.raises(PointTypeError, match="source_id must be a string"):
        validate_source_id(42)


GOOD = [
    ("temperature", 72.5),
    ("count", 3),
    ("status", "running"),
    ("motor.enabled", True),
    ("position", {"x": 1.2, "y": 3.4, "z": 0.0}),
    ("joint_angles", [0.5, 1.2, -0.3]),
    ("empty", ""),
    ("m" * 256, 1.0),
]


@pytest.mark.parametrize("metric,value", GOOD)
def test_good_points_pass_unchanged(metric, value):
    point = make_point(metric, value, 1700000000.5, {"a": "b"})
    assert point == (metric, value, 1700000000500, {"a": "b"})


def test_default_timestamp_is_now_in_ms():
    before = int(time.time() * 1000)
    _, _, ts, _ = make_point("m", 1.0)
    assert before <= ts <= int(time.time() * 1000)


def test_tuple_value_becomes_list_and_int_subclass_plain():
    import enum

    class Gear(enum.IntEnum):
        PARK = 0

    assert make_point("m", (1, 2), 1.0)[1] == [1, 2]
    value = make_point("m", Gear.PARK, 1.0)[1]
    assert value == 0 and type(value) is int


def test_merged_tags_over_sixteen_are_rejected():
    base = {f"g{i}": "v" for i in range(10)}
    with pytest.raises(ValidationError, match="16 tags"):
        make_point("m", 1.0, None, {f"p{i}": "v" for i in range(7)}, base)


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@given(value=json_value)
def test_any_finite_json_value_is_accepted_or_rejected_for_size_only(value):
    import orjson

    if value is None:
        with pytest.raises(ValidationError):
            make_point("m", value, 1.0)
        return
    if isinstance(value, (dict, list)) and go_json_size(orjson.dumps(value)) > 4096:
        with pytest.raises(ValidationError, match="4096"):
            make_point("m", value, 1.0)
        return
    if isinstance(value, str) and len(value.encode()) > 256:
        with pytest.raises(ValidationError):
            make_point("m", value, 1.0)
        return
    assert make_point("m", value, 1.0)[1] == value


@given(value=st.floats())
def test_floats_valid_exactly_when_finite(value):
    if math.isfinite(value):
        assert make_point("m", value, 1.0)[1] == value
    else:
        with pytest.raises(ValidationError, match="finite"):
            make_point("m", value, 1.0)


def test_lengths_are_counted_in_utf8_bytes_like_the_platform():
    # The platform's Go gateway measures strings with len(), i.e. in UTF-8 bytes.
    assert make_point("é" * 128, 1.0, 1.0)[0] == "é" * 128
    with pytest.raises(ValidationError, match="metric"):
        make_point("é" * 129, 1.0, 1.0)
    with pytest.raises(ValidationError, match="tag"):
        make_point("m", 1.0, 1.0, {"k": "é" * 129})


def test_object_size_counts_go_html_escaping():
    # Go writes '<' as \u003c (6 bytes): 700 of them are 4,200 bytes on the platform's side.
    with pytest.raises(ValidationError, match="4096"):
        make_point("m", {"k": "<" * 700}, 1.0)
    assert make_point("m", {"k": "a" * 700}, 1.0)


@pytest.mark.parametrize("value,text", [(5, "5"), (-2, "-2"), (2.5, "2.5"), (True, "true"),
                                        (False, "false"), (1e21, "1e+21")])
def test_numbers_and_bools_as_tag_values_become_strings(value, text):
    tags = {"rig": "A", "k": value}
    assert make_point("m", 1.0, None, tags)[3] == {"rig": "A", "k": text}
    assert tags["k"] is value  # the caller's dict is left alone


def test_tag_values_from_send_and_sessions_are_stringified(plexus_receiver):
    from plexus import Plexus

    with Plexus(api_key="plx_test", source_id="rig-01", gateway_url=plexus_receiver.url,
                tags={"unit": 7}) as px:
        with px.session("run-1", tags={"lap": 3}):
            px.send("speed", 1.0, tags={"gear": 4, "pit": False})
        px.flush_buffer(timeout=10)
    (point,) = plexus_receiver.points
    assert point["tags"] == {"unit": "7", "lap": "3", "session_id": "run-1", "gear": "4",
                             "pit": "false"}
