"""The pipeline on its own: validate, stamp (global tags, sessions), fan out to lanes.

The lanes here are real memory buffers whose uploaders are never started, so
every point the pipeline buffered can be read back exactly as stamped; the
end-to-end path over HTTP is covered in test_client.py.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from plexus.buffer import MemoryBuffer
from plexus.errors import (
    BufferingError,
    ClientClosedError,
    PlexusError,
    PointTypeError,
    ValidationError,
)
from plexus.pipeline import Pipeline, SourceContext
from plexus.point import Point
from plexus.sinks.http import HttpSink

KEY = "plx_test"


def lane_pipeline(lanes: int = 1, tags: dict[str, str] | None = None,
                  max_points: int = 100_000) -> Pipeline:
    pipeline = Pipeline("rig-01", tags=tags)
    for n in range(lanes):
        sink = HttpSink(name=f"sink{n}", api_key=KEY, gateway_url="http://127.0.0.1:9")
        pipeline.add_lane(sink, MemoryBuffer(max_points))
    return pipeline


def buffered(pipeline: Pipeline, lane: int = 0) -> list[Point]:
    buffer = pipeline.lanes[lane].buffer
    batch = buffer.take(1_000_000)
    return [] if batch is None else list(batch.points)


def tags_of(pipeline: Pipeline) -> list[dict[str, str] | None]:
    return [p[3] for p in buffered(pipeline)]


# --- sessions -----------------------------------------------------------------------------


def test_send_batch_inside_a_session_carries_the_session():
    pipeline = lane_pipeline(tags={"rig": "A"})
    with pipeline.session("run-7", tags={"driver": "ana"}):
        assert pipeline.emit_many([("a", 1.0), ("b", 2.0)]) == 2
        assert pipeline.emit_many([("c", 3.0)], tags={"driver": "bo", "k": "v"}) == 1
    pipeline.emit_many([("d", 4.0)])
    assert tags_of(pipeline) == [
        {"rig": "A", "session_id": "run-7", "driver": "ana"},
        {"rig": "A", "session_id": "run-7", "driver": "ana"},
        {"rig": "A", "session_id": "run-7", "driver": "bo", "k": "v"},
        {"rig": "A"},
    ]


def test_sessions_nest_and_ending_the_inner_one_restores_the_outer():
    pipeline = lane_pipeline()
    pipeline.emit("before", 0.0)
    pipeline.begin_session("outer", {"op": "a", "shift": "1"})
    pipeline.emit("outer", 1.0)
    pipeline.begin_session("inner", {"op": "b"})
    assert pipeline.current_session == "inner"
    pipeline.emit("inner", 2.0)
    pipeline.end_session("inner")
    assert pipeline.current_session == "outer"
    pipeline.emit("outer-again", 3.0)
    pipeline.end_session("outer")
    assert pipeline.current_session is None
    pipeline.emit("after", 4.0)
    assert tags_of(pipeline) == [
        None,
        {"op": "a", "shift": "1", "session_id": "outer"},
        {"op": "b", "shift": "1", "session_id": "inner"},
        {"op": "a", "shift": "1", "session_id": "outer"},
        None,
    ]


def test_ending_an_outer_session_keeps_the_inner_one():
    pipeline = lane_pipeline()
    pipeline.begin_session("a", {"x": "1"})
    pipeline.begin_session("b", {"y": "2"})
    pipeline.end_session("a")
    pipeline.emit("m", 1.0)
    assert pipeline.current_session == "b"
    assert tags_of(pipeline) == [{"y": "2", "session_id": "b"}]


def test_the_same_session_id_twice_ends_the_innermost_first():
    pipeline = lane_pipeline()
    pipeline.begin_session("s", {"level": "outer"})
    pipeline.begin_session("s", {"level": "inner"})
    pipeline.end_session("s")
    pipeline.emit("m", 1.0)
    pipeline.end_session("s")
    pipeline.emit("m", 2.0)
    assert tags_of(pipeline) == [{"level": "outer", "session_id": "s"}, None]


def test_ending_a_session_that_is_not_open_warns_and_changes_nothing(caplog):
    pipeline = lane_pipeline()
    pipeline.begin_session("open")
    with caplog.at_level(logging.WARNING, logger="plexus.pipeline"):
        pipeline.end_session("never-begun")
    assert [r.getMessage() for r in caplog.records] == [
        "end_session('never-begun'): no such session is open"]
    assert pipeline.current_session == "open"
    pipeline.emit("m", 1.0)
    assert tags_of(pipeline) == [{"session_id": "open"}]


@pytest.mark.parametrize("bad", ["", "s" * 257, 5, None])
def test_a_bad_session_id_is_refused(bad: Any):
    pipeline = lane_pipeline()
    with pytest.raises(ValidationError, match=r"session_id must be a string of 1\.\.256"):
        pipeline.begin_session(bad)
    assert pipeline.current_session is None


def test_a_session_id_of_256_characters_is_accepted():
    pipeline = lane_pipeline()
    pipeline.begin_session("s" * 256)
    assert pipeline.current_session == "s" * 256


def test_a_session_whose_tags_would_exceed_16_is_refused_and_not_opened():
    pipeline = lane_pipeline(tags={f"g{i}": "v" for i in range(10)})
    pipeline.begin_session("ok", {f"s{i}": "v" for i in range(5)})  # 10 + 5 + session_id
    with pytest.raises(ValidationError, match="at most 16 tags"):
        pipeline.begin_session("too-many", {"one": "more"})
    assert pipeline.current_session == "ok"
    pipeline.emit("m", 1.0)
    (tags,) = tags_of(pipeline)
    assert tags is not None and len(tags) == 16 and tags["session_id"] == "ok"


def test_session_tags_of_the_wrong_type_are_refused():
    pipeline = lane_pipeline()
    with pytest.raises(PointTypeError):
        pipeline.begin_session("s", {"k": [1]})  # type: ignore[dict-item]
    assert pipeline.current_session is None


def test_the_session_context_manager_ends_the_session_on_error():
    pipeline = lane_pipeline()
    with pytest.raises(RuntimeError):
        with pipeline.session("s"):
            raise RuntimeError("boom")
    assert pipeline.current_session is None


def test_sessions_apply_to_every_thread():
    pipeline = lane_pipeline()
    with pipeline.session("shared"):
        thread = threading.Thread(target=pipeline.emit, args=("t", 1.0))
        thread.start()
        thread.join()
    assert tags_of(pipeline) == [{"session_id": "shared"}]


# --- emit and emit_many -------------------------------------------------------------------


def test_emit_stamps_now_in_milliseconds_and_global_tags():
    pipeline = lane_pipeline(tags={"rig": "A"})
    before = time.time_ns() // 1_000_000
    assert pipeline.emit("m", 1.5) is True
    after = time.time_ns() // 1_000_000
    ((metric, value, ts, tags),) = buffered(pipeline)
    assert (metric, value, tags) == ("m", 1.5, {"rig": "A"})
    assert before <= ts <= after


def test_emit_with_a_timestamp_and_tags_merges_them_point_tags_winning():
    pipeline = lane_pipeline(tags={"rig": "A", "k": "global"})
    pipeline.emit("m", 1, timestamp=1_700_000_000.25, tags={"k": "mine"})
    assert buffered(pipeline) == [("m", 1, 1_700_000_000_250, {"rig": "A", "k": "mine"})]


@pytest.mark.parametrize("metric, value, error", [
    ("", 1.0, ValidationError), ("m" * 257, 1.0, ValidationError), (3, 1.0, PointTypeError),
    ("é" * 129, 1.0, ValidationError), ("m", float("nan"), ValidationError),
    ("m", float("inf"), ValidationError), ("m", None, ValidationError),
    ("m", object(), PointTypeError),
])
def test_emit_refuses_a_bad_point_and_buffers_nothing(metric: Any, value: Any, error: type):
    pipeline = lane_pipeline()
    with pytest.raises(error) as info:
        pipeline.emit(metric, value)
    if metric == "m":
        assert str(info.value).startswith("value of 'm' ")
    assert len(pipeline) == 0


@pytest.mark.parametrize("metric, value, sent", [
    ("m" * 64, 1.0, 1.0), ("m" * 65, 1.0, 1.0), ("é" * 128, 2.0, 2.0), ("m", 3, 3),
    ("m", True, True), ("m", "on", "on"), ("m", (1, 2), [1, 2]),
])
def test_emit_accepts_every_kind_of_good_point(metric: str, value: Any, sent: Any):
    pipeline = lane_pipeline()
    pipeline.emit(metric, value)
    ((m, v, _ts, _tags),) = buffered(pipeline)
    assert m == metric and v == sent and type(v) is type(sent)


def test_emit_many_shares_one_timestamp_and_is_all_or_nothing():
    pipeline = lane_pipeline()
    assert pipeline.emit_many([("a", 1), ("b", 2)], timestamp=1_700_000_000) == 2
    assert buffered(pipeline) == [("a", 1, 1_700_000_000_000, None),
                                  ("b", 2, 1_700_000_000_000, None)]
    pipeline = lane_pipeline()
    with pytest.raises(ValidationError, match=r"^points\[2\]: value of 'c' must be a finite"):
        pipeline.emit_many([("a", 1), ("b", 2), ("c", float("nan"))])
    with pytest.raises(PointTypeError, match=r"^points\[1\]: metric must be a string"):
        pipeline.emit_many([("a", 1), (5, 2)])
    with pytest.raises(PointTypeError, match=r"points\[1\] must be a \(metric, value\) or "
                                             r"\(metric, value, timestamp\) tuple"):
        pipeline.emit_many([("a", 1), ("b", 2, 3, 4)])  # type: ignore[list-item]
    with pytest.raises(PointTypeError, match=r"points\[0\] must be a \(metric, value\)"):
        pipeline.emit_many([7])  # type: ignore[list-item]
    assert len(pipeline) == 0


def test_emit_many_stamps_now_by_default():
    pipeline = lane_pipeline()
    before = int(time.time() * 1000)
    pipeline.emit_many([("a", 1)])
    ((_m, _v, ts, _t),) = buffered(pipeline)
    assert before <= ts <= int(time.time() * 1000)


def test_emit_many_after_close_raises():
    pipeline = lane_pipeline()
    pipeline.close(timeout=0)
    closed = "^this client is closed; create a new Plexus\\(\\) to send$"
    with pytest.raises(ClientClosedError, match=closed):
        pipeline.emit_many([("a", 1)])
    with pytest.raises(ClientClosedError, match=closed):
        pipeline.emit("a", 1)
    assert pipeline.closed is True


def test_a_pipeline_without_a_sink_says_so():
    pipeline = Pipeline("rig-01")
    with pytest.raises(PlexusError, match="^the pipeline has no sink$"):
        pipeline.emit("m", 1.0)


def test_the_alarm_runs_after_the_point_is_buffered_and_can_be_removed():
    pipeline = lane_pipeline()
    calls: list[int] = []

    def alarm() -> None:
        calls.append(len(pipeline))
        raise PlexusError("key refused")

    pipeline.set_alarm(alarm)
    with pytest.raises(PlexusError, match="key refused"):
        pipeline.emit("m", 1.0)
    with pytest.raises(PlexusError, match="key refused"):
        pipeline.emit_many([("m", 2.0)])
    assert calls == [1, 2]
    pipeline.set_alarm(None)
    pipeline.emit("m", 3.0)
    assert [p[1] for p in buffered(pipeline)] == [1.0, 2.0, 3.0]


# --- lanes --------------------------------------------------------------------------------


def test_every_lane_gets_every_point():
    pipeline = lane_pipeline(lanes=3)
    pipeline.emit("m", 1.0)
    pipeline.emit_many([("n", 2.0)])
    for lane in range(3):
        assert [(p[0], p[1]) for p in buffered(pipeline, lane)] == [("m", 1.0), ("n", 2.0)]


class FailingBuffer(MemoryBuffer):
    def put(self, point: Point) -> None:
        raise BufferingError("this disk is full")


def test_a_failing_lane_does_not_starve_the_others():
    pipeline = Pipeline("rig-01")
    sink = HttpSink(name="bad", api_key=KEY, gateway_url="http://127.0.0.1:9")
    pipeline.add_lane(sink, FailingBuffer())
    sink2 = HttpSink(name="good", api_key=KEY, gateway_url="http://127.0.0.1:9")
    pipeline.add_lane(sink2, MemoryBuffer())
    with pytest.raises(BufferingError, match="this disk is full"):
        pipeline.emit("m", 1.0)
    assert [p[1] for p in buffered(pipeline, 1)] == [1.0]


def test_len_is_the_slowest_lane_and_dropped_is_the_sum():
    pipeline = lane_pipeline(lanes=2, max_points=10)
    for i in range(5):
        pipeline.emit("m", i)
    pipeline.lanes[1].buffer.put_many([("x", 0, 0, None)] * 3)
    assert len(pipeline) == 8
    assert pipeline.dropped == 0
    pipeline.lanes[0].buffer.dropped = 2
    pipeline.lanes[1].buffer.dropped = 3
    assert pipeline.dropped == 5
    assert len(Pipeline("rig-01")) == 0


def test_close_reports_what_a_memory_buffer_loses(caplog):
    pipeline = lane_pipeline()
    pipeline.emit("m", 1.0)
    with caplog.at_level(logging.WARNING, logger="plexus.pipeline"):
        pipeline.close(timeout=0)
        pipeline.close(timeout=0)  # a second close does nothing
    assert caplog.text.count("1 points were not delivered to sink0 before shutdown and are "
                             "lost (memory buffer)") == 1


def test_source_ids_and_global_tags_are_checked():
    with pytest.raises(ValidationError, match="source_id"):
        Pipeline("Bad Id")
    with pytest.raises(PointTypeError):
        Pipeline("rig-01", tags={"k": [1]})  # type: ignore[dict-item]
    tags = {"k": "v"}
    pipeline = lane_pipeline(tags=tags)
    tags["k"] = "changed later"  # the pipeline kept its own copy
    pipeline.emit("m", 1.0)
    assert tags_of(pipeline) == [{"k": "v"}]


# --- what an adapter sees -----------------------------------------------------------------


def test_a_source_context_adds_its_tags_and_a_points_tags_win():
    pipeline = lane_pipeline(tags={"rig": "A"})
    ctx = SourceContext(pipeline, tags={"bus": "can0", "k": "source"})
    ctx.emit("a", 1.0)
    ctx.emit("b", 2.0, tags={"k": "point"})
    ctx.emit("c", 3.0, timestamp=1_700_000_000)
    plain = SourceContext(pipeline)
    plain.emit("d", 4.0, tags={"x": "y"})
    points = buffered(pipeline)
    assert [p[3] for p in points] == [
        {"rig": "A", "bus": "can0", "k": "source"},
        {"rig": "A", "bus": "can0", "k": "point"},
        {"rig": "A", "bus": "can0", "k": "source"},
        {"rig": "A", "x": "y"},
    ]
    assert points[2][2] == 1_700_000_000_000


def test_a_source_context_opens_pipeline_wide_sessions():
    pipeline = lane_pipeline()
    ctx = SourceContext(pipeline)
    pipeline.begin_session("gateway-run")
    ctx.begin_session("flight-1", {"vehicle": "1"})
    pipeline.emit("during", 1.0)
    ctx.end_session("flight-1")
    pipeline.emit("after", 2.0)
    assert tags_of(pipeline) == [{"vehicle": "1", "session_id": "flight-1"},
                                 {"session_id": "gateway-run"}]


def test_source_context_tags_are_checked():
    with pytest.raises(ValidationError):
        SourceContext(lane_pipeline(), tags={f"k{i}": "v" for i in range(17)})


def test_the_adapter_tests_collecting_context_stamps_sessions_like_the_pipeline():
    """tests.support.CollectingContext stands in for the pipeline in adapter unit
    tests; the same nested begin/end sequence must stamp the same tags."""
    from tests.support import CollectingContext

    steps: list[tuple[str, str, dict[str, str] | None]] = [
        ("begin", "gateway-run", {"rig": "A"}), ("emit", "", None),
        ("begin", "flight-1", {"vehicle": "1"}), ("emit", "", None),
        ("begin", "flight-1", {"leg": "2"}), ("emit", "", None),
        ("end", "flight-1", None), ("emit", "", None),
        ("end", "no-such", None), ("emit", "", None),
        ("end", "gateway-run", None), ("emit", "", None),
        ("end", "flight-1", None), ("emit", "", None),
    ]
    pipeline = lane_pipeline()
    collector = CollectingContext()
    for kind, sid, tags in steps:
        for target in (pipeline, collector):
            if kind == "begin":
                target.begin_session(sid, tags)
            elif kind == "end":
                target.end_session(sid)
            else:
                target.emit("m", 1.0)
        assert collector.current_session == pipeline.current_session
    assert [p[3] for p in collector.points] == tags_of(pipeline)



# --- a running pipeline: lanes, codecs, close -------------------------------------------------


def test_a_new_pipeline_is_open_and_a_lane_gets_its_options():
    pipeline = Pipeline("rig-01")
    assert pipeline.closed is False
    sink = HttpSink(name="s", api_key=KEY, gateway_url="http://127.0.0.1:9")
    lane = pipeline.add_lane(sink, MemoryBuffer(), batch_size=123, interval=4.5)
    assert (lane.uploader.batch_size, lane.uploader.interval) == (123, 4.5)
    assert lane.sink is sink and lane.buffer is pipeline.lanes[0].buffer


def test_a_lane_buffer_stores_what_its_sink_sends(tmp_path):
    from plexus.sqlite_buffer import SqliteBuffer

    pipeline = Pipeline("rig-01")
    buffer = SqliteBuffer(tmp_path / "b.db")
    try:
        pipeline.add_lane(HttpSink(name="s", api_key=KEY, gateway_url="http://127.0.0.1:9"),
                          buffer)
        assert buffer.codec.tag == "ingest:rig-01"
    finally:
        buffer.close()


def test_close_delivers_every_lane_and_reports_nothing_lost(plexus_receiver_factory, caplog):
    receivers = [plexus_receiver_factory() for _ in range(2)]
    pipeline = Pipeline("rig-01")
    for n, rx in enumerate(receivers):
        pipeline.add_lane(HttpSink(name=f"s{n}", api_key=KEY, gateway_url=rx.url),
                          MemoryBuffer(), interval=60.0)
    pipeline.start()
    for i in range(5):
        pipeline.emit("m", i)
    with caplog.at_level(logging.WARNING, logger="plexus.pipeline"):
        pipeline.close(timeout=10)
    assert [rx.count for rx in receivers] == [5, 5]
    assert caplog.records == []
    assert all(not lane.uploader.running for lane in pipeline.lanes)


def test_close_gives_lanes_their_time_in_parallel_and_says_what_is_left(
        plexus_receiver_factory, tmp_path, caplog):
    from plexus.sqlite_buffer import SqliteBuffer
    from plexus.uploader import RetryPolicy

    dead = [plexus_receiver_factory() for _ in range(3)]
    for rx in dead:
        rx.go_down()
    pipeline = Pipeline("rig-01")
    retry = RetryPolicy(retries=100, base=0.05, max_delay=0.1)
    for n, rx in enumerate(dead):
        buffer = SqliteBuffer(tmp_path / f"b{n}.db") if n == 2 else MemoryBuffer()
        pipeline.add_lane(HttpSink(name=f"s{n}", api_key=KEY, gateway_url=rx.url), buffer,
                          interval=60.0, retry=retry)
    pipeline.start()
    for i in range(4):
        pipeline.emit("m", i)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="plexus.pipeline"):
        pipeline.close(timeout=1.0)
    # One after another would take 3 s or more.
    assert time.monotonic() - started < 2.7
    assert sorted(r.getMessage() for r in caplog.records if r.name == "plexus.pipeline") == [
        "4 points were not delivered to s0 before shutdown and are lost (memory buffer)",
        "4 points were not delivered to s1 before shutdown and are lost (memory buffer)",
        "4 points were not delivered to s2 before shutdown; they stay in the persistent buffer",
    ]
    for rx in dead:
        rx.come_up()


# --- emit_many with a timestamp per reading -------------------------------------------------


def test_emit_many_takes_a_timestamp_per_reading():
    import enum

    class Epoch(enum.IntEnum):
        LATER = 1_700_000_009

    pipeline = lane_pipeline()
    pipeline.emit_many([("a", 1, 1_700_000_000.5), ("b", 2, None), ("c", 3, 1_700_000_001),
                        ("d", 4), ("e", 5, 0), ("f", 6, Epoch.LATER), ("g", 7, 0.25)],
                       timestamp=1_600_000_000)
    assert [(p[0], p[2]) for p in buffered(pipeline)] == [
        ("a", 1_700_000_000_500), ("b", 1_600_000_000_000), ("c", 1_700_000_001_000),
        ("d", 1_600_000_000_000), ("e", 0), ("f", 1_700_000_009_000), ("g", 250)]


@pytest.mark.parametrize("when, error, words", [
    (-1.0, ValidationError, "must not be negative"),
    (time.time() + 30 * 86400, ValidationError, "more than 7 days in the future"),
    (1.7e12, ValidationError, "it looks like milliseconds"),
    ("1700000000", PointTypeError, "got str"),
    (float("nan"), ValidationError, "finite"),
])
def test_a_bad_reading_timestamp_is_refused_with_its_index(when: Any, error: type, words: str):
    pipeline = lane_pipeline()
    with pytest.raises(error) as info:
        pipeline.emit_many([("a", 1, 1_700_000_000), ("b", 2, when)])
    assert str(info.value).startswith("points[1]: ") and words in str(info.value)
    assert len(pipeline) == 0


@pytest.mark.parametrize("metric, value, words", [
    ("", 1.0, "metric must be 1..256"),
    ("m" * 300, 1.0, "metric must be 1..256"),
    ("é" * 129, 1.0, "metric must be 1..256"),
    ("m", 2**64, "does not fit in 64 bits"),
    ("m", "é" * 200, "at most 256 bytes"),
    ("m", None, "the platform rejects null values"),
])
def test_emit_many_checks_every_metric_and_value(metric: Any, value: Any, words: str):
    pipeline = lane_pipeline()
    with pytest.raises(ValidationError) as info:
        pipeline.emit_many([("ok", 1.0), (metric, value)])
    assert str(info.value).startswith("points[1]: ") and words in str(info.value)


def test_emit_many_accepts_every_kind_of_good_reading():
    pipeline = lane_pipeline()
    long_name = "m" * 200
    pipeline.emit_many([(long_name, 1.0), ("s", "text"), ("i", 3), ("b", True),
                        ("o", {"x": 1}), ("l", (1, 2)), ("z", 0.0)])
    assert [(p[0], p[1]) for p in buffered(pipeline)] == [
        (long_name, 1.0), ("s", "text"), ("i", 3), ("b", True), ("o", {"x": 1}),
        ("l", [1, 2]), ("z", 0.0)]


def test_close_delivers_more_than_one_batch_within_its_time(plexus_receiver):
    pipeline = Pipeline("rig-01")
    pipeline.add_lane(HttpSink(name="s", api_key=KEY, gateway_url=plexus_receiver.url),
                      MemoryBuffer(), interval=60.0, max_batch=2)
    pipeline.start()
    for i in range(5):
        pipeline.emit("m", i)
    pipeline.close(timeout=10)
    assert sorted(p["value"] for p in plexus_receiver.points) == [0, 1, 2, 3, 4]


def test_close_with_no_time_makes_no_retries(plexus_receiver):
    from plexus.uploader import RetryPolicy

    plexus_receiver.go_down()
    pipeline = Pipeline("rig-01")
    lane = pipeline.add_lane(HttpSink(name="s", api_key=KEY, gateway_url=plexus_receiver.url),
                             MemoryBuffer(), interval=60.0,
                             retry=RetryPolicy(retries=50, base=0.02, max_delay=0.05))
    pipeline.start()
    pipeline.emit("m", 1)
    pipeline.close(timeout=0)
    assert lane.uploader.stats.failures <= 2  # one attempt, not a second of retries
    plexus_receiver.come_up()


def test_flush_delivers_every_lane_and_says_so(plexus_receiver_factory):
    receivers = [plexus_receiver_factory() for _ in range(2)]
    pipeline = Pipeline("rig-01")
    for n, rx in enumerate(receivers):
        pipeline.add_lane(HttpSink(name=f"s{n}", api_key=KEY, gateway_url=rx.url),
                          MemoryBuffer(), interval=60.0)
    pipeline.start()
    try:
        pipeline.emit_many([("m", 1), ("n", 2)])
        assert pipeline.flush(timeout=10) is True
        assert [rx.count for rx in receivers] == [2, 2] and len(pipeline) == 0
    finally:
        pipeline.close(timeout=1)
