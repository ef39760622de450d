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
    plexus_receiver.fail_next(1, status=status, error="go away")
    sink = open_sink(plexus_receiver.url)
    with pytest.raises(error, match=f"{status}: go away"):
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


# --- edges the mutation run showed untested -------------------------------------------------


def test_a_lone_bad_point_named_by_index_delivers_nothing(plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(extra_check=unlucky(0))
    sink = open_sink(rx.url)
    result = sink.send(points(1), "k")
    assert result.delivered == 0 and [i for i, _ in result.rejected] == [0]
    assert [r.idempotency_key for r in rx.requests] == ["k"]


def test_the_first_point_named_as_bad_is_taken_out_directly(plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(extra_check=unlucky(0))
    sink = open_sink(rx.url)
    result = sink.send(points(8), "k")
    assert [i for i, _ in result.rejected] == [0] and result.delivered == 7
    assert [r.idempotency_key for r in rx.requests] == ["k", "k.x0"]


def test_an_index_beyond_the_batch_is_treated_as_no_index(plexus_receiver, open_sink):
    plexus_receiver.fail_next(1, status=400, error="points[4]: from some other request")
    sink = open_sink(plexus_receiver.url)
    result = sink.send(points(4), "k")
    assert result.delivered == 4 and result.rejected == []
    assert [r.idempotency_key for r in plexus_receiver.requests] == ["k", "k.a", "k.b"]


def test_a_bad_point_in_the_first_half_after_a_split_keeps_its_index(
        plexus_receiver_factory, open_sink):
    rx = plexus_receiver_factory(extra_check=unlucky(20))
    rx.fail_next(1, status=413, error="body too large")
    sink = open_sink(rx.url)
    result = sink.send(points(100), "k")
    assert [i for i, _ in result.rejected] == [20] and result.delivered == 99
    assert [r.idempotency_key for r in rx.requests] == ["k", "k.a", "k.a.x20", "k.b"]


def test_a_batch_over_5_mib_of_json_goes_in_halves_before_any_request(plexus_receiver_factory,
                                                                       open_sink):
    rx = plexus_receiver_factory(store=False,
                                 extra_check=lambda p: "bad" if p["metric"] == "m7" else None)
    sink = open_sink(rx.url)
    blob = {"blob": "x" * 250, "more": "y" * 250}  # ~560 bytes of JSON a point
    big = [(f"m{i}", blob, T0 + i, None) for i in range(10_000)]
    assert len(sink.encode(big)) > 5 * 1024 * 1024
    result = sink.send(big, "k")
    assert result.delivered == 9_999 and result.rejected == [(7, "points[7]: bad")]
    assert [(r.idempotency_key, r.count) for r in rx.requests] == [
        ("k.a", 0), ("k.a.x7", 4_999), ("k.b", 5_000)]


def test_gzip_starts_above_gzip_min_bytes_at_the_configured_level(plexus_receiver, open_sink):
    pts = points(30)
    probe = open_sink(plexus_receiver.url)
    size = len(probe.encode(pts))
    exact = open_sink(plexus_receiver.url, gzip_min_bytes=size)
    exact.send(pts, "at-limit")
    for level in (1, 9):
        sink = open_sink(plexus_receiver.url, gzip_min_bytes=size - 1, gzip_level=level)
        sink.send(pts, f"level-{level}")
    at_limit, level1, level9 = plexus_receiver.requests
    assert not at_limit.gzip and at_limit.body_bytes == size
    body = probe.encode(pts)
    assert level1.gzip and level1.body_bytes == len(gzip.compress(body, 1, mtime=0))
    assert level9.gzip and level9.body_bytes == len(gzip.compress(body, 9, mtime=0))
    assert level1.body_bytes != level9.body_bytes


def test_sending_before_open_or_after_close_is_a_programming_error(plexus_receiver):
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    with pytest.raises(AssertionError, match=r"^open\(\) first"):
        sink.send(points(1), "k")
    sink.open("rig-01")
    client = sink._client
    assert client is not None
    sink.close()
    assert client.is_closed and sink._client is None
    with pytest.raises(AssertionError, match=r"^open\(\) first"):
        sink.send(points(1), "k")
    sink.close()  # twice is fine


def test_the_sink_stores_ingest_bodies_for_its_source(plexus_receiver, open_sink):
    codec = open_sink(plexus_receiver.url).codec("rig-07")
    assert isinstance(codec, IngestCodec) and codec.tag == "ingest:rig-07"


# --- connection options: TLS, warnings, headers, timeout, transport ----------------------------


@pytest.fixture
def tls_receiver(plexus_receiver_factory, tmp_path):  # type: ignore[no-untyped-def]
    """The local receiver behind TLS with a self-signed certificate made by openssl."""
    import ssl
    import subprocess

    from tests.support import require_binary

    openssl = require_binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    rx = plexus_receiver_factory()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = rx._server
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return rx, rx.url.replace("http://", "https://")


def test_tls_is_verified_by_default(tls_receiver):
    rx, url = tls_receiver
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=url)
    sink.open("rig-01")
    try:
        with pytest.raises(RetryableSinkError, match="CERTIFICATE_VERIFY_FAILED"):
            sink.send(points(1), "k")
    finally:
        sink.close()
    assert rx.count == 0


def test_verify_tls_off_accepts_a_self_signed_certificate_and_warns(tls_receiver, caplog):
    rx, url = tls_receiver
    sink = HttpSink(HttpSinkOptions(verify_tls=False), name="plexus", api_key=KEY,
                    gateway_url=url)
    with caplog.at_level("WARNING", logger="plexus.sinks.http"):
        sink.open("rig-01")
    try:
        assert sink.send(points(2), "k").delivered == 2
    finally:
        sink.close()
    assert [r.getMessage() for r in caplog.records if r.name == "plexus.sinks.http"] == [
        f"TLS certificate verification is OFF for {url}/ingest"]
    assert rx.count == 2


@pytest.mark.parametrize("url, key, warned", [
    ("http://192.0.2.10:8080", KEY, True),
    ("http://gateway.example", KEY, True),
    ("http://127.0.0.1:8080", KEY, False),
    ("http://localhost:8080", KEY, False),
    ("http://[::1]:8080", KEY, False),
    ("http://192.0.2.10:8080", None, False),
    ("https://192.0.2.10:8080", KEY, False),
])
def test_a_key_over_plain_http_to_another_host_warns(caplog, url, key, warned):
    sink = HttpSink(name="plexus", api_key=key, gateway_url=url)
    with caplog.at_level("WARNING", logger="plexus.sinks.http"):
        sink.open("rig-01")  # no request is made
    sink.close()
    host = url.split("//")[1].split(":")[0]
    expected = [f"sending the API key over plain http:// to {host}; use https:// outside a lab"]
    got = [r.getMessage() for r in caplog.records if r.name == "plexus.sinks.http"]
    assert got == (expected if warned else [])


def test_requests_name_the_client_and_the_content_type(plexus_receiver, open_sink):
    sink = open_sink(plexus_receiver.url)
    sink.send(points(1), "k")
    headers = {k.lower(): v for k, v in plexus_receiver.requests[0].headers.items()}
    assert headers["user-agent"] == "plexus-gateway/0.1"
    assert headers["content-type"] == "application/json"
    assert headers["x-api-key"] == KEY and headers["idempotency-key"] == "k"
    assert sink.requests == 1
    sink.send(points(1), "k2")
    assert sink.requests == 2


def test_a_request_slower_than_the_timeout_is_retryable(plexus_receiver, open_sink):
    plexus_receiver.delay_next(1, 1.0)
    sink = open_sink(plexus_receiver.url, timeout=0.2)
    with pytest.raises(RetryableSinkError, match="ReadTimeout"):
        sink.send(points(1), "k")


def test_a_refused_connection_is_retryable(plexus_receiver, open_sink):
    sink = open_sink(plexus_receiver.url)
    plexus_receiver.go_down()
    try:
        with pytest.raises(RetryableSinkError, match="ConnectError"):
            sink.send(points(1), "k")
    finally:
        plexus_receiver.come_up()


def test_options_name_the_platform_and_key_over_the_arguments(plexus_receiver_factory):
    rx = plexus_receiver_factory(api_keys=["plx_from_options"])
    sink = HttpSink(HttpSinkOptions(gateway_url=rx.url + "//", api_key="plx_from_options"),
                    name="mine", api_key="plx_argument", gateway_url="http://127.0.0.1:9")
    assert sink.name == "mine" and sink.url == rx.url + "/ingest"
    sink.open("rig-01")
    try:
        assert sink.send(points(1), "k").delivered == 1
    finally:
        sink.close()
    assert sink.source_id == "rig-01"
    assert HttpSink(api_key=KEY).url == "https://gateway.plexus.company/ingest"
    assert HttpSink(api_key=KEY).name == "plexus"


def test_an_https_url_is_accepted_and_only_slashes_are_trimmed():
    assert HttpSink(api_key=KEY, gateway_url="https://gw.example").url == \
        "https://gw.example/ingest"
    assert HttpSink(api_key=KEY, gateway_url="https://GW.EXAMPLEX/").url == \
        "https://GW.EXAMPLEX/ingest"


def test_a_transport_can_be_passed_in():
    import httpx

    seen: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, json={"count": 2})

    sink = HttpSink(name="plexus", api_key=KEY, gateway_url="http://gw.example",
                    transport=httpx.MockTransport(answer))
    sink.open("rig-01")
    try:
        assert sink.send(points(2), "k").delivered == 2
    finally:
        sink.close()
    assert len(seen) == 1


@pytest.mark.parametrize("status, body, error, count", [
    (200, b'{"count": 3}', "OK", 3),
    (200, b"", "OK", -1),
    (200, b"[1, 2]", "OK", -1),
    (200, b"not json", "OK", -1),
    (200, b'{"count": "3"}', "OK", -1),
    (503, b'{"error": "overloaded"}', "overloaded", -1),
    (503, b"", "Service Unavailable", -1),
    (400, b'{"error": "' + b"e" * 600 + b'"}', "e" * 500, -1),
    (599, b"", "", -1),
])
def test_answers_are_read_leniently(status, body, error, count):
    import httpx

    from plexus.sinks.http import _parse_response

    response = httpx.Response(status, content=body)
    assert _parse_response(response) == (error, count)


def test_a_missing_key_error_says_where_to_put_one(plexus_receiver):
    sink = HttpSink(name="plexus", gateway_url=plexus_receiver.url)
    sink.open("rig-01")
    try:
        with pytest.raises(AuthenticationError) as info:
            sink.send(points(1), "k")
    finally:
        sink.close()
    assert str(info.value) == (
        "no API key: set the environment variable PLEXUS_API_KEY (or api_key in the rig file, "
        '{"api_key": ...} in ~/.plexus/config.json, or Plexus(api_key=...) in Python)')


# --- check_key (plexus-gateway --check --online) ---------------------------------------------


def test_check_key_accepts_a_good_key_and_stores_nothing(plexus_receiver):
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    assert sink.check_key("rig-01") is None
    (request,) = plexus_receiver.requests
    assert request.idempotency_key == "key-check" and request.points == 0
    assert plexus_receiver.count == 0
    assert sink._client is None  # it closed its own client


@pytest.mark.parametrize("status", [401, 403])
def test_check_key_says_when_the_key_is_refused(plexus_receiver, status):
    plexus_receiver.fail_next(1, status=status, error="nope")
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    assert sink.check_key("rig-01") == (
        f"the platform at {plexus_receiver.url}/ingest refused the API key ({status}: nope)")


def test_check_key_reports_other_answers_and_an_unreachable_platform(plexus_receiver):
    plexus_receiver.fail_next(1, status=500, error="down for maintenance")
    sink = HttpSink(name="plexus", api_key=KEY, gateway_url=plexus_receiver.url)
    assert sink.check_key("rig-01") == (
        f"the platform at {plexus_receiver.url}/ingest answered 500: down for maintenance")
    plexus_receiver.go_down()
    try:
        message = sink.check_key("rig-01")
    finally:
        plexus_receiver.come_up()
    assert message is not None and message.startswith(
        f"cannot reach the platform at {plexus_receiver.url}/ingest: ConnectError")
    assert sink._client is None


def test_check_key_without_a_key_asks_nothing(plexus_receiver):
    sink = HttpSink(name="plexus", gateway_url=plexus_receiver.url)
    assert sink.check_key("rig-01") == "no API key"
    assert plexus_receiver.requests == []


def test_bytes_sent_count_what_went_on_the_wire_even_when_the_answer_is_lost(plexus_receiver,
                                                                              open_sink):
    sink = open_sink(plexus_receiver.url, timeout=0.3)
    sink.send(points(1), "a")
    assert sink.bytes_sent == plexus_receiver.requests[0].body_bytes > 0
    sent = sink.bytes_sent
    plexus_receiver.delay_next(1, 1.0)
    with pytest.raises(RetryableSinkError, match="ReadTimeout"):
        sink.send(points(1), "b")
    assert sink.bytes_sent == 2 * sent  # the body went out; only the answer was lost
    plexus_receiver.go_down()
    try:
        with pytest.raises(RetryableSinkError, match="ConnectError"):
            sink.send(points(1), "c")
    finally:
        plexus_receiver.come_up()
    assert sink.bytes_sent == 2 * sent  # refused: nothing went out
