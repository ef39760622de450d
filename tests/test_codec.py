"""How the persistent buffer stores points: records, blocks, and reading them back."""

from __future__ import annotations

import gzip

import orjson
import pytest

from plexus.codec import (
    BLOCK_GZIP_LEVEL,
    POINTS,
    IngestCodec,
    PointCodec,
    codec_for_tag,
    compress,
    decompress,
)

POINTS_IN = [("a", 1.5, 1_700_000_000_000, None), ("b", "on", 1_700_000_000_001, {"k": "v"}),
             ("c", {"x": [1, 2]}, 1_700_000_000_002, None), ("d", True, 5, {})]


def test_a_point_codec_block_is_a_json_array_of_point_tuples():
    records = [POINTS.record(p) for p in POINTS_IN]
    assert records[0] == b'["a",1.5,1700000000000,null]'
    raw = POINTS.block(records)
    assert orjson.loads(raw) == [list(p) for p in POINTS_IN]
    assert POINTS.points(raw) == POINTS_IN
    assert POINTS.body(raw) == b",".join(records)
    assert POINTS.tag == "points" and PointCodec.tag == "points"


def test_an_ingest_block_is_a_whole_ingest_body():
    codec = IngestCodec("rig-01")
    records = [codec.record(p) for p in POINTS_IN]
    assert records[0] == b'{"metric":"a","value":1.5,"timestamp":1700000000000}'
    assert records[1] == b'{"metric":"b","value":"on","timestamp":1700000000001,"tags":{"k":"v"}}'
    raw = codec.block(records)
    body = orjson.loads(raw)
    assert body["source_id"] == "rig-01" and len(body["points"]) == 4
    assert "tags" not in body["points"][3]  # empty tags are left out, as the sink does
    assert codec.body(raw) == b",".join(records)
    assert codec.points(raw) == [POINTS_IN[0], POINTS_IN[1], POINTS_IN[2],
                                 ("d", True, 5, None)]
    assert codec.tag == "ingest:rig-01" and codec.source_id == "rig-01"


ODD_POINTS = [
    ('quote"and\\slash', -0.0, 0, None), ("ünïcode.温度", 1e300, 2**53, {"é": "\u2028"}),
    ("tab\tnew\nline", 12345678901234567890, 1, {"a": "1", "b": ""}),
    ("x", [1.25, "s", None, {"n": False}], 7, None), ("x", "</script>", 8, None),
]


@pytest.mark.parametrize("point", POINTS_IN + ODD_POINTS)
def test_an_ingest_record_is_the_json_of_the_point_object(point):
    metric, value, ts, tags = point
    expected = {"metric": metric, "value": value, "timestamp": ts}
    if tags:
        expected["tags"] = tags
    assert IngestCodec("rig-01").record(point) == orjson.dumps(expected)


@pytest.mark.parametrize("codec", [POINTS, IngestCodec("rig-01")], ids=["points", "ingest"])
def test_records_waiting_in_memory_cost_their_size_not_4_kb_each(codec):
    import tracemalloc

    tracemalloc.start()
    try:
        records = [codec.record(("rig.sensor_1", float(i), 1_700_000_000_000 + i, None))
                   for i in range(1_000)]
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == 1_000
    assert held < 1_000 * 200  # about 100 bytes each; orjson's own output holds ~4 KB


def test_blocks_join_by_their_bodies():
    codec = IngestCodec("rig-01")
    one = codec.block([codec.record(POINTS_IN[0])])
    two = codec.block([codec.record(POINTS_IN[1])])
    joined = codec.block([codec.body(one), codec.body(two)])
    assert codec.points(joined) == [POINTS_IN[0], POINTS_IN[1]]
    a, b = POINTS.block([POINTS.record(POINTS_IN[0])]), POINTS.block([POINTS.record(POINTS_IN[1])])
    assert POINTS.points(POINTS.block([POINTS.body(a), POINTS.body(b)])) == POINTS_IN[:2]


def test_the_source_id_is_encoded_as_json():
    codec = IngestCodec('odd"id')
    assert orjson.loads(codec.block([]))["source_id"] == 'odd"id'


def test_codecs_are_found_again_by_their_tag():
    assert codec_for_tag("points") is POINTS
    found = codec_for_tag("ingest:rig-02")
    assert isinstance(found, IngestCodec) and found.source_id == "rig-02"
    with pytest.raises(ValueError, match="unknown block layout 'zstd:1'"):
        codec_for_tag("zstd:1")


def test_blocks_are_gzipped_at_level_1_without_a_timestamp():
    raw = b'{"source_id":"x","points":[]}' * 100
    data = compress(raw)
    assert data == gzip.compress(raw, compresslevel=1, mtime=0) and BLOCK_GZIP_LEVEL == 1
    assert data[4:8] == b"\0\0\0\0"  # mtime 0: the same block always compresses the same
    assert decompress(data) == raw


@pytest.mark.parametrize("damaged, message", [
    (b"not gzip", "^damaged block: "),
    (None, "^damaged block: "),  # a wrong CRC
    (b"\x1f\x8b\x08\x00", "^truncated or trailing data$"),
    ("trailing", "^truncated or trailing data$"),
])
def test_a_damaged_block_is_a_value_error(damaged, message):
    data = compress(b"x" * 1000)
    if damaged is None:
        damaged = data[:-8] + b"\xff\xff\xff\xff" + data[-4:]
    elif damaged == "trailing":
        damaged = data + b"\0"
    with pytest.raises(ValueError, match=message):
        decompress(damaged)


@pytest.mark.parametrize("raw, message", [
    (b"not json", "not JSON"),
    (b'{"a": 1}', "^a block must be a JSON array$"),
    (b'[["a", 1, 5]]', "not a stored point"),
    (b'[["a", 1, 5, null, 9]]', "not a stored point"),
    (b'[[1, 1, 5, null]]', "not a stored point"),
    (b'[["a", 1, 5.5, null]]', "not a stored point"),
    (b'[["a", 1, 5, "tags"]]', "not a stored point"),
    (b'[{"metric": "a"}]', "not a stored point"),
])
def test_point_blocks_that_are_not_ours_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        POINTS.points(raw)


@pytest.mark.parametrize("raw, message", [
    (b"[1]", "^a block must be an ingest body with a points array$"),
    (b'{"points": {}}', "a block must be an ingest body with a points array"),
    (b'{"source_id": "x"}', "a block must be an ingest body with a points array"),
    (b'{"points": [5]}', "not a point object: 5"),
    (b'{"points": [{"metric": "a", "value": 1}]}', "not a stored point"),
    (b"{", "not JSON"),
])
def test_ingest_blocks_that_are_not_ours_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        IngestCodec("x").points(raw)


def test_a_refused_row_is_quoted_briefly():
    long = b'[["' + b"m" * 200 + b'", 1, 5]]'
    with pytest.raises(ValueError) as info:
        POINTS.points(long)
    assert len(str(info.value)) == len("not a stored point: ") + 60


def test_a_zlib_stream_is_not_a_stored_block():
    import zlib

    with pytest.raises(ValueError, match="^damaged block: "):
        decompress(zlib.compress(b"x" * 100))


def test_a_refused_point_object_is_quoted_briefly():
    row = b'{"points": ["' + b"p" * 200 + b'"]}'
    with pytest.raises(ValueError) as info:
        IngestCodec("x").points(row)
    assert str(info.value) == "not a point object: " + "p" * 60
