"""The Plexus HTTP sink on its own, against the local receiver over real HTTP.

The sink reports rejected points by their index in the batch it was given;
the uploader names the rejected metric from that index and drops exactly
that point. These tests give every point its own metric, so a wrong index
names (and would drop) the wrong point.
"""

from __future__ import annotations

import gzip

import orjson
import pytest

from plexus.buffer import Batch
from plexus.codec import IngestCodec
from plexus.errors import AuthenticationError, ConfigError, RetryableSinkError
from plexus.point import MAX_POINTS_PER_REQUEST
from plexus.sinks.http import HttpSink, HttpSinkOptions

KEY = "plx_test"
T0 = 1_700_000_000_000


def points(n: int) -> list[tuple[str, int, int, None]]:
    return [(f"m{i}", i, T0 + i, None) for i in range(n)]


def unlucky(*bad: int):  # type: ignore[no-untyped-def]
    """A receiver rule: the values in ``bad`` are rejected with a 400 naming them."""
    return lambda p: f"value {p.get('value')} is unlucky" if p.get("value") in bad else None


@pytest.fixture
def open_sink():  # type: ignore[no-untyped-def]
    sinks: list[HttpSink] = []

    def make(url: str, **options) -> HttpSink:  # type: ignore[no-untyped-def]
        sink = HttpSink(HttpSinkOptions(**options), name="plexus", api_key=KEY, gateway_url=url)
        sink.open("rig-01")
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def stored_values(rx) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(p["value"] for p in rx.points)


def test_a_second_bad_point_is_reported_by_its_index_in_the_whole_batch(
        plexus_receiver_factory, open_sink):
    """After the first bad point is taken out, the receiver names the second by its
    position in the shortened request; the sink must map it back to the batch."""
    rx = plexus_receiver_factory(extra_check=unlucky(30, 70))
    sink = open_sink(rx.url)
    result = sink.send(points(100), "k")
    assert [i for i, _ in result.rejected] == [30, 70]
    assert "points[30]" in result.rejected[0][1] and "points[69]" in result.rejected[1][1]
    assert result.delivered == 98
    assert stored_values(rx) == [v for v in range(100) if v not in (30, 70)]
    # Sub-requests carry sub-keys of the batch key, so a retry repeats them.
    assert [r.idempotency_key for r in rx.requests] == ["k", "k.x30", "k.x30.x69"]


def test_a_bad_point_found_after_a_split_is_reported_by_its_batch_index(
        plexus_receiver_factory, open_sink):
    """A 413 splits the batch in halves; the bad point in the second half is named
    by its index in that half (points[20]) and reported as 70."""
    rx = plexus_receiver_factory(extra_check=unlucky(70))
    rx.fail_next(1, status=413, error="body too large")
    sink = open_sink(rx.url)
    result = sink.send(points(100), "k")
    assert [i for i, _ in result.rejected] == [70]
    assert "points[20]" in result.rejected[0][1]
    assert result.delivered == 99
    assert stored_values(rx) == [v for v in range(100) if v != 70]
    keys = [r.idempotency_key for r in rx.requests]
    assert keys == ["k", "k.a", "k.b", "k.b.x20"]


def test_a_bad_point_without_an_index_is_found_by_bisection(plexus_receiver_factory, open_sink):
    """A 400 that names no point: the batch is halved; the receiver's own rule then
    names points[1] of the second half, which is point 5 of the batch."""
    rx = plexus_receiver_factory(extra_check=unlucky(5))
    rx.fail_next(1, status=400, error="bad request")
    sink = open_sink(rx.url)
    result = sink.send(points(8), "k")
    assert [i for i, _ in result.rejected] == [5]
    assert result.delivered == 7
    assert stored_values(rx) == [0, 1, 2, 3, 4, 6, 7]
    assert [r.idempotency_key for r in rx.requests] == ["k", "k.a", "k.b", "k.b.x1"]


def fail_the_request_after(rx, trigger_values, status):  # type: ignore[no-untyped-def]
    """A receiver rule that accepts every point, but when it sees one of
    ``trigger_values`` it queues a failure (no point index) for the next request.

    It is how a test answers "ok, fail, ok, fail" to a bisection: a request's
    points are checked after the queued failures are taken, so the failure lands
    on the request that follows."""
    def check(p):  # type: ignore[no-untyped-def]
        if p.get("value") in trigger_values:
            rx.fail_next(1, status=status, error="no index")
        return None
    return check


@pytest.mark.parametrize("status", [400, 413])
def test_a_lone_point_refused_without_an_index_keeps_its_batch_index(
        plexus_receiver_factory, open_sink, status):
    """Requests: k [0..3] fails; k.a [0, 1] is stored (1 queues a failure); k.b [2, 3]
    fails; k.b.a [2] is stored (2 queues a failure); k.b.b [3] fails alone: point 3."""
    rx = plexus_receiver_factory()
    rx.extra_check = fail_the_request_after(rx, (1, 2), status)
    rx.fail_next(1, status=status, error="no index")
    sink = open_sink(rx.url)
    result = sink.send(points(4), "k")
    reason = "no index" if status == 400 else "413 no index"
    assert result.rejected == [(3, reason)]
    assert result.delivered == 3
    assert stored_values(rx) == [0, 1, 2]
    assert [r.idempotency_key for r in rx.requests] == ["k", "k.a", "k.b", "k.b.a", "k.b.b"]


def test_batches_over_the_protocol_limit_go_in_parts_with_their_own_keys(
        plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(store=False, validate=False)
    sink = open_sink(rx.url)
    n = MAX_POINTS_PER_REQUEST + 5
    result = sink.send(points(n), "big")
    assert result.delivered == n and result.rejected == []
    assert [(r.idempotency_key, r.count) for r in rx.requests] == [
        ("big.0", MAX_POINTS_PER_REQUEST), (f"big.{MAX_POINTS_PER_REQUEST}", 5)]


def test_exactly_the_limit_goes_in_one_request(plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(store=False, validate=False)
    sink = open_sink(rx.url)
    result = sink.send(points(MAX_POINTS_PER_REQUEST), "one")
    assert result.delivered == MAX_POINTS_PER_REQUEST
    assert [r.idempotency_key for r in rx.requests] == ["one"]


def test_small_bodies_go_plain_and_large_ones_gzipped(plexus_receiver, open_sink):
    sink = open_sink(plexus_receiver.url, gzip_min_bytes=200)
    sink.send(points(1), "small")
    sink.send(points(20), "large")
    small, large = plexus_receiver.requests
    assert small.gzip is False and large.gzip is True
    assert plexus_receiver.count == 21


def test_the_body_is_the_protocol_json(open_sink, plexus_receiver):
    sink = open_sink(plexus_receiver.url)
    body = orjson.loads(sink.encode([("a", 1.5, T0, None), ("b", "x", T0 + 1, {"k": "v"})]))
    assert body == {"source_id": "rig-01", "points": [
        {"metric": "a", "value": 1.5, "timestamp": T0},
        {"metric": "b", "value": "x", "timestamp": T0 + 1, "tags": {"k": "v"}}]}


def stored_batch(pts, source_id: str = "rig-01", key: str = "blk") -> Batch:  # type: ignore[no-untyped-def]
    """A batch as the persistent buffer hands it out: a gzipped /ingest body."""
    codec = IngestCodec(source_id)
    body = gzip.compress(codec.block([codec.record(p) for p in pts]), mtime=0)
    return Batch(key, list(pts), body=body, codec_tag=codec.tag)


def test_a_stored_body_goes_on_the_wire_as_it_is(plexus_receiver, open_sink):
    sink = open_sink(plexus_receiver.url)
    batch = stored_batch(points(10))
    assert sink.send_batch(batch).delivered == 10
    (request,) = plexus_receiver.requests
    assert request.gzip and request.body_bytes == len(batch.body)
    assert request.idempotency_key == "blk"
    assert stored_values(plexus_receiver) == list(range(10))


def test_a_body_stored_for_another_source_is_re_encoded(plexus_receiver, open_sink):
    """A buffer written under another source id: its bodies name the wrong source, so
    the points path builds a new body."""
    sink = open_sink(plexus_receiver.url)
    batch = stored_batch(points(3), source_id="old-rig")
    assert sink.send_batch(batch).delivered == 3
    assert {p["source_id"] for p in plexus_receiver.points} == {"rig-01"}
    assert plexus_receiver.requests[0].body_bytes != len(batch.body)


def test_a_stored_body_refused_with_400_is_isolated_by_points(plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(extra_check=unlucky(4))
    sink = open_sink(rx.url)
    result = sink.send_batch(stored_batch(points(6)))
    assert [i for i, _ in result.rejected] == [4] and result.delivered == 5
    assert [r.idempotency_key for r in rx.requests] == ["blk", "blk", "blk.x4"]
    assert stored_values(rx) == [0, 1, 2, 3, 5]


def test_a_stored_body_refused_with_413_is_split(plexus_receiver, open_sink):
    plexus_receiver.fail_next(1, status=413, error="too large for this receiver")
    sink = open_sink(plexus_receiver.url)
    result = sink.send_batch(stored_batch(points(6)))
    assert result.delivered == 6 and result.rejected == []
    assert [r.idempotency_key for r in plexus_receiver.requests] == ["blk", "blk"]


@pytest.mark.parametrize("status, error", [(401, AuthenticationError),
                                           (503, RetryableSinkError)])
def test_a_stored_body_that_fails_raises_like_points(plexus_receiver, open_sink, status, error):
    plexus_receiver.fail_next(1, status=status, error="no")
    sink = open_sink(plexus_receiver.url)
    with pytest.raises(error):
        sink.send_batch(stored_batch(points(2)))


def test_a_stored_body_rate_limited_is_retryable(plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(rate_limit_interval=60.0)
    sink = open_sink(rx.url)
    assert sink.send_batch(stored_batch(points(2), key="one")).delivered == 2
    with pytest.raises(RetryableSinkError, match="stored 0 of 2"):
        sink.send_batch(stored_batch(points(2), key="two"))


def test_a_rate_limited_answer_is_retryable_and_never_counted(plexus_receiver, open_sink):
    sink = open_sink(plexus_receiver.url)
    with pytest.raises(RetryableSinkError) as info:
        sink._stored(0, 10)
    assert info.value.retry_after is not None and 0.05 <= info.value.retry_after <= 0.15
    assert sink._stored(10, 10) == 10
    assert sink._stored(-1, 10) == 10  # a receiver that reports no count stores all


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_is_an_authentication_error(plexus_receiver, open_sink, status):
    sink = open_sink(plexus_receiver.url)
    plexus_receiver.fail_next(1, status=status, error="nope")
    with pytest.raises(AuthenticationError, match=f"{status}: nope"):
        sink.send(points(3), "k")


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_other_failures_are_retryable(plexus_receiver, open_sink, status):
    sink = open_sink(plexus_receiver.url)
    plexus_receiver.fail_next(1, status=status, error="busy")
    with pytest.raises(RetryableSinkError, match=f"{status}: busy"):
        sink.send(points(3), "k")


def test_no_key_raises_before_any_request(plexus_receiver):
    sink = HttpSink(name="plexus", api_key=None, gateway_url=plexus_receiver.url)
    sink.open("rig-01")
    try:
        with pytest.raises(AuthenticationError, match="no API key"):
            sink.send(points(1), "k")
    finally:
        sink.close()
    assert plexus_receiver.requests == []


@pytest.mark.parametrize("url", ["ftp://host", "host:8080", "http://"])
def test_a_gateway_url_that_is_not_http_is_a_config_error(url):
    with pytest.raises(ConfigError, match="http:// or https://"):
        HttpSink(name="plexus", api_key=KEY, gateway_url=url)


def test_the_url_is_the_base_plus_ingest(plexus_receiver):
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url + "/")
    assert sink.url == plexus_receiver.url + "/ingest"
    assert KEY not in repr(sink)
