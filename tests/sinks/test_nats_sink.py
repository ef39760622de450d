"""The ``nats`` sink against a real nats-server (Debian's) with JetStream, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.errors import AuthenticationError, ConfigError, RetryableSinkError
from plexus.sinks.nats import NatsSink, NatsSinkOptions
from tests.sinks.servers import NatsServer
from tests.sinks.support import build_gateway, pipeline_for, wait_until

pytest.importorskip("nats")
FUNCS = Path(__file__).resolve().parent.parent / "gateway_funcs.py"
LOGIN = {"user": "gw", "password": "pw"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as running:
        yield running


async def _admin(url: str, action: Any, **login: Any) -> Any:
    import nats

    nc = await nats.connect(url, **login)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


def admin(url: str, action: Any, **login: Any) -> Any:
    return asyncio.run(_admin(url, action, **login))


_streams = iter(range(1_000_000))


def make_stream(url: str, **config: Any) -> tuple[str, str]:
    """A new stream and the subject prefix it captures: (name, prefix)."""
    n = next(_streams)
    name, prefix = f"S{n}", f"s{n}"
    admin(url, lambda js: js.add_stream(name=name, subjects=[f"{prefix}.>"], **config))
    return name, prefix


def stored(url: str, stream: str, **login: Any) -> list[tuple[str, str | None, bytes]]:
    """Every message in ``stream``: (subject, Nats-Msg-Id, payload), in order."""
    async def read(js: Any) -> list[tuple[str, str | None, bytes]]:
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append((msg.subject, (msg.headers or {}).get("Nats-Msg-Id"), msg.data))
        return out if info.state.messages else []
    return list(admin(url, read, **login))


def sink_for(url: str, **options: Any) -> NatsSink:
    sink = NatsSink(NatsSinkOptions(servers=[url], **options), name="nats")
    sink.open("rig-01")
    return sink


def points_in(messages: list[tuple[str, str | None, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(line) for _, _, data in messages for line in data.splitlines()]


def test_a_gateway_publishes_batches_acknowledged_by_the_stream(
        server: NatsServer, tmp_path: Path) -> None:
    stream, prefix = make_stream(server.url)
    gateway = build_gateway(
        "source_id: rig-01\nbatch: {interval: 0.05}\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.01\n"
        f"sinks:\n  - type: nats\n    servers: [{server.url}]\n"
        f"    subject: '{prefix}.{{source_id}}'\n    stream: {stream}\n", tmp_path)
    gateway.start()
    try:
        assert wait_until(lambda: gateway.status()["sinks"][0]["delivered"] >= 30)
    finally:
        gateway.shutdown(5.0)
    status = gateway.status()["sinks"][0]
    messages = stored(server.url, stream)
    points = points_in(messages)
    assert status["buffered"] == 0 and status["delivered"] == len(points)
    values = [p["value"] for p in points]
    assert values == list(range(values[0], values[0] + len(values)))
    assert {subject for subject, _, _ in messages} == {f"{prefix}.rig-01"}
    ids = [msg_id for _, msg_id, _ in messages]
    assert all(ids) and len(set(ids)) == len(ids)  # one id per batch
    assert points[0]["source_id"] == "rig-01" and points[0]["metric"] == "test.seq"
    # What an upload budget counts: every payload's bytes, reported by the sink.
    sink = gateway.pipeline.lanes[0].sink
    assert sink.reports_bytes and sink.bytes_sent == sum(len(data) for _, _, data in messages)


def test_a_batch_sent_again_after_a_crash_is_stored_once(server: NatsServer) -> None:
    stream, prefix = make_stream(server.url)
    points = [("m", i, 1_700_000_000_000 + i, None) for i in range(50)]
    first = sink_for(server.url, subject=f"{prefix}.x")
    assert first.send(points, "batch-7").delivered == 50
    first.close()  # the gateway dies before its buffer records the ack...
    again = sink_for(server.url, subject=f"{prefix}.x")
    result = again.send(points, "batch-7")  # ...and sends the batch again, same key
    again.close()
    assert result.delivered == 50 and again.duplicates == 1
    messages = stored(server.url, stream)
    assert len(messages) == 1 and messages[0][1] == "batch-7"
    assert [p["value"] for p in points_in(messages)] == list(range(50))


def test_large_batches_are_split_with_stable_ids(server: NatsServer) -> None:
    stream, prefix = make_stream(server.url)
    points = [("engine.rpm", 3000 + i, 1_700_000_000_000 + i, {"unit": "a"}) for i in range(200)]
    sink = sink_for(server.url, subject=f"{prefix}.x", max_message_bytes=2048)
    assert sink.send(points, "k").delivered == 200
    messages = stored(server.url, stream)
    assert len(messages) > 5 and all(len(data) <= 2048 for _, _, data in messages)
    assert [msg_id for _, msg_id, _ in messages] == [f"k.{n}" for n in range(len(messages))]
    # The retry of the same batch splits it the same way: every part a duplicate.
    retry = sink_for(server.url, subject=f"{prefix}.x", max_message_bytes=2048)
    assert retry.send(points, "k").delivered == 200
    assert retry.duplicates == len(messages) and len(stored(server.url, stream)) == len(messages)
    assert [p["value"] for p in points_in(messages)] == [3000 + i for i in range(200)]


def test_a_message_over_the_streams_size_limit_is_halved(server: NatsServer) -> None:
    stream, prefix = make_stream(server.url, max_msg_size=1500)
    points = [("m", i, 1_700_000_000_000 + i, None) for i in range(60)]
    points.append(("big", "x" * 250, 1_700_000_000_000, {f"t{i}": "y" * 200 for i in range(8)}))
    result = sink_for(server.url, subject=f"{prefix}.x").send(points, "k")
    assert [i for i, _ in result.rejected] == [60]
    assert "max_msg_size" in result.rejected[0][1]
    assert result.delivered == 60
    messages = stored(server.url, stream)
    assert all(msg_id and msg_id.startswith("k.") for _, msg_id, _ in messages)
    assert sorted(p["value"] for p in points_in(messages)) == list(range(60))


def test_no_stream_keeps_the_data_until_one_exists(server: NatsServer) -> None:
    n = next(_streams)
    sink = NatsSink(NatsSinkOptions(servers=[server.url], subject=f"late{n}.x", timeout=2))
    with pytest.raises(RetryableSinkError, match="no JetStream stream stores subject"):
        sink.open("rig-01")
        sink.send([("m", 1, 1, None)], "k")
    pipeline = pipeline_for(sink)
    try:
        for i in range(100):
            pipeline.emit("m", i)
        assert wait_until(lambda: pipeline.lanes[0].uploader.stats.failures >= 1)
        admin(server.url, lambda js: js.add_stream(name=f"LATE{n}", subjects=[f"late{n}.>"]))
        pipeline.flush(timeout=15)
    finally:
        pipeline.close(1.0)
    assert [p["value"] for p in points_in(stored(server.url, f"LATE{n}"))] == list(range(100))


def test_server_down_keeps_the_data_and_delivers_when_it_is_back(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")  # not started yet
    sink = NatsSink(NatsSinkOptions(servers=[server.url], subject="down.x", timeout=1))
    pipeline = pipeline_for(sink)
    try:
        for i in range(100):
            pipeline.emit("m", i)
        assert wait_until(lambda: pipeline.lanes[0].uploader.stats.failures >= 1)
        assert "cannot connect" in (pipeline.lanes[0].uploader.stats.last_error or "")
        with server:
            admin(server.url, lambda js: js.add_stream(name="DOWN", subjects=["down.>"]))
            pipeline.flush(timeout=15)
            messages = stored(server.url, "DOWN")
    finally:
        pipeline.close(1.0)
    assert [p["value"] for p in points_in(messages)] == list(range(100))


def test_refused_login_and_forbidden_subject_are_authentication_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "n4ts-Secret-Zq9"
    caplog.set_level(logging.DEBUG)
    permissions = {"limited": {"publish": {"allow": ["other.>", "$JS.API.>"]},
                               "subscribe": {"allow": ["_INBOX.>"]}}}
    with NatsServer(tmp_path / "nats", users={"gw": secret, "limited": secret},
                    permissions=permissions) as server:
        admin(server.url, lambda js: js.add_stream(name="P", subjects=["plexus.>"]),
              user="gw", password=secret)
        bad = sink_for(server.url, user="gw", password="wrong-Zq9", timeout=1)
        with pytest.raises(AuthenticationError, match="refused the login") as refused:
            bad.send([("m", 1, 1, None)], "k")
        bad.close()
        limited = sink_for(server.url, user="limited", password=secret, timeout=1)
        with pytest.raises(AuthenticationError, match="(?i)permissions violation"):
            limited.send([("m", 1, 1, None)], "k")
        limited.close()
        good = sink_for(server.url, user="gw", password=secret)
        assert good.send([("m", 1, 1, None)], "k").delivered == 1
        good.close()
    shown = " ".join([repr(good), repr(good.options), str(refused.value), caplog.text])
    assert secret not in shown and "wrong-Zq9" not in shown


@pytest.mark.parametrize(("options", "message"), [
    ({"servers": []}, "at least one server"),
    ({"servers": ["localhost:4222"]}, "must be a URL"),
    ({"subject": "a.*.b"}, "without spaces or wildcards"),
    ({"subject": "a..b"}, "without spaces or wildcards"),
    ({"subject": "a.{vehicle}"}, "the only field is"),
    ({"password": "x"}, "password: is set without a user"),
    ({"user": "u", "token": "t"}, "use one of"),
    ({"certfile": "c.pem"}, "go together"),
    ({"max_message_bytes": 10}, "at least 1024"),
])
def test_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NatsSinkOptions(**options)
