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
    ("None", "m", None, None, None, ValueError,
     ["value of 'm' is None; the platform rejects null values"]),
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


# --- every limit at its edge: the last accepted value, and the first refused ----------

from plexus.point import (  # noqa: E402
    MAX_FUTURE_SECONDS,
    check_tags,
    json_lines,
    merge_tags,
    timestamp_ms,
    utf8_len,
)


def test_exactly_sixteen_tags_are_accepted():
    sixteen = {f"k{i}": "v" for i in range(16)}
    assert make_point("m", 1.0, 1.0, sixteen)[3] == sixteen
    assert check_tags(sixteen) is sixteen
    with pytest.raises(ValidationError, match="at most 16 tags.*got 17"):
        check_tags({**sixteen, "k16": "v"})


def test_sixteen_tags_after_merging_are_accepted_and_seventeen_are_not():
    base = {f"g{i}": "v" for i in range(8)}
    merged = make_point("m", 1.0, 1.0, {f"p{i}": "v" for i in range(8)}, base)[3]
    assert merged is not None and len(merged) == 16
    with pytest.raises(ValidationError, match=r"got 17 \(8 from the client/session, 9 given\)"):
        make_point("m", 1.0, 1.0, {f"p{i}": "v" for i in range(9)}, base)
    # A point's own tag replaces the client's of the same name: still 16.
    overlap = make_point("m", 1.0, 1.0, {**{f"p{i}": "v" for i in range(8)}, "g0": "mine"}, base)
    assert overlap[3] is not None and len(overlap[3]) == 16 and overlap[3]["g0"] == "mine"


def test_merge_tags_keeps_what_it_is_given_when_one_side_is_empty():
    base = {"a": "1"}
    assert merge_tags(base, None) is base and merge_tags(base, {}) is base
    extra = {"b": "2"}
    assert merge_tags(None, extra) is extra and merge_tags({}, extra) is extra
    assert merge_tags(base, {"a": "2", "c": "3"}) == {"a": "2", "c": "3"}
    assert base == {"a": "1"}  # shared dicts are never changed
    with pytest.raises(PointTypeError):
        merge_tags(base, {"k": [1]})  # type: ignore[dict-item]


@pytest.mark.parametrize("key, value", [
    ("k" * 256, "v"), ("k", "v" * 256), ("é" * 128, "v"), ("k", "é" * 128), ("k", ""),
    ("k" * 64, "é" * 128), ("é" * 64, "v" * 256),
])
def test_tag_keys_and_values_of_256_bytes_are_accepted(key, value):
    assert check_tags({key: value}) == {key: value}


@pytest.mark.parametrize("key, value", [
    ("k" * 257, "v"), ("k", "v" * 257), ("é" * 129, "v"), ("k", "é" * 129),
    ("k" * 65, "é" * 129), ("é" * 129, "v" * 65),
])
def test_tag_keys_and_values_over_256_bytes_are_refused(key, value):
    with pytest.raises(ValidationError, match=r"keys must be 1\.\.256 .* at most 256"):
        check_tags({key: value})


def test_tag_errors_name_the_tag_and_the_type():
    with pytest.raises(PointTypeError, match=r"tag key must be a string, got int \(3\)"):
        check_tags({3: "v"})
    with pytest.raises(PointTypeError, match=r"tag value of tag 'k' must be a string, got "
                                             r"bytes \(b'x'\)"):
        check_tags({"k": b"x"})
    with pytest.raises(PointTypeError, match="tags must be a dict of str to str, got tuple"):
        check_tags(("a", "b"))


def test_a_dict_subclass_and_str_subclasses_are_accepted_as_tags():
    class Tags(dict):
        pass

    class Name(str):
        pass

    tags = Tags({Name("k"): Name("v")})
    assert check_tags(tags) is tags


@pytest.mark.parametrize("metric", ["m" * 256, "é" * 128, "m", "€" * 85, "😀" * 64])
def test_metrics_of_up_to_256_bytes_are_accepted(metric):
    assert make_point(metric, 1.0, 1.0)[0] == metric


@pytest.mark.parametrize("metric", ["m" * 257, "é" * 129, "€" * 86, "😀" * 65])
def test_metrics_over_256_bytes_are_refused_with_their_size(metric):
    with pytest.raises(ValidationError, match=f"got {utf8_len(metric)} "):
        make_point(metric, 1.0, 1.0)


def test_a_long_metric_error_shows_its_start_only():
    with pytest.raises(ValidationError) as info:
        make_point("x" * 300, 1.0, 1.0)
    assert repr("x" * 40) + "..." in str(info.value) and "x" * 41 not in str(info.value)
    with pytest.raises(ValidationError, match=r"got 0$"):
        make_point("", 1.0, 1.0)


@pytest.mark.parametrize("value", ["v" * 256, "é" * 128, "€" * 85])
def test_string_values_of_256_bytes_are_accepted(value):
    assert make_point("m", value, 1.0)[1] == value


@pytest.mark.parametrize("value", ["v" * 257, "é" * 129, "€" * 86])
def test_string_values_over_256_bytes_are_refused_with_their_size(value):
    with pytest.raises(ValidationError, match=f"at most 256 bytes of UTF-8, got "
                                              f"{len(value.encode())}"):
        make_point("m", value, 1.0)


def test_ints_are_accepted_exactly_within_64_bits():
    assert make_point("m", 2**63 - 1, 1.0)[1] == 2**63 - 1
    assert make_point("m", -(2**63), 1.0)[1] == -(2**63)
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(ValidationError, match=f"does not fit in 64 bits: {bad}"):
            make_point("m", bad, 1.0)
    assert make_point("m", {"a": [2**63 - 1, -(2**63)]}, 1.0)[1] == {"a": [2**63 - 1, -(2**63)]}
    for bad in (2**63, -(2**63) - 1):
        with pytest.raises(ValidationError, match=r"value\.a\[0\] does not fit in 64 bits"):
            make_point("m", {"a": [bad]}, 1.0)


def test_bools_stay_bools_and_nested_values_keep_their_types():
    assert make_point("m", True, 1.0)[1] is True
    value = make_point("m", {"b": False, "n": None, "s": "x", "i": 3, "f": 1.5}, 1.0)[1]
    assert value == {"b": False, "n": None, "s": "x", "i": 3, "f": 1.5}
    assert [type(v) for v in value.values()] == [bool, type(None), str, int, float]


def test_json_values_of_4096_bytes_are_accepted_and_4097_are_not():
    # {"k":"..."} is 8 bytes around the string.
    assert make_point("m", {"k": "x" * 4088}, 1.0)
    with pytest.raises(ValidationError, match="at most 4096 bytes of JSON, got 4097"):
        make_point("m", {"k": "x" * 4089}, 1.0)
    # Go escapes '&' and '<' as 6 bytes and U+2028 as 6 bytes (3 in UTF-8): counted.
    assert go_json_size(b'"&<>"') == 5 + 15
    assert go_json_size('"\u2028\u2029"'.encode()) == 8 + 6


def test_subclasses_of_the_plain_types_are_sent_as_the_plain_types():
    import enum

    class Level(float):
        pass

    class Word(str):
        pass

    class Flag(enum.IntFlag):
        ON = 1

    for value, plain in ((Level(1.5), 1.5), (Word("w"), "w"), (Flag.ON, 1)):
        sent = make_point("m", value, 1.0)[1]
        assert sent == plain and type(sent) is type(plain)
    with pytest.raises(ValidationError, match="finite"):
        make_point("m", Level("nan"), 1.0)

    class Truth(int):
        pass

    assert type(make_point("m", Truth(1), 1.0)[1]) is int


def test_nested_numpy_like_values_are_refused_by_type_with_their_path():
    with pytest.raises(PointTypeError, match=r"value\.a\[1\] has unsupported type complex"):
        make_point("m", {"a": [1, 2j]}, 1.0)
    with pytest.raises(PointTypeError, match=r"key 1 at value\.d must be a string, got int"):
        make_point("m", {"d": {1: 2}}, 1.0)
    with pytest.raises(ValidationError, match=r"value\.x must be finite, got inf"):
        make_point("m", {"x": math.inf}, 1.0)


def test_timestamps_are_converted_to_milliseconds_down_to_the_epoch():
    assert timestamp_ms(0) == 0
    assert timestamp_ms(0.0) == 0
    assert timestamp_ms(1700000000.123) == 1700000000123
    assert timestamp_ms(1700000000) == 1700000000000
    import decimal

    class Seconds(float):
        pass

    assert timestamp_ms(Seconds(1.5)) == 1500
    with pytest.raises(PointTypeError, match="got Decimal"):
        timestamp_ms(decimal.Decimal(1))


def test_timestamps_up_to_a_week_ahead_are_accepted():
    soon = time.time() + MAX_FUTURE_SECONDS - 60
    assert timestamp_ms(soon) == int(soon * 1000)
    with pytest.raises(ValidationError, match="more than 7 days in the future; timestamps "
                                              r"are Unix seconds$"):
        timestamp_ms(time.time() + MAX_FUTURE_SECONDS + 60)


@pytest.mark.parametrize("value, hint", [
    (1.7e18, "nanoseconds; divide by 1e9"), (1.7e15, "microseconds; divide by 1e6"),
    (1.7e12, "milliseconds; divide by 1000"),
    # The edges: each bound belongs to the smaller unit.
    (1e17, "microseconds"), (1e17 + 16, "nanoseconds"), (1e14, "milliseconds"),
    (1e14 + 1, "microseconds"), (1e11 + 1, "milliseconds"), (1e11, None),
])
def test_a_timestamp_in_the_wrong_unit_gets_a_hint(value, hint):
    with pytest.raises(ValidationError) as info:
        timestamp_ms(value)
    hints = {"nanoseconds": "nanoseconds; divide by 1e9",
             "microseconds": "microseconds; divide by 1e6",
             "milliseconds": "milliseconds; divide by 1000"}
    if hint is None:
        assert str(info.value).endswith("timestamps are Unix seconds")
    else:
        full = hints[hint.split(";")[0]]
        assert str(info.value).endswith(f"timestamps are Unix seconds (it looks like {full})")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_timestamp_that_is_not_finite_says_so(value):
    with pytest.raises(ValidationError, match="timestamp must be finite"):
        timestamp_ms(value)


@pytest.mark.parametrize("source_id", ["r" * 256, "0", "a._-9", "z"])
def test_source_ids_at_the_edges_are_accepted(source_id):
    assert validate_source_id(source_id) == source_id


def test_source_id_errors_name_the_limit_and_pattern():
    with pytest.raises(ValidationError, match=r"1\.\.256 characters, got 257"):
        validate_source_id("r" * 257)
    with pytest.raises(ValidationError, match=r"1\.\.256 characters, got 0"):
        validate_source_id("")
    with pytest.raises(ValidationError, match=r"'_rig' is invalid.*\^\[a-z0-9\]"):
        validate_source_id("_rig")
    with pytest.raises(ValidationError) as info:
        validate_source_id("rig!")
    assert str(info.value) == (
        "source_id 'rig!' is invalid: use lower-case letters, digits, '.', '_' and '-', "
        "starting with a letter or digit (pattern ^[a-z0-9][a-z0-9._-]*$)")
    with pytest.raises(PointTypeError, match="source_id must be a string, got int"):
        validate_source_id(42)


def test_a_source_id_may_use_every_allowed_character():
    every = "0123456789abcdefghijklmnopqrstuvwxyz._-"
    assert validate_source_id(every) == every


def test_json_lines_are_one_complete_object_per_point():
    out = json_lines("rig-01", [("a", 1, 5, None), ("b", "x", 6, {"k": "v"})])
    assert out == (b'{"source_id":"rig-01","metric":"a","value":1,"timestamp":5,"tags":{}}\n'
                   b'{"source_id":"rig-01","metric":"b","value":"x","timestamp":6,'
                   b'"tags":{"k":"v"}}\n')


class FakeNumpyScalar:
    """Stands in for a numpy scalar (numpy is not a dependency): what the point
    code looks at is the type's module and ``item()``/``tolist()``."""

    def __init__(self, value: object) -> None:
        self.value = value

    def item(self) -> object:
        return self.value

    def tolist(self) -> object:
        return self.value


FakeNumpyScalar.__module__ = "numpy"


class FakeNumpyArray(FakeNumpyScalar):
    def item(self) -> object:
        raise ValueError("only size-1 arrays can be converted")


FakeNumpyArray.__module__ = "numpy"


class NotNumpy(FakeNumpyScalar):
    pass


def test_numpy_scalars_are_sent_as_python_values():
    for inner, sent in ((1.5, 1.5), (3, 3), (True, True), ("s", "s")):
        value = make_point("m", FakeNumpyScalar(inner), 1.0)[1]
        assert value == sent and type(value) is type(sent)
    with pytest.raises(ValidationError, match="value of 'm' must be a finite number"):
        make_point("m", FakeNumpyScalar(math.nan), 1.0)
    # A numpy value whose item() is not a plain scalar is refused by type.
    with pytest.raises(PointTypeError, match="value of 'm' has unsupported type FakeNumpyScalar"):
        make_point("m", FakeNumpyScalar(b"raw"), 1.0)


def test_numpy_arrays_inside_objects_become_lists():
    value = make_point("pose", {"q": FakeNumpyArray([0.5, 1.0])}, 1.0)[1]
    assert value == {"q": [0.5, 1.0]}
    with pytest.raises(ValidationError, match=r"value of 'pose': value\.q\[1\] must be finite"):
        make_point("pose", {"q": FakeNumpyArray([0.5, math.inf])}, 1.0)


def test_objects_that_only_look_like_numpy_are_refused():
    with pytest.raises(PointTypeError, match="value of 'm' has unsupported type NotNumpy; "
                                             "use a number, str, bool, dict or list$"):
        make_point("m", NotNumpy(1.0), 1.0)
    with pytest.raises(PointTypeError, match=r"value of 'm': value\.k has unsupported type "
                                             "NotNumpy$"):
        make_point("m", {"k": NotNumpy([1])}, 1.0)


def test_errors_in_nested_values_name_the_metric_and_the_path():
    with pytest.raises(PointTypeError, match=r"^value of 'pose': key 1 at value\.a must be"):
        make_point("pose", {"a": {1: 2}}, 1.0)
    with pytest.raises(ValidationError, match=r"^value of 'pose': value\.a\[0\]\.b must be "
                                              "finite"):
        make_point("pose", {"a": [{"b": math.nan}]}, 1.0)
    with pytest.raises(ValidationError, match=r"^value of 'pose': an object or list value may "
                                              "be at most 4096 bytes"):
        make_point("pose", ["x" * 5000], 1.0)


def test_subclasses_of_dict_list_and_tuple_are_checked_and_sent_plain():
    import collections

    class Row(list):
        pass

    ordered = collections.OrderedDict(a=1.5)
    assert make_point("m", ordered, 1.0)[1] == {"a": 1.5}
    assert type(make_point("m", ordered, 1.0)[1]) is dict
    assert make_point("m", Row([1, 2]), 1.0)[1] == [1, 2]
    with pytest.raises(ValidationError, match=r"^value of 'm': value\[0\] must be finite"):
        make_point("m", Row([math.nan]), 1.0)
    with pytest.raises(ValidationError, match=r"^value of 'm': value\.a must be finite"):
        make_point("m", collections.OrderedDict(a=math.inf), 1.0)


def test_float_subclasses_inside_objects_are_sent_as_floats():
    class Meters(float):
        pass

    value = make_point("m", {"d": Meters(2.5), "l": [Meters(1.0)]}, 1.0)[1]
    assert value == {"d": 2.5, "l": [1.0]}
    assert type(value["d"]) is float and type(value["l"][0]) is float


def test_a_float_subclass_error_names_the_metric():
    class Level(float):
        pass

    with pytest.raises(ValidationError, match="^value of 'tank' must be a finite number"):
        make_point("tank", Level("inf"), 1.0)


def test_a_long_tag_key_error_shows_its_first_40_characters():
    key = "k" * 39 + "LAST" + "x" * 300
    with pytest.raises(ValidationError) as info:
        check_tags({key: "v"})
    assert str(info.value).startswith(f"tag {key[:40]!r}: keys must be")


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
