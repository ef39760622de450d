"""The ``influxdb`` sink against a real InfluxDB 1.x (Debian's ``influxd``) on 127.0.0.1.

InfluxDB 2.x is not packaged for Debian, so ``api: v2`` is tested against a
local stand-in that checks the request the way 2.x reads it (path, query,
token, gzip, line protocol) and answers as 2.x does; the line protocol it
carries is the same code the real 1.x server checks in the other tests.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from plexus.errors import AuthenticationError, ConfigError, RetryableSinkError
from plexus.sinks.influxdb import InfluxdbSink, InfluxdbSinkOptions, LineEncoder
from tests.sinks.servers import InfluxServer
from tests.sinks.support import build_gateway, pipeline_for, wait_until

FUNCS = Path(__file__).resolve().parent.parent / "gateway_funcs.py"
T0 = 1_700_000_000_000  # ms


@pytest.fixture(scope="module")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    with InfluxServer(tmp_path_factory.mktemp("influx")) as server:
        yield server


_databases = iter(range(1_000_000))


@pytest.fixture
def db(influx: InfluxServer) -> str:
    name = f"t{next(_databases)}"
    influx.query(f'CREATE DATABASE "{name}"')
    return name


def sink_for(influx: InfluxServer, **options: Any) -> InfluxdbSink:
    sink = InfluxdbSink(InfluxdbSinkOptions(url=influx.url, **options), name="influx")
    sink.open("rig-01")
    return sink


def test_a_gateway_writes_every_point(influx: InfluxServer, db: str, tmp_path: Path) -> None:
    gateway = build_gateway(
        "source_id: rig-01\nbatch: {interval: 0.05}\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.01\n"
        "    tags: {unit: a}\n"
        f"sinks:\n  - type: influxdb\n    url: {influx.url}\n    database: {db}\n", tmp_path)
    gateway.start()
    try:
        assert wait_until(lambda: gateway.status()["sinks"][0]["delivered"] >= 30)
    finally:
        gateway.shutdown(5.0)
    status = gateway.status()["sinks"][0]
    rows = influx.rows('SELECT * FROM "test.seq"', db)
    assert status["buffered"] == 0 and status["delivered"] == len(rows)
    values = [row["value"] for row in rows]  # ordered by time
    assert values == list(range(int(values[0]), int(values[0]) + len(values)))
    assert {(row["source_id"], row["unit"]) for row in rows} == {("rig-01", "a")}
    # What an upload budget counts: the (gzipped) bodies, reported by the sink.
    sink = gateway.pipeline.lanes[0].sink
    assert sink.reports_bytes and 0 < sink.bytes_sent < 60 * len(rows)


def test_names_values_and_escapes_survive_the_real_parser(influx: InfluxServer, db: str) -> None:
    tags = {"site": "dock 4, bay=2", "empty": "", "quote": 'a"b'}
    points = [
        ("engine rpm,x=1", 3450, T0, tags),            # a measurement needing escapes
        ("engine rpm,x=1", 3450.5, T0 + 1, tags),       # int then float: no type conflict
        ("status", 'running "fast"\\ now\nline 2', T0, None),
        ("motor.enabled", True, T0, None),
        ("position", {"x": 1.25, "y": -3.5, "z": {"deep": 2}, "skip": None}, T0, None),
        ("joint_angles", [0.5, 1.2], T0, None),
    ]
    result = sink_for(influx, database=db).send(points, "k")
    assert (result.delivered, result.rejected) == (6, [])
    rows = {(row["_measurement"], row["time"]): row
            for measurement in {p[0] for p in points}
            for row in influx.rows(f'SELECT * FROM "{measurement.replace(chr(34), "")}"', db)}
    engine = rows[("engine rpm,x=1", "2023-11-14T22:13:20Z")]
    assert engine["value"] == 3450 and engine["site"] == "dock 4, bay=2"
    assert engine["quote"] == 'a"b' and engine["source_id"] == "rig-01"
    assert engine.get("empty") in (None, "")  # an empty tag is left out
    assert rows[("engine rpm,x=1", "2023-11-14T22:13:20.001Z")]["value"] == 3450.5
    assert rows[("status", "2023-11-14T22:13:20Z")]["value"] == 'running "fast"\\ now\nline 2'
    assert rows[("motor.enabled", "2023-11-14T22:13:20Z")]["value"] is True
    position = rows[("position", "2023-11-14T22:13:20Z")]
    assert (position["x"], position["y"], position["z.deep"]) == (1.25, -3.5, 2)
    joints = rows[("joint_angles", "2023-11-14T22:13:20Z")]
    assert (joints["0"], joints["1"]) == (0.5, 1.2)


def test_one_measurement_with_metrics_as_fields_and_integers(
        influx: InfluxServer, db: str) -> None:
    sink = sink_for(influx, database=db, measurement="telemetry", integers="integer",
                    source_tag="gw")
    points = [("engine.rpm", 3450, T0, None), ("engine.temp", 81.5, T0, None),
              ("pos", {"x": 1}, T0, None)]
    assert sink.send(points, "k").delivered == 3
    [row] = influx.rows("SELECT * FROM telemetry", db)
    assert row["engine.rpm"] == 3450 and row["engine.temp"] == 81.5 and row["pos.x"] == 1
    assert row["gw"] == "rig-01"
    fields = influx.rows("SHOW FIELD KEYS FROM telemetry", db)
    assert {r["fieldKey"]: r["fieldType"] for r in fields}["engine.rpm"] == "integer"


def test_refused_points_are_isolated_and_the_rest_is_stored(
        influx: InfluxServer, db: str) -> None:
    sink = sink_for(influx, database=db)
    assert sink.send([("temp", 20.5, T0, None)], "first").delivered == 1  # temp is a float
    points = [("temp", 21.0 + i, T0 + 1 + i, None) for i in range(40)]
    points[7] = ("temp", "hot", T0 + 8, None)                 # field type conflict
    points[23] = ("temp", 1.0, T0 + 24, {"bad": "new\nline"})  # cannot be written at all
    points[31] = ("#comment", 1.0, T0, None)                   # would be read as a comment
    requests_before = sink.requests
    result = sink.send(points, "k")
    assert [index for index, _ in result.rejected] == [7, 23, 31]
    assert "field type conflict" in result.rejected[0][1]
    assert "newline" in result.rejected[1][1] and "'#'" in result.rejected[2][1]
    assert result.delivered == 37
    stored = influx.rows("SELECT * FROM temp", db)
    assert len(stored) == 1 + 37
    assert sink.requests - requests_before <= 2 * 6 + 1  # halving, not one request per point


def test_retention_policy(influx: InfluxServer, db: str) -> None:
    influx.query(f'CREATE RETENTION POLICY "week" ON "{db}" DURATION 7d REPLICATION 1')
    recent = [("m", 1.0, int(time.time() * 1000), None)]  # inside the week
    assert sink_for(influx, database=db, retention_policy="week").send(recent, "k").delivered
    assert influx.rows(f'SELECT * FROM "{db}"."week"."m"', db)
    assert influx.rows(f'SELECT * FROM "{db}"."autogen"."m"', db) == []
    with pytest.raises(RetryableSinkError, match="retention policy not found"):
        sink_for(influx, database=db, retention_policy="nope").send(recent, "k")


def test_missing_database_is_kept_and_retried_or_created(influx: InfluxServer) -> None:
    with pytest.raises(RetryableSinkError, match="database not found.*create the database"):
        sink_for(influx, database="absent").send([("m", 1.0, T0, None)], "k")
    sink = sink_for(influx, database="made_by_sink", create_database=True)
    assert sink.send([("m", 1.0, T0, None)], "k").delivered == 1
    assert influx.rows("SELECT * FROM m", "made_by_sink")


def test_server_down_keeps_the_data_and_delivers_when_it_is_back(tmp_path: Path) -> None:
    server = InfluxServer(tmp_path / "influx")  # not started yet
    sink = InfluxdbSink(InfluxdbSinkOptions(url=server.url, database="d", create_database=True,
                                            timeout=2), name="influx")
    pipeline = pipeline_for(sink)
    try:
        for i in range(500):
            pipeline.emit("m", float(i), T0 / 1000 + i)
        assert wait_until(lambda: pipeline.lanes[0].uploader.stats.failures >= 1)
        assert len(pipeline.lanes[0].buffer) == 500
        with server:
            pipeline.flush(timeout=20)
            rows = server.rows("SELECT * FROM m", "d")
    finally:
        pipeline.close(1.0)
    assert [row["value"] for row in rows] == [float(i) for i in range(500)]


def test_login_refused_is_an_authentication_error_and_secrets_never_show(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Pa55-Influx-Zq9"
    caplog.set_level(logging.DEBUG)
    with InfluxServer(tmp_path / "influx", auth=True) as server:
        server.create_admin("admin", "admin-pw")
        server.query("CREATE DATABASE d")
        server.query(f"CREATE USER gw WITH PASSWORD '{secret}'")
        server.query("GRANT WRITE ON d TO gw")
        bad = InfluxdbSink(InfluxdbSinkOptions(url=server.url, database="d", username="gw",
                                               password="wrong-Zq9"))
        bad.open("rig-01")
        with pytest.raises(AuthenticationError, match="refused the credentials") as refused:
            bad.send([("m", 1.0, T0, None)], "k")
        good = InfluxdbSink(InfluxdbSinkOptions(url=server.url, database="d", username="gw",
                                                password=secret))
        good.open("rig-01")
        assert good.send([("m", 1.0, T0, None)], "k").delivered == 1
        assert server.rows("SELECT * FROM m", "d")
    shown = " ".join([repr(good), repr(good.options), repr(bad.options), str(refused.value),
                      caplog.text])
    assert secret not in shown and "wrong-Zq9" not in shown


def test_v2_write_against_an_old_server_says_what_is_wrong(influx: InfluxServer) -> None:
    sink = sink_for(influx, api="v2", bucket="b", org="o", token="t")
    with pytest.raises(RetryableSinkError, match="no v2 write API"):
        sink.send([("m", 1.0, T0, None)], "k")


# api: v2 against a stand-in (no InfluxDB 2.x on Debian) --------------------------------


class V2StandIn:
    """Answers ``POST /api/v2/write`` the way InfluxDB 2.x does, recording each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: list[tuple[int, dict[str, str], bytes]] = []  # queued (status, headers, body)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                url = urlsplit(self.path)
                stand_in.requests.append({"path": url.path, "query": parse_qs(url.query),
                                          "auth": self.headers.get("Authorization"),
                                          "gzip": self.headers.get("Content-Encoding"),
                                          "lines": body.decode().splitlines()})
                status, headers, answer = (stand_in.answers.pop(0) if stand_in.answers
                                           else (204, {}, b""))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def v2() -> Iterator[V2StandIn]:
    stand_in = V2StandIn()
    yield stand_in
    stand_in.close()


def test_v2_request_shape_token_and_status_handling(v2: V2StandIn) -> None:
    sink = InfluxdbSink(InfluxdbSinkOptions(url=v2.url, api="v2", bucket="telemetry",
                                            org="acme", token="tok-Zq9"))
    sink.open("rig-01")
    points = [("engine.rpm", 3450, T0, {"unit": "a"}), ("engine.temp", 81.5, T0 + 1, None)]
    assert sink.send(points, "k").delivered == 2
    [request] = v2.requests
    assert request["path"] == "/api/v2/write"
    assert request["query"] == {"bucket": ["telemetry"], "org": ["acme"], "precision": ["ms"]}
    assert request["auth"] == "Token tok-Zq9" and request["gzip"] == "gzip"
    encoder = LineEncoder(sink.options, "rig-01")
    assert request["lines"] == [encoder.line(p).decode().rstrip("\n") for p in points]
    assert request["lines"][0] == f"engine.rpm,source_id=rig-01,unit=a value=3450.0 {T0}"

    v2.answers = [(401, {"Content-Type": "application/json"},
                   b'{"code":"unauthorized","message":"unauthorized access"}')]
    with pytest.raises(AuthenticationError, match="unauthorized access"):
        sink.send(points, "k")
    v2.answers = [(429, {"Retry-After": "7"}, b"")]
    with pytest.raises(RetryableSinkError) as limited:
        sink.send(points, "k")
    assert limited.value.retry_after == 7.0
    v2.answers = [(503, {}, b"")]
    with pytest.raises(RetryableSinkError) as unavailable:
        sink.send(points, "k")
    assert unavailable.value.retry_after is None
    # 422: a schema conflict somewhere in the batch; halves until it is alone.
    conflict = (422, {"Content-Type": "application/json"},
                b'{"code":"unprocessable entity","message":"failure writing points to database:'
                b' partial write: field type conflict"}')
    v2.requests.clear()
    v2.answers = [conflict, (204, {}, b""), conflict]
    result = sink.send(points, "k")
    assert result.delivered == 1 and [i for i, _ in result.rejected] == [1]
    assert "field type conflict" in result.rejected[0][1]
    assert [len(r["lines"]) for r in v2.requests] == [2, 1, 1]
    assert "tok-Zq9" not in repr(sink) + repr(sink.options)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "api v1 needs database"),
    ({"api": "v2"}, "api v2 needs bucket"),
    ({"database": "d", "bucket": "b"}, "bucket and org are for api v2"),
    ({"api": "v2", "bucket": "b", "database": "d"}, "are for api v1"),
    ({"database": "d", "password": "x"}, "password: is set without a username"),
    ({"database": "d", "username": "u", "token": "t"}, "not both"),
    ({"database": "d", "url": "localhost:8086"}, "url: must be an http"),
    ({"database": "d", "measurement": "bad\\"}, "cannot be written"),
])
def test_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InfluxdbSinkOptions(**options)
