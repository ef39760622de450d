"""plexus.testing.Receiver against docs/protocol.md, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import gzip
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from plexus.testing import MAX_BODY_BYTES, Receiver

KEY = "plx_test"


@pytest.fixture
def rx(plexus_receiver: Receiver) -> Receiver:
    return plexus_receiver


@pytest.fixture
def client(rx: Receiver) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}, timeout=10.0) as c:
        yield c


def ingest(client: httpx.Client, doc: Any, **headers: str) -> httpx.Response:
    return client.post("/ingest", content=orjson.dumps(doc),
                       headers={"Content-Type": "application/json", **headers})


def point(metric: str = "motor.rpm", value: Any = 3450, **extra: Any) -> dict[str, Any]:
    return {"metric": metric, "value": value, **extra}


# -- raw socket helpers (keep-alive and RST need to see the wire) -------------------------


def raw_post(sock: socket.socket, body: bytes, key: str = KEY, extra: str = "") -> None:
    head = (f"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
    sock.sendall(head.encode() + body)


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers["content-length"]))


# -- acceptance ---------------------------------------------------------------------------


def test_accepts_stores_and_normalizes(rx: Receiver, client: httpx.Client) -> None:
    before = time.time_ns() // 1_000_000
    r = ingest(client, {"source_id": "rig-01", "points": [
        point(timestamp=1_700_000_000, tags={"rig": "A"}),        # seconds
        point("temp", 21.5, timestamp=1_700_000_000_123),         # milliseconds
        point("state", "armed"),                                  # no timestamp
        point("ok", True, timestamp=1_700_000_000.25),
    ]})
    after = time.time_ns() // 1_000_000
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"success": True, "count": 4, "source_id": "rig-01"}
    pts = rx.points
    assert [p["source_id"] for p in pts] == ["rig-01"] * 4
    assert [p["class"] for p in pts] == ["metric", "metric", "event", "event"]
    assert pts[0]["timestamp"] == 1_700_000_000_000
    assert pts[0]["tags"] == {"rig": "A"}
    assert pts[1]["timestamp"] == 1_700_000_000_123
    assert before <= pts[2]["timestamp"] <= after
    assert pts[3]["timestamp"] == 1_700_000_000_250
    assert rx.count == 4
    assert rx.metrics() == {"motor.rpm": [3450], "temp": [21.5], "state": ["armed"], "ok": [True]}


def test_request_record(rx: Receiver, client: httpx.Client) -> None:
    r = ingest(client, {"source_id": "rig-01", "points": [point()]}, **{"Idempotency-Key": "b-1"})
    assert r.status_code == 200
    (rec,) = rx.requests
    assert (rec.method, rec.path, rec.status, rec.count, rec.points) == ("POST", "/ingest", 200, 1, 1)
    assert rec.idempotency_key == "b-1"
    assert rec.source_ids == ("rig-01",)
    assert rec.gzip is False
    assert rec.body_bytes == rec.decoded_bytes == int(r.request.headers["content-length"])
    assert rec.api_key == KEY
    assert rec.duplicate is False and rec.fault is None and rec.error is None


def test_multi_source_request_omits_source_id(rx: Receiver, client: httpx.Client) -> None:
    r = ingest(client, {"source_id": "rig-01", "points": [
        point(), point(source_id="rig-02"), point(source_id=""),  # "" falls back like absent
    ]})
    assert r.json() == {"success": True, "count": 3}
    assert [p["source_id"] for p in rx.points] == ["rig-01", "rig-01", "rig-02"]
    assert rx.requests[0].source_ids == ("rig-01", "rig-02")


def test_per_point_source_without_top_level(rx: Receiver, client: httpx.Client) -> None:
    r = ingest(client, {"points": [point(source_id="only.one_x-1")]})
    assert r.json() == {"success": True, "count": 1, "source_id": "only.one_x-1"}


def test_empty_points_is_an_auth_check(rx: Receiver, client: httpx.Client) -> None:
    r = ingest(client, {"points": []})
    assert r.status_code == 200
    assert r.json() == {"success": True, "count": 0}
    assert rx.count == 0


def test_values_at_the_limits_are_accepted(rx: Receiver, client: httpx.Client) -> None:
    big = {"k": "x" * (4096 - len('{"k":""}'))}  # exactly 4096 bytes of JSON
    assert len(orjson.dumps(big)) == 4096
    pts = [
        point("m" * 256),
        point("s", "é" * 128),                       # 256 bytes of UTF-8
        point("obj", big),
        point("arr", [1, "two", {"three": 3}]),
        point("n", 7, **{"class": "event"}),
        point("t", 1, tags={f"k{i}": "v" * 256 for i in range(16)}),
        point("k", 1, tags={"k" * 256: "v"}),
        point("z", 0, timestamp=0, extra_field="passes through"),
    ]
    r = ingest(client, {"source_id": "a" * 256, "points": pts, "ignored": {"x": 1}})
    assert r.json() == {"success": True, "count": len(pts), "source_id": "a" * 256}
    stored = rx.points
    assert stored[2]["value"] == big and stored[2]["class"] == "event"
    assert stored[4]["class"] == "event"
    assert stored[7]["timestamp"] == 0 and stored[7]["extra_field"] == "passes through"


# -- per-point validation: one bad point rejects the whole request, naming points[i] --------

BAD_POINTS: list[tuple[str, Any, str]] = [
    ("null point", None, "must be an object, got null"),
    ("number point", 5, "must be an object, got number"),
    ("source upper case", point(source_id="Rig"), "source_id 'Rig' must match"),
    ("source leading dash", point(source_id="-rig"), "must match ^[a-z0-9][a-z0-9._-]*$"),
    ("source space", point(source_id="rig 1"), "must match"),
    ("source too long", point(source_id="a" * 257), "source_id must be at most 256 characters"),
    ("source not a string", point(source_id=5), "source_id must be a string, got number"),
    ("metric empty", point(""), "metric must be 1..256 characters, got 0"),
    ("metric too long", point("m" * 257), "metric must be 1..256 characters, got 257"),
    ("metric missing", {"value": 1}, "metric must be 1..256 characters, got null"),
    ("metric not a string", point(5), "metric must be 1..256 characters, got number"),
    ("class unknown", point(**{"class": "gauge"}), "class must be 'metric' or 'event', got 'gauge'"),
    ("class not a string", point(**{"class": 1}), "class must be 'metric' or 'event'"),
    ("metric class string", point(value="x", **{"class": "metric"}), "finite number"),
    ("metric class bool", point(value=True, **{"class": "metric"}), "got boolean"),
    ("metric class object", point(value={"a": 1}, **{"class": "metric"}), "got object"),
    ("value null", point(value=None), "value must not be null"),
    ("value missing", {"metric": "m"}, "value is required"),
    ("event string too long", point(value="x" * 257), "at most 256 bytes of UTF-8, got 257"),
    ("event string bytes", point(value="é" * 129), "got 258"),
    ("event object too big", point(value={"k": "x" * 4096}), "at most 4096 bytes of JSON"),
    ("event array too big", point(value=list(range(1200))), "at most 4096 bytes of JSON"),
    # Go's encoder (which measures on the platform) writes "<" as \u003c.
    ("event object html", point(value={"k": "<" * 1000}), "at most 4096 bytes of JSON"),
    ("timestamp string", point(timestamp="2024-01-01"), "timestamp must be a finite number, got string"),
    ("timestamp null", point(timestamp=None), "timestamp must be a finite number, got null"),
    ("timestamp bool", point(timestamp=True), "timestamp must be a finite number, got boolean"),
    ("tags array", point(tags=["a"]), "tags must be an object of strings, got array"),
    ("tags null", point(tags=None), "tags must be an object of strings, got null"),
    ("tags too many", point(tags={f"k{i}": "v" for i in range(17)}), "at most 16 entries, got 17"),
    ("tag value number", point(tags={"rig": 1}), "tags['rig'] must be a string, got number"),
    ("tag value too long", point(tags={"rig": "v" * 257}), "must be at most 256 characters, got 257"),
    ("tag key too long", point(tags={"k" * 257: "v"}), "must be at most 256 characters"),
]


@pytest.mark.parametrize(("case", "bad", "message"), BAD_POINTS, ids=[c[0] for c in BAD_POINTS])
@pytest.mark.parametrize("index", [0, 2])
def test_bad_point_rejects_whole_request(
    rx: Receiver, client: httpx.Client, case: str, bad: Any, message: str, index: int
) -> None:
    pts: list[Any] = [point("good", 1), point("good", 2)]
    pts.insert(index, bad)
    r = ingest(client, {"source_id": "rig-01", "points": pts})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error.startswith(f"points[{index}]: "), error
    assert message in error
    assert rx.count == 0 and rx.points == []
    assert rx.requests[0].status == 400 and rx.requests[0].error == error


def test_missing_source_id_anywhere(rx: Receiver, client: httpx.Client) -> None:
    r = ingest(client, {"points": [point(source_id="rig-01"), point()]})
    assert r.status_code == 400
    assert r.json()["error"].startswith("points[1]: source_id is required")


def test_extra_check_makes_a_stricter_receiver(plexus_receiver_factory: Any) -> None:
    def no_x(p: dict[str, Any]) -> str | None:
        return "metric must not start with x" if p["metric"].startswith("x") else None

    rx = plexus_receiver_factory(extra_check=no_x)
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
        r = ingest(c, {"source_id": "s", "points": [point("a"), point("xb")]})
        assert r.status_code == 400
        assert r.json() == {"error": "points[1]: metric must not start with x"}
        assert ingest(c, {"source_id": "s", "points": [point("a")]}).json()["count"] == 1


def test_extra_check_that_raises_is_a_500(plexus_receiver_factory: Any) -> None:
    def broken(p: dict[str, Any]) -> str | None:
        raise RuntimeError("boom")

    rx = plexus_receiver_factory(extra_check=broken)
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
        r = ingest(c, {"source_id": "s", "points": [point()]})
    assert r.status_code == 500
    assert "boom" in r.json()["error"]


# -- request-level errors -----------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "invalid JSON body"),
    (b"", "invalid JSON body"),
    (b"[]", "expected an object"),
    (b'{"source_id": "s"}', "'points' array is required"),
    (b'{"points": null}', "'points' array is required"),
    (b'{"points": {"metric": "m"}}', "'points' must be an array"),
    (b'{"source_id": 5, "points": []}', "source_id must be a string"),
    (b'{"points": [{"metric": "m", "value": NaN}]}', "invalid JSON body"),
])
def test_bad_bodies(rx: Receiver, client: httpx.Client, body: bytes, message: str) -> None:
    r = client.post("/ingest", content=body)
    assert r.status_code == 400
    assert message in r.json()["error"]


def test_at_most_10000_points(rx: Receiver, client: httpx.Client) -> None:
    pts = [point(value=i) for i in range(10_001)]
    r = ingest(client, {"source_id": "s", "points": pts})
    assert r.status_code == 400
    assert r.json()["error"] == "too many points: 10001 (max 10000)"
    assert rx.count == 0
    r = ingest(client, {"source_id": "s", "points": pts[:10_000]})
    assert r.json() == {"success": True, "count": 10_000, "source_id": "s"}


def padded_body(size: int) -> bytes:
    """A valid, empty-points body of exactly ``size`` bytes."""
    skeleton = b'{"points":[],"pad":""}'
    body = skeleton[:-2] + b"x" * (size - len(skeleton)) + b'"}'
    assert len(body) == size
    return body


def test_413_on_body_size_and_connection_survives(rx: Receiver, client: httpx.Client) -> None:
    assert client.post("/ingest", content=padded_body(MAX_BODY_BYTES)).status_code == 200
    r = client.post("/ingest", content=padded_body(MAX_BODY_BYTES + 1))
    assert r.status_code == 413
    assert "too large" in r.json()["error"]
    # The oversized body was drained, so the keep-alive connection still works.
    assert ingest(client, {"source_id": "s", "points": [point()]}).status_code == 200


def test_413_on_decompressed_size(rx: Receiver, client: httpx.Client) -> None:
    gz = {"Content-Encoding": "gzip"}
    r = client.post("/ingest", content=gzip.compress(padded_body(MAX_BODY_BYTES)), headers=gz)
    assert r.status_code == 200
    bomb = gzip.compress(padded_body(MAX_BODY_BYTES + 1))
    assert len(bomb) < 100_000  # small on the wire, too big inflated
    r = client.post("/ingest", content=bomb, headers=gz)
    assert r.status_code == 413
    assert "too large" in r.json()["error"]


def test_413_on_compressed_size(rx: Receiver, client: httpx.Client) -> None:
    noise = os.urandom(MAX_BODY_BYTES + 10)  # does not compress
    r = client.post("/ingest", content=noise, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413


def test_413_for_a_huge_declared_length_closes(rx: Receiver) -> None:
    with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as sock:
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nx-api-key: plx_test\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        status, headers, _ = read_response(sock.makefile("rb"))
    assert status == 413
    assert headers["connection"] == "close"


def test_gzip_bodies(rx: Receiver, client: httpx.Client) -> None:
    raw = orjson.dumps({"source_id": "s", "points": [point(value=i) for i in range(100)]})
    packed = gzip.compress(raw)
    r = client.post("/ingest", content=packed, headers={"Content-Encoding": "gzip"})
    assert r.json() == {"success": True, "count": 100, "source_id": "s"}
    rec = rx.requests[0]
    assert rec.gzip is True
    assert (rec.body_bytes, rec.decoded_bytes) == (len(packed), len(raw))
    # Concatenated gzip members are one stream, as Go's reader reads them.
    half = len(raw) // 2
    two = gzip.compress(raw[:half]) + gzip.compress(raw[half:])
    r = client.post("/ingest", content=two, headers={"Content-Encoding": "GZIP"})
    assert r.json()["count"] == 100


@pytest.mark.parametrize("body", [
    b"not gzip at all",
    gzip.compress(b'{"points": []}')[:-6],  # truncated
    gzip.compress(b'{"points": []}') + b"trailing junk",
])
def test_bad_gzip_is_400(rx: Receiver, client: httpx.Client, body: bytes) -> None:
    r = client.post("/ingest", content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
    assert "invalid gzip body" in r.json()["error"]


def test_chunked_request_body(rx: Receiver, client: httpx.Client) -> None:
    raw = orjson.dumps({"source_id": "s", "points": [point(value=i) for i in range(50)]})

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(raw), 100):
            yield raw[i:i + 100]

    r = client.post("/ingest", content=chunks())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.json()["count"] == 50


# -- auth ---------------------------------------------------------------------------------


def test_auth(plexus_receiver_factory: Any) -> None:
    rx = plexus_receiver_factory(api_keys=["plx_good"], forbidden_keys=["plx_readonly"])
    doc = {"source_id": "s", "points": [point()]}
    with httpx.Client(base_url=rx.url) as c:
        r = ingest(c, doc)
        assert (r.status_code, r.json()) == (401, {"error": "missing x-api-key"})
        r = ingest(c, doc, **{"x-api-key": ""})
        assert r.status_code == 401
        r = ingest(c, doc, **{"x-api-key": "plx_test"})
        assert (r.status_code, r.json()) == (401, {"error": "invalid API key"})
        r = ingest(c, doc, **{"x-api-key": "plx_readonly"})
        assert r.status_code == 403 and "error" in r.json()
        assert rx.count == 0
        assert ingest(c, doc, **{"x-api-key": "plx_good"}).status_code == 200
    assert rx.count == 1
    assert [q.status for q in rx.requests] == [401, 401, 401, 403, 200]
    assert rx.api_key == "plx_good"


def test_any_key_when_api_keys_is_none(plexus_receiver_factory: Any) -> None:
    rx = plexus_receiver_factory(api_keys=None)
    with httpx.Client(base_url=rx.url) as c:
        assert ingest(c, {"points": []}, **{"x-api-key": "whatever"}).status_code == 200
        assert ingest(c, {"points": []}).status_code == 401


# -- HTTP details -------------------------------------------------------------------------


def test_routes_and_methods(rx: Receiver, client: httpx.Client) -> None:
    r = client.get("/ingest")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST, OPTIONS"
    assert client.put("/ingest", content=b"{}").status_code == 405
    assert client.post("/api/ingest", content=b"{}").status_code == 404
    assert client.get("/").status_code == 404
    r = client.options("/ingest")
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == "*"
    assert client.post("/ingest?x=1", content=b'{"points": []}').status_code == 200
    assert [q.status for q in rx.requests] == [405, 405, 404, 404, 204, 200]


def test_keep_alive_on_one_connection(rx: Receiver) -> None:
    with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as sock:
        f = sock.makefile("rb")
        for i in range(3):
            raw_post(sock, orjson.dumps({"source_id": "s", "points": [point(value=i)]}))
            status, headers, body = read_response(f)
            assert status == 200
            assert orjson.loads(body)["count"] == 1
            assert "close" not in headers.get("connection", "")
        raw_post(sock, b"{bad")  # an error keeps the connection too
        assert read_response(f)[0] == 400
        raw_post(sock, b'{"points": []}')
        assert read_response(f)[0] == 200
    assert rx.count == 3


# -- idempotency --------------------------------------------------------------------------


def test_duplicate_idempotency_key_is_not_stored_twice(rx: Receiver, client: httpx.Client) -> None:
    doc = {"source_id": "s", "points": [point(value=1), point(value=2)]}
    first = ingest(client, doc, **{"Idempotency-Key": "batch-7"})
    again = ingest(client, doc, **{"Idempotency-Key": "batch-7"})
    assert first.json() == again.json() == {"success": True, "count": 2, "source_id": "s"}
    assert rx.count == 2 and len(rx.points) == 2
    assert rx.duplicates == 1
    assert [q.duplicate for q in rx.requests] == [False, True]
    assert ingest(client, doc, **{"Idempotency-Key": "batch-8"}).json()["count"] == 2
    assert rx.count == 4


def test_idempotency_key_of_a_rejected_request_is_not_remembered(
    rx: Receiver, client: httpx.Client
) -> None:
    assert ingest(client, {"source_id": "s", "points": [point("")]},
                  **{"Idempotency-Key": "k"}).status_code == 400
    rx.fail_next(1)
    assert ingest(client, {"source_id": "s", "points": [point()]},
                  **{"Idempotency-Key": "k"}).status_code == 503
    assert ingest(client, {"points": []}, **{"Idempotency-Key": "k"}).json()["count"] == 0
    r = ingest(client, {"source_id": "s", "points": [point()]}, **{"Idempotency-Key": "k"})
    assert r.json()["count"] == 1
    assert rx.count == 1 and rx.duplicates == 0


# -- rate ceiling -------------------------------------------------------------------------


def test_rate_ceiling_drops_a_single_source_request(plexus_receiver_factory: Any) -> None:
    rx = plexus_receiver_factory(rate_limit_interval=3600.0)
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
        assert ingest(c, {"source_id": "a", "points": [point()]}).json()["count"] == 1
        r = ingest(c, {"source_id": "a", "points": [point(), point()]},
                   **{"Idempotency-Key": "k"})
        assert r.status_code == 200
        assert r.json() == {"success": True, "count": 0, "source_id": "a"}
        assert ingest(c, {"source_id": "b", "points": [point()]}).json()["count"] == 1
        # Multi-source: the limited source's group is dropped, the other kept.
        r = ingest(c, {"points": [point(source_id="a"), point(source_id="c"),
                                  point(source_id="a"), point(source_id="c")]})
        assert r.json() == {"success": True, "count": 2}
        # A count-0 answer is not remembered for its Idempotency-Key.
        assert ingest(c, {"source_id": "d", "points": [point()]},
                      **{"Idempotency-Key": "k"}).json()["count"] == 1
    assert [p["source_id"] for p in rx.points] == ["a", "b", "c", "c", "d"]
    assert rx.rate_limited == 4
    assert [q.rate_limited for q in rx.requests] == [0, 2, 0, 2, 0]


def test_rate_ceiling_admits_after_the_interval(plexus_receiver_factory: Any) -> None:
    rx = plexus_receiver_factory(rate_limit_interval=0.05)
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
        assert ingest(c, {"source_id": "a", "points": [point()]}).json()["count"] == 1
        time.sleep(0.2)
        assert ingest(c, {"source_id": "a", "points": [point()]}).json()["count"] == 1


def test_no_rate_ceiling_by_default(rx: Receiver, client: httpx.Client) -> None:
    for _ in range(20):
        assert ingest(client, {"source_id": "a", "points": [point()]}).json()["count"] == 1


# -- fault injection ----------------------------------------------------------------------


def test_fail_next(rx: Receiver, client: httpx.Client) -> None:
    rx.fail_next(2)
    rx.fail_next(1, status=502, error="failed to queue telemetry")
    doc = {"source_id": "s", "points": [point()]}
    answers = [ingest(client, doc) for _ in range(4)]
    assert [(r.status_code, r.json().get("error")) for r in answers] == [
        (503, "injected"), (503, "injected"), (502, "failed to queue telemetry"), (200, None)]
    assert rx.count == 1
    assert [q.fault for q in rx.requests] == ["fail", "fail", "fail", None]


def test_reject_keys_next(rx: Receiver, client: httpx.Client) -> None:
    rx.fail_next(1)
    rx.reject_keys_next(2)
    doc = {"source_id": "s", "points": [point()]}
    statuses = [ingest(client, doc).status_code for _ in range(4)]
    assert statuses == [503, 401, 401, 200]  # the 503 did not use up a rejection
    assert rx.count == 1
    assert rx.requests[1].fault == "reject_key"


def test_delay_next_times_the_client_out_but_still_stores(
    rx: Receiver, client: httpx.Client
) -> None:
    rx.delay_next(1, 2.0)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/ingest", content=orjson.dumps({"source_id": "s", "points": [point()]}),
                    timeout=0.2)
    assert rx.wait_for(1, timeout=10)  # processed after the delay, like a slow gateway
    assert rx.requests[0].fault == "delay"
    assert ingest(client, {"source_id": "s", "points": [point()]}).status_code == 200
    assert rx.requests[1].fault is None


def test_delay_attribute_and_slow_failure(rx: Receiver, client: httpx.Client) -> None:
    rx.delay = 2.0
    with pytest.raises(httpx.ReadTimeout):
        client.post("/ingest", content=b'{"points": []}', timeout=0.2)
    rx.delay = 0.0
    rx.delay_next(1, 0.05)
    rx.fail_next(1)
    r = ingest(client, {"source_id": "s", "points": [point()]})
    assert r.status_code == 503
    assert rx.wait_for_requests(2)
    (failed,) = [q for q in rx.requests if q.status == 503]
    assert failed.fault == "delay,fail"
    assert rx.count == 0


def test_reset_before_processing_sends_rst(rx: Receiver) -> None:
    rx.reset_next(1)
    received = b""
    with socket.create_connection(("127.0.0.1", rx.port), timeout=10) as sock:
        raw_post(sock, orjson.dumps({"source_id": "s", "points": [point()]}))
        # A polite close (FIN) would end this loop without an exception.
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(1024):
                received += chunk
    assert received == b""
    assert rx.wait_for_requests(1)
    assert rx.requests[0].status == 0 and rx.requests[0].fault == "reset"
    assert rx.count == 0


def test_reset_with_httpx_then_recovers(rx: Receiver, client: httpx.Client) -> None:
    rx.reset_next(2)
    doc = {"source_id": "s", "points": [point()]}
    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            ingest(client, doc)
    assert ingest(client, doc).status_code == 200
    assert rx.count == 1


def test_reset_after_store_then_retry_is_a_duplicate(rx: Receiver, client: httpx.Client) -> None:
    rx.reset_next(1, after_store=True)
    doc = {"source_id": "s", "points": [point(value=1), point(value=2)]}
    with pytest.raises(httpx.TransportError):
        ingest(client, doc, **{"Idempotency-Key": "b1"})
    assert rx.count == 2  # stored although the client saw an error
    assert rx.requests[0].status == 0 and rx.requests[0].fault == "reset_after_store"
    r = ingest(client, doc, **{"Idempotency-Key": "b1"})
    assert r.json() == {"success": True, "count": 2, "source_id": "s"}
    assert rx.count == 2 and rx.duplicates == 1


def test_go_down_and_come_up_on_the_same_port(rx: Receiver, client: httpx.Client) -> None:
    doc = {"source_id": "s", "points": [point()]}
    assert ingest(client, doc).status_code == 200  # leaves a pooled keep-alive connection
    port = rx.port
    rx.go_down()
    assert not rx.running
    for _ in range(2):
        with pytest.raises(httpx.ConnectError):
            ingest(client, doc)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    rx.come_up()
    assert rx.port == port and rx.running
    assert ingest(client, doc).status_code == 200
    assert rx.count == 2
    assert [q.status for q in rx.requests] == [200, 200]


def test_go_down_cuts_an_injected_delay_short(rx: Receiver, client: httpx.Client) -> None:
    rx.delay_next(1, 600.0)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            ingest(client, {"source_id": "s", "points": [point()]})
        except httpx.TransportError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    deadline = time.monotonic() + 10
    while rx._delays and time.monotonic() < deadline:  # the request has taken its delay
        time.sleep(0.01)
    rx.go_down()
    t.join(timeout=30)
    assert not t.is_alive()
    assert len(errors) == 1
    assert rx.wait_for_requests(1)
    assert (rx.requests[0].status, rx.requests[0].fault) == (0, "delay")
    assert rx.count == 0


# -- modes, lifecycle, threads ------------------------------------------------------------


def test_store_false_keeps_only_counts(plexus_receiver_factory: Any) -> None:
    rx = plexus_receiver_factory(store=False)
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
        assert ingest(c, {"source_id": "s", "points": [point()] * 5}).json()["count"] == 5
        assert ingest(c, {"source_id": "s", "points": [point("")]}).status_code == 400
    assert rx.count == 5 and rx.points == [] and rx.metrics() == {}
    assert rx.wait_for(5, timeout=1)


def test_validate_false_only_counts(plexus_receiver_factory: Any) -> None:
    rx = plexus_receiver_factory(validate=False, store=False)
    with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
        r = ingest(c, {"source_id": "s", "points": [point(""), point(value=None)]})
        assert r.json() == {"success": True, "count": 2, "source_id": "s"}
        assert ingest(c, {"points": [point()]}).status_code == 400  # still needs a source
    assert rx.count == 2


def test_lifecycle(rx: Receiver) -> None:
    assert rx.url == f"http://127.0.0.1:{rx.port}"
    rx.stop()
    rx.stop()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", rx.port), timeout=5).close()
    with pytest.raises(RuntimeError):
        _ = Receiver().url
    with Receiver() as other:
        assert other.running and other.port != 0
    assert not other.running


def test_stop_with_idle_keep_alive_connection(rx: Receiver, client: httpx.Client) -> None:
    assert ingest(client, {"points": []}).status_code == 200
    done = threading.Event()
    threading.Thread(target=lambda: (rx.stop(), done.set()), daemon=True).start()
    assert done.wait(10), "stop() hung on an idle keep-alive connection"


def test_wait_for_blocks_until_points_arrive(rx: Receiver) -> None:
    assert rx.wait_for(1, timeout=0.05) is False

    def later() -> None:
        time.sleep(0.2)
        with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
            ingest(c, {"source_id": "s", "points": [point(), point()]})

    threading.Thread(target=later, daemon=True).start()
    assert rx.wait_for(2, timeout=10) is True
    assert rx.count == 2


def test_concurrent_senders(rx: Receiver) -> None:
    def sender(n: int) -> None:
        with httpx.Client(base_url=rx.url, headers={"x-api-key": KEY}) as c:
            for i in range(20):
                doc = {"source_id": f"rig-{n}", "points": [point(value=i), point(value=-i)]}
                assert ingest(c, doc).json()["count"] == 2

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert rx.count == 8 * 20 * 2 == len(rx.points) == len(rx.requests) * 2
    for n in range(8):
        assert [p["value"] for p in rx.points if p["source_id"] == f"rig-{n}"][::2] == list(range(20))


def test_clear(rx: Receiver, client: httpx.Client) -> None:
    ingest(client, {"source_id": "s", "points": [point()]}, **{"Idempotency-Key": "k"})
    rx.clear()
    assert (rx.count, rx.points, rx.requests, rx.duplicates) == (0, [], [], 0)
    # The key was forgotten too: the same batch is stored again.
    assert ingest(client, {"source_id": "s", "points": [point()]},
                  **{"Idempotency-Key": "k"}).json()["count"] == 1
    assert rx.count == 1


# -- the pytest plugin and the command ----------------------------------------------------


def test_plexus_receiver_fixture(plexus_receiver: Receiver) -> None:
    assert plexus_receiver.running
    assert plexus_receiver.api_key == "plx_test"


def test_plugin_in_a_fresh_pytest(tmp_path: Path) -> None:
    (tmp_path / "test_uses_plugin.py").write_text(textwrap.dedent("""
        import httpx

        made = []

        def test_factory(plexus_receiver_factory, plexus_receiver):
            a = plexus_receiver_factory(api_keys=["k1"])
            b = plexus_receiver_factory()
            made.extend([a, b, plexus_receiver])
            assert a.port != b.port
            r = httpx.post(a.url + "/ingest", json={"points": []}, headers={"x-api-key": "k1"})
            assert r.status_code == 200

        def test_all_stopped_after_teardown():
            assert len(made) == 3
            assert not any(r.running for r in made)
    """))
    # Only the plugin under test: an installed pytest11 entry point for it
    # would otherwise register the same module twice.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "plexus.pytest_plugin",
         "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_importing_testing_does_not_import_pytest() -> None:
    code = "import sys, plexus.testing; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def _start_cli(*args: str) -> tuple[subprocess.Popen[str], queue.Queue[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "plexus.testing", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    first = lines.get(timeout=30)
    assert "listening on http://127.0.0.1:" in first, first
    url = first.split("listening on ")[1].split()[0]
    return proc, lines, url


def _drain_lines(lines: queue.Queue[str], until: str) -> list[str]:
    seen: list[str] = []
    while not any(until in line for line in seen):
        seen.append(lines.get(timeout=30))
    return seen


@pytest.mark.parametrize("quiet", [False, True])
def test_command_line(quiet: bool) -> None:
    proc, lines, url = _start_cli("--api-key", "plx_cli", *(["--quiet"] if quiet else []))
    try:
        doc = {"source_id": "rig-01", "points": [point("motor.rpm", 3450)]}
        with httpx.Client(base_url=url) as c:
            assert ingest(c, doc, **{"x-api-key": "plx_cli"}).status_code == 200
            assert ingest(c, doc, **{"x-api-key": "plx_test"}).status_code == 401
        seen = _drain_lines(lines, "-> 401")
        ok = [line for line in seen if "-> 200" in line]
        assert len(ok) == 1 and "points=1" in ok[0] and "source=rig-01" in ok[0]
        point_lines = [line for line in seen if "motor.rpm = 3450" in line]
        assert len(point_lines) == (0 if quiet else 1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        tail = _drain_lines(lines, "stopped")
        assert "1 points stored from 2 requests" in tail[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
