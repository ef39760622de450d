"""The MQTT adapter against a real mosquitto broker on 127.0.0.1."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.adapters.mqtt import MqttAdapter, MqttOptions, TopicOption
from plexus.errors import AdapterError, ConfigError
from tests.adapters.mosquitto import MosquittoBroker, make_tls_files
from tests.support import CollectingContext, require_binary, wait_until

PROTOCOLS = ["3.1.1", "5"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def adapters() -> Iterator[list[MqttAdapter]]:
    """Adapters started by a test; stopped at teardown whatever happens."""
    started: list[MqttAdapter] = []
    yield started
    for adapter in started:
        adapter.stop(5)


def start_adapter(adapters: list[MqttAdapter], ctx: CollectingContext, port: int,
                  wait: bool = True, **options: Any) -> MqttAdapter:
    options.setdefault("host", "127.0.0.1")
    adapter = MqttAdapter(MqttOptions(port=port, **options), name="mqtt-test")
    adapters.append(adapter)
    adapter.start(ctx)
    if wait:
        assert wait_until(lambda: subscribed(adapter)), adapter.health()
    return adapter


def subscribed(adapter: MqttAdapter) -> bool:
    return adapter.state == "connected" and adapter.subscriptions == len(adapter.options.topics)


def mosquitto_pub(broker: MosquittoBroker, topic: str, payload: bytes | str,
                  qos: int = 0, *extra: str) -> None:
    """Publish one message with the mosquitto_pub client (payload via stdin: any bytes)."""
    binary = require_binary("mosquitto_pub")
    data = payload.encode() if isinstance(payload, str) else payload
    subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, "-q", str(qos),
         "-s", *extra],
        input=data, check=True, capture_output=True, timeout=10,
    )


class Publisher:
    """A paho client publishing to the test broker."""

    def __init__(self, port: int, protocol: str = "3.1.1", **tls: Any) -> None:
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-publisher-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: Any, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: MosquittoBroker) -> Iterator[Publisher]:
    pub = Publisher(broker.port)
    yield pub
    pub.close()


def values(ctx: CollectingContext, metric: str) -> list[Any]:
    return ctx.metrics().get(metric, [])


def wait_metric(ctx: CollectingContext, metric: str, count: int = 1) -> list[Any]:
    assert ctx.wait_for(lambda c: len(c.metrics().get(metric, [])) >= count, 15), ctx.metrics()
    return values(ctx, metric)


# Options and import ----------------------------------------------------------


def test_import_does_not_import_paho() -> None:
    code = "import sys, plexus.adapters.mqtt; assert 'paho' not in sys.modules, 'paho imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_topics_accept_strings_and_mappings_and_hide_password() -> None:
    options = MqttOptions(
        topics=["a/b", {"topic": "c/#", "qos": 1}, TopicOption("d/+/e", 2)],  # type: ignore[list-item]
        username="u", password="hunter2-secret",
    )
    assert options.topics == [TopicOption("a/b", 0), TopicOption("c/#", 1), TopicOption("d/+/e", 2)]
    adapter = MqttAdapter(options)
    assert "hunter2-secret" not in repr(options)
    assert "hunter2-secret" not in repr(adapter)
    assert "hunter2-secret" not in repr(adapter.health())
    assert adapter.client_id.startswith("plexus-")


@pytest.mark.parametrize("bad", [
    {"topics": []},
    {"topics": ["a/#/b"]},
    {"topics": ["a/b+"]},
    {"topics": [{"topic": "a", "qos": 3}]},
    {"topics": [{"topik": "a"}]},
    {"topics": ["a"], "metric_template": "{1"},
    {"topics": ["a"], "metric_template": "{name}"},
    {"topics": ["a"], "ca_certs": "/x.pem"},
    {"topics": ["a"], "protocol": "4"},
    {"topics": ["a"], "port": 0},
    {"topics": ["a"], "payload_format": "number", "value_path": "x"},
])
def test_bad_options_raise_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        MqttOptions(**bad)


def test_missing_tls_file_fails_start(collector: CollectingContext, tmp_path: Path) -> None:
    adapter = MqttAdapter(MqttOptions(topics=["a"], tls=True, ca_certs=str(tmp_path / "none.pem")))
    with pytest.raises(AdapterError):
        adapter.start(collector)
    adapter.stop(1)


# Payloads ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_scalars_from_mosquitto_pub(broker: MosquittoBroker, collector: CollectingContext,
                                    adapters: list[MqttAdapter], protocol: str) -> None:
    adapter = start_adapter(adapters, collector, broker.port, topics=["sensors/#"],
                            protocol=protocol)
    mosquitto_pub(broker, "sensors/engine/rpm", "3450")
    mosquitto_pub(broker, "sensors/engine/temp", "87.5\n")
    mosquitto_pub(broker, "sensors/door/open", "true")
    mosquitto_pub(broker, "sensors/door/locked", "FALSE")
    mosquitto_pub(broker, "sensors/mode", "cruise control")
    mosquitto_pub(broker, "sensors/quoted", '"json string"')
    mosquitto_pub(broker, "sensors/plus", "+5")
    mosquitto_pub(broker, "sensors/done", "1")
    wait_metric(collector, "sensors.done")
    got = collector.metrics()
    assert got["sensors.engine.rpm"] == [3450]
    assert type(got["sensors.engine.rpm"][0]) is int
    assert got["sensors.engine.temp"] == [87.5]
    assert got["sensors.door.open"] == [True]
    assert got["sensors.door.locked"] == [False]
    assert got["sensors.mode"] == ["cruise control"]
    assert got["sensors.quoted"] == ["json string"]
    assert got["sensors.plus"] == [5]
    assert adapter.health().extra["messages"] == 8
    assert adapter.bad_payloads == 0
    assert adapter.health().state == "connected"


def test_json_objects_are_flattened(broker: MosquittoBroker, collector: CollectingContext,
                                    adapters: list[MqttAdapter], publisher: Publisher) -> None:
    start_adapter(adapters, collector, broker.port, topics=["imu/#"])
    publisher.publish("imu/1", b'{"accel": {"x": 0.5, "y": -1, "z": 9.81}, '
                      b'"gyro": [1, 2, 3], "ok": true, "note": "fine", "missing": null, '
                      b'"cal": {"done": [{"a": 1}]}}')
    wait_metric(collector, "imu.1.cal.done.0.a")
    got = collector.metrics()
    assert got["imu.1.accel.x"] == [0.5]
    assert got["imu.1.accel.y"] == [-1]
    assert got["imu.1.accel.z"] == [9.81]
    assert got["imu.1.gyro.0"] == [1]
    assert got["imu.1.gyro.2"] == [3]
    assert got["imu.1.ok"] == [True]
    assert got["imu.1.note"] == ["fine"]
    assert not any(m.startswith("imu.1.missing") for m in got)
    assert len(collector.points) == 9


def test_arrays_kept_whole_with_arrays_value(broker: MosquittoBroker,
                                             collector: CollectingContext,
                                             adapters: list[MqttAdapter],
                                             publisher: Publisher) -> None:
    start_adapter(adapters, collector, broker.port, topics=["imu/#"], arrays="value")
    publisher.publish("imu/gyro", b'{"xyz": [1, 2.5, 3], "n": 1}')
    wait_metric(collector, "imu.gyro.n")
    assert values(collector, "imu.gyro.xyz") == [[1, 2.5, 3]]


def test_value_path_and_timestamp_path(broker: MosquittoBroker, collector: CollectingContext,
                                       adapters: list[MqttAdapter],
                                       publisher: Publisher) -> None:
    adapter = start_adapter(adapters, collector, broker.port, topics=["env/#"],
                            value_path="data.temp", timestamp_path="meta.ts")
    publisher.publish("env/ms", b'{"data": {"temp": 21.5, "hum": 40}, "meta": {"ts": 1700000000123}}')
    publisher.publish("env/s", b'{"data": {"temp": 22}, "meta": {"ts": 1700000001.5}}')
    publisher.publish("env/iso", b'{"data": {"temp": 23}, "meta": {"ts": "2023-11-14T22:13:22Z"}}')
    publisher.publish("env/nested", b'{"data": {"temp": {"in": 1, "out": 2}}, "meta": {"ts": 1700000003}}')
    publisher.publish("env/nots", b'{"data": {"temp": 24}}')
    publisher.publish("env/novalue", b'{"data": {}, "meta": {"ts": 1700000000}}')
    publisher.publish("env/end", b'{"data": {"temp": 0}, "meta": {"ts": 1700000009}}')
    wait_metric(collector, "env.end")
    by_metric = {p[0]: p for p in collector.points}
    assert by_metric["env.ms"][1:3] == (21.5, 1700000000123)
    assert by_metric["env.s"][1:3] == (22, 1700000001500)
    assert by_metric["env.iso"][1:3] == (23, 1700000002000)
    assert by_metric["env.nested.in"][1:3] == (1, 1700000003000)
    assert by_metric["env.nested.out"][1:3] == (2, 1700000003000)
    # A missing timestamp keeps the reading with its receive time, and is counted.
    assert by_metric["env.nots"][1] == 24
    assert abs(by_metric["env.nots"][2] / 1000 - time.time()) < 600
    assert adapter.bad_timestamps == 1  # env/nots
    assert "env.novalue" not in by_metric
    assert adapter.bad_payloads == 1


def test_timestamp_leaf_is_not_a_metric(broker: MosquittoBroker, collector: CollectingContext,
                                        adapters: list[MqttAdapter],
                                        publisher: Publisher) -> None:
    start_adapter(adapters, collector, broker.port, topics=["gps"], timestamp_path="time")
    publisher.publish("gps", b'{"lat": 52.5, "lon": 13.4, "time": 1700000000000}')
    wait_metric(collector, "gps.lon")
    assert sorted(p[0] for p in collector.points) == ["gps.lat", "gps.lon"]
    assert {p[2] for p in collector.points} == {1700000000000}


def test_template_tags_prefix_and_wildcards(broker: MosquittoBroker,
                                            collector: CollectingContext,
                                            adapters: list[MqttAdapter]) -> None:
    adapter = start_adapter(
        adapters, collector, broker.port,
        topics=["fleet/+/engine/#", {"topic": "fleet/+/gps", "qos": 1}],
        metric_template="{2}.{3}", tag_segments={"vehicle": 1, "leaf": -1}, prefix="rig",
    )
    mosquitto_pub(broker, "fleet/truck7/engine/rpm", "900")
    mosquitto_pub(broker, "fleet/truck8/engine/oil", "80")
    mosquitto_pub(broker, "fleet/truck7/brakes/temp", "50")  # matches no filter
    mosquitto_pub(broker, "fleet/truck9/gps", "1")  # has no level 3: bad
    mosquitto_pub(broker, "fleet/truck7/engine/done", "1")
    wait_metric(collector, "rig.engine.done")
    got = {(p[0], p[3]["vehicle"]): p for p in collector.points if p[3]}
    assert got[("rig.engine.rpm", "truck7")][1] == 900
    assert got[("rig.engine.rpm", "truck7")][3] == {"vehicle": "truck7", "leaf": "rpm"}
    assert got[("rig.engine.oil", "truck8")][1] == 80
    assert len(collector.points) == 3
    assert wait_until(lambda: adapter.bad_payloads == 1)


def test_default_metric_with_prefix_and_tags(broker: MosquittoBroker,
                                             collector: CollectingContext,
                                             adapters: list[MqttAdapter]) -> None:
    start_adapter(adapters, collector, broker.port, topics=["a/+/c"], prefix="plant",
                  tag_segments={"line": 1, "nope": 7})
    mosquitto_pub(broker, "a/L2/c", "5")
    wait_metric(collector, "plant.a.L2.c")
    assert collector.points[0][3] == {"line": "L2"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos1_subscription(broker: MosquittoBroker, collector: CollectingContext,
                           adapters: list[MqttAdapter], protocol: str) -> None:
    start_adapter(adapters, collector, broker.port, protocol=protocol,
                  topics=[{"topic": "q/#", "qos": 1}])
    pub = Publisher(broker.port, protocol)
    try:
        for i in range(50):
            pub.publish("q/n", str(i), qos=1)
        mosquitto_pub(broker, "q/n", "50", 1)
    finally:
        pub.close()
    assert wait_metric(collector, "q.n", 51) == list(range(51))


def test_bad_payloads_are_counted_and_delivery_goes_on(
        broker: MosquittoBroker, collector: CollectingContext, adapters: list[MqttAdapter],
        publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    adapter = start_adapter(adapters, collector, broker.port, topics=["x/#"],
                            max_payload_bytes=1000)
    publisher.publish("x/bin", b"\xff\xfe\x00garbage")
    publisher.publish("x/json", b'{"broken": ')
    publisher.publish("x/nan", b"NaN")
    publisher.publish("x/null", b"null")
    publisher.publish("x/blank", b"   ")
    publisher.publish("x/huge", b"1" * 5000)
    publisher.publish("x/longtext", b"y" * 600)  # under the size limit; the pipeline rejects it
    publisher.publish("x/retained", b"", retain=True)  # a retained delete: ignored
    publisher.publish("x/good", b"42")
    assert wait_metric(collector, "x.good") == [42]
    assert adapter.bad_payloads == 6
    assert adapter.errors == 7  # + the point the pipeline rejected
    assert adapter.health().extra["messages"] == 9
    assert adapter.state == "connected"
    # Logging is rate-limited: the first bad payload is logged, the rest are counted.
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 2
    mosquitto_pub(broker, "x/good", "43")
    assert wait_metric(collector, "x.good", 2) == [42, 43]


def test_payload_format_json_and_number(broker: MosquittoBroker,
                                        collector: CollectingContext,
                                        adapters: list[MqttAdapter],
                                        publisher: Publisher) -> None:
    as_json = start_adapter(adapters, collector, broker.port, topics=["j/#"],
                            payload_format="json")
    as_number = start_adapter(adapters, collector, broker.port, topics=["n/#"],
                              payload_format="number")
    as_string = start_adapter(adapters, collector, broker.port, topics=["s/#"],
                              payload_format="string")
    publisher.publish("j/a", b"hello")
    publisher.publish("n/a", b"true")
    publisher.publish("s/a", b"42")
    publisher.publish("j/ok", b"[1]")
    publisher.publish("n/ok", b"-1.5e3")
    publisher.publish("s/ok", b"{}")
    for metric in ("j.ok.0", "n.ok", "s.ok"):
        wait_metric(collector, metric)
    assert values(collector, "n.ok") == [-1500.0]
    assert values(collector, "s.a") == ["42"]
    assert values(collector, "s.ok") == ["{}"]
    assert (as_json.bad_payloads, as_number.bad_payloads, as_string.bad_payloads) == (1, 1, 0)


# Links ----------------------------------------------------------------------------


def test_username_password(tmp_path: Path, collector: CollectingContext,
                           adapters: list[MqttAdapter],
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with MosquittoBroker(tmp_path / "auth", users={"plexus": "s3cret-pw"}) as broker:
        good = start_adapter(adapters, collector, broker.port, topics=["t"],
                             username="plexus", password="s3cret-pw")
        bad = start_adapter(adapters, collector, broker.port, topics=["t"], wait=False,
                            username="plexus", password="wrong-pw")
        assert wait_until(lambda: bad.connect_failures >= 1)
        assert bad.state == "reconnecting"
        assert bad.errors >= 1 and "refused" in (bad.last_error or "")
        assert good.state == "connected"
        mosquitto_pub(broker, "t", "1", 0, "-u", "plexus", "-P", "s3cret-pw")
        assert wait_metric(collector, "t") == [1]
        assert good.points == 1 and bad.points == 0
    assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_broker_restart_resubscribes_once(broker: MosquittoBroker,
                                          collector: CollectingContext,
                                          adapters: list[MqttAdapter], protocol: str) -> None:
    adapter = start_adapter(adapters, collector, broker.port, protocol=protocol,
                            topics=["r/#"])
    mosquitto_pub(broker, "r/v", "1")
    wait_metric(collector, "r.v")

    broker.restart()
    assert wait_until(lambda: adapter.reconnects >= 1 and subscribed(adapter), 30), \
        adapter.health()
    assert adapter.health().extra["subscriptions"] == 1

    mosquitto_pub(broker, "r/v", "2")
    mosquitto_pub(broker, "r/v", "3")
    # Messages on one topic arrive in order: once 3 is here, a duplicate 2 would be too.
    assert wait_metric(collector, "r.v", 3)[-1] == 3
    assert values(collector, "r.v") == [1, 2, 3]
    assert adapter.reconnects == 1


def test_start_does_not_block_when_broker_is_down(tmp_path: Path,
                                                  collector: CollectingContext,
                                                  adapters: list[MqttAdapter]) -> None:
    broker = MosquittoBroker(tmp_path / "late")  # port chosen, broker not yet running
    try:
        adapter = start_adapter(adapters, collector, broker.port, topics=["late"], wait=False)
        assert adapter.state == "reconnecting"
        assert wait_until(lambda: adapter.connect_failures >= 1)
        assert adapter.errors >= 1
        broker.start()
        assert wait_until(lambda: subscribed(adapter), 30), adapter.health()
        mosquitto_pub(broker, "late", "7")
        assert wait_metric(collector, "late") == [7]
        assert adapter.reconnects == 0  # the first connection that worked
    finally:
        broker.stop()


def test_stop_disconnects(broker: MosquittoBroker, collector: CollectingContext,
                          adapters: list[MqttAdapter]) -> None:
    adapter = start_adapter(adapters, collector, broker.port, topics=["s"])
    adapter.stop(5)
    assert adapter.state == "stopped"
    assert not [t for t in threading.enumerate() if adapter.client_id in t.name]
    # mosquitto logs a clean DISCONNECT packet this way (a dropped socket reads differently).
    assert wait_until(lambda: f"Client {adapter.client_id} disconnected." in broker.log_text())
    mosquitto_pub(broker, "s", "1")
    mosquitto_pub(broker, "s", "2")
    assert collector.points == []


def test_stop_while_retrying_is_prompt(tmp_path: Path, collector: CollectingContext,
                                       adapters: list[MqttAdapter]) -> None:
    broker = MosquittoBroker(tmp_path / "never")  # never started
    adapter = start_adapter(adapters, collector, broker.port, topics=["a"], wait=False)
    assert wait_until(lambda: adapter.connect_failures >= 1)
    adapter.stop(5)
    assert adapter.state == "stopped"
    assert not [t for t in threading.enumerate() if adapter.client_id in t.name]


def test_tls_with_generated_ca(tmp_path: Path, collector: CollectingContext,
                               adapters: list[MqttAdapter],
                               caplog: pytest.LogCaptureFixture) -> None:
    files = make_tls_files(tmp_path / "pki")
    with MosquittoBroker(tmp_path / "tls", tls=files) as broker:
        assert broker.tls_port is not None
        start_adapter(adapters, collector, broker.tls_port, topics=["secure/#"], tls=True,
                      ca_certs=str(files.ca_cert), protocol="5")
        mosquitto_pub(broker, "secure/x", "1")  # published on the plain listener
        assert wait_metric(collector, "secure.x") == [1]

        # Without the CA the broker's certificate is not trusted: no connection.
        untrusted = start_adapter(adapters, collector, broker.tls_port, topics=["a"],
                                  wait=False, tls=True)
        assert wait_until(lambda: untrusted.connect_failures >= 1)
        assert untrusted.state == "reconnecting"


def test_tls_insecure_skips_host_name_check(tmp_path: Path, collector: CollectingContext,
                                            adapters: list[MqttAdapter],
                                            caplog: pytest.LogCaptureFixture) -> None:
    files = make_tls_files(tmp_path / "pki", common_name="broker.example",
                           alt_names="DNS:broker.example")
    with MosquittoBroker(tmp_path / "tls", tls=files) as broker:
        assert broker.tls_port is not None
        strict = start_adapter(adapters, collector, broker.tls_port, topics=["a"], wait=False,
                               tls=True, ca_certs=str(files.ca_cert))
        assert wait_until(lambda: strict.connect_failures >= 1)
        assert strict.state == "reconnecting"
        caplog.clear()
        start_adapter(adapters, collector, broker.tls_port, topics=["a"], tls=True,
                      ca_certs=str(files.ca_cert), tls_insecure=True)
        assert "tls_insecure" in caplog.text
        mosquitto_pub(broker, "a", "5")
        assert wait_metric(collector, "a") == [5]


def test_sample_config_builds_options() -> None:
    import typing

    import yaml

    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "mqtt.yaml").read_text())
    (entry,) = [a for a in config["adapters"] if a["type"] == "mqtt"]
    options = MqttOptions(**{k: v for k, v in entry.items() if k not in ("type", "name")})
    assert options.topics == [TopicOption("sensors/#"), TopicOption("fleet/+/engine/#", 1)]
    # The config loader validates against these hints, so they must resolve at runtime.
    hints = typing.get_type_hints(MqttOptions)
    assert set(hints) == {f for f in MqttOptions.__dataclass_fields__}
