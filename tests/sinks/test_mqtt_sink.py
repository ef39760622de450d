"""The ``mqtt`` sink against a real mosquitto on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.errors import AuthenticationError, ConfigError, RetryableSinkError
from plexus.sinks.mqtt import MqttSink, MqttSinkOptions
from tests.adapters.mosquitto import MosquittoBroker
from tests.sinks.support import build_gateway, pipeline_for, wait_until

pytest.importorskip("paho.mqtt.client")
FUNCS = Path(__file__).resolve().parent.parent / "gateway_funcs.py"


class Subscriber:
    """A paho client that records every message under ``filter``."""

    def __init__(self, port: int, topic_filter: str = "#", **login: Any) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber",
                                  protocol=mqtt.MQTTv5)
        if login:
            self.client.username_pw_set(login["username"], login["password"])
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = lambda client, *args: client.subscribe(topic_filter, qos=1)
        self.on_count: tuple[int, Any] | None = None
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))
            count = len(self.messages)
        if self.on_count is not None and count == self.on_count[0]:
            self.on_count[1]()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def subscriber(broker: MosquittoBroker) -> Iterator[Subscriber]:
    sub = Subscriber(broker.port)
    yield sub
    sub.close()


def sink_for(broker: MosquittoBroker, **options: Any) -> MqttSink:
    sink = MqttSink(MqttSinkOptions(host="127.0.0.1", port=broker.port, **options), name="mq")
    sink.open("rig-01")
    return sink


def test_a_gateway_publishes_every_point_with_a_templated_topic(
        broker: MosquittoBroker, subscriber: Subscriber, tmp_path: Path) -> None:
    gateway = build_gateway(
        "source_id: rig-01\nbatch: {interval: 0.05}\n"
        f"adapters:\n  - type: callable\n    function: {FUNCS}:sequence\n    interval: 0.01\n"
        "    tags: {vehicle: truck-7}\n"
        f"sinks:\n  - type: mqtt\n    host: 127.0.0.1\n    port: {broker.port}\n"
        "    topic: 'fleet/{tags[vehicle]}/{metric_path}'\n", tmp_path)
    gateway.start()
    try:
        assert wait_until(lambda: len(subscriber.messages) >= 30)
    finally:
        gateway.shutdown(5.0)
    status = gateway.status()["sinks"][0]
    assert status["name"] == "mqtt" and status["buffered"] == 0 and status["dropped"] == 0
    # A PUBACK for each message, no more (the last ones may still be on their way).
    assert wait_until(lambda: len(subscriber.messages) >= status["delivered"])
    assert status["delivered"] == len(subscriber.messages)
    topics = {topic for topic, _ in subscriber.messages}
    assert topics == {"fleet/truck-7/test/seq"}
    bodies = [json.loads(payload) for _, payload in subscriber.messages]
    values = [b["value"] for b in bodies]
    assert values == list(range(values[0], values[0] + len(values)))  # in order, no gap
    assert bodies[0]["source_id"] == "rig-01" and bodies[0]["tags"] == {"vehicle": "truck-7"}
    assert bodies[0]["metric"] == "test.seq" and isinstance(bodies[0]["timestamp"], int)
    # What an upload budget counts: every payload's bytes, reported by the sink.
    sink = gateway.pipeline.lanes[0].sink
    assert sink.reports_bytes and sink.bytes_sent == sum(len(p) for _, p in subscriber.messages)


def test_value_payloads_and_points_that_cannot_be_published(
        broker: MosquittoBroker, subscriber: Subscriber) -> None:
    sink = sink_for(broker, topic="t/{tags[unit]}/{metric}", payload="value", qos=2)
    points = [
        ("a", 1.5, 1, {"unit": "u1"}),
        ("b", True, 2, {"unit": "u1"}),
        ("c", "running", 3, {"unit": "u1"}),
        ("d", {"x": 1, "y": [2, 3]}, 4, {"unit": "u1"}),
        ("e", 2, 5, None),  # no unit tag: the topic cannot be built
        ("f+g", 3, 6, {"unit": "u1"}),  # a wildcard in a published topic
    ]
    try:
        result = sink.send(points, "k1")
    finally:
        sink.close()
    assert result.delivered == 4
    assert [i for i, _ in result.rejected] == [4, 5]
    assert "needs tag 'unit'" in result.rejected[0][1] and "'+'" in result.rejected[1][1]
    assert wait_until(lambda: len(subscriber.messages) == 4)
    assert sorted(subscriber.messages) == [
        ("t/u1/a", b"1.5"), ("t/u1/b", b"true"), ("t/u1/c", b"running"),
        ("t/u1/d", b'{"x":1,"y":[2,3]}')]


def test_broker_down_keeps_the_data_and_delivers_when_it_is_back(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker")  # not started yet
    sink = MqttSink(MqttSinkOptions(host="127.0.0.1", port=broker.port, timeout=2), name="mq")
    sink.open("rig-01")
    with pytest.raises(RetryableSinkError, match="cannot connect"):
        sink.send([("m", 1, 1, None)], "k")
    # The retry after the first failure waits for the test: the subscriber must be
    # subscribed before anything is published (the broker keeps nothing for it).
    retry_may_go = threading.Event()
    pipeline = pipeline_for(sink, sleep=lambda seconds: retry_may_go.wait(30))
    try:
        for i in range(100):
            pipeline.emit("m", i)
        assert wait_until(lambda: pipeline.lanes[0].uploader.stats.failures >= 1)
        assert len(pipeline.lanes[0].buffer) == 100
        with broker:
            subscriber = Subscriber(broker.port)
            retry_may_go.set()
            try:
                pipeline.flush(timeout=15)
                assert wait_until(lambda: len(subscriber.messages) == 100)
            finally:
                subscriber.close()
    finally:
        retry_may_go.set()
        pipeline.close(1.0)
    assert sorted(json.loads(p)["value"] for _, p in subscriber.messages) == list(range(100))


def test_a_retry_publishes_only_what_was_not_acknowledged(
        broker: MosquittoBroker, subscriber: Subscriber) -> None:
    sink = sink_for(broker, timeout=1.0, max_inflight=5)
    points = [("m", i, i + 1, None) for i in range(300)]
    sink.send(points[:1], "warm-up")  # connected
    assert broker.process is not None
    pid = broker.process.pid
    # Freeze the broker mid-batch: publishes stop being acknowledged.
    subscriber.on_count = (101, lambda: os.kill(pid, signal.SIGSTOP))
    try:
        with pytest.raises(RetryableSinkError, match="not acknowledged"):
            sink.send(points, "batch-1")
    finally:
        os.kill(pid, signal.SIGCONT)
    acknowledged_before = sink.published - 1
    assert 0 < acknowledged_before < 300
    result = sink.send(points, "batch-1")  # the uploader's retry: same points, same key
    sink.close()
    assert result.delivered == 300 and not result.rejected
    assert sink.published - 1 == 300  # each point acknowledged once
    assert wait_until(lambda: {json.loads(p)["value"] for _, p in subscriber.messages[1:]}
                      == set(range(300)))
    # At least once: only messages sent but not yet acknowledged at the freeze can repeat.
    assert len(subscriber.messages) - 1 <= 300 + 5


def test_login_refused_is_an_authentication_error_and_the_password_never_shows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-pass-Zq9"
    with MosquittoBroker(tmp_path / "broker", users={"gw": secret}) as broker:
        caplog.set_level(logging.DEBUG)
        bad = sink_for(broker, username="gw", password="wrong-Zq9")
        with pytest.raises(AuthenticationError, match="refused the login") as refused:
            bad.send([("m", 1, 1, None)], "k")
        good = sink_for(broker, username="gw", password=secret, protocol="5")
        sub = Subscriber(broker.port, username="gw", password=secret)
        try:
            assert good.send([("m", 1, 1, None)], "k").delivered == 1
            assert wait_until(lambda: len(sub.messages) == 1)
        finally:
            good.close()
            sub.close()
        shown = " ".join([repr(good), repr(good.options), str(refused.value), caplog.text])
        assert secret not in shown and "wrong-Zq9" not in shown


@pytest.mark.parametrize(("options", "message"), [
    ({"qos": 0}, "qos: expected one of 1, 2, got 0"),
    ({"topic": "a/{nope}"}, "topic: 'a/{nope}' is invalid"),
    ({"topic": "a/{0}"}, "is invalid"),
    ({"topic": "a/#"}, "must not be empty or hold"),
    ({"password": "x"}, "password: is set without a username"),
    ({"ca_certs": "ca.pem"}, "tls: is false, but ca_certs/certfile/keyfile are set"),
    ({"batch": True, "payload": "value"}, "batch: needs payload: json"),
])
def test_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MqttSinkOptions(**options)


def test_mqtt5_reports_a_publish_the_acl_forbids(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user gw\ntopic write plexus/rig-01/ok/#\n")
    with MosquittoBroker(tmp_path / "broker", users={"gw": "pw"},
                         extra_config=(f"acl_file {acl}",)) as broker:
        points = [("ok.a", 1, 1, None), ("denied.b", 2, 2, None)]
        v5 = sink_for(broker, username="gw", password="pw", protocol="5")
        with pytest.raises(AuthenticationError, match="not authorized"):
            v5.send(points, "k")
        v5.close()
        # MQTT 3.1.1 has no way to say no: the broker acknowledges and drops the message.
        v311 = sink_for(broker, username="gw", password="pw", protocol="3.1.1")
        assert v311.send(points, "k").delivered == 2
        v311.close()


def test_batch_mode_sends_one_message_per_topic_cut_at_the_size_limit(
        broker: MosquittoBroker, subscriber: Subscriber) -> None:
    sink = sink_for(broker, topic="rig/{tags[unit]}", batch=True, max_message_bytes=2048)
    points = [("m", i, i + 1, {"unit": "a" if i % 3 else "b"}) for i in range(90)]
    points.append(("n", 1, 1, None))  # no unit tag: rejected, the rest goes
    result = sink.send(points, "k")
    sink.close()
    assert result.delivered == 90 and [i for i, _ in result.rejected] == [90]
    assert wait_until(lambda: sum(len(p.splitlines()) for _, p in subscriber.messages) == 90)
    assert all(len(payload) <= 2048 for _, payload in subscriber.messages)
    by_topic: dict[str, list[int]] = {}
    for topic, payload in subscriber.messages:
        by_topic.setdefault(topic, []).extend(json.loads(line)["value"]
                                              for line in payload.splitlines())
    assert by_topic == {"rig/a": [i for i in range(90) if i % 3],
                        "rig/b": [i for i in range(90) if not i % 3]}
    assert len(subscriber.messages) < 10  # not one per point
